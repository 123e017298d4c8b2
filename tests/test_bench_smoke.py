"""The GPU benchmark scripts run only where a GPU is lent, so they broke twice unnoticed between
runs; here they run on the tiny models (TINY=1, CPU) so a change that breaks them fails CI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("model,mode,extra", [("flux", "eager_nogc_fp8t_off", {}),
                                              ("hunyuan", "compile_gc_fp8", {"HY_CAPTIONS": "varied"}),
                                              ("flux", "eager_auto_fp8", {})])
def test_the_gpu_step_benchmark_runs_on_the_tiny_models(model, mode, extra):
    env = {**os.environ, "TINY": "1", "PYTHONPATH": str(ROOT / "trainer"), "OMP_NUM_THREADS": "1",
           "BUDGET_GIB": "0.01", **extra}  # training.memoryBudgetGiB, so _auto's memory plan runs on the CPU too
    p = subprocess.run([sys.executable, str(ROOT / "bench/gpu/lora_step.py"), model, mode], env=env,
                       capture_output=True, text=True, timeout=600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert "error" not in res, res["error"] + p.stderr[-3000:]
    assert res["case"] == f"kubelora_{model}_{mode}" + ("_varied" if extra else "") and res["s_per_step"] > 0 and res["loss"] > 0
    assert "[model] transformer:" in p.stdout and "run as fp8 GEMMs" in p.stdout
    assert ("memory_plan" in res) == ("_auto" in mode), res


def test_the_fp8_gemm_breakdown_runs():
    env = {**os.environ, "TINY": "1", "PYTHONPATH": str(ROOT / "trainer"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench/gpu/fp8_linear.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert rows and all(k in rows[0] for k in ("bf16_fwdbwd_ms", "fp8_fwdbwd_ms", "scaled_mm_ms")), p.stderr[-3000:]


def test_the_fp8_block_variants_run():
    env = {**os.environ, "TINY": "1", "PYTHONPATH": str(ROOT / "trainer"), "OMP_NUM_THREADS": "1"}
    kinds = ["bf16", "fp8_fast", "fp8_bwdbf16", "fp8_noquant"]
    p = subprocess.run([sys.executable, str(ROOT / "bench/gpu/fp8_block.py"), *kinds], env=env, capture_output=True,
                       text=True, timeout=600)
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert [r["case"] for r in rows] == [f"block_{k}" for k in kinds], p.stdout[-2000:] + p.stderr[-3000:]
    assert all("error" not in r and r["ms_per_fwdbwd"] > 0 for r in rows), rows
    # the variants compute the same blocks: their outputs agree with bf16's within fp8's error
    assert all(abs(r["out_norm"] / rows[0]["out_norm"] - 1) < 0.02 for r in rows), rows
