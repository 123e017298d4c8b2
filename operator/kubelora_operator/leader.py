"""Leader election through a coordination.k8s.io/v1 Lease: of the operator pods that run at once
(replicas, the pod an upgrade starts, the pod a lost node's eviction starts while the old one may
still run), exactly one acts on jobs.

Same rules as client-go's leaderelection (what kube-controller-manager and most operators use):

- A candidate takes the Lease when none exists, when its holder is empty (released by a graceful
  stop), when it already holds it (a restarted container of the same pod), or when the Lease's
  record (holder, renewTime, transitions) has not changed for `leaseDurationSeconds` as measured
  by the candidate's own monotonic clock since it first saw that record: machines' clocks are
  never compared.
- The leader renews every `retry` seconds. When no renewal has succeeded for `renew_deadline`
  seconds (less than the lease duration), it stops: the process exits and its Deployment restarts
  it as a candidate. A candidate waits at least the lease duration from the last renewal it saw,
  so the old leader has stopped before the new one starts.
- Every write the operator sends first checks that the last renewal is younger than
  `renew_deadline` (`fence`): a leader frozen past its deadline (a stopped process, a long
  partition) that wakes writes nothing before it exits. kopf's own bookkeeping writes (its
  annotations on the job) are not fenced.
- A graceful stop (SIGTERM: upgrade, scale-down, drain) releases the Lease, so the next candidate
  takes it at once instead of after the lease duration.

The pure functions decide; `Elector` does the API calls (the kubernetes client, in a thread, each
with a timeout) and keeps the time of the last renewal.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

import kopf

log = logging.getLogger("kubelora_operator.leader")


@dataclass(frozen=True)
class Timing:
    """client-go's defaults (kube-controller-manager's too)."""
    lease: float = 15.0           # leaseDurationSeconds: how long a candidate waits on an unchanged record
    renew_deadline: float = 10.0  # how long the leader goes on without a successful renewal
    retry: float = 2.0            # between tries to take or renew

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.retry < self.renew_deadline:
            out.append(f"the retry period ({self.retry:g} s) must be above 0 and below the renew deadline "
                       f"({self.renew_deadline:g} s)")
        if not self.renew_deadline < self.lease:
            out.append(f"the renew deadline ({self.renew_deadline:g} s) must be below the lease duration "
                       f"({self.lease:g} s): the leader must stop before a candidate may take over")
        elif self.lease - self.renew_deadline < 2 * self.retry:
            out.append(f"the lease duration ({self.lease:g} s) must exceed the renew deadline "
                       f"({self.renew_deadline:g} s) by at least two retry periods ({2 * self.retry:g} s): the margin "
                       "covers a slow read of the lease")
        if self.lease < 1 or self.lease != int(self.lease):
            out.append(f"the lease duration ({self.lease:g} s) must be a whole number of seconds, at least 1")
        return out


@dataclass(frozen=True)
class Seen:
    """A Lease record as a candidate saw it, and when (its monotonic clock) it first saw it."""
    record: tuple
    since: float


def record(lease: Optional[dict]) -> tuple:
    spec = (lease or {}).get("spec") or {}
    return (spec.get("holderIdentity") or "", spec.get("renewTime"), spec.get("leaseTransitions") or 0)


def holder(lease: Optional[dict]) -> str:
    return record(lease)[0]


def observe(seen: Optional[Seen], lease: Optional[dict], now: float) -> Seen:
    """The record seen now; its time is kept while the record does not change."""
    rec = record(lease)
    return seen if seen is not None and seen.record == rec else Seen(rec, now)


def may_take(lease: Optional[dict], me: str, seen: Seen, now: float, timing: Timing) -> bool:
    if lease is None:
        return True
    who = holder(lease)
    if who in ("", me):
        return True
    duration = ((lease.get("spec") or {}).get("leaseDurationSeconds")) or timing.lease
    return now - seen.since >= duration


def micro_time(at: datetime.datetime) -> str:
    """metav1.MicroTime as the API server reads it (RFC 3339, six fraction digits, UTC)."""
    return at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def claimed(lease: Optional[dict], me: str, namespace: str, name: str, timing: Timing,
            at: datetime.datetime) -> dict:
    """The Lease body that takes (or renews) the lease for `me`; the resourceVersion of what was
    read is kept, so the write fails (409) when another candidate wrote in between."""
    now = micro_time(at)
    meta = {"name": name, "namespace": namespace}
    if lease is not None:
        meta = {**meta, "resourceVersion": lease["metadata"]["resourceVersion"]}
        for key in ("labels", "annotations"):
            if lease["metadata"].get(key):
                meta[key] = lease["metadata"][key]
    spec = (lease or {}).get("spec") or {}
    ours = (spec.get("holderIdentity") or "") == me
    transitions = spec.get("leaseTransitions") or 0
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
            "spec": {"holderIdentity": me, "leaseDurationSeconds": int(timing.lease),
                     "acquireTime": spec.get("acquireTime") if ours and spec.get("acquireTime") else now,
                     "renewTime": now,
                     "leaseTransitions": transitions if ours or lease is None else transitions + 1}}


def released(lease: dict, at: datetime.datetime) -> dict:
    """The Lease body a graceful stop writes: no holder, so the next candidate takes it at once."""
    spec = dict(lease.get("spec") or {})
    spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time(at))
    spec.pop("acquireTime", None)
    return {**lease, "spec": spec}


class NotLeader(kopf.TemporaryError):
    """A write was about to be sent by an operator whose lease may have passed to another. kopf
    retries the handler after one retry period: by then the lease is renewed, or the process
    has stopped."""


class Elector:
    def __init__(self, namespace: str, name: str, identity: str, timing: Timing = Timing(), client=None):
        self.namespace, self.name, self.identity, self.timing = namespace, name, identity, timing
        self._client = client
        self.renewed: Optional[float] = None   # monotonic time of the last successful take or renewal
        self._seen: Optional[Seen] = None
        # the attempt under way, in a thread of the elector's own (not asyncio's default executor,
        # which the syncer's workers share, and not an asyncio task, which kopf's shutdown cancels)
        self._pending: Optional[concurrent.futures.Future] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")
        self._closed = False  # stop_leading: for good, whatever an attempt under way then does

    def __str__(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    # -- API calls (blocking; run in a thread) ---------------------------------------------

    def _api(self):
        from kubernetes import client
        if self._client is None:
            from . import kube
            kube.api()  # loads the cluster's configuration (in-cluster, else KUBECONFIG) as the default
            cfg = client.Configuration.get_default_copy()
            cfg.retries = False  # one try per request: an attempt is bounded by its request timeouts
            self._client = client.ApiClient(cfg)
        return client.CoordinationV1Api(self._client)

    def _read(self) -> Optional[dict]:
        from kubernetes.client.exceptions import ApiException
        try:
            resp = self._api().read_namespaced_lease(self.name, self.namespace, _preload_content=False,
                                                     _request_timeout=self.timing.retry * 2)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def _write(self, lease: Optional[dict], body: dict) -> None:
        api = self._api()
        if lease is None:
            api.create_namespaced_lease(self.namespace, body, _request_timeout=self.timing.retry * 2)
        else:
            api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=self.timing.retry * 2)

    def try_take(self) -> tuple[Optional[bool], str]:
        """One attempt to take or renew: (True, me) when held now; (False, holder) when another
        holds it; (None, holder) when the write met another's (409: read again next time)."""
        from kubernetes.client.exceptions import ApiException
        started = time.monotonic()
        lease = self._read()
        seen_at = time.monotonic()  # the record was written no later than this (client-go: after the Get)
        self._seen = observe(self._seen, lease, seen_at)
        if not may_take(lease, self.identity, self._seen, seen_at, self.timing):
            return False, holder(lease)
        body = claimed(lease, self.identity, self.namespace, self.name, self.timing,
                       datetime.datetime.now(datetime.timezone.utc))
        try:
            self._write(lease, body)
        except ApiException as e:
            if e.status == 409 or (e.status == 404 and lease is not None):
                return None, holder(lease)
            raise
        self._renewed(started)
        return True, self.identity

    def _renewed(self, started: float) -> None:
        """A take or renewal succeeded: the lease runs from before its read, never from after the
        write; once a release has begun (stop_leading) the fence stays shut."""
        if not self._closed:
            self.renewed = started

    def release(self) -> bool:
        """Give the lease up when this candidate holds it; returns whether it did."""
        lease = self._read()
        if lease is None or holder(lease) != self.identity:
            return False
        self._api().replace_namespaced_lease(self.name, self.namespace,
                                             released(lease, datetime.datetime.now(datetime.timezone.utc)),
                                             _request_timeout=self.timing.retry * 2)
        return True

    # -- loops -------------------------------------------------------------------------------

    def leading(self, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        return not self._closed and self.renewed is not None and now - self.renewed < self.timing.renew_deadline

    async def _attempt(self, timeout: float) -> tuple[Optional[bool], str]:
        """try_take in a thread, never two at once: an attempt that outlives `timeout` is awaited
        by the next call instead of racing a new one (whose write it could make a 409)."""
        if self._pending is None or self._pending.done():
            self._pending = self._executor.submit(self.try_take)
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._pending)), timeout)

    async def settle(self) -> None:
        """Wait for an attempt still under way (before a release: it could take the lease back)."""
        if self._pending is not None and not self._pending.done():
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._pending)), self.timing.retry * 4)
            except Exception:  # noqa: BLE001 - its outcome no longer matters
                pass

    async def acquire(self) -> None:
        """Wait until this candidate holds the lease."""
        last_holder = None
        while True:
            try:
                taken, who = await self._attempt(self.timing.retry * 2)
            except Exception as e:  # the API server unreachable, RBAC: say so, try again
                log.warning("%s: cannot read or take it (%s); trying again", self, _reason(e))
                taken, who = False, last_holder
            if taken:
                log.info("%s: leading as %s", self, self.identity)
                return
            if who != last_holder:
                log.info("%s is held by %s: standing by", self, who)
                last_holder = who
            await asyncio.sleep(self.timing.retry)

    async def keep(self) -> str:
        """Renew until another candidate is seen holding the lease, or no renewal has succeeded
        for the renew deadline (a failed or conflicting renewal is retried until then); returns why."""
        while True:
            await asyncio.sleep(self.timing.retry)
            try:
                held, who = await self._attempt(self.timing.retry)
                if held is False:
                    return f"the lease is held by {who}"
                if held is None:
                    log.warning("%s: renewal met another write; trying again", self)
            except Exception as e:  # noqa: BLE001 - a slow or failing API server: retried until the deadline
                log.warning("%s: renewal failed (%s)", self, _reason(e))
            if not self.leading():
                return f"no renewal succeeded for {self.timing.renew_deadline:g} s"

    def stop_leading(self) -> None:
        """Close the fence for good (before a release): nothing more is written, even when an
        attempt under way renews the lease after this."""
        self._closed = True
        self.renewed = None


def _reason(e: BaseException) -> str:
    status = getattr(e, "status", None)
    return f"HTTP {status} {getattr(e, 'reason', '')}".strip() if status else (str(e) or type(e).__name__)


async def standby_health(endpoint: str):
    """While standing by, answer the liveness endpoint (kopf's, which is not running yet) so that
    the kubelet does not restart a healthy candidate; returns the aiohttp runner to stop before
    kopf binds the same port, or None when there is no endpoint."""
    import urllib.parse

    import aiohttp.web
    if not endpoint:
        return None
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http":
        raise ValueError(f"liveness endpoint {endpoint!r}: only http:// is served while standing by")

    async def healthz(_request):
        return aiohttp.web.json_response({"standby": True})

    app = aiohttp.web.Application()
    app.add_routes([aiohttp.web.get(parts.path or "/", healthz)])
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, parts.hostname or "localhost", parts.port or 80).start()
    return runner


current: Optional[Elector] = None


def fence() -> None:
    """Raise NotLeader when this operator elects a leader and its lease may have passed on."""
    if current is not None and not current.leading():
        raise NotLeader(f"{current}: this operator's last renewal is older than "
                        f"{current.timing.renew_deadline:g} s: it writes nothing until it is renewed",
                        delay=current.timing.retry)
