"""The latent cache on the tiny Flux through the real trainer (one process, CPU):

  * cache build: samples encoded per second (dataset.cacheOnly, from the trainer's last
    "[cache] encoding:" line), for N tiny images of mixed aspect ratios;
  * data loading against the training step: the fraction of step time spent waiting for the
    cache loader (manifest.json metrics.dataWaitSeconds / trainingSeconds), read-ahead on and off;
  * peak RSS of a training run once the cache is complete, for 50 and 500 items: it must not grow
    with the dataset (entries are read from disk per batch). The cache's size on disk is what
    the trainer held in RAM before (every entry, on every rank).

    .venv/bin/python bench/data_cache.py [--items 50 500] [--steps 40]

Prints a Markdown table; paste it into docs/benchmarks.md with the machine and date.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def images(d: Path, n: int) -> Path:
    from PIL import Image
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = [(64, 64), (96, 48), (48, 96)][i % 3]
        Image.new("RGB", (w, h), (i % 256, (7 * i) % 256, 200)).save(d / f"img{i:04d}.png")
        (d / f"img{i:04d}.txt").write_text(f"picture {i}, a colour field")
    return d


def job(tmp: Path, name: str, model: Path, data: Path, steps: int, cache_only: bool = False) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": name}, "spec": {
        "model": {"type": "flux", "diffusersPath": str(model), "dtype": "float32"},
        "dataset": {"uri": str(data), "resolutions": [32], "enableArBucket": True, "numArBuckets": 3,
                    **({"cacheOnly": True} if cache_only else {})},
        "adapter": {"rank": 16}, "training": {"steps": steps, "microBatchSize": 4, "logEvery": 10},
        "output": {"uri": str(tmp / f"out-{name}"), "onExisting": "overwrite"}}}))
    return path


def run(spec: Path, cache: Path, **env) -> tuple[str, float, float]:
    """The trainer in one process: (stdout, wall seconds, peak RSS in MiB of that process)."""
    full = {**os.environ, "KUBELORA_CACHE_DIR": str(cache), "KUBELORA_METRICS_PORT": "0", "OMP_NUM_THREADS": "2",
            "PYTHONUNBUFFERED": "1", **env}
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen([sys.executable, "-m", "kubelora_trainer", "run", "--spec", str(spec)], env=full,
                             stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read()
    if p.returncode != 0:
        raise SystemExit(f"trainer failed ({p.returncode}):\n{log[-3000:]}")
    return log, time.time() - t0, usage.ru_maxrss / 1024  # Linux: KiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    import torch
    from kubelora_trainer.models.flux.tiny import build_tiny_flux
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model = build_tiny_flux(tmp / "model")
        for n in args.items:
            data, cache = images(tmp / f"data{n}", n), tmp / f"cache{n}"
            log, wall, _ = run(job(tmp, f"build{n}", model, data, args.steps, cache_only=True), cache)
            rate = float(re.findall(r"\[cache\] encoding: \d+/\d+ samples, ([\d.]+) samples/s", log)[-1])
            entries = sorted((cache / "latents").glob("*.pt"))
            disk = sum(f.stat().st_size for f in entries) / 2 ** 20
            res = {"items": n, "entries": len(entries), "build_samples_per_s": rate, "build_wall_s": wall,
                   "cache_mib": disk}
            for depth in ("2", "0"):
                log, wall, rss = run(job(tmp, f"train{n}-{depth}", model, data, args.steps), cache,
                                     KUBELORA_PREFETCH_BATCHES=depth)
                assert "the VAE and text encoders are not loaded" in log, log[-2000:]
                m = json.loads((tmp / f"out-train{n}-{depth}" / "manifest.json").read_text())["metrics"]
                step = m["samplesPerStep"] / m["samplesPerSecond"]   # the trainer's steady-state step time
                res[f"s_per_step_{depth}"] = step
                res[f"wait_frac_{depth}"] = m["dataWaitSeconds"] / (m["steps"] * step)
                res[f"rss_mib_{depth}"] = rss
            rows.append(res)
            print(json.dumps(res), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}; {args.steps} steps, micro-batch 4, one process\n")
    print("| items | entries | cache build (samples/s) | cache on disk (MiB) | s/step | data wait, read-ahead 2 "
          "| data wait, no read-ahead | peak RSS, trained from the cache (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['items']} | {r['entries']} | {r['build_samples_per_s']:.1f} | {r['cache_mib']:.1f} | "
              f"{r['s_per_step_2']:.3f} | {100 * r['wait_frac_2']:.1f}% | {100 * r['wait_frac_0']:.1f}% | "
              f"{r['rss_mib_2']:.0f} |")


if __name__ == "__main__":
    main()
