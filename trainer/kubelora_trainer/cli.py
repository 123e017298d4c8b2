"""`kubelora`: the user's command line.

    kubelora run examples/demo-flux.yaml [--nproc 2]   train on this machine with torchrun
    kubelora validate job.yaml                         check a manifest without running it
    kubelora crd                                       print the generated CRD
    kubelora demo                                      tiny Flux + in-process S3 + run (make demo)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def _validate(path: str):
    from .models import UnsupportedModel, check_supported
    from .spec import SpecError, load_spec
    try:
        spec = load_spec(path)
        check_supported(spec.model.type)
    except (SpecError, UnsupportedModel, OSError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return None
    return spec


def default_nproc(spec) -> int:
    """One process per GPU; on a machine without GPUs, one (or --nproc)."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 1


def launch(manifest: str, nproc: int | None = None, extra_env: dict | None = None) -> int:
    """Run the trainer under torchrun on this machine; its output (rank 0 logs progress) streams
    through. Returns the exit status."""
    spec = _validate(manifest)
    if spec is None:
        return 2
    n = nproc or default_nproc(spec)
    env = {**os.environ, **(extra_env or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "kubelora_trainer", "run", "--spec", str(manifest)]
    print(f"[kubelora] {spec.model.type} LoRA from {manifest} on {n} local process(es)", flush=True)
    return subprocess.call(cmd, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kubelora", description="Train diffusion-model LoRAs, locally or on Kubernetes.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train a LoRATrainingJob manifest on this machine (torchrun)")
    r.add_argument("manifest")
    r.add_argument("--nproc", type=int, default=None, help="processes (default: number of GPUs, or 1 on CPU)")
    v = sub.add_parser("validate", help="check a manifest and print the resolved spec")
    v.add_argument("manifest")
    c = sub.add_parser("crd", help="print the CRD generated from the spec models")
    c.add_argument("--out", help="write to this file instead of stdout")
    d = sub.add_parser("demo", help="train a tiny Flux LoRA from an in-process S3 server")
    d.add_argument("--workdir", default=".demo")
    d.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)

    if args.cmd == "run":
        return launch(args.manifest, args.nproc)
    if args.cmd == "validate":
        spec = _validate(args.manifest)
        if spec is None:
            return 2
        import yaml
        from .spec import dump_spec
        print(yaml.safe_dump(dump_spec(spec), sort_keys=False))
        return 0
    if args.cmd == "crd":
        from .crd import render
        text = render()
        if args.out:
            Path(args.out).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    if args.cmd == "demo":
        from .demo import demo
        return demo(Path(args.workdir), args.nproc)
    return 2


if __name__ == "__main__":
    sys.exit(main())
