"""The one command that starts a training node, shared by the operator's pods
(kubelora_operator.manifests.trainer_command) and the torchx component (torchx_components.py):

    python -m kubelora_trainer launch --nnodes=N --nproc-per-node=P --node-rank=R \
        --master-addr=HOST --master-port=PORT --rdzv-conf=timeout=1800 -m kubelora_trainer run --spec SPEC

i.e. torchrun with static rendezvous (the store on node 0), through kubelora's launcher (which
exits 2 when a worker found bad input and forwards signals). The rendezvous waits
RENDEZVOUS_TIMEOUT_SECONDS for every node (torch's static rendezvous takes `timeout` from
--rdzv-conf; its own default is 600 s): node 0 waits that long for the others to join its store,
the others that long for node 0's store to answer; a gang whose last pod waits for a GPU node
(an autoscaler adding one, a long image pull) starts when it comes, and one that never comes ends
with the launcher's one line naming how many nodes were missing (launch.rendezvous_timeout). Each caller fills the values its way:
Kubernetes `$(PET_*)` env references in a pod, torchx macros and shell variables under torchx.
Pure, no torch.
"""
from __future__ import annotations

LAUNCHER = ("python", "-m", "kubelora_trainer", "launch")
RENDEZVOUS_TIMEOUT_SECONDS = 1800


def launcher_args(nnodes: object, nproc_per_node: object, node_rank: object, master_addr: object,
                  master_port: object, spec: str, rendezvous_timeout: int = RENDEZVOUS_TIMEOUT_SECONDS) -> list[str]:
    """The launcher's arguments (torchrun's, then the trainer module and the spec path)."""
    return [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", f"--node-rank={node_rank}",
            f"--master-addr={master_addr}", f"--master-port={master_port}",
            f"--rdzv-conf=timeout={int(rendezvous_timeout)}",
            "-m", "kubelora_trainer", "run", "--spec", spec]


def node_command(nnodes: object, nproc_per_node: object, node_rank: object, master_addr: object,
                 master_port: object, spec: str) -> list[str]:
    """The whole argv of one training node."""
    return [*LAUNCHER, *launcher_args(nnodes, nproc_per_node, node_rank, master_addr, master_port, spec)]
