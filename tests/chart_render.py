"""Render charts/kubelora offline with helm-python-sdk (Helm's Go SDK through a C ABI: no helm
binary, no network) and read the rendered RBAC as (apiGroup, resource, verb) triples."""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubelora"
RELEASE, NAMESPACE = "kl", "kubelora"


def render(values: dict | None = None, chart: Path = CHART) -> dict[str, list[dict]]:
    """template path -> the objects it rendered (NOTES.txt left out)."""
    import helm_python as helm
    out = helm.Chart.load(str(chart)).render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {path: [d for d in yaml.safe_load_all(text) if d]
            for path, text in out.items() if not path.endswith("NOTES.txt")}


def objects(values: dict | None = None, chart: Path = CHART) -> list[dict]:
    return [o for objs in render(values, chart).values() for o in objs]


def notes(values: dict | None = None) -> str:
    import helm_python as helm
    out = helm.Chart.load(str(CHART)).render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    """PolicyRules -> {(apiGroup, resource, verb)}; no wildcards, nor resourceNames but the Secrets'
    (rbac.secretNames) and the leader Lease's (narrowings of what the verbs grant)."""
    out = set()
    for rule in rules:
        assert not rule.get("nonResourceURLs"), rule
        assert not rule.get("resourceNames") or rule["resources"] in (["secrets"], ["leases"]), rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, res, verb), f"wildcard in {rule}"
                    out.add((group, res, verb))
    return out


def aggregated(role: dict) -> bool:
    """A ClusterRole for the cluster's users (aggregated into edit/admin/view), not the operator's."""
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"].get("labels") or {})


def rbac(values: dict | None = None) -> tuple[set, dict[str, set]]:
    """(what the ClusterRole grants, {namespace: what its Role grants}), checking that each role is
    bound to the chart's ServiceAccount."""
    objs = objects(values)
    sa = next(o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount")
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objs if o["kind"] in ("ClusterRole", "Role") and not aggregated(o)}
    cluster, per_ns = set(), {}
    for b in (o for o in objs if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}], b
        ns = b["metadata"].get("namespace")
        role = roles.pop((b["roleRef"]["kind"], ns if b["roleRef"]["kind"] == "Role" else None, b["roleRef"]["name"]))
        if role["kind"] == "ClusterRole":
            assert b["kind"] == "ClusterRoleBinding", "a RoleBinding of a ClusterRole grants only one namespace"
            cluster |= grants(role["rules"])
        else:
            per_ns[ns] = per_ns.get(ns, set()) | grants(role["rules"])
    assert not roles, f"roles bound to nothing: {list(roles)}"
    return cluster, per_ns
