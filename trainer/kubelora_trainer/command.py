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


# what only a cluster applies: these sections' fields, but for those a workstation applies too.
# resources.cacheSize too: it sizes a pod's fresh emptyDir, and the limit counts everything in the
# cache folder, which on a workstation (or a shared home under slurm) holds every earlier run's files
CLUSTER_ONLY = {"runPolicy": (), "resources": ("nodes", "gpusPerNode"), "storage": None}


def cluster_only_settings(spec, applied: tuple[str, ...] = ()) -> list[str]:
    """The settings a manifest sets (not left at their defaults) that only the operator's pods
    apply, less `applied` (what the caller applies its own way): runPolicy (suspend, deadlines,
    retries), the pods' resources (image, requests, tolerations, cacheSize, ...) and
    storage.credentialsSecret (here the environment's credentials are used). Pure."""
    out = []
    for section, kept in CLUSTER_ONLY.items():
        value = getattr(spec, section)
        default = type(value)()
        fields = ["credentialsSecret"] if kept is None else [f for f in type(value).model_fields if f not in kept]
        out += [f"{section}.{f}" for f in fields
                if getattr(value, f) != getattr(default, f) and f"{section}.{f}" not in applied]
    return out


def cluster_only_note(spec, applied: tuple[str, ...] = (), where: str = "this machine") -> str | None:
    """One line naming cluster_only_settings, or None. Pure."""
    names = cluster_only_settings(spec, applied)
    if not names:
        return None
    return (f"[kubelora] note: {', '.join(names)} {'is' if len(names) == 1 else 'are'} for a cluster and not applied "
            f"on {where} (the operator's pods apply them)")
