"""The trainer entry points the pods run:

    python -m kubelora_trainer launch [torchrun args] -m kubelora_trainer run --spec FILE
    python -m kubelora_trainer run --spec FILE            (one worker; what torchrun starts)
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # everything after it is torchrun's
        from .launch import run as launch
        return launch(argv[1:])
    p = argparse.ArgumentParser(prog="python -m kubelora_trainer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train from a LoRATrainingJob spec (bare spec or whole CR manifest)")
    r.add_argument("--spec", required=True, help="YAML file")
    sub.add_parser("launch", help="torchrun [its arguments...], exiting 2 when a worker found bad input")
    args = p.parse_args(argv)
    from .quiet import quiet_libraries
    quiet_libraries()
    from .exits import BAD_INPUT, FAILED, fail
    from .spec import SpecError
    try:
        from .train import main_from_cli
        return main_from_cli(args.spec)
    except SpecError as e:
        return fail(BAD_INPUT, str(e))
    except Exception as e:  # noqa: BLE001 - a bug: the traceback, then the one-line reason for the launcher
        import traceback
        traceback.print_exc()
        return fail(FAILED, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    rc = main()
    # All work is done and uploaded (or the error printed). Leave without running C++ static
    # destructors: gloo/PyAV threads torn down at interpreter exit aborted a finished rank
    # ("terminate called without an active exception", SIGABRT) about once in ten 2-rank runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
