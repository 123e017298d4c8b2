"""A failure on one rank reaches every rank at the next collective, with its reason, instead of
leaving the others waiting in a collective until the process-group timeout (60 min)."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

WORKER = Path(__file__).parent / "workers" / "nan_on_rank.py"


def test_nan_loss_on_one_rank_stops_all_ranks_with_the_reason(tmp_path, tiny_flux_dir, overfit_data):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
                                   "dataset": {"uri": str(overfit_data), "resolution": 32},
                                   "adapter": {"rank": 4},
                                   "training": {"steps": 40, "logEvery": 1, "seed": 1},
                                   "output": {"uri": str(tmp_path / "out")}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KUBELORA_CACHE_DIR": str(tmp_path / "cache")}
    # a hang would run into this timeout: the process-group timeout is an hour
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(job)], env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "[train] step 2/40" in proc.stdout and "[train] step 3/40" not in proc.stdout, proc.stdout[-2000:]
    # both ranks stopped at step 3 with the same reason, naming the rank that diverged
    reasons = [ln for ln in proc.stderr.splitlines() if ln.startswith("[error]")]
    assert len(reasons) == 2, out[-3000:]
    assert all("loss is not finite at step 3 (rank 1: nan)" in r and "training.learningRate" in r for r in reasons), reasons
    assert not (tmp_path / "out" / "lora.safetensors").exists()
