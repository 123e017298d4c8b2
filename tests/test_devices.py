"""A process without a GPU of its own (more processes than visible GPUs: a MIG slice per process,
`--nproc` above the machine's GPUs, a node that lost a GPU). No GPU here: torch.cuda's answers are
stood in for, the rest is the trainer's own code."""
import pytest
import torch

from kubelora_trainer import dist, exits, train
from kubelora_trainer.spec import parse_spec


def _spec(**resources):
    return parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                       "output": {"uri": "/o"}, "resources": resources})


def test_a_local_rank_beyond_the_visible_gpus_is_said_not_crashed_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device on a GPU that is not there"))
    monkeypatch.delenv("KUBELORA_FORCE_CPU", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a,MIG-b")
    with pytest.raises(dist.TooFewDevices) as e:
        dist.init()
    assert str(e.value) == ("process 1 of this node has no GPU of its own: CUDA shows 1 device(s) "
                            "(CUDA_VISIBLE_DEVICES=MIG-a,MIG-b) and 2 processes were started")


def test_too_few_gpus_is_bad_input_for_mig_and_local_runs_and_retried_on_a_cluster_node(monkeypatch):
    err = dist.TooFewDevices(1, 1)
    # the operator's pods are the cluster (torchx gives its retries a run id on a workstation too)
    monkeypatch.delenv("KUBELORA_NAMESPACE", raising=False)
    monkeypatch.setenv("KUBELORA_RUN_ID", "torchx-app-1")
    assert train.too_few_devices(err, _spec(gpusPerNode=2))[0] == exits.BAD_INPUT
    monkeypatch.setenv("KUBELORA_NAMESPACE", "ml")
    assert train.too_few_devices(err, _spec(gpusPerNode=2))[0] == exits.FAILED
    code, msg = train.too_few_devices(err, _spec(gpusPerNode=2, gpuResource="nvidia.com/mig-3g.40gb"), in_cluster=True)
    assert code == exits.BAD_INPUT and "set resources.gpusPerNode: 1 (and more resources.nodes) instead of 2" in msg
    code, msg = train.too_few_devices(err, _spec(gpusPerNode=2), in_cluster=False)
    assert code == exits.BAD_INPUT and msg.endswith("run with --nproc 1 or fewer")
    code, msg = train.too_few_devices(err, _spec(gpusPerNode=2), in_cluster=True)
    assert code == exits.FAILED and "not the 2 of resources.gpusPerNode: the node lost a GPU" in msg
