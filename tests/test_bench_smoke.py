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
                                              ("hunyuan", "compile_gc_fp8", {"HY_CAPTIONS": "varied", "PROFILE": "1"}),
                                              ("flux", "eager_auto_fp8", {"ASYNC": "1", "SYNCS": "1"})])
def test_the_gpu_step_benchmark_runs_on_the_tiny_models(model, mode, extra, tmp_path):
    env = {**os.environ, "TINY": "1", "PYTHONPATH": str(ROOT / "trainer"), "OMP_NUM_THREADS": "1",
           "BUDGET_GIB": "0.01", "OUT": str(tmp_path), **extra}  # training.memoryBudgetGiB, so _auto's memory plan runs on the CPU too
    p = subprocess.run([sys.executable, str(ROOT / "bench/gpu/lora_step.py"), model, mode], env=env,
                       capture_output=True, text=True, timeout=600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert "error" not in res, res["error"] + p.stderr[-3000:]
    assert res["case"] == f"kubelora_{model}_{mode}" + ("_varied" if "HY_CAPTIONS" in extra else "") \
        and res["s_per_step"] > 0 and res["loss"] > 0
    assert "[model] transformer:" in p.stdout and "run as fp8 GEMMs" in p.stdout
    assert ("memory_plan" in res) == ("_auto" in mode), res
    if extra.get("ASYNC"):  # steps queued back to back, timed beside the ones each waited for
        assert res["async_s_per_step"] > 0, res
    if extra.get("SYNCS"):  # the Flux step reads nothing on the host (what a CPU run can see: syncs.py)
        assert res["host_syncs"] == [], res["host_syncs"]
    if extra.get("PROFILE"):  # the profile's table, the step's trace for bench/gpu/idle.py, the summary
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"profile_{model}_{mode}.txt",
                                                              f"trace_{model}_{mode}.json.gz"]
        assert res["gpu_busy_s"] == 0 and res["profiled_step_s"] > 0 and res["idle_top"] == {}, res


def test_the_fp8_gemm_breakdown_runs():
    env = {**os.environ, "TINY": "1", "PYTHONPATH": str(ROOT / "trainer"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench/gpu/fp8_linear.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert rows and all(k in rows[0] for k in ("bf16_fwdbwd_ms", "fp8_fwdbwd_ms", "scaled_mm_ms")), p.stderr[-3000:]


def test_the_fp8_block_variants_run():
    env = {**os.environ, "TINY": "1", "PYTHONPATH": str(ROOT / "trainer"), "OMP_NUM_THREADS": "1"}
    kinds = ["bf16", "fp8_fast", "fp8_bwdbf16", "fp8_noquant", "fp8_fused", "fp8_lora", "fp8_lora_plain",
             "fp8_lora_fusedA"]
    p = subprocess.run([sys.executable, str(ROOT / "bench/gpu/fp8_block.py"), *kinds], env=env, capture_output=True,
                       text=True, timeout=600)
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert [r["case"] for r in rows] == [f"block_{k}" for k in kinds], p.stdout[-2000:] + p.stderr[-3000:]
    assert all("error" not in r and r["ms_per_fwdbwd"] > 0 for r in rows), rows
    # the variants compute the same blocks: their outputs agree with bf16's within fp8's error
    assert all(abs(r["out_norm"] / rows[0]["out_norm"] - 1) < 0.02 for r in rows if "lora" not in r["case"]), rows
    # the three LoRA variants are one arithmetic (peft's, written out, fused; summed in another order in
    # bf16) with the same weights on the same input, and the adapter path changes the output by more
    lora = [r["out_norm"] for r in rows if "lora" in r["case"]]
    spread, effect = max(lora) - min(lora), abs(lora[0] - rows[1]["out_norm"])
    assert spread <= 0.002 * max(lora) and effect > 3 * spread, rows


def test_idle_gaps_of_a_trace_name_the_cpu_ops_the_gpu_waited_on(tmp_path):
    """bench/gpu/idle.py on a made-up trace (a GPU's kernels cannot run here): the gaps between
    merged kernel spans, each with the CPU ops overlapping it; then on a real CPU profiler trace
    (no GPU activity: nothing busy, nothing idle), through the gzip the benchmark writes."""
    import gzip
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import idle
    ev = [{"ph": "X", "cat": "kernel", "name": "a", "ts": 0, "dur": 100},
          {"ph": "X", "cat": "kernel", "name": "b", "ts": 50, "dur": 60},       # overlaps a: one span 0..110
          {"ph": "X", "cat": "kernel", "name": "c", "ts": 200, "dur": 100},     # 90 µs idle before it
          {"ph": "X", "cat": "gpu_memcpy", "name": "d", "ts": 310, "dur": 10},  # 10 µs: under the minimum
          {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 100, "dur": 60},
          {"ph": "X", "cat": "cpu_op", "name": "Optimizer.step", "ts": 150, "dur": 45},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 195, "dur": 5}]
    assert idle.busy_spans(ev) == [(0, 110), (200, 300), (310, 320)]
    (g,) = idle.gaps(ev, min_us=20)
    assert g == {"at_us": 110, "idle_us": 90, "cpu": [["aten::item", 50], ["Optimizer.step", 45]]}
    s = idle.summary(ev, min_us=20)
    assert s["busy_us"] == 220 and s["idle_us"] == 100 and s["idle_by_cpu_op"] == {"aten::item": 90}
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        import torch
        torch.ones(64, 64) @ torch.ones(64, 64)
    raw = tmp_path / "trace.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb") as dst:
        dst.write(src.read())
    events = idle.load(str(raw) + ".gz")
    assert any(e.get("cat") == "cpu_op" for e in events)
    assert idle.summary(events)["busy_us"] == 0.0


def test_host_syncs_are_found_by_call_site():
    """bench/gpu/syncs.py on CPU (the dispatch mode and the host reads; a GPU adds torch's sync
    warnings): each kind it looks for, counted at the line that made it; nothing for code that
    keeps its values on the device."""
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import torch
    from syncs import found

    t = torch.arange(6.0)
    with found() as none:
        (t * 2).sum().sqrt()
    with found() as some:
        for _ in range(2):
            float(t.sum())   # noqa: this line and the next three are the call sites
        t.nonzero()
        t.tolist()
        if t[1]:
            pass
    assert none == []
    first = min(int(s["where"].split(":")[1].split(" ")[0]) for s in some)
    got = sorted((int(s["where"].split(":")[1].split(" ")[0]) - first, s["op"], s["count"]) for s in some)
    assert got == [(0, "aten._local_scalar_dense.default", 2), (1, "aten.nonzero.default", 1), (2, "Tensor.tolist", 1),
                   (3, "aten._local_scalar_dense.default", 1)], some
    assert all(s["where"].startswith("test_bench_smoke.py:") for s in some), some
    assert torch.Tensor.tolist is not None and t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # put back


def test_sync_debug_notice_is_not_a_sync():
    """torch's notice on switching its sync debug mode on is not a sync (the sixth GPU run reported
    it as one); the warnings it gives at synchronizing calls are. The messages are torch's own."""
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    from syncs import is_sync_warning

    assert not is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect all "
                               "synchronizing operations")
    assert is_sync_warning("called a synchronizing CUDA operation")
    assert not is_sync_warning("some other warning")
