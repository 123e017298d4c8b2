"""Process group and FSDP2: the parallelism shared by every family (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os
import socket
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
    else:
        device, backend = torch.device("cpu"), "gloo"
    # Stage-in of a large model happens between the first collectives: allow for it.
    timeout = timedelta(minutes=float(os.environ.get("KUBELORA_DIST_TIMEOUT_MINUTES", "60")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shard(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    """FSDP2: one group per block, then the root (embeddings, norms, the rest)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def all_ok(ok: bool) -> bool:
    """True only if every rank says ok (so all ranks fail together instead of hanging)."""
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
