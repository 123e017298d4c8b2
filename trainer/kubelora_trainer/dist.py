"""Process group and FSDP2: the parallelism shared by every family (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> DistEnv:
    """Join the torchrun group (or make a group of one when started without torchrun)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and os.environ.get("KUBELORA_FORCE_CPU") != "1":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "cuda:nccl,cpu:gloo"
        # torch 2.11 + H100: the cuDNN attention backward hit an illegal memory access on the
        # eager Flux step; without it the compiled step is as fast (docs/benchmarks.md).
        if os.environ.get("KUBELORA_CUDNN_SDPA") != "1":
            torch.backends.cuda.enable_cudnn_sdp(False)
    else:
        device, backend = torch.device("cpu"), "gloo"
    # Collectives time out after this, so a hung or vanished peer is noticed in minutes. The long
    # phases between collectives (stage-in, model load, latent cache, uploads) end in phase_barrier
    # instead, which waits on the rendezvous store with KUBELORA_PHASE_TIMEOUT_MINUTES.
    timeout = timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "15")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def parallelize(model: torch.nn.Module, block_lists: list[torch.nn.ModuleList], *, world: int,
                compute_dtype: torch.dtype, checkpointing: bool = False, compile_blocks: bool = False):
    """Shared parallelism for every family, in torchtitan's order: activation checkpointing
    (wrapping each block, so recomputation sees the inputs FSDP already cast), regional compile,
    then FSDP2 with one group per block plus the root. A single process skips FSDP (it would only
    copy every weight twice per step).

    Precision is the same with one process and with many: forward passes run under autocast to
    compute_dtype, and FSDP2 gathers every parameter in the dtype it is stored in (the frozen base
    in model.dtype, the LoRA in fp32) without touching the blocks' inputs. FSDP2's own
    param_dtype/cast_forward_inputs would instead cast timesteps, RoPE tables and modulation
    inputs to bf16 at every block boundary, so 2 ranks would train another numeric model than 1.
    Gradients reduce in fp32. Returns the context to run forward passes in."""
    import contextlib

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if compile_blocks:
        # dynamo's recompile_limit (8) counts the compiled variants of one function, and with
        # checkpointing every block of every kind is one function (CheckpointWrapper.forward).
        # HunyuanVideo alone needs 8: per block kind, the first block (inputs without grad, or a
        # strided slice) and the others, each static and then dynamic once the caption length
        # varies (the family trims text padding per batch). Past the limit blocks fall back to
        # eager, slowly and only with a warning.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for blocks in block_lists:
        for i, block in enumerate(blocks):
            if checkpointing:
                block = checkpoint_wrapper(block)
            if compile_blocks:
                block.compile()
            blocks[i] = block
    if world > 1 or os.environ.get("KUBELORA_FSDP_SINGLE") == "1":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
        for blocks in block_lists:
            for block in blocks:
                fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    device_type = next(model.parameters()).device.type
    if compute_dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=compute_dtype)


class PeerFailed(RuntimeError):
    """Another rank failed; its reason is in the message (and in its own log)."""


def agree(fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank, then one collective: if fn raised on any rank, the
    failing rank re-raises its own error and every other rank raises PeerFailed with that rank's
    reason, so no rank waits for a peer that has stopped. fn must not itself run collectives."""
    error = None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the peers have been told
        error = e
    phase_barrier(getattr(fn, "__name__", "a phase"))
    reasons = all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, why) for r, why in enumerate(reasons) if why]
    if failed:
        raise PeerFailed(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return result


TIMEOUT_ENV = "KUBELORA_DIST_TIMEOUT_MINUTES"
PHASE_TIMEOUT_ENV = "KUBELORA_PHASE_TIMEOUT_MINUTES"
_phases = [0]


def phase_barrier(what: str) -> None:
    """Every rank reaches the end of a long phase: counted on the rendezvous store (no collective,
    so the collectives' short timeout does not apply), waiting up to $KUBELORA_PHASE_TIMEOUT_MINUTES
    (120) for the slowest rank, e.g. one node still downloading the model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    _phases[0] += 1
    key = f"kubelora/phase/{_phases[0]}"
    store = dist.distributed_c10d._get_default_store()
    store.add(key, 1)
    deadline = time.monotonic() + 60 * float(os.environ.get(PHASE_TIMEOUT_ENV, "120"))
    while store.add(key, 0) < dist.get_world_size():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every rank finished {what} within ${PHASE_TIMEOUT_ENV} minutes")
        time.sleep(0.1)


def all_ok(ok: bool) -> bool:
    """True only if every rank says ok (so all ranks fail together instead of hanging). Called at
    the end of a phase: waits for every rank there first (phase_barrier)."""
    phase_barrier("a phase")
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist.barrier()


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
