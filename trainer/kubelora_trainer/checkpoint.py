"""Training-state checkpoints: written every N steps and/or M minutes and when the run is told to
stop (SIGTERM from a preemption or a pod deletion, SIGINT from Ctrl-C), resumed from by the next
run of the same manifest.

    <output.uri>/checkpoints/step-N/state/.metadata, __R_0.distcp   adapters + optimizer (torch
                                                                     distributed checkpoint: every
                                                                     rank writes its own shard)
    <output.uri>/checkpoints/step-N/state/rank-R.pt                 rank R's loop state (step, RNG
                                                                     states, sampler position, losses)
    <output.uri>/checkpoints/step-N/state/spec.json                 the training-relevant spec
                                                                     (fingerprint), by rank 0
    <output.uri>/checkpoints/step-N/state/COMPLETE                  written last, by rank 0

Only a step with COMPLETE counts; the newest `training.checkpointKeep` complete ones are kept.
Frozen base weights are never written (they come from the model files); a full fine-tune
(adapter.type full) has none frozen, so its checkpoints hold every weight and its optimizer state.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import disk, dist, storage
from .progress import RUN_KEY

STATE = "state"
MARKER = "COMPLETE"
FINGERPRINT = "spec.json"
# the parts of the spec a checkpoint's state depends on (a resume with others changed is refused) ...
FINGERPRINTED = ("model", "adapter", "dataset", "training")
# ... less what may change between attempts without changing the trained result: checkpoint cadence
# and retention, logging, where the shared cache lives, and the memory/speed knobs an out-of-memory
# failure asks for (the same maths)
NOT_FINGERPRINTED = frozenset({
    "training.checkpointEverySteps", "training.checkpointEveryMinutes", "training.checkpointKeep",
    "training.logEvery", "training.gradientCheckpointing", "training.gradientCheckpointingEvery",
    "training.memoryBudgetGiB", "training.compile", "training.attentionBackend", "training.sharding",
    "training.cpuOffload", "dataset.cacheUri", "dataset.cacheOnly"})
# recorded, but compared as their product (resume_refusal): a smaller micro-batch with more
# accumulation is the same step, which an out-of-memory failure asks for; the data order restarts
PER_STEP = frozenset({"training.microBatchSize", "training.gradientAccumulationSteps"})
# recorded, and a change refused only where the schedule depends on it: with a constant learning
# rate, more steps trains the same run longer
SCHEDULE = frozenset({"training.steps"})
# model settings that, unset, the model decides when it loads (the loaded value is what checkpoints
# record), with the value trainers from before the setting existed used: unset, not compared before
# the model is loaded; resolved_refusal compares them after
RESOLVED = {"model.causalTemporalPositioning": False}
STEP_DIR = re.compile(r"step-(\d+)/state/" + MARKER)
STEP_FILE = re.compile(r"step-(\d+)/state/")


def _options(strict: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def complete_steps(names: list[str]) -> list[int]:
    """Steps with a complete checkpoint among object names under checkpoints/, newest last. Pure."""
    return sorted({int(m[1]) for n in names if (m := STEP_DIR.fullmatch(n))})


def fingerprint(spec) -> dict:
    """What a checkpoint records of the spec that wrote it (JSON-able). Pure."""
    return fingerprint_of(spec.model_dump(mode="json"))


def recorded(spec, run: Optional[str]) -> dict:
    """What a checkpoint's FINGERPRINT file holds: the fingerprint and the run that wrote it. Pure."""
    return {**fingerprint(spec), **({RUN_KEY: run} if run else {})}  # progress.RUN_KEY


def fingerprint_of(doc: dict) -> dict:
    """fingerprint() of a spec dumped as JSON (manifest.json's spec). Pure."""
    out = {part: dict(doc.get(part) or {}) for part in FINGERPRINTED}
    for path in NOT_FINGERPRINTED:
        part, _, name = path.partition(".")
        out[part].pop(name, None)
    return out


def changed_fields(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted path, old, new) for every value that differs between two fingerprints, in order.
    A key only one side has is not a change (a field added or removed by another trainer version
    takes its default); lists of equal length are compared item by item. Pure."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for k in old:
            sub = f"{path}.{k}" if path else k
            if k in new and sub not in NOT_FINGERPRINTED | PER_STEP | SCHEDULE and not (sub in RESOLVED and new[k] is None):
                found += changed_fields(old[k], new[k], sub)
        return found
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and any(isinstance(x, (dict, list)) for x in old + new)):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in changed_fields(a, b, f"{path}.{i}")]
    return [] if old == new else [(path, old, new)]


def step_batch(fp: dict) -> Optional[int]:
    """Samples one rank trains per optimizer step, from a fingerprint (None where it lacks them). Pure."""
    t = fp.get("training") or {}
    micro, accum = t.get("microBatchSize"), t.get("gradientAccumulationSteps")
    return micro * accum if micro is not None and accum is not None else None


def resume_refusal(recorded: Optional[dict], current: dict, latest: int, steps: int, uri: str) -> Optional[str]:
    """Why the checkpoint of step `latest` (recorded: its fingerprint, None when written before
    checkpoints had one) cannot be resumed by this spec; None when it can. Pure."""
    fix = (f"train this spec into another output.uri, or set output.onExisting: overwrite to start again "
           f"(deleting {uri.rstrip('/')}/checkpoints/)")
    if latest > steps:
        return (f"output.uri holds a checkpoint of step {latest}, beyond training.steps ({steps}): the run that "
                f"wrote it had training.steps {(recorded or {}).get('training', {}).get('steps', 'higher')}; "
                f"set training.steps back, or {fix}")
    changes = _changes(recorded, current) if recorded is not None else []
    old_t, new_t = (recorded or {}).get("training") or {}, current.get("training") or {}
    if (old_t.get("steps") not in (None, new_t.get("steps"))
            and "constant" not in (old_t.get("lrScheduler", "constant"), new_t.get("lrScheduler"))):
        changes.append((f"training.steps (the {new_t.get('lrScheduler')} learning-rate schedule depends on it)",
                        old_t["steps"], new_t.get("steps")))
    if not changes:
        return None
    return (f"output.uri holds checkpoints (newest: step {latest}) of a run with other settings ({_listed(changes)}); "
            f"resuming would mix them: set them back to resume, or {fix}")


def _changes(recorded: dict, current: dict) -> list[tuple[str, object, object]]:
    """changed_fields, and the samples per step and rank compared as one number. Pure."""
    changes = changed_fields(recorded, current)
    if step_batch(recorded) is not None and step_batch(recorded) != step_batch(current):
        changes.append(("training.microBatchSize x training.gradientAccumulationSteps (samples per step and rank)",
                        step_batch(recorded), step_batch(current)))
    return changes


def _listed(changes) -> str:
    return "; ".join(f"{p}: {json.dumps(a)} -> {json.dumps(b)}" for p, a, b in changes)


def finished_refusal(recorded: Optional[dict], current: dict, uri: str) -> Optional[str]:
    """Why a finished run in output.uri (recorded: the fingerprint of the spec in its manifest.json;
    None for a manifest without one) is not this spec's result; None when it is. A run this spec
    trains further (train.extends) is a resume and checked as one, so any step count differing
    here is refused too: fewer steps, or more for a full fine-tune, which cannot go on. Pure."""
    if recorded is None:
        return None
    changes = _changes(recorded, current)
    old_steps, new_steps = (recorded.get("training") or {}).get("steps"), (current.get("training") or {}).get("steps")
    if old_steps is not None and old_steps != new_steps:
        changes.append(("training.steps", old_steps, new_steps))
    if not changes:
        return None
    return (f"output.uri holds a finished run trained with other settings ({_listed(changes)}): nothing would be "
            f"trained, and its LoRA is not this spec's; train this spec into another output.uri, or set "
            f"output.onExisting: overwrite to replace that run")


def resolved_refusal(recorded: Optional[dict], resolved: dict, latest: int, uri: str) -> Optional[str]:
    """Why the checkpoint of step `latest` cannot be resumed with the model settings the loaded
    model resolved (resolved: "model.<field>" -> value); None when it can. A checkpoint without the
    field was written before it existed, with RESOLVED's value. Pure."""
    if recorded is None:
        return None
    changes = []
    for path, new in resolved.items():
        part, _, name = path.partition(".")
        block = recorded.get(part) or {}
        old = block.get(name, RESOLVED.get(path))
        if old is not None and old != new:
            changes.append((path, old, new))
    if not changes:
        return None
    return (f"output.uri holds checkpoints (newest: step {latest}) trained with other model settings than this model "
            f"resolves to ({_listed(changes)}): set them to the checkpoint's values to finish that run as it "
            f"started, or train into another output.uri, or set output.onExisting: overwrite to start again "
            f"(deleting {uri.rstrip('/')}/checkpoints/)")


def read_fingerprint(output_uri: str, step: int, settings: storage.S3Settings) -> Optional[dict]:
    """The fingerprint the checkpoint of `step` recorded; None when it has none (written before
    checkpoints had one)."""
    import tempfile
    uri = f"{output_uri.rstrip('/')}/checkpoints/step-{step}/{STATE}/{FINGERPRINT}"
    loc = storage.parse_uri(uri)
    if not loc.is_s3:
        p = Path(loc.key)
        return json.loads(p.read_text()) if p.is_file() else None
    with tempfile.TemporaryDirectory() as d:
        if FINGERPRINT not in storage.list_keys(uri.rsplit("/", 1)[0], settings):
            return None
        return json.loads(Path(storage.download(uri, Path(d), settings, log=lambda m: None)).read_text())


SIGNALED_AT: list = [None]  # when this process was first told to stop (time.monotonic()), for its exit


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT during training: checkpoint at the next step boundary, then stop."""
    signum: int = 0
    _previous: dict = field(default_factory=dict)

    def install(self) -> "StopRequest":
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        if SIGNALED_AT[0] is None:
            SIGNALED_AT[0] = time.monotonic()

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class Stopped(RuntimeError):
    """The run stopped after writing a checkpoint: on a signal to this rank (exit code 128 +
    signal), or, signum 0, because another rank got one (exits.PEER_STOPPED)."""

    def __init__(self, signum: int, step: int):
        from .exits import PEER_STOPPED
        why = (f"stopped by {signal.Signals(signum).name}" if signum else
               "stopped because a rank of another pod was told to stop (its pod preempted, evicted or deleted)")
        super().__init__(f"{why} after step {step}; the checkpoint of step {step} is complete and the next run of "
                         f"this manifest resumes from it")
        self.code = 128 + signum if signum else PEER_STOPPED


class Schedule:
    """When to write: every `steps` steps, every `minutes` minutes (decided by rank 0's clock and
    agreed on in the step's collective), and on a stop request."""

    def __init__(self, steps: Optional[int], minutes: Optional[float]):
        self.steps, self.minutes, self.last = steps, minutes, time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = bool(self.steps) and step % self.steps == 0
        by_time = bool(self.minutes) and time.monotonic() - self.last >= self.minutes * 60
        return by_steps or by_time

    def written(self) -> None:
        self.last = time.monotonic()


def save(step: int, modules: torch.nn.Module, opt, loop_state: dict, local_root: Path, output_uri: str,
         settings: storage.S3Settings, keep: int, env: dist.DistEnv, fingerprint: Optional[dict] = None,
         attempt: Optional[str] = None) -> None:
    """Every rank writes its shard and its loop state into the node's staging folder (local_root);
    the node's files are uploaded; rank 0 writes the spec's fingerprint and, last, the marker, and
    drops checkpoints beyond `keep`; then each node deletes its staging copy (a full fine-tune's
    checkpoint is the size of the model). A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = local_root / f"step-{step}" / STATE
    remote = f"{output_uri.rstrip('/')}/checkpoints/step-{step}/{STATE}"
    if env.local_rank == 0:
        shutil.rmtree(local_root, ignore_errors=True)  # this step's, and any an earlier attempt left behind
    err = None
    if env.is_main:  # what an earlier save of this step that never completed left (with more ranks: rank
        try:         # files this save would not overwrite, and a resume would take for its own)
            check_attempt(output_uri, settings, attempt)  # not a newer attempt's files
            storage.delete_prefix(remote, settings)
        except storage.StorageError as e:
            err = e
    dist.fail_together(err, "clearing the checkpoint's folder")  # every rank waits for it
    model_sd, optim_sd = get_state_dict(modules, opt, options=_options(strict=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    buf = io.BytesIO()  # torch.save's file writer reports a full disk without the errno ("unexpected pos")
    torch.save(loop_state, buf)
    try:
        (folder / f"rank-{env.rank}.pt").write_bytes(buf.getvalue())
        if env.is_main and fingerprint is not None:
            (folder / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1) + "\n")
        err = None
    except OSError as e:  # one rank's disk: the others stop with its reason instead of waiting at a barrier
        err = disk.no_room(e, "writing the checkpoint", path=folder / f"rank-{env.rank}.pt") or e
    dist.fail_together(err, "writing the checkpoint's loop state")
    err = None
    if env.local_rank == 0:
        try:
            for f in sorted(p for p in folder.iterdir() if p.is_file()):
                storage.upload(f, f"{remote}/{f.name}", settings)
        except storage.StorageError as e:
            err = e  # transient (the run is retried and resumes from the previous checkpoint) or bad input
        except OSError as e:
            err = os_error(e)
    dist.fail_together(err, "uploading the checkpoint")
    if env.is_main:
        try:
            marker = folder / MARKER
            marker.write_text(f"{step}\n")
            check_attempt(output_uri, settings, attempt)  # no marker, nor prune, beside a newer attempt's
            storage.upload(marker, f"{remote}/{MARKER}", settings)
            print(f"[checkpoint] step {step} written to {remote}", flush=True)
            prune_or_warn(output_uri, settings, keep)
        except storage.StorageError as e:
            err = e
        except OSError as e:
            err = os_error(e)
    dist.fail_together(err, "writing the checkpoint")
    if env.local_rank == 0:  # complete in output.uri: the staging copy is not read again (a resume fetches it)
        shutil.rmtree(folder.parent, ignore_errors=True)


def prune(output_uri: str, settings: storage.S3Settings, keep: int) -> None:
    """Complete checkpoints beyond the newest `keep` deleted, and the files of saves that never
    completed (a crash while writing) below the newest complete one."""
    base = f"{output_uri.rstrip('/')}/checkpoints"
    for old in to_prune(storage.list_keys(base, settings), keep):
        storage.delete_prefix(f"{base}/step-{old}/{STATE}", settings, first=(MARKER,))


def prune_or_warn(output_uri: str, settings: storage.S3Settings, keep: int) -> None:
    """prune() after a checkpoint was written: a failure (the store throttling deletes, a bucket
    policy without DeleteObject) is a warning, not the end of the run (every rank would stop
    right after a good checkpoint); the next checkpoint's prune tries again."""
    try:
        prune(output_uri, settings, keep)
    except (storage.StorageError, OSError) as e:
        print(f"[warning] deleting the checkpoints older than the newest {keep} under {output_uri.rstrip('/')}"
              f"/checkpoints failed ({e}); the run goes on and the next checkpoint tries again", flush=True)


def to_prune(names: list[str], keep: int) -> list[int]:
    """The steps prune() deletes among object names under checkpoints/. Pure."""
    complete = complete_steps(names)
    if not complete:
        return []
    started = {int(m[1]) for n in names if (m := STEP_FILE.match(n))}
    unfinished = [s for s in started - set(complete) if s < complete[-1]]
    return sorted(complete[:-keep] + unfinished)


ATTEMPT = "ATTEMPT"  # under checkpoints/: the attempt that writes this run's checkpoints now


class Superseded(storage.StorageError):
    """A newer attempt of this run writes its checkpoints: this one (a pod cut off from the API
    server but not from the store, which the operator has replaced; or the same manifest run twice
    on one machine) stops without writing. Not retried (bad input)."""


def claim_attempt(output_uri: str, settings: storage.S3Settings, now: Optional[float] = None) -> str:
    """Rank 0 before training: this attempt's id written to checkpoints/ATTEMPT, so an older
    attempt still running (check_attempt) stops before its next checkpoint's marker, prune or
    export instead of writing beside this one. Returns the id."""
    import socket
    import tempfile
    import uuid
    me = uuid.uuid4().hex
    doc = {"attempt": me, "host": socket.gethostname(), "pid": os.getpid(),
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ATTEMPT
        path.write_text(json.dumps(doc) + "\n")
        storage.upload(path, f"{output_uri.rstrip('/')}/checkpoints/{ATTEMPT}", settings,
                       content_type="application/json")
    return me


def check_attempt(output_uri: str, settings: storage.S3Settings, me: Optional[str]) -> None:
    """Superseded when another attempt has claimed this run's checkpoints since this one did.
    Nothing without an id of its own (a run that claimed none)."""
    if me is None:
        return
    got = storage.read_object(f"{output_uri.rstrip('/')}/checkpoints/{ATTEMPT}", settings)
    if got is None:  # this attempt wrote it: gone means a newer one cleared checkpoints/ (output.onExisting: overwrite)
        raise Superseded(f"the claim of this run's checkpoints under {output_uri.rstrip('/')}/checkpoints is gone (a "
                         "newer attempt cleared them): this one stops without writing")
    try:
        doc = json.loads(got)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    if doc.get("attempt") != me:
        raise Superseded(f"a newer attempt of this run (on {doc.get('host', '?')}, since {doc.get('at', '?')}) writes "
                         f"the checkpoints under {output_uri.rstrip('/')}/checkpoints: this one stops without "
                         "writing (a pod the operator replaced, or the same manifest run twice)")


def delete_all(output_uri: str, settings: storage.S3Settings) -> None:
    """output.uri/checkpoints/ deleted (output.onExisting: overwrite, before training from step 1)."""
    storage.delete_prefix(f"{output_uri.rstrip('/')}/checkpoints", settings, first=(MARKER,))


class Unreadable(RuntimeError):
    """A checkpoint that could not be loaded on some rank (truncated or corrupt files): the same
    on every rank, so all of them try an older one together."""


def loop_for_world(own: Optional[dict], first: Optional[dict], world: int, micro: Optional[int] = None
                   ) -> Optional[dict]:
    """The loop state a rank resumes with: its own file's when the checkpoint had this number of
    ranks and micro-batch (rank 0's file saying so too: a rank file left by an earlier, crashed save
    of the same step with more ranks is not this checkpoint's); else what does not belong to one layout
    (taken from rank 0's file, the same on every rank): the loss and evaluation history (all-rank
    means), the samples a stop left for the resume, the step, and the epoch the data order goes on
    from (the next one, when the old layout's was under way: its plan belongs to that layout). Pure."""
    def same_layout(d: Optional[dict]) -> bool:
        return d is not None and d.get("world") == world and (micro is None or d.get("micro", micro) == micro)
    if same_layout(own) and (first is None or same_layout(first)):
        return own
    src = first if first is not None else own
    if src is None or "losses" not in src:
        return None
    out: dict = {"losses": list(src["losses"]), **({"evals": list(src["evals"])} if "evals" in src else {})}
    if src.get("sample_pending") is not None:
        out["sample_pending"] = src["sample_pending"]
    if isinstance(src.get("samples"), list):
        out["samples"] = list(src["samples"])
    if "step" in src:
        out["step"] = src["step"]
    sampler = src.get("sampler")
    if sampler:
        out["epoch"] = sampler["epoch"] + (1 if sampler["pos"] or sampler["carry_in"] else 0)
    return out


def _cause(e: BaseException) -> BaseException:
    """The first failing rank's own error, not dcp's wrapper. Pure."""
    failures = getattr(e, "failures", None)  # dcp.CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return inner[0] if isinstance(inner, tuple) else inner
    return e


# errnos of a machine or a mount failing (an NFS/FUSE output.uri read in place, the staging disk),
# not of the checkpoint's bytes
MACHINE_ERRNOS = storage.MACHINE_ERRNOS
DEVICE_FAULTS = ("CUDA error", "NCCL", "CUBLAS_STATUS", "cuDNN error", "illegal memory access")


def os_error(e: OSError) -> storage.StorageError:
    """A local I/O error while writing, uploading or fetching a checkpoint: a full disk is bad
    input (disk.NoRoom: the retry fills it again), the machine's own failures (EIO, ESTALE, a
    timeout of a network filesystem) are transient: retried from the previous checkpoint, not a
    failed Job. Pure."""
    room = disk.no_room(e)
    if room is not None:
        return room
    return storage.StorageError(f"{e}", transient=e.errno in MACHINE_ERRNOS)


def _not_the_files(e: BaseException) -> Optional[BaseException]:
    """A load failure that is this machine's, not the checkpoint's: out of memory, a full disk, an
    I/O error of the disk or mount, a GPU or collective fault. The error to stop with (an older
    step is then not tried, which would delete this one); None for one that means unreadable files
    (truncated, corrupt, missing). Pure."""
    cause = _cause(e)
    if isinstance(cause, (torch.OutOfMemoryError, MemoryError)):
        return cause
    room = disk.no_room(cause, "restoring a checkpoint")
    if room is not None:
        return room
    if isinstance(cause, OSError) and cause.errno in MACHINE_ERRNOS:
        return cause
    if isinstance(cause, torch.distributed.DistError) or (
            isinstance(cause, RuntimeError) and any(f in str(cause) for f in DEVICE_FAULTS)):
        return cause
    return None


def _reason(e: BaseException) -> str:
    """One line for a failed load: the first failing rank's own error, not dcp's wrapper. Pure."""
    e = _cause(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}"[:300] if text else type(e).__name__


def _fetch(step: int, local_root: Path, output_uri: str, settings: storage.S3Settings, env: dist.DistEnv) -> Path:
    """The folder to load the checkpoint of `step` from: output.uri's own when it is a local folder
    (nothing copied), else the node's staging copy, downloaded by its local rank 0."""
    remote = f"{output_uri.rstrip('/')}/checkpoints/step-{step}/{STATE}"
    loc = storage.parse_uri(remote)
    if not loc.is_s3:
        return Path(loc.key)
    folder = local_root / f"step-{step}" / STATE
    err = None
    if env.local_rank == 0:
        try:
            for old in local_root.glob("step-*"):  # left by an earlier attempt (not this step: a node sharing
                if old.name != f"step-{step}":      # the volume may be fetching it now)
                    shutil.rmtree(old, ignore_errors=True)
            storage.download(remote, folder, settings, log=lambda m: None)
        except storage.StorageError as e:
            err = e
        except OSError as e:
            err = os_error(e)
    dist.fail_together(err, "fetching the checkpoint")
    return folder


def restore(step: int, modules: torch.nn.Module, opt, local_root: Path, output_uri: str,
            settings: storage.S3Settings, env: dist.DistEnv, micro: Optional[int] = None) -> Optional[dict]:
    """Load the adapters and optimizer of `step` into modules/opt (a collective) and return this
    rank's loop state (loop_for_world: what does not belong to one layout when the run had another
    number of ranks or micro-batch; None from a checkpoint without loop state). Raises Unreadable on every rank when a
    file of the checkpoint could not be read on any; the staging copy is deleted either way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = _fetch(step, local_root, output_uri, settings, env)
    err, loop, fatal = None, None, None
    try:
        model_sd, optim_sd = get_state_dict(modules, opt, options=_options(strict=True))
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder))  # a collective: a rank's read failure is raised on every rank
        set_state_dict(modules, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_options(strict=False))
        mine, first = folder / f"rank-{env.rank}.pt", folder / "rank-0.pt"
        own = torch.load(mine, weights_only=True) if mine.is_file() else None
        rank0 = own if env.rank == 0 else torch.load(first, weights_only=True) if first.is_file() else None
        loop = loop_for_world(own, rank0, env.world, micro)
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - truncated, corrupt, missing: try an older one
        fatal = _not_the_files(e)
        if fatal is None:
            err = _reason(e)
    # out of memory or a full disk says nothing about the files: no older step is tried (which would
    # delete this one), the run stops with that error (exits: out of memory and a full disk are bad input)
    dist.fail_together(fatal, f"restoring the checkpoint of step {step}")
    errors = dist.all_gather(err) if env.world > 1 else [err]
    if folder.is_relative_to(local_root):
        dist.barrier()  # every rank of the node has read the copy
        if env.local_rank == 0:
            shutil.rmtree(local_root, ignore_errors=True)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise Unreadable("; ".join(f"rank {r}: {e}" for r, e in bad[:3]))
    return loop
