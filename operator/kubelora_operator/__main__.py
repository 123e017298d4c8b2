"""Run the operator:  python -m kubelora_operator [--namespace NS ...]  (all namespaces by default).

Environment: KUBELORA_TRAINER_IMAGE (default trainer image), KUBELORA_SYNC_INTERVAL (seconds
between status syncs of active jobs, 10; Job changes are synced at once), KUBELORA_SECRET_CACHE_SECONDS
(how long a job's credentials Secret is reused, 60), KUBELORA_STORAGE_STALL_SECONDS (how long an
unreadable output bucket lasts before the job is Stalled, 300), KUBELORA_OPERATOR_METRICS_PORT (the
Prometheus endpoint, /metrics on 9401; 0: off), KUBELORA_TRAINER_METRICS_PORT and
KUBELORA_TRAINER_METRICS_LINGER_SECONDS (the trainer pods' endpoint, 9400, and how long a finished
pod keeps serving it, 60), KUBELORA_POD_CREATE_GRACE_SECONDS (how long a Job may have no pods before
its FailedCreate Events are read, 30), KUBELORA_GANG_FAILURE_GRACE_SECONDS (how long after a multi-node
run's pods failed the operator waits for a peer's Node to read lost before counting the restart, 60),
KUBELORA_TRAINER_IMAGE_PULL_SECRETS (the trainer pods'
imagePullSecrets, comma-separated), AWS_* (how the operator reads
progress.json / manifest.json from the output bucket when a job names no credentialsSecret).
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
    from .env import SettingError
    try:
        from . import handlers, metrics
        metrics.serve()
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    asyncio.run(kopf.operator(registry=handlers.registry, namespaces=args.namespace or None,
                              clusterwide=not args.namespace, liveness_endpoint=args.liveness or None,
                              standalone=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
