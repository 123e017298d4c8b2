"""torchx component: launch a LoRATrainingJob manifest with `torchx run` on any torchx scheduler
(local_cwd on a workstation, slurm, kubernetes/Volcano, ...). Each node runs the same command as
the operator's pods (kubelora_trainer.command.node_command): kubelora's launcher around torchrun
with static rendezvous on node 0.

    torchx run -s local_cwd kubelora.train --manifest job.yaml            (entry point, installed)
    torchx run -s slurm kubelora.train --manifest job.yaml --nnodes 2
    torchx run -s kubernetes --workspace "" kubelora.train --manifest job.yaml --image ...   (docs/torchx.md)

Needs the `torchx` extra (pip install 'kubelora[torchx]'); the operator image does not carry it.
"""
import shlex
import sys
from typing import Dict, List, Optional

import torchx.specs as specs

# absolute imports: torchx also loads this file by path (`torchx run path/to/torchx_components.py:train`)
from kubelora_trainer.command import cluster_only_note, node_command
from kubelora_trainer.spec import load_spec, manifest_name

DEFAULT_IMAGE = "ghcr.io/kubelora/trainer:0.1.0"
DEFAULT_PORT = 29500


def shell_command(argv: List[str], raw: tuple = ()) -> str:
    """argv as one shell line, every word quoted except those in `raw` (which hold shell or torchx
    expansions the shell must see). Pure."""
    return " ".join(a if a in raw else shlex.quote(a) for a in argv)


def train(
    manifest: str,
    nnodes: int = 0,
    nproc_per_node: int = 0,
    image: Optional[str] = None,
    cpu: int = 8,
    gpu: int = -1,
    memMB: int = 65536,
    master_port: int = DEFAULT_PORT,
    container_manifest: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = -1,
) -> specs.AppDef:
    """Train the LoRA a kubelora manifest describes, one torchrun node per replica.

    Args:
        manifest: LoRATrainingJob manifest (or bare spec); validated here, before anything is launched
        nnodes: nodes (replicas); 0: the manifest's resources.nodes
        nproc_per_node: training processes per node; 0: resources.gpusPerNode (1 when that is 0: CPU)
        image: trainer image for container schedulers (ignored by local_cwd); default: resources.image, else DEFAULT_IMAGE
        cpu: CPUs per node
        gpu: GPUs per node; -1: resources.gpusPerNode
        memMB: memory per node in MB
        master_port: port of the rendezvous store on node 0
        container_manifest: the manifest's path where the nodes run (in the image or a mount); default: manifest
        env: extra environment, e.g. AWS_ENDPOINT_URL=http://minio:9000 (credentials: the scheduler's own secrets)
        mounts: mounts as torchx parses them (type=bind,src=/host,dst=/job[,readonly])
        max_retries: times the scheduler retries a failed run (the trainer resumes from its newest checkpoint);
            -1: runPolicy.backoffLimit
    """
    spec = load_spec(manifest)  # a bad manifest stops here, with the field named
    r = spec.resources
    nodes = nnodes or r.nodes
    nproc = nproc_per_node or max(1, r.gpusPerNode)
    gpus = r.gpusPerNode if gpu < 0 else gpu
    # one node: its own loopback; several: node 0's host, which each scheduler names in rank0_env
    master = "localhost" if nodes == 1 else f"$${{{specs.macros.rank0_env}:=localhost}}"
    argv = node_command(nodes, nproc, specs.macros.replica_id, master, master_port, container_manifest or manifest)
    raw = tuple(a for a in argv if "$" in a)
    # the run's identity across the scheduler's retries (max_retries): a retry resumes this run's
    # checkpoints; without it output.onExisting would take them for another run's (overwrite: deleted)
    role_env = {"PYTHONUNBUFFERED": "1", "KUBELORA_RUN_ID": specs.macros.app_id,
                **({"KUBELORA_FORCE_CPU": "1"} if gpus == 0 else {}), **(env or {})}
    note = cluster_only_note(spec, applied=("resources.image", "runPolicy.backoffLimit"), where="torchx")
    if note:
        print(note, file=sys.stderr, flush=True)
    return specs.AppDef(
        name=manifest_name(manifest),
        roles=[specs.Role(
            name="trainer", image=image or r.image or DEFAULT_IMAGE, entrypoint="bash", args=["-c", shell_command(argv, raw)],
            num_replicas=nodes, min_replicas=nodes, env=role_env,
            resource=specs.resource(cpu=cpu, gpu=gpus, memMB=memMB),
            port_map={"rendezvous": master_port},
            max_retries=spec.runPolicy.backoffLimit if max_retries < 0 else max_retries,
            mounts=specs.parse_mounts(mounts) if mounts else [],
        )],
    )
