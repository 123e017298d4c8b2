"""Projected multi-node step efficiency from a measured one-GPU step: what the step would cost on
`nodes` x `gpus_per_node` GPUs with a given network, from the bytes each GPU must send. Pure.

The model (NCCL's bus-bandwidth rule): an all-reduce of S bytes over N GPUs moves 2(N-1)/N * S
through each GPU's link, an all-gather or a reduce-scatter (N-1)/N * S; a link carries
`gbit_per_gpu` x `link_efficiency` (NCCL reaches ~80% of line rate on large messages). Every GPU is
assumed to have its own NIC (the usual 8 x 400 Gb/s H100 node), and the intra-node NVLink hops are
counted at the same rate, which overstates their cost: the projection is conservative.

- replicate (dist.GradSync): only the trainable gradients travel, in one flattened all-reduce after
  the last micro-batch of an optimizer step; nothing overlaps it, so it adds to the step.
- shard (FSDP2): every step all-gathers the weights for the forward and again for the backward
  (resharded after forward) and reduce-scatters the gradients; FSDP2 prefetches, so the transfer
  overlaps compute at best (efficiency_overlapped) and adds to it at worst (efficiency_serial).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Projection:
    world: int
    bytes_per_gpu: float        # sent through each GPU's link per optimizer step
    comm_s: float
    efficiency_serial: float    # compute / (compute + comm)
    efficiency_overlapped: float  # compute / max(compute, comm)

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def link_bytes_per_s(gbit_per_gpu: float, link_efficiency: float = 0.8) -> float:
    return gbit_per_gpu * 1e9 / 8 * link_efficiency


def project(step_s: float, grad_bytes: float, weight_bytes: float, sharding: str, *, nodes: int = 2,
            gpus_per_node: int = 8, gbit_per_gpu: float = 400.0, link_efficiency: float = 0.8,
            micro_steps: int = 1) -> Projection:
    """step_s: one micro-batch's compute time on one GPU (measured); grad_bytes: the trainable
    gradients' bytes (fp32 for LoRA); weight_bytes: the weights FSDP2 would gather (shard only);
    micro_steps: micro-batches per optimizer step (gradient accumulation; the all-reduce happens once)."""
    if sharding not in ("replicate", "shard"):
        raise ValueError("sharding must be 'replicate' or 'shard'")
    n = nodes * gpus_per_node
    compute = step_s * micro_steps
    if n == 1:
        return Projection(1, 0.0, 0.0, 1.0, 1.0)
    share = (n - 1) / n
    if sharding == "replicate":
        sent = 2 * share * grad_bytes
    else:
        sent = share * (2 * weight_bytes * micro_steps + grad_bytes)
    comm = sent / link_bytes_per_s(gbit_per_gpu, link_efficiency)
    overlapped = compute / (compute + comm) if sharding == "replicate" else compute / max(compute, comm)
    return Projection(n, sent, comm, compute / (compute + comm), overlapped)
