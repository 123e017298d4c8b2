"""Training-state checkpoints: written every N steps and/or M minutes and when the run is told to
stop (SIGTERM from a preemption or a pod deletion, SIGINT from Ctrl-C), resumed from by the next
run of the same manifest.

    <output.uri>/checkpoints/step-N/state/.metadata, __R_0.distcp   adapters + optimizer (torch
                                                                     distributed checkpoint: every
                                                                     rank writes its own shard)
    <output.uri>/checkpoints/step-N/state/rank-R.pt                 rank R's loop state (step, RNG
                                                                     states, sampler position, losses)
    <output.uri>/checkpoints/step-N/state/COMPLETE                  written last, by rank 0

Only a step with COMPLETE counts; the newest `training.checkpointKeep` complete ones are kept.
Frozen base weights are never written (they come from the model files); a full fine-tune
(adapter.type full) has none frozen, so its checkpoints hold every weight and its optimizer state.
"""
from __future__ import annotations

import io
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import disk, dist, storage

STATE = "state"
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"step-(\d+)/state/" + MARKER)


def _options(strict: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def complete_steps(names: list[str]) -> list[int]:
    """Steps with a complete checkpoint among object names under checkpoints/, newest last. Pure."""
    return sorted({int(m[1]) for n in names if (m := STEP_DIR.fullmatch(n))})


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
         settings: storage.S3Settings, keep: int, env: dist.DistEnv) -> None:
    """Every rank writes its shard and its loop state; the node's files are uploaded; rank 0 writes
    the marker last and drops checkpoints beyond `keep`. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = local_root / f"step-{step}" / STATE
    if env.local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(modules, opt, options=_options(strict=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    buf = io.BytesIO()  # torch.save's file writer reports a full disk without the errno ("unexpected pos")
    torch.save(loop_state, buf)
    try:
        (folder / f"rank-{env.rank}.pt").write_bytes(buf.getvalue())
        err = None
    except OSError as e:  # one rank's disk: the others stop with its reason instead of waiting at a barrier
        err = disk.no_room(e, "writing the checkpoint", path=folder / f"rank-{env.rank}.pt") or e
    dist.fail_together(err, "writing the checkpoint's loop state")
    remote = f"{output_uri.rstrip('/')}/checkpoints/step-{step}/{STATE}"
    err = None
    if env.local_rank == 0:
        try:
            for f in sorted(p for p in folder.iterdir() if p.is_file()):
                storage.upload(f, f"{remote}/{f.name}", settings)
        except storage.StorageError as e:
            err = e  # transient (the run is retried and resumes from the previous checkpoint) or bad input
        except OSError as e:
            err = storage.StorageError(str(e))
    dist.fail_together(err, "uploading the checkpoint")
    if env.is_main:
        try:
            marker = folder / MARKER
            marker.write_text(f"{step}\n")
            storage.upload(marker, f"{remote}/{MARKER}", settings)
            print(f"[checkpoint] step {step} written to {remote}", flush=True)
            prune(output_uri, settings, keep)
        except storage.StorageError as e:
            err = e
        except OSError as e:
            err = storage.StorageError(str(e))
    dist.fail_together(err, "writing the checkpoint")


def prune(output_uri: str, settings: storage.S3Settings, keep: int) -> None:
    base = f"{output_uri.rstrip('/')}/checkpoints"
    for old in complete_steps(storage.list_keys(base, settings))[:-keep]:
        storage.delete_prefix(f"{base}/step-{old}/{STATE}", settings)


def restore(step: int, modules: torch.nn.Module, opt, local_root: Path, output_uri: str,
            settings: storage.S3Settings, env: dist.DistEnv) -> Optional[dict]:
    """Load the adapters and optimizer of `step` into modules/opt (a collective) and return this
    rank's loop state (None when the run had another number of ranks: the sampler restarts)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = local_root / f"step-{step}" / STATE
    remote = f"{output_uri.rstrip('/')}/checkpoints/step-{step}/{STATE}"
    err = None
    if env.local_rank == 0:
        try:
            if storage.parse_uri(remote).is_s3:
                storage.download(remote, folder, settings, log=lambda m: None)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(storage.parse_uri(remote).key, folder)
        except storage.StorageError as e:
            err = e
        except OSError as e:
            err = storage.StorageError(str(e))
    dist.fail_together(err, "fetching the checkpoint")
    model_sd, optim_sd = get_state_dict(modules, opt, options=_options(strict=True))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(modules, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))
    mine = folder / f"rank-{env.rank}.pt"
    loop = torch.load(mine, weights_only=True) if mine.is_file() else None
    if loop is not None and loop.get("world") != env.world:
        loop = None
    return loop
