"""Kopf handlers: thin glue between events and the pure builders (manifests.py, status.py).

    kopf run -m kubelora_operator.handlers --all-namespaces      (python -m kubelora_operator)

Every handler is idempotent and restart-safe: children are created only when missing and never
after the run finished; status is recomputed from what exists, not remembered.

No handler puts a finalizer on anything: children are cleaned up by their ownerReferences, and the
status sync runs from watch events and a ticker of our own (syncer.py), not from a kopf timer,
which would make `kubectl delete` of a job wait for the operator (docs/decisions.md 28).
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import socket
from collections import OrderedDict
from datetime import datetime, timedelta, timezone

import kopf

from kubelora_trainer.models import UnsupportedModel, check_supported
from kubelora_trainer.spec import GROUP, PLURAL, VERSION, SpecError, parse_spec
from kubelora_trainer.storage import S3Settings

from kubelora_trainer.crd import spec_schema

from . import artifacts, crd_drift, env, kube, leader, manifests, metrics, syncer
from . import status as st

log = logging.getLogger("kubelora_operator.handlers")

RESOURCE = (GROUP, VERSION, PLURAL)
# Our own registry (not kopf's process-global default), so embedding or testing the operator
# next to other kopf code cannot mix handlers: kopf.operator(registry=handlers.registry).
registry = kopf.OperatorRegistry()


SYNC_INTERVAL = env.number("KUBELORA_SYNC_INTERVAL", 10.0)
SYNC_WORKERS = int(env.number("KUBELORA_SYNC_WORKERS", 4))
# a status sync running longer than this is stuck (every API request times out long before): the
# liveness probe fails and the kubelet restarts the operator (syncer.unhealthy)
SYNC_STUCK_SECONDS = env.number("KUBELORA_SYNC_STUCK_SECONDS", 900.0)
RETRY_DELAY = env.number("KUBELORA_RETRY_DELAY", 10.0)
NAME_WAIT_SECONDS = env.number("KUBELORA_NAME_WAIT_SECONDS", 120.0)
STORAGE_STALL_SECONDS = env.number("KUBELORA_STORAGE_STALL_SECONDS", 300.0)
# a Job without pods this long after it was made: its FailedCreate Events are read (quota, policy)
POD_CREATE_GRACE_SECONDS = env.number("KUBELORA_POD_CREATE_GRACE_SECONDS", 30.0)
# a pod not scheduled or not started this long after it began: its own Events are read (FailedMount...)
POD_START_GRACE_SECONDS = env.number("KUBELORA_POD_START_GRACE_SECONDS", st.START_GRACE_SECONDS)
# a gang failure no lost node explains yet is decided this long after its pods failed: a lost
# node's peers can fail (NCCL) before its Node reads Unknown (40-50 s after the loss)
GANG_FAILURE_GRACE_SECONDS = env.number("KUBELORA_GANG_FAILURE_GRACE_SECONDS", 60.0)
# a job still without a status this long after it was made is created by the sync: kopf skips the
# create handler of an object that carries a copied last-handled-configuration annotation
CREATE_TAKEOVER_SECONDS = env.number("KUBELORA_CREATE_TAKEOVER_SECONDS", 60.0)
# shared clusters: buckets read only with a job's own credentials; the S3 endpoints jobs may name
JOB_CREDENTIALS_ONLY = env.flag("KUBELORA_JOB_CREDENTIALS_ONLY")
ALLOWED_ENDPOINTS = env.words("KUBELORA_S3_ALLOWED_ENDPOINTS")
ALLOWED_IMAGES = env.words("KUBELORA_ALLOWED_IMAGES")            # prefixes ending in '/', ':' or '@', or exact
ALLOWED_SERVICE_ACCOUNTS = env.words("KUBELORA_ALLOWED_SERVICE_ACCOUNTS")
INSTANCE = os.environ.get("HOSTNAME") or socket.gethostname()  # Events' reportingInstance
# a job whose bucket does not answer is read less often, not at every sync: after a failure the next
# read waits this long, doubling up to the maximum
STORAGE_RETRY_SECONDS = env.number("KUBELORA_STORAGE_RETRY_SECONDS", 10.0)
STORAGE_RETRY_MAX_SECONDS = env.number("KUBELORA_STORAGE_RETRY_MAX_SECONDS", 120.0)
READS = artifacts.ReadBackoff(STORAGE_RETRY_SECONDS, STORAGE_RETRY_MAX_SECONDS)


def operator_config() -> manifests.OperatorConfig:
    """The trainer pods' settings from the environment (read at import too: a bad one stops the
    operator at start, env.SettingError, instead of failing every handler)."""
    return manifests.OperatorConfig(
        image=os.environ.get("KUBELORA_TRAINER_IMAGE", manifests.OperatorConfig.image),
        image_pull_policy=os.environ.get("KUBELORA_IMAGE_PULL_POLICY", manifests.OperatorConfig.image_pull_policy),
        run_as_user=env.user("KUBELORA_TRAINER_RUN_AS_USER", manifests.OperatorConfig.run_as_user),
        shm_size=os.environ.get("KUBELORA_TRAINER_SHM_SIZE") or manifests.OperatorConfig.shm_size,
        tmp_size=os.environ.get("KUBELORA_TRAINER_TMP_SIZE", manifests.OperatorConfig.tmp_size),
        metrics_port=int(env.number("KUBELORA_TRAINER_METRICS_PORT", manifests.OperatorConfig.metrics_port)),
        metrics_addr=os.environ.get("KUBELORA_TRAINER_METRICS_ADDR", manifests.OperatorConfig.metrics_addr),
        metrics_linger_seconds=int(env.number("KUBELORA_TRAINER_METRICS_LINGER_SECONDS",
                                              manifests.OperatorConfig.metrics_linger_seconds)),
        image_pull_secrets=env.words("KUBELORA_TRAINER_IMAGE_PULL_SECRETS"),
        job_network_policy=env.flag("KUBELORA_JOB_NETWORK_POLICY"),
        metrics_namespaces=(None if os.environ.get("KUBELORA_METRICS_NAMESPACES") is None
                            else env.words("KUBELORA_METRICS_NAMESPACES")),  # unset: any pod; empty: none
    )


operator_config()  # at import: a bad setting stops the operator at start


@kopf.on.login(registry=registry)
def login(**kwargs):
    """In-cluster service account, else KUBECONFIG (through the kubernetes client)."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_):
    settings.posting.level = 20  # INFO and above become Kubernetes Events
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"{GROUP}")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=f"{GROUP}", key="last-handled-configuration")
    # settings.persistence.finalizer stays kopf's default: the finalizer that earlier kubelora
    # operators (a kopf timer) put on every LoRATrainingJob. No handler here requires one, so kopf
    # removes that finalizer from every job it sees, and jobs stuck in deletion are released.
    settings.watching.server_timeout = 300
    # the trainer Jobs' watch is filtered by the API server: other Jobs never reach the operator
    settings.watching.label_selectors["batch", "v1", "jobs"] = manifests.JOB_LABEL


STARTED = [datetime.now(timezone.utc)]  # when this operator started (set again at kopf's startup)
# does the installed CRD declare every spec field this operator reads (a stale one prunes them)
CRD = crd_drift.Checker(lambda: kube.read_crd(crd_drift.CRD_NAME), spec_schema)


@kopf.on.startup(registry=registry)
async def start_sync(memo: kopf.Memo, **_):
    STARTED[0] = datetime.now(timezone.utc)
    await asyncio.to_thread(CRD.problem)  # said in the log at once
    memo.syncer = syncer.Syncer(sync, interval=SYNC_INTERVAL, workers=SYNC_WORKERS, exists=_exists)
    memo.syncer.start()
    metrics.watch(lambda: [body for _, body in memo.syncer.owners.items()])


@kopf.on.probe(id="syncs", registry=registry)
async def syncs_live(memo: kopf.Memo, **_):  # on the event loop: never queued behind handlers in kopf's threads
    """The liveness endpoint's answer (kopf's --liveness): the syncs in progress and queued, or a
    failure (HTTP 500, the kubelet restarts the pod) when they have stopped (syncer.unhealthy)."""
    sync = getattr(memo, "syncer", None)
    if sync is None:
        return {"running": 0}
    problem = sync.health(SYNC_STUCK_SECONDS)
    if problem:
        log.error("not live: %s; the liveness probe fails so that the kubelet restarts the operator", problem)
        raise kopf.PermanentError(problem)
    return {"running": len(sync.queue.running_since()), "failed": len(sync.queue.failed)}


@kopf.on.cleanup(registry=registry)
async def stop_sync(memo: kopf.Memo, **_):
    if getattr(memo, "syncer", None) is not None:
        await memo.syncer.stop()


@kopf.on.event(*RESOURCE, registry=registry)
async def training_job_event(event, memo: kopf.Memo, **_):
    """Every LoRATrainingJob the operator watches, remembered for the sync (no finalizer)."""
    memo.syncer.saw_owner(event.get("type"), copy.deepcopy(dict(event["object"])))


@kopf.on.event("batch", "v1", "jobs", labels={manifests.JOB_LABEL: kopf.PRESENT}, registry=registry)
async def trainer_job_event(event, memo: kopf.Memo, **_):
    """A trainer Job changed or went: sync its LoRATrainingJob now (no finalizer on Jobs either)."""
    memo.syncer.saw_child(event["object"])


class Changes:
    """What a handler or a sync decided: status fields to merge (None deletes one) and Events to
    post. Applied through kopf in kopf's handlers, through the API in the sync."""

    def __init__(self):
        self.status: dict = {}
        self.events: list[tuple[str, str, str]] = []
        self.gone = False  # the job was found deleted (a 404): the syncer forgets it

    def info(self, reason: str, message: str) -> None:
        self.events.append(("Normal", reason, message))

    def warn(self, reason: str, message: str) -> None:
        self.events.append(("Warning", reason, message))


def _apply_in_handler(changes: Changes, body, patch) -> None:
    leader.fence()
    if changes.status:
        patch.status.update(changes.status)
    for type_, reason, message in changes.events:
        (kopf.warn if type_ == "Warning" else kopf.info)(body, reason=reason, message=message)


def _apply(changes: Changes, body: dict, remember) -> None:
    meta = body["metadata"]
    if changes.status:
        patched = kube.patch_status(meta["namespace"], meta["name"], changes.status, uid=meta.get("uid"),
                                    resource_version=meta.get("resourceVersion"))
        if patched is not None:
            remember(patched)
        else:
            changes.gone = True
    for type_, reason, message in changes.events:
        kube.post_event(manifests.event(body, type_, reason, message, st.now_iso(), INSTANCE))


def _fail(body, changes: Changes, reason: str, message: str) -> None:
    changes.status.update(st.invalid(body.get("status") or {}, reason, message,
                                     body["metadata"].get("generation", 1), st.now_iso()))
    changes.warn(reason, message)
    metrics.failed(reason)


def _defer(body, changes: Changes, message: str, first: bool = False) -> None:
    """A child the API server refused for now (kube.deferrable: a full ResourceQuota, throttling):
    the job waits as Pending (CreateDeferred), not Stalled, and each sync tries the create again
    (_recreate; `first`: the job's first children, not counted as a restart). A quota that frees
    up when other jobs finish is how a shared cluster makes jobs wait."""
    reason = "CreateDeferred"
    previous = body.get("status") or {}
    if previous.get("reason") != reason:
        changes.warn(reason, f"{message}; trying again every {SYNC_INTERVAL:g} s")
    _wait(body, changes, reason, f"waiting: {message}")
    if first:
        changes.status["createPending"] = True


def _wait(body, changes: Changes, reason: str, message: str) -> None:
    """The job is Pending for `reason` (patched only when that changes the status)."""
    previous = body.get("status") or {}
    new = st.status(previous, st.Observed(st.PENDING, reason, message), body["metadata"].get("generation", 1), None,
                    st.now_iso())
    if _changes_status(previous, new):
        changes.status.update(new)


def _exists(key: syncer.Key, uid: "str | None") -> "bool | None":
    """Whether the API server still has this LoRATrainingJob (the same object: its uid); None when
    it cannot be told (an API error)."""
    try:
        body = kube.get_owner(*key)
    except Exception:  # noqa: BLE001 - unknown, not gone
        return None
    return body is not None and (uid is None or (body.get("metadata") or {}).get("uid") == uid)


def _not_made(status, **_) -> bool:
    return not (status or {}).get("phase")


# on a restart (or a leader's change) only the jobs not made yet: the others have nothing to make here
# (the sync follows them), and each would take a turn in kopf's handler threads at every start
@kopf.on.resume(*RESOURCE, registry=registry, when=_not_made)
@kopf.on.create(*RESOURCE, registry=registry)
def create_children(body, spec, name, namespace, uid, patch, runtime, **_):
    """Validate, then create the ConfigMap, Service and Indexed Job (each only if missing). A
    missing credentials Secret is not waited for here: the pods say it (CreateContainerConfigError,
    reported by the sync), and start by themselves once it is applied."""
    changes = Changes()
    try:
        with metrics.reconcile("create"):
            _create_children(body, spec, name, namespace, uid, runtime, changes)
    finally:
        _apply_in_handler(changes, body, patch)


def _create_children(body, spec, name, namespace, uid, runtime, changes: Changes) -> None:
    phase = (body.get("status") or {}).get("phase")
    if phase in st.FINISHED:
        return  # never recreate children of a finished run (e.g. after TTL cleanup)
    if phase:  # made before (kopf's resume after an operator restart): a missing child is the sync's to make
        return  # again (_recreate), which waits for the old pods and clears restartPending / createPending
    stale = CRD.problem()
    if stale:  # the job may have lost a field on its way in (or set one this operator does not know):
        changes.warn("CRDOutdated", stale)  # said where its user looks (kubectl describe)
    try:
        job_spec = parse_spec(dict(spec))
        check_supported(job_spec.model.type)
    except SpecError as e:
        return _fail(body, changes, "InvalidSpec", str(e))
    except UnsupportedModel as e:
        return _fail(body, changes, "UnsupportedModel", str(e))
    problem = (manifests.cluster_problem(job_spec)
               or manifests.tenancy_problem(job_spec, JOB_CREDENTIALS_ONLY, ALLOWED_ENDPOINTS, ALLOWED_IMAGES,
                                             ALLOWED_SERVICE_ACCOUNTS))
    if problem:
        return _fail(body, changes, "InvalidSpec", problem)
    r = job_spec.resources
    if r.cacheVolumeClaim and r.nodes > 1:
        problem = manifests.volume_problem(job_spec, kube.claim_access_modes(namespace, r.cacheVolumeClaim))
        if problem:
            return _fail(body, changes, "VolumeNotShared", problem)
    if _predecessor_lingers(body, changes, name, namespace, uid):
        changes.status["trainerImage"] = job_spec.resources.image or operator_config().image  # as below
        return
    created = _ensure_children(body, changes, name, uid, namespace, job_spec, runtime)
    if created is None:
        return
    if created:
        changes.info("Created", f"created {', '.join(created)} "
                                f"({job_spec.resources.nodes} node(s) x {max(1, job_spec.resources.gpusPerNode)} process(es))")
    changes.status.update(st.status({}, st.Observed(st.PENDING, "Created", "trainer Job created"),
                                     body["metadata"].get("generation", 1), None, st.now_iso()))
    # the run keeps this trainer through gang restarts: an operator upgrade must not switch a
    # running job to a trainer that may refuse its checkpoints
    changes.status["trainerImage"] = job_spec.resources.image or operator_config().image
    changes.status["appliedSuspend"] = job_spec.runPolicy.suspend  # the Job is made with it


def _take_over_creation(body, changes: Changes) -> None:
    """A job without any status CREATE_TAKEOVER_SECONDS after it was made is created here. kopf
    runs create_children for a new object only when it carries no last-handled-configuration
    annotation of ours (kopf's diff base): one copied with the manifest (`kubectl get -o yaml`
    edited and applied, manifests exported from a cluster into git, a backup restored without its
    status) makes kopf take the job for one already handled, and it would never be made nor get a
    status. The creation is the same, idempotent one (each child only if missing). The ticker
    syncs a job without a status (syncer.needs_polling)."""
    meta = body["metadata"]
    made = st.parse_time(meta.get("creationTimestamp"))
    if made is None:
        return
    # counted from the operator's start too: after a restart kopf's own handler gets its turn first
    age = datetime.now(timezone.utc) - max(made, STARTED[0])
    # kopf's own handler may be retrying (a name held by a deleted job's children, NAME_WAIT_SECONDS);
    # progress annotations copied with the manifest do not hold the job back for longer than that
    wait = CREATE_TAKEOVER_SECONDS + (NAME_WAIT_SECONDS if kopf_is_handling(meta) else 0.0)
    if age.total_seconds() < wait:
        return
    log.warning("%s/%s has no status %.0f s after it was made: creating its children (kopf took it for handled: a "
                "copied %s/last-handled-configuration annotation?)", meta["namespace"], meta["name"],
                age.total_seconds(), GROUP)
    try:  # no deadline of its own for a name still held by a deleted job's children (runtime 0)
        _create_children(body, body.get("spec") or {}, meta["name"], meta["namespace"], meta["uid"], timedelta(0),
                         changes)
    except kopf.TemporaryError as e:  # then the job waits, and the sync makes it (_recreate), not counted
        _wait(body, changes, "WaitingForName", str(e))
        changes.status["createPending"] = True


def kopf_is_handling(meta: dict) -> bool:
    """Whether kopf has a handler of this object under way (its progress annotations, which kopf
    removes once the handlers are done). Pure."""
    return any(k.startswith(f"{GROUP}/") and k != f"{GROUP}/last-handled-configuration"
               for k in (meta.get("annotations") or {}))


def _predecessor_lingers(body, changes: Changes, name, namespace, uid) -> bool:
    """A job deleted and made again under the same name (kubectl delete then apply, Argo CD's
    Replace=true): the deleted one's pods may still be terminating, writing its checkpoint for up
    to their grace period, under the same DNS names (<name>-0.<name>-workers) and at the same
    output. Then the job waits as Pending (WaitingForOldPods) and the sync makes its children once
    they are gone (_recreate waits for them, and createPending keeps that from counting as a
    restart). Its Service selects only its own pods (manifests.UID_LABEL) in any case."""
    gone = st.predecessors(kube.job_pods(namespace, name), uid, manifests.UID_LABEL)
    old = _lingering(gone, st.gang_size(gone) > 1)
    if not old:
        return False
    reason = "WaitingForOldPods"
    changes.info(reason, f"waiting for {', '.join(old)} of a deleted job of the same name to stop before making "
                         "the trainer Job")
    _wait(body, changes, reason, f"waiting for {len(old)} pod(s) of a deleted job of the same name to stop (they "
                                 "may still be writing its checkpoint)")
    changes.status["createPending"] = True
    return True


def _ensure_children(body, changes: Changes, name, uid, namespace, job_spec, runtime) -> list[str] | None:
    """Create the missing children; None when the job failed for good (a refused child, a name
    held by someone else). A name still held by a deleted predecessor is retried for a while."""
    created = []
    try:
        for obj in manifests.children(name, uid, namespace, job_spec, operator_config(), body["metadata"].get("labels")):
            _, new = kube.ensure(obj)
            if new:
                created.append(f"{obj['kind']}/{obj['metadata']['name']}")
                metrics.created(obj["kind"])
    except kube.ChildDeferred as e:  # the sync makes the children once the API server takes them
        _defer(body, changes, str(e), first=True)
        return None
    except kube.ChildRefused as e:
        kube.delete_children(namespace, _children(name), owner_uid=uid)
        _fail(body, changes, "ChildRefused", str(e))
        return None
    except kube.NameTaken as e:
        if e.stale and runtime.total_seconds() < NAME_WAIT_SECONDS:
            msg = f"{e}; waiting for its garbage collection"
            changes.warn("WaitingForName", msg)
            raise kopf.TemporaryError(msg, delay=RETRY_DELAY)
        _fail(body, changes, "NameConflict", f"{e}; delete it or choose another metadata.name")
        return None
    return created


@kopf.on.field(*RESOURCE, field="spec.runPolicy.suspend", registry=registry)
def suspend_changed(body, name, namespace, new, old, logger, **_):
    """runPolicy.suspend edited where it changes nothing, said: a finished run, a Job queued in Kueue
    (Kueue owns its spec.suspend: it unsuspends every admitted Job, so writing it would fight Kueue).
    Otherwise the sync writes it to the Job (st.suspend_to_apply), whenever the two differ."""
    if old is None and not new:
        return
    if (body.get("status") or {}).get("phase") in st.FINISHED:
        kopf.info(body, reason="SuspendNotApplied", message="the run has finished; runPolicy.suspend changes nothing")
        return
    # the job's own labels, which its Job copies: said also while the Job is not made yet (a retried
    # create); else the Job's, where Kueue's default-LocalQueue webhook labelled the Job alone
    queue = (manifests.kueue_queue((body.get("metadata") or {}).get("labels"))
             or manifests.kueue_queue(((kube.get_job(namespace, name) or {}).get("metadata") or {}).get("labels")))
    if queue:
        kopf.warn(body, reason="SuspendNotApplied", message=st.kueue_suspend_note(queue))


_SECRET_NOTED: set = set()   # (namespace, Secret, its ignored keys) said once per operator process


def _secret_keys_note(namespace: str, name: str, data: dict, changes: "Changes | None") -> None:
    """A credentials Secret with keys the trainer does not get (manifests.secret_env) is said once:
    before, envFrom passed every key, so a Secret holding AWS_ENDPOINT_URL or AWS_REGION worked."""
    extra = manifests.ignored_secret_keys(data)
    if not extra or changes is None or (namespace, name, tuple(extra)) in _SECRET_NOTED:
        return
    _SECRET_NOTED.add((namespace, name, tuple(extra)))
    changes.warn("SecretKeysIgnored", f"Secret {name!r} (spec.storage.credentialsSecret) holds {', '.join(extra)}, "
                 "which the trainer does not get: it gets AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
                 "AWS_SESSION_TOKEN only; set the endpoint and region in spec.storage")


def _settings(spec, namespace: str, changes: "Changes | None" = None) -> tuple[S3Settings, str | None]:
    """The job's S3 settings, with the credentials of its Secret when it names one (the operator's
    own credentials may not reach the job's bucket); or the error when that Secret is missing
    (then the bucket is not read with the operator's own credentials instead)."""
    settings = S3Settings.from_spec(spec.storage)
    name = spec.storage.credentialsSecret
    problem = manifests.tenancy_problem(spec, JOB_CREDENTIALS_ONLY, ALLOWED_ENDPOINTS)
    if problem:  # a job made before the setting: its bucket is not read
        return settings, problem
    if not name:
        return settings, None
    try:
        data = kube.secret_data(namespace, name)  # cached: not one API read per sync
    except kube.SecretForbidden:
        return settings, (f"the operator may not read Secret {name!r} (spec.storage.credentialsSecret): the chart "
                          "value rbac.secretNames lists the Secrets it may read; add it there, or name one of those")
    if data is None:
        return settings, (f"Secret {name!r} (spec.storage.credentialsSecret) not found in namespace {namespace}; "
                          "create it with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    _secret_keys_note(namespace, name, data, changes)
    keys = {k: data.get(k) for k, optional in manifests.SECRET_KEYS if not optional}
    if not all(keys.values()):
        if JOB_CREDENTIALS_ONLY:  # never the operator's own credentials instead (operator.s3.jobCredentialsOnly)
            missing = " and ".join(k for k, v in keys.items() if not v)
            return settings, (f"Secret {name!r} (spec.storage.credentialsSecret) has no {missing}; the operator reads "
                              "a job's bucket only with the job's own keys (operator.s3.jobCredentialsOnly)")
        return settings, None   # as a job without a Secret: the operator's own storage access
    return dataclasses.replace(settings, access_key=keys["AWS_ACCESS_KEY_ID"], secret_key=keys["AWS_SECRET_ACCESS_KEY"],
                               session_token=data.get("AWS_SESSION_TOKEN")), None


def sync(body: dict, remember) -> bool:
    """Recompute one job's status from its Job, its pods and what the trainer published; restart
    a failed gang, make a vanished Job again, clean up after ttlSecondsAfterFinished. Called by
    the syncer's workers (a thread) with the newest body the watch or our last patch gave;
    `remember` takes the body our status patch returns. Returns False when the job turned out to
    be deleted (its DELETED event can be missed across a watch restart: the syncer forgets it)."""
    changes = Changes()
    try:
        with metrics.reconcile("sync"):
            _sync(body, changes)
    finally:
        _apply(changes, body, remember)
    return not changes.gone


def _sync(body: dict, changes: Changes) -> None:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    previous = dict(body.get("status") or {})
    phase = previous.get("phase")
    if phase is None:  # kopf's create_children makes it; or, where kopf takes it for handled, this
        return _take_over_creation(body, changes)
    if phase in st.FINISHED:  # not run again, but an edit (runPolicy.suspend) is still observed (kstatus)
        changes.status.update(st.follow_generation(previous, meta.get("generation", 1)))
    try:
        job_spec = parse_spec(dict(body.get("spec") or {}), admitted=True)  # checks added since: not again
    except SpecError as e:  # a new job's is reported by create_children
        if phase and phase not in st.FINISHED and previous.get("reason") != "InvalidSpec":
            # a run an older operator admitted whose spec this one refuses (a check added since): said,
            # not left unsynced in silence
            msg = (f"{e}; an older operator admitted this spec, this one refuses it and no longer follows the run "
                   "(its trainer Job goes on): delete the job and create it again with the fix")
            changes.status.update(st.status(previous, st.Observed(phase, "InvalidSpec", msg, stalled=True),
                                            meta.get("generation", 1), None, st.now_iso()))
            changes.warn("InvalidSpec", msg)
        return
    if phase in st.FINISHED:
        if previous.get("stopJob"):  # failed, its Job not stopped yet (the call failed, or the operator stopped)
            job = kube.get_job(namespace, name)
            if job is not None and (job.get("metadata") or {}).get("uid") == previous["stopJob"]:
                _stop_failed_job(namespace, name, job, meta["uid"], changes)
            else:
                changes.status["stopJob"] = None  # gone, or another Job: nothing of this run to stop
        return _ttl_cleanup(body, job_spec, name, namespace, previous, changes)
    job = kube.get_job(namespace, name)
    if job is not None and kube.ownership(job, meta["uid"]) == "stale":  # a deleted job's of the same name
        return _wait(body, changes, "WaitingForOldPods", "waiting for the trainer Job of a deleted job of the same "
                                                         "name to be deleted")
    if job is None:
        return _recreate(body, changes, name, namespace, job_spec, previous)
    _fence(meta, changes)
    _account(changes, previous, job)
    if previous.get("restartedJob") and previous["restartedJob"] == (job.get("metadata") or {}).get("uid"):
        # a gang restart recorded but its Job not deleted (the operator stopped in between): delete it now
        kube.delete_job(namespace, name, owner_uid=meta["uid"])
        return
    pods = st.own_pods(kube.job_pods(namespace, name), job) if st.needs_pods(job) else []
    if st.needs_pods(job):  # pods are being made or replaced: they need the Service's names and the spec
        _ensure_support(meta, namespace, name, job_spec, job, changes)
    if _evicted(body, changes, name, namespace, job, pods, previous):
        return
    disruption = st.disrupted(pods)
    held = st.deciding(previous, job)
    action = st.gang_action(job, job_spec.resources.nodes, st.counted_restarts(previous),
                            job_spec.runPolicy.backoffLimit, disruption, deciding=held is not None)
    if action in ("restart", "fail"):  # a node that never ran: the rendezvous waited for it in vain
        incomplete = st.gang_incomplete(pods, job_spec.resources.nodes, st.pod_count(job))
        if incomplete:
            action, disruption = "restart_waiting", incomplete
    if action in ("restart", "fail"):  # the peers of a lost node's pod fail before the pod is marked
        nodes = _gang_nodes(pods, changes)
        disruption = st.node_lost(pods, nodes)
        if disruption and not st.same_lost_node(disruption, previous.get("lastDisruption")):
            action = "restart_uncounted"
        else:
            disruption = None
            now = datetime.now(timezone.utc)
            since = st.failed_since(pods, held, now)
            waiting = st.gang_failure_wait(pods, nodes, since, now, GANG_FAILURE_GRACE_SECONDS)
            if waiting:  # the next syncs read the Nodes again (the ticker: the job stays active)
                return _decide_later(body, changes, job, pods, previous, since, waiting)
    if not action and job_spec.resources.nodes < 2 and (why := _stranded(pods, changes)):
        # one node: no peer fails to tell the loss, and the Job replaces the pod only once it is
        # gone, which a lost node's pod never is (Terminating until the Node is removed)
        counted = st.same_lost_node(why, previous.get("lastDisruption"))
        action = ("fail" if st.counted_restarts(previous) >= job_spec.runPolicy.backoffLimit else "restart") \
            if counted else "restart_uncounted"
        disruption = None if counted else why
        return _restart_gang(body, changes, name, namespace, job_spec, job, pods, previous, action, disruption, held,
                             why=f"{why}; its pod stayed Terminating past its grace period")
    if action:
        return _restart_gang(body, changes, name, namespace, job_spec, job, pods, previous, action, disruption,
                             held)
    if previous.get("gangFailure"):  # decided by the Job itself (it failed, or was made again)
        changes.status["gangFailure"] = None
    # after the failure paths, which suspend a failed run's Job themselves (a sync whose Failed status
    # did not land must not resume it)
    queue = manifests.kueue_queue((job.get("metadata") or {}).get("labels"))
    requested = job_spec.runPolicy.suspend
    suspend = st.suspend_to_apply(job, requested, queue, previous.get("appliedSuspend"))
    if suspend is not None and kube.set_job_suspend(namespace, name, suspend):
        job.setdefault("spec", {})["suspend"] = suspend
        changes.status["appliedSuspend"] = suspend  # what the operator wrote (not what another controller holds)
        changes.info("Suspended" if suspend else "Resumed", "trainer Job suspended (runPolicy.suspend)" if suspend
                     else "trainer Job resumed (runPolicy.suspend)")
    complete = any(c.get("type") == "Complete" and c.get("status") == "True"
                   for c in (job.get("status") or {}).get("conditions") or [])
    settings, error = _settings(job_spec, namespace, changes)
    progress = manifest = None
    store = artifacts.store_of(job_spec.output.uri, settings)  # one dead store holds one worker, not all
    if error is None:
        progress, error = READS.read((meta.get("uid"), "progress"), lambda: artifacts.read_json(
            job_spec.output.uri, artifacts.PROGRESS_KEY, settings), store)
        progress = st.own_progress(progress, meta.get("uid"))
    if complete and error is None:
        manifest, error = READS.read((meta.get("uid"), "manifest"), lambda: artifacts.read_json(
            job_spec.output.uri, artifacts.MANIFEST_KEY, settings), store)
    if error and progress is None:
        progress = st.last_reported(previous)
    now = datetime.now(timezone.utc)  # suspended as the Job is, not as asked (the patch above may have found none)
    obs = st.observe(job, pods, progress, manifest, bool((job.get("spec") or {}).get("suspend")) and not queue,
                     queue, now)
    obs = st.name_missing_secret(obs, job_spec.storage.credentialsSecret)
    if obs.phase == st.PENDING and obs.reason in ("Unschedulable", *st.NOT_STARTED_REASONS):
        slow = st.slow_to_start(pods, now, POD_START_GRACE_SECONDS)
        if slow is not None:  # its Events say why: FailedMount, FailedAttachVolume, NotTriggerScaleUp...
            obs = st.pod_events(obs, slow, kube.pod_events(namespace, slow))
    if st.awaits_pods(job, now, POD_CREATE_GRACE_SECONDS):
        obs = st.pods_refused(obs, st.recent(kube.failed_create_events(namespace, job), now), job)
    obs = _storage_stall(obs, error, previous, changes)
    new = st.status(previous, obs, meta.get("generation", 1), job, st.now_iso())
    if _changes_status(previous, new):
        changes.status.update(new)
    sampled = st.sample_event(previous.get("progress"), new.get("progress"), job_spec.output.uri)
    if sampled:
        changes.info("Samples", sampled)
    if obs.phase != phase:
        message = f"{phase or 'New'} -> {obs.phase}: {obs.message}"
        (changes.warn if obs.phase == st.FAILED or obs.stalled else changes.info)(obs.phase, message)


def _storage_stall(obs: st.Observed, error: str | None, previous: dict, changes: Changes) -> st.Observed:
    """A bucket the operator cannot read (with the job's credentials) is said in the status once it
    has lasted KUBELORA_STORAGE_STALL_SECONDS: a finished job waiting for its manifest is Stalled
    with the error instead of Exporting forever. A job already stalled for a reason of its pods
    (e.g. the missing Secret itself) keeps that, more telling, reason."""
    if not error:
        if previous.get("storageErrorSince"):
            changes.status["storageErrorSince"] = None
        return obs
    since = previous.get("storageErrorSince") or st.now_iso()
    changes.status["storageErrorSince"] = since
    waited = (datetime.now(timezone.utc) - datetime.fromisoformat(since.replace("Z", "+00:00"))).total_seconds()
    if waited < STORAGE_STALL_SECONDS or obs.stalled:
        return obs
    return st.Observed(obs.phase, "StorageUnreadable", f"{error} (the operator reads output.uri with the job's "
                       "credentials; check spec.storage.credentialsSecret and the bucket policy)", stalled=True,
                       progress=obs.progress, artifacts=obs.artifacts)


NODES_RULE = "get on nodes (cluster-scoped; the chart's ClusterRole has it with rbac.create)"
_nodes_forbidden_logged = False


def _ensure_support(meta: dict, namespace: str, name: str, job_spec, job: dict, changes: Changes) -> None:
    """The ConfigMap (the spec the pods mount) and the headless Service (the names the ranks meet
    at) made again when deleted while the Job runs: a pod the Job controller makes (a replacement
    after a preemption, or the first ones) would otherwise wait in ContainerCreating or fail to
    find its peers, each failure charged to the backoff limit. A Service that selects another
    attempt's pods (its patch at the gang restart failed) is pointed at this Job's. Read only while
    pods are being made or replaced (st.needs_pods): one read of each."""
    wanted = manifests.attempt_selector(job) if (job.get("metadata") or {}).get("uid") else {}
    for obj in manifests.children(name, meta["uid"], namespace, job_spec, operator_config(), meta.get("labels")):
        kind = obj["kind"]
        if kind not in ("ConfigMap", "Service"):
            continue
        there = kube.read_child(kind, namespace, obj["metadata"]["name"])
        if there is not None:
            selector = (there.get("spec") or {}).get("selector") or {}
            if kind == "Service" and wanted and wanted.items() - selector.items() \
                    and kube.ownership(there, meta["uid"]) == "ours":
                # pointed at an earlier attempt's pods (the patch at the gang restart failed, or an
                # older operator made it): the ranks meet at this Job's pods only
                kube.select_pods_of(namespace, obj["metadata"]["name"], wanted)
            continue
        try:
            kube.ensure(obj)
        except (kube.ChildDeferred, kube.ChildRefused, kube.NameTaken) as e:  # said; the next sync tries again
            changes.warn("ChildMissing", f"{kind}/{obj['metadata']['name']} was deleted while the trainer Job runs "
                                         f"and could not be made again: {e}")
            continue
        metrics.created(kind)
        if kind == "Service" and wanted:
            kube.select_pods_of(namespace, obj["metadata"]["name"], wanted)
        changes.warn("ChildRecreated", f"{kind}/{obj['metadata']['name']} was deleted while the trainer Job runs; "
                                       "made again (its pods need it)")


def _lingering(pods: list[dict], multi_node: bool) -> list[str]:
    """st.lingering; for a multi-node run with the Nodes of the pods it would wait for read (only
    then, once per sync): a pod on a lost node is not waited for (its peers gone, it can neither
    checkpoint nor meet the new gang). A single-node run's pod cut off by a partition may still be
    training and checkpointing: waited for, its grace period bounding the wait. Nodes that cannot be
    read (RBAC) change nothing."""
    now = datetime.now(timezone.utc)
    old = st.lingering(pods, now)
    if not old or not multi_node:
        return old
    try:
        nodes = kube.nodes(st.pod_nodes([p for p in pods if p["metadata"].get("name") in old]))
    except kube.NodesForbidden:
        return old  # said where it matters, at a gang failure (_gang_nodes)
    return st.lingering(pods, now, nodes=nodes)


def _gang_nodes(pods: list[dict], changes: Changes) -> dict | None:
    """The Nodes of the failed gang's pods, read at the failure (see st.node_lost); None when
    RBAC does not let the operator read Nodes: then only a pod's DisruptionTarget condition tells a
    disruption, said once in the log and in an Event on the job at each gang failure."""
    global _nodes_forbidden_logged
    names = st.pod_nodes(pods)
    if not names:
        return {}
    try:
        return kube.nodes(names)
    except kube.NodesForbidden as e:
        why = (f"node readiness cannot be checked: the operator may not read Nodes ({e}); grant it {NODES_RULE}. "
               "Until then a gang failure counts against runPolicy.backoffLimit unless a pod is already marked "
               "DisruptionTarget")
        if not _nodes_forbidden_logged:
            log.warning(why)
            _nodes_forbidden_logged = True
        changes.warn("NodeReadinessUnknown", why)
        return None


def _evicted(body, changes: Changes, name, namespace, job, pods, previous) -> bool:
    """Pods evicted by their node's kubelet (node pressure: memory, disk): each is counted once in
    status.evictions and said in a Warning Event with the kubelet's message. The Job's
    podFailurePolicy ignores them (DisruptionTarget) and a gang restart after one is not counted,
    so the run would be retried forever on nodes that evict it again: at st.EVICTION_LIMIT it fails
    (reason Evicted) with what to change, its Job suspended as after the last gang restart. True
    when it failed."""
    counted = list(previous.get("evictedPods") or [])
    new = [(pod, message) for pod, message in st.evictions(pods) if pod not in counted]
    if not new:
        return False
    for pod, message in new:
        changes.warn("Evicted", f"pod {pod} was evicted by its node's kubelet: {message}")
    total = int(previous.get("evictions") or 0) + len(new)
    changes.status["evictions"] = total
    changes.status["evictedPods"] = (counted + [pod for pod, _ in new])[-2 * st.EVICTION_LIMIT:]
    if total < st.EVICTION_LIMIT:
        return False
    pod, message = new[-1]
    _fail(body, changes, "Evicted", f"{total} of the run's pods were evicted by their node's kubelet (limit "
                                    f"{st.EVICTION_LIMIT}); newest: pod {pod}: {message}; {st.eviction_fix(message)}")
    meta = body["metadata"]  # Failed recorded first, as _restart_gang's "fail": a Job gone without it is made again
    changes.status["stopJob"] = (job.get("metadata") or {}).get("uid")
    if kube.patch_status(namespace, name, changes.status, uid=meta.get("uid"),
                         resource_version=meta.get("resourceVersion")) is None:
        changes.gone = True
        return True
    _stop_failed_job(namespace, name, job, meta["uid"], changes)
    return True


def _stop_failed_job(namespace: str, name: str, job: dict, owner_uid: str, changes: Changes) -> None:
    """A failed run's trainer Job (status.stopJob: its uid) stopped: suspended, so its peers stop and
    the failed pods keep their logs until ttlSecondsAfterFinished; deleted when queued in Kueue
    (Kueue would take a suspended Job for preempted and queue it again). status.stopJob is cleared
    once done; a call that raises leaves it for the next sync (_sync's finished branch)."""
    if manifests.kueue_queue((job.get("metadata") or {}).get("labels")):
        kube.delete_job(namespace, name, owner_uid=owner_uid)
    else:
        kube.set_job_suspend(namespace, name, True)
    changes.status["stopJob"] = None


def _decide_later(body, changes: Changes, job, pods, previous, since: datetime, waiting: list[str]) -> None:
    """A gang failure that would be counted, while the Nodes of some of its pods may yet read lost
    (st.gang_failure_wait): not charged yet. The Job is left as it is meanwhile (the Job controller
    may replace the failed pods, which wait at the old rendezvous; the decision deletes the Job, and
    them, once); status.gangFailure holds the decision's start, so an operator restart goes on
    with it, and the status says what is waited for. Each sync reads the Nodes again."""
    problem = st.pod_problem(pods)
    why = problem[1] if problem else f"{(job.get('status') or {}).get('failed')} pod(s) failed"
    until = st.iso(since + timedelta(seconds=GANG_FAILURE_GRACE_SECONDS))
    held = {"job": job["metadata"]["uid"], "since": st.iso(since)}
    if previous.get("gangFailure") != held:
        changes.status["gangFailure"] = held
        changes.info("GangFailureDeciding", f"{why}; waiting until {until} for the Nodes of {', '.join(waiting)} "
                                            "before restarting the gang: a restart after a lost node is not counted "
                                            "against runPolicy.backoffLimit")
    phase = previous.get("phase") if previous.get("phase") in st.ACTIVE else st.PENDING  # active: the ticker syncs
    obs = st.Observed(phase, "GangFailureDeciding", f"{why}; the gang restarts by {until}, not counted against "
                      f"runPolicy.backoffLimit if the Node of {', '.join(waiting)} reads lost by then")
    new = st.status(previous, obs, body["metadata"].get("generation", 1), job, st.now_iso())
    if _changes_status(previous, new):
        changes.status.update(new)


def _stranded(pods: list[dict], changes: Changes) -> str | None:
    """'pod NAME on node NODE: WHY' when a pod of the Job is still Terminating past its grace
    period on a Node that reads lost (st.stranded, st.node_lost); None otherwise, or when Nodes
    cannot be read."""
    gone = st.stranded(pods, datetime.now(timezone.utc))
    if not gone:
        return None
    stuck = [p for p in pods if p["metadata"].get("name") in gone]
    return st.node_lost(stuck, _gang_nodes(stuck, changes))


def _restart_gang(body, changes: Changes, name, namespace, job_spec, job, pods, previous, action,
                  disruption: str | None = None, held: dict | None = None, why: str | None = None) -> None:
    """A pod of a multi-node run failed: delete the whole Job (its pods go too) and make it again
    at the next sync, so every node starts together on a fresh rendezvous and resumes from the
    newest checkpoint; or fail the run once runPolicy.backoffLimit restarts are spent (the Job is
    then suspended, not deleted: its failed pods keep their logs). A restart
    after a disruption (a node lost or drained under the run) is not counted against the limit.
    `held`: the failure was being decided (status.gangFailure): decided now, once. `why`: what
    happened, where it is not a failed pod."""
    problem = st.pod_problem(pods)
    why = why or (problem[1] if problem else f"{(job.get('status') or {}).get('failed')} pod(s) failed")
    if action != "fail":
        _restart_gang_status(body, changes, job_spec, job, previous, action, disruption, why, held)
    else:
        if previous.get("gangFailure"):
            changes.status["gangFailure"] = None
        counted, limit = st.counted_restarts(previous), job_spec.runPolicy.backoffLimit
        _fail(body, changes, "BackoffLimitExceeded",
              f"the run failed after {counted} gang restart(s) (runPolicy.backoffLimit {limit}): "
              f"{why}{_after_wait(held, disruption)}")
    # the decision is recorded before the Job goes: an operator stopped between the two deletes the
    # Job at its next sync (status.restartedJob) instead of counting the failure again, and a failed
    # run is never made again (its Job gone, no Failed status yet: the next sync would recreate it);
    # a failed run's Job still to stop is status.stopJob until it is (_stop_failed_job)
    meta = body["metadata"]
    if action == "fail":
        changes.status["stopJob"] = (job.get("metadata") or {}).get("uid")
    if kube.patch_status(namespace, name, changes.status, uid=meta.get("uid"),
                         resource_version=meta.get("resourceVersion")) is None:
        changes.gone = True  # deleted (perhaps made again) meanwhile: its Job is not ours to touch
        return
    if action == "fail":
        _stop_failed_job(namespace, name, job, meta["uid"], changes)
    else:
        kube.delete_job(namespace, name, owner_uid=body["metadata"]["uid"])


def _after_wait(held, disruption) -> str:
    return " (decided after waiting for the gang's Nodes: none read lost)" if held and not disruption else ""


def _restart_gang_status(body, changes: Changes, job_spec, job, previous, action, disruption, why, held) -> None:
    restarts, counted, limit = int(previous.get("restarts") or 0), st.counted_restarts(previous), job_spec.runPolicy.backoffLimit
    why += _after_wait(held, disruption)
    if previous.get("gangFailure"):
        changes.status["gangFailure"] = None
    changes.status["restarts"] = restarts + 1
    changes.status["restartPending"] = True
    changes.status["restartedJob"] = (job.get("metadata") or {}).get("uid")
    nodes = job_spec.resources.nodes
    if action == "restart_waiting":  # disruption: why the gang was never whole (st.gang_incomplete)
        changes.status["waitRestarts"] = int(previous.get("waitRestarts") or 0) + 1
        metrics.restarted("gang_incomplete")
        waiting = f"waiting for the whole gang: {disruption}"
        changes.warn("GangRestart", f"{why}; {waiting}; restarting all {nodes} nodes together, not counted against "
                                    f"runPolicy.backoffLimit ({counted} of {limit} spent)")
        _wait(body, changes, "WaitingForGang", f"{waiting} (the other nodes cannot start without it; all {nodes} nodes "
                                               "restarted together, not counted as a failure)")
        return
    if action == "restart_uncounted":
        changes.status["disruptionRestarts"] = int(previous.get("disruptionRestarts") or 0) + 1
        changes.status["lastDisruption"] = disruption
        metrics.restarted("disruption")
        changes.warn("GangRestart", f"{why}, after a disruption ({disruption}); restarting all {nodes} "
                                    f"nodes together, not counted against runPolicy.backoffLimit ({counted} of {limit} spent)")
        return
    metrics.restarted("gang")
    changes.warn("GangRestart", f"{why}; restarting all {nodes} nodes together (restart {counted + 1} of {limit})")


def _account(changes: Changes, previous: dict, job: dict) -> None:
    """Keep what the run's Jobs spent of runPolicy.activeDeadlineSeconds (status.deadlineUsedSeconds,
    status.jobStartTime: st.deadline_used), and the trainer image of a run started before the
    operator recorded one (an upgrade from an older operator): the running Job's."""
    running, stopped = st.job_running_since(job)
    used, started = st.deadline_used(previous.get("deadlineUsedSeconds"), previous.get("jobStartTime"), running,
                                     datetime.now(timezone.utc), stopped)
    if started != previous.get("jobStartTime"):
        changes.status.update(jobStartTime=started, deadlineUsedSeconds=round(used, 1))
    if not previous.get("trainerImage"):
        containers = ((((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or [{}])
        if containers[0].get("image"):
            changes.status["trainerImage"] = containers[0]["image"]


def _recreate(body, changes: Changes, name, namespace, job_spec, previous) -> None:
    """The trainer Job is gone before the run finished (deleted by hand, deleted for a gang
    restart, or by something else): make it again, as a controller does with its children, and
    count it as a restart unless the gang restart already did. Not when the job itself is gone or
    going (the Job's DELETED event can come before the job's own): checked with a fresh read."""
    uid = body["metadata"]["uid"]
    now = kube.get_owner(namespace, name)
    if now is None or now["metadata"].get("uid") != uid or now["metadata"].get("deletionTimestamp"):
        changes.gone = now is None or now["metadata"].get("uid") != uid
        return
    old_pods = _lingering(kube.job_pods(namespace, name), job_spec.resources.nodes > 1)
    if old_pods:  # the next sync looks again
        reason = "WaitingForOldPods"
        if previous.get("reason") != reason:
            changes.info(reason, f"waiting for {', '.join(old_pods)} of the previous attempt to stop before "
                                 "making the trainer Job again")
        _wait(now, changes, reason, f"waiting for {len(old_pods)} pod(s) of the previous attempt to stop")
        return
    used, _ = st.deadline_used(previous.get("deadlineUsedSeconds"), previous.get("jobStartTime"), None,
                               datetime.now(timezone.utc))
    if used != float(previous.get("deadlineUsedSeconds") or 0.0) or previous.get("jobStartTime"):
        changes.status.update(deadlineUsedSeconds=round(used, 1), jobStartTime=None)
    left = st.deadline_left(job_spec.runPolicy.activeDeadlineSeconds, used)
    if left == 0:
        _fail(body, changes, "DeadlineExceeded", f"runPolicy.activeDeadlineSeconds ({job_spec.runPolicy.activeDeadlineSeconds} s) "
                                                 f"spent by the run's Jobs ({used:.0f} s); not made again")
        return
    if left is not None:  # the Job's own timer starts again with every Job: it gets what is left
        job_spec = job_spec.model_copy(update={"runPolicy": job_spec.runPolicy.model_copy(update={"activeDeadlineSeconds": left})})
    cfg = operator_config()
    if previous.get("trainerImage"):  # the image the run started with, whatever the operator's is now
        cfg = dataclasses.replace(cfg, image=previous["trainerImage"])
    fenced, why = _fence(now["metadata"], changes)  # before the Job: its pods start fenced
    if fenced == "later":  # the next sync tries again; no Job without its policy meanwhile
        _wait(now, changes, "CreateDeferred", f"waiting to make NetworkPolicy {manifests.network_policy_name(name)}: "
                                              f"{why}")
        return
    if fenced == "refused" and previous.get("createPending"):  # a new job: refused as its first create would be
        _fail(body, changes, "ChildRefused", f"{why} (networkPolicy.perJob)")
        return
    cfg = dataclasses.replace(cfg, job_network_policy=False)  # made above, or said why not
    created, trainer_job = [], None
    try:
        for obj in manifests.children(name, uid, namespace, job_spec, cfg, now["metadata"].get("labels")):
            made, new = kube.ensure(obj)
            if obj["kind"] == "Job":
                trainer_job = made
            if new:
                created.append(f"{obj['kind']}/{obj['metadata']['name']}")
                metrics.created(obj["kind"])
    except kube.ChildDeferred as e:  # the next sync tries again
        _defer(now, changes, str(e))
        return
    except kube.NameTaken as e:
        if e.stale:  # a deleted job's of the same name, not garbage-collected yet: the next sync looks again
            _wait(now, changes, "WaitingForName", f"{e}; waiting for its garbage collection")
            return
        _fail(body, changes, "NameConflict", str(e))
        return
    except kube.ChildRefused as e:
        _fail(body, changes, "ChildRefused", str(e))
        return
    if trainer_job is not None and (trainer_job.get("metadata") or {}).get("uid"):
        # the ranks meet at <name>-0.<name>-workers: the new pods only, not the previous attempt's
        # (Terminating for ever on a lost node, and published: publishNotReadyAddresses)
        kube.select_pods_of(namespace, manifests.child_names(name)["service"], manifests.attempt_selector(trainer_job))
    if not previous.get("trainerImage"):  # first made here (the first create deferred): kept from now on
        changes.status["trainerImage"] = job_spec.resources.image or cfg.image
    changes.status["appliedSuspend"] = job_spec.runPolicy.suspend  # the Job is made with it
    if previous.get("createPending"):
        changes.status["createPending"] = None
        changes.info("Created", f"created {', '.join(created) or 'nothing'}")
        return
    if previous.get("restartPending"):
        changes.status["restartPending"] = None
        changes.status["restartedJob"] = None
        changes.info("Recreated", f"created {', '.join(created) or 'nothing'} again for the gang restart")
        return
    restarts = int(previous.get("restarts") or 0) + 1
    changes.status["restarts"] = restarts
    metrics.restarted("job_missing")
    changes.warn("Recreated", f"the trainer Job was gone before the run finished; created "
                              f"{', '.join(created) or 'nothing'} again (restart {restarts})")


_FENCED: "OrderedDict[str, None]" = OrderedDict()  # uids whose NetworkPolicy was ensured (or refused, said)


def _fence(meta: dict, changes: Changes) -> tuple[str, str]:
    """networkPolicy.perJob for a run made without it (before the setting, or by an operator that
    had it off) or made again: its NetworkPolicy, once per run and operator process. 'ok' (made or
    there, or the setting is off), 'later' (the API server deferred it, or a deleted predecessor's
    policy of that name is not collected yet: tried again at the next sync) or 'refused' (no rights
    on NetworkPolicies, or a name someone else holds: said once in a Warning), with why."""
    cfg, uid = operator_config(), meta["uid"]
    if not cfg.job_network_policy or uid in _FENCED:
        return "ok", ""
    try:
        _, made = kube.ensure(manifests.network_policy(meta["name"], uid, meta["namespace"], cfg))
    except kube.ChildDeferred as e:
        return "later", str(e)
    except kube.NameTaken as e:
        if e.stale:
            return "later", str(e)
        answer, why = "refused", str(e)
    except kube.ChildRefused as e:
        answer, why = "refused", str(e)
    else:
        answer, why = "ok", ""
        if made:
            changes.info("NetworkPolicy", f"NetworkPolicy {manifests.network_policy_name(meta['name'])} made: the "
                                          "run's pods admit only each other and the scrapers")
    if answer == "refused":
        changes.warn("NetworkPolicyRefused", f"{why}; this run's pods stay without their NetworkPolicy "
                                             "(networkPolicy.perJob needs create/get/delete on networkpolicies)")
    _FENCED[uid] = None
    while len(_FENCED) > 65536:
        _FENCED.popitem(last=False)
    return answer, why


def _changes_status(previous: dict, new: dict) -> bool:
    """Whether merge-patching `new` onto the status `previous` changes it (a condition's
    lastTransitionTime alone is not a change): only the keys new writes are compared, since the
    status keeps others (trainerImage, restarts, ...) that a sync's new status never holds; a key
    new deletes (None) that previous lacks is no change. Pure."""
    def strip(d):
        return {k: v for k, v in d.items() if k != "conditions"}, [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in d.get("conditions") or []]
    return strip({k: previous.get(k) for k in new}) != strip(new)


def _ttl_cleanup(body, job_spec, name, namespace, previous, changes: Changes) -> None:
    ttl = job_spec.runPolicy.ttlSecondsAfterFinished
    if ttl is None or previous.get("childrenDeleted") or not previous.get("completionTime"):
        return
    done = datetime.fromisoformat(previous["completionTime"].replace("Z", "+00:00"))
    if (datetime.now(timezone.utc) - done).total_seconds() < ttl:
        return
    # only what this job owns: a job failed with NameConflict must not take the other object with it
    names = _children(name)
    left = kube.delete_children(namespace, names, owner_uid=body["metadata"]["uid"])
    changes.status["childrenDeleted"] = True
    what = ("Job, Service, ConfigMap and NetworkPolicy" if "networkpolicy" in names and not left else
            "Job, Service and ConfigMap")
    changes.info("CleanedUp", f"deleted the {what} {ttl}s after finishing; the resource and its status stay")


def _children(name: str) -> dict[str, str]:
    """The names of a job's children to delete: its NetworkPolicy too with networkPolicy.perJob."""
    names = manifests.child_names(name)
    if operator_config().job_network_policy:
        names["networkpolicy"] = manifests.network_policy_name(name)
    return names
