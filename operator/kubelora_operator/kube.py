"""Kubernetes I/O at the edge: create-if-missing, read a Job and its pods, delete children."""
from __future__ import annotations

from typing import Optional

_api_client = None


def api():
    """A kubernetes ApiClient (in-cluster config, else KUBECONFIG), made once."""
    global _api_client
    if _api_client is None:
        from kubernetes import client, config
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _api_client = client.ApiClient()
    return _api_client


def reset() -> None:
    global _api_client
    _api_client = None


def _apis():
    from kubernetes import client
    a = api()
    return client.CoreV1Api(a), client.BatchV1Api(a)


def ensure(obj: dict) -> tuple[dict, bool]:
    """Create obj unless an object of that kind and name exists; returns (object, created).
    Idempotent: a handler that runs twice, or after an operator restart, never duplicates."""
    from kubernetes.client.exceptions import ApiException

    core, batch = _apis()
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    create, read = {
        "ConfigMap": (core.create_namespaced_config_map, core.read_namespaced_config_map),
        "Service": (core.create_namespaced_service, core.read_namespaced_service),
        "Job": (batch.create_namespaced_job, batch.read_namespaced_job),
    }[kind]
    try:
        return api().sanitize_for_serialization(create(ns, obj)), True
    except ApiException as e:
        if e.status != 409:
            raise
    return api().sanitize_for_serialization(read(name, ns)), False


def get_job(namespace: str, name: str) -> Optional[dict]:
    from kubernetes.client.exceptions import ApiException
    _, batch = _apis()
    try:
        return api().sanitize_for_serialization(batch.read_namespaced_job(name, namespace))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def job_pods(namespace: str, job_name: str) -> list[dict]:
    core, _ = _apis()
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
    return [api().sanitize_for_serialization(p) for p in pods.items]


def secret_exists(namespace: str, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException
    core, _ = _apis()
    try:
        core.read_namespaced_secret(name, namespace)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def set_job_suspend(namespace: str, name: str, suspend: bool) -> bool:
    from kubernetes.client.exceptions import ApiException
    _, batch = _apis()
    try:
        batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def delete_children(namespace: str, names: dict[str, str]) -> None:
    """Delete the Job (and its pods), the Service and the ConfigMap; missing ones are fine."""
    from kubernetes.client import V1DeleteOptions
    from kubernetes.client.exceptions import ApiException

    core, batch = _apis()
    calls = [(batch.delete_namespaced_job, names["job"]), (core.delete_namespaced_service, names["service"]),
             (core.delete_namespaced_config_map, names["configmap"])]
    for fn, name in calls:
        try:
            fn(name, namespace, body=V1DeleteOptions(propagation_policy="Background"))
        except ApiException as e:
            if e.status != 404:
                raise
