"""CPU throughput of the tiny Flux through the real trainer (torchrun, gloo, FSDP2 for 2 ranks):
samples/s and s/step for 1 and 2 processes, measured in one run so the ratio is meaningful.

    .venv/bin/python bench/cpu_throughput.py [--steps 40]     (make bench)

Prints a Markdown table; paste it into docs/benchmarks.md with the machine and date.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def run(tmp: Path, model: Path, data: Path, nproc: int, steps: int) -> dict:
    out = tmp / f"out-{nproc}"
    job = tmp / f"job-{nproc}.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                   "metadata": {"name": f"bench-{nproc}"}, "spec": {
        "model": {"type": "flux", "diffusersPath": str(model), "dtype": "float32"},
        "dataset": {"uri": str(data), "resolution": 32},
        "adapter": {"rank": 16}, "training": {"steps": steps, "microBatchSize": 4, "logEvery": 10},
        "output": {"uri": str(out)}}}))
    env = {**os.environ, "KUBELORA_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    "-m", "kubelora_trainer", "run", "--spec", str(job)], env=env, check=True, capture_output=True)
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    return {"nproc": nproc, "samples_per_s": m["samplesPerSecond"], "s_per_step": m["samplesPerStep"] / m["samplesPerSecond"],
            "wall_s": time.time() - t0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    from kubelora_trainer.models.flux.tiny import build_tiny_flux
    from kubelora_trainer.synthetic import build_synthetic_dataset
    import torch
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, data = build_tiny_flux(tmp / "model"), build_synthetic_dataset(tmp / "data", n=8)
        rows = [run(tmp, model, data, n, args.steps) for n in (1, 2)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"date {time.strftime('%Y-%m-%d')}")
    print("| processes | samples/s | s/step (global batch 4/rank) | wall s (incl. start-up) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['nproc']} | {r['samples_per_s']:.1f} | {r['s_per_step']:.4f} | {r['wall_s']:.1f} |")
    print(f"2-process / 1-process samples/s: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
