"""spec.samples without torch: what a family accepts, the settings of each sample, the steps that
sample, and where the files go. Pure; the spec validates with it, samples.py runs it."""
from __future__ import annotations

from typing import Optional

from .families import RULES, areas_of, frame_buckets_of, size_of

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
    places = [("samples", s)] + [(f"samples.prompts[{i}]", p) for i, p in enumerate(s.prompts)]
    for where, p in places:
        if (p.width is None) != (p.height is None):
            return f"{where}.width and {where}.height go together: set both, or neither"
        if p.width is not None and (p.width % r.size_multiple or p.height % r.size_multiple):
            return (f"{where}: {kind} samples need width and height divisible by {r.size_multiple}; "
                    f"got {p.width}x{p.height}")
        if p.frames is not None:
            if not r.video and p.frames != 1:
                return f"{where}.frames: {kind} is an image model; remove frames (got {p.frames})"
            if r.frame_rule and (p.frames - r.frame_rule[1]) % r.frame_rule[0]:
                a, b = r.frame_rule
                return f"{where}.frames: {kind} needs {a}k+{b} frames (e.g. {a + b} or {2 * a + b}); got {p.frames}"
        if p.negativePrompt is not None and not r.sampling.negative_prompt:
            return (f"{where}.negativePrompt: {kind} samples without classifier-free guidance (its guidance is "
                    f"distilled into the model), so a negative prompt has no effect; remove it")
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
        out.append({"index": i, "prompt": p.prompt, "negativePrompt": pick("negativePrompt", "") or "",
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


def assign(n_prompts: int, world: int, rank: int, sharded: bool) -> tuple[list[int], bool]:
    """(the prompts this rank computes, whether it writes them). Replicated or single ranks split
    the prompts; under FSDP2 (sharded) every rank must run every forward together, so all compute
    all prompts and rank 0 writes them."""
    if sharded:
        return list(range(n_prompts)), rank == 0
    return list(range(rank, n_prompts, world)), True
