"""Status sync without a finalizer: a work queue of LoRATrainingJobs, fed by watch events and a
ticker, drained by a few workers that run the (blocking) sync in threads.

kopf timers and daemons always put kopf's finalizer on the objects they serve (kopf's guarantee
that a timer stops before its object goes; nolar/kopf#896 declined making it optional). With the
finalizer, `kubectl delete ltj`, namespace deletion and CRD removal hang whenever the operator is
not running, while the trainer Job keeps its GPUs. So the periodic work lives here instead:

- `saw_owner` (kopf.on.event on LoRATrainingJobs, which adds no finalizer): remembers the newest
  body of every LoRATrainingJob the operator watches (the watch is the cache, as an informer's)
  and queues it when it is new or its generation or phase changed;
- `saw_child` (kopf.on.event on batch/v1 Jobs with our label): queues the owning
  LoRATrainingJob, so Job status changes (pods active, ready, failed, Complete, deleted by hand)
  are reflected at once;
- a ticker queues, every `interval` seconds, the jobs whose inputs come from outside the API
  server (the trainer's progress.json in the output bucket, a lasting storage error, pods that
  cannot be scheduled or pulled) or that wait for a TTL (`needs_polling`).

A key is synced by one worker at a time; queued again while it runs, it runs once more after.
A job being deleted is never synced (its children are going, not to be made again).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable, Iterable, Optional

from kubelora_trainer.spec import GROUP, KIND

from . import leader
from . import status as st

Key = tuple[str, str]  # (namespace, name)
log = logging.getLogger("kubelora_operator.syncer")


def key_of(body: dict) -> Key:
    meta = body.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def owner_key(child: dict) -> Optional[Key]:
    """The LoRATrainingJob a child (a Job) belongs to: its controller ownerReference of our kind,
    in the child's namespace; None for anything else (someone's Job that only carries our label).
    Pure."""
    meta = child.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/") and ref.get("controller"):
            return meta.get("namespace") or "", ref.get("name") or ""
    return None


def newer(candidate: dict, current: Optional[dict]) -> bool:
    """Whether `candidate` is a newer state of the object than `current`: a watch event can arrive
    after the response of our own status patch, and must not bring the older status back (the
    next sync would count a gang restart twice). resourceVersions are compared as integers when
    both are (etcd's revision, as every API server today); otherwise the candidate wins. Pure."""
    if current is None:
        return True
    if (candidate.get("metadata") or {}).get("uid") != (current.get("metadata") or {}).get("uid"):
        return True  # a new object of the same name
    a = (candidate.get("metadata") or {}).get("resourceVersion")
    b = (current.get("metadata") or {}).get("resourceVersion")
    if isinstance(a, str) and isinstance(b, str) and a.isdigit() and b.isdigit():
        return int(a) >= int(b)
    return True


def deleting(body: dict) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def wants_sync(old: Optional[dict], new: dict) -> bool:
    """Whether a LoRATrainingJob event needs a sync now (the ticker covers the rest): first seen,
    a new generation (runPolicy.suspend), or a new phase (e.g. create_children set Pending after
    the Job's own ADDED event was handled). Our status patches change the phase only at
    transitions, so this costs one extra sync per transition, not one per patch. Pure."""
    if deleting(new):
        return False
    if old is None:
        return True
    gen = lambda b: (b.get("metadata") or {}).get("generation")  # noqa: E731
    phase = lambda b: (b.get("status") or {}).get("phase")  # noqa: E731
    return gen(old) != gen(new) or phase(old) != phase(new)


def needs_polling(body: dict) -> bool:
    """Whether the ticker must sync this job: an active run (progress comes from the bucket, not
    from any watch event; pods are read only then), one without a status yet, or a finished one whose
    ttlSecondsAfterFinished has not yet deleted the children. Suspended, failed-for-good and
    cleaned-up jobs change only through events. Pure."""
    if deleting(body):
        return False
    status = body.get("status") or {}
    phase = status.get("phase")
    if phase in st.ACTIVE or phase is None:  # None: not made yet (handlers._take_over_creation)
        return True
    if phase in st.FINISHED:
        ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        return ttl is not None and not status.get("childrenDeleted") and bool(status.get("completionTime"))
    return False


def unhealthy(running: dict[Key, float], now: float, stuck_after: float, workers_gone: int = 0,
               ticker_gone: bool = False) -> Optional[str]:
    """Why the syncs have stopped, or None. Every API request has a timeout (kube.TimedApiClient),
    so a sync that has run stuck_after seconds is stuck in something that has none (a deadlock, a
    hung call outside the client), and a thread cannot be cancelled: only a restart frees its
    worker. With every worker stuck no job's status moves while the Lease, renewed on its own
    client, keeps this operator the leader. A ticker or a worker that ended stops syncs too. Pure."""
    stuck = sorted(((now - began, key) for key, began in running.items() if now - began >= stuck_after), reverse=True)
    why = []
    if stuck:
        (age, (ns, name)) = stuck[0]
        why.append(f"{len(stuck)} status sync(s) running for more than {stuck_after:g} s "
                   f"(KUBELORA_SYNC_STUCK_SECONDS), the longest {ns}/{name} for {age:.0f} s")
    if workers_gone:
        why.append(f"{workers_gone} sync worker(s) ended")
    if ticker_gone:
        why.append("the sync ticker ended")
    return "; ".join(why) or None


class Owners:
    """The newest body of each LoRATrainingJob, from the watch and from our own patch responses
    (thread-safe: workers remember their patch responses from threads)."""

    def __init__(self):
        self._bodies: dict[Key, dict] = {}
        self._lock = threading.Lock()

    def remember(self, body: dict) -> Optional[dict]:
        """Store body unless an newer state is stored; returns the previous state."""
        key = key_of(body)
        with self._lock:
            old = self._bodies.get(key)
            if newer(body, old):
                self._bodies[key] = body
            return old

    def forget(self, body: dict) -> None:
        key = key_of(body)
        uid = (body.get("metadata") or {}).get("uid")
        with self._lock:
            old = self._bodies.get(key)
            if old is not None and (uid is None or (old.get("metadata") or {}).get("uid") == uid):
                del self._bodies[key]

    def get(self, key: Key) -> Optional[dict]:
        with self._lock:
            return self._bodies.get(key)

    def items(self) -> list[tuple[Key, dict]]:
        with self._lock:
            return list(self._bodies.items())


URGENT, POLL = 0, 1   # a watch event's key goes before the ticker's


class WorkQueue:
    """Keys to process, each by at most one worker at a time (client-go's workqueue semantics):
    adding a queued key does nothing (but move it ahead when the new add is urgent), adding a key
    being processed runs it once more after. Urgent keys (a watch event: a job made, a Job's pods
    failed or done) are taken before the ticker's polls, so with hundreds of active jobs an event
    waits for a free worker, not for a whole round of polls. `process(key)` is blocking and runs in
    a thread; its exceptions are logged, never raised, and the key is kept in `failed` until a run
    of it succeeds (the ticker adds those again, whatever the job's phase). Everything but
    `process` runs on the event loop."""

    def __init__(self, process: Callable[[Key], None], workers: int = 4):
        self._process = process
        self._workers = workers
        self._queue: asyncio.PriorityQueue = asyncio.PriorityQueue()   # (priority, order, key)
        self._order = 0
        self._queued: dict[Key, int] = {}   # key -> the priority it is queued at
        self._since: dict[Key, float] = {}  # the keys being synced, and when each sync began (time.monotonic)
        self._again: dict[Key, int] = {}    # key -> priority, to run once more after its sync
        self.failed: set[Key] = set()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def _put(self, priority: int, key: Optional[Key]) -> None:
        self._order += 1
        self._queue.put_nowait((priority, self._order, key))

    def add(self, key: Key, urgent: bool = False) -> None:
        if self._stopping:
            return
        priority = URGENT if urgent else POLL
        if key in self._since:
            self._again[key] = min(priority, self._again.get(key, POLL))
        elif key not in self._queued or priority < self._queued[key]:
            self._queued[key] = priority   # an entry queued at a lower priority is skipped when taken
            self._put(priority, key)

    def add_all(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.add(key)

    def idle(self) -> bool:
        return not (self._queued or self._since or self._again)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def running_since(self) -> dict[Key, float]:
        """Each sync in progress and when it began (time.monotonic)."""
        return dict(self._since)

    def workers_gone(self) -> int:
        """Workers that ended while the queue was not stopping (a bug: none should)."""
        return 0 if self._stopping else sum(1 for t in self._tasks if t.done())

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"kubelora-sync-{i}") for i in range(self._workers)]

    async def stop(self, timeout: float = 60.0) -> None:
        """Let the syncs in progress finish (a thread cannot be cancelled: one that went on after
        the operator stopped would still write), drop what is queued."""
        self._stopping = True
        for _ in self._tasks:
            self._put(URGENT - 1, None)
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()

    async def _worker(self) -> None:
        while True:
            priority, _, key = await self._queue.get()
            if key is None or self._stopping:
                return
            if self._queued.get(key) != priority:   # taken already at a higher priority, or running
                continue
            del self._queued[key]
            self._since[key] = time.monotonic()
            try:
                await asyncio.to_thread(self._process, key)
                self.failed.discard(key)
            except leader.NotLeader as e:
                log.warning("syncing %s/%s: %s", *key, e)
            except Exception:  # noqa: BLE001 - one job's failure must not stop the others' syncs
                self.failed.add(key)
                log.exception("syncing %s/%s failed; retried at the next tick", *key)
            finally:
                self._since.pop(key, None)
                if key in self._again:
                    self.add(key, urgent=self._again.pop(key) == URGENT)


class Syncer:
    """The queue, the ticker and the memory of LoRATrainingJobs; `sync(body, remember)` does the
    work for one job (blocking; `remember` takes the body of our own status patch response) and
    returns False when it found the job deleted."""

    def __init__(self, sync: Callable[[dict, Callable[[dict], None]], None], interval: float, workers: int = 4,
                 exists: Optional[Callable[[Key, Optional[str]], Optional[bool]]] = None, audit_every: int = 30):
        self.owners = Owners()
        self.queue = WorkQueue(self._run, workers)
        self._sync = sync
        self._interval = interval
        self._ticker: Optional[asyncio.Task] = None
        # every audit_every ticks, the remembered jobs the ticker no longer syncs (finished ones) are
        # looked up (exists: True, False when gone or another object, None when unknown): one deleted
        # while the watch was down (a re-list after 410 Gone reports no DELETED) is forgotten, not
        # kept in memory and in the operator's metrics until a restart
        self._exists, self._audit_every, self._ticks = exists, audit_every, 0
        self._audit: Optional[asyncio.Task] = None   # a task of its own: the ticker never waits for it

    def start(self) -> None:
        self.queue.start()
        self._ticker = asyncio.create_task(self._tick(), name="kubelora-sync-ticker")

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        if self._audit:
            self._audit.cancel()
        await self.queue.stop()

    def health(self, stuck_after: float, now: Optional[float] = None) -> Optional[str]:
        """Why this operator is not live (its liveness probe fails, and the kubelet restarts it), or
        None: see unhealthy."""
        ticker_gone = self._ticker is not None and self._ticker.done() and not self.queue.stopping
        return unhealthy(self.queue.running_since(), time.monotonic() if now is None else now, stuck_after,
                         self.queue.workers_gone(), ticker_gone)

    def saw_owner(self, event_type: Optional[str], body: dict) -> None:
        if event_type == "DELETED":
            self.owners.forget(body)
            return
        old = self.owners.remember(body)
        if wants_sync(old, body):
            self.queue.add(key_of(body), urgent=True)

    def saw_child(self, child: dict) -> None:
        key = owner_key(child)
        if key is not None:
            self.queue.add(key, urgent=True)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            # and every job whose last sync failed (an API error while un-suspending a Suspended job
            # would otherwise wait for its next event, or the operator's restart)
            self.queue.add_all(key for key, body in self.owners.items() if needs_polling(body) or key in self.queue.failed)
            self._ticks += 1
            if (self._exists is not None and self._ticks % self._audit_every == 0
                    and (self._audit is None or self._audit.done())):   # one at a time, skipped while one runs
                self._audit = asyncio.create_task(self._audit_once(), name="kubelora-sync-audit")

    async def _audit_once(self) -> None:
        try:
            await asyncio.to_thread(self.audit)
        except Exception:  # noqa: BLE001 - an audit that fails is tried at the next one
            log.exception("looking up the finished jobs failed; tried again later")

    def audit(self) -> int:
        """Forget the remembered jobs not synced by the ticker that the API server no longer has;
        returns how many (blocking: run in a thread)."""
        gone = 0
        for key, body in self.owners.items():
            if needs_polling(body):   # synced: the sync finds it gone (a job being deleted is not: looked up)
                continue
            answer = self._exists(key, (body.get("metadata") or {}).get("uid"))
            if answer is None:   # the API server did not answer: the rest waits for the next audit
                break
            if answer is False:
                self.owners.forget(body)
                gone += 1
        return gone

    def _run(self, key: Key) -> None:
        body = self.owners.get(key)
        if body is None or deleting(body):
            return
        if self._sync(body, self.owners.remember) is False:
            # deleted while the watch was down (a restart after 410 Gone lists what exists, it
            # reports no DELETED for what went in the gap): no more syncs, gauges or ticks for it
            self.owners.forget(body)
