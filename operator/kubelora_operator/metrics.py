"""The operator's Prometheus metrics, served on $KUBELORA_OPERATOR_METRICS_PORT (9401; 0: off) by
`python -m kubelora_operator` (kopf's liveness endpoint keeps 8080).

    kubelora_operator_jobs{phase}                          LoRATrainingJobs the operator watches, by phase
    kubelora_operator_job_phase{namespace,ltj,phase}       1 per watched job, its phase as a label
    kubelora_operator_job_stalled{namespace,ltj,phase,reason}  1 per job Stalled but not Failed
    kubelora_operator_job_queued{namespace,ltj,queue}      1 per job waiting for Kueue's admission
    kubelora_operator_job_waiting{namespace,ltj,reason}    1 per job waiting for quota room or old pods
    kubelora_operator_job_restarts_total{namespace,ltj,kind}   a job's restarts: `failure` (spent from its
                                                           backoffLimit), `disruption`, `incomplete` (a gang
                                                           that was never whole)
    kubelora_operator_reconcile_duration_seconds{handler}  create/sync handler durations (histogram)
    kubelora_operator_reconcile_errors_total{handler,reason}   handler runs that raised (reason: exception type)
    kubelora_operator_jobs_failed_total{reason}            jobs the operator failed (InvalidSpec, ...)
    kubelora_operator_children_created_total{kind}         ConfigMaps, Services, Jobs created
    kubelora_operator_leader                               1 while this operator acts (holds the Lease of
                                                           --lease, or runs without one), 0 while it stands by
    kubelora_operator_gang_restarts_total{reason}          runs restarted: `gang` (a failed pod of a
                                                           multi-node run), `disruption` (the same after a
                                                           disruption, not counted against the backoff
                                                           limit), `gang_incomplete` (a peer never started:
                                                           not counted) or `job_missing` (the Job vanished)

The job series are read at scrape time from the syncer's memory of the watch, so deleted jobs
leave no series behind.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import env

PORT_ENV = "KUBELORA_OPERATOR_METRICS_PORT"
DEFAULT_PORT = 9401
PHASES = ("Pending", "Initializing", "Training", "Exporting", "Succeeded", "Failed", "Suspended")

registry = CollectorRegistry()
RECONCILE_SECONDS = Histogram("kubelora_operator_reconcile_duration_seconds",
                              "Duration of the operator's handlers for one LoRATrainingJob", ("handler",),
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=registry)
RECONCILE_ERRORS = Counter("kubelora_operator_reconcile_errors", "Handler runs that raised, by exception type",
                           ("handler", "reason"), registry=registry)
JOBS_FAILED = Counter("kubelora_operator_jobs_failed", "LoRATrainingJobs the operator set to Failed, by reason",
                      ("reason",), registry=registry)
CHILDREN_CREATED = Counter("kubelora_operator_children_created", "Child objects created, by kind", ("kind",),
                           registry=registry)
GANG_RESTARTS = Counter("kubelora_operator_gang_restarts", "Trainer Jobs made again for a restart, by reason",
                        ("reason",), registry=registry)

LEADER = Gauge("kubelora_operator_leader", "1 while this operator holds the leader Lease and acts, 0 while it "
               "stands by", registry=registry)


class _Jobs:
    """Collects the job series from a source of LoRATrainingJob bodies (the syncer's Owners)."""

    def __init__(self):
        self.source: Optional[Callable[[], Iterable[dict]]] = None

    def collect(self):
        by_phase = GaugeMetricFamily("kubelora_operator_jobs", "LoRATrainingJobs the operator watches, by phase",
                                     labels=("phase",))
        each = GaugeMetricFamily("kubelora_operator_job_phase", "1 for each watched LoRATrainingJob, with its phase",
                                 labels=("namespace", "ltj", "phase"))
        queued = GaugeMetricFamily("kubelora_operator_job_queued", "1 for each job waiting for Kueue to admit it, "
                                   "with its LocalQueue", labels=("namespace", "ltj", "queue"))
        waiting = GaugeMetricFamily("kubelora_operator_job_waiting", "1 for each Pending job that waits by design: "
                                    "for room in a ResourceQuota, or for the previous attempt's pods to stop",
                                    labels=("namespace", "ltj", "reason"))
        stalled = GaugeMetricFamily("kubelora_operator_job_stalled", "1 for each job that cannot go on without a "
                                    "person (condition Stalled) but has not failed, with the reason",
                                    labels=("namespace", "ltj", "phase", "reason"))
        restarts = CounterMetricFamily("kubelora_operator_job_restarts", "Restarts of each job's trainer (its "
                                       "status): failure (spent from runPolicy.backoffLimit), disruption, incomplete",
                                       labels=("namespace", "ltj", "kind"))
        counts = dict.fromkeys(PHASES, 0)
        for body in (self.source() if self.source else []):
            meta = body.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                continue
            status = body.get("status") or {}
            phase = status.get("phase") or "New"
            counts[phase] = counts.get(phase, 0) + 1
            ns, name = meta.get("namespace") or "", meta.get("name") or ""
            each.add_metric([ns, name, phase], 1)
            if status.get("reason") == "QueuedInKueue":
                from .manifests import kueue_queue
                queued.add_metric([ns, name, kueue_queue(meta.get("labels")) or ""], 1)
            if phase == "Pending" and status.get("reason") in WAITING_REASONS:
                waiting.add_metric([ns, name, status["reason"]], 1)
            from .status import counted_restarts  # every job's, from 0: increase() sees the first restart
            for kind, n in (("failure", counted_restarts(status)),
                            ("disruption", int(status.get("disruptionRestarts") or 0)),
                            ("incomplete", int(status.get("waitRestarts") or 0))):
                restarts.add_metric([ns, name, kind], n)
            stall = next((c for c in status.get("conditions") or [] if c.get("type") == "Stalled"), None)
            if stall and stall.get("status") == "True" and phase != "Failed":  # Failed has its own alert
                stalled.add_metric([ns, name, phase, stall.get("reason") or ""], 1)
        for phase, n in counts.items():
            by_phase.add_metric([phase], n)
        return [by_phase, each, queued, waiting, stalled, restarts]

    def describe(self):
        return []  # collected at scrape time only


# Pending reasons that are a wait by design, not a stuck job (status.py, handlers._defer/_recreate)
WAITING_REASONS = ("QuotaExceeded", "CreateDeferred", "WaitingForOldPods")

JOBS = _Jobs()
registry.register(JOBS)


def watch(source: Callable[[], Iterable[dict]]) -> None:
    """Read the job series from source() at each scrape."""
    JOBS.source = source


@contextmanager
def reconcile(handler: str):
    """Time one handler run; count it as an error when it raises (kopf's TemporaryError too)."""
    t0 = time.perf_counter()
    try:
        yield
    except BaseException as e:
        status = getattr(e, "status", None)
        RECONCILE_ERRORS.labels(handler, type(e).__name__ + (f"_{status}" if isinstance(status, int) else "")).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(handler).observe(time.perf_counter() - t0)


def leading(yes: bool) -> None:
    LEADER.set(1 if yes else 0)


def created(kind: str) -> None:
    CHILDREN_CREATED.labels(kind).inc()


def failed(reason: str) -> None:
    JOBS_FAILED.labels(reason).inc()


def restarted(reason: str) -> None:
    GANG_RESTARTS.labels(reason).inc()


ADDR_ENV = "KUBELORA_OPERATOR_METRICS_ADDR"   # '::' on an IPv6-only cluster (chart operator.listenAddress)


def serve(port: Optional[int] = None, addr: Optional[str] = None):
    """Serve the registry (None when off or the port is taken: a warning, never a crash)."""
    from kubelora_trainer.metrics import serve as _serve
    port = int(env.number(PORT_ENV, DEFAULT_PORT)) if port is None else port
    addr = addr or os.environ.get(ADDR_ENV) or "0.0.0.0"
    return _serve(registry, port, addr, log=lambda m: print(m, flush=True), who="the operator")


def names() -> set[str]:
    from kubelora_trainer.metrics import sample_names
    return sample_names(registry)
