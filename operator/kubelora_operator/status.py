"""Pure status logic: (Job, pods, trainer progress, artifact manifest) -> the resource's status.

Conditions follow metav1.Condition and the conventions kstatus, Argo CD and Flux read:
Ready=True only when the LoRA is published; Reconciling=True while the run is in progress;
Stalled=True when it failed or cannot proceed without a person (bad image, missing Secret).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Optional

from kubelora_trainer.spec import quantity  # noqa: F401 - re-exported: the quota and test code read it here

PENDING, INITIALIZING, TRAINING, EXPORTING = "Pending", "Initializing", "Training", "Exporting"
SUCCEEDED, FAILED, SUSPENDED = "Succeeded", "Failed", "Suspended"
ACTIVE = (PENDING, INITIALIZING, TRAINING, EXPORTING)
FINISHED = (SUCCEEDED, FAILED)

# container waiting reasons that will not fix themselves
STUCK_REASONS = ("ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CrashLoopBackOff")
# ... and those that may (a registry's 429, a runtime's hiccup): stuck only once they outlast the grace
TRANSIENT_REASONS = ("ErrImagePull", "CreateContainerError")
# how long a scheduled pod may take to start its container (image pull, volume attach and mount)
# before its own Events are read and said in the status, and a transient error counts as stuck
START_GRACE_SECONDS = 120.0
# a container that has not started: the reasons its pod is waiting for
NOT_STARTED_REASONS = ("ContainerCreating", "PodInitializing", *STUCK_REASONS, *TRANSIENT_REASONS)
# evictions by the kubelet (node pressure: memory, disk) a run survives; the next one fails it
EVICTION_LIMIT = 3


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Observed:
    """What the status is derived from."""
    phase: str
    reason: str
    message: str
    stalled: bool = False
    progress: Optional[dict] = None
    artifacts: list = field(default_factory=list)


def _cond(job: dict, type_: str) -> Optional[dict]:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def job_failure(job: dict) -> Optional[dict]:
    """The Job's failure: its Failed condition, or FailureTarget, which the Job controller (1.31 and
    later) sets as soon as it has decided (exit 2 through podFailurePolicy, activeDeadlineSeconds, its
    backoffLimit) and keeps alone until every pod has terminated, which can take a grace period or
    longer. Acting on Failed only would take a run that already failed for bad input for a pod
    failure to restart the gang for. Pure."""
    return _cond(job, "Failed") or _cond(job, "FailureTarget")


def _time(text: Optional[str]) -> Optional[datetime]:
    """An API timestamp ("...Z" or "+00:00") as a datetime; None when unset or not one."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


parse_time = _time


def _age(text: Optional[str], now: datetime) -> float:
    """Seconds since the timestamp text (0 when unset or not one)."""
    t = _time(text)
    return (now - t).total_seconds() if t else 0.0


def starting_since(pod: dict) -> Optional[str]:
    """When a pod began waiting to start: its PodScheduled condition's transition (scheduled), else
    its creation. Pure."""
    sched = next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if sched and sched.get("status") == "True" and sched.get("lastTransitionTime"):
        return sched["lastTransitionTime"]
    return (pod.get("metadata") or {}).get("creationTimestamp")


def pod_problem(pods: list[dict], now: Optional[datetime] = None,
                grace_seconds: float = START_GRACE_SECONDS) -> Optional[tuple[str, str, bool]]:
    """The most telling pod problem: (reason, message, stuck). OOMKilled and non-zero exits
    name the pod and the exit code; image and config errors carry the kubelet's message. An
    ErrImagePull or CreateContainerError (a registry's 429, a runtime hiccup) is stuck only once
    its pod has waited grace_seconds since it was scheduled (never without `now`); until then the
    pod is starting (not_started)."""
    found = None
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        pname = pod["metadata"]["name"]
        st = pod.get("status") or {}
        if st.get("reason") in ("Evicted", "DeadlineExceeded", "Preempting"):
            return st["reason"], f"pod {pname}: {st.get('message', st['reason'])}", False
        for cs in st.get("containerStatuses") or []:
            state = cs.get("state") or {}
            waiting, term = state.get("waiting"), state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if waiting and (waiting.get("reason") in STUCK_REASONS or (
                    waiting.get("reason") in TRANSIENT_REASONS and now is not None
                    and _age(starting_since(pod), now) >= grace_seconds)):
                return waiting["reason"], f"pod {pname}: {waiting.get('message') or waiting['reason']}", True
            if term and term.get("reason") == "OOMKilled":
                return "OOMKilled", (f"pod {pname}: container {cs.get('name')} was killed for exceeding its memory "
                                     f"limit (exit {term.get('exitCode', 137)}); lower training.microBatchSize or "
                                     "enable training.gradientCheckpointing, or raise resources.limits.memory"), False
            if term and term.get("exitCode", 0) != 0 and found is None:
                found = ("Error", f"pod {pname}: container {cs.get('name')} exited with code {term['exitCode']}"
                                  + (f": {term['message']}" if term.get("message") else ""), False)
    return found


def unscheduled(pods: list[dict]) -> Optional[tuple[str, str]]:
    """(reason, message) when some pods have no node yet: the scheduler's own message (e.g.
    "0/4 nodes are available: 4 Insufficient nvidia.com/gpu") under reason Unschedulable."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        st = pod.get("status") or {}
        if st.get("phase") != "Pending":
            continue
        sched = next((c for c in st.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        if sched and sched.get("status") == "False":
            return (sched.get("reason") or "Unschedulable",
                    f"pod {pod['metadata']['name']} is not scheduled: {sched.get('message') or sched.get('reason')}")
    return None


def not_started(pod: dict) -> Optional[str]:
    """Why a Pending pod has not started its container: 'not scheduled (<the scheduler's
    message>)', or the container's waiting reason on its node ('ContainerCreating', or
    'ImagePullBackOff: <message>'); None for a pod that started or ended. Pure."""
    st = pod.get("status") or {}
    if st.get("phase") != "Pending":
        return None
    sched = next((c for c in st.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if sched and sched.get("status") == "False":
        return f"not scheduled ({sched.get('message') or sched.get('reason') or 'Unschedulable'})"
    if not (pod.get("spec") or {}).get("nodeName") and not (sched and sched.get("status") == "True"):
        return "not scheduled (the scheduler has not placed it yet)"
    statuses = st.get("containerStatuses") or []
    if any("running" in (cs.get("state") or {}) or "terminated" in (cs.get("state") or {})
           or (cs.get("lastState") or {}).get("terminated") for cs in statuses):
        return None
    waiting = next(((cs.get("state") or {}).get("waiting") or {} for cs in statuses), {})
    reason = waiting.get("reason") or "ContainerCreating"
    if reason not in NOT_STARTED_REASONS:
        return None
    return f"{reason}: {waiting['message']}" if waiting.get("message") else reason


def _index(pod: dict) -> str:
    meta = pod.get("metadata") or {}
    key = "batch.kubernetes.io/job-completion-index"
    return (meta.get("labels") or {}).get(key) or (meta.get("annotations") or {}).get(key) or meta.get("name", "?")


def gang_size(pods: list[dict]) -> int:
    """How many nodes the run these pods belong to had, as far as its pods tell (their completion
    indexes: a replaced pod keeps its index). Pure."""
    return len({_index(p) for p in pods})


def gang_incomplete(pods: list[dict], nodes: int, counted: Optional[int] = None) -> Optional[str]:
    """At a gang failure: a node of the gang that never ran, as 'pod NAME is not scheduled
    (<message>)', 'pod NAME has not started its container (<reason>)' or 'the pod of node I was
    never created'. Node 0 (or the others) then failed only because torchrun's rendezvous waited
    for that node in vain: the gang was never whole, which is a wait for GPUs, an image or a
    volume, not a failure of the run. Only nodes (completion indexes) with no pod that ever ran
    count: the Job controller's replacement of a crashed pod is Pending too, and that crash is the
    run's. `pods`: this Job's own (own_pods). A node without any pod is concluded only when the
    list holds every pod the Job counts (`counted`: pod_count(job)), not from a partial list. None
    when every node ran. Pure."""
    by_index: dict[str, list[dict]] = {}
    for pod in pods:
        by_index.setdefault(_index(pod), []).append(pod)
    for index in sorted(by_index, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i)):
        group = sorted(by_index[index], key=lambda p: p["metadata"]["name"])
        why = [not_started(p) for p in group]
        if all(why):
            name = group[-1]["metadata"]["name"]
            return (f"pod {name} is {why[-1]}" if why[-1].startswith("not scheduled")
                    else f"pod {name} has not started its container ({why[-1]})")
    if pods and all(_index(p).isdigit() for p in pods) and (counted is None or len(pods) >= counted):
        missing = sorted(set(range(nodes)) - {int(_index(p)) for p in pods})
        if missing:
            return f"the pod of node {missing[0]} was never created (see the Job's FailedCreate events)"
    return None


def gang_action(job: dict, nodes: int, restarts: int, backoff_limit: int,
                disruption: Optional[str] = None, deciding: bool = False) -> Optional[str]:
    """What a pod failure of a multi-node run needs. The Job controller replaces only the failed
    index: its peers stay in their collectives (until the process-group timeout) and the new pod
    meets a stale rendezvous. So the whole gang is restarted ('restart': delete the Job, make it
    again), or, past runPolicy.backoffLimit counted restarts, the run fails ('fail'). A failure that
    follows a disruption of one of the run's pods (`disruption`, see `disrupted`: its node lost,
    drained or preempted, while a peer failed in a collective rather than stopping with a
    checkpoint) restarts without counting ('restart_uncounted'), as the Job's podFailurePolicy
    ignores the disrupted pod itself. None: nothing to do (one node, no failure, or the Job already
    failed by itself). `deciding`: this Job's failure is being decided (see `gang_failure_wait`):
    meanwhile the Job controller may have failed the Job for its own backoffLimit, which the
    decision, not the Job controller, settles; a Job failed for another reason (exit 2 through its
    podFailurePolicy, activeDeadlineSeconds) stays failed. Pure."""
    s = job.get("status") or {}
    failed = job_failure(job)
    if failed and failed.get("reason") == "BackoffLimitExceeded" and (deciding or failed.get("type") == "FailureTarget"):
        # the Job controller's own limit (runPolicy.backoffLimit x nodes, 0 with backoffLimit 0) while
        # the gang's failure is the operator's to decide: being decided, or not yet final (its pods
        # still terminating, as the operator saw every gang failure before Kubernetes 1.31)
        failed = None
    if nodes < 2 or not s.get("failed") or failed or _cond(job, "Complete"):
        return None
    if disruption:
        return "restart_uncounted"
    return "fail" if restarts >= backoff_limit else "restart"


def counted_restarts(status: dict) -> int:
    """Restarts spent from runPolicy.backoffLimit: all of them but those after a disruption and
    those of a gang that was never whole (gang_incomplete). Pure."""
    return (int(status.get("restarts") or 0) - int(status.get("disruptionRestarts") or 0)
            - int(status.get("waitRestarts") or 0))


def disrupted(pods: list[dict]) -> Optional[str]:
    """'pod NAME: REASON: MESSAGE' for the first pod the cluster disrupted (condition
    DisruptionTarget=True: preempted, evicted or drained, or deleted by the taint manager or pod GC
    after its node was lost), None when none was. Pure."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
                detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
                return f"pod {pod['metadata']['name']}" + (f": {detail}" if detail else " was disrupted")
    return None


def same_lost_node(reason: Optional[str], previous: Optional[str]) -> bool:
    """Whether two node_lost reasons name the same node: the gang was placed on the lost node
    again (pods that tolerate every taint schedule onto a NotReady node), so this failure is the
    run's to count, not another disruption. Pure."""
    node = lambda r: (m[1] if (m := re.search(r" on node (\S+): ", r or "")) else None)  # noqa: E731
    return node(reason) is not None and node(reason) == node(previous)


def own_pods(pods: list[dict], job: dict) -> list[dict]:
    """The pods of this Job object: the job-name label also matches a gang restart's previous Job
    (same name), whose pod on a lost node stays Terminating until the Node is removed, and would
    otherwise pass every later failure off as a disruption. A pod is the Job's when its
    controller-uid label (as the Job controller sets it) is the Job's uid; a pod without one is
    kept. Pure."""
    uid = (job.get("metadata") or {}).get("uid")
    if not uid:
        return pods
    return [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(
        "batch.kubernetes.io/controller-uid", uid) == uid]


def predecessors(pods: list[dict], uid: str, uid_label: str) -> list[dict]:
    """The pods (of the trainer Job's name) that are not this LoRATrainingJob's: those of a
    deleted job of the same name, whose uid label differs or is missing (made before the label).
    Pure."""
    return [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(uid_label) != uid]


def pod_nodes(pods: list[dict]) -> list[str]:
    """The nodes the pods were scheduled to (spec.nodeName), sorted, each once. Pure."""
    return sorted({n for p in pods if (n := (p.get("spec") or {}).get("nodeName"))})


def node_lost(pods: list[dict], nodes: Optional[dict[str, Optional[dict]]]) -> Optional[str]:
    """'pod NAME on node NODE: WHY' for the first pod whose node is lost now: its Node's Ready
    condition False or Unknown (what the node lifecycle controller sets 40 s, from Kubernetes 1.32
    50 s, after the kubelet stops posting; missing counts as Unknown) or the Node gone (`nodes` maps it to None).
    This comes long before the taint manager marks the pod DisruptionTarget (after the pods'
    unreachable toleration, 300 s by default), while the peers of the lost pod fail in their
    collectives within the process-group timeout. `nodes`: Node by name for every node in
    `pod_nodes(pods)`; None when the operator cannot read Nodes (then nothing is lost). Pure."""
    if nodes is None:
        return None
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        why = _on_lost_node(pod, nodes)
        if why:
            return why
    return None


def _on_lost_node(pod: dict, nodes: dict[str, Optional[dict]]) -> Optional[str]:
    """node_lost's test for one pod: why its node is lost now, or None. Pure."""
    node = (pod.get("spec") or {}).get("nodeName")
    if not node or node not in nodes:
        return None
    if (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
        return None  # its kubelet reported how it ended: alive then, so a crash, not a lost node
    where = f"pod {pod['metadata']['name']} on node {node}"
    if nodes[node] is None:
        return f"{where}: the node is gone"
    ready = next((c for c in (nodes[node].get("status") or {}).get("conditions") or []
                  if c.get("type") == "Ready"), None)
    if ready is None:
        return f"{where}: the node reports no Ready condition"
    if ready.get("status") != "True":
        detail = ": ".join(x for x in (ready.get("reason"), ready.get("message")) if x)
        return f"{where}: node Ready={ready.get('status')}" + (f" ({detail})" if detail else "")
    return None


def starting(pods: list[dict]) -> Optional[tuple[str, str]]:
    """(reason, message) for the first scheduled pod that has not started its container yet:
    pulling its image, attaching or mounting its volumes (a Multi-Attach of a claim another pod
    holds, a CSI error: the pod status only says ContainerCreating; pod_events tells more). Pure."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        why = not_started(pod)
        if why and not why.startswith("not scheduled"):
            node = (pod.get("spec") or {}).get("nodeName")
            return (why.split(":", 1)[0], f"pod {pod['metadata']['name']}" + (f" on node {node}" if node else "")
                    + f" has not started its container: {why}")
    return None


def slow_to_start(pods: list[dict], now: datetime, grace_seconds: float = START_GRACE_SECONDS) -> Optional[dict]:
    """The first pod still waiting to be scheduled or to start its container grace_seconds after
    it began (starting_since): its own Events (FailedMount, FailedAttachVolume, FailedScheduling,
    the cluster autoscaler's NotTriggerScaleUp) are worth a read. Pure."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if not_started(pod) and _age(starting_since(pod), now) >= grace_seconds:
            return pod
    return None


# the Events of a pod that say why it does not start: every Warning, and the autoscaler's scale-up
TELLING_NORMAL_EVENTS = ("TriggeredScaleUp",)


def pod_events(obs: Observed, pod: dict, events: list[dict]) -> Observed:
    """A job waiting for a pod (Unschedulable or not started) with that pod's newest telling
    Event added to its message ('...; newest event of pod X: FailedMount: MountVolume.SetUp
    failed ...'). Unchanged without one, or when the job is not waiting for its pods. Pure."""
    if obs.phase != PENDING or obs.reason not in ("Unschedulable", *NOT_STARTED_REASONS):
        return obs
    telling = [e for e in events if e.get("type") == "Warning" or e.get("reason") in TELLING_NORMAL_EVENTS]
    if not telling:
        return obs
    newest = max(telling, key=_event_time)
    count = f" (x{newest['count']})" if (newest.get("count") or 1) > 1 else ""
    return Observed(obs.phase, obs.reason, f"{obs.message}; newest event of pod {pod['metadata']['name']}: "
                    f"{newest.get('reason')}{count}: {str(newest.get('message') or '').strip()}",
                    stalled=obs.stalled, progress=obs.progress, artifacts=obs.artifacts)


def evictions(pods: list[dict]) -> list[tuple[str, str]]:
    """(pod name, message) of each pod its node's kubelet evicted for pressure (memory, disk):
    status.reason Evicted, or a DisruptionTarget condition of reason TerminationByKubelet that says
    so (a node's graceful shutdown also sets that reason: not an eviction). The Job's
    podFailurePolicy ignores these (DisruptionTarget) and retries forever, while the next pod on
    such a node is evicted again for the same reason. Pure."""
    out = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        st = pod.get("status") or {}
        cond = next((c for c in st.get("conditions") or [] if c.get("type") == "DisruptionTarget"
                     and c.get("status") == "True" and c.get("reason") == "TerminationByKubelet"), None)
        if st.get("reason") == "Evicted" or (cond and "low on resource" in (cond.get("message") or "")):
            out.append((pod["metadata"]["name"], st.get("message") or (cond or {}).get("message") or "evicted"))
    return out


def eviction_fix(message: str) -> str:
    """What to change after an eviction with this message. Pure."""
    if "ephemeral-storage" in message or "EmptyDir" in message or "nodefs" in message or "imagefs" in message:
        return ("give the cache its disk: resources.cacheSize (the cache emptyDir's size, requested as "
                "ephemeral-storage so the pod lands on a node with that much), or resources.cacheVolumeClaim")
    if "memory" in message:
        return ("set resources.requests.memory to what the run uses (a pod using more than it requests is evicted "
                "first when the node runs low), or lower its use (training.microBatchSize, "
                "training.gradientCheckpointing)")
    return "set resources.requests for what the run uses, or run it on other nodes (resources.nodeSelector)"


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def deciding(previous_status: dict, job: dict) -> Optional[dict]:
    """The gang failure of this Job being decided (status.gangFailure: {job: the Job's uid, since}),
    None when there is none or it was another Job's (a Job made again since). Pure."""
    held = (previous_status or {}).get("gangFailure")
    uid = (job.get("metadata") or {}).get("uid")
    return held if isinstance(held, dict) and uid and held.get("job") == uid and _time(held.get("since")) else None


def failed_since(pods: list[dict], held: Optional[dict], now: datetime) -> datetime:
    """When the gang failed: the decision's own time when one is held (status.gangFailure.since,
    kept across syncs and operator restarts), else the earliest finish of a failed pod's container
    (its kubelet's clock), never later than `now` (a clock ahead does not stretch the wait). Pure."""
    if held and _time(held.get("since")):
        return _time(held["since"])
    ends = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Failed":
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            if _time(term.get("finishedAt")):
                ends.append(_time(term["finishedAt"]))
    return min([*ends, now])


def gang_failure_wait(pods: list[dict], nodes: Optional[dict[str, Optional[dict]]], since: datetime,
                      now: datetime, grace_seconds: float) -> list[str]:
    """The pods whose Node may yet read lost, for a gang failure that no lost node explains now
    (`node_lost` found none): the peers of a lost node's pod can fail in a NCCL error seconds after
    the loss, while its Node reads Ready until the node lifecycle controller marks it Unknown (40 s,
    from Kubernetes 1.32 50 s, after the kubelet's last post). The failure is decided once none is
    left or `grace_seconds` after `since` (then counted); [] decides now. Waited for: a pod of the
    failed gang (made by `since`: a replacement the Job controller made after the failure
    cannot explain it) still running as far as the API knows (a pod its kubelet reported as ended
    was not lost), on a Node that exists (a gone one is lost already). Nothing is waited for when
    the Nodes cannot be read (`nodes` None): no answer would come. Pure."""
    if nodes is None or (now - since).total_seconds() >= grace_seconds:
        return []
    out = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or nodes.get(node) is None or (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
            continue
        made = _time((pod.get("metadata") or {}).get("creationTimestamp"))
        if made is not None and made > since:  # whole seconds, as the API server stamps them
            continue
        out.append(f"{pod['metadata']['name']} on node {node}")
    return out


def suspend_to_apply(job: dict, requested: bool, queue: Optional[str], applied: Optional[bool] = None
                     ) -> Optional[bool]:
    """The spec.suspend to write to the Job for runPolicy.suspend (`requested`). Stopping is always
    applied: a Job that runs while the job asks for it suspended (resumed by hand, or an edit that
    found no Job while it was being made again) is suspended. Starting is applied only as a change:
    when runPolicy.suspend went from true to false since it was last applied (`applied`,
    status.appliedSuspend, set when the Job is made and when written), so a Job that another
    controller holds suspended (Kueue with manageJobsWithoutQueueName suspends Jobs without a queue
    label until it admits them) is not resumed at every sync, starting GPU pods it did not admit.
    Without a record (a Job an older operator made) a suspended Job is resumed, as before. None:
    nothing to write; never for a Job queued in Kueue (Kueue owns its spec.suspend) nor one finished
    or failed (the operator suspends a failed run's Job itself, to stop its peers). Pure."""
    if queue or _cond(job, "Complete") or job_failure(job):
        return None
    current = bool((job.get("spec") or {}).get("suspend"))
    if requested and not current:
        return True
    if not requested and current and applied is not False:
        return False
    return None


def needs_pods(job: dict) -> bool:
    """Whether the pods must be read to explain the Job: some failed, some are not ready yet
    (image pull, missing Secret...), some are terminating (on a lost node for ever: st.stranded) or
    it failed. A Job whose active pods are all ready needs no
    pod list, which saves one request per sync of every running job."""
    s = job.get("status") or {}
    return bool(s.get("failed") or s.get("active", 0) > s.get("ready", 0) or s.get("terminating") or job_failure(job))


def kueue_suspend_note(queue: str) -> str:
    return (f"runPolicy.suspend is not applied: the trainer Job is queued in Kueue (queue {queue!r}), which owns "
            "its spec.suspend; to hold the run, deactivate its Workload (spec.active: false) or stop the queue "
            "(spec.stopPolicy: Hold or HoldAndDrain)")


def queued(job: dict, queue: Optional[str], progress: Optional[dict]) -> Optional[Observed]:
    """A Job submitted to a Kueue queue and suspended: Kueue has not admitted it (yet, or again
    after a preemption). Pending, with the queue named; None when Kueue is not holding it. Pure."""
    held = (job.get("spec") or {}).get("suspend") or _cond(job, "Suspended")
    if not queue or not held:
        return None
    if progress:
        return Observed(PENDING, "QueuedInKueue", f"suspended by Kueue (preempted, or its Workload deactivated); "
                        f"waiting for admission in queue {queue!r} again, then the run resumes from its newest "
                        "checkpoint", progress=progress)
    return Observed(PENDING, "QueuedInKueue", f"waiting for Kueue admission in queue {queue!r} (Kueue starts the "
                    "trainer Job when it admits it)", progress=progress)


def _obj(value) -> dict:
    return value if isinstance(value, dict) else {}


MAX_ARTIFACTS = 32        # a trainer writes one file per output format and the report: a handful
MAX_ARTIFACT_TEXT = 2048  # characters of a uri, format or digest


def published(manifest: dict) -> list[dict]:
    """status.artifacts from manifest.json: its artifacts and its report, each with a string uri
    (and format); an entry of another shape (the file sits in the tenant's bucket) is left out, and
    at most MAX_ARTIFACTS are taken, each text at most MAX_ARTIFACT_TEXT long: a manifest near the
    1 MiB read limit, spread out as status fields, would pass the API server's request limit, and
    the job would stay Exporting with every patch refused. Pure."""
    def text(v):
        return v if isinstance(v, str) and len(v) <= MAX_ARTIFACT_TEXT else None

    def size(v):
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    entries = manifest.get("artifacts")
    arts = [{"uri": a["uri"], "format": text(a.get("format")), "sha256": text(a.get("sha256")), "size": size(a.get("size"))}
            for a in (entries if isinstance(entries, list) else []) if isinstance(a, dict) and text(a.get("uri"))]
    r = manifest.get("report")  # report.html: loss curve, samples, dataset, spec
    if isinstance(r, dict) and text(r.get("uri")):
        arts = arts[:MAX_ARTIFACTS - 1] + [{"uri": r["uri"], "format": "report", "sha256": text(r.get("sha256")),
                                            "size": size(r.get("size"))}]
    return arts[:MAX_ARTIFACTS]


def observe(job: Optional[dict], pods: list[dict], progress: Optional[dict], manifest: Optional[dict],
            suspend_requested: bool, queue: Optional[str] = None, now: Optional[datetime] = None) -> Observed:
    """queue: the Kueue queue the Job was submitted to (then suspend_requested is False: Kueue,
    not runPolicy.suspend, decides when it runs). now: for how long a pod has waited to start
    (pod_problem); None: a transient pull or create error is never stuck."""
    if job is None:
        return Observed(PENDING, "Creating", "creating the trainer Job")
    failed = job_failure(job)
    if failed:
        reason = failed.get("reason") or "Failed"
        problem = pod_problem(pods)
        msg = failed.get("message") or "the trainer Job failed"
        if problem:
            reason = problem[0] if reason in ("BackoffLimitExceeded", "PodFailurePolicy") else reason
            msg = f"{msg}; {problem[1]}"
        return Observed(FAILED, reason, msg, stalled=True, progress=progress)
    if _cond(job, "Complete"):
        if manifest is None:
            return Observed(EXPORTING, "ReadingManifest", "the trainer finished; reading manifest.json", progress=progress)
        if manifest.get("cacheOnly"):  # dataset.cacheOnly: the cache was built, nothing trained
            c = _obj(manifest.get("cache"))
            shared = (f", {c.get('pulled')} pulled from and {c.get('pushed')} pushed to dataset.cacheUri"
                      if "pushed" in c else "")
            return Observed(SUCCEEDED, "CacheBuilt",
                            f"latent cache built ({c.get('entries')} entries{shared}); dataset.cacheOnly: no training",
                            progress=progress, artifacts=[])
        arts = published(manifest)
        loss = _obj(manifest.get("metrics")).get("finalLoss")
        what = "fine-tuned model" if _obj(manifest.get("adapter")).get("type") == "full" else "LoRA"
        return Observed(SUCCEEDED, "Published", f"{what} published to {arts[0]['uri'] if arts else '?'}"
                        + (f" (final loss {loss:.4f})" if isinstance(loss, (int, float)) else ""),
                        progress=progress, artifacts=arts)
    held = queued(job, queue, progress)
    if held:
        return held
    if suspend_requested or _cond(job, "Suspended"):
        return Observed(SUSPENDED, "Suspended", "suspended (runPolicy.suspend or a queue such as Kueue)", progress=progress)
    problem = pod_problem(pods, now)
    if problem and problem[2]:
        return Observed(PENDING, problem[0], problem[1], stalled=True, progress=progress)
    st = job.get("status") or {}
    if not st.get("active"):
        return Observed(PENDING, "WaitingForPods", "waiting for the trainer pods to be scheduled", progress=progress)
    waiting = unscheduled(pods)
    if waiting:  # Job.status.active counts Pending pods too: these have no node yet
        return Observed(PENDING, *waiting, progress=progress)
    waiting = starting(pods)
    if waiting:  # ... and those on their node, not started yet: not "staging in" either
        return Observed(PENDING, *waiting, progress=progress)
    phase = (progress or {}).get("phase")
    if phase == "Training":
        return Observed(TRAINING, "Training", "training", progress=progress)
    if phase in ("Exporting", "Succeeded"):
        return Observed(EXPORTING, "Exporting", "exporting and uploading the LoRA", progress=progress)
    msg = "pods running: staging in the model and data, caching latents"
    if problem:
        msg += f" (after a retry: {problem[1]})"
    return Observed(INITIALIZING, "Initializing", msg, progress=progress)


def own_progress(progress: Optional[dict], uid: Optional[str]) -> Optional[dict]:
    """progress.json unless another run wrote it (its runId, kubelora_trainer.progress.RUN_KEY, is
    not this job's uid: a job made again under the same name, or another job sharing output.uri,
    whose phase, step and total would be reported as this run's). A file without one (a trainer
    from before runIds, kubelora run) is taken. Pure."""
    if isinstance(progress, dict) and progress.get("runId") not in (None, uid):
        return None
    return progress


def last_reported(previous_status: dict) -> Optional[dict]:
    """The trainer's phase as last reported, for a sync that cannot read progress.json (storage
    error, missing Secret): a running job stays Training instead of falling back to Initializing
    until the error has lasted long enough to be reported. Pure."""
    phase = (previous_status or {}).get("phase")
    return {"phase": phase} if phase in (TRAINING, EXPORTING) else None


def awaits_pods(job: dict, now: datetime, grace_seconds: float) -> bool:
    """A Job that should have all its pods by now and lacks some: not suspended, not finished,
    fewer pods active, succeeded or failed than its parallelism (one per node), made more than
    grace_seconds ago. Its FailedCreate Events then say why (pods_refused). Pure."""
    if (job.get("spec") or {}).get("suspend") or _cond(job, "Complete") or job_failure(job):
        return False
    if pod_count(job) >= int((job.get("spec") or {}).get("parallelism") or 1):
        return False
    made = (job.get("metadata") or {}).get("creationTimestamp")
    if not made:
        return False
    return _age(made, now) >= grace_seconds


def stranded(pods: list[dict], now: datetime, slack_seconds: float = 15.0) -> list[str]:
    """The pods still there slack_seconds past their deletionTimestamp (the end of their grace
    period) whose containers have not ended: on a lost node (the caller reads the Nodes) they stay
    Terminating until the Node is removed, and a Job with a podFailurePolicy makes a replacement
    only once the pod is gone. Pure."""
    out = []
    for p in pods:
        meta = p.get("metadata") or {}
        deleted = meta.get("deletionTimestamp")
        if deleted and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") \
                and _age(deleted, now) >= slack_seconds:
            out.append(meta.get("name", "?"))
    return out


def lingering(pods: list[dict], now: datetime, slack_seconds: float = 15.0,
              nodes: Optional[dict[str, Optional[dict]]] = None) -> list[str]:
    """The pods of a deleted trainer Job that may still be running: not deleted yet (the garbage
    collector has not reached them) or terminating within their grace period (the trainer writes
    its checkpoint then; a pod's deletionTimestamp is the end of that period, not the request).
    A new gang started beside them could reach the old node 0's rendezvous under the same DNS name
    and restore a checkpoint being written. Not waited for: a pod whose containers have ended, one
    still there slack_seconds past its deletionTimestamp, and one on a Node that reads lost now
    (`nodes`, as node_lost reads them: gone, or not Ready): a lost node's pods stay Terminating until
    the node is removed, and their grace period (terminationGracePeriodSeconds, up to an hour) would
    otherwise hold the whole gang's restart that long; such a pod, its peers gone, can neither finish
    a checkpoint (every rank must) nor meet the new gang's rendezvous. Pure."""
    out = []
    for p in pods:
        meta = p.get("metadata") or {}
        if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        deleted = meta.get("deletionTimestamp")
        if deleted and _age(deleted, now) >= slack_seconds:
            continue
        if nodes and _on_lost_node(p, nodes):
            continue
        out.append(meta.get("name", "?"))
    return out


def pod_count(job: dict) -> int:
    s = job.get("status") or {}
    return sum(int(s.get(k) or 0) for k in ("active", "succeeded", "failed"))


def quota_shortfall(message: str, nodes: int) -> Optional[list[str]]:
    """From a quota admission's refusal ('exceeded quota: q, requested: nvidia.com/gpu=8, used:
    nvidia.com/gpu=8, limited: nvidia.com/gpu=8'): the resources whose limit is below what the
    whole gang asks (one pod's request x nodes), which no amount of waiting gives ([] when the job
    fits once other workloads finish); None when the message is not a quota's or cannot be read.
    Pure."""
    m = re.search(r"exceeded quota: [^,]+, requested: (.*?), used: (.*?), limited: (.*)$", message.strip())
    if not m:
        return None
    try:
        requested, limited = ({k.strip(): quantity(v) for k, v in (x.split("=", 1) for x in part.split(","))}
                              for part in (m.group(1), m.group(3)))
    except ValueError:
        return None
    return [f"{k}: the {nodes} pod(s) ask {requested[k] * nodes:g}, the quota allows {limited[k]:g}"
            for k in requested if k in limited and requested[k] * nodes > limited[k]]


def _event_time(e: dict) -> str:
    return e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp") or ""


def recent(events: list[dict], now: datetime, max_age_seconds: float = 600) -> list[dict]:
    """The events seen in the last max_age_seconds (the Job controller posts FailedCreate again at
    each retry, so an older one is a refusal that has passed, e.g. before an evicted pod was
    replaced). Pure."""
    return [e for e in events if _age(_event_time(e), now) <= max_age_seconds]


def pods_refused(obs: Observed, events: list[dict], job: dict) -> Observed:
    """A Job whose pods the API server refuses (FailedCreate Events: a ResourceQuota, LimitRange,
    Pod Security admission or a webhook) is not waiting to be scheduled: say so, with the newest
    refusal. A ResourceQuota that is full for now is a wait (Pending, QuotaExceeded, not Stalled:
    the Job controller creates the pods once other workloads free it); one the gang can never fit,
    and any other refusal, is Stalled (a person must change the quota, the policy or the job).
    Also when only some pods were made: the others hold their GPUs at the rendezvous meanwhile.
    Pure."""
    if not events or obs.phase not in (PENDING, INITIALIZING):
        return obs
    newest = max(events, key=_event_time)
    message = str(newest.get("message"))
    nodes = int((job.get("spec") or {}).get("parallelism") or 1)
    made = pod_count(job)
    some = f"{made} of {nodes} trainer pods were created; the others cannot be: " if made else \
        "the trainer pods cannot be created: "
    short = quota_shortfall(message, nodes)
    if short == []:
        return Observed(PENDING, "QuotaExceeded", f"{some}{message} (waiting: the Job controller creates them once "
                        "the namespace's ResourceQuota has room; queue jobs in Kueue to admit whole gangs)",
                        progress=obs.progress, artifacts=obs.artifacts)
    why = (f"the job can never fit this ResourceQuota ({'; '.join(short)}): raise the quota or use fewer "
           "resources.nodes / resources.gpusPerNode" if short else
           "a ResourceQuota, LimitRange, Pod Security admission or an admission webhook refuses them; the Job "
           "controller retries, so the run starts once that is changed")
    return Observed(PENDING, "FailedCreate", f"{some}{message} ({why})", stalled=True,
                    progress=obs.progress, artifacts=obs.artifacts)


def name_missing_secret(obs: Observed, secret: Optional[str]) -> Observed:
    """A pod that cannot start because the job's credentials Secret is missing says so itself
    (CreateContainerConfigError, 'secret "x" not found'); add which field names it and what it
    must hold. Pure."""
    if not secret or obs.reason != "CreateContainerConfigError":
        return obs
    if f'secret "{secret}" not found' in obs.message:
        hint = ("create it in the job's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; the pods "
                "start once it exists")
    elif "couldn't find key" in obs.message and obs.message.rstrip().endswith(f"/{secret}"):  # there, a key is not
        hint = ("the trainer pods take its keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and AWS_SESSION_TOKEN "
                "if present; add the missing one and the pods start")
    else:
        return obs
    return replace(obs, message=f"{obs.message} (spec.storage.credentialsSecret: {hint})")


def conditions(previous: list[dict], obs: Observed, generation: int, now: str) -> list[dict]:
    """Ready / Reconciling / Stalled / Suspended; lastTransitionTime changes only when the
    status of a condition does."""
    prev = {c["type"]: c for c in previous or []}
    wanted = {
        "Ready": (obs.phase == SUCCEEDED, obs.reason, obs.message),
        "Reconciling": (obs.phase in ACTIVE and not obs.stalled, obs.reason, obs.message),
        "Stalled": (obs.stalled, obs.reason, obs.message),
        "Suspended": (obs.phase == SUSPENDED, obs.reason, obs.message),
    }
    out = []
    for type_, (flag, reason, message) in wanted.items():
        status = "True" if flag else "False"
        old = prev.get(type_)
        ltt = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
        out.append({"type": type_, "status": status, "reason": reason, "message": message[:1024],
                    "lastTransitionTime": ltt, "observedGeneration": generation})
    return out


# status.progress: the fields of the trainer's progress.json kept, by kind. The file sits in the
# tenant's bucket (or whatever storage.endpoint answers): any other field, a value of another type,
# a NaN or an infinity (JSON has none: the API server would refuse the whole status patch), an eta
# not of the trainer's form is left out.
PROGRESS_COUNTS = ("step", "totalSteps", "epoch", "resumedFrom", "samples", "sampleStep", "evalStep")
PROGRESS_NUMBERS = ("loss", "samplesPerSecond", "gpuPeakGiB", "evalLoss")
PROGRESS_TEXTS = ("eta",)
ETA = re.compile(r"(\d{1,6}:)?\d{1,2}:\d{2}|\?")  # progress.format_eta's h:mm:ss, m:ss or "?": no text echoed


def _progress_value(key: str, value):
    """value when it is of key's kind, else None. Pure."""
    if isinstance(value, bool):
        return None
    if key in PROGRESS_COUNTS:
        return value if isinstance(value, int) else None
    if key in PROGRESS_NUMBERS:
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None
    return value if isinstance(value, str) and ETA.fullmatch(value) else None


def progress_summary(progress: Optional[dict]) -> Optional[dict]:
    """status.progress from progress.json: its known fields with values of their kind (counts,
    finite numbers, an eta of the trainer's form), and summary "step/totalSteps". Pure."""
    if not progress or not isinstance(progress, dict):
        return None
    out = {}
    for k in (*PROGRESS_COUNTS, *PROGRESS_NUMBERS, *PROGRESS_TEXTS):
        value = _progress_value(k, progress.get(k))
        if value is not None:
            out[k] = value
    if out.get("totalSteps"):
        out["summary"] = f"{out.get('step', 0)}/{out['totalSteps']}"
    return out


def sample_event(previous_progress: Optional[dict], progress: Optional[dict], output_uri: str) -> Optional[str]:
    """The message of a Normal Event when the trainer wrote samples of a new step, else None. Pure."""
    step = (progress or {}).get("sampleStep")
    if step is None or step == (previous_progress or {}).get("sampleStep"):
        return None
    return (f"samples of step {step} written ({progress.get('samples')} so far); report: "
            f"{output_uri.rstrip('/')}/report.html")


def status(previous: dict, obs: Observed, generation: int, job: Optional[dict], now: str) -> dict:
    """The whole status object to write (a pure function of what was observed)."""
    prev = previous or {}
    st = {"phase": obs.phase, "reason": obs.reason, "message": obs.message, "observedGeneration": generation,
          "conditions": conditions(prev.get("conditions", []), obs, generation, now)}
    job_status = (job or {}).get("status") or {}
    start = prev.get("startTime") or job_status.get("startTime")
    if start:
        st["startTime"] = start
    if obs.phase in FINISHED:
        st["completionTime"] = prev.get("completionTime") or job_status.get("completionTime") or now
    prog = progress_summary(obs.progress) or prev.get("progress")
    if prog:
        st["progress"] = prog
    if obs.artifacts:
        st["artifacts"] = obs.artifacts
    return st


def follow_generation(previous: dict, generation: int) -> dict:
    """The status fields to patch so that a finished job, which is never run again, still shows
    that its newest spec was seen: kstatus (and Flux's wait) reads a status whose
    observedGeneration lags metadata.generation as InProgress forever. Conditions keep their
    status, reason and lastTransitionTime. {} when nothing lags. Pure."""
    prev = previous or {}
    conds = prev.get("conditions") or []
    if prev.get("observedGeneration") == generation and all(c.get("observedGeneration") == generation for c in conds):
        return {}
    return {"observedGeneration": generation, "conditions": [{**c, "observedGeneration": generation} for c in conds]}


def invalid(previous: dict, reason: str, message: str, generation: int, now: str) -> dict:
    """Status for a resource that cannot run (invalid spec, unsupported model, a refused child)."""
    return status(previous, Observed(FAILED, reason, message, stalled=True), generation, None, now)


def job_running_since(job: dict) -> tuple[Optional[str], Optional[str]]:
    """(the trainer Job's start while it runs, when it stopped): its status.startTime, or (None,
    the time it was suspended) while it is suspended (runPolicy.suspend, Kueue): the Job
    controller keeps the old startTime then and sets it anew on resume. Pure."""
    suspended = _cond(job, "Suspended")
    if (job.get("spec") or {}).get("suspend") or suspended:
        return None, (suspended or {}).get("lastTransitionTime")
    return (job.get("status") or {}).get("startTime"), None


def deadline_used(used: Optional[float], started: Optional[str], job_start: Optional[str],
                  now: datetime, stopped: Optional[str] = None) -> tuple[float, Optional[str]]:
    """(seconds of runPolicy.activeDeadlineSeconds spent, the running Job's start) after a sync
    that saw the trainer Job running since job_start (None: suspended, or no Job; `stopped`: when
    it was suspended, if known). The time counts as the Job controller counts it (from each start,
    not while suspended): a Job seen stopped adds the time from its start to its stop (now when
    not known). A start that changed without the stop being seen (suspended and resumed between
    two syncs) adds nothing: that stretch is lost, in the run's favour. Pure."""
    used = float(used or 0.0)
    if _time(started) and job_start is None:
        end = _time(stopped) or now
        used += max(0.0, (min(end, now) - _time(started)).total_seconds())
    return used, job_start


def deadline_left(limit: Optional[int], used: Optional[float]) -> Optional[int]:
    """Seconds of runPolicy.activeDeadlineSeconds left for a Job made again (a gang restart, a Job
    deleted by hand): each Job's own timer starts afresh, so without this every restart would
    grant the whole limit again. None: no limit; 0: spent. Pure."""
    if not limit:
        return None
    return max(0, int(limit - (used or 0.0)))
