"""Kopf handlers: thin glue between events and the pure builders (manifests.py, status.py).

    kopf run -m kubelora_operator.handlers --all-namespaces      (python -m kubelora_operator)

Every handler is idempotent and restart-safe: children are created only when missing and never
after the run finished; status is recomputed from what exists, not remembered.
"""
from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timezone

import kopf

from kubelora_trainer.models import UnsupportedModel, check_supported
from kubelora_trainer.spec import GROUP, PLURAL, VERSION, SpecError, parse_spec
from kubelora_trainer.storage import S3Settings

from . import artifacts, kube, manifests
from . import status as st

RESOURCE = (GROUP, VERSION, PLURAL)
# Our own registry (not kopf's process-global default), so embedding or testing the operator
# next to other kopf code cannot mix handlers: kopf.operator(registry=handlers.registry).
registry = kopf.OperatorRegistry()


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


SYNC_INTERVAL = _env_float("KUBELORA_SYNC_INTERVAL", 10.0)
SECRET_WAIT_SECONDS = _env_float("KUBELORA_SECRET_WAIT_SECONDS", 120.0)
SECRET_RETRY_DELAY = _env_float("KUBELORA_SECRET_RETRY_DELAY", 10.0)
NAME_WAIT_SECONDS = _env_float("KUBELORA_NAME_WAIT_SECONDS", 120.0)
STORAGE_STALL_SECONDS = _env_float("KUBELORA_STORAGE_STALL_SECONDS", 300.0)


def operator_config() -> manifests.OperatorConfig:
    return manifests.OperatorConfig(
        image=os.environ.get("KUBELORA_TRAINER_IMAGE", manifests.OperatorConfig.image),
        image_pull_policy=os.environ.get("KUBELORA_IMAGE_PULL_POLICY", manifests.OperatorConfig.image_pull_policy),
    )


@kopf.on.login(registry=registry)
def login(**kwargs):
    """In-cluster service account, else KUBECONFIG (through the kubernetes client)."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_):
    settings.posting.level = 20  # INFO and above become Kubernetes Events
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"{GROUP}")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=f"{GROUP}", key="last-handled-configuration")
    settings.watching.server_timeout = 300


def _fail(body, patch, reason: str, message: str) -> None:
    patch.status.update(st.invalid(body.get("status") or {}, reason, message, body["metadata"].get("generation", 1),
                                   st.now_iso()))
    kopf.warn(body, reason=reason, message=message)


@kopf.on.resume(*RESOURCE, registry=registry)
@kopf.on.create(*RESOURCE, registry=registry)
def create_children(body, spec, name, namespace, uid, patch, retry, runtime, logger, **_):
    """Validate, then create the ConfigMap, Service and Indexed Job (each only if missing)."""
    phase = (body.get("status") or {}).get("phase")
    if phase in st.FINISHED:
        return  # never recreate children of a finished run (e.g. after TTL cleanup)
    try:
        job_spec = parse_spec(dict(spec))
        check_supported(job_spec.model.type)
    except SpecError as e:
        return _fail(body, patch, "InvalidSpec", str(e))
    except UnsupportedModel as e:
        return _fail(body, patch, "UnsupportedModel", str(e))
    problem = manifests.cluster_problem(job_spec)
    if problem:
        return _fail(body, patch, "InvalidSpec", problem)
    secret = job_spec.storage.credentialsSecret
    if secret and not kube.secret_exists(namespace, secret):
        msg = (f"Secret {secret!r} (spec.storage.credentialsSecret) not found in namespace {namespace}; "
               "create it with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if runtime.total_seconds() >= SECRET_WAIT_SECONDS:
            return _fail(body, patch, "SecretNotFound", msg)
        patch.status.update(st.status(body.get("status") or {}, st.Observed(st.PENDING, "WaitingForSecret", msg),
                                      body["metadata"].get("generation", 1), None, st.now_iso()))
        kopf.warn(body, reason="WaitingForSecret", message=f"{msg}; retrying in {SECRET_RETRY_DELAY:g}s")
        raise kopf.TemporaryError(msg, delay=SECRET_RETRY_DELAY)
    created = _ensure_children(body, patch, name, uid, namespace, job_spec, runtime)
    if created is None:
        return
    if created:
        kopf.info(body, reason="Created", message=f"created {', '.join(created)} "
                                                  f"({job_spec.resources.nodes} node(s) x {max(1, job_spec.resources.gpusPerNode)} process(es))")
    if not phase:
        patch.status.update(st.status({}, st.Observed(st.PENDING, "Created", "trainer Job created"),
                                      body["metadata"].get("generation", 1), None, st.now_iso()))


def _ensure_children(body, patch, name, uid, namespace, job_spec, runtime) -> list[str] | None:
    """Create the missing children; None when the job failed for good (a refused child, a name
    held by someone else). A name still held by a deleted predecessor is retried for a while."""
    created = []
    try:
        for obj in manifests.children(name, uid, namespace, job_spec, operator_config()):
            _, new = kube.ensure(obj)
            if new:
                created.append(f"{obj['kind']}/{obj['metadata']['name']}")
    except kube.ChildRefused as e:
        kube.delete_children(namespace, manifests.child_names(name), owner_uid=uid)
        _fail(body, patch, "ChildRefused", str(e))
        return None
    except kube.NameTaken as e:
        if e.stale and runtime.total_seconds() < NAME_WAIT_SECONDS:
            msg = f"{e}; waiting for its garbage collection"
            kopf.warn(body, reason="WaitingForName", message=msg)
            raise kopf.TemporaryError(msg, delay=SECRET_RETRY_DELAY)
        _fail(body, patch, "NameConflict", f"{e}; delete it or choose another metadata.name")
        return None
    return created


@kopf.on.field(*RESOURCE, field="spec.runPolicy.suspend", registry=registry)
def suspend_changed(body, name, namespace, new, old, logger, **_):
    if old is None and not new:
        return
    if kube.set_job_suspend(namespace, name, bool(new)):
        kopf.info(body, reason="Suspended" if new else "Resumed",
                  message="trainer Job suspended" if new else "trainer Job resumed")


def _settings(spec, namespace: str) -> S3Settings:
    """The job's S3 settings, with the credentials of its Secret when it names one (the operator's
    own credentials may not reach the job's bucket)."""
    settings = S3Settings.from_spec(spec.storage)
    if spec.storage.credentialsSecret:
        data = kube.secret_data(namespace, spec.storage.credentialsSecret)
        settings = dataclasses.replace(settings, access_key=data.get("AWS_ACCESS_KEY_ID"),
                                       secret_key=data.get("AWS_SECRET_ACCESS_KEY"))
    return settings


@kopf.timer(*RESOURCE, interval=SYNC_INTERVAL, initial_delay=min(1.0, SYNC_INTERVAL), registry=registry)
def sync_status(body, spec, name, namespace, patch, logger, **_):
    """Recompute the status from the Job, its pods and what the trainer published; clean up
    after ttlSecondsAfterFinished."""
    previous = dict(body.get("status") or {})
    phase = previous.get("phase")
    try:
        job_spec = parse_spec(dict(spec))
    except SpecError:
        return  # reported by create_children
    if phase in st.FINISHED:
        return _ttl_cleanup(body, job_spec, name, namespace, previous, patch)
    if phase is None or previous.get("reason") in ("WaitingForSecret",):
        return
    job = kube.get_job(namespace, name)
    if job is None:
        return _recreate(body, patch, name, namespace, job_spec, previous)
    action = st.gang_action(job, job_spec.resources.nodes, int(previous.get("restarts") or 0),
                            job_spec.runPolicy.backoffLimit)
    if action:
        return _restart_gang(body, patch, name, namespace, job_spec, job, previous, action)
    pods = kube.job_pods(namespace, name) if job and st.needs_pods(job) else []
    complete = bool(job and any(c.get("type") == "Complete" and c.get("status") == "True"
                                for c in (job.get("status") or {}).get("conditions") or []))
    settings = _settings(job_spec, namespace)
    progress, error = artifacts.read_json(job_spec.output.uri, artifacts.PROGRESS_KEY, settings)
    manifest = None
    if complete:
        manifest, error = artifacts.read_json(job_spec.output.uri, artifacts.MANIFEST_KEY, settings)
    obs = st.observe(job, pods, progress, manifest, job_spec.runPolicy.suspend)
    obs = _storage_stall(obs, error, previous, patch)
    new = st.status(previous, obs, body["metadata"].get("generation", 1), job, st.now_iso())
    if _differs(previous, new):
        patch.status.update(new)
    if obs.phase != phase:
        message = f"{phase or 'New'} -> {obs.phase}: {obs.message}"
        (kopf.warn if obs.phase == st.FAILED or obs.stalled else kopf.info)(body, reason=obs.phase, message=message)


def _storage_stall(obs: st.Observed, error: str | None, previous: dict, patch) -> st.Observed:
    """A bucket the operator cannot read (with the job's credentials) is said in the status once it
    has lasted KUBELORA_STORAGE_STALL_SECONDS: a finished job waiting for its manifest is Stalled
    with the error instead of Exporting forever."""
    if not error:
        if previous.get("storageErrorSince"):
            patch.status["storageErrorSince"] = None
        return obs
    since = previous.get("storageErrorSince") or st.now_iso()
    patch.status["storageErrorSince"] = since
    waited = (datetime.now(timezone.utc) - datetime.fromisoformat(since.replace("Z", "+00:00"))).total_seconds()
    if waited < STORAGE_STALL_SECONDS:
        return obs
    return st.Observed(obs.phase, "StorageUnreadable", f"{error} (the operator reads output.uri with the job's "
                       "credentials; check spec.storage.credentialsSecret and the bucket policy)", stalled=True,
                       progress=obs.progress, artifacts=obs.artifacts)


def _restart_gang(body, patch, name, namespace, job_spec, job, previous, action) -> None:
    """A pod of a multi-node run failed: delete the whole Job (its pods go too) and make it again
    at the next sync, so every node starts together on a fresh rendezvous and resumes from the
    newest checkpoint; or fail the run once runPolicy.backoffLimit restarts are spent."""
    pods = kube.job_pods(namespace, name)
    problem = st.pod_problem(pods)
    why = problem[1] if problem else f"{(job.get('status') or {}).get('failed')} pod(s) failed"
    restarts = int(previous.get("restarts") or 0)
    if action == "fail":
        kube.delete_job(namespace, name, owner_uid=body["metadata"]["uid"])
        _fail(body, patch, "BackoffLimitExceeded",
              f"the run failed after {restarts} gang restart(s) (runPolicy.backoffLimit {job_spec.runPolicy.backoffLimit}): {why}")
        return
    kube.delete_job(namespace, name, owner_uid=body["metadata"]["uid"])
    patch.status["restarts"] = restarts + 1
    patch.status["restartPending"] = True
    kopf.warn(body, reason="GangRestart", message=f"{why}; restarting all {job_spec.resources.nodes} nodes together "
                                                  f"(restart {restarts + 1} of {job_spec.runPolicy.backoffLimit})")


def _recreate(body, patch, name, namespace, job_spec, previous) -> None:
    """The trainer Job is gone before the run finished (deleted by hand, deleted for a gang
    restart, or by something else): make it again, as a controller does with its children, and
    count it as a restart unless the gang restart already did."""
    uid = body["metadata"]["uid"]
    created = []
    try:
        for obj in manifests.children(name, uid, namespace, job_spec, operator_config()):
            if kube.ensure(obj)[1]:
                created.append(f"{obj['kind']}/{obj['metadata']['name']}")
    except (kube.ChildRefused, kube.NameTaken) as e:
        _fail(body, patch, "ChildRefused" if isinstance(e, kube.ChildRefused) else "NameConflict", str(e))
        return
    if previous.get("restartPending"):
        patch.status["restartPending"] = None
        kopf.info(body, reason="Recreated", message=f"created {', '.join(created) or 'nothing'} again for the gang restart")
        return
    restarts = int(previous.get("restarts") or 0) + 1
    patch.status["restarts"] = restarts
    kopf.warn(body, reason="Recreated", message=f"the trainer Job was gone before the run finished; created "
                                                f"{', '.join(created) or 'nothing'} again (restart {restarts})")


def _differs(old: dict, new: dict) -> bool:
    def strip(d):
        return {k: v for k, v in d.items() if k != "conditions"}, [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in d.get("conditions", [])]
    return strip(old) != strip(new)


def _ttl_cleanup(body, job_spec, name, namespace, previous, patch) -> None:
    ttl = job_spec.runPolicy.ttlSecondsAfterFinished
    if ttl is None or previous.get("childrenDeleted") or not previous.get("completionTime"):
        return
    done = datetime.fromisoformat(previous["completionTime"].replace("Z", "+00:00"))
    if (datetime.now(timezone.utc) - done).total_seconds() < ttl:
        return
    kube.delete_children(namespace, manifests.child_names(name))
    patch.status["childrenDeleted"] = True
    kopf.info(body, reason="CleanedUp", message=f"deleted the Job, Service and ConfigMap {ttl}s after finishing; "
                                                "the resource and its status stay")
