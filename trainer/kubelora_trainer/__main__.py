"""The trainer entry point the pods run:  python -m kubelora_trainer run --spec FILE  (under torchrun)."""
import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubelora_trainer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train from a LoRATrainingJob spec (bare spec or whole CR manifest)")
    r.add_argument("--spec", required=True, help="YAML file")
    args = p.parse_args(argv)
    from .quiet import quiet_libraries
    quiet_libraries()
    from .spec import SpecError
    try:
        from .train import main_from_cli
        return main_from_cli(args.spec)
    except SpecError as e:
        print(f"[error] {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    rc = main()
    # All work is done and uploaded (or the error printed). Leave without running C++ static
    # destructors: gloo/PyAV threads torn down at interpreter exit aborted a finished rank
    # ("terminate called without an active exception", SIGABRT) about once in ten 2-rank runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
