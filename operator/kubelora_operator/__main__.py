"""Run the operator:  python -m kubelora_operator [--namespace NS ...]  (all namespaces by default).

Environment: KUBELORA_TRAINER_IMAGE (default trainer image), KUBELORA_SYNC_INTERVAL (status sync
seconds, 10), KUBELORA_SECRET_WAIT_SECONDS (how long a missing credentials Secret is waited for,
120), AWS_* (how the operator reads progress.json / manifest.json from the output bucket).
"""
import argparse
import asyncio
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubelora_operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namespace", "-n", action="append", help="watch only these namespaces")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint ('' to disable)")
    args = p.parse_args(argv)
    import kopf
    from . import handlers
    asyncio.run(kopf.operator(registry=handlers.registry, namespaces=args.namespace or None,
                              clusterwide=not args.namespace, liveness_endpoint=args.liveness or None,
                              standalone=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
