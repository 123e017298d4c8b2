"""A small Job controller and kubelet for tests: runs the operator's Indexed batch/v1 Jobs as local
processes against the emulated API server (emulator.py), so that an operator test sees pods, Job
status and real trainer runs without a cluster.

Mocked here, and only here, is what cannot run on a test machine: a kubelet (and the part of the
Job controller that creates pods and writes Job status). No container runtime, image, network
namespace or DNS: the container's command runs as a local process of this Python, with the
container's env on top of the test process environment. Everything else goes through the API
server: the runner reads Jobs, Secrets, ConfigMaps and PersistentVolumeClaims with the
`kubernetes` client (polling every `interval` seconds), creates a Pod per completion index, and
writes Pod and Job status through their status subresources.

    runner = LocalJobRunner(kube.kubeconfig, workdir=tmp_path).start()   # or the `job_runner` fixture
    runner.fail_next("demo", index=1, exit_code=1)   # the next pod of index 1 exits 1 (a test shim)
    ... create the Job (or the LoRATrainingJob and run the operator) ...
    wait_for(lambda: condition(kube.get("batch/v1/jobs", "default", "demo"), "Complete"))
    print(runner.logs("demo"))                        # every pod's stdout+stderr, with headers
    runner.stop()                                     # kills every process

Which Jobs: those matching `label_selector` (default app.kubernetes.io/managed-by=kubelora-operator),
in every namespace, with `completionMode: Indexed` (others are left alone).

The kubelet part, per pod:
- env as the kubelet builds it: envFrom (configMapRef / secretRef, `prefix`, `optional`) first,
  then env in order: plain values with $(VAR) expansion against the vars defined before them
  (Kubernetes rules: `$$` is a literal `$`, an undefined $(VAR) stays as written), valueFrom
  fieldRef (metadata.name/namespace/uid, labels['k'], annotations['k'], spec.nodeName,
  spec.serviceAccountName, status.podIP/hostIP), configMapKeyRef and secretKeyRef (base64 `data`
  decoded); then command and args are expanded against the whole env. A missing Secret/ConfigMap or
  key (not `optional`) leaves the pod Pending with its container waiting, reason
  CreateContainerConfigError and the kubelet's message (`secret "x" not found`, `couldn't find key
  K in Secret ns/x`), and no process; like the kubelet the runner retries (about every second), so
  creating the Secret later starts the pod.
- volumes: configMap and secret -> their keys written as files (`items` honoured) in a directory of
  the pod (a missing one: waiting ContainerCreating, the FailedMount message, retried); emptyDir ->
  a directory of the pod; persistentVolumeClaim -> `<pvc_root>/<namespace>/<claimName>`, shared by
  every pod and run of that claim (`runner.pvc_dir(claim)`); the PVC object must exist in the API,
  else the pod stays Pending with PodScheduled False, reason Unschedulable (as a real scheduler
  leaves it); hostPath -> that path. Then every arg and env value in which a mountPath appears as a
  path (at the start, or after `=`, `:`, `,` or whitespace) is rewritten to the local directory
  (`/etc/kubelora/spec.yaml` -> `<pod>/volumes/spec/spec.yaml`, KUBELORA_CACHE_DIR). `/dev/shm`
  mounts are left alone (the host's /dev/shm is used). subPath is honoured; readOnly is not.
- the command: `torchrun` -> `sys.executable -m torch.distributed.run`; `python`/`python3` ->
  `sys.executable` (the test venv); anything else runs from PATH (not found: terminated with exit
  code 128, reason StartError). A container without `command` cannot run (no image ENTRYPOINT):
  CreateContainerConfigError. Only the first container runs; initContainers and sidecars are
  ignored; resources, probes, securityContext and ports are ignored.
- rendezvous: PET_MASTER_ADDR (a cluster DNS name) becomes 127.0.0.1 and PET_MASTER_PORT one free
  local port per Job run (a run: the Job's start, each resume, each group restart); both are
  replaced where they are defined (so later $(PET_MASTER_*) references see the local values) and,
  literally, in the expanded args (`--master-addr=<dns>`, `--master-port=29500`). HOSTNAME is the
  pod's hostname.
- the process: its own session (killed as a process group), cwd `<pod dir>/work`, stdout and
  stderr to one log file (`runner.logs(job)`, `runner.pod_log(pod)`); exit status -> terminated
  exitCode (128+N for signal N), reason Completed (0) or Error.
- pod status as the kubelet writes it (status subresource): Pending (PodScheduled) -> Running
  (containerStatuses running, Ready True, podIP 127.0.0.1, startTime) -> Succeeded / Failed
  (terminated {exitCode, reason, startedAt, finishedAt}).

The Job controller part, per Job (status written through jobs/status):
- one pod per completion index (at most `parallelism` at a time), named `<job>-<index>-<5 random
  chars>` (generateName, as the real controller), labels of the template plus job-name,
  controller-uid and completion-index labels, the completion-index annotation, a controller
  ownerReference to the Job, spec from the template with `hostname: <job>-<index>` and
  nodeName `local-runner` (a Node of that name, Ready, registered at start, as a kubelet does);
- status: startTime, active, ready, terminating, succeeded, failed, completedIndexes ("0-1,3"),
  uncountedTerminatedPods {}, completionTime, conditions with lastTransitionTime:
  SuccessCriteriaMet + Complete (reason CompletionsReached); FailureTarget + Failed (reason
  BackoffLimitExceeded, PodFailurePolicy or DeadlineExceeded, the real messages; Failed is added
  once the Job's processes are gone); Suspended True (JobSuspended) / False (JobResumed);
- a failed pod goes through spec.podFailurePolicy (onExitCodes with containerName, In / NotIn;
  onPodConditions against the pod's status conditions; actions FailJob, Ignore, Count; FailIndex
  counts): FailJob fails the Job at once; Ignore restarts without counting; otherwise the failure
  counts and `failed > backoffLimit` fails the Job, else the index gets a new pod (after
  `backoff_seconds * 2**(failed-1)`; the real controller waits 10 s, 20 s, ...: default 0 here).
  When the Job fails, its running pods are killed and deleted and counted as failed (as the real
  controller does);
- group restart (torchrun): when the container's command is torchrun (`group_restart="torchrun"`,
  the default; "always" or "never" to force), one failed pod makes the runner kill the Job's
  other running pods as well, wait until none runs, and start every unfinished index again on a
  new master port. This is what happens on a real cluster: with static rendezvous the peers'
  torchrun agents fail too (their collectives / store lose a member) and exit non-zero, and the
  Job controller replaces each failed index. The killed peers therefore end Failed (their real
  exit status, normally 143 after SIGTERM) and count against backoffLimit like real ones: a 2-node
  Job spends 2 of its backoffLimit per crash. Without group restart (any other command) only the
  failed index is restarted, as the Job controller does;
- activeDeadlineSeconds from startTime (restarted on resume): fails the Job (DeadlineExceeded);
- spec.suspend true: running processes killed, active pods deleted (not counted), startTime
  cleared, Suspended True; back to false: Suspended False, new startTime, new pods;
- a pod deleted from the API while its process runs: the process is killed and it counts as a
  failed pod (the index is replaced); a Job that disappears (deleted, or collected after its
  LoRATrainingJob was deleted): its processes are killed, pods still present (orphaned) are marked
  Failed. A real orphaned pod would run on: here nothing outlives its Job.

Test hooks (say so in a test: they are shims, not Kubernetes behaviour):
- `fail_next(job, index, exit_code=1, delay=0)`: the next pod started for that index runs a tiny
  Python shim instead of the container command (same env, volumes, pod and status path) that
  prints a line and exits with exit_code after `delay` seconds. Call it before the pod starts;
  calls queue up.
- `disrupt(job, index, reason)`: like a node-pressure eviction: the running pod gets a
  DisruptionTarget condition (True, reason) and its process is killed; a podFailurePolicy
  `Ignore` rule on DisruptionTarget then restarts it without counting.
- `running(job)` -> {index: pid} of live processes; `pods_started(job)` -> pod names in creation
  order; `pod_info(job)` -> per pod: name, index, argv and env as the container saw them (after
  expansion and the local rewrites), shim, pid, exit_code, waiting reason; `pvc_dir(claim)`.

Not emulated: image pulls, resources and GPUs, probes, restartPolicy other than Never (failed
pods are replaced, never restarted in place), NonIndexed Jobs, backoffLimitPerIndex, successPolicy,
podReplacementPolicy, ttlSecondsAfterFinished, job-tracking finalizers, `kubectl logs` (the
emulator has no pods/log: use `runner.logs`), DNS (only PET_MASTER_ADDR is rewritten), Services,
network isolation (every pod is 127.0.0.1, ports are the host's), users and file modes.
"""
from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

log = logging.getLogger(__name__)

MANAGED_BY = "app.kubernetes.io/managed-by=kubelora-operator"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
NODE_NAME = "local-runner"
LOCAL_IP = "127.0.0.1"
SHM = "/dev/shm"
SHIM_BANNER = "[local_runner test shim]"
_HARMLESS_API_CODES = (403, 404, 409)  # a namespace going away, a pod collected, a lost race


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes' $(VAR) expansion (third_party/forked/golang/expansion): `$$` -> `$`, `$(NAME)` ->
    lookup(NAME) or left as `$(NAME)` when undefined, any other `$` kept."""
    out: list[str] = []
    checkpoint, cursor, n = 0, 0, len(text)
    while cursor < n:
        if text[cursor] == "$" and cursor + 1 < n:
            out.append(text[checkpoint:cursor])
            nxt = text[cursor + 1]
            advance = 1
            if nxt == "$":
                out.append("$")
            elif nxt == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                else:
                    name = text[cursor + 2:close]
                    value = lookup(name)
                    out.append(f"$({name})" if value is None else value)
                    advance = close - cursor
            else:
                out.append("$" + nxt)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


def index_ranges(indexes: set[int] | list[int]) -> str:
    """completedIndexes notation: {0, 1, 2, 5} -> "0-2,5"."""
    out, items = [], sorted(set(indexes))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_IP, 0))
        return s.getsockname()[1]


def condition(obj: dict | None, type_: str) -> dict | None:
    """The status condition of that type whose status is "True", or None (for wait_for)."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _rewrite_paths(value: str, mounts: dict[str, str]) -> str:
    """Replace mountPaths that appear as paths in value (start, or after = : , whitespace)."""
    if not mounts:
        return value
    alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    pattern = rf"(?<![^=:,\s])(?:{alternatives})(?![^/:,\s])"
    return re.sub(pattern, lambda m: mounts[m.group(0)], value)


_SHIM = ("import sys, time\n"
         "code, delay = int(sys.argv[1]), float(sys.argv[2])\n"
         f"print({SHIM_BANNER!r}, 'exiting with code', code, 'after', delay, 's instead of running:', "
         "' '.join(sys.argv[3:]), flush=True)\n"
         "time.sleep(delay)\n"
         "sys.exit(code)\n")


# --------------------------------------------------------------------------------------------
# State.

class _PodNotReady(Exception):
    """The kubelet (or scheduler) cannot start the container yet; retried."""

    def __init__(self, kind: str, reason: str, message: str):
        super().__init__(message)
        self.kind, self.reason, self.message = kind, reason, message  # kind: unschedulable|waiting


class _Conditions:
    """Status conditions with lastTransitionTime kept until the status changes."""

    def __init__(self) -> None:
        self.items: dict[str, dict] = {}

    def set(self, type_: str, status: bool, reason: str | None = None, message: str | None = None,
            probe: bool = False) -> None:
        """probe: also a lastProbeTime (Job conditions have one, pod conditions do not)."""
        value = "True" if status else "False"
        old = self.items.get(type_)
        if old and (old["status"], old.get("reason"), old.get("message")) == (value, reason, message):
            return
        changed = old is None or old["status"] != value
        stamp = _now()
        cond: dict[str, Any] = {"type": type_, "status": value}
        if probe:
            cond["lastProbeTime"] = stamp if changed else old.get("lastProbeTime", stamp)
        cond["lastTransitionTime"] = stamp if changed else old["lastTransitionTime"]
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        self.items[type_] = cond

    def list(self) -> list[dict]:
        return [dict(c) for c in self.items.values()]


@dataclass(eq=False)
class _Pod:
    job: "_Job"
    index: int
    name: str
    uid: str
    dir: Path
    created: float                   # monotonic, before or after a pod listing
    spec: dict
    qos: str
    labels: dict
    annotations: dict
    argv: list[str] = field(default_factory=list)             # what runs here
    container_argv: list[str] = field(default_factory=list)   # command + args as the container sees them
    container_env: dict[str, str] = field(default_factory=dict)
    shim: tuple[int, float] | None = None
    proc: subprocess.Popen | None = None
    log_file: Any = None
    start_time: str | None = None    # the pod's status.startTime
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    term_reason: str | None = None
    term_message: str | None = None
    not_ready: _PodNotReady | None = None
    next_try: float = 0.0
    kill_mode: str | None = None     # delete | delete-count | peer | orphan | gone | disrupted
    kill_message: str | None = None
    kill_sent: float | None = None
    hard_killed: bool = False
    gone: bool = False               # the pod object was deleted by someone else
    done: bool = False
    conditions: _Conditions = field(default_factory=_Conditions)
    extra_conditions: dict = field(default_factory=dict)
    last_status: dict | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "log"

    @property
    def namespace(self) -> str:
        return self.job.namespace

    def alive(self) -> bool:
        return self.proc is not None and self.exit_code is None


@dataclass(eq=False)
class _Job:
    uid: str
    namespace: str
    name: str
    obj: dict
    pods: dict[int, _Pod] = field(default_factory=dict)        # the current pod of each index
    succeeded: set[int] = field(default_factory=set)
    failed: int = 0
    start_time: str | None = None
    start_mono: float | None = None
    completion_time: str | None = None
    conditions: _Conditions = field(default_factory=_Conditions)
    suspended: bool | None = None
    failing: tuple[str, str] | None = None
    finished: bool = False
    deleted: bool = False
    port: int | None = None
    group_restart_pending: bool = False
    retry_at: dict[int, float] = field(default_factory=dict)
    last_status: dict | None = None

    @property
    def spec(self) -> dict:
        return self.obj.get("spec") or {}

    @property
    def container(self) -> dict:
        return ((self.spec.get("template") or {}).get("spec") or {}).get("containers", [{}])[0]


# --------------------------------------------------------------------------------------------
# The API.

class _Api:
    """Thin dict-in, dict-out wrapper over the `kubernetes` client's typed APIs."""

    def __init__(self, kubeconfig: str | os.PathLike):
        import kubernetes
        self.kubernetes = kubernetes
        self.client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.batch = kubernetes.client.BatchV1Api(self.client)

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _data(resp: Any) -> Any:
        return json.loads(resp.data) if resp.data else None

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return self._data(fn(*args, _preload_content=False, _request_timeout=10, **kwargs))

    def read(self, kind: str, namespace: str, name: str) -> dict | None:
        fn = {"secret": self.core.read_namespaced_secret, "configmap": self.core.read_namespaced_config_map,
              "pvc": self.core.read_namespaced_persistent_volume_claim}[kind]
        try:
            return self.call(fn, name, namespace)
        except self.kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_status(self, kind: str, namespace: str, name: str, old: dict | None, new: dict) -> None:
        """Merge patch of the status subresource that turns `old` (what we wrote last) into `new`."""
        patch = {k: new.get(k) for k in set(old or {}) | set(new)}
        fn = self.core.patch_namespaced_pod_status if kind == "pod" else self.batch.patch_namespaced_job_status
        self.call(fn, name, namespace, {"status": patch}, _content_type="application/merge-patch+json")

    def harmless(self, e: BaseException) -> bool:
        return isinstance(e, self.kubernetes.client.ApiException) and e.status in _HARMLESS_API_CODES


# --------------------------------------------------------------------------------------------
# The runner.

class LocalJobRunner:
    """See the module docstring. Thread-safe public methods; the work happens in one thread."""

    def __init__(self, kubeconfig: str | os.PathLike, *, workdir: str | os.PathLike | None = None,
                 label_selector: str = MANAGED_BY, interval: float = 0.2, grace_seconds: float = 3.0,
                 backoff_seconds: float = 0.0, group_restart: str = "torchrun",
                 pvc_root: str | os.PathLike | None = None):
        self.kubeconfig = Path(kubeconfig)
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kubelora-runner-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pvc_root = Path(pvc_root) if pvc_root else self.workdir / "pvc"
        self.label_selector = label_selector
        self.interval = interval
        self.grace_seconds = grace_seconds
        self.backoff_seconds = backoff_seconds
        self.group_restart = group_restart
        self.errors: list[str] = []          # unexpected exceptions of the loop (tracebacks)
        self._api: _Api | None = None
        self._jobs: dict[str, _Job] = {}
        self._history: dict[tuple[str, str], list[_Pod]] = {}   # (namespace, job name) -> pods
        self._failures: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
        self._disruptions: list[tuple[str, str, int, str]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public API --------------------------------------------------------------------------

    def start(self) -> "LocalJobRunner":
        self._api = _Api(self.kubeconfig)
        self._register_node()
        self._thread = threading.Thread(target=self._loop, name="local-job-runner", daemon=True)
        self._thread.start()
        return self

    def _register_node(self) -> None:
        """The Node the pods run on, Ready as its kubelet would post it (the operator reads it when
        a multi-node run fails: a node not Ready makes the failure a disruption)."""
        api = self._api
        try:
            api.call(api.core.create_node, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME}})
        except api.kubernetes.client.ApiException as e:
            if e.status != 409:
                raise
        now = _now()
        api.call(api.core.patch_node_status, NODE_NAME, {"status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
             "lastHeartbeatTime": now, "lastTransitionTime": now}]}}, _content_type="application/merge-patch+json")

    def stop(self) -> None:
        """Stop polling and kill every process (SIGTERM, SIGKILL after grace_seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            procs = [p for pods in self._history.values() for p in pods if p.alive()]
            for pod in procs:
                self._signal(pod, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_seconds
            for pod in procs:
                try:
                    pod.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._signal(pod, signal.SIGKILL)
                    pod.proc.wait(10)
                self._close_log(pod)
            if self._api is not None:
                self._api.close()
                self._api = None

    def fail_next(self, job: str, index: int = 0, exit_code: int = 1, *, namespace: str = "default",
                  delay: float = 0.0) -> None:
        """Test shim: the next pod started for (job, index) runs `python -c <exit with exit_code
        after delay seconds>` instead of its container command (same env, volumes, status)."""
        with self._lock:
            self._failures.setdefault((namespace, job, index), []).append((int(exit_code), float(delay)))

    def disrupt(self, job: str, index: int = 0, *, namespace: str = "default",
                reason: str = "TerminationByKubelet") -> None:
        """Test hook: evict the running pod of (job, index): DisruptionTarget condition, process killed."""
        with self._lock:
            self._disruptions.append((namespace, job, index, reason))

    def running(self, job: str, namespace: str = "default") -> dict[int, int]:
        """{completion index: pid} of the Job's live processes."""
        with self._lock:
            return {p.index: p.proc.pid for p in self._history.get((namespace, job), []) if p.alive()}

    def pods_started(self, job: str, namespace: str = "default") -> list[str]:
        """Names of the pods this runner created for the Job, in creation order."""
        with self._lock:
            return [p.name for p in self._history.get((namespace, job), [])]

    def pod_info(self, job: str, namespace: str = "default") -> list[dict]:
        """What the runner did for each pod of the Job, in creation order: name, index, argv (the
        container's command + args after expansion and local rewrites), env (the container's
        resolved env, without the inherited test environment), shim ((exit_code, delay) or None),
        pid, exit_code (None while running or never started), waiting (reason or None)."""
        with self._lock:
            return [{"name": p.name, "index": p.index, "argv": list(p.container_argv), "env": dict(p.container_env),
                     "shim": p.shim, "pid": p.proc.pid if p.proc else None, "exit_code": p.exit_code,
                     "waiting": p.not_ready.reason if p.not_ready else None}
                    for p in self._history.get((namespace, job), [])]

    def pod_log(self, pod: str, namespace: str = "default") -> str:
        with self._lock:
            for pods in self._history.values():
                for p in pods:
                    if p.name == pod and p.namespace == namespace:
                        return p.log_path.read_text(errors="replace") if p.log_path.exists() else ""
        return ""

    def logs(self, job: str, namespace: str = "default", tail: int | None = None) -> str:
        """Every pod of the Job: a header (index, phase, exit code, waiting reason, argv) and its
        stdout+stderr (the last `tail` characters of each when given)."""
        with self._lock:
            pods = list(self._history.get((namespace, job), []))
            parts = []
            for p in pods:
                state = (f"exit code {p.exit_code} ({p.term_reason})" if p.exit_code is not None
                         else f"{p.not_ready.reason}: {p.not_ready.message}" if p.not_ready
                         else "running" if p.alive() else "not started")
                text = p.log_path.read_text(errors="replace") if p.log_path.exists() else ""
                if tail is not None and len(text) > tail:
                    text = "...\n" + text[-tail:]
                shim = f" [test shim: exit {p.shim[0]} after {p.shim[1]} s instead of]" if p.shim else ""
                parts.append(f"==> pod {namespace}/{p.name} (index {p.index}): {state} <==\n"
                             f"${shim} {_show_argv(p.container_argv)}\n{text}")
            return "\n".join(parts)

    def all_logs(self, tail: int | None = None) -> str:
        with self._lock:
            keys = list(self._history)
        return "\n".join(self.logs(name, ns, tail) for ns, name in keys)

    def pvc_dir(self, claim: str, namespace: str = "default") -> Path:
        """The local directory behind a PersistentVolumeClaim (created on demand)."""
        path = self.pvc_root / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                try:
                    self._tick()
                except Exception as e:  # noqa: BLE001 - keep running, report to the test
                    if not self._api.harmless(e):
                        self._record_error()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _record_error(self) -> None:
        text = traceback.format_exc()
        log.error("local runner: %s", text)
        if len(self.errors) < 50:
            self.errors.append(text)

    def _tick(self) -> None:
        api = self._api
        listed_at = time.monotonic()
        jobs = api.call(api.batch.list_job_for_all_namespaces, label_selector=self.label_selector)["items"]
        pods = api.call(api.core.list_pod_for_all_namespaces, label_selector=JOB_NAME_LABEL)["items"]
        pod_names = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods}
        seen = set()
        for obj in jobs:
            if (obj.get("spec") or {}).get("completionMode") != "Indexed":
                continue
            meta = obj["metadata"]
            seen.add(meta["uid"])
            job = self._jobs.get(meta["uid"])
            if job is None:
                job = self._jobs[meta["uid"]] = _Job(uid=meta["uid"], namespace=meta["namespace"],
                                                     name=meta["name"], obj=obj)
                self._history.setdefault((job.namespace, job.name), [])
                if condition(obj, "Complete") or condition(obj, "Failed"):
                    job.finished = True
            job.obj = obj
        for uid, job in list(self._jobs.items()):
            if uid not in seen:
                job.deleted = True
            try:
                self._sync(job, pod_names, listed_at)
            except Exception as e:  # noqa: BLE001 - one Job's trouble must not stop the others
                if not api.harmless(e):
                    self._record_error()
            if job.deleted and not job.pods:
                del self._jobs[uid]

    # -- the Job controller ----------------------------------------------------------------

    def _sync(self, job: _Job, pod_names: set, listed_at: float) -> None:
        now = time.monotonic()
        # pods that vanished from the API, Jobs that vanished
        for pod in list(job.pods.values()):
            if pod.created < listed_at and (job.namespace, pod.name) not in pod_names and not pod.gone:
                pod.gone = True
                if pod.kill_mode not in ("delete", "delete-count"):
                    self._kill(pod, "gone", "the pod was deleted")
        if job.deleted:
            for pod in list(job.pods.values()):
                if pod.kill_mode is None:
                    self._kill(pod, "orphan", "its Job was deleted")
        self._apply_disruptions(job)
        # processes: exits, overdue kills, pods waiting for config
        for pod in list(job.pods.values()):
            self._poll(pod, now)
        if job.deleted or job.finished:
            return
        spec = job.spec
        suspend = bool(spec.get("suspend"))
        if job.suspended is None:  # first sight
            job.suspended = suspend
            if suspend:
                job.conditions.set("Suspended", True, "JobSuspended", "Job suspended", probe=True)
            else:
                self._mark_started(job)
        elif suspend and not job.suspended and job.failing is None:
            job.suspended = True
            job.start_time = job.start_mono = None
            job.port, job.group_restart_pending = None, False
            job.conditions.set("Suspended", True, "JobSuspended", "Job suspended", probe=True)
            for pod in list(job.pods.values()):
                self._kill(pod, "delete", "the Job was suspended")
        elif not suspend and job.suspended:
            job.suspended = False
            job.conditions.set("Suspended", False, "JobResumed", "Job resumed", probe=True)
            self._mark_started(job)
        deadline = spec.get("activeDeadlineSeconds")
        if (deadline and job.start_mono is not None and job.failing is None
                and now - job.start_mono >= float(deadline)):
            self._fail(job, "DeadlineExceeded", "Job was active longer than specified deadline")
        completions = int(spec.get("completions") or 1)
        if job.failing is None and not job.suspended and not job.obj["metadata"].get("deletionTimestamp"):
            self._start_pods(job, completions, now)
        if job.failing is not None and not job.pods:
            job.conditions.set("Failed", True, *job.failing, probe=True)
            job.finished = True
        elif job.failing is None and len(job.succeeded) >= completions and not job.pods:
            message = "Reached expected number of succeeded pods"
            job.conditions.set("SuccessCriteriaMet", True, "CompletionsReached", message, probe=True)
            job.conditions.set("Complete", True, "CompletionsReached", message, probe=True)
            job.completion_time = _now()
            job.finished = True
        self._write_job_status(job)

    def _mark_started(self, job: _Job) -> None:
        job.start_time, job.start_mono = _now(), time.monotonic()

    def _start_pods(self, job: _Job, completions: int, now: float) -> None:
        if job.group_restart_pending:
            if any(p.alive() for p in job.pods.values()):
                return
            job.group_restart_pending = False
            job.port = None
        if job.port is None:
            job.port = free_port()
        parallelism = int(job.spec.get("parallelism") if job.spec.get("parallelism") is not None else 1)
        for index in range(completions):
            if len(job.pods) >= parallelism:
                break
            if index in job.succeeded or index in job.pods or job.retry_at.get(index, 0) > now:
                continue
            self._create_pod(job, index)

    def _fail(self, job: _Job, reason: str, message: str) -> None:
        if job.failing is not None:
            return
        job.failing = (reason, message)
        job.conditions.set("FailureTarget", True, reason, message, probe=True)
        for pod in list(job.pods.values()):
            if pod.kill_mode is None:
                self._kill(pod, "delete-count", f"the Job failed ({reason})")

    def _uses_group_restart(self, job: _Job) -> bool:
        if self.group_restart == "always":
            return True
        if self.group_restart == "never":
            return False
        command = job.container.get("command") or []
        return bool(command) and (os.path.basename(command[0]) == "torchrun"
                                  or command[1:] == ["-m", "kubelora_trainer", "launch"])

    def _pod_finished(self, pod: _Pod) -> None:
        """Count a pod whose process (or attempt) ended, and decide what the Job does next."""
        job = pod.job
        if job.pods.get(pod.index) is pod:
            del job.pods[pod.index]
        mode = pod.kill_mode
        if mode in ("delete", "delete-count", "orphan"):
            if mode == "delete-count" and pod.exit_code != 0:
                job.failed += 1
            if mode == "delete-count" and pod.exit_code == 0:
                job.succeeded.add(pod.index)
            return
        if job.deleted or job.finished:
            return
        if pod.exit_code == 0:
            job.succeeded.add(pod.index)
            return
        action, rule = self._policy_action(job, pod)
        if action == "FailJob":
            job.failed += 1
            self._fail(job, "PodFailurePolicy",
                       f"Container {job.container.get('name')} for pod {job.namespace}/{pod.name} failed with "
                       f"exit code {pod.exit_code} matching FailJob rule at index {rule}")
            return
        if action != "Ignore":
            job.failed += 1
            backoff_limit = int(job.spec.get("backoffLimit") if job.spec.get("backoffLimit") is not None else 6)
            if job.failed > backoff_limit:
                self._fail(job, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                return
            if self.backoff_seconds:
                delay = self.backoff_seconds * 2 ** (job.failed - 1)
                job.retry_at[pod.index] = time.monotonic() + delay
        if job.suspended or job.failing is not None:
            return
        if self._uses_group_restart(job) and mode != "peer":
            job.group_restart_pending = True
            for peer in list(job.pods.values()):
                if peer.alive() and peer.kill_mode is None:
                    self._kill(peer, "peer", f"torchrun group restart: pod {pod.name} (index {pod.index}) failed")
            if self.backoff_seconds and pod.index in job.retry_at:
                for index in range(int(job.spec.get("completions") or 1)):
                    job.retry_at[index] = job.retry_at[pod.index]

    def _policy_action(self, job: _Job, pod: _Pod) -> tuple[str | None, int | None]:
        """(action, rule index) of the first podFailurePolicy rule matching the failed pod."""
        rules = ((job.spec.get("podFailurePolicy") or {}).get("rules")) or []
        container = job.container.get("name")
        pod_conditions = {c["type"]: c["status"] for c in pod.conditions.list()}
        pod_conditions.update({t: c["status"] for t, c in pod.extra_conditions.items()})
        for i, rule in enumerate(rules):
            codes = rule.get("onExitCodes")
            matched = False
            if codes is not None and pod.exit_code is not None and pod.exit_code != 0:
                if codes.get("containerName") in (None, container):
                    inside = pod.exit_code in (codes.get("values") or [])
                    matched = inside if codes.get("operator", "In") == "In" else not inside
            for pattern in rule.get("onPodConditions") or []:
                if pod_conditions.get(pattern.get("type")) == pattern.get("status", "True"):
                    matched = True
            if matched:
                return rule.get("action"), i
        return None, None

    def _apply_disruptions(self, job: _Job) -> None:
        for item in [d for d in self._disruptions if d[:2] == (job.namespace, job.name)]:
            pod = job.pods.get(item[2])
            if pod is None or not pod.alive() or pod.kill_mode is not None:
                continue
            self._disruptions.remove(item)
            pod.extra_conditions["DisruptionTarget"] = {
                "type": "DisruptionTarget", "status": "True", "reason": item[3],
                "message": "local_runner test hook: pod disrupted", "lastTransitionTime": _now()}
            self._kill(pod, "disrupted", f"disrupted ({item[3]})")

    def _write_job_status(self, job: _Job) -> None:
        live = list(job.pods.values())
        terminating = [p for p in live if p.kill_mode is not None]
        active = len(live) - len(terminating)
        status: dict[str, Any] = {}
        for key, value in (("startTime", job.start_time), ("completionTime", job.completion_time)):
            if value:
                status[key] = value
        if active:
            status["active"] = active
        status["ready"] = sum(1 for p in live if p.alive() and p.kill_mode is None)
        status["terminating"] = len(terminating)
        if job.succeeded:
            status["succeeded"] = len(job.succeeded)
            status["completedIndexes"] = index_ranges(job.succeeded)
        if job.failed:
            status["failed"] = job.failed
        status["uncountedTerminatedPods"] = {}
        if job.conditions.items:
            status["conditions"] = job.conditions.list()
        if status != job.last_status:
            self._api.patch_status("job", job.namespace, job.name, job.last_status, status)
            job.last_status = status

    # -- the kubelet -------------------------------------------------------------------------

    def _create_pod(self, job: _Job, index: int) -> None:
        template = job.spec.get("template") or {}
        tmeta = template.get("metadata") or {}
        labels = {**(tmeta.get("labels") or {}), JOB_NAME_LABEL: job.name, "job-name": job.name,
                  CONTROLLER_UID_LABEL: job.uid, "controller-uid": job.uid, INDEX_KEY: str(index)}
        annotations = {**(tmeta.get("annotations") or {}), INDEX_KEY: str(index)}
        spec = json.loads(json.dumps(template.get("spec") or {}))
        spec["hostname"] = f"{job.name}-{index}"[:63].rstrip("-.")
        spec["nodeName"] = NODE_NAME
        spec.setdefault("restartPolicy", "Never")
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": f"{job.name}-{index}-", "namespace": job.namespace,
                             "labels": labels, "annotations": annotations,
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job.name,
                                                  "uid": job.uid, "controller": True, "blockOwnerDeletion": True}]},
                "spec": spec}
        created = self._api.call(self._api.core.create_namespaced_pod, job.namespace, body)
        meta = created["metadata"]
        pod_dir = self.workdir / "pods" / job.namespace / meta["name"]
        pod_dir.mkdir(parents=True, exist_ok=True)
        pod = _Pod(job=job, index=index, name=meta["name"], uid=meta["uid"], dir=pod_dir,
                   created=time.monotonic(), spec=spec, qos=_qos_class(spec), labels=labels, annotations=annotations)
        job.pods[index] = pod
        self._history.setdefault((job.namespace, job.name), []).append(pod)
        pod.start_time = _now()
        self._write_pod_status(pod)   # Pending: scheduled, container creating
        self._try_launch(pod)
        self._write_pod_status(pod)

    def _poll(self, pod: _Pod, now: float) -> None:
        if pod.proc is None:
            if pod.kill_mode is not None:  # never started: nothing to wait for
                self._finish(pod, None)
            elif now >= pod.next_try:
                self._try_launch(pod)
                self._write_pod_status(pod)
            return
        code = pod.proc.poll()
        if code is None:
            if pod.kill_sent is not None and not pod.hard_killed and now - pod.kill_sent > self._grace(pod):
                self._signal(pod, signal.SIGKILL)
                pod.hard_killed = True
            return
        self._finish(pod, 128 - code if code < 0 else code)

    def _grace(self, pod: _Pod) -> float:
        spec_grace = pod.spec.get("terminationGracePeriodSeconds")
        return min(self.grace_seconds, float(spec_grace)) if spec_grace is not None else self.grace_seconds

    def _finish(self, pod: _Pod, exit_code: int | None) -> None:
        pod.done = True
        self._close_log(pod)
        if exit_code is not None:
            pod.exit_code = exit_code
            pod.finished_at = _now()
            pod.term_reason = "Completed" if exit_code == 0 else "Error"
            pod.term_message = pod.kill_message
        elif pod.kill_mode not in ("delete", "delete-count", "orphan"):
            pod.exit_code, pod.term_reason = 137, "Error"  # never started, then stopped
        api = self._api
        if not pod.gone:
            try:
                if pod.kill_mode in ("delete", "delete-count"):
                    api.call(api.core.delete_namespaced_pod, pod.name, pod.namespace, grace_period_seconds=0)
                else:
                    self._write_pod_status(pod)
            except Exception as e:  # noqa: BLE001
                if not api.harmless(e):
                    raise
        self._pod_finished(pod)

    def _kill(self, pod: _Pod, mode: str, message: str) -> None:
        pod.kill_mode, pod.kill_message = mode, f"local_runner: killed: {message}"
        if pod.alive() and pod.kill_sent is None:
            self._signal(pod, signal.SIGTERM)
            pod.kill_sent = time.monotonic()

    @staticmethod
    def _signal(pod: _Pod, sig: int) -> None:
        try:
            os.killpg(pod.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _close_log(pod: _Pod) -> None:
        if pod.log_file is not None:
            pod.log_file.close()
            pod.log_file = None

    def _try_launch(self, pod: _Pod) -> None:
        pod.next_try = time.monotonic() + 1.0
        try:
            argv, env, cwd = self._prepare(pod)
        except _PodNotReady as e:
            pod.not_ready = e
            return
        pod.not_ready = None
        pod.log_file = open(pod.log_path, "ab")
        pod.started_at = _now()
        try:
            pod.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=pod.log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:  # the runtime's StartError
            self._close_log(pod)
            pod.exit_code, pod.term_reason, pod.finished_at = 128, "StartError", _now()
            pod.term_message = f'exec: "{argv[0]}": {e.strerror}'
            pod.done = True
            self._write_pod_status(pod)
            self._pod_finished(pod)

    def _prepare(self, pod: _Pod) -> tuple[list[str], dict[str, str], Path]:
        """Scheduling checks, volumes, env, command: (argv, environment, cwd) or _PodNotReady."""
        job, spec, api = pod.job, pod.spec, self._api
        ns = job.namespace
        container = (spec.get("containers") or [{}])[0]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for v in volumes.values():  # the scheduler: a pod with a missing PVC stays unscheduled
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and api.read("pvc", ns, claim) is None:
                raise _PodNotReady("unschedulable", "Unschedulable",
                                   f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found. '
                                   "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.")
        # volumes
        local_volumes: dict[str, Path] = {}
        for name, v in volumes.items():
            local_volumes[name] = self._volume(pod, name, v)
        mounts: dict[str, str] = {}
        for m in container.get("volumeMounts") or []:
            path = m.get("mountPath", "").rstrip("/") or "/"
            if path == SHM or m.get("name") not in local_volumes:
                continue
            local = local_volumes[m["name"]]
            if m.get("subPath"):
                local = local / m["subPath"]
            mounts[path] = str(local)
        # env
        env, cluster_master = self._container_env(pod, container)
        lookup = env.get
        command = [expand(a, lookup) for a in container.get("command") or []]
        args = [expand(a, lookup) for a in container.get("args") or []]
        if not command:
            raise _PodNotReady("waiting", "CreateContainerConfigError",
                               "local_runner: the container has no command (an image ENTRYPOINT cannot run here)")
        argv = _local_rendezvous(command + args, env, cluster_master)
        argv = [_rewrite_paths(a, mounts) for a in argv]
        env = {k: _rewrite_paths(v, mounts) for k, v in env.items()}
        pod.container_argv, pod.container_env = list(argv), dict(env)
        # the test shim
        queue = self._failures.get((ns, job.name, pod.index))
        if queue:
            pod.shim = code, delay = queue.pop(0)
            argv = [sys.executable, "-c", _SHIM, str(code), str(delay), *argv]
        # the command
        base = os.path.basename(argv[0])
        if base == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        elif base in ("python", "python3"):
            argv = [sys.executable, *argv[1:]]
        full_env = {**os.environ, **env}
        cwd = pod.dir / "work"
        working_dir = container.get("workingDir")
        if working_dir and _rewrite_paths(working_dir, mounts) != working_dir:
            cwd = Path(_rewrite_paths(working_dir, mounts))
        cwd.mkdir(parents=True, exist_ok=True)
        pod.argv = argv
        return argv, full_env, cwd

    def _volume(self, pod: _Pod, name: str, v: dict) -> Path:
        ns, api = pod.namespace, self._api
        if "persistentVolumeClaim" in v:
            return self.pvc_dir(v["persistentVolumeClaim"]["claimName"], ns)
        if "hostPath" in v:
            return Path(v["hostPath"]["path"])
        path = pod.dir / "volumes" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        for kind, key in (("configmap", "configMap"), ("secret", "secret")):
            if key not in v:
                continue
            source = v[key]
            obj_name = source.get("name") if kind == "configmap" else source.get("secretName")
            obj = api.read(kind, ns, obj_name)
            if obj is None:
                if source.get("optional"):
                    return path
                raise _PodNotReady("waiting", "ContainerCreating",
                                   f'MountVolume.SetUp failed for volume "{name}" : {kind} "{obj_name}" not found')
            files = {k: val.encode() for k, val in (obj.get("stringData") or {}).items()}
            data = obj.get("data") or {}
            if kind == "secret":
                files.update({k: base64.b64decode(val) for k, val in data.items()})
            else:
                files.update({k: val.encode() for k, val in data.items()})
                files.update({k: base64.b64decode(val) for k, val in (obj.get("binaryData") or {}).items()})
            items = source.get("items")
            if items:
                missing = [i["key"] for i in items if i["key"] not in files]
                if missing and not source.get("optional"):
                    raise _PodNotReady("waiting", "ContainerCreating",
                                       f'MountVolume.SetUp failed for volume "{name}" : configmap references '
                                       f'non-existent config key: {missing[0]}')
                files = {i["path"]: files[i["key"]] for i in items if i["key"] in files}
            for rel, content in files.items():
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
        return path

    def _container_env(self, pod: _Pod, container: dict) -> tuple[dict[str, str], dict[str, str]]:
        """The kubelet's makeEnvironmentVariables, with the local rendezvous values; also the
        cluster values of PET_MASTER_ADDR / PET_MASTER_PORT that were replaced."""
        job, api, ns = pod.job, self._api, pod.namespace
        env: dict[str, str] = {}
        cluster_master: dict[str, str] = {}

        def define(name: str, value: str) -> None:
            if name == "PET_MASTER_ADDR":
                cluster_master[name], value = value, LOCAL_IP
            elif name == "PET_MASTER_PORT":
                cluster_master[name], value = value, str(job.port)
            env[name] = value

        def source(kind: str, name: str, optional: bool) -> dict | None:
            obj = api.read(kind, ns, name)
            if obj is None and not optional:
                raise _PodNotReady("waiting", "CreateContainerConfigError", f'{kind} "{name}" not found')
            return obj

        def values(kind: str, obj: dict) -> dict[str, str]:
            data = obj.get("data") or {}
            if kind == "secret":  # (stringData: the emulator stores it as written)
                decoded = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}
                return {**decoded, **(obj.get("stringData") or {})}
            return dict(data)

        for item in container.get("envFrom") or []:
            for key, kind in (("configMapRef", "configmap"), ("secretRef", "secret")):
                if key in item:
                    ref = item[key]
                    obj = source(kind, ref.get("name"), bool(ref.get("optional")))
                    if obj is not None:
                        for k, v in values(kind, obj).items():
                            if "=" not in k:
                                define(item.get("prefix", "") + k, v)
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                define(name, expand(item.get("value") or "", env.get))
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                define(name, self._field(pod, vf["fieldRef"].get("fieldPath", "")))
            elif "resourceFieldRef" in vf:
                define(name, "0")
            else:
                for key, kind, label in (("configMapKeyRef", "configmap", "ConfigMap"),
                                         ("secretKeyRef", "secret", "Secret")):
                    if key not in vf:
                        continue
                    ref = vf[key]
                    optional = bool(ref.get("optional"))
                    obj = source(kind, ref.get("name"), optional)
                    if obj is None:
                        break
                    data = values(kind, obj)
                    if ref.get("key") not in data:
                        if optional:
                            break
                        raise _PodNotReady("waiting", "CreateContainerConfigError",
                                           f"couldn't find key {ref.get('key')} in {label} {ns}/{ref.get('name')}")
                    define(name, data[ref["key"]])
        env.setdefault("HOSTNAME", pod.spec.get("hostname", pod.name))
        return env, cluster_master

    @staticmethod
    def _field(pod: _Pod, path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if m:
            return (pod.annotations if m.group(1) == "annotations" else pod.labels).get(m.group(2), "")
        return {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": pod.uid,
                "spec.nodeName": NODE_NAME, "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
                "status.podIP": LOCAL_IP, "status.hostIP": LOCAL_IP, "status.podIPs": LOCAL_IP,
                "status.hostIPs": LOCAL_IP}.get(path, "")

    def _write_pod_status(self, pod: _Pod) -> None:
        if pod.gone:
            return
        container = (pod.spec.get("containers") or [{}])[0]
        nr = pod.not_ready
        scheduled = not (nr is not None and nr.kind == "unschedulable")
        running = pod.alive() and pod.kill_mode is None
        terminal = pod.exit_code is not None
        pod.conditions.set("PodReadyToStartContainers", scheduled and (pod.proc is not None or nr is not None))
        pod.conditions.set("Initialized", scheduled)
        unready = f"containers with unready status: [{container.get('name')}]"
        ready_reason = "PodCompleted" if terminal else (None if running else "ContainersNotReady")
        pod.conditions.set("Ready", running, ready_reason, None if running or terminal else unready)
        pod.conditions.set("ContainersReady", running, ready_reason, None if running or terminal else unready)
        pod.conditions.set("PodScheduled", scheduled, None if scheduled else nr.reason,
                           None if scheduled else nr.message)
        conditions = [c for c in pod.conditions.list() if scheduled or c["type"] == "PodScheduled"]
        conditions += list(pod.extra_conditions.values())
        phase = ("Succeeded" if pod.exit_code == 0 else "Failed") if terminal else (
            "Running" if pod.proc is not None else "Pending")
        status: dict[str, Any] = {"phase": phase, "conditions": conditions, "qosClass": pod.qos}
        if scheduled:
            status.update(hostIP=LOCAL_IP, hostIPs=[{"ip": LOCAL_IP}], startTime=pod.start_time)
            if pod.proc is not None or terminal:
                status.update(podIP=LOCAL_IP, podIPs=[{"ip": LOCAL_IP}])
            cstatus: dict[str, Any] = {"name": container.get("name"), "image": container.get("image", ""),
                                       "imageID": "", "ready": running, "restartCount": 0,
                                       "started": pod.alive(), "lastState": {}}
            if pod.proc is not None:
                cstatus["containerID"] = f"local://{pod.proc.pid}"
            if terminal:
                term = {"exitCode": pod.exit_code, "reason": pod.term_reason,
                        "startedAt": pod.started_at or pod.finished_at, "finishedAt": pod.finished_at}
                if pod.term_message:
                    term["message"] = pod.term_message
                if pod.proc is not None:
                    term["containerID"] = cstatus["containerID"]
                cstatus["state"] = {"terminated": term}
            elif pod.proc is not None:
                cstatus["state"] = {"running": {"startedAt": pod.started_at}}
            else:
                waiting = {"reason": nr.reason if nr else "ContainerCreating"}
                if nr and nr.message:
                    waiting["message"] = nr.message
                cstatus["state"] = {"waiting": waiting}
            status["containerStatuses"] = [cstatus]
        if status != pod.last_status:
            self._api.patch_status("pod", pod.namespace, pod.name, pod.last_status, status)
            pod.last_status = status


def _show_argv(argv: list[str]) -> str:
    """argv for a log header: long or multi-line arguments (a `python -c` program) shortened."""
    out = []
    for a in argv:
        if "\n" in a or len(a) > 200:
            first = a.strip().splitlines()[0] if a.strip() else ""
            a = f"{first[:60]}...<{len(a)} chars>"
        out.append(a if a and not re.search(r"\s", a) else repr(a))
    return " ".join(out)


def _local_rendezvous(argv: list[str], env: dict[str, str], cluster: dict[str, str]) -> list[str]:
    """Literal occurrences of the cluster master address / port in the args -> the local ones."""
    addr, port = cluster.get("PET_MASTER_ADDR"), cluster.get("PET_MASTER_PORT")
    out = []
    for i, arg in enumerate(argv):
        if addr and addr != LOCAL_IP:
            arg = arg.replace(addr, LOCAL_IP)
        if port and port != env.get("PET_MASTER_PORT"):
            flag = re.fullmatch(r"(--master[-_]port=)(.*)", arg)
            if flag and flag.group(2) == port:
                arg = flag.group(1) + env["PET_MASTER_PORT"]
            elif arg == port and i > 0 and argv[i - 1] in ("--master-port", "--master_port"):
                arg = env["PET_MASTER_PORT"]
        out.append(arg)
    return out


def _qos_class(spec: dict) -> str:
    requests, limits = [], []
    for c in spec.get("containers") or []:
        r = c.get("resources") or {}
        requests.append(r.get("requests") or {})
        limits.append(r.get("limits") or {})
    if not any(requests) and not any(limits):
        return "BestEffort"
    guaranteed = all(l.get("cpu") and l.get("memory") and {**l, **r} == l for r, l in zip(requests, limits))
    return "Guaranteed" if guaranteed else "Burstable"


# --------------------------------------------------------------------------------------------
# The fixture.

@pytest.fixture()
def job_runner(kube, tmp_path: Path) -> Iterator[LocalJobRunner]:
    """A LocalJobRunner on the emulator (function-scoped; depends on `kube`), started in a thread and
    stopped (every process killed) after the test. On teardown it prints every pod's log (pytest
    shows it for a failed test) and fails the test if the runner's loop raised."""
    runner = LocalJobRunner(kube.kubeconfig, workdir=tmp_path / "local-runner").start()
    try:
        yield runner
    finally:
        runner.stop()
        text = runner.all_logs(tail=20000)
        if text:
            print("\n---- local runner: pod logs ----\n" + text)
    if runner.errors:
        pytest.fail("the local Job runner raised:\n" + "\n".join(runner.errors), pytrace=False)
