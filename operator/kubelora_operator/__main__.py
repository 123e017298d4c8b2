"""Run the operator:  python -m kubelora_operator [--namespace NS ...]  (all namespaces by default).

Environment (the chart sets each from its values; charts/kubelora/values.yaml names them):
  Trainer pods     KUBELORA_TRAINER_IMAGE, KUBELORA_IMAGE_PULL_POLICY (IfNotPresent),
                   KUBELORA_TRAINER_IMAGE_PULL_SECRETS (comma-separated), KUBELORA_TRAINER_RUN_AS_USER
                   (1000, or 'platform'), KUBELORA_TRAINER_SHM_SIZE, KUBELORA_TRAINER_TMP_SIZE (20Gi:
                   /tmp's sizeLimit; empty: none), KUBELORA_TRAINER_METRICS_PORT
                   (9400; 0: off) and KUBELORA_TRAINER_METRICS_LINGER_SECONDS (60: how long a finished
                   pod keeps serving it)
  Syncing          KUBELORA_SYNC_INTERVAL (10 s between status syncs of active jobs; Job changes are
                   synced at once), KUBELORA_SYNC_WORKERS (4), KUBELORA_RETRY_DELAY (10 s),
                   KUBELORA_NAME_WAIT_SECONDS (120: how long a job waits for a deleted predecessor's
                   children), KUBELORA_POD_CREATE_GRACE_SECONDS (30: a Job without pods this long has its
                   FailedCreate Events read), KUBELORA_POD_START_GRACE_SECONDS (120: a pod not started
                   this long has its Events read), KUBELORA_GANG_FAILURE_GRACE_SECONDS (60: how long after
                   a multi-node run's pods failed the operator waits for a peer's Node to read lost
                   before counting the restart), KUBELORA_SYNC_STUCK_SECONDS (900: a sync running this
                   long is stuck; the liveness endpoint then answers 500 and the kubelet restarts the pod),
                   KUBELORA_API_TIMEOUT_SECONDS (60: each API request's read timeout)
  Storage          KUBELORA_STORAGE_STALL_SECONDS (300: an unreadable output bucket this long makes the
                   job Stalled), KUBELORA_SECRET_CACHE_SECONDS (60: how long a job's credentials Secret
                   is reused), KUBELORA_JOB_CREDENTIALS_ONLY (true: read a job's bucket only with its own
                   credentialsSecret), KUBELORA_S3_ALLOWED_ENDPOINTS (comma-separated: the only S3
                   endpoints jobs may name), KUBELORA_S3_CREDENTIALS_DIR and AWS_* (the operator's own
                   credentials, for jobs that name no credentialsSecret)
  Metrics          KUBELORA_OPERATOR_METRICS_PORT (/metrics on 9401; 0: off), KUBELORA_OPERATOR_METRICS_ADDR
                   (0.0.0.0; '::' on an IPv6-only cluster) and KUBELORA_TRAINER_METRICS_ADDR (the trainer pods')

Leader election (`--lease NAMESPACE/NAME`, the chart's default): of the operator pods running at
once, the one holding that coordination.k8s.io Lease acts; the others stand by (their liveness
endpoint answers) and take over when it stops or stops renewing. KUBELORA_LEASE_DURATION_SECONDS (15),
KUBELORA_LEASE_RENEW_DEADLINE_SECONDS (10) and KUBELORA_LEASE_RETRY_SECONDS (2), as client-go's
leaderelection; the identity is --identity, else $POD_NAME, else the host name with a random
suffix. Without --lease the
operator acts at once and nothing keeps a second one from acting too.
"""
import argparse
import asyncio
import os
import signal
import socket
import sys
import uuid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubelora_operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namespace", "-n", action="append", help="watch only these namespaces")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint ('' to disable)")
    p.add_argument("--lease", metavar="NAMESPACE/NAME", default="",
                   help="elect a leader through this Lease (made when missing); '' (the default): act at once")
    p.add_argument("--identity", default=os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
                   help="this candidate's name in the Lease (default: $POD_NAME, else the host name and a random "
                        "suffix, so two processes on one host differ)")
    p.add_argument("--log-format", choices=("full", "plain", "json"), default="full",
                   help="log lines on stdout: full (time, logger, level), plain, or json (one object a line)")
    p.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    args = p.parse_args(argv)
    import kopf
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    from .env import SettingError
    try:
        elector = _elector(args.lease, args.identity)
        from . import handlers, metrics
        metrics.serve()
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(run(args, handlers.registry, elector))


def _elector(lease: str, identity: str):
    from . import env, leader
    from .env import SettingError
    if not lease:
        return None
    namespace, _, name = lease.partition("/")
    if not namespace or not name or "/" in name:
        raise SettingError(f"--lease {lease!r}: give it as NAMESPACE/NAME")
    timing = leader.Timing(lease=env.number("KUBELORA_LEASE_DURATION_SECONDS", leader.Timing.lease),
                           renew_deadline=env.number("KUBELORA_LEASE_RENEW_DEADLINE_SECONDS",
                                                     leader.Timing.renew_deadline),
                           retry=env.number("KUBELORA_LEASE_RETRY_SECONDS", leader.Timing.retry))
    if problems := timing.problems():
        raise SettingError("leader election: " + "; ".join(problems) + " (KUBELORA_LEASE_* settings)")
    return leader.Elector(namespace, name, identity, timing)


async def run(args, registry, elector) -> int:
    import kopf
    from . import leader, metrics
    # SIGTERM/SIGINT from the start: the process is PID 1 in its container, where a signal without a
    # handler is dropped, and kopf installs its own only once it runs. Set before kopf starts, the
    # flag stops it at once; afterwards kopf's handlers take the signals and stop it gracefully.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if elector is not None:
        metrics.leading(False)
        standby = await leader.standby_health(args.liveness)
        try:
            acquiring = asyncio.ensure_future(elector.acquire())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():  # stopped while standing by: nothing held, nothing to release
                acquiring.cancel()
                await elector.settle()
                await _release(elector)  # in case the attempt under way took it
                return 0
            stopping.cancel()
        finally:
            if standby is not None:
                await standby.cleanup()  # kopf's liveness endpoint takes the port over
        leader.current = elector
    metrics.leading(True)
    operator = asyncio.create_task(kopf.operator(
        registry=registry, namespaces=args.namespace or (), clusterwide=not args.namespace,
        liveness_endpoint=args.liveness or None, standalone=True, stop_flag=stop))
    if elector is None:
        await operator
        return 0
    keeper = asyncio.create_task(elector.keep())
    try:
        await asyncio.wait({operator, keeper}, return_when=asyncio.FIRST_COMPLETED)
        if keeper.done() and not keeper.cancelled():
            # exit now, from wherever kopf is: nothing more may be written (the fence refuses the
            # operator's own writes meanwhile); the Deployment restarts this pod as a candidate
            print(f"error: {elector}: lost leadership ({keeper.result()}); stopping so that only one "
                  f"operator acts", file=sys.stderr, flush=True)
            os._exit(1)
        await operator  # kopf's own failure, if any, is raised here (after the release below)
    finally:
        keeper.cancel()
        metrics.leading(False)
        await _release(elector)
    return 0


async def _release(elector) -> None:
    """Close the fence (a handler thread kopf left running writes nothing more), let a renewal
    under way finish, then give the Lease up so the next candidate takes it at once."""
    elector.stop_leading()
    await elector.settle()
    try:
        if await asyncio.wait_for(asyncio.to_thread(elector.release), elector.timing.retry * 2):
            print(f"{elector}: released", flush=True)
    except Exception as e:  # noqa: BLE001 - the next candidate then waits out the lease duration
        print(f"warning: {elector}: could not release it ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
