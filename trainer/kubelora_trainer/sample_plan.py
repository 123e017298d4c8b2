"""spec.samples without torch: what a family accepts, the settings of each sample, the steps that
sample, and where the files go. Pure; the spec validates with it, samples.py runs it."""
from __future__ import annotations

from typing import Optional

from .families import RULES, any_size_for_tests, areas_of, frame_buckets_of, size_of

FIELDS = ("negativePrompt", "seed", "width", "height", "frames", "guidance", "steps")


def sampling_families() -> list[str]:
    return [t for t, r in RULES.items() if r.sampling is not None]


def check_samples(spec) -> Optional[str]:
    """The first problem with spec.samples for the model family, naming the field; None if fine."""
    s = spec.samples
    if s is None:
        return None
    kind = spec.model.type
    r = RULES[kind]
    if r.sampling is None:
        return (f"samples: sampling during training is not yet available for model.type {kind} (it is for "
                f"{', '.join(sampling_families())}); remove spec.samples")
    if not (s.everySteps or s.atStart or s.atEnd):
        return "samples: no step would sample; set samples.everySteps, samples.atStart or samples.atEnd"
    if not sample_steps(s, spec.training.steps):  # the encoders would be loaded and kept for nothing
        return (f"samples.everySteps: {s.everySteps} is more than training.steps ({spec.training.steps}) and "
                "samples.atStart and atEnd are off, so no step would sample; lower it or set atEnd")
    places = [("samples", s)] + [(f"samples.prompts[{i}]", p) for i, p in enumerate(s.prompts)]
    for where, p in places:
        if p.guidance is not None and spec.model.bypassGuidanceEmbedding:
            return (f"{where}.guidance: model.bypassGuidanceEmbedding leaves the guidance embedding out, so samples get "
                    "no guidance either; remove it")
        if (p.width is None) != (p.height is None):
            return f"{where}.width and {where}.height go together: set both, or neither"
        if p.width is not None and (p.width % r.size_multiple or p.height % r.size_multiple):
            return (f"{where}: {kind} samples need width and height divisible by {r.size_multiple}; "
                    f"got {p.width}x{p.height}")
        if p.width is not None and r.sizes and (p.width, p.height) not in r.sizes and not any_size_for_tests(kind):
            return (f"{where}: {kind} samples only at its sizes ({', '.join(f'{a}x{b}' for a, b in r.sizes)}, "
                    f"width x height); got {p.width}x{p.height}")
        if p.frames is not None:
            if not r.video and p.frames != 1:
                return f"{where}.frames: {kind} is an image model; remove frames (got {p.frames})"
            if r.frames and p.frames not in r.frames:
                return f"{where}.frames: {kind} supports only {' or '.join(map(str, r.frames))} frames (got {p.frames})"
            if r.frame_rule and (p.frames - r.frame_rule[1]) % r.frame_rule[0]:
                a, b = r.frame_rule
                return f"{where}.frames: {kind} needs {a}k+{b} frames (e.g. {a + b} or {2 * a + b}); got {p.frames}"
        if p.negativePrompt is not None and not r.sampling.negative_prompt:
            return (f"{where}.negativePrompt: {kind} samples without classifier-free guidance (its guidance is "
                    f"distilled into the model), so a negative prompt has no effect; remove it")
    if r.sampling.negative_prompt:  # classifier-free guidance, under which a negative prompt acts, runs above 1
        guided = [next(g for g in (p.guidance, s.guidance, r.sampling.guidance) if g is not None) > 1.0
                  for p in s.prompts]
        for i, p in enumerate(s.prompts):
            if p.negativePrompt is not None and not guided[i]:
                return (f"samples.prompts[{i}].negativePrompt: its guidance is 1 or less, and classifier-free guidance "
                        "runs only above 1, so the negative prompt would have no effect; raise guidance or remove it")
        if s.negativePrompt is not None and not any(g for g, p in zip(guided, s.prompts) if p.negativePrompt is None):
            return ("samples.negativePrompt: no prompt that takes it samples with guidance above 1 (classifier-free "
                    "guidance runs only there), so it would have no effect; raise guidance or remove it")
    return None


def default_size(dataset) -> tuple[int, int]:
    """The dataset's fixed width/height, else the largest training area (of any source) as a square."""
    if dataset.width or dataset.height:
        return size_of(dataset)
    side = max(max(areas_of(dataset, src)) for src in (dataset.sources or [None]))
    return side, side


def default_frames(model_type: str, dataset) -> int:
    """The longest clip the dataset trains at (of any source's frame buckets)."""
    return max(max(frame_buckets_of(model_type, dataset, src)) for src in (dataset.sources or [None]))


def resolve(spec) -> list[dict]:
    """Every sample prompt with all its settings (its own, else samples', else the dataset's or
    the family's). Pure."""
    s, r = spec.samples, RULES[spec.model.type]
    w, h = default_size(spec.dataset)
    out = []
    for i, p in enumerate(s.prompts):
        def pick(name, default):
            own = getattr(p, name)
            if own is not None:
                return own
            shared = getattr(s, name)
            return default if shared is None else shared
        width, height = (p.width, p.height) if p.width is not None else (s.width or w, s.height or h)
        # None: no negative prompt set (the family's own default); "" is an empty one, as in diffusers
        out.append({"index": i, "prompt": p.prompt, "negativePrompt": pick("negativePrompt", None),
                    "seed": pick("seed", s.seed), "width": width, "height": height,
                    "frames": pick("frames", default_frames(spec.model.type, spec.dataset)) if r.video else 1,
                    "guidance": float(pick("guidance", r.sampling.guidance)),
                    "steps": pick("steps", r.sampling.steps)})
    return out


def due(step: int, samples, total_steps: int) -> bool:
    """Whether training step `step` (0: before the first) samples."""
    if step == 0:
        return samples.atStart
    return bool((samples.everySteps and step % samples.everySteps == 0) or (samples.atEnd and step == total_steps))


def sample_steps(samples, total_steps: int) -> list[int]:
    return [s for s in range(total_steps + 1) if due(s, samples, total_steps)]


def is_video(model_type: str) -> bool:
    return RULES[model_type].video


def sample_path(step: int, index: int, video: bool) -> str:
    """Key of a sample under output.uri (a video's animated WebP preview: .webp beside it)."""
    return f"samples/step-{step}/prompt-{index}.{'mp4' if video else 'png'}"


def preview_path(path: str) -> str:
    return path.rsplit(".", 1)[0] + ".webp" if path.endswith(".mp4") else path


def forward_group(prompt: dict) -> tuple[int, bool]:
    """What fixes the sequence of denoiser and text-encoder forwards one sample runs, in every
    family's pipeline: the denoising steps, and classifier-free guidance on or off (guidance > 1;
    Flux's embedded guidance runs one forward either way, so grouping by it only splits finer)."""
    return prompt["steps"], prompt["guidance"] > 1.0


def assign(prompts: list[dict], world: int, rank: int, sharded: bool) -> list[tuple[int, bool]]:
    """The prompts (indices) this rank samples, each with whether it keeps (writes) the result;
    together the ranks sample every prompt once. Replicated or single ranks: round-robin. Under
    FSDP2 (sharded) every forward gathers the weights with the other ranks, so all ranks must run
    the same sequence of forwards: the prompts are grouped by forward_group, each group is split
    round-robin, and a rank left without a prompt in a group's last round runs the group's first
    prompt again and discards it."""
    if not sharded:
        return [(p["index"], True) for p in prompts[rank::world]]
    groups: dict[tuple, list[int]] = {}
    for p in prompts:
        groups.setdefault(forward_group(p), []).append(p["index"])
    out = []
    for idx in groups.values():
        for k in range(rank, -(-len(idx) // world) * world, world):
            out.append((idx[k], True) if k < len(idx) else (idx[0], False))
    return out
