"""The chart's RBAC grants exactly the API calls the operator makes: nothing missing, nothing extra.

The calls are recorded, not listed by hand: the real operator (kopf + the kubernetes client) runs
against the emulated API server through the paths that touch the API — a 2-node job with a
credentials Secret and a shared cache claim (create, sync, suspend, a gang restart: delete and
make again), a job the API server refuses (its children deleted), a job carrying an earlier
operator's finalizer — and every request it sends (method + path) becomes an RBAC verb on a
resource. A static scan of the operator's kubernetes-client calls complements it: each must have
been seen, so a code path the scenario misses fails here instead of being silently ungranted.
"""
import os

os.environ.setdefault("KUBELORA_SYNC_INTERVAL", "0.5")
os.environ.setdefault("KUBELORA_STORAGE_RETRY_SECONDS", "0.5")
os.environ.setdefault("KUBELORA_STORAGE_RETRY_MAX_SECONDS", "1")
os.environ.setdefault("KUBELORA_RETRY_DELAY", "0.5")
os.environ.setdefault("KUBELORA_STORAGE_STALL_SECONDS", "1")
os.environ.setdefault("KUBELORA_POD_CREATE_GRACE_SECONDS", "0")  # no kubelet: a job's FailedCreate Events are read

import re  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from chart_render import NAMESPACE, rbac  # noqa: E402
from kube.fixtures import kube, kube_server, kubectl, wait_for  # noqa: E402,F401 - fixtures
from test_operator import CRD_FILE, apply, demo_output_bucket, ltj, manifest, phase  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOBS = "batch/v1/jobs"
CLIENTS = ("kopf/", "OpenAPI-Generator/")  # kopf's aiohttp session, the kubernetes client


def verb(method: str, name: str | None, params: dict) -> str:
    if method == "GET":
        return "watch" if params.get("watch") in ("true", "1") else ("get" if name else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}[method]


def recorded_calls(kube) -> tuple[set, list[str]]:
    """{(apiGroup, resource[/subresource], verb, namespace or None)} of every API request the
    operator sent (kubectl's, the test's own, are left out), plus `update` on the owner's
    `/finalizers` for every object it created with blockOwnerDeletion (what
    OwnerReferencesPermissionEnforcement checks), and the User-Agents seen."""
    def read(em):
        return [(r.method, r.resource, r.namespace, r.name, r.subresource, dict(r.params),
                 r.headers.get("User-Agent", ""), r.data) for r in em._requests]
    calls, agents, plurals = set(), set(), {"LoRATrainingJob": ("kubelora.dev", "loratrainingjobs")}
    for method, res, ns, name, sub, params, agent, body in kube.call(read):
        agents.add(agent.split(" ")[0])
        if agent.startswith("kubectl/") or res is None or res.plural is None:
            continue  # the test's kubectl; discovery (/api, /apis: granted to every user)
        assert agent.startswith(CLIENTS), f"an unknown client: {agent}"
        plural = f"{res.plural}/{sub}" if sub else res.plural
        calls.add((res.group, plural, verb(method, name, params), ns))
        if method == "POST" and isinstance(body, dict):
            for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
                if ref.get("blockOwnerDeletion"):
                    group, owner = plurals[ref["kind"]]
                    calls.add((group, f"{owner}/finalizers", "update", ns))
    return calls, sorted(agents)


@contextmanager
def operator(*scope: str):
    from kopf.testing import KopfRunner
    import kopf
    from kubelora_operator import handlers, kube as k
    k.reset()
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    with KopfRunner(["run", "--standalone", *scope], registry=handlers.registry, settings=settings,
                    timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.exception


def run_scenario(kube, kubectl, s3, scope: tuple[str, ...]) -> None:
    kubectl("apply", "-f", CRD_FILE, check=True)
    demo_output_bucket(s3)
    apply(kubectl, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
                    "stringData": {"AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
                                   "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"]}})
    apply(kubectl, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "shared"},
                    "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    old = manifest("old")
    old["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    apply(kubectl, old)
    # leader election (`--lease`; its processes are tested in test_operator_leader.py): take the
    # Lease (made), renew it, release it
    from kubelora_operator import kube as k, leader
    k.reset()
    elector = leader.Elector("default", "kl", "rbac")
    assert elector.try_take()[0] and elector.try_take()[0]
    elector.release()
    with operator(*scope):
        # a 2-node job with a Secret and a shared cache claim: made, synced, suspended
        assert apply(kubectl, manifest("full", resources__nodes=2, resources__cacheVolumeClaim="shared",
                                       storage__credentialsSecret="creds")).returncode == 0
        first = wait_for(lambda: kube.get(JOBS, "default", "full"), timeout=30)
        wait_for(lambda: phase(kube, "full") == "Pending", timeout=30)
        kubectl("patch", "ltj", "full", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}', check=True)
        wait_for(lambda: (kube.get(JOBS, "default", "full") or {}).get("spec", {}).get("suspend"), timeout=30)
        # a node fails: the gang restart reads the pods' Nodes, deletes the Job and makes it again
        apply(kubectl, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "full-0-x", "labels": {"batch.kubernetes.io/job-name": "full"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "full",
                                 "uid": first["metadata"]["uid"], "controller": True}]},
            "spec": {"nodeName": "gpu-a", "containers": [{"name": "trainer", "image": "kubelora/trainer"}]}})
        kubectl("patch", "job", "full", "--subresource=status", "--type=merge",
                "-p", '{"status":{"failed":1,"active":1}}', check=True)
        wait_for(lambda: (kube.get(JOBS, "default", "full") or first)["metadata"]["uid"] != first["metadata"]["uid"],
                 timeout=30)
        # refused by the API server: the children already made are deleted
        apply(kubectl, manifest("refused", resources__nodeSelector={"pool": "gpu a100"}))
        wait_for(lambda: phase(kube, "refused") == "Failed", timeout=30)
        # an earlier operator's finalizer is removed on sight
        wait_for(lambda: not ltj(kube, "old")["metadata"].get("finalizers"), timeout=30)
        wait_for(lambda: phase(kube, "old") == "Pending", timeout=30)
    assert kube.errors() == []


def static_calls() -> set[tuple[str, str, str]]:
    """The kubernetes-client calls in the operator's source, as (apiGroup, resource, verb)."""
    names = {"config_map": ("", "configmaps"), "service": ("", "services"), "job": ("batch", "jobs"),
             "pod": ("", "pods"), "persistent_volume_claim": ("", "persistentvolumeclaims"),
             "secret": ("", "secrets"), "event": ("", "events"),
             "custom_object": ("kubelora.dev", "loratrainingjobs"), "lease": ("coordination.k8s.io", "leases"),
             "network_policy": ("networking.k8s.io", "networkpolicies")}
    verbs = {"create": "create", "read": "get", "get": "get", "list": "list", "patch": "patch",
             "delete": "delete", "replace": "update"}
    found = set()
    for path in (REPO / "operator" / "kubelora_operator").glob("*.py"):
        for v, kind, sub in re.findall(r"\b(create|read|get|list|patch|delete|replace)_namespaced_"
                                       r"([a-z_]+?)(_status)?\b", path.read_text()):
            group, res = names[kind]
            found.add((group, res + ("/status" if sub else ""), verbs[v]))
        for v in re.findall(r"\b(read|list)_node\b", path.read_text()):  # cluster-scoped
            found.add(("", "nodes", verbs[v]))
    return found


@pytest.mark.parametrize("scope", [("--all-namespaces",), ("--namespace=default",)], ids=["cluster", "namespaced"])
def test_the_chart_grants_exactly_what_the_operator_calls(kube, kubectl, s3, scope, capsys, monkeypatch):
    # every optional call on: the per-job NetworkPolicy (the chart's networkPolicy.perJob)
    monkeypatch.setenv("KUBELORA_JOB_NETWORK_POLICY", "true")
    run_scenario(kube, kubectl, s3, scope)
    calls, agents = recorded_calls(kube)
    with capsys.disabled():
        print(f"\n[{scope[0]}] clients {agents}; calls:")
        for c in sorted(calls, key=lambda c: (c[0], c[1], c[2], c[3] or "")):
            print("  ", c)
    cluster_wide = {(g, r, v) for g, r, v, ns in calls if ns is None}
    leases = {(g, r, v) for g, r, v, ns in calls if r == "leases"}  # in the release namespace
    per_ns = {(g, r, v) for g, r, v, ns in calls if ns is not None and r != "leases"}
    assert {ns for *_, ns in calls} <= {None, "default"}
    seen = cluster_wide | per_ns | leases
    missed = static_calls() - seen
    assert not missed, f"the scenario never ran these calls of the operator's code: {missed}"
    if scope == ("--all-namespaces",):
        granted, roles = rbac({"rbac": {"secretNames": ["creds"]},  # the scenario's credentialsSecret
                               "networkPolicy": {"perJob": True}})
        assert set(roles) == {NAMESPACE} and roles[NAMESPACE] == leases, roles
        seen -= leases
        assert granted == seen, f"missing: {seen - granted}; extra: {granted - seen}"
    else:
        granted, roles = rbac({"watchNamespaces": ["default"], "rbac": {"secretNames": ["creds"]},
                               "networkPolicy": {"perJob": True}})
        assert set(roles) == {"default", NAMESPACE} and roles.pop(NAMESPACE) == leases, roles
        assert granted == cluster_wide, f"missing: {cluster_wide - granted}; extra: {granted - cluster_wide}"
        assert roles["default"] == per_ns, f"missing: {per_ns - roles['default']}; extra: {roles['default'] - per_ns}"
