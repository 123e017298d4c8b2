"""One process and two (real torchrun, gloo), replicated or sharded with FSDP2, train the same
numeric model: the same weights, batch and step give the same output within fp32 tolerance; LoRA
dropout draws different masks on each rank; and replicated ranks send only the adapters'
gradients (the frozen base never travels), sharded ones the base as well; a float8 base shards too."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "dist_numerics.py"


def _run(nproc: int, out: Path, sharding: str = "auto", *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", str(WORKER), str(out), sharding, *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("numerics")
    return {"one": _run(1, d / "one.json"), "shard": _run(2, d / "shard.json", "shard"),
            "replicate": _run(2, d / "replicate.json", "replicate"),
            "one_fp8": _run(1, d / "one_fp8.json", "auto", "float8"),
            "shard_fp8": _run(2, d / "shard_fp8.json", "shard", "float8"),
            "one_offload": _run(1, d / "one_offload.json", "auto", "offload")}


@pytest.mark.parametrize("sharding", ["shard", "replicate"])
def test_one_and_two_ranks_compute_the_same_step(results, sharding):
    a, b = torch.tensor(results["one"]["out"]), torch.tensor(results[sharding]["out"])
    assert a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_replicated_ranks_send_only_the_adapters_gradients(results):
    rep, shard = results["replicate"], results["shard"]
    assert rep["grad_bytes"] > 0
    assert rep["step_bytes"] <= 1.1 * rep["grad_bytes"], rep["step_bytes"]
    # FSDP2 gathers the frozen bf16 base in the forward and again in the backward
    assert shard["step_bytes"] > 3 * rep["step_bytes"], (shard["step_bytes"], rep["step_bytes"])
    # the forward gathers the root and every block; the backward every block again but the last
    # (kept gathered: it runs first) and the root (FSDP2 keeps the root gathered)
    assert shard["step_gathers"] == 2 * shard["blocks"], shard


def test_replicated_ranks_leave_a_parameter_no_rank_reached_without_a_gradient(results):
    """As one process and FSDP2 do: AdamW then skips it (a zero gradient would still decay it, so
    the same spec would train differently on one process and on replicated ranks)."""
    r0, r1 = results["replicate"]["synced"]
    assert r0 == r1 == [[1.0] * 3, None, [1.5] * 3]  # rank 0's 2.0 averaged over two; none; (1 + 2) / 2


def test_lora_dropout_masks_differ_per_rank(results):
    two = results["replicate"]
    r0, r1 = (torch.tensor(x) for x in two["dropout_outs"])
    assert not torch.equal(r0, r1), "both ranks drew the same dropout masks"


def test_a_float8_base_shards_with_fsdp2_and_computes_what_one_rank_computes(results):
    """model.transformerDtype float8 under FSDP2 (the frozen e4m3 weights and their scales sharded
    and gathered like any parameter): the same step as one rank, exactly (the same fp8 bytes meet the
    same GEMMs), and the gathers carry one byte per base weight instead of bf16's two."""
    one, shard = torch.tensor(results["one_fp8"]["out"]), torch.tensor(results["shard_fp8"]["out"])
    assert one.abs().max() > 0
    torch.testing.assert_close(shard, one, rtol=0, atol=0)
    assert results["shard_fp8"]["step_bytes"] < results["shard"]["step_bytes"]
    # the fp8 path is a different numeric model from bf16, but close to it
    assert (one - torch.tensor(results["one"]["out"])).abs().max() < 0.1 * one.abs().max()


def test_cpu_offload_on_one_rank_computes_what_the_plain_step_computes(results):
    """training.cpuOffload: FSDP2 with CPUOffloadPolicy, one process (the single-GPU case it is for).
    On this machine the device is the CPU too, so this checks the wiring and the math, not the copies
    to a GPU (never run on one yet)."""
    one, off = torch.tensor(results["one"]["out"]), torch.tensor(results["one_offload"]["out"])
    torch.testing.assert_close(off, one, rtol=1e-5, atol=1e-6)
