"""training.gradientCheckpointing left unset: which blocks to recompute, chosen per run from what
this model's forward really keeps for backward at this run's largest micro-batch, and from the
memory of this GPU.

measure() runs one forward of the largest micro-batch before checkpointing and FSDP2 are applied
and counts, block by block, the tensors autograd saves for backward, without keeping them (the
forward is never backpropagated): nothing is estimated from a formula, so it holds for every
family, attention kernel and adapter alike. Tensors are told apart by their storage, so views
count once; the parameters themselves are not counted (they are in memory anyway).

plan() is pure: the device holds the static part (weights, trainable weights with their gradients
and AdamW moments, as the sharding leaves them on one rank), what is saved outside the blocks, the
inputs of every recomputed block, everything every other block saves, and a working margin of two
of the largest blocks' saves (one block recomputed and its gradients in backward). Compiled blocks
save less than the eager forward measure() runs: compiled() scales their saves by a share measured on
GPUs (COMPILED_SAVES). Blocks are left
un-recomputed cheapest first (the least memory for the same recompute saved) while the predicted
peak stays within the budget; one that would not fit stops the walk.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch

GiB = 2 ** 30
BUDGET_ENV = "KUBELORA_MEMORY_BUDGET_GIB"
# What a compiled block saves for backward, as a share of what its eager forward saves (what
# measure() counts): inductor's partitioner recomputes cheap pointwise results in backward instead of
# saving them. Measured on an H100 (docs/benchmarks.md, sixth run; decisions.md 61): Flux 0.80-0.85,
# HunyuanVideo 0.71-0.72 of the eager saves; the largest share with some to spare, so that no measured
# case is predicted below what it used.
COMPILED_SAVES = 0.88


@dataclass(frozen=True)
class BlockCost:
    name: str
    keep: int    # bytes a recomputed block holds until its backward: its own tensor inputs
    saved: int   # bytes the block holds when not recomputed: everything its forward saves


@dataclass(frozen=True)
class Profile:
    blocks: tuple[BlockCost, ...]
    fixed: int   # saved outside the blocks, and inputs every block shares (timestep embedding, RoPE)

    def activations(self, recomputed: set[str]) -> int:
        return self.fixed + sum(b.keep if b.name in recomputed else b.saved for b in self.blocks)


@dataclass(frozen=True)
class Plan:
    recomputed: frozenset[str]
    peak: int     # predicted bytes at the peak
    budget: int
    fits: bool


def compiled(profile: Profile, share: float = COMPILED_SAVES) -> Profile:
    """The profile of the same blocks under torch.compile: each block's saves scaled by share (never
    below the inputs it keeps when recomputed, which compile does not change), what is saved outside
    the blocks as measured. Pure."""
    return Profile(tuple(BlockCost(b.name, b.keep, max(b.keep, int(b.saved * share))) for b in profile.blocks),
                   profile.fixed)


def budget_bytes(total: Optional[int], requested_gib: Optional[float] = None) -> Optional[int]:
    """What a plan may use of a device with `total` bytes: 92% less 1 GiB (the CUDA context, cuBLAS
    workspaces and the allocator's fragmentation live in the rest). training.memoryBudgetGiB
    (requested_gib) lowers it, never raises it; $KUBELORA_MEMORY_BUDGET_GIB sets it outright (tests
    on the CPU). None: no limit known (a CPU, nothing requested)."""
    forced = os.environ.get(BUDGET_ENV)
    if forced:
        return int(float(forced) * GiB)
    usable = None if total is None else int(total * 0.92) - GiB
    if requested_gib is None:
        return usable
    asked = int(requested_gib * GiB)
    return asked if usable is None else min(asked, usable)


def budget_warning(requested_gib: Optional[float], budget: Optional[int], forced: bool = False) -> Optional[str]:
    """The warning when budget_bytes lowered training.memoryBudgetGiB to what the GPU leaves, or when
    $KUBELORA_MEMORY_BUDGET_GIB replaced it outright; None otherwise. Pure."""
    if requested_gib is not None and budget is not None and forced:
        return (f"[memory] warning: ${BUDGET_ENV} ({budget / GiB:g} GiB) replaces training.memoryBudgetGiB "
                f"{requested_gib:g}")
    if requested_gib is None or budget is None or budget >= int(requested_gib * GiB):
        return None
    return (f"[memory] warning: training.memoryBudgetGiB {requested_gib:g} is more than this GPU leaves for "
            f"training ({budget / GiB:.2f} GiB: 92% of its memory less 1 GiB); planning for that")


def static_bytes(*, frozen: int, trainable: int, sharding: str, world: int, largest_block: int,
                 offload: bool = False) -> int:
    """One rank's weights and optimizer state. Trainable weights are fp32, each with an fp32
    gradient and two AdamW moments (3x their bytes again); a replicated rank also flattens its
    gradients for the all-reduce. Sharded, each rank holds 1/world of all of it plus two blocks
    gathered whole (the one running and the one prefetched); offloaded, only those two blocks."""
    state = trainable * 4
    if offload:
        return 2 * largest_block
    if sharding == "shard":
        return (frozen + state) // world + 2 * largest_block
    return frozen + state + (trainable if sharding == "replicate" else 0)


def plan(profile: Profile, static: int, budget: int) -> Plan:
    """The fewest blocks to recompute so that the predicted peak fits the budget (all of them when
    even that does not fit: fits is then False). Pure."""
    blocks = profile.blocks
    margin = 2 * max((b.saved for b in blocks), default=0)
    recomputed = {b.name for b in blocks}
    peak = static + margin + profile.activations(recomputed)
    for b in sorted(blocks, key=lambda b: b.saved - b.keep):
        extra = b.saved - b.keep
        if peak + extra > budget:
            break
        peak += extra
        recomputed.discard(b.name)
    return Plan(frozenset(recomputed), peak, budget, peak <= budget)


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return s.data_ptr(), str(t.device), s.nbytes()


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def measure(forward: Callable[[], object], blocks: dict[str, torch.nn.Module],
            params: list[torch.Tensor]) -> Profile:
    """Run forward() once (with gradients on) and count what it saves for backward, by block.
    blocks: name -> module, the units checkpointing may wrap. Tensors saved inside a block are held
    only until the block returns, and the blocks' inputs to the end (to tell storages apart by
    address), so the forward needs no more than one block's activations beyond what a fully
    checkpointed step keeps."""
    param_keys = {_storage_key(p)[:2] for p in params}
    names = {id(m): n for n, m in blocks.items()}
    outside: dict[tuple, torch.Tensor] = {}
    inputs_of: dict[str, dict[tuple, int]] = {}
    internal: dict[str, set] = {}
    carried: dict[str, set] = {}
    saved_inputs: dict[str, set] = {}
    cur: dict = {"name": None, "saved": {}, "inputs": {}}
    held: list = []

    def pack(t: torch.Tensor):
        k = _storage_key(t)
        if k[:2] not in param_keys:
            (outside if cur["name"] is None else cur["saved"]).setdefault(k, t)
        return None  # counted, not kept: this forward is never backpropagated

    def unpack(_):
        raise RuntimeError("memory_plan.measure's forward is not meant to be backpropagated")

    def pre(module, args, kwargs):
        tensors = _tensors((args, kwargs))
        # every block's inputs stay alive to the end (as a fully checkpointed step keeps them), so
        # no later tensor takes their address and passes for an input shared between blocks
        held.append(tensors)
        cur.update(name=names[id(module)], saved={}, inputs={_storage_key(t): _storage_key(t)[2] for t in tensors})

    def post(module, args, kwargs, out):
        name, saved, ins = cur["name"], cur["saved"], cur["inputs"]
        inputs_of[name] = ins
        # what the block returns outlives it: if a later block saves it too, it is counted there
        outs = {_storage_key(t) for t in _tensors(out)}
        internal[name] = {k for k in saved if k not in ins}
        carried[name] = internal[name] & outs
        saved_inputs[name] = {k for k in saved if k in ins}
        cur.update(name=None, saved={}, inputs={})

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in blocks.values()]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in blocks.values()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), torch.enable_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    uses = Counter(k for ins in inputs_of.values() for k in ins)
    shared = {k for k, n in uses.items() if n > 1}  # the same tensor handed to several blocks
    later = {k for ks in saved_inputs.values() for k in ks}
    costs = []
    for name in blocks:
        if name not in inputs_of:
            continue  # not run for this batch
        own = {k: n for k, n in inputs_of[name].items() if k not in shared}
        mine = (internal[name] - (carried[name] & later)) | (saved_inputs[name] - shared)
        costs.append(BlockCost(name, keep=sum(own.values()), saved=sum(k[2] for k in mine)))
    fixed = sum(k[2] for k in outside) + sum(k[2] for k in shared if k not in outside)
    return Profile(tuple(costs), fixed)


def describe(p: Plan, profile: Profile, static: int, compiled_blocks: bool = False) -> str:
    n = len(profile.blocks)
    none = profile.activations(set())
    what = ("no block recomputed" if not p.recomputed else
            "every block recomputed" if len(p.recomputed) == n else f"{len(p.recomputed)} of {n} blocks recomputed")
    how = f" (compiled blocks: {COMPILED_SAVES:.0%} of the eager saves)" if compiled_blocks else ""
    return (f"the forward keeps {none / GiB:.2f} GiB for backward at the largest micro-batch{how}, with "
            f"{static / GiB:.2f} GiB of weights and optimizer state; budget {p.budget / GiB:.2f} GiB: {what} "
            f"(predicted peak {p.peak / GiB:.2f} GiB)")
