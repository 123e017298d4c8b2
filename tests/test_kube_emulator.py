"""The emulated Kubernetes API (tests/kube): admission rules as pure functions, then the server
as kubectl, the `kubernetes` client and a real kopf operator see it."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from kube import admission
from kube.emulator import match_labels, parse_api_path, parse_label_selector
from kube.fixtures import kopf_registry, kube, kube_api, kube_server, kubectl  # noqa: F401 - fixtures
from kube.fixtures import wait_for

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "loratrainingjobs.kubelora.dev.yaml"
DEMO = REPO / "examples" / "demo-flux.yaml"
LTJ = "kubelora.dev/v1alpha1/loratrainingjobs"

SCALER_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: scalers.example.dev}
spec:
  group: example.dev
  names: {kind: Scaler, plural: scalers, singular: scaler, listKind: ScalerList}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: self.minReplicas <= self.maxReplicas
              message: minReplicas must not exceed maxReplicas
            properties:
              minReplicas: {type: integer, default: 1}
              maxReplicas: {type: integer}
              storageClass:
                type: string
                x-kubernetes-validations:
                - {rule: self == oldSelf, message: storageClass is immutable}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"""


def scaler(name: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "example.dev/v1", "kind": "Scaler", "metadata": {"name": name}, "spec": spec})


def crd_schema() -> dict:
    return admission.crd_schema(yaml.safe_load(CRD_FILE.read_text()), "v1alpha1")


def demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


def http(server, method: str, path: str, body=None, ctype: str = "application/json", accept: str | None = None):
    """(status, parsed JSON) of one raw API request."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": ctype, **({"Accept": accept} if accept else {})}
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# --------------------------------------------------------------------------------------------
# admission.py: pure functions


def test_admission_defaults_prunes_and_accepts_the_demo():
    obj, dropped, errors = admission.admit({**demo(), "spec": {**demo()["spec"], "bogus": 1}}, crd_schema())
    assert errors == [] and dropped == ["spec.bogus"]
    assert obj["spec"]["adapter"] == {"rank": 8, "alpha": 4, "type": "lora", "dropout": 0.0}
    assert obj["spec"]["runPolicy"]["backoffLimit"] == 3  # `default: {}` then the defaults inside it
    assert obj["metadata"] == demo()["metadata"]


def test_admission_error_messages_match_the_api_server():
    bad = demo()
    bad["spec"]["adapter"].update(rank=0, alpha=0)           # minimum; boolean exclusiveMinimum
    bad["spec"]["model"]["type"] = "dalle"                   # enum
    bad["spec"]["dataset"]["resolution"] = 33                # multipleOf
    bad["spec"]["output"]["uri"] = "ftp://x"                 # pattern
    bad["spec"]["training"]["steps"] = "many"                # type
    del bad["spec"]["dataset"]["uri"]                        # CEL: uri or sources
    _, _, errors = admission.admit(bad, crd_schema())
    got = {str(e) for e in errors}
    assert "spec.adapter.rank: Invalid value: 0: spec.adapter.rank in body should be greater than or equal to 1" in got
    assert "spec.adapter.alpha: Invalid value: 0: spec.adapter.alpha in body should be greater than 0" in got
    assert any(e.startswith('spec.model.type: Unsupported value: "dalle": supported values: "flux", "sdxl"') for e in got)
    assert "spec.dataset.resolution: Invalid value: 33: spec.dataset.resolution in body should be a multiple of 16" in got
    assert any(e.startswith('spec.output.uri: Invalid value: "ftp://x": spec.output.uri in body should match') for e in got)
    assert 'spec.training.steps: Invalid value: "string": spec.training.steps in body must be of type integer: "string"' in got
    assert any(e.startswith('spec.dataset: Invalid value: "object": set exactly one of dataset.uri') for e in got), got
    status = admission.invalid_status("LoRATrainingJob", "kubelora.dev", "x", errors[:1])
    assert status["code"] == 422 and status["reason"] == "Invalid"
    assert status["message"] == f'LoRATrainingJob.kubelora.dev "x" is invalid: {errors[0]}'
    assert status["details"]["causes"][0]["field"] == errors[0].field


def test_admission_nullable_and_non_nullable_nulls():
    obj = demo()
    obj["spec"]["adapter"]["alpha"] = None        # nullable: kept, not validated
    obj["spec"]["model"]["dtype"] = None          # not nullable, has a default: defaulted
    obj["spec"]["dataset"]["missingCaption"] = None
    out, _, errors = admission.admit(obj, crd_schema())
    assert errors == []
    assert out["spec"]["adapter"]["alpha"] is None
    assert out["spec"]["model"]["dtype"] == "bfloat16"
    schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {"x": {"type": "string"}}}}}
    out, _, errors = admission.admit({"spec": {"x": None}}, schema)
    assert out == {"spec": {}} and errors == []   # not nullable, no default: pruned


def test_admission_preserve_unknown_fields_and_embedded_lists():
    obj = demo()
    obj["status"] = {"phase": "Training", "progress": {"step": 3, "anything": {"goes": True}}, "junk": 1}
    obj["spec"]["resources"]["tolerations"] = [{"key": "gpu", "operator": "Exists", "custom": 1}]
    out, dropped, errors = admission.admit(obj, crd_schema())
    assert errors == [] and dropped == ["spec.resources.tolerations[0].custom"]   # typed: a toleration's fields
    assert out["status"]["progress"]["anything"] == {"goes": True} and out["status"]["junk"] == 1
    assert out["spec"]["resources"]["tolerations"][0] == {"key": "gpu", "operator": "Exists"}


def test_admission_cel_rules_transition_rules_and_ratcheting():
    schema = yaml.safe_load(SCALER_CRD)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    ok = {"spec": {"minReplicas": 1, "maxReplicas": 3, "storageClass": "fast"}}
    assert admission.validate(ok, schema) == []
    errors = admission.validate({"spec": {"minReplicas": 5, "maxReplicas": 3}}, schema)
    assert [str(e) for e in errors] == ['spec: Invalid value: "object": minReplicas must not exceed maxReplicas']
    # oldSelf: only evaluated on update, where it correlates
    changed = {"spec": {"minReplicas": 1, "maxReplicas": 3, "storageClass": "slow"}}
    assert admission.validate(changed, schema) == []
    errors = admission.validate(changed, schema, old=ok)
    assert [str(e) for e in errors] == ['spec.storageClass: Invalid value: "string": storageClass is immutable']
    # ratcheting: an unchanged invalid value does not block an unrelated update
    old_bad = {"spec": {"minReplicas": 5, "maxReplicas": 3}, "status": {}}
    assert admission.validate({**old_bad, "status": {"seen": 1}}, schema, old=old_bad) == []
    # a rule that does not compile refuses the CRD
    crd = yaml.safe_load(SCALER_CRD)
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"][0]["rule"] = "self.minReplicas <="
    errors = admission.check_crd(crd)
    assert len(errors) == 1 and "compilation failed" in str(errors[0])
    assert admission.check_crd(yaml.safe_load(CRD_FILE.read_text())) == []


def test_object_meta_checks_every_kind():
    ok = {"metadata": {"name": "job-1", "labels": {"kubelora.dev/job": "demo"},
                       "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": "u"}]}}
    assert admission.validate_object_meta(ok, "batch", "jobs") == []
    errors = admission.validate_object_meta({"metadata": {"name": "1-headless"}}, "", "services")
    assert [e.field for e in errors] == ["metadata.name"] and "DNS-1035" in str(errors[0])
    errors = admission.validate_object_meta({"metadata": {"name": "x" * 64}}, "batch", "jobs")
    assert str(errors[0]) == f'metadata.name: Invalid value: "{"x" * 64}": must be no more than 63 characters'
    errors = admission.validate_object_meta({"metadata": {"name": "a", "labels": {"model": "s3://b/m"}}}, "", "pods")
    assert errors and errors[0].field == "metadata.labels"
    two = [{"apiVersion": "v1", "kind": "X", "name": n, "uid": n, "controller": True} for n in "ab"]
    assert admission.validate_object_meta({"metadata": {"name": "a", "ownerReferences": two}}, "", "pods")


def test_label_selector_and_path_parsing():
    reqs = parse_label_selector("app=a,tier!=db,env in (dev, prod),!legacy,owner")
    assert match_labels(reqs, {"app": "a", "env": "dev", "owner": "me"})
    assert not match_labels(reqs, {"app": "a", "env": "qa", "owner": "me"})
    assert not match_labels(reqs, {"app": "a", "env": "dev", "owner": "me", "legacy": "1"})
    assert not match_labels(parse_label_selector("x notin (1)"), {"x": "1"})
    with pytest.raises(ValueError):
        parse_label_selector("a b c")
    assert parse_api_path("/api/v1/namespaces").plural == "namespaces"
    p = parse_api_path("/api/v1/namespaces/kube-system/status")
    assert (p.plural, p.name, p.subresource, p.namespace) == ("namespaces", "kube-system", "status", None)
    p = parse_api_path("/apis/kubelora.dev/v1alpha1/namespaces/ns/loratrainingjobs/x/status")
    assert (p.group, p.namespace, p.plural, p.name, p.subresource) == ("kubelora.dev", "ns", "loratrainingjobs", "x", "status")


# --------------------------------------------------------------------------------------------
# kubectl


def test_kubectl_applies_the_crd_and_a_valid_job(kube, kubectl):
    assert kubectl("apply", "-f", CRD_FILE).returncode == 0
    r = kubectl("apply", "-f", DEMO)
    assert r.returncode == 0, r.stderr
    assert "loratrainingjob.kubelora.dev/demo-flux created" in r.stdout
    r = kubectl("get", "ltj")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "REASON", "MODEL", "NODES", "PROGRESS", "LOSS", "AGE"]
    assert row.split()[:3] == ["demo-flux", "flux", "1"] and "Warning" not in r.stderr
    stored = kube.get(LTJ, "default", "demo-flux")
    assert stored["spec"]["adapter"]["rank"] == 8 and stored["spec"]["training"]["seed"] == 42  # defaulted
    assert stored["metadata"]["generation"] == 1 and stored["metadata"]["uid"]
    assert "unchanged" in kubectl("apply", "-f", DEMO).stdout
    r = kubectl("get", "loratrainingjobs.kubelora.dev", "demo-flux", "-o", "jsonpath={.spec.model.type}")
    assert r.stdout == "flux"
    assert kubectl("delete", "ltj", "demo-flux").returncode == 0
    assert kube.get(LTJ, "default", "demo-flux") is None


def test_kubectl_refuses_invalid_jobs_naming_the_field(kube, kubectl):
    kubectl("apply", "-f", CRD_FILE, check=True)
    text = DEMO.read_text().replace("name: demo-flux", "name: bad")
    r = kubectl("apply", "-f", "-", input=text.replace("rank: 8", "rank: 0"))
    assert r.returncode != 0
    assert 'The LoRATrainingJob "bad" is invalid' in r.stderr
    assert "spec.adapter.rank: Invalid value: 0: spec.adapter.rank in body should be greater than or equal to 1" in r.stderr
    r = kubectl("apply", "-f", "-", input=text.replace("type: flux", "type: dalle"))
    assert r.returncode != 0 and 'spec.model.type: Unsupported value: "dalle"' in r.stderr
    r = kubectl("apply", "-f", "-", input=text.replace("  adapter:\n", "  mystery: 1\n  adapter:\n"))
    assert r.returncode == 0, r.stderr  # unknown fields are pruned (silently: --validate=false)
    assert "mystery" not in kube.get(LTJ, "default", "bad")["spec"]


def test_cel_rules_are_enforced_through_kubectl(kube, kubectl):
    kubectl("apply", "-f", "-", input=SCALER_CRD, check=True)
    assert kubectl("apply", "-f", "-", input=scaler("s", minReplicas=1, maxReplicas=3, storageClass="fast")).returncode == 0
    r = kubectl("apply", "-f", "-", input=scaler("t", minReplicas=5, maxReplicas=3))
    assert r.returncode != 0
    assert 'spec: Invalid value: "object": minReplicas must not exceed maxReplicas' in r.stderr
    r = kubectl("apply", "-f", "-", input=scaler("s", minReplicas=1, maxReplicas=3, storageClass="slow"))
    assert r.returncode != 0
    assert 'spec.storageClass: Invalid value: "string": storageClass is immutable' in r.stderr
    r = kubectl("apply", "-f", "-", input=scaler("s", minReplicas=2, maxReplicas=3, storageClass="fast"))
    assert r.returncode == 0, r.stderr
    assert kube.get("example.dev/v1/scalers", "default", "s")["metadata"]["generation"] == 2
    assert kubectl("delete", "crd", "scalers.example.dev").returncode == 0
    assert kube.list("example.dev/v1/scalers") == []
    assert "doesn't have a resource type" in kubectl("get", "scalers").stderr


# --------------------------------------------------------------------------------------------
# the raw API: what kopf relies on


def test_api_semantics_kopf_relies_on(kube):
    kube_ns = http(kube, "GET", "/api/v1/namespaces")
    assert kube_ns[0] == 200 and kube_ns[1]["kind"] == "NamespaceList"
    assert "default" in [n["metadata"]["name"] for n in kube_ns[1]["items"]]
    assert http(kube, "GET", "/api/v1/namespaces/default")[1]["status"]["phase"] == "Active"
    assert http(kube, "POST", "/api/v1/namespaces/nowhere/configmaps", {"metadata": {"name": "x"}})[0] == 404
    status, err = http(kube, "POST", "/api/v1/namespaces/default/services", {"metadata": {"name": "9-bad"}})
    assert status == 422 and err["message"].startswith('Service "9-bad" is invalid: metadata.name: Invalid value')

    base = "/api/v1/namespaces/default/configmaps"
    status, cm = http(kube, "POST", base, {"metadata": {"generateName": "cm-", "labels": {"a": "1"}}, "data": {"k": "v"}})
    assert status == 201 and cm["metadata"]["name"].startswith("cm-") and cm["kind"] == "ConfigMap"
    name, rv = cm["metadata"]["name"], cm["metadata"]["resourceVersion"]
    # a failed JSON-patch `test` is 422 (kopf's optimistic finalizer patches rely on it)
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
             {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}]
    assert http(kube, "PATCH", f"{base}/{name}", stale, "application/json-patch+json")[0] == 422
    fresh = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}] + stale[1:]
    status, cm = http(kube, "PATCH", f"{base}/{name}", fresh, "application/json-patch+json")
    assert status == 200 and int(cm["metadata"]["resourceVersion"]) > int(rv)
    # PUT replaces; a stale resourceVersion conflicts
    assert http(kube, "PUT", f"{base}/{name}", {"metadata": {"name": name, "resourceVersion": rv}})[0] == 409
    status, cm = http(kube, "PUT", f"{base}/{name}", {"metadata": {"name": name, "finalizers": ["x"]}, "data": {"n": "1"}})
    assert status == 200 and cm["data"] == {"n": "1"} and "labels" not in cm["metadata"]
    # lists carry kind, apiVersion and a resourceVersion to watch from
    status, lst = http(kube, "GET", base)
    assert (lst["kind"], lst["apiVersion"]) == ("ConfigMapList", "v1") and lst["metadata"]["resourceVersion"]
    # finalizers hold a deleted object until they are removed
    status, cm = http(kube, "DELETE", f"{base}/{name}")
    assert status == 200 and cm["metadata"]["deletionTimestamp"]
    assert http(kube, "GET", f"{base}/{name}")[0] == 200
    assert http(kube, "PATCH", f"{base}/{name}", {"metadata": {"finalizers": ["x", "y"]}},
                "application/merge-patch+json")[0] == 422  # no new finalizers while deleting
    assert http(kube, "PATCH", f"{base}/{name}", {"metadata": {"finalizers": None}}, "application/merge-patch+json")[0] == 200
    assert http(kube, "GET", f"{base}/{name}")[0] == 404
    assert kube.errors() == []


def watch_events(server, path: str) -> list[dict]:
    """Every event of one watch request (end it with timeoutSeconds in path)."""
    with urllib.request.urlopen(server.url + path, timeout=10) as resp:
        return [json.loads(line) for line in resp if line.strip()]


def test_watch_resource_versions_bookmarks_and_namespace_deletion(kube):
    base = "/api/v1/namespaces/team/configmaps"
    assert http(kube, "POST", "/api/v1/namespaces", {"metadata": {"name": "team"}})[0] == 201
    _, first = http(kube, "POST", base, {"metadata": {"name": "a"}})
    _, second = http(kube, "POST", base, {"metadata": {"name": "b"}})
    events = watch_events(kube, f"{base}?watch=true&timeoutSeconds=1&resourceVersion={first['metadata']['resourceVersion']}")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]
    events = watch_events(kube, f"{base}?watch=true&timeoutSeconds=1&sendInitialEvents=true&allowWatchBookmarks=true"
                                "&resourceVersionMatch=NotOlderThan")
    assert [e["type"] for e in events] == ["ADDED", "ADDED", "BOOKMARK"]
    assert events[-1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    kube.call(lambda em: setattr(em, "_log_floor", em._rv))  # as if the history had been compacted
    events = watch_events(kube, f"{base}?watch=true&timeoutSeconds=1&resourceVersion={first['metadata']['resourceVersion']}")
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
    status, ns = http(kube, "DELETE", "/api/v1/namespaces/team")
    assert status == 200
    assert kube.list("v1/configmaps", "team") == [] and kube.get("v1/namespaces", None, "team") is None


def test_status_subresource_and_generation(kube, kubectl):
    kubectl("apply", "-f", CRD_FILE, check=True)
    base = "/apis/kubelora.dev/v1alpha1/namespaces/default/loratrainingjobs"
    body = {**demo(), "status": {"phase": "Succeeded"}}
    status, obj = http(kube, "POST", base, body)
    assert status == 201 and "status" not in obj  # status is the server's on create
    merge = "application/merge-patch+json"
    _, obj = http(kube, "PATCH", f"{base}/demo-flux", {"status": {"phase": "Training"}}, merge)
    assert "status" not in obj  # ignored on the main resource
    _, obj = http(kube, "PATCH", f"{base}/demo-flux/status", {"status": {"phase": "Training"}, "spec": {"x": 1}}, merge)
    assert obj["status"] == {"phase": "Training"} and obj["metadata"]["generation"] == 1
    _, obj = http(kube, "PATCH", f"{base}/demo-flux", {"metadata": {"labels": {"a": "b"}}}, merge)
    assert obj["metadata"]["generation"] == 1
    _, obj = http(kube, "PATCH", f"{base}/demo-flux", {"spec": {"runPolicy": {"suspend": True}}}, merge)
    assert obj["metadata"]["generation"] == 2 and obj["status"] == {"phase": "Training"}
    obj["status"] = {"phase": "Suspended"}
    status, put = http(kube, "PUT", f"{base}/demo-flux/status", obj)
    assert status == 200 and put["status"] == {"phase": "Suspended"} and put["metadata"]["generation"] == 2
    status, err = http(kube, "PATCH", f"{base}/demo-flux", {"spec": {"adapter": {"rank": 0}}}, merge)
    assert status == 422 and err["reason"] == "Invalid"
    # the schema error, and the CRD's CEL transition rule (spec immutable except runPolicy.suspend)
    assert err["message"].startswith('LoRATrainingJob.kubelora.dev "demo-flux" is invalid: ')
    assert ('spec.adapter.rank: Invalid value: 0: spec.adapter.rank in body should be greater than or equal to 1'
            in err["message"]) and "immutable after creation" in err["message"]
    # spec.samples (absent unless written) is immutable too: adding it later is refused
    status, err = http(kube, "PATCH", f"{base}/demo-flux", {"spec": {"samples": {"prompts": [{"prompt": "a cat"}]}}},
                       merge)
    assert status == 422 and "immutable after creation" in err["message"], err
    # and spec.evaluation (was: left out of the rule, an edit accepted that never reached the run)
    status, err = http(kube, "PATCH", f"{base}/demo-flux", {"spec": {"evaluation": {"sources": [{"uri": "s3://demo/eval"}], "everySteps": 5}}}, merge)
    assert status == 422 and "immutable after creation" in err["message"], err
    _, table = http(kube, "GET", base, accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    assert table["kind"] == "Table" and table["rows"][0]["cells"][:4] == ["demo-flux", "Suspended", None, "flux"]


# --------------------------------------------------------------------------------------------
# the official `kubernetes` client


def test_python_client_configmaps_jobs_watch_and_selectors(kube, kube_api):
    from kubernetes import client, watch
    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    core.create_namespaced_config_map("default", {"metadata": {"name": "a", "labels": {"app": "x"}}, "data": {"k": "1"}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "b", "labels": {"app": "y"}}})
    cm = core.patch_namespaced_config_map("a", "default", {"data": {"k2": "2"}})
    assert cm.data == {"k": "1", "k2": "2"}
    assert [c.metadata.name for c in core.list_namespaced_config_map("default", label_selector="app=x").items] == ["a"]
    assert [c.metadata.name for c in core.list_config_map_for_all_namespaces(label_selector="app in (x,y)").items] == ["a", "b"]

    since = core.list_namespaced_config_map("default").metadata.resource_version
    core.patch_namespaced_config_map("a", "default", {"data": {"k3": "3"}})
    core.patch_namespaced_config_map("b", "default", {"data": {"k3": "3"}})
    core.patch_namespaced_config_map("b", "default", {"metadata": {"labels": {"app": "x"}}})
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        core.list_namespaced_config_map, "default", resource_version=since, label_selector="app=x", timeout_seconds=1)]
    assert events == [("MODIFIED", "a"), ("ADDED", "b")]  # not replayed from before `since`; b entered the selector

    job = {"metadata": {"name": "train", "labels": {"app": "x"}},
           "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "template": {"spec": {
               "restartPolicy": "Never", "containers": [{"name": "trainer", "image": "trainer:dev"}]}}}}
    created = batch.create_namespaced_job("default", job)
    assert created.metadata.generation == 1 and created.status is None
    updated = batch.patch_namespaced_job_status("train", "default", {"status": {"active": 2}})
    assert updated.status.active == 2 and updated.metadata.generation == 1
    patched = batch.patch_namespaced_job("train", "default", {"spec": {"suspend": True}})
    assert patched.spec.suspend is True and patched.metadata.generation == 2 and patched.status.active == 2
    assert [j.metadata.name for j in batch.list_namespaced_job("default", label_selector="app=x").items] == ["train"]


def test_garbage_collection_background_and_foreground(kube, kube_api):
    from kubernetes import client
    from kubernetes.client.rest import ApiException
    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)

    def owned_by(owner):
        return [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid,
                 "controller": True, "blockOwnerDeletion": True}]

    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
    job = batch.create_namespaced_job("default", {"metadata": {"name": "child", "ownerReferences": owned_by(owner)},
                                                  "spec": {"template": {"spec": {"restartPolicy": "Never",
                                                           "containers": [{"name": "c", "image": "i"}]}}}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "grandchild", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "child", "uid": job.metadata.uid}]}})
    core.delete_namespaced_config_map("owner", "default")  # Background: cascades down
    for read, name in [(batch.read_namespaced_job, "child"), (core.read_namespaced_config_map, "grandchild")]:
        with pytest.raises(ApiException) as e:
            read(name, "default")
        assert e.value.status == 404

    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "held", "finalizers": ["test/hold"],
                                                               "ownerReferences": owned_by(owner)}})
    core.delete_namespaced_config_map("owner", "default", propagation_policy="Foreground")
    waiting = core.read_namespaced_config_map("owner", "default")  # waits for its dependents
    assert waiting.metadata.deletion_timestamp and waiting.metadata.finalizers == ["foregroundDeletion"]
    assert core.read_namespaced_config_map("held", "default").metadata.deletion_timestamp
    core.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": None}})
    assert kube.get("v1/configmaps", "default", "held") is None
    assert kube.get("v1/configmaps", "default", "owner") is None

    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "orphan", "ownerReferences": owned_by(owner)}})
    core.delete_namespaced_config_map("owner", "default", propagation_policy="Orphan")
    assert core.read_namespaced_config_map("orphan", "default").metadata.owner_references is None


# --------------------------------------------------------------------------------------------
# a real kopf operator


def test_kopf_operator_end_to_end(kube, kubectl, kopf_registry):
    import kopf
    from kopf.testing import KopfRunner

    kubectl("apply", "-f", CRD_FILE, check=True)
    registry = kopf_registry
    created, deleted = [], threading.Event()

    @kopf.on.create("kubelora.dev", "v1alpha1", "loratrainingjobs", id="on_create", registry=registry)
    def on_create(name, spec, patch, body, **_):
        created.append(name)
        kopf.info(body, reason="Accepted", message="training job accepted")
        patch.status["phase"] = "Pending"
        return {"model": spec["model"]["type"]}

    @kopf.on.delete("kubelora.dev", "v1alpha1", "loratrainingjobs", registry=registry)
    def on_delete(**_):
        deleted.set()

    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=registry, settings=settings,
                    timeout=30) as runner:
        kubectl("apply", "-f", DEMO, check=True)
        job = wait_for(lambda: (o := kube.get(LTJ, "default", "demo-flux")) and
                       o.get("status", {}).get("phase") == "Pending" and o)
        assert created == ["demo-flux"]
        assert job["status"]["on_create"] == {"model": "flux"}
        assert "kopf.zalando.org/KopfFinalizerMarker" in job["metadata"]["finalizers"]
        events = wait_for(lambda: kube.list("v1/events", "default"))
        assert (events[0]["reason"], events[0]["involvedObject"]["name"]) == ("Accepted", "demo-flux")
        kubectl("delete", "ltj", "demo-flux", "--wait=false", check=True)
        wait_for(lambda: kube.get(LTJ, "default", "demo-flux") is None)
        assert deleted.is_set()
    assert runner.exception is None and runner.exit_code == 0
    assert kube.errors() == []
