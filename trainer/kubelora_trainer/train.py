"""The training run every pod executes: stage-in -> cache -> train -> export -> upload.

    torchrun --nproc-per-node 2 -m kubelora_trainer run --spec examples/demo-flux.yaml
    kubelora run examples/demo-flux.yaml --nproc 2         # the same, with the local launcher

Every rank runs this file top to bottom. Collectives happen at fixed points, and any failure is
agreed on by all ranks (dist.fail_together, dist.agree) so that one bad rank makes the whole run
fail with its message and exit code rather than leaving the others waiting.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import __version__, adapters, checkpoint, dist, exits, export, export_full, lora, metrics, samples, storage
from . import masks, throughput
from . import buckets as bk
from .captions import options_of
from .data import DatasetError, ScanReport, Skip, check_item, check_usable, load_unit, scan, skipped_text
from .families import PATH_FIELDS, RULES, areas_of, frame_buckets_of, frames_of, size_of
from .models import get_family
from .models.base import ModelError
from .quiet import quiet_progress_bars
from .progress import Meter, Progress, Publisher, format_eta, line
from .spec import LoRATrainingJobSpec

CACHE_ENV = "KUBELORA_CACHE_DIR"
SINGLE_FILE_FIELDS = ("transformerPath", "checkpointPath", "vaePath")  # staged beside their siblings


class RunError(RuntimeError):
    pass


def log(env: dist.DistEnv | None, msg: str) -> None:
    if env is None or env.is_main:
        print(msg, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kubelora")


def _stage_dir(uri: str) -> Path:
    loc = storage.parse_uri(uri)
    return cache_root() / "s3" / loc.bucket / loc.key.strip("/") if loc.is_s3 else Path(loc.key)


def stage_in(spec: LoRATrainingJobSpec, env: dist.DistEnv, settings: storage.S3Settings) -> dict[str, str]:
    """Node-local rank 0 downloads model parts and the dataset; the other ranks wait and read
    the resolved paths it wrote. Returns {field: local path}."""
    uris = {**{f: getattr(spec.model, f) for f in PATH_FIELDS},
            **{f"dataset.{i}": u for i, u in enumerate(spec.dataset.uris)},
            **{f"dataset.{i}.mask": u for i, u in enumerate(spec.dataset.mask_uris)}}
    uris = {k: v for k, v in uris.items() if v}
    marker = cache_root() / f"staged-{hashlib.sha1(json.dumps(uris, sort_keys=True).encode()).hexdigest()[:12]}.json"
    err = None
    if env.local_rank == 0:
        try:
            client = storage.make_client(settings) if any(u.startswith("s3://") for u in uris.values()) else None
            paths = {}
            for field, uri in uris.items():
                dest = _stage_dir(uri)
                if storage.parse_uri(uri).is_s3 and field in SINGLE_FILE_FIELDS:
                    dest = dest.parent
                paths[field] = str(storage.download(uri, dest, settings, client=client, log=print))
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(paths))
        except storage.StorageError as e:
            err = e  # transient or bad input, as storage classified it
        except OSError as e:
            err = RunError(str(e))
    dist.fail_together(err, "stage-in")
    return json.loads(marker.read_text())


CACHE_FORMAT = 3  # bump whenever what encode() writes for the same inputs changes


def cache_inputs(spec, model_fingerprint: str) -> dict:
    """Everything besides the media bytes and the caption that a cached tensor depends on."""
    w, h = size_of(spec.dataset)
    r = RULES[spec.model.type]
    return {"format": CACHE_FORMAT, "model": spec.model.model_dump(mode="json"), "files": model_fingerprint,
            "size": [w, h], "fit": "cover+center-crop", "frames": frames_of(spec.model.type, spec.dataset) if r.video else 1,
            "fps": r.fps if r.video else None}


def cache_key(inputs: dict, caption: str, media: bytes, unit: Optional[bk.Unit] = None) -> str:
    """With a unit: its bucket size, frames, clip start and fit are part of the key."""
    extra = {} if unit is None else {"unit": {"size": list(unit.bucket[:2]), "frames": unit.bucket[2],
                                              "start": unit.start, "fit": "cover+center-crop"}}
    h = hashlib.sha256(json.dumps({**inputs, **extra, "caption": caption}, sort_keys=True).encode())
    h.update(media)
    return h.hexdigest()[:32]


def model_fingerprint(paths: dict[str, str]) -> str:
    """Names and sizes of the staged model files (not the dataset): a model replaced at the same
    URI gives other cache keys."""
    h = hashlib.sha256()
    for field in sorted(f for f in paths if f in PATH_FIELDS):
        root = Path(paths[field])
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            h.update(f"{field}|{p.relative_to(root) if root.is_dir() else p.name}|{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def build_cache(spec, family, comps, items, units, entries, inputs, env) -> dict[tuple[int, int], dict]:
    """Encode every (unit, caption variant) sample, split over ranks (reusing the on-disk cache
    across restarts and runs), then share them so that every rank can train on any bucket."""
    folder = cache_root() / "latents"
    folder.mkdir(parents=True, exist_ok=True)
    r = RULES[spec.model.type]
    mine, hits = {}, 0
    media: dict[int, bytes] = {}
    for n, (u, v) in enumerate(entries):
        if n % env.world != env.rank:
            continue
        unit, it = units[u], items[units[u].item]
        caption = "" if v < 0 else it.variants[v]
        data = media.setdefault(unit.item, masks.media_key(it.image.read_bytes(), it.mask and it.mask.read_bytes()))
        f = folder / f"{cache_key(inputs, caption, data, unit)}.pt"
        if f.is_file():
            mine[(u, v)] = torch.load(f, weights_only=True)
            hits += 1
            continue
        w, h, frames = unit.bucket
        x = load_unit(it.image, w, h, frames, unit.start, fps=r.fps if r.video else None, clip=r.video).unsqueeze(0)
        out = {k: t.detach().cpu() for k, t in family.encode(comps, x, [caption])[0].items()}
        if it.mask is not None:  # [h, w] on the latent grid (masks.py)
            out["mask"] = masks.latent_mask(it.mask, w, h, tuple(out["latents"].shape[-2:]))
        mine[(u, v)] = out
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        torch.save(out, tmp)
        os.replace(tmp, f)
    print(f"[cache] rank {env.rank}: {len(mine)} samples ({hits} from cache)", flush=True)
    return mine


def share_cache(mine: dict, env) -> dict:
    """Every rank's encoded samples on every rank (a batch may hold any sample of its bucket)."""
    if env.world == 1:
        return mine
    out = {}
    for part in dist.all_gather(mine):
        out.update(part)
    return out


def source_specs(spec) -> list:
    """The dataset's sources: dataset.sources, or one made of dataset.uri and dataset.repeats."""
    return list(spec.dataset.sources) if spec.dataset.sources is not None else [None]


def bucket_configs(spec) -> list[bk.BucketConfig]:
    d, r = spec.dataset, RULES[spec.model.type]
    fixed = (d.width, d.height) if d.width is not None else None
    ars = tuple(bk.aspect_ratios(d.enableArBucket, d.minAr, d.maxAr, d.numArBuckets))
    return [bk.BucketConfig(ars=ars, sides=tuple(areas_of(d, s)), frame_buckets=tuple(frame_buckets_of(spec.model.type, d, s)),
                            multiple=r.size_multiple, fixed=fixed, clip_mode=d.videoClipMode) for s in source_specs(spec)]


def probe_items(report: ScanReport, env, spec) -> list[tuple[int, int, int, bool]]:
    """Decode every item once, split over ranks: its size and frame count (at the training rate),
    its mask checked (data.check_item). Bad ones, and items of an extreme aspect ratio for their
    source's buckets (screen_ratios), leave report.items for report.skipped with their reason (the
    same on every rank); every skip so far is logged by source URI (the first ten). Returns the
    probes of the remaining items, in order."""
    r = RULES[spec.model.type]
    items = report.items
    found, bad = [], []
    for i in range(env.rank, len(items), env.world):
        meta, skip = check_item(items[i], r.fps if r.video else None)
        (found if skip is None else bad).append((i, meta if skip is None else skip))
    dist.phase_barrier("decoding the dataset")
    gathered = dist.all_gather((found, bad))
    metas = settle(report, dict(m for part, _ in gathered for m in part), dict(b for _, part in gathered for b in part),
                   bucket_configs(spec))
    for k in report.skipped[:10]:
        log(env, f"[data] skipped {k}")
    if len(report.skipped) > 10:
        log(env, f"[data] ... and {len(report.skipped) - 10} more skipped ({skipped_text(report)})")
    return metas


def settle(report: ScanReport, metas: dict[int, tuple], skips: dict[int, Skip], configs: list[bk.BucketConfig]) -> list:
    """With every item of report.items probed (metas) or skipped (skips), by index: the items of an
    extreme aspect ratio skipped too (screen_ratios), the skipped ones moved from report.items to
    report.skipped. Returns the remaining items' probes, in order. Pure."""
    items = report.items
    skips = {**skips, **screen_ratios(items, metas, configs)}
    report.skipped += [skips[i] for i in sorted(skips)]
    report.items = [it for i, it in enumerate(items) if i not in skips]
    return [metas[i] for i in range(len(items)) if i not in skips]


def screen_ratios(items, metas: dict[int, tuple], configs: list[bk.BucketConfig]) -> dict[int, Skip]:
    """Items whose aspect ratio is more than bk.MAX_AR_BEYOND times beyond every bucket ratio of
    their source, as skips. Pure."""
    out = {}
    for i, (w, h, _, _) in metas.items():
        cfg = configs[items[i].source]
        beyond = bk.ratio_beyond(w, h, cfg)
        if beyond > bk.MAX_AR_BEYOND:
            ars = [cfg.fixed[0] / cfg.fixed[1]] if cfg.fixed else list(cfg.ars)
            out[i] = Skip(items[i].name, "extremeAspectRatio",
                          f"{w}x{h} is {beyond:.1f}x beyond the bucket ratios {min(ars):.3g}..{max(ars):.3g} (width/height); "
                          f"less than {100 / bk.MAX_AR_BEYOND:.0f}% of it would be kept")
    return out


def drop_reason(item, meta, why: str, cfg: bk.BucketConfig, fps) -> str:
    longest = [b for b in cfg.frame_buckets if b > 1]
    if why == "tooShort":
        return (f"{item.image.name}: video is too short: {meta[2]} frames at the model's {fps:g} fps; the shortest "
                f"video frame bucket is {min(longest)} (dataset.frameBuckets)")
    return (f"{item.image.name}: a video, but the only frame bucket is 1 (images): set dataset.frames or "
            f"dataset.frameBuckets to train videos")


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def downsample(values: list[float], n: int) -> list[list[float]]:
    """At most n [step, mean loss] points, each the mean over its window of steps."""
    w = max(1, -(-len(values) // n))
    return [[i + w, sum(values[i:i + w]) / len(values[i:i + w])] for i in range(0, len(values), w)]


def epoch_of(samples_seen: int, epoch_size: int) -> int:
    """The epoch (from 1) that the last of samples_seen samples, counted over all ranks, belongs
    to; an epoch is every item of the dataset times its repeats."""
    return max(1, -(-samples_seen // max(1, epoch_size)))


def agree_on_step(step_loss: torch.Tensor, step: int, env: dist.DistEnv, save: bool = False,
                  stop: bool = False) -> tuple[float, bool, bool]:
    """One collective per step: the step's mean loss over all ranks, whether any rank's loss was
    not finite (then all ranks stop together with the same reason), whether a checkpoint is due
    (rank 0's schedule) and whether any rank was told to stop."""
    local = float(step_loss)
    finite = math.isfinite(local)
    flags = torch.tensor([local if finite else 0.0, 0.0 if finite else 1.0, float(save), float(stop)],
                         dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(flags)  # SUM: gloo has no AVG
    if flags[1] > 0:
        bad = [(r, v) for r, v in enumerate(dist.all_gather(local)) if not math.isfinite(v)]
        where = ", ".join(f"rank {r}: {v}" for r, v in bad)
        raise RunError(f"loss is not finite at step {step} ({where}); lower training.learningRate "
                       f"(or set training.maxGradNorm) and check the data")
    return float(flags[0]) / env.world, bool(flags[2] > 0), bool(flags[3] > 0)


def existing_output(spec, settings, env: dist.DistEnv) -> tuple[bool, Optional[int]]:
    """(a finished run is there, the newest complete checkpoint step), read by rank 0, told to all."""
    found, err = (False, None), None
    if env.is_main:
        try:
            names = storage.list_keys(spec.output.uri, settings)  # one listing answers both
            steps = checkpoint.complete_steps([n.removeprefix("checkpoints/") for n in names])
            found = ("manifest.json" in names, steps[-1] if steps else None)
        except storage.StorageError as e:
            if e.transient:  # training from step 1 would waste the checkpoints: stop, the retried run resumes
                err = storage.StorageError(f"output.uri: looking for checkpoints: {e}", transient=True)
            else:
                log(env, f"[resume] warning: cannot list {spec.output.uri}: {e}")
    dist.fail_together(err, "looking for checkpoints")
    return tuple(dist.broadcast(found))


def resume_plan(on_existing: str, finished: bool, latest: Optional[int]) -> str:
    """'train', 'resume' or 'done'; raises RunError for onExisting: fail. Pure."""
    if on_existing == "overwrite" or (not finished and latest is None):
        return "train"
    if on_existing == "fail":
        what = "a finished run (manifest.json)" if finished else f"checkpoints up to step {latest}"
        raise RunError(f"output.uri already holds {what}; use another output.uri, or set output.onExisting: "
                       f"resume or overwrite")
    return "done" if finished else "resume"


@dataclass
class LoopState:
    """Everything of the training loop that a checkpoint saves for one rank and a resume restores:
    its noise generator and (global, for LoRA dropout) torch RNG, the bucket sampler's position
    (epoch, batch, samples carried over) and the loss history."""
    gen: torch.Generator
    sampler: bk.BucketSampler
    losses: list[float] = field(default_factory=list)

    def to_dict(self, step: int, world: int) -> dict:
        return {"step": step, "world": world, "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "sampler": self.sampler.state_dict(), "losses": list(self.losses)}

    def load(self, d: dict) -> bool:
        """Restore; False when the checkpoint predates the bucket sampler (it then starts a new epoch)."""
        self.gen.set_state(d["gen"])
        torch.set_rng_state(d["torch_rng"])
        if d.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(d["cuda_rng"])  # dropout on a GPU draws from the device's RNG
        self.losses = list(d["losses"])
        if "sampler" not in d:
            return False
        self.sampler.load_state_dict(d["sampler"])
        return True


def _stack(samples: list[dict], device) -> dict[str, torch.Tensor]:
    samples = masks.fill_masks(samples)  # a batch mixing masked and unmasked items: all ones for the latter
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}


@dataclass
class Trainer:
    """What the step loop works with (built by _run)."""
    spec: LoRATrainingJobSpec
    family: object
    comps: object
    adapters: adapters.Adapters
    opt: torch.optim.Optimizer
    sched: object
    cached: dict
    env: dist.DistEnv
    state: LoopState
    modules: torch.nn.Module
    local_ckpt: Path
    settings: storage.S3Settings
    publish: object
    epoch_size: int
    metrics: object = field(default_factory=metrics.Off)
    sampler: Optional[samples.Sampler] = None   # spec.samples (None: off)


def grad_norm(params: list[torch.nn.Parameter], max_norm: Optional[float]) -> Optional[torch.Tensor]:
    """Clip to max_norm when set; the total norm before clipping either way (a collective for
    sharded gradients: every rank calls it)."""
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads)
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    return full() if full is not None else norm


def _train_steps(tr: Trainer, start: int, meter: Meter, prog: Progress) -> None:
    """Steps start..training.steps; checkpoints when due or when told to stop (then Stopped)."""
    t, env, state = tr.spec.training, tr.env, tr.state
    samples_per_step = t.microBatchSize * t.gradientAccumulationSteps * env.world
    schedule = checkpoint.Schedule(t.checkpointEverySteps, t.checkpointEveryMinutes)
    patch = RULES[tr.spec.model.type].token_patch
    # the model's own weights, once: not the LoRA's, nor fp8 scales or stored transposed copies
    n_params = sum(p.numel() for n, p in tr.comps.denoiser.named_parameters()
                   if ".lora_" not in n and not n.endswith((".weight8_t", ".scale")))
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    stop_request = checkpoint.StopRequest().install()
    try:
        if tr.sampler is not None and start == 1:
            tr.sampler.maybe(0, tr, prog)  # the base model, for comparison
        for step in range(start, t.steps + 1):
            step_loss = torch.zeros((), device=env.device)
            data_wait, tokens = 0.0, 0
            for micro in range(t.gradientAccumulationSteps):
                t_data = time.perf_counter()
                batch = _stack([tr.cached[s] for s in state.sampler.next_batch()], env.device)
                data_wait += time.perf_counter() - t_data
                tokens += len(batch["latents"]) * throughput.tokens_of(tuple(batch["latents"].shape[1:]), patch)
                with tr.adapters.compute():
                    loss = tr.family.loss(tr.comps, batch, tr.spec.model, t, state.gen) / t.gradientAccumulationSteps
                tr.adapters.sync.before_backward(last=micro == t.gradientAccumulationSteps - 1)
                loss.backward()  # even when not finite: every rank must take part in the gradient collectives
                step_loss += loss.detach().float()
            tr.adapters.sync.after_backward()
            try:
                mean, save, stop = agree_on_step(step_loss, step, env, save=env.is_main and schedule.due(step),
                                                 stop=bool(stop_request.signum))
            except RunError:
                tr.metrics.loss_not_finite()  # the KubeloraLossNaN alert
                raise
            state.losses.append(mean)
            norm = grad_norm(tr.adapters.params, t.maxGradNorm) if t.maxGradNorm or tr.metrics.enabled else None
            lr_used = tr.sched.get_last_lr()[0]
            tr.opt.step()
            tr.sched.step()
            tr.opt.zero_grad(set_to_none=True)
            sps, eta = meter.update(step, now=time.perf_counter() - (tr.sampler.seconds if tr.sampler else 0.0))
            epoch = epoch_of(step * samples_per_step, tr.epoch_size)
            tr.metrics.step(step, epoch, mean, lr_used, float(norm) if norm is not None and env.is_main else None,
                            samples_per_step, sps, eta, data_wait)
            tr.metrics.gpu_memory(env.device)
            # this rank's tokens per sample stand for every rank's (ranks draw from the same buckets)
            tps, mfu = throughput.rates(sps, tokens / (t.microBatchSize * t.gradientAccumulationSteps), n_params,
                                        tr.spec.adapter.type == "full", device_name, env.world)
            tr.metrics.throughput(tps, mfu)
            if step % t.logEvery == 0 or step == t.steps:
                prog.step, prog.epoch, prog.loss = step, epoch, mean
                prog.samplesPerSecond, prog.eta = sps, format_eta(eta)
                prog.tokensPerSecond, prog.mfu = tps, mfu
                log(env, line(prog, lr_used))
                tr.publish(prog)
            if tr.sampler is not None:
                tr.sampler.maybe(step, tr, prog)
            if save or stop:
                checkpoint.save(step, tr.modules, tr.opt, state.to_dict(step, env.world), tr.local_ckpt,
                                tr.spec.output.uri, tr.settings, t.checkpointKeep, env)
                schedule.written()
                tr.metrics.checkpoint(step)
            if stop:
                raise checkpoint.Stopped(stop_request.signum or 15, step)
    finally:
        stop_request.uninstall()


def run(spec: LoRATrainingJobSpec, job_name: str) -> int:
    """Train; the exit code. A failure is reported (printed, and recorded for the launcher) before
    anything slow happens on the way out (closing the process group, the metrics' last scrape),
    since torchrun stops the other ranks as soon as one exits."""
    env = dist.init()
    m = metrics.start(env.rank, env.local_rank, job_name, log=lambda msg: print(msg, flush=True))
    try:
        return _run(spec, job_name, env, m)
    except checkpoint.Stopped as e:
        m.phase("Stopped")
        return exits.fail(e.code, str(e))
    except (RunError, DatasetError, storage.StorageError, lora.AdapterError, ModelError, FileNotFoundError) as e:
        m.phase("Failed")
        return exits.fail(exits.code_of(e), str(e))  # bad input; a transient storage fault is retried
    except dist.PeerFailed as e:  # the failing rank reports (and classifies) its own error
        m.phase("Failed")
        return exits.fail(e.code, str(e), peer=True)
    except BaseException:
        m.phase("Failed")
        raise
    finally:
        dist.close()
        m.finish()  # serves the final state until it has been scraped ($KUBELORA_METRICS_LINGER_SECONDS)


def _run(spec: LoRATrainingJobSpec, job_name: str, env: dist.DistEnv, m=None) -> int:
    m = m or metrics.Off()
    t_start = time.time()
    settings = storage.S3Settings.from_spec(spec.storage)
    family = get_family(spec.model.type)
    log(env, f"[kubelora {__version__}] job {job_name}: {spec.model.type} LoRA r={spec.adapter.rank} "
             f"on {env.world} process(es), device {env.device.type}")

    publish = Publisher(spec.output.uri, settings) if env.is_main else (lambda p, force=False: None)
    t = spec.training
    publish(Progress(phase="Initializing", totalSteps=t.steps))
    m.start(spec.model.type, env.world, t.steps)

    # ---- pre-flight: an output that cannot be written is found now, not after the last step
    err = None
    if env.is_main:
        try:
            storage.check_writable(spec.output.uri, settings)
        except storage.StorageError as e:
            err = storage.StorageError(f"output.uri: {e}", transient=e.transient)
    dist.fail_together(err, "the output check")

    # ---- an earlier run of this manifest: resume from its newest checkpoint, or stop if it finished
    finished, latest = existing_output(spec, settings, env)
    plan = resume_plan(spec.output.onExisting, finished, latest)
    if plan == "done":
        log(env, f"[done] {spec.output.uri} already holds a finished run (manifest.json); nothing to train "
                 f"(output.onExisting: overwrite trains again)")
        m.phase("Succeeded")
        return 0

    # ---- stage-in
    log(env, "[phase] stage-in")
    m.phase("StagingIn")
    paths = stage_in(spec, env, settings)

    # ---- dataset (checked before any model is loaded)
    r = RULES[spec.model.type]
    report = ScanReport()
    for i, src in enumerate(source_specs(spec)):
        mask_root = paths.get(f"dataset.{i}.mask")
        report.merge(scan(Path(paths[f"dataset.{i}"]), video=r.video, opts=options_of(spec.dataset, src), source=i,
                          seed=t.seed, uri=spec.dataset.uris[i], mask_root=Path(mask_root) if mask_root else None))
    metas = probe_items(report, env, spec)
    configs = bucket_configs(spec)
    assignment = bk.assign(metas, configs, [it.source for it in report.items])
    for i, why in assignment.dropped[:10]:
        log(env, "[data] skipped " + drop_reason(report.items[i], metas[i], why, configs[report.items[i].source], r.fps or 0))
    used = {u.item for u in assignment.units}
    bucket_stats = bk.summary(assignment, len(report.items), [str(it.image.name) for it in report.items])
    n_dropped = len(report.items) - len(used)
    stats = {**report.summary(), "usable": len(used)}
    log(env, f"[data] {stats['usable']} usable items; skipped: {stats['missingCaption'] - stats['emptyCaptionUsed']} "
             f"without caption, {stats['unreadable']} unreadable"
             + (f" ({skipped_text(report)})" if report.skipped else "")
             + (f", {n_dropped} without a bucket" if n_dropped else "")
             + f"; {stats['emptyCaptionUsed']} trained with an empty caption")
    if report.masked_sources:
        log(env, f"[data] {stats['masked']} items with a loss mask, {stats['unmasked']} without"
                 + (f" (trained unmasked; warning: no mask for {', '.join(report.unmasked[:5])}"
                    + (" ..." if len(report.unmasked) > 5 else "") + ")" if report.unmasked else ""))
    if report.missing_caption and report.beside:
        from .data import caption_hint
        log(env, "[data] warning:" + caption_hint(report))
    for msg in bk.format_summary(bucket_stats):
        log(env, msg)
    m.dataset(stats["usable"], {"missing_caption": stats["missingCaption"] - stats["emptyCaptionUsed"],
                                **{metrics.snake(k): n for k, n in report.by_reason().items()},
                                **({"no_bucket": n_dropped} if n_dropped else {})})
    if not used:
        report.items = []
    check_usable(report, ", ".join(spec.dataset.uris),
                 dropped=f", without a frame bucket: {n_dropped}" if n_dropped else "")
    stats["buckets"] = bucket_stats

    # ---- model and cache
    log(env, "[phase] cache")
    m.phase("Caching")
    quiet_progress_bars()
    # a failure on one rank (a bad file, a missing weight) stops every rank with its reason
    comps = dist.agree(family.load, spec.model, paths, env.device)
    units = assignment.units
    src_repeats = [s.repeats if s is not None else spec.dataset.repeats for s in source_specs(spec)]
    space = bk.SampleSpace(buckets=tuple(u.bucket for u in units),
                           repeats=tuple(src_repeats[u.source] for u in units),
                           variants=tuple(len(report.items[u.item].variants) for u in units),
                           dropout=tuple(report.items[u.item].dropout for u in units))
    entries = [(n, v) for n, u in enumerate(units) for v in range(len(report.items[u.item].variants))]
    entries += [(n, -1) for n, u in enumerate(units) if report.items[u.item].dropout > 0]
    inputs = cache_inputs(spec, model_fingerprint(paths))
    mine = dist.agree(build_cache, spec, family, comps, report.items, units, entries, inputs, env)
    cached = share_cache(mine, env)
    # spec.samples: prompt embeddings now, while the encoders are loaded (None when off)
    sampler = dist.agree(samples.setup, spec, family, comps, job_name, settings, stats, cache_root() / "outputs" / job_name)
    comps.encoders.clear()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- adapters + parallelism
    ad = dist.agree(adapters.attach, comps, family, spec, env)
    opt = torch.optim.AdamW(ad.groups, lr=t.learningRate, betas=t.betas, eps=t.epsilon, weight_decay=t.weightDecay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, t.warmupSteps, t.steps, t.lrScheduler))
    log(env, f"[model] full fine-tune of {next(iter(comps.trainable))}: {ad.n_trainable:,} trainable parameters"
        if spec.adapter.type == "full" else
        f"[model] LoRA on {', '.join(ad.configs)}: {ad.n_trainable:,} trainable parameters")

    # ---- train (from step 1, or from the newest checkpoint)
    state = LoopState(gen=torch.Generator(device=env.device).manual_seed(t.seed * 1000 + env.rank),
                      sampler=bk.BucketSampler(space, t.seed, t.microBatchSize, env.world, env.rank))
    tr = Trainer(spec, family, comps, ad, opt, sched, cached, env, state,
                 modules=torch.nn.ModuleDict(comps.trainable), local_ckpt=cache_root() / "checkpoints" / job_name,
                 settings=settings, publish=publish, epoch_size=sum(space.repeats), metrics=m, sampler=sampler)
    start = 1
    if plan == "resume":
        resumed = latest
        loop = checkpoint.restore(resumed, tr.modules, opt, tr.local_ckpt, spec.output.uri, settings, env)
        sched.last_epoch = resumed
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        exact = loop is not None and state.load(loop)
        start = resumed + 1
        m.resumed(resumed)
        log(env, f"[resume] from the checkpoint of step {resumed}" + ("" if exact else
                 " (another number of ranks, or an older checkpoint: the data order starts again from the first "
                 "epoch; the model, optimizer and schedule are restored)"))
    log(env, "[phase] train")
    m.phase("Training")
    samples_per_step = t.microBatchSize * t.gradientAccumulationSteps * env.world
    meter = Meter(t.steps, samples_per_step)
    prog = Progress(phase="Training", totalSteps=t.steps, resumedFrom=start - 1 if start > 1 else None)
    _train_steps(tr, start, meter, prog)
    losses = state.losses
    train_seconds = time.time() - t_start


    # ---- export (gather is a collective; the writing and upload happen on rank 0)
    log(env, "[phase] export")
    prog.phase = "Exporting"
    m.phase("Exporting")
    publish(prog)
    full = spec.adapter.type == "full"
    gathered = adapters.gather_full(comps, getattr(torch, spec.model.dtype), keep=env.is_main) if full else adapters.gather(comps)
    err, result = None, None
    if env.is_main:
        try:
            # no losses: resumed at the last step with another number of ranks (no loop state)
            summary = {"steps": t.steps, "firstLoss": losses[0] if losses else None,
                       "finalLoss": losses[-1] if losses else None, "minLoss": min(losses) if losses else None,
                       "samplesPerStep": samples_per_step, "worldSize": env.world,
                       "samplesPerSecond": prog.samplesPerSecond, "wallSeconds": round(train_seconds, 2),
                       "lossHistory": downsample(losses, 200)}
            sampling = sampler.seconds if sampler else 0.0
            summary.update(samplingSeconds=round(sampling, 2), trainingSeconds=round(train_seconds - sampling, 2))
            out_dir = cache_root() / "outputs" / job_name
            report = lambda arts: samples.final_report(spec, job_name, settings, sampler, losses, stats, arts,  # noqa: E731
                                                       out_dir)
            result = (export_full.export_and_upload(spec, job_name, family, comps, gathered, summary, stats, settings,
                                                    out_dir, extra=report) if full else
                      export.export_and_upload(spec, job_name, family, ad.configs, gathered, summary, stats, settings,
                                               out_dir, extra=report))
        except storage.StorageError as e:
            err = e  # an artifact or manifest.json not uploaded: transient or bad input, as storage classified it
        except (OSError, ValueError) as e:
            err = RunError(str(e))
    dist.fail_together(err, "export")
    if env.is_main:
        prog.phase = "Succeeded"
        m.phase("Succeeded")
        publish(prog, force=True)
        final = f"  final loss {losses[-1]:.4f}" if losses else ""
        log(env, f"[done] {result['uri']}  sha256 {result['sha256'][:16]}…{final}")
    return 0


def main_from_cli(spec_path: str) -> int:
    from .spec import load_spec, manifest_name
    spec = load_spec(spec_path)
    name = os.environ.get("KUBELORA_JOB_NAME") or manifest_name(spec_path)
    return run(spec, name)