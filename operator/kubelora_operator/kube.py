"""Kubernetes I/O at the edge: create-if-missing, read a Job and its pods, delete children."""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from kubelora_trainer.spec import GROUP, PLURAL, VERSION

from . import env, leader

log = logging.getLogger("kubelora_operator.kube")
_api_client = None
# every API request's (connect, read) timeout: the kubernetes client waits for ever by default, and
# a connection a load balancer or NAT dropped in silence (a control-plane upgrade) would hold a
# sync worker, and with four of them every job's status, while the Lease (its own client) renews
API_TIMEOUT_SECONDS = env.number("KUBELORA_API_TIMEOUT_SECONDS", 60.0)


def request_timeout(given, default: float):
    """A request's timeout: the one the call gives, else (connect, read) from default. Pure."""
    return given if given else (min(10.0, default), default)


def keepalive_options() -> list[tuple[int, int, int]]:
    """Socket options for the API connections: urllib3's own (no Nagle) and TCP keepalive, so a
    pooled connection whose peer vanished is found dead within about a minute, not reused."""
    import socket
    opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; macOS lacks some
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return opts


def api():
    """A kubernetes ApiClient (in-cluster config, else KUBECONFIG), made once; every request it
    sends has a timeout (API_TIMEOUT_SECONDS, unless the call gives one) and keepalive."""
    global _api_client
    if _api_client is None:
        from kubernetes import client, config
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()

        class TimedApiClient(client.ApiClient):
            def request(self, method, url, *args, _request_timeout=None, **kwargs):
                return super().request(method, url, *args, **kwargs,
                                       _request_timeout=request_timeout(_request_timeout, API_TIMEOUT_SECONDS))
        cfg = client.Configuration.get_default_copy()
        cfg.socket_options = keepalive_options()
        _api_client = TimedApiClient(cfg)
    return _api_client


def reset() -> None:
    global _api_client
    _api_client = None
    _secrets.clear()


def _apis():
    from kubernetes import client
    a = api()
    return client.CoreV1Api(a), client.BatchV1Api(a)


class ChildRefused(Exception):
    """The API server refused to create a child (4xx other than 409): retrying cannot help."""


class ChildDeferred(Exception):
    """The API server refused a child for now (quota, throttling, timeout; `deferrable`): the same
    create is tried again later, and the job waits as Pending."""


class SecretForbidden(Exception):
    """RBAC does not let the operator read this Secret (the chart's rbac.secretNames)."""


class NameTaken(Exception):
    """A child's name is held by an object this job does not own; `stale` when it belongs to a
    deleted LoRATrainingJob of the same name whose garbage collection has not finished."""

    def __init__(self, message: str, stale: bool):
        super().__init__(message)
        self.stale = stale


def ownership(existing: dict, owner_uid: str) -> str:
    """'ours' (owned by this LoRATrainingJob), 'stale' (owned by another LoRATrainingJob, i.e.
    a deleted predecessor of the same name) or 'foreign'. Pure."""
    refs = (existing.get("metadata") or {}).get("ownerReferences") or []
    if any(r.get("uid") == owner_uid for r in refs):
        return "ours"
    if any(r.get("kind") == "LoRATrainingJob" for r in refs):
        return "stale"
    return "foreign"


def ensure(obj: dict) -> tuple[dict, bool]:
    """Create obj unless this job's object of that kind and name exists; returns (object,
    created). Idempotent: a handler that runs twice, or after an operator restart, never
    duplicates. An object of that name that another owner holds is never adopted (NameTaken);
    a refused create raises ChildRefused with the API server's message."""
    leader.fence()
    from kubernetes.client.exceptions import ApiException

    core, batch = _apis()
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    if kind == "NetworkPolicy":
        from kubernetes import client
        net = client.NetworkingV1Api(api())
        create, read = net.create_namespaced_network_policy, net.read_namespaced_network_policy
    else:
        create, read = {
            "ConfigMap": (core.create_namespaced_config_map, core.read_namespaced_config_map),
            "Service": (core.create_namespaced_service, core.read_namespaced_service),
            "Job": (batch.create_namespaced_job, batch.read_namespaced_job),
        }[kind]
    try:
        return api().sanitize_for_serialization(create(ns, obj)), True
    except ApiException as e:
        if e.status != 409:
            if 400 <= (e.status or 0) < 500:
                msg = f"the API server refused {kind} {name!r} ({e.status}): {_api_message(e)}"
                raise (ChildDeferred if deferrable(e.status, msg) else ChildRefused)(msg) from None
            raise
    existing = api().sanitize_for_serialization(read(name, ns))
    owner_uid = obj["metadata"]["ownerReferences"][0]["uid"]
    who = ownership(existing, owner_uid)
    if who != "ours":
        holder = ", ".join(f"{r.get('kind')}/{r.get('name')}" for r in existing["metadata"].get("ownerReferences") or [])
        raise NameTaken(f"{kind} {name!r} already exists and belongs to "
                        f"{holder or 'no LoRATrainingJob (created by someone else)'}", stale=who == "stale")
    return existing, False


def read_child(kind: str, namespace: str, name: str) -> Optional[dict]:
    """A ConfigMap or Service of that name (whoever owns it); None when there is none."""
    from kubernetes.client.exceptions import ApiException
    core, _ = _apis()
    read = {"ConfigMap": core.read_namespaced_config_map, "Service": core.read_namespaced_service}[kind]
    try:
        return api().sanitize_for_serialization(read(name, namespace))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def deferrable(code: int, message: str) -> bool:
    """A refused create that the same request can pass later: a timeout (408), API throttling
    (429) or a namespace's ResourceQuota (403 "exceeded quota", until something else finishes).
    Anything else (invalid, forbidden by RBAC or a policy) fails the job. Pure."""
    return code in (408, 429) or (code == 403 and "exceeded quota" in message)


def _api_message(e) -> str:
    import json
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


def get_job(namespace: str, name: str) -> Optional[dict]:
    from kubernetes.client.exceptions import ApiException
    _, batch = _apis()
    try:
        return api().sanitize_for_serialization(batch.read_namespaced_job(name, namespace))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def claim_access_modes(namespace: str, name: str) -> Optional[list[str]]:
    """A PersistentVolumeClaim's spec.accessModes; None when there is no such claim (its pods
    report that themselves)."""
    from kubernetes.client.exceptions import ApiException
    core, _ = _apis()
    try:
        return list(core.read_namespaced_persistent_volume_claim(name, namespace).spec.access_modes or [])
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def read_crd(name: str) -> Optional[dict]:
    """The CustomResourceDefinition `name` as a dict, None when there is none. A list narrowed to
    the name (kopf lists and watches CRDs already: no other permission)."""
    from kubernetes import client
    found = client.ApiextensionsV1Api(api()).list_custom_resource_definition(field_selector=f"metadata.name={name}")
    return api().sanitize_for_serialization(found.items[0]) if found.items else None


def job_pods(namespace: str, job_name: str) -> list[dict]:
    core, _ = _apis()
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
    return [api().sanitize_for_serialization(p) for p in pods.items]


class NodesForbidden(Exception):
    """RBAC does not let the operator read Nodes (the chart's ClusterRole grants `get` on nodes)."""


def nodes(names: list[str]) -> dict[str, Optional[dict]]:
    """The Nodes of these names (None for one that is gone), read one by one: a gang has a few,
    and a list of every Node of a large cluster would cost far more. Raises NodesForbidden on a 403."""
    from kubernetes.client.exceptions import ApiException
    core, _ = _apis()
    out: dict[str, Optional[dict]] = {}
    for name in names:
        try:
            out[name] = api().sanitize_for_serialization(core.read_node(name))
        except ApiException as e:
            if e.status == 404:
                out[name] = None
            elif e.status == 403:
                raise NodesForbidden(_api_message(e)) from None
            else:
                raise
    return out


def failed_create_events(namespace: str, job: dict) -> list[dict]:
    """The Job controller's FailedCreate Events for this Job (its pods refused by a ResourceQuota,
    a LimitRange, Pod Security admission or a webhook), matched by the Job's uid."""
    core, _ = _apis()
    selector = (f"involvedObject.kind=Job,involvedObject.uid={job['metadata']['uid']},reason=FailedCreate")
    events = core.list_namespaced_event(namespace, field_selector=selector)
    return [api().sanitize_for_serialization(e) for e in events.items]


def pod_events(namespace: str, pod: dict) -> list[dict]:
    """The Events about one pod (the scheduler's, the kubelet's, the attach/detach controller's,
    the cluster autoscaler's), matched by its uid."""
    core, _ = _apis()
    selector = f"involvedObject.kind=Pod,involvedObject.uid={pod['metadata']['uid']}"
    events = core.list_namespaced_event(namespace, field_selector=selector)
    return [api().sanitize_for_serialization(e) for e in events.items]


class TTLCache:
    """Values loaded on a miss and kept `ttl` seconds; None (not found) is not kept, so a Secret
    applied after its job is used at the next sync. Thread-safe; the clock is injectable. Used for
    the jobs' credential Secrets: a sync reads a job's Secret from the API server at most once per
    TTL, and a rotated Secret is used within one TTL."""

    def __init__(self, ttl: float, clock=time.monotonic):
        self.ttl, self._clock = ttl, clock
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, key, load):
        now = self._clock()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
        value = load()  # outside the lock: one slow read does not hold up the other jobs' syncs
        if value is not None:
            with self._lock:
                # expired entries go at each load: credentials of Secrets no job names any more are
                # not kept in memory for the operator's lifetime
                self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self.ttl}
                self._entries[key] = (now, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


SECRET_CACHE_SECONDS = env.number("KUBELORA_SECRET_CACHE_SECONDS", 60.0)
_secrets = TTLCache(SECRET_CACHE_SECONDS)


def secret_data(namespace: str, name: str) -> Optional[dict[str, str]]:
    """A Secret's data, decoded, or None when it does not exist; cached for
    KUBELORA_SECRET_CACHE_SECONDS (60). Read only to use a job's S3 credentials."""
    return _secrets.get((namespace, name), lambda: _read_secret(namespace, name))


def _read_secret(namespace: str, name: str) -> Optional[dict[str, str]]:
    import base64
    from kubernetes.client.exceptions import ApiException
    core, _ = _apis()
    try:
        secret = core.read_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        if e.status == 403:
            raise SecretForbidden(name) from None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def get_owner(namespace: str, name: str) -> Optional[dict]:
    """The LoRATrainingJob as the API server has it now (None when gone)."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException
    try:
        return CustomObjectsApi(api()).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def patch_status(namespace: str, name: str, status: dict, uid: Optional[str] = None,
                 resource_version: Optional[str] = None) -> Optional[dict]:
    """Merge-patch the LoRATrainingJob's status subresource (None values delete fields); returns
    the patched object, or None when the job is gone. With uid and resource_version (the body the
    status was worked out from), the patch carries the resourceVersion as a precondition, so it
    never lands on another object of the same name (a job deleted and made again while its sync
    read S3: a new object has a new resourceVersion); on a conflict the object is read again and,
    still this uid, patched at its current version (kopf's own annotation writes move it on)."""
    leader.fence()
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException
    custom = CustomObjectsApi(api())
    for attempt in range(4):
        body = {"status": status}
        if uid is not None and resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, body, _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status == 404:
                return None
            if e.status != 409 or uid is None or attempt == 3:
                raise
        current = get_owner(namespace, name)
        if current is None or current["metadata"].get("uid") != uid:
            return None  # deleted, perhaps made again: not this job's status to write
        resource_version = current["metadata"].get("resourceVersion")
        leader.fence()
    return None


def post_event(event: dict) -> None:
    """Create a core/v1 Event (manifests.event); a failure is logged, never raised: events are
    auxiliary and must not fail a sync."""
    leader.fence()
    from kubernetes.client.exceptions import ApiException
    core, _ = _apis()
    try:
        core.create_namespaced_event(event["metadata"]["namespace"], event)
    except ApiException as e:
        log.warning("could not post event %s %s: %s %s", event.get("reason"), event.get("message"), e.status, e.reason)


def _patched(patch, *args) -> bool:
    """patch(*args) as the leader; False when the object is gone (404)."""
    leader.fence()
    from kubernetes.client.exceptions import ApiException
    try:
        patch(*args)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def set_job_suspend(namespace: str, name: str, suspend: bool) -> bool:
    return _patched(_apis()[1].patch_namespaced_job, name, namespace, {"spec": {"suspend": suspend}})


def select_pods_of(namespace: str, service: str, selector: dict[str, str]) -> bool:
    """Merge these keys into a Service's selector (the pods of one trainer Job); False when the
    Service is gone."""
    return _patched(_apis()[0].patch_namespaced_service, service, namespace, {"spec": {"selector": selector}})


def delete_children(namespace: str, names: dict[str, str], owner_uid: str | None = None) -> list[str]:
    """Delete the Job (and its pods), the Service, the ConfigMap and (names["networkpolicy"]) the
    job's NetworkPolicy; missing ones are fine. With owner_uid, only objects that job owns (never
    someone else's object of the same name). A NetworkPolicy the operator may not delete (a role
    made before networkPolicy.perJob could delete) is left to the garbage collector, said in the log;
    returns the names so left."""
    from kubernetes import client
    from kubernetes.client import V1DeleteOptions, V1Preconditions
    from kubernetes.client.exceptions import ApiException

    core, batch = _apis()
    calls = [(batch.delete_namespaced_job, batch.read_namespaced_job, names["job"]),
             (core.delete_namespaced_service, core.read_namespaced_service, names["service"]),
             (core.delete_namespaced_config_map, core.read_namespaced_config_map, names["configmap"])]
    if names.get("networkpolicy"):
        net = client.NetworkingV1Api(api())
        calls.append((net.delete_namespaced_network_policy, net.read_namespaced_network_policy, names["networkpolicy"]))
    left = []
    for delete, read, name in calls:
        if not name:
            continue
        leader.fence()  # before each: the calls of one job can take a while
        try:
            pre = None
            if owner_uid is not None:
                existing = api().sanitize_for_serialization(read(name, namespace))
                if ownership(existing, owner_uid) != "ours":
                    continue
                pre = V1Preconditions(uid=existing["metadata"]["uid"])
            delete(name, namespace, body=V1DeleteOptions(propagation_policy="Background", preconditions=pre))
        except ApiException as e:
            if e.status == 403 and name == names.get("networkpolicy"):
                log.warning("NetworkPolicy %s/%s left to the garbage collector (deleted with its job): the operator "
                            "may not delete NetworkPolicies (%s)", namespace, name, _api_message(e))
                left.append(name)
            elif e.status != 404:
                raise
    return left


def delete_job(namespace: str, name: str, owner_uid: str) -> None:
    """Delete this job's trainer Job and its pods (missing is fine; another owner's is left alone)."""
    delete_children(namespace, {"job": name, "service": "", "configmap": ""}, owner_uid=owner_uid)  # "": not these
