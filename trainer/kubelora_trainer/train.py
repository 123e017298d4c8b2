"""The training run every pod executes: stage-in -> cache -> train -> export -> upload.

    torchrun --nproc-per-node 2 -m kubelora_trainer run --spec examples/demo-flux.yaml
    kubelora run examples/demo-flux.yaml --nproc 2         # the same, with the local launcher

Every rank runs this file top to bottom. Collectives happen at fixed points, and any failure is
agreed on by all ranks (dist.fail_together, dist.agree) so that one bad rank makes the whole run
fail with its message and exit code rather than leaving the others waiting.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import __version__, adapters, cache, checkpoint, disk, dist, exits, export, export_full, lora, metrics, samples, storage
from . import attention, cache_phase, cache_remote, evaluation, lora_init, media_later, throughput
from . import buckets as bk
from .sample_plan import due as sample_due
from .captions import options_of, recursive_of
from .data import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, DatasetError, ScanReport, scan
from .disk import cache_root
from .dataset_phase import largest_batch, probe_items, source_repeats, source_specs
from .families import all_source_specs, eval_source_specs
from .dist import log
from .report import downsample
from .families import PATH_FIELDS, RULES
from .models import get_family
from .models.base import ModelError
from .progress import RUN_KEY, Meter, Progress, Publisher, flush_all, format_eta, line, run_id
from .spec import LoRATrainingJobSpec

SINGLE_FILE_FIELDS = ("transformerPath", "checkpointPath", "vaePath")  # staged beside their siblings


class RunError(RuntimeError):
    pass


def _stage_dir(uri: str) -> Path:
    loc = storage.parse_uri(uri)
    return cache_root() / "s3" / loc.bucket / loc.key.strip("/") if loc.is_s3 else Path(loc.key)


def source_key(spec: LoRATrainingJobSpec, i: int) -> str:
    """The stage key of source i of all_source_specs: "dataset.<i>" for a training source,
    "evaluation.<j>" for evaluation.sources[j]."""
    n = len(source_specs(spec))
    return f"dataset.{i}" if i < n else f"evaluation.{i - n}"


def stage_uris(spec: LoRATrainingJobSpec, resume: bool = False) -> dict[str, str]:
    """{stage key: URI} of everything stage-in fetches: model path fields by name, dataset sources
    as "dataset.<i>" and their masks as "dataset.<i>.mask", evaluation.sources as "evaluation.<j>"
    and "evaluation.<j>.mask", adapter.initFrom as itself (not on a resume, which does not read it:
    a file removed since the start must not stop a run that can resume)."""
    evals = eval_source_specs(spec)
    uris = {**{f: getattr(spec.model, f) for f in PATH_FIELDS},
            **{f"dataset.{i}": u for i, u in enumerate(spec.dataset.uris)},
            **{f"dataset.{i}.mask": u for i, u in enumerate(spec.dataset.mask_uris)},
            **{f"evaluation.{j}": s.uri for j, s in enumerate(evals)},
            **{f"evaluation.{j}.mask": s.maskUri for j, s in enumerate(evals)},
            lora_init.FIELD: None if resume else spec.adapter.initFrom}
    return {k: v for k, v in uris.items() if v}


def spec_field(spec: LoRATrainingJobSpec, key: str) -> str:
    """The spec field a stage key comes from, for messages: "model.diffusersPath", "dataset.uri",
    "dataset.sources[1].maskUri", "evaluation.sources[0].uri"."""
    if key == lora_init.FIELD:
        return key
    if not key.startswith(("dataset.", "evaluation.")):
        return f"model.{key}"
    i, mask = int(key.split(".")[1]), key.endswith(".mask")
    name = "maskUri" if mask else "uri"
    if key.startswith("evaluation."):
        return f"evaluation.sources[{i}].{name}"
    return f"dataset.{name}" if spec.dataset.uri is not None else f"dataset.sources[{i}].{name}"


def unsafe_warning(field: str, uris: list[str]) -> str:
    """The stage-in log line for a data source's objects whose keys cannot be files under its
    staged folder (skipped, like any bad dataset file). Pure."""
    shown = ", ".join(uris[:5]) + (f" and {len(uris) - 5} more" if len(uris) > 5 else "")
    return (f"[stage-in] warning: {field}: skipped {len(uris)} object(s) whose keys cannot be files under the staged "
            f"folder ('..', '.', an empty segment, a doubled '/' or {storage.INDEX_NAME}): {shown}")


def stage_in(spec: LoRATrainingJobSpec, env: dist.DistEnv, settings: storage.S3Settings,
             resume: bool = False, remote: Optional[cache_remote.Remote] = None
             ) -> tuple[dict[str, str], dict[str, list[str]], dict[str, int], media_later.Later]:
    """Node-local rank 0 downloads model parts and the dataset but its media, which it lists for
    the ranks that read them (media_later); the other ranks wait and read the resolved paths it
    wrote. Returns ({stage key: local path}, {stage key: URIs of the data objects skipped as
    unsafeKey}, {stage key: media files in subfolders of a source read without them
    (dataset.recursive false), not fetched}, the media listed and left for later, with the digests
    dataset.cacheUri's memo knows (remote)). A failure names the spec field whose URI failed
    ("model.diffusersPath: reading ..."); a model object whose key cannot be a file under its
    folder is such a failure, a data object's is skipped and counted (scan_sources)."""
    uris = stage_uris(spec, resume)
    # one per node (a cache claim may be shared by nodes and jobs), written whole
    marker = cache_root() / (f"staged-{hashlib.sha1(json.dumps(uris, sort_keys=True).encode()).hexdigest()[:12]}-"
                             f"{socket.gethostname()}.json")
    err = None
    if env.local_rank == 0:
        try:
            client = storage.make_client(settings) if any(u.startswith("s3://") for u in uris.values()) else None
            paths, unsafe, below, later, field = {}, {}, {}, {}, None
            shallow = {source_key(spec, i) for i, src in enumerate(all_source_specs(spec))
                       if not recursive_of(spec.dataset, src)}
            exts = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if RULES[spec.model.type].video else ())

            def is_media(rel: str) -> bool:  # a video in an image family too: counted as ignored, never read
                return Path(rel).suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS

            def media_of(dest: Path) -> Callable[[str], bool]:  # not the files of a mask folder inside dest,
                inner = [d.relative_to(dest).as_posix() + "/" for d in map(_stage_dir, uris.values())  # which its
                         if d != dest and d.is_relative_to(dest)]                             # own download fetches
                return lambda rel: is_media(rel) and not rel.startswith(tuple(inner))
            left = [disk.cache_limit_left()]

            def room(need: int, dest: Path) -> None:  # each download's bytes, before it fetches them
                disk.check_room(need, dest, left[0], "stage-in")
                left[0] = None if left[0] is None else left[0] - need
            for key, uri in uris.items():
                field = spec_field(spec, key)
                loc = storage.parse_uri(uri)
                dest = _stage_dir(uri)
                if loc.is_s3 and (key in SINGLE_FILE_FIELDS or key == lora_init.FIELD and uri.endswith(".safetensors")):
                    dest = dest.parent
                skipped = [] if key.startswith(("dataset.", "evaluation.")) else None
                deeper = [] if key in shallow and loc.is_s3 else None
                deferred = [] if skipped is not None and not key.endswith(".mask") else None  # a source's media
                listing: list[dict] = []
                is_item_media = media_of(dest)
                paths[key] = str(storage.download(uri, dest, settings, client=client, log=print, unsafe=skipped,
                                                  below=deeper, progress=dist.heartbeat, room=room,
                                                  later=is_item_media, deferred=deferred, listing=listing))
                if deferred is not None and loc.is_s3:
                    media = [o for o in listing if is_item_media(o["rel"])]
                    later[key] = media_later.Later.record(uri, media, deferred, pull_memo(remote, uri, media),
                                                          [o["rel"] for o in listing if not is_item_media(o["rel"])])
                elif skipped is not None and loc.is_s3:  # a mask folder: what its listing holds (Later.listed)
                    later[key] = media_later.Later.record(uri, [], [], {}, [o["rel"] for o in listing])
                if deeper is not None:  # counted as the scan counts a local source's subfolders
                    below[key] = sum(1 for rel in deeper if Path(rel).suffix.lower() in exts)
                if skipped:
                    unsafe[key] = [f"s3://{loc.bucket}/{k}" for k in skipped]
                    print(unsafe_warning(field, unsafe[key]), flush=True)
            field = None
            marker.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes_atomic(marker, json.dumps({"paths": paths, "unsafe": unsafe, "below": below,
                                                         "later": later}).encode())
        except storage.StorageError as e:
            # transient or bad input, as storage classified it (a full disk: disk.NoRoom, kept as one)
            err = type(e)(f"{field}: {e}", transient=e.transient) if field else e
        except OSError as e:
            err = disk.no_room(e, "stage-in") or RunError(f"{field}: {e}" if field else str(e))
    dist.fail_together(err, "stage-in")
    staged = json.loads(marker.read_text())
    return (staged["paths"], staged["unsafe"], staged.get("below", {}),
            media_later.Later.from_staged(staged.get("later", {}), staged["paths"], settings, env.rank,
                                          int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def pull_memo(remote: Optional[cache_remote.Remote], uri: str, media: list[dict]) -> dict[str, list]:
    """The digest memo of a source's media that dataset.cacheUri holds ({} without one; a failed
    pull is a warning: the media are fetched and hashed)."""
    name = media_later.memo_name(uri)
    if remote is None or not media or name not in remote.listing:
        return {}
    moved = remote.pull([name], cache_root())
    if moved.failed:
        print(f"[cache] warning: the media digests of {uri} were not pulled from {cache_remote.FIELD} ({moved.error}); "
              "its media are fetched and hashed", flush=True)
        return {}
    memo = media_later.read_memo(cache_root() / name)
    known = sum(1 for o in media if (m := memo.get(o["rel"])) and [m[0], m[1]] == [o["ETag"], o["Size"]])
    print(f"[cache] {uri}: the digests of {known} of {len(media)} media files are known from {cache_remote.FIELD}",
          flush=True)
    return memo


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


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
    total, bad_ranks, saves, stops = flags.tolist()  # one read back from the device, not four
    if bad_ranks > 0:
        bad = [(r, v) for r, v in enumerate(dist.all_gather(local)) if not math.isfinite(v)]
        where = ", ".join(f"rank {r}: {v}" for r, v in bad)
        raise RunError(f"loss is not finite at step {step} ({where}); lower training.learningRate "
                       f"(or set training.maxGradNorm) and check the data{attention.nan_hint(env.device.type)}")
    return total / env.world, saves > 0, stops > 0


def stop_agreed(stop_request: checkpoint.StopRequest, env: dist.DistEnv) -> bool:
    """Whether any rank has been told to stop (a collective: every rank calls it at the same point)."""
    if env.world == 1:
        return bool(stop_request.signum)
    flag = torch.tensor([float(bool(stop_request.signum))], dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(flag)
    return flag.item() > 0


def existing_output(spec, settings, env: dist.DistEnv) -> tuple[bool, list[int], bool, Optional[str]]:
    """(a finished training run's manifest.json is there, the complete checkpoints' steps, oldest
    first, whether this spec trains that finished run further: extends, and whether what is there
    is this run's own: 'finished', 'checkpoint' or None, see own_output), read by rank 0, told to
    all."""
    found, err = (False, [], False, None), None
    if env.is_main:
        try:
            names = storage.list_keys(spec.output.uri, settings)  # one listing answers both
            steps = checkpoint.complete_steps([n.removeprefix("checkpoints/") for n in names])
            manifest = read_manifest(spec, settings) if "manifest.json" in names else None
            finished = manifest is not None and not manifest.get("cacheOnly")
            extending = finished and extends(manifest, steps, spec)
            own = own_output(spec, settings, manifest if finished else None, steps)
            if finished and not extending and spec.output.onExisting == "resume" and not spec.dataset.cacheOnly:
                recorded = manifest.get("spec")
                why = checkpoint.finished_refusal(checkpoint.fingerprint_of(recorded) if isinstance(recorded, dict)
                                                  else None, checkpoint.fingerprint(spec), spec.output.uri)
                err = RunError(why) if why else None   # told to every rank by fail_together
            found = (finished, steps, extending, own)
        except storage.StorageError as e:
            if e.transient:  # training from step 1 would waste the checkpoints: stop, the retried run resumes
                err = storage.StorageError(f"output.uri: looking for checkpoints: {e}", transient=True)
            else:
                log(env, f"[resume] warning: cannot list {spec.output.uri}: {e}")
    dist.fail_together(err, "looking for checkpoints")
    return tuple(dist.broadcast(found))


def own_output(spec, settings, manifest: Optional[dict], steps: list[int]) -> Optional[str]:
    """'finished' when the finished run's manifest.json, 'checkpoint' when the newest checkpoint,
    was written by an earlier attempt of this run (checkpoint.run_id), else None."""
    run = run_id()
    if run is None:
        return None
    if manifest is not None and manifest.get(RUN_KEY) == run:
        return "finished"
    if steps:
        try:
            recorded = checkpoint.read_fingerprint(spec.output.uri, steps[-1], settings) or {}
        except storage.StorageError as e:
            if e.transient:
                raise  # the store failed: existing_output stops the run, and the retry looks again
            return None  # (a prune racing the read, no read right): not known to be ours; check_fingerprint says why
        except (OSError, ValueError):  # unreadable: not known to be ours (check_fingerprint says why)
            return None
        if isinstance(recorded, dict) and recorded.get(RUN_KEY) == run:
            return "checkpoint"
    return None


def read_manifest(spec, settings, client=None) -> dict:
    """output.uri's manifest.json ({} when it cannot be parsed)."""
    import tempfile
    loc = storage.parse_uri(spec.output.uri).child("manifest.json")
    with tempfile.TemporaryDirectory() as d:
        path = storage.download(str(loc), Path(d), settings, client=client, log=lambda msg: None)
        try:
            doc = json.loads(Path(path).read_text())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}


def extends(manifest: dict, steps: list[int], spec) -> bool:
    """A finished LoRA run that this spec trains further: more training.steps than it had, and its
    last step's checkpoint is there (a LoRA run always writes it; a full fine-tune does not, so it
    cannot go on). Then the run resumes from that step instead of stopping as done; the
    checkpoint's fingerprint decides whether the new steps may follow it. Pure."""
    done = (manifest.get("metrics") or {}).get("steps")
    return (spec.adapter.type != "full" and isinstance(done, int) and done < spec.training.steps
            and bool(steps) and steps[-1] >= done)  # >: the extension itself checkpointed, then stopped


def finish_cache_only(spec, job_name: str, env, m, publish, settings, stats: dict, cache_stats: dict) -> int:
    """dataset.cacheOnly: the cache is complete on every node; write manifest.json (cacheOnly:
    true, what was encoded, the dataset and buckets; no artifacts) and stop successfully."""
    err = None
    if env.is_main:
        try:
            out_dir = cache_root() / "outputs" / job_name
            out_dir.mkdir(parents=True, exist_ok=True)
            export.publish_manifest(spec, job_name, {}, [], stats, {}, settings, None, out_dir,
                                    extra=lambda arts: {"cacheOnly": True, "cache": cache_stats})
        except storage.StorageError as e:
            err = e
        except OSError as e:
            err = RunError(str(e))
    dist.fail_together(err, "writing manifest.json")
    m.phase("Succeeded")
    if env.is_main:
        publish(Progress(phase="Succeeded", totalSteps=spec.training.steps), force=True, wait=True)
        log(env, f"[done] dataset.cacheOnly: the cache of {cache_stats['entries']} entries is complete "
                 f"({cache_stats['encoded']} encoded); no training (manifest.json says cacheOnly: true)"
                 + ("; evaluation.sources are cached too, and no evaluation runs" if spec.evaluation else ""))
    return 0


def resume_plan(on_existing: str, finished: bool, latest: Optional[int], own: Optional[str] = None) -> str:
    """'train', 'resume' or 'done'; raises RunError for onExisting: fail. own (own_output): what is
    there is this run's, left by an earlier attempt (a preemption, a crash): resumed or kept
    whatever onExisting says, which is about another run's output. Pure."""
    if own == "finished" and finished:
        return "done"
    if own == "checkpoint" and latest is not None:
        return "resume"
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
    (epoch, batch, samples carried over), the loss history and the evaluations' records
    (evaluation.py)."""
    gen: torch.Generator
    sampler: bk.BucketSampler
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    sample_pending: Optional[int] = None   # a sample step a stop left for the resume (samples_deferred)
    # the samples written before this attempt (samples.Sampler.records, from the checkpoint): a resume
    # lists what was made, with the settings it was made with, not what the spec now would make
    # (None: a checkpoint from before they were kept)
    samples: Optional[list[dict]] = None

    def to_dict(self, step: int, world: int, samples: Optional[list[dict]] = None) -> dict:
        return {"step": step, "world": world, "micro": self.sampler.micro, "gen": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.gen.device.type == "cuda" else None,
                "sampler": self.sampler.state_dict(), "losses": list(self.losses), "evals": list(self.evals),
                "sample_pending": self.sample_pending,
                "samples": list(samples if samples is not None else self.samples or [])}

    def load(self, d: dict) -> bool:
        """Restore; False when the checkpoint predates the bucket sampler or had another number of
        ranks or micro-batch (checkpoint.loop_for_world: no generator or sampler position then): the
        data order goes on from the epoch after the one under way, the noise generator and dropout RNG
        are seeded afresh from their seeds and the step (not replayed from step 1's)."""
        self.evals = list(d.get("evals") or [])
        self.sample_pending = d.get("sample_pending")
        self.samples = list(d["samples"]) if isinstance(d.get("samples"), list) else None
        if "gen" not in d:
            self.losses = list(d["losses"])
            if "epoch" in d:
                self.sampler.load_state_dict({"epoch": d["epoch"], "pos": 0, "carry_in": []})
            if d.get("step"):
                self.gen.manual_seed(reseeded(self.gen.initial_seed(), d["step"]))
                torch.manual_seed(reseeded(torch.initial_seed(), d["step"]))
            return False
        if d["gen"].numel() == self.gen.get_state().numel():
            self.gen.set_state(d["gen"])
        else:  # saved on another kind of device (a GPU run resumed on a CPU, or back): another stream
            self.gen.manual_seed(reseeded(self.gen.initial_seed(), d.get("step") or 0))
        torch.set_rng_state(d["torch_rng"])
        if d.get("cuda_rng") is not None and self.gen.device.type == "cuda":
            torch.cuda.set_rng_state(d["cuda_rng"])  # dropout on a GPU draws from the device's RNG
        self.losses = list(d["losses"])
        if "sampler" not in d:
            return False
        if not self.sampler.fits(d["sampler"]):  # the data changed under the same URI: its position (unit
            old = d["sampler"]                   # indices) is another plan's; on from the next epoch
            self.sampler.load_state_dict({"epoch": old["epoch"] + (1 if old["pos"] or old["carry_in"] else 0),
                                          "pos": 0, "carry_in": []})
            return False
        self.sampler.load_state_dict(d["sampler"])
        return True


def reseeded(seed: int, step: int) -> int:
    """A generator's seed for going on after `step` where its state was not kept: another stream
    for every step. Pure."""
    return (seed + 1_000_003 * step) % 2**63


@dataclass
class Trainer:
    """What the step loop works with (built by _run)."""
    spec: LoRATrainingJobSpec
    family: object
    comps: object
    adapters: adapters.Adapters
    opt: torch.optim.Optimizer
    sched: object
    loader: cache.Loader
    env: dist.DistEnv
    state: LoopState
    modules: torch.nn.Module
    local_ckpt: Path
    settings: storage.S3Settings
    publish: object
    epoch_size: int
    metrics: object = field(default_factory=metrics.Off)
    sampling: Optional[samples.Sampler] = None   # spec.samples (None: off); the data order is state.sampler
    evaluation: Optional[evaluation.Evaluator] = None   # spec.evaluation (None: off)
    data_wait: float = 0.0                      # seconds this rank's steps waited for the cache loader
    attempt: Optional[str] = None               # rank 0: this attempt's claim on the run's checkpoints


def fused(opt: torch.optim.AdamW) -> None:
    """Back to the fused kernel after a restore: torch takes the saved groups' options, and a
    checkpoint written by the multi-tensor optimizer would switch it back (then, its step counters
    being on the GPU, reading each one on the host twice per step). The counters go where the
    fused kernel wants them: float32 beside their parameter."""
    for g in opt.param_groups:
        g["fused"], g["foreach"] = True, None
        for p in g["params"]:
            st = opt.state.get(p)
            if st and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=getattr(p, "device", None), dtype=torch.float32)


def optimizer(groups: list[dict], t) -> torch.optim.AdamW:
    """AdamW with its fused kernel (one launch per step for all tensors of a device, instead of
    the multi-tensor default's dozen-odd per group: less CPU time between a step's backward and the
    next forward). The same update up to rounding; supported for CUDA and CPU tensors, DTensors
    (FSDP2) included."""
    return torch.optim.AdamW(groups, lr=t.learningRate, betas=t.betas, eps=t.epsilon, weight_decay=t.weightDecay,
                             fused=True)


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


def first_progress(steps: int, start: int, samples_per_step: int, epoch_size: int, losses: list[float]) -> Progress:
    """progress.json's training phase before its first logged step: on a resume, where the
    checkpoint left off (for good on one resumed after its last step, to export again). Pure."""
    if start == 1:
        return Progress(phase="Training", totalSteps=steps)
    return Progress(phase="Training", totalSteps=steps, resumedFrom=start - 1, step=start - 1,
                    epoch=epoch_of((start - 1) * samples_per_step, epoch_size), loss=losses[-1] if losses else None)


def _train_steps(tr: Trainer, start: int, meter: Meter, prog: Progress) -> None:
    """Steps start..training.steps; checkpoints when due or when told to stop (then Stopped)."""
    t, env, state = tr.spec.training, tr.env, tr.state
    samples_per_step = meter.per_step
    schedule = checkpoint.Schedule(t.checkpointEverySteps, t.checkpointEveryMinutes)
    patch = RULES[tr.spec.model.type].token_patch
    # the model's own weights, once: not the LoRA's, nor fp8 scales or stored transposed copies
    n_params = sum(p.numel() for n, p in tr.comps.denoiser.named_parameters()
                   if ".lora_" not in n and not n.endswith((".weight8_t", ".scale")))
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    stop_request = checkpoint.StopRequest().install()
    try:
        if tr.sampling is not None:
            tr.sampling.restored = state.samples  # what earlier attempts sampled (listed on the first call)
        if tr.sampling is not None and start == 1:
            tr.sampling.maybe(0, tr, prog)  # the base model, for comparison
        elif tr.sampling is not None and state.sample_pending == start - 1:
            tr.sampling.maybe(start - 1, tr, prog)  # the samples a stop at that step left for the resume
        elif tr.sampling is not None:  # resumed: the samples written before it, in progress and the report
            tr.sampling.listed(start)
            if tr.sampling.records and tr.env.is_main:
                prog.samples, prog.sampleStep = len(tr.sampling.records), tr.sampling.records[-1]["step"]
        state.sample_pending = None
        # the base model (not on a resume); on a resume, the evaluation of the step it resumed from
        # when it was due but not run (the run was stopped there)
        maybe_evaluate(tr, start - 1, samples_per_step, prog)
        saved = None

        def save_now(step: int) -> None:
            with metrics.busy_in(tr.metrics, "checkpoint"):
                checkpoint.save(step, tr.modules, tr.opt,
                                state.to_dict(step, env.world, tr.sampling.records if tr.sampling else None),
                                tr.local_ckpt, tr.spec.output.uri, tr.settings, t.checkpointKeep, env,
                                fingerprint=checkpoint.recorded(tr.spec, run_id()), attempt=tr.attempt)
            schedule.written()
            tr.metrics.checkpoint(step)
        for step in range(start, t.steps + 1):
            step_loss = torch.zeros((), device=env.device)
            data_wait, tokens = 0.0, 0
            for micro in range(t.gradientAccumulationSteps):
                t_data = time.perf_counter()
                batch = {k: v.to(env.device) for k, v in tr.loader.next()[1].items()}
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
            sps, eta = meter.update(step, now=time.perf_counter() - (tr.sampling.seconds if tr.sampling else 0.0)
                                    - (tr.evaluation.seconds if tr.evaluation else 0.0))
            epoch = epoch_of(step * samples_per_step, tr.epoch_size)
            tr.metrics.step(step, epoch, mean, lr_used, float(norm) if norm is not None and env.is_main else None,
                            samples_per_step, sps, eta, data_wait)
            tr.data_wait += data_wait
            tr.metrics.gpu_memory(env.device)
            # this rank's tokens per sample stand for every rank's (ranks draw from the same buckets)
            tps, mfu = throughput.rates(sps, tokens / (t.microBatchSize * t.gradientAccumulationSteps), n_params,
                                        tr.spec.adapter.type == "full", device_name, env.world)
            tr.metrics.throughput(tps, mfu)
            if step % t.logEvery == 0 or step == t.steps:
                prog.step, prog.epoch, prog.loss = step, epoch, mean
                prog.samplesPerSecond, prog.eta = sps, format_eta(eta)
                prog.tokensPerSecond, prog.mfu = tps, mfu
                if env.device.type == "cuda":
                    prog.gpuPeakGiB = round(torch.cuda.max_memory_allocated(env.device) / 2**30, 2)
                log(env, line(prog, lr_used))
                tr.publish(prog)
            if tr.sampling is not None and samples_deferred(step, tr.spec, stop):
                state.sample_pending = step
            elif tr.sampling is not None:
                tr.sampling.maybe(step, tr, prog)
            # before the checkpoint, which keeps its record; not when stopping (the resume runs it)
            maybe_evaluate(tr, step, samples_per_step, prog, stopping=stop)
            # the last step of a LoRA run is always kept (a small write): a failed export or upload is
            # then retried from it, not by training again since the last scheduled checkpoint
            last = step == t.steps and tr.spec.adapter.type != "full"
            if save or stop or last:
                save_now(step)
                saved = step
                # a signal during the save (a large checkpoint takes a while): this one is the stop
                # checkpoint, not one more step and another save that may outlast the grace period
                stop = stop or stop_agreed(stop_request, env)
            if stop:
                raise checkpoint.Stopped(stop_request.signum, step)  # 0: a peer's signal
        # a signal during the last step's samples, evaluation or save: a stop like any other, with the
        # last step's checkpoint (a full fine-tune keeps none otherwise); the next attempt exports
        if start <= t.steps and stop_agreed(stop_request, env):
            if saved != t.steps:
                save_now(t.steps)
            raise checkpoint.Stopped(stop_request.signum, t.steps)
    finally:
        stop_request.uninstall()


def samples_deferred(step: int, spec, stopping: bool) -> bool:
    """Whether the samples due at `step` wait for the resume: when stopping (SIGTERM's grace is
    short, and sampling every prompt of a large model could outlast it: the checkpoint comes first;
    the resumed run samples that step before its first). Pure."""
    return stopping and spec.samples is not None and sample_due(step, spec.samples, spec.training.steps)


def maybe_evaluate(tr: Trainer, step: int, samples_per_step: int, prog: Progress, stopping: bool = False) -> None:
    """The held-out evaluation (spec.evaluation) when due after `step` (0: before the first), not
    when stopping nor done already (evaluation.to_run): logged, in the metrics and progress.json,
    kept in the loop state. Every rank calls it."""
    if tr.evaluation is None or not evaluation.to_run(step, tr.spec.evaluation, tr.spec.training.steps,
                                                       samples_per_step, tr.epoch_size, stopping=stopping,
                                                       done=frozenset(r["step"] for r in tr.state.evals)):
        return
    with metrics.busy_in(tr.metrics, "evaluation"):
        rec = tr.evaluation.run(step, tr)
    tr.metrics.eval_loss(rec)
    if tr.env.is_main:
        log(tr.env, evaluation.format_line(step, rec))
        prog.evalLoss, warning = evaluation.published(rec)
        prog.evalStep = step
        if warning:
            log(tr.env, warning)
        tr.publish(prog)


def run(spec: LoRATrainingJobSpec, job_name: str) -> int:
    """Train; the exit code. A failure is reported (printed, and recorded for the launcher) before
    anything slow happens on the way out (closing the process group, the metrics' last scrape),
    since torchrun stops the other ranks as soon as one exits."""
    try:
        env = dist.init()
    except dist.TooFewDevices as e:
        return exits.fail(*too_few_devices(e, spec))
    m = metrics.start(env.rank, env.local_rank, job_name, log=lambda msg: print(msg, flush=True))
    stopped = False
    try:
        rc = _run(spec, job_name, env, m)
        if rc == 0:  # for the launcher: this worker finished (torchrun exits 1 when a signal reached it meanwhile)
            exits.record(0, "finished")
        return rc
    except checkpoint.Stopped as e:
        stopped = True  # its linger ends at the next SIGTERM (the pod's own stop): exit 143, as the Job expects
        m.phase("Stopped")
        return exits.fail(e.code, str(e))
    except (RunError, DatasetError, storage.StorageError, lora.AdapterError, ModelError, FileNotFoundError) as e:
        m.phase("Failed")
        return exits.fail(exits.code_of(e), str(e))  # bad input; a transient storage fault is retried
    except torch.OutOfMemoryError as e:  # the same step would run out again: not retried on GPUs
        m.phase("Failed")
        return exits.fail(exits.BAD_INPUT, out_of_memory(e, spec))
    except dist.PeerFailed as e:  # the failing rank reports (and classifies) its own error
        m.phase("Failed")
        return exits.fail(e.code, str(e), peer=True)
    except BaseException as e:
        m.phase("Failed")
        room = disk.no_room(e)  # a full disk where no phase looked for one (e.g. the checkpoint's local save)
        if room is None:
            raise
        return exits.fail(exits.BAD_INPUT, str(room))
    finally:
        flush_all()  # the newest progress.json, whatever ended the run
        dist.close()
        # serves the final state until scraped ($KUBELORA_METRICS_LINGER_SECONDS); a run stopped by
        # a signal only while its pod's grace lasts
        m.finish(hold=not stopped, linger=stop_linger(os.environ, checkpoint.SIGNALED_AT[0], time.monotonic())
                 if stopped else None)


def stop_linger(environ, signaled_at: Optional[float], now: float) -> Optional[float]:
    """How long a run stopped by a signal may still serve its metrics: the configured linger, cut to
    what is left of torchrun's shutdown timeout (the pod's grace, launch.shutdown_timeout) since the
    signal, less a few seconds to exit, so the worker ends with its own exit code (143) rather than
    torchrun's SIGKILL (137) after a slow checkpoint. None: the configured linger (not signaled, or
    no grace set: a local run). Pure."""
    from . import launch
    if signaled_at is None or launch.GRACE_ENV not in environ:
        return None
    configured = float(environ.get(metrics.LINGER_ENV, "0") or 0)
    return max(0.0, min(configured, launch.shutdown_timeout(environ) - (now - signaled_at) - 5))


def too_few_devices(error: dist.TooFewDevices, spec: LoRATrainingJobSpec, in_cluster: Optional[bool] = None
                    ) -> tuple[int, str]:
    """(exit code, message) for a process without a GPU of its own. A MIG slice per process (CUDA
    shows one MIG device to a process, whatever the pod was given) or `kubelora run --nproc` above
    the machine's GPUs: bad input, a retry sees the same; in a pod given resources.gpusPerNode
    whole GPUs, fewer visible is the node's fault (a GPU fallen off the bus): retried. Pure but for
    the environment."""
    # the operator's pods (torchx gives its retries a run id too, also on a workstation)
    in_cluster = bool(os.environ.get("KUBELORA_NAMESPACE")) if in_cluster is None else in_cluster
    r = spec.resources
    if r.gpuResource.startswith("nvidia.com/mig-"):
        return exits.BAD_INPUT, (f"{error}: a process sees a single MIG device, so with resources.gpuResource "
                                 f"{r.gpuResource} set resources.gpusPerNode: 1 (and more resources.nodes) instead "
                                 f"of {r.gpusPerNode}")
    if not in_cluster:
        return exits.BAD_INPUT, f"{error}: run with --nproc {error.count} or fewer"
    return exits.FAILED, (f"{error}, not the {r.gpusPerNode} of resources.gpusPerNode: the node lost a GPU or its "
                          f"device plugin gave fewer; the run is retried (on another node if this one is cordoned)")


def out_of_memory(error: BaseException, spec: LoRATrainingJobSpec) -> str:
    """The root cause of a GPU out-of-memory failure, with the settings that lower what a step
    needs (those not already at their leanest). A retry would run out at the same step, so the
    failure counts as bad input. Pure."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if first.startswith(("sampling at step", "evaluation at step")):  # dist.caught's prefix
        if first.startswith("sampling"):
            fixes = ["a smaller spec.samples width/height" + (" or frames" if RULES[spec.model.type].video else "")
                     + " (and the prompts' own)", "no spec.samples (the run trains without samples)"]
        else:
            fixes = ["a smaller evaluation.microBatchSize", "a smaller resolution for the evaluation.sources"]
        return (f"the GPU ran out of memory ({first}); a retry would run out at the same step, so the run is not "
                f"retried. Lower what it needs: " + "; ".join(fixes))
    t, fixes = spec.training, []
    # what the spec refuses beside a setting already there is advised with its removal
    budget = " (in place of training.memoryBudgetGiB)" if t.memoryBudgetGiB is not None else ""
    if t.gradientCheckpointing is not True or t.gradientCheckpointingEvery != 1:
        fixes.append("training.gradientCheckpointing: true (every block recomputed"
                     + (", overriding the memory plan's choice in the log's [memory] line)"
                        if t.gradientCheckpointing is None else ")") + budget)
    if t.gradientCheckpointing is None and not t.cpuOffload:
        fixes.append("a training.memoryBudgetGiB below the budget in the log's [memory] line (the plan then "
                     "recomputes more blocks)")
    if spec.model.transformerDtype != "float8" and spec.adapter.type != "full":
        fixes.append("model.transformerDtype: float8 (half the weight memory; other numerics, so the run starts "
                     "again from step 1: another output.uri or output.onExisting: overwrite)")
    if not t.cpuOffload:
        without = [f for f, on in (("training.memoryBudgetGiB", t.memoryBudgetGiB is not None),
                                   ("spec.samples", spec.samples is not None)) if on]
        fixes.append("training.cpuOffload: true" + (f" (without {' and '.join(without)}, which it excludes)"
                                                     if without else ""))
    if t.microBatchSize > 1:
        fixes.append(f"a training.microBatchSize below {t.microBatchSize} (gradientAccumulationSteps keeps the "
                     "batch size)")
    d = spec.dataset
    sizes = ("a smaller dataset.width/height" if d.width is not None else
             f"a smaller dataset.{'resolutions' if d.resolutions else 'resolution'}"
             + (" (and the sources' own resolutions)" if any(s.resolutions for s in d.sources or ()) else ""))
    fixes.append(sizes + (" or frame count" if RULES[spec.model.type].video else "")
                 + " (another run: output.uri or output.onExisting: overwrite)")
    return (f"the GPU ran out of memory ({first}); a retry would run out at the same step. Lower what a step "
            f"needs: " + "; ".join(fixes))


def _run(spec: LoRATrainingJobSpec, job_name: str, env: dist.DistEnv, m=None) -> int:
    m = m or metrics.Off()
    t_start = time.time()
    settings = storage.S3Settings.from_spec(spec.storage)
    family = get_family(spec.model.type)
    log(env, f"[kubelora {__version__}] job {job_name}: {spec.model.type} LoRA r={spec.adapter.rank} "
             f"on {env.world} process(es), device {env.device.type}")
    publish = Publisher(spec.output.uri, settings) if env.is_main else (lambda p, force=False, wait=False: None)
    t = spec.training
    publish(Progress(phase="Initializing", totalSteps=t.steps))
    m.start(spec.model.type, env.world, t.steps)

    # ---- pre-flight: what cannot be written is found now, not after the last step
    plan, steps = check_output(spec, settings, env)
    if plan == "done":
        log(env, f"[done] {spec.output.uri} already holds a finished run (manifest.json); nothing to train "
                 f"(output.onExisting: overwrite trains again); {samples.report_said(spec.output.uri)}")
        m.phase("Succeeded")
        return 0
    remote = check_cache_uri(spec, settings, env)

    # ---- stage-in
    log(env, "[phase] stage-in")
    m.phase("StagingIn")
    paths, unsafe, below, later = stage_in(spec, env, settings, resume=plan == "resume", remote=remote)
    # adapter.initFrom read now, a bad file named before the dataset is cached (a resume takes the checkpoint's)
    init = None
    if spec.adapter.initFrom and plan != "resume":
        init = dist.agree(lora_init.read, Path(paths[lora_init.FIELD]), spec.model.type)

    # ---- dataset (checked before any model is loaded), then the cache and the model
    report = scan_on_node(spec, env, paths, unsafe, below, later, job_name)
    layout = cache_phase.Layout(report, *probe_items(report, env, spec, remote, later)).make(spec, env, m)
    ready = cache_phase.prepare(spec, family, paths, layout, remote, env, m, later)
    decided = getattr(family, "resolved", lambda comps: {})(ready.comps)  # model settings the model decided
    spec = resolved_spec(spec, decided)
    if plan == "resume" and decided:
        check_resolved(spec, decided, settings, steps[-1], env)
    if spec.dataset.cacheOnly:
        return finish_cache_only(spec, job_name, env, m, publish, settings, layout.stats, ready.cache_stats)
    # spec.samples: prompt embeddings now, while the encoders are loaded (None when off)
    sampling = dist.agree(samples.setup, spec, family, ready.comps, job_name, settings, layout.stats,
                          cache_root() / "outputs" / job_name)
    ready.comps.encoders.clear()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- adapters, parallelism, optimizer
    tr = build_trainer(spec, family, ready, sampling, env, settings, publish, m, job_name, init)

    # ---- train (from step 1, or from the newest checkpoint)
    tr.attempt, steps = claim_checkpoints(spec, settings, env, plan, steps)
    start = resume(tr, steps) + 1 if plan == "resume" else 1
    log(env, "[phase] train")
    m.phase("Training")
    samples_per_step = t.microBatchSize * t.gradientAccumulationSteps * env.world
    meter = Meter(t.steps, samples_per_step)
    prog = first_progress(t.steps, start, samples_per_step, tr.epoch_size, tr.state.losses)
    if tr.state.evals:  # a resumed run shows the last evaluation until its next one
        prog.evalLoss, prog.evalStep = evaluation.published(tr.state.evals[-1])[0], tr.state.evals[-1]["step"]
    if env.device.type == "cuda":  # gpuPeakGiB and the peak gauge: training's, not loading's or caching's
        torch.cuda.reset_peak_memory_stats(env.device)
    try:
        _train_steps(tr, start, meter, prog)
    finally:
        tr.loader.close()
    summary = {"steps": t.steps, "samplesPerStep": samples_per_step, "worldSize": env.world,
               "samplesPerSecond": prog.samplesPerSecond, "wallSeconds": round(time.time() - t_start, 2)}

    # ---- export (gather is a collective; the writing and upload happen on rank 0)
    log(env, "[phase] export")
    prog.phase = "Exporting"
    m.phase("Exporting")
    publish(prog)
    result = export_run(tr, ready, job_name, summary)
    if env.is_main:
        prog.phase = "Succeeded"
        m.phase("Succeeded")
        publish(prog, force=True, wait=True)
        losses = tr.state.losses
        final = f"  final loss {losses[-1]:.4f}" if losses else ""
        log(env, f"[done] {result['uri']}  sha256 {result['sha256'][:16]}…{final}; {samples.report_said(spec.output.uri)}")
    return 0


def claim(spec, settings, env: dist.DistEnv) -> Optional[str]:
    """Rank 0 claims the run's checkpoints for this attempt (checkpoint.claim_attempt) and returns
    the id (None on the other ranks): an older attempt still running stops before it writes a
    marker, prunes or exports beside this one."""
    err, attempt = None, None
    if env.is_main:
        try:
            attempt = checkpoint.claim_attempt(spec.output.uri, settings)
        except storage.StorageError as e:
            err = e
    dist.fail_together(err, "claiming the run's checkpoints")
    return attempt


def check_output(spec, settings, env: dist.DistEnv) -> tuple[str, list[int]]:
    """output.uri writable, and what an earlier run of this manifest left there: ('train', 'resume'
    or 'done', the complete checkpoints' steps, oldest first). The same answer on every rank. A
    resume is refused when the newest checkpoint was written with other training settings (or
    beyond training.steps); training from step 1 over checkpoints (output.onExisting: overwrite)
    deletes them first."""
    err = None
    if env.is_main:
        try:
            storage.check_writable(spec.output.uri, settings)
        except storage.StorageError as e:
            err = storage.StorageError(f"output.uri: {e}", transient=e.transient)
    dist.fail_together(err, "the output check")
    finished, steps, extending, own = existing_output(spec, settings, env)
    latest = steps[-1] if steps else None
    plan = resume_plan(spec.output.onExisting, finished and not extending, latest, own)
    if own and spec.output.onExisting != "resume":
        log(env, f"[resume] output.onExisting: {spec.output.onExisting} is about another run's output; "
                 f"{'the finished result' if plan == 'done' else f'the checkpoint of step {latest}'} is this "
                 f"run's own (an earlier attempt of it), so it is {'kept' if plan == 'done' else 'resumed'}")
    if spec.dataset.cacheOnly:  # writes its own manifest.json: never over a finished run's
        err = RunError(f"dataset.cacheOnly: {spec.output.uri} holds a finished training run (manifest.json), which "
                       f"a cache-only job would replace with its own: give it another output.uri (or set "
                       f"output.onExisting: overwrite)"
                       ) if finished and spec.output.onExisting != "overwrite" and env.is_main else None
        dist.fail_together(err, "the output check")
        return "train", steps
    if plan == "resume":
        check_fingerprint(spec, settings, latest, env)
    if plan == "train" and steps:
        clear_checkpoints(spec, settings, steps, env)
        steps = []
    return plan, steps


def claim_checkpoints(spec, settings, env: dist.DistEnv, plan: str, steps: list[int]) -> tuple[Optional[str], list[int]]:
    """Before training, once the checkpoints are known to be this run's to write (check_output;
    never on another run's output, which it would stop): this attempt's claim on them (rank 0's
    id), so an older attempt still running stops before it writes, prunes or exports again; what
    it completed since check_output listed them is listed again, and resumed from."""
    attempt = claim(spec, settings, env)
    if plan == "resume":
        newest = existing_output(spec, settings, env)[1]
        if newest and newest[-1] != steps[-1]:
            log(env, f"[resume] step {newest[-1]} was completed since the start (an older attempt of this run, which "
                     "stops now); resuming from it")
            check_fingerprint(spec, settings, newest[-1], env)
            steps = newest
    return attempt, steps


def resolved_spec(spec, decided: dict):
    """The spec with the model settings the loaded model decided (family.resolved) where they were
    unset: what checkpoints and manifest.json then record. Pure."""
    unset = {k: v for k, v in decided.items() if getattr(spec.model, k) is None}
    return spec.model_copy(update={"model": spec.model.model_copy(update=unset)}) if unset else spec


def check_resolved(spec, decided: dict, settings, latest: int, env: dist.DistEnv) -> None:
    """The checkpoint being resumed was trained with the model settings the loaded model uses
    (checkpoint.resolved_refusal), else RunError on every rank, before any step."""
    err = None
    if env.is_main:
        try:
            why = checkpoint.resolved_refusal(checkpoint.read_fingerprint(spec.output.uri, latest, settings),
                                              {f"model.{k}": v for k, v in decided.items()}, latest, spec.output.uri)
            err = RunError(why) if why else None
        except storage.StorageError as e:
            err = storage.StorageError(f"output.uri: reading the checkpoint's spec: {e}", transient=e.transient)
        except (OSError, ValueError):
            err = None  # check_fingerprint already refused an unreadable one
    dist.fail_together(err, "the checkpoint check")


def check_fingerprint(spec, settings, latest: int, env: dist.DistEnv) -> None:
    """The newest checkpoint was written with this spec's training settings (checkpoint.fingerprint)
    and within training.steps, else RunError on every rank; read by rank 0 before anything is
    loaded. A checkpoint without a fingerprint (an older trainer's) resumes, with a warning."""
    err = None
    if env.is_main:
        try:
            recorded = checkpoint.read_fingerprint(spec.output.uri, latest, settings)
            if recorded is None:
                log(env, f"[resume] warning: the checkpoint of step {latest} records no spec (an older trainer "
                         f"wrote it): a change of the training settings since cannot be detected")
            why = checkpoint.resume_refusal(recorded, checkpoint.fingerprint(spec), latest, spec.training.steps,
                                            spec.output.uri)
            err = RunError(why) if why else None
        except storage.StorageError as e:
            err = storage.StorageError(f"output.uri: reading the checkpoint's spec: {e}", transient=e.transient)
        except (OSError, ValueError) as e:
            err = RunError(f"output.uri: the checkpoint of step {latest} has an unreadable "
                           f"{checkpoint.FINGERPRINT} ({e}); set output.onExisting: overwrite to start again")
    dist.fail_together(err, "the checkpoint check")


def clear_checkpoints(spec, settings, steps: list[int], env: dist.DistEnv) -> None:
    """output.onExisting: overwrite over checkpoints: rank 0 deletes output.uri/checkpoints/ before
    training from step 1 (else pruning, by step number, would keep the old run's higher steps and
    drop the new run's, and a later resume would pick the old run's)."""
    err = None
    if env.is_main:
        log(env, f"[output] output.onExisting: overwrite: deleting the earlier run's checkpoints (steps "
                 f"{', '.join(map(str, steps))}) under {spec.output.uri.rstrip('/')}/checkpoints/")
        try:
            checkpoint.delete_all(spec.output.uri, settings)
        except storage.StorageError as e:
            err = storage.StorageError(f"output.uri: deleting the old checkpoints: {e}", transient=e.transient)
    dist.fail_together(err, "deleting the old checkpoints")


def check_cache_uri(spec, settings, env: dist.DistEnv) -> Optional[cache_remote.Remote]:
    """dataset.cacheUri writable and listed once, on rank 0, then shared (a transient failure is a
    warning there, not an error)."""
    remote, err = None, None
    if env.is_main:
        try:
            remote = cache_remote.preflight(spec.dataset.cacheUri, settings, lambda msg: log(env, msg))
        except storage.StorageError as e:
            err = e
    dist.fail_together(err, "the dataset.cacheUri check")
    if spec.dataset.cacheUri and env.world > 1:
        remote = dist.broadcast(remote)
    return remote


def scan_on_node(spec: LoRATrainingJobSpec, env: dist.DistEnv, paths: dict, unsafe: Optional[dict] = None,
                 below: Optional[dict] = None, later: media_later.Later = media_later.NONE,
                 job_name: str = "job") -> ScanReport:
    """scan_sources once per node: its local rank 0 scans (a million files: as many stats and
    caption reads, on a network volume too) and the node's other ranks read its report from the
    cache folder, instead of every rank walking the same folders. A failed scan stops every rank
    with its reason (dist.fail_together); where the report cannot be written (a full or read-only
    cache volume) each rank scans for itself, as before."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if env.world == 1 or local_world == 1:
        return scan_sources(spec, paths, unsafe, below, later)
    # one per job, node and attempt (the launcher, the ranks' parent, is the node's)
    stem = f".scan-{job_name}-{socket.gethostname()}-"
    shared = cache_root() / f"{stem}{os.getppid()}.pkl"
    report, err = None, None
    if env.local_rank == 0:
        t0 = time.perf_counter()
        for old in shared.parent.glob(f"{stem}*.pkl"):  # this job's earlier attempt's on this node, cut short
            if re.fullmatch(rf"{re.escape(stem)}\d+\.pkl", old.name):
                old.unlink(missing_ok=True)
        try:
            report = scan_sources(spec, paths, unsafe, below, later)
        except Exception as e:  # noqa: BLE001 - every rank stops with its reason (as dist.agree)
            err = e
        if report is not None:
            try:
                cache.write_bytes_atomic(shared, pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL))
                print(f"[data] rank {env.rank} scanned the dataset for its node's {local_world} ranks: "
                      f"{len(report.items)} items in {time.perf_counter() - t0:.1f} s", flush=True)
            except (OSError, disk.NoRoom) as e:
                print(f"[data] warning: the dataset scan could not be shared through {shared} ({e}); each rank "
                      "scans for itself", flush=True)
    dist.fail_together(err, "scanning the dataset")
    if env.local_rank != 0:
        try:
            report = pickle.loads(shared.read_bytes()) if shared.is_file() else None
        except Exception as e:  # noqa: BLE001
            err = RuntimeError(f"reading the dataset scan of rank {env.rank - env.local_rank} ({shared}): "
                               f"{type(e).__name__}: {e}")
        if report is None and err is None:  # not shared: this rank scans for itself, its own error its own
            try:
                report = scan_sources(spec, paths, unsafe, below, later)
            except Exception as e:  # noqa: BLE001
                err = e
    dist.fail_together(err, "reading the dataset scan")
    if env.local_rank == 0:
        shared.unlink(missing_ok=True)
    return report


def scan_sources(spec: LoRATrainingJobSpec, paths: dict, unsafe: Optional[dict] = None,
                 below: Optional[dict] = None, later: media_later.Later = media_later.NONE) -> ScanReport:
    """Every dataset source's staged folder scanned into one report (items, captions, skips), then
    evaluation.sources' (source index len(dataset sources) + j): each evaluation item with its first
    caption alone, unshuffled and never dropped. unsafe (stage_in's): the objects of a source that
    stage-in left out, skipped as unsafeKey; below (stage_in's): media it did not fetch from the
    subfolders of a source read without them, counted as the scan counts a local source's; later
    (stage_in's): the media listed but not fetched yet, scanned as present."""
    r = RULES[spec.model.type]
    report = ScanReport()
    n_train = len(source_specs(spec))
    if eval_source_specs(spec):
        report.held, report.first_held = ScanReport(), n_train
    for i, src in enumerate(all_source_specs(spec)):
        key = source_key(spec, i)
        mask_root = paths.get(f"{key}.mask")
        opts = options_of(spec.dataset, src)
        if i >= n_train:
            opts = dataclasses.replace(opts, shuffle=False, dropout=0.0)
        part = scan(Path(paths[key]), video=r.video, opts=opts, source=i, seed=spec.training.seed,
                    uri=spec.dataset.uris[i] if i < n_train else src.uri,
                    mask_root=Path(mask_root) if mask_root else None, recursive=recursive_of(spec.dataset, src),
                    absent=later.absent(key), listed=later.listed(key), mask_listed=later.listed(f"{key}.mask"))
        # a mask object left out is not an item skipped: its item trains unmasked (the stage-in warning
        # named it, and the masked/unmasked counts show it)
        for uri in (unsafe or {}).get(key, []):
            part.skip(uri, "unsafeKey")
        if key in (below or {}):  # the bucket's listing, not what an earlier staging may have left here
            part.in_subfolders = below[key]
        if i >= n_train:   # the items join the others (probed, bucketed, cached alike), the counts stay apart
            report.items += [dataclasses.replace(it, captions=(it.caption,)) for it in part.items]
            part.items = []
            report.held.merge(part)
        else:
            report.merge(part)
    return report


def build_trainer(spec, family, ready: cache_phase.Ready, sampling, env: dist.DistEnv, settings, publish, m,
                  job_name: str, init: Optional[lora_init.InitLora] = None) -> Trainer:
    """Adapters injected (started from init: adapter.initFrom), the memory plan and parallelism
    agreed by every rank, the optimizer and schedule, the seeded data order and the cache loader."""
    t, comps, layout = spec.training, ready.comps, ready.layout
    units = layout.assignment.units
    # evaluation.sources' units have no repeats: the sampler never draws them, nor do they count in an epoch
    src_repeats = source_repeats(spec) + [0] * len(eval_source_specs(spec))
    items = layout.report.items
    space = bk.SampleSpace(buckets=tuple(u.bucket for u in units),
                           repeats=tuple(src_repeats[u.source] for u in units),
                           variants=tuple(len(items[u.item].variants) for u in units),
                           dropout=tuple(items[u.item].dropout for u in units))
    key_of = dict(zip(layout.entries, layout.keys))
    root = cache_root()

    ad = dist.agree(adapters.prepare, comps, family, spec, env, init)
    trained = [e for e in layout.entries if space.repeats[e[0]]]
    probe = lambda: largest_batch(layout.report, units, trained, key_of, root, t.microBatchSize)  # noqa: E731
    lay = dist.agree(adapters.layout, ad, comps, family, spec, env, probe)
    lay = adapters.agreed(dist.all_gather(lay)) if env.world > 1 else lay
    dist.agree(adapters.parallelize, ad, comps, family, spec, env, lay)
    if ad.memory:
        m.memory_plan(ad.memory["predictedPeakBytes"])
    opt = optimizer(ad.groups, t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, t.warmupSteps, t.steps, t.lrScheduler))
    log(env, f"[model] full fine-tune of {next(iter(comps.trainable))}: {ad.n_trainable:,} trainable parameters"
        if spec.adapter.type == "full" else
        f"[model] LoRA on {', '.join(ad.configs)}: {ad.n_trainable:,} trainable parameters")

    evaluator = evaluation.make(spec, layout, len(source_specs(spec)))
    oversize = evaluator and evaluation.oversize_warning(units, evaluator.batches, len(source_specs(spec)),
                                                         t.microBatchSize)
    if oversize:
        log(env, oversize)
    state = LoopState(gen=torch.Generator(device=env.device).manual_seed(t.seed * 1000 + env.rank),
                      sampler=bk.BucketSampler(space, t.seed, t.microBatchSize, env.world, env.rank))
    loader = cache.Loader(lambda s: cache.load_entry(root, key_of[s]), state.sampler,
                          depth=int(os.environ.get(cache.PREFETCH_ENV, "2")))
    return Trainer(spec, family, comps, ad, opt, sched, loader, env, state,
                   modules=torch.nn.ModuleDict(comps.trainable), local_ckpt=cache_root() / "checkpoints" / job_name,
                   settings=settings, publish=publish, epoch_size=sum(space.repeats), metrics=m, sampling=sampling,
                   evaluation=evaluator)


def resume(tr: Trainer, steps: list[int]) -> int:
    """Model, optimizer, schedule and (same number of ranks) the loop state restored from the
    newest complete checkpoint that loads (a truncated or corrupt one is skipped with a warning,
    on every rank alike); returns its step."""
    spec, env = tr.spec, tr.env
    for step in reversed(steps):
        try:
            loop = checkpoint.restore(step, tr.modules, tr.opt, tr.local_ckpt, spec.output.uri, tr.settings, env,
                                      spec.training.microBatchSize)
            break
        except checkpoint.Unreadable as e:
            log(env, f"[resume] warning: the checkpoint of step {step} cannot be loaded ({e}); trying an older one")
    else:
        raise RunError(f"no checkpoint under {spec.output.uri.rstrip('/')}/checkpoints/ can be loaded (steps "
                       f"{', '.join(map(str, steps))}, all unreadable: see the warnings above); delete them, or set "
                       f"output.onExisting: overwrite to train from step 1")
    unreadable = [s for s in steps if s > step]
    err = None
    if unreadable and env.is_main:  # else their COMPLETE would stand while this run writes those steps again
        log(env, f"[resume] deleting the unreadable checkpoint(s) of step {', '.join(map(str, unreadable))}")
        try:
            for s in unreadable:
                storage.delete_prefix(f"{spec.output.uri.rstrip('/')}/checkpoints/step-{s}", tr.settings,
                                      first=(checkpoint.MARKER,))
        except storage.StorageError as e:
            err = e
    dist.fail_together(err, "deleting unreadable checkpoints")
    tr.sched.last_epoch = step
    tr.sched._last_lr = [g["lr"] for g in tr.opt.param_groups]
    fused(tr.opt)
    exact = loop is not None and tr.state.load(loop)
    tr.metrics.resumed(step)
    log(env, f"[resume] from the checkpoint of step {step}" + ("" if exact else
             " (another number of ranks or micro-batch, other data under the dataset's URIs, or an older "
             "checkpoint: the data order goes on from "
             f"{'the start of' if tr.state.sampler.epoch == 0 else 'a new shuffle at'} epoch {tr.state.sampler.epoch + 1}"
             "; the model, optimizer and schedule are restored)"))
    return step


def export_run(tr: Trainer, ready: cache_phase.Ready, job_name: str, summary: dict) -> Optional[dict]:
    """The trained weights gathered (a collective), then written, uploaded and described in
    manifest.json by rank 0; a failure there stops every rank. Rank 0 gets the primary artifact."""
    spec, env, comps, ad, sampling = tr.spec, tr.env, tr.comps, tr.adapters, tr.sampling
    full = spec.adapter.type == "full"
    gathered = adapters.gather_full(comps, getattr(torch, spec.model.dtype), keep=env.is_main) if full else adapters.gather(comps)
    err, result = None, None
    if env.is_main:
        try:
            losses = tr.state.losses  # none: resumed at the last step with another number of ranks (no loop state)
            fingerprint = tr.evaluation.fingerprint if tr.evaluation else None
            summary = {**summary, "firstLoss": losses[0] if losses else None,
                       "finalLoss": losses[-1] if losses else None, "minLoss": min(losses) if losses else None,
                       "lossHistory": downsample(losses, 200), **eval_summary(tr.state.evals, fingerprint)}
            if ad.memory:
                summary["memoryPlan"] = {k: v for k, v in ad.memory.items() if k != "text"}
            if ad.attention != "default":  # a GPU: which attention kernel trained (training.attentionBackend)
                summary["attention"] = ad.attention
            sampling_s = sampling.seconds if sampling else 0.0
            eval_s = tr.evaluation.seconds if tr.evaluation else 0.0
            summary.update(samplingSeconds=round(sampling_s, 2), **({"evalSeconds": round(eval_s, 2)} if tr.evaluation else {}),
                           trainingSeconds=round(summary["wallSeconds"] - sampling_s - eval_s, 2),
                           dataWaitSeconds=round(tr.data_wait, 3))
            checkpoint.check_attempt(spec.output.uri, tr.settings, tr.attempt)  # not over a newer attempt's output
            out_dir = cache_root() / "outputs" / job_name
            stats = ready.layout.stats
            report = lambda arts: {**samples.final_report(spec, job_name, tr.settings, sampling, losses, stats,  # noqa: E731
                                                          arts, out_dir, tr.state.evals, tr.state.samples),
                                   "cache": ready.cache_stats}
            result = (export_full.export_and_upload(spec, job_name, tr.family, comps, gathered, summary, stats,
                                                    tr.settings, out_dir, extra=report) if full else
                      export.export_and_upload(spec, job_name, tr.family, ad.configs, gathered, summary, stats,
                                               tr.settings, out_dir, extra=report))
        except storage.StorageError as e:
            err = e  # an artifact or manifest.json not uploaded: transient or bad input, as storage classified it
        except ValueError as e:
            err = RunError(str(e))
        except Exception as e:  # noqa: BLE001 - a full disk (also safetensors' own error) is bad input (disk.NoRoom);
            # another local disk failure: the Job retries; anything else is a bug, raised as it is
            err = disk.no_room(e, "export") or (RuntimeError(f"export: {type(e).__name__}: {e}")
                                                if isinstance(e, OSError) else None)
            if err is None:
                raise
    dist.fail_together(err, "export")
    return result


def eval_summary(evals: list[dict], fingerprint: Optional[str] = None) -> dict:
    """manifest.json's evaluation fields: the last evaluation's loss, the best trained one (not step
    0, the base model, which has no checkpoint: baseEvalLoss) and its step, and every evaluation's
    record ({} without evaluations). With fingerprint (evaluation.fingerprint), only the records of
    it are compared: an evaluation changed across a resume gives numbers of another scale. Pure."""
    if not evals:
        return {}
    same = [r for r in evals if fingerprint is None or r.get("fingerprint") == fingerprint]
    out = {"evalLoss": evals[-1]["loss"]}
    trained = [r for r in same if r["step"] > 0 and math.isfinite(r["loss"])]
    if trained:
        best = min(trained, key=lambda r: r["loss"])
        out.update(bestEvalLoss=best["loss"], bestEvalStep=best["step"])
    base = [r for r in same if r["step"] == 0]
    if base:
        out["baseEvalLoss"] = base[-1]["loss"]
    return {**out, "evalHistory": evals}


def main_from_cli(spec_path: str) -> int:
    from .spec import load_spec, manifest_name
    spec = load_spec(spec_path)
    name = os.environ.get("KUBELORA_JOB_NAME") or manifest_name(spec_path)
    return run(spec, name)