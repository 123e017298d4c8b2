"""Process group and FSDP2: the parallelism shared by every family (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .exits import FAILED, code_of


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


class TooFewDevices(RuntimeError):
    """More processes on this node than GPUs its processes can see."""

    def __init__(self, local_rank: int, count: int):
        super().__init__(f"process {local_rank} of this node has no GPU of its own: CUDA shows {count} device(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) and "
                         f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes were started")
        self.local_rank, self.count = local_rank, count


def init() -> DistEnv:
    """Join the torchrun group (or make a group of one when started without torchrun). Raises
    TooFewDevices when this process's local rank has no GPU (CUDA's 'invalid device ordinal')."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and os.environ.get("KUBELORA_FORCE_CPU") != "1":
        if local_rank >= torch.cuda.device_count():
            raise TooFewDevices(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "cuda:nccl,cpu:gloo"
        # cuDNN's attention off until training.attentionBackend decides (attention.py): the eager
        # forwards before that (the memory probe) run the flash kernel
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


def choose_sharding(requested: str, world: int, weight_bytes: int, device_memory: int | None,
                    offload: bool = False) -> str:
    """How ranks hold the model: 'none' (one rank), 'replicate' (a full copy on every rank; only
    the adapters' gradients travel, one all-reduce per optimizer step) or 'shard' (FSDP2: every
    weight split across ranks and gathered block by block in each forward and backward). auto
    replicates when the weights take at most half of one device's memory (always on CPU). With
    offload (training.cpuOffload) always 'shard': FSDP2 holds the weights in CPU memory, one
    process included. Pure."""
    if offload:
        return "shard"
    if world == 1:
        return "none"
    if requested != "auto":
        return requested
    if device_memory is None:
        return "replicate"
    return "replicate" if weight_bytes <= device_memory // 2 else "shard"


def sharding_note(requested: str, world: int, offload: bool = False) -> str | None:
    """The note when training.sharding asks for shard or replicate and one process runs (then
    nothing is split or copied: choose_sharding gives 'none'). Pure."""
    if world != 1 or offload or requested == "auto":
        return None
    return (f"[model] note: training.sharding {requested} applies to several processes; this run has one, which "
            "holds the whole model")


class GradSync:
    """Gradient exchange for one optimizer step of several micro-batches. Sharded: FSDP2
    reduce-scatters only on the last micro-batch's backward. Replicated: after the last backward,
    one all-reduce of every trainable gradient (flattened, averaged)."""

    def __init__(self, sharding: str, modules: list[torch.nn.Module], params: list[torch.nn.Parameter]):
        self.sharding, self.modules, self.params = sharding, modules, params

    def before_backward(self, last: bool) -> None:
        if self.sharding == "shard":
            for m in self.modules:
                m.set_requires_gradient_sync(last)

    def after_backward(self) -> None:
        if self.sharding != "replicate" or not self.params:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        missing = [p.grad is None for p in self.params]
        grads = [torch.zeros_like(p) if gone else p.grad for p, gone in zip(self.params, missing)]
        # which ranks had each gradient rides in the same all-reduce: a parameter no rank reached
        # keeps grad None, as with one process or FSDP2, so AdamW leaves it alone (a zero gradient
        # would still decay it). Only a rank that lacks one reads the counts back (a host sync):
        # where every gradient is here, every parameter was reached.
        if any(missing):
            reached = torch.tensor([0.0 if gone else 1.0 for gone in missing], dtype=grads[0].dtype,
                                   device=grads[0].device)
        else:  # made on the device, not copied from the host (a copy from pageable memory waits for the GPU)
            reached = torch.ones(len(grads), dtype=grads[0].dtype, device=grads[0].device)
        flat = _flatten_dense_tensors([*grads, reached])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        *averaged, reached = _unflatten_dense_tensors(flat, [*grads, reached])
        keep = (reached > 0).tolist() if any(missing) else [True] * len(grads)
        for p, g, k in zip(self.params, averaged, keep):
            p.grad = g if k else None


def parallelize(model: torch.nn.Module, block_lists: list[torch.nn.ModuleList], *, sharding: str,
                compute_dtype: torch.dtype, recompute: set[tuple[int, int]] = frozenset(),
                compile_blocks: bool = False, offload: bool = False, device_type: str | None = None):
    """Shared parallelism for every family, in torchtitan's order: activation checkpointing
    (wrapping the blocks named in recompute as (list index, block index): adapters.layout chooses
    them, so recomputation sees the inputs FSDP already cast), regional compile,
    then, when sharding is 'shard', FSDP2 with one group per block plus the root (the last block,
    which the backward needs first, not resharded after the forward; with offload, its
    CPUOffloadPolicy: the sharded weights, gradients and optimizer state stay in CPU memory and each
    block's weights are copied to the device for its forward and backward; fully_shard moves one
    block at a time to the device and back, so the model is never whole on the device). A replicated or
    single process skips FSDP (it would only copy every weight twice per step); GradSync
    exchanges the gradients instead.

    Precision is the same with one process and with many: forward passes run under autocast to
    compute_dtype, and FSDP2 gathers every parameter in the dtype it is stored in (the frozen base
    in model.dtype, the LoRA in fp32) without touching the blocks' inputs. FSDP2's own
    param_dtype/cast_forward_inputs would instead cast timesteps, RoPE tables and modulation
    inputs to bf16 at every block boundary, so 2 ranks would train another numeric model than 1.
    Gradients reduce in fp32. Returns the context to run forward passes in."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if compile_blocks:
        # dynamo's recompile_limit (8) counts the compiled variants of one function, and with
        # checkpointing every block of every kind is one function (CheckpointWrapper.forward).
        # HunyuanVideo alone needs 8: per block kind, the first block (inputs without grad, or a
        # strided slice) and the others, each static and then dynamic once the caption length
        # varies (the family trims text padding per batch). Past the limit blocks fall back to
        # eager, slowly and only with a warning.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for j, blocks in enumerate(block_lists):
        for i, block in enumerate(blocks):
            # fp8 GEMMs: checkpoint around the compiled block, not compile around the checkpoint.
            # Compiled around, inductor's partitioner saved the bf16 inputs of the fp8 linears
            # anyway on CUDA (HunyuanVideo: 27 GiB kept for the backward instead of 3.4; a toy
            # block 5x; bench/gpu/fp8_ckpt.py, decisions.md 47); CPU does not show it.
            inside = compile_blocks and compile_inside_checkpoint(block)
            if inside:
                block.compile()
            if (j, i) in recompute:
                block = checkpoint_wrapper(block)
            if compile_blocks and not inside:
                block.compile()
            blocks[i] = block
    if sharding == "shard" or os.environ.get("KUBELORA_FSDP_SINGLE") == "1":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
        off = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
        last = block_lists[-1][-1] if block_lists and len(block_lists[-1]) else None
        for blocks in block_lists:
            for block in blocks:
                # the block that runs last in the forward is the first the backward needs: kept
                # gathered instead of resharded and gathered again at once (as torchtitan does)
                fully_shard(block, mp_policy=mp, offload_policy=off, reshard_after_forward=block is not last)
        fully_shard(model, mp_policy=mp, offload_policy=off)
    device_type = device_type or next(model.parameters()).device.type  # offloaded weights sit on the CPU
    return compute_context(device_type, compute_dtype)


def compile_inside_checkpoint(block: torch.nn.Module) -> bool:
    """Whether a block is compiled inside its checkpoint wrapper: when it runs fp8 GEMMs."""
    from .fp8 import Float8Linear

    return any(isinstance(m, Float8Linear) and m.compute != "dequant" for m in block.modules())


def compute_context(device_type: str, compute_dtype: torch.dtype):
    """The context forward passes run in: autocast to compute_dtype (none for fp32)."""
    import contextlib

    if compute_dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=compute_dtype)


class PeerFailed(RuntimeError):
    """Another rank failed; its reason is in the message (and in its own log). code: the exit code
    this rank records (marked as a peer's), by default FAILED; fail_together passes the failing
    rank's own, so every pod of a multi-node run exits alike (bad input fails the Job whichever pod
    the Job controller sees first; a transient fault is retried)."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code


def agree(fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank, then one collective: if fn raised on any rank, the
    failing rank re-raises its own error and every other rank raises PeerFailed with that rank's
    reason and exit code (as fail_together), so no rank waits for a peer that has stopped. fn must not itself run collectives.
    One process (or none started): fn's own answer or error."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    error = None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the peers have been told
        error = e
    phase_barrier(getattr(fn, "__name__", "a phase"))
    reasons = all_gather(None if error is None else (f"{type(error).__name__}: {error}", code_of(error)))
    if error is not None:
        raise error
    failed = [(r, f) for r, f in enumerate(reasons) if f]
    if failed:
        rank, (why, code) = failed[0]
        raise PeerFailed(f"rank {rank} failed: {why}", code)
    return result


TIMEOUT_ENV = "KUBELORA_DIST_TIMEOUT_MINUTES"
PHASE_TIMEOUT_ENV = "KUBELORA_PHASE_TIMEOUT_MINUTES"
_phases = [0]


def phase_barrier(what: str) -> None:
    """Every rank reaches the end of a long phase: counted on the rendezvous store (no collective,
    so the collectives' short timeout does not apply), waiting for the slowest rank, e.g. one node
    still downloading the dataset, for as long as it gets on: the wait ends in an error once no
    rank has said it is getting on (heartbeat) for $KUBELORA_PHASE_TIMEOUT_MINUTES (120)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    _phases[0] += 1
    key = f"kubelora/phase/{_phases[0]}"
    store = dist.distributed_c10d._get_default_store()
    store.add(key, 1)
    minutes = float(os.environ.get(PHASE_TIMEOUT_ENV, "120"))
    beats, deadline, looked = -1, 0.0, 0.0
    while store.add(key, 0) < dist.get_world_size():
        now = time.monotonic()
        if now - looked >= min(5.0, 15 * minutes):  # a quarter of the timeout when that is shorter
            looked = now
            if (latest := store.add(f"{key}/alive", 0)) != beats:
                beats, deadline = latest, now + 60 * minutes
        if now > deadline:
            raise RuntimeError(f"not every rank finished {what}: for {minutes:g} minutes (${PHASE_TIMEOUT_ENV}) none "
                               f"of those still in it finished or said it was getting on")
        time.sleep(0.1)


HEARTBEAT_SECONDS = 10.0
_beat = [float("-inf")]


def heartbeat() -> None:
    """A rank working alone on a long phase (stage-in: local rank 0 fetches the node's data while
    its peers wait) says it is getting on: the waiting ranks' phase_barrier counts its timeout
    from the newest heartbeat. At most once every HEARTBEAT_SECONDS; nothing without peers."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    now = time.monotonic()
    if now - _beat[0] < HEARTBEAT_SECONDS:
        return
    _beat[0] = now
    dist.distributed_c10d._get_default_store().add(f"kubelora/phase/{_phases[0] + 1}/alive", 1)


def fail_together(error: BaseException | None, what: str = "a phase") -> None:
    """The end of a phase that some ranks ran alone (stage-in, pre-flight, uploads): if any rank
    failed, every rank stops. The failing rank re-raises its own error; every other rank raises
    PeerFailed with the first failing rank's reason and exit code (exits.code_of: bad input, or a
    transient storage fault). Waits for every rank first (phase_barrier)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    phase_barrier(what)
    failures = all_gather(None if error is None else (str(error), code_of(error)))
    if error is not None:
        raise error
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if failed:
        rank, (why, code) = failed[0]
        raise PeerFailed(f"rank {rank} failed: {why}", code)


def broadcast(obj, src: int = 0, group=None):
    """obj from global rank src to every rank of group (the world by default)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def subgroup(ranks: list[int]):
    """A process group of these global ranks. Every rank calls it, members or not, in the same order."""
    return dist.new_group(ranks=ranks)


def log(env: DistEnv | None, msg: str) -> None:
    """Print on the main rank (on every one without an env)."""
    if env is None or env.is_main:
        print(msg, flush=True)


def all_gather(obj, group=None) -> list:
    """Every rank's obj, in rank order, on every rank of group (the world by default)."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier() -> None:
    dist.barrier()


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def caught(fn, sharded: bool, what: str) -> Exception | None:
    """Run fn (forwards with no collective of their own: samples, the evaluation) and return its
    error, as `what: Type: message`, for the ranks to agree on (fail_together) so none waits for a
    failed one; with the weights sharded the error is raised instead, ending the run: a rank that
    left would leave its peers in a weight all-gather."""
    if sharded:
        fn()
        return None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - agreed on by the caller
        if type(e).__name__ == "OutOfMemoryError":  # keeps its type: bad input (a retry runs out again)
            return type(e)(f"{what}: {e}")
        return RuntimeError(f"{what}: {type(e).__name__}: {e}")
    return None


def weights_sharded(world: int, adapters) -> bool:
    """Whether each forward gathers weights from peers (FSDP2 over several ranks: the layout's
    sharding, which the adapters' gradient exchange holds), so a rank must not leave a forward
    that its peers run. Pure."""
    return world > 1 and getattr(getattr(adapters, "sync", None), "sharding", None) == "shard"
