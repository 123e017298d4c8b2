"""One process and two (FSDP2 over gloo, real torchrun) train the same numeric model: the same
weights, batch and step give the same output within fp32 tolerance; and LoRA dropout draws
different masks on each rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "dist_numerics.py"


def _run(nproc: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", str(WORKER), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("numerics")
    return _run(1, d / "one.json"), _run(2, d / "two.json")


def test_one_and_two_ranks_compute_the_same_step(results):
    one, two = results
    a, b = torch.tensor(one["out"]), torch.tensor(two["out"])
    assert a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_lora_dropout_masks_differ_per_rank(results):
    _, two = results
    r0, r1 = (torch.tensor(x) for x in two["dropout_outs"])
    assert not torch.equal(r0, r1), "both ranks drew the same dropout masks"
