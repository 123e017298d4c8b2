"""The operator (real kopf, real kubernetes client, real kubectl) against the emulated API server,
which admits LoRATrainingJobs like the real one (schema + CEL from the generated CRD)."""
import os

os.environ.setdefault("KUBELORA_SYNC_INTERVAL", "0.5")
os.environ.setdefault("KUBELORA_STORAGE_RETRY_SECONDS", "0.5")
os.environ.setdefault("KUBELORA_STORAGE_RETRY_MAX_SECONDS", "1")
os.environ.setdefault("KUBELORA_RETRY_DELAY", "0.5")
os.environ.setdefault("KUBELORA_STORAGE_STALL_SECONDS", "1")

import copy  # noqa: E402
import json  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from kube.fixtures import kube, kube_server, kubectl  # noqa: E402,F401 - fixtures
from kube.fixtures import wait_for  # noqa: E402
from kube.local_runner import job_runner  # noqa: E402,F401 - fixture

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "loratrainingjobs.kubelora.dev.yaml"
LTJ = "kubelora.dev/v1alpha1/loratrainingjobs"
DEMO = yaml.safe_load((REPO / "examples" / "demo-flux.yaml").read_text())


def manifest(name="job", **spec_over):
    m = copy.deepcopy(DEMO)
    m["metadata"] = {"name": name}
    for path, value in spec_over.items():
        cur = m["spec"]
        *parents, last = path.split("__")
        for p in parents:
            cur = cur.setdefault(p, {})
        if value is ...:
            cur.pop(last, None)
        else:
            cur[last] = value
    return m


def apply(kubectl, obj):
    return kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))


@contextmanager
def operator():
    from kopf.testing import KopfRunner
    import kopf
    from kubelora_operator import handlers, kube as k
    k.reset()
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=handlers.registry, settings=settings,
                    timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.exception


def demo_output_bucket(s3):
    """The demo manifest's output bucket, so the status sync reads it without a storage error (the
    S3 server lives for the whole session: another test may have made it)."""
    bucket = DEMO["spec"]["output"]["uri"].split("/")[2]
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


def ltj(kube, name):
    return kube.get(LTJ, "default", name) or {}


def phase(kube, name):
    return (ltj(kube, name).get("status") or {}).get("phase")


@pytest.fixture()
def cluster(kube, kubectl, s3):
    kubectl("apply", "-f", CRD_FILE, check=True)
    return kube


def test_a_status_worked_out_for_a_deleted_job_never_lands_on_its_successor(cluster, kubectl):
    """A sync reads S3 for seconds before it patches: a job deleted and made again under the same
    name meanwhile (Argo CD's Replace, kubectl replace --force) must not get its predecessor's
    status (a Succeeded with another run's artifacts, so its own run is never followed). The patch
    carries the resourceVersion the status was worked out from; a conflict with the same uid (kopf's
    annotation writes) patches again at the current version."""
    from kubelora_operator import kube as k
    k.reset()
    assert apply(kubectl, manifest("same")).returncode == 0
    old = ltj(cluster, "same")["metadata"]
    assert kubectl("delete", "loratrainingjob", "same").returncode == 0
    assert apply(kubectl, manifest("same")).returncode == 0
    new = ltj(cluster, "same")["metadata"]
    assert new["uid"] != old["uid"]
    assert k.patch_status("default", "same", {"phase": "Succeeded"}, uid=old["uid"],
                          resource_version=old["resourceVersion"]) is None
    assert "status" not in ltj(cluster, "same")
    assert kubectl("annotate", "loratrainingjob", "same", "moved=on").returncode == 0  # a newer version, same uid
    got = k.patch_status("default", "same", {"phase": "Pending"}, uid=new["uid"], resource_version=new["resourceVersion"])
    assert got["status"]["phase"] == "Pending" and ltj(cluster, "same")["status"]["phase"] == "Pending"


def test_each_job_gets_its_own_network_policy_when_asked_and_it_goes_with_the_job(cluster, kubectl, monkeypatch):
    """networkPolicy.perJob (KUBELORA_JOB_NETWORK_POLICY): the policy is made with the other children,
    owned by the job, through the real client (the emulator takes networking.k8s.io/v1 like the API
    server; it does not enforce policies: no network here), and goes with the job."""
    monkeypatch.setenv("KUBELORA_JOB_NETWORK_POLICY", "true")
    monkeypatch.setenv("KUBELORA_METRICS_NAMESPACES", "monitoring")
    kube = cluster
    with operator():
        assert apply(kubectl, manifest("fenced")).returncode == 0
        policy = wait_for(lambda: kube.get("networking.k8s.io/v1/networkpolicies", "default", "fenced-peers"), timeout=30)
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "fenced"), timeout=30)
        # a Job the API server refuses (made last): the children already made go, its policy too,
        # and so at the failed job's TTL cleanup
        assert apply(kubectl, manifest("refused", resources__nodeSelector={"pool": "gpu a100"},
                                       runPolicy__ttlSecondsAfterFinished=0)).returncode == 0
        wait_for(lambda: ltj(kube, "refused").get("status", {}).get("childrenDeleted"), timeout=60)
    assert kube.history("networking.k8s.io/v1/networkpolicies", "default", "refused-peers")  # it was made
    assert kube.get("networking.k8s.io/v1/networkpolicies", "default", "refused-peers") is None
    assert kube.get("v1/services", "default", "refused-workers") is None
    cleaned = [e["message"] for e in kube.list("v1/events", "default")
               if e["involvedObject"]["name"] == "refused" and e["reason"] == "CleanedUp"]
    assert cleaned and "Job, Service, ConfigMap and NetworkPolicy" in cleaned[0], cleaned
    uid = ltj(kube, "fenced")["metadata"]["uid"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == uid
    assert policy["spec"]["podSelector"]["matchLabels"] == {"kubelora.dev/job": "fenced", "kubelora.dev/job-uid": uid}
    pods = kube.get("batch/v1/jobs", "default", "fenced")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods.items()
    assert kubectl("delete", "ltj", "fenced", "--timeout=60s", timeout=90).returncode == 0
    assert kube.get("networking.k8s.io/v1/networkpolicies", "default", "fenced-peers") is None


def test_children_created_once_owned_and_survive_operator_restart(cluster, kubectl, s3, monkeypatch):
    kube = cluster
    demo_output_bucket(s3)  # readable: no storage stall
    with operator():
        assert apply(kubectl, manifest("ft")).returncode == 0
        job = wait_for(lambda: kube.get("batch/v1/jobs", "default", "ft"))
        wait_for(lambda: phase(kube, "ft") == "Pending")
    uid = ltj(kube, "ft")["metadata"]["uid"]
    cm, svc = kube.get("v1/configmaps", "default", "ft-spec"), kube.get("v1/services", "default", "ft-workers")
    for obj in (job, cm, svc):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["template"]["spec"]["subdomain"] == "ft-workers"
    # while the operator is stopped the Job's pods come up: the restarted operator must see it
    # (so it has surely run its resume handler and a sync), without duplicating or recreating
    kubectl("patch", "job", "ft", "--subresource=status", "--type=merge",
            "-p", '{"status":{"active":1,"ready":1}}', check=True)
    rv = kube.get("batch/v1/jobs", "default", "ft")["metadata"]["resourceVersion"]
    from kubelora_operator import handlers
    made, create = [], handlers._create_children
    monkeypatch.setattr(handlers, "_create_children", lambda body, *a: made.append(body) or create(body, *a))
    with operator():  # restart: the resume handler is not run for a job made already, and nothing is made again
        wait_for(lambda: phase(kube, "ft") == "Initializing", timeout=30)
    assert made == []   # kopf's resume skips a job that has a phase (500 jobs: 500 handler runs at each start)
    assert [j["metadata"]["name"] for j in kube.list("batch/v1/jobs", "default")] == ["ft"]
    assert kube.get("batch/v1/jobs", "default", "ft")["metadata"]["resourceVersion"] == rv
    st = ltj(kube, "ft")["status"]
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds == {"Ready": "False", "Reconciling": "True", "Stalled": "False", "Suspended": "False"}
    assert st["observedGeneration"] == ltj(kube, "ft")["metadata"]["generation"]
    # kubectl shows it
    out = kubectl("get", "ltj").stdout
    assert "ft" in out and "Initializing" in out and "flux" in out


def test_a_job_that_carries_a_copied_kopf_annotation_is_made_all_the_same(cluster, kubectl, s3, monkeypatch, caplog):
    """A manifest copied from a live job (`kubectl get -o yaml` edited and applied, exported into
    git, a restore without status) carries kopf's kubelora.dev/last-handled-configuration: kopf
    takes the new job for one already handled and never calls create_children. The sync makes it
    once it has had no status for CREATE_TAKEOVER_SECONDS (was: no children and no status, until
    the operator restarted)."""
    from kubelora_operator import handlers
    kube = cluster
    demo_output_bucket(s3)
    monkeypatch.setattr(handlers, "CREATE_TAKEOVER_SECONDS", 3.0)
    key = "kubelora.dev/last-handled-configuration"
    with operator():
        assert apply(kubectl, manifest("orig")).returncode == 0
        wait_for(lambda: phase(kube, "orig") == "Pending", timeout=30)
        copied = wait_for(lambda: (ltj(kube, "orig")["metadata"].get("annotations") or {}).get(key), timeout=30)
        clone = manifest("clone")
        clone["metadata"]["annotations"] = {key: copied}
        assert apply(kubectl, clone).returncode == 0
        made = wait_for(lambda: kube.get("batch/v1/jobs", "default", "clone"), timeout=60)
        wait_for(lambda: phase(kube, "clone") == "Pending", timeout=30)
    assert made["metadata"]["ownerReferences"][0]["uid"] == ltj(kube, "clone")["metadata"]["uid"]
    assert kube.get("v1/services", "default", "clone-workers") and kube.get("v1/configmaps", "default", "clone-spec")
    assert [j["metadata"]["name"] for j in kube.list("batch/v1/jobs", "default")].count("clone") == 1
    assert "default/clone has no status" in caplog.text and "default/orig has no status" not in caplog.text


def test_a_service_or_configmap_deleted_while_the_job_runs_is_made_again(cluster, kubectl, s3):
    """`kubectl delete svc x-workers` (or a cleanup script) during a run: the pods the Job
    controller makes next (a replacement after a preemption) could not find their peers, and a
    deleted ConfigMap leaves them in ContainerCreating. The sync makes both again while pods are
    being made or replaced (was: only when the Job itself was gone)."""
    kube = cluster
    demo_output_bucket(s3)
    with operator():
        assert apply(kubectl, manifest("sup")).returncode == 0
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "sup"), timeout=30)
        wait_for(lambda: phase(kube, "sup") == "Pending", timeout=30)
        uid = ltj(kube, "sup")["metadata"]["uid"]
        kubectl("delete", "service", "sup-workers", check=True)
        kubectl("delete", "configmap", "sup-spec", check=True)
        # a pod being replaced: one active, none ready (the Job controller's count; no kubelet here)
        kubectl("patch", "job", "sup", "--subresource=status", "--type=merge", "-p", '{"status":{"active":1,"ready":0}}',
                check=True)
        svc = wait_for(lambda: kube.get("v1/services", "default", "sup-workers"), timeout=30)
        cm = wait_for(lambda: kube.get("v1/configmaps", "default", "sup-spec"), timeout=30)
        events = wait_for(lambda: [e for e in kube.list("v1/events", "default")
                                   if e.get("reason") == "ChildRecreated" and e["involvedObject"]["name"] == "sup"],
                          timeout=30)
    assert svc["metadata"]["ownerReferences"][0]["uid"] == uid == cm["metadata"]["ownerReferences"][0]["uid"]
    assert svc["spec"]["clusterIP"] == "None"
    assert {e["type"] for e in events} == {"Warning"} and any("Service/sup-workers" in e["message"] for e in events)
    assert [j["metadata"]["name"] for j in kube.list("batch/v1/jobs", "default")].count("sup") == 1


def test_spec_is_immutable_but_suspend_flows_to_the_job(cluster, kubectl):
    kube = cluster
    with operator():
        apply(kubectl, manifest("imm"))
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "imm"))
        p = apply(kubectl, manifest("imm", adapter__rank=32))
        assert p.returncode != 0 and "immutable after creation except spec.runPolicy.suspend" in p.stderr
        for field, value in (("backoffLimit", 9), ("terminationGracePeriodSeconds", 5)):
            p = apply(kubectl, manifest("imm", **{f"runPolicy__{field}": value}))
            assert p.returncode != 0 and "only spec.runPolicy.suspend may change" in p.stderr, field
        assert apply(kubectl, manifest("imm", runPolicy__suspend=True)).returncode == 0
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "imm")["spec"]["suspend"] is True)
        wait_for(lambda: phase(kube, "imm") == "Suspended")
        # the Job resumed by hand while the job asks for it suspended: suspended again, not reported
        # Suspended while it runs
        kubectl("patch", "job", "imm", "--type=merge", "-p", '{"spec":{"suspend":false}}', check=True)
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "imm")["spec"]["suspend"] is True)
        assert apply(kubectl, manifest("imm", runPolicy__suspend=False)).returncode == 0
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "imm")["spec"]["suspend"] is False)


# Each row: a bad manifest, and where it is stopped: "apply" (schema/CEL, kubectl fails with the
# message) or "Failed" (the operator sets phase Failed with the reason and message).
INVALID = [
    ("unknown-model", {"model__type": "sd3"}, "apply", 'spec.model.type: Unsupported value: "sd3"'),
    ("zero-nodes", {"resources__nodes": 0}, "apply", "spec.resources.nodes"),
    ("no-dataset-uri", {"dataset__uri": ...}, "apply", "set exactly one of dataset.uri (one folder) and dataset.sources"),
    ("rank-zero", {"adapter__rank": 0}, "apply", "spec.adapter.rank"),
    ("negative-lr", {"training__learningRate": -1e-4}, "apply", "spec.training.learningRate"),
    ("bad-scheme", {"dataset__uri": "gs://bucket/data"}, "apply", "spec.dataset.uri"),
    ("too-many-gpus", {"resources__gpusPerNode": 64}, "apply", "spec.resources.gpusPerNode"),
    ("cosmos-size", {"model": {"type": "cosmos", "transformerPath": "s3://models/c/t.pt", "vaePath": "s3://models/c/v.pt",
                               "textEncoderPath": "s3://models/c/t5/"}, "dataset__resolution": 512},
     "apply", "cosmos supports only the sizes 960x960"),
    ("ltx-frames", {"model": {"type": "ltx-video", "diffusersPath": "s3://models/ltx"}, "dataset__frames": 24},
     "apply", "ltx-video needs dataset.frames = 8k+1"),
    ("bad-resolution", {"dataset__resolution": 500}, "apply", "spec.dataset.resolution"),
    ("warmup-gt-steps", {"training__warmupSteps": 1000}, "Failed", "training.warmupSteps (1000) exceeds training.steps (60)"),
    ("missing-hy-parts", {"model": {"type": "hunyuan-video", "transformerPath": "s3://models/hy/t.safetensors"}},
     "Failed", "needs model.ckptPath or model.transformerPath+model.vaePath+model.llmPath+model.clipPath"),
    ("option-other-family", {"model__vPred": True}, "Failed", "model.vPred does not apply to model.type flux"),
    ("bad-format", {"output__formats": ["original"]}, "Failed", "output.formats: 'original' is not available for flux"),
    ("local-output", {"output__uri": "/tmp/out"}, "Failed",
     "output.uri: '/tmp/out' is a path inside the trainer pod, where the LoRA would be lost with the pod"),
    # 2 nodes' pods cannot all mount a ReadWriteOnce claim (Multi-Attach): said at once, nothing made
    ("rwo-cache", {"resources__nodes": 2, "resources__cacheVolumeClaim": "rwo-claim"}, "Failed",
     "resources.cacheVolumeClaim: claim 'rwo-claim' is ReadWriteOnce, so the 2 nodes' pods cannot all mount it"),
    ("9lives", {}, "apply", "metadata.name must start with a letter"),
    ("dotted.name", {}, "apply", "metadata.name must start with a letter and hold only lowercase letters"),
    ("n" * 56, {}, "apply", "metadata.name must be at most 55 characters"),
    # a quantity that is none: refused at apply (the CRD's pattern), not when the Job is made
    ("bad-quantity", {"resources__limits": {"cpu": "64 cores"}}, "apply", "spec.resources.limits.cpu"),
    # the API server refuses the Job (a nodeSelector value that is no label value, which the spec does not
    # check): Failed with its message, nothing left behind
    ("bad-selector", {"resources__nodeSelector": {"pool": "gpu a100"}}, "Failed",
     "the API server refused Job 'bad-selector' (422): Job.batch \"bad-selector\" is invalid: "
     "spec.template.spec.nodeSelector: Invalid value: \"gpu a100\": a valid label must be"),
]


def test_invalid_manifests_are_refused_or_failed_and_the_operator_stays_healthy(cluster, kubectl):
    kube = cluster
    apply(kubectl, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "rwo-claim"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    with operator():
        for name, over, where, message in INVALID:
            p = apply(kubectl, manifest(name, **over))
            if where == "apply":
                assert p.returncode != 0 and message in p.stderr, (name, p.stderr)
                assert kube.get(LTJ, "default", name) is None
            else:
                assert p.returncode == 0, (name, p.stderr)
        for name, over, where, message in INVALID:
            if where != "Failed":
                continue
            st = wait_for(lambda: phase(kube, name) == "Failed" and ltj(kube, name)["status"], timeout=20)
            assert message in st["message"], (name, st["message"])
            assert {c["type"]: c["status"] for c in st["conditions"]}["Stalled"] == "True"
            assert kube.get("batch/v1/jobs", "default", name) is None, f"{name}: no children for an invalid job"
            assert kube.get("v1/configmaps", "default", f"{name}-spec") is None, f"{name}: ConfigMap left behind"
            assert kube.get("v1/services", "default", f"{name}-workers") is None, f"{name}: Service left behind"
        # still healthy: a valid job gets its children
        apply(kubectl, manifest("valid-after"))
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "valid-after"))
    events = [e for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "warmup-gt-steps"]
    assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in events)


def test_a_name_held_by_someone_else_is_never_adopted(cluster, kubectl):
    """A user's own ConfigMap named <job>-spec: the job fails with NameConflict, the ConfigMap is
    untouched and nothing else is created, also when the failed job's TTL cleanup runs (it deletes
    only what the job owns)."""
    kube = cluster
    apply(kubectl, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken-spec"}, "data": {"mine": "yes"}})
    with operator():
        assert apply(kubectl, manifest("taken", runPolicy__ttlSecondsAfterFinished=0)).returncode == 0
        st = wait_for(lambda: phase(kube, "taken") == "Failed" and ltj(kube, "taken")["status"], timeout=30)
        wait_for(lambda: ltj(kube, "taken")["status"].get("childrenDeleted"), timeout=60)
    assert st["reason"] == "NameConflict" and "ConfigMap 'taken-spec' already exists" in st["message"], st
    assert kube.get("v1/configmaps", "default", "taken-spec")["data"] == {"mine": "yes"}
    assert kube.get("batch/v1/jobs", "default", "taken") is None


def _scrape(port: int) -> dict:
    """{(name, sorted labels): value} from a /metrics endpoint."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.read().decode()) for s in fam.samples}


def test_a_job_deleted_by_hand_is_made_again_and_counted(cluster, kubectl):
    """... and the operator's /metrics shows it (children created, a restart, the job's phase)."""
    from kubelora_operator import metrics
    from prometheus_server import free_port
    kube = cluster
    server = metrics.serve(free_port(), "127.0.0.1")
    try:
        before = _scrape(server.port)
        with operator():
            assert apply(kubectl, manifest("gone")).returncode == 0
            first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "gone"))
            wait_for(lambda: phase(kube, "gone") == "Pending")
            kubectl("delete", "job", "gone", check=True)
            again = wait_for(lambda: kube.get("batch/v1/jobs", "default", "gone"), timeout=30)
            wait_for(lambda: (ltj(kube, "gone").get("status") or {}).get("restarts") == 1, timeout=30)
            after = _scrape(server.port)
    finally:
        server.stop()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert delta("kubelora_operator_children_created_total", kind="Job") == 2
    assert delta("kubelora_operator_children_created_total", kind="ConfigMap") == 1
    assert delta("kubelora_operator_gang_restarts_total", reason="job_missing") == 1
    assert delta("kubelora_operator_reconcile_duration_seconds_count", handler="create") >= 1
    assert delta("kubelora_operator_reconcile_duration_seconds_count", handler="sync") >= 1
    assert after[("kubelora_operator_job_phase", (("ltj", "gone"), ("namespace", "default"), ("phase", "Pending")))] == 1
    assert after[("kubelora_operator_jobs", (("phase", "Pending"),))] >= 1
    assert again["metadata"]["uid"] != first["metadata"]["uid"]
    assert again["metadata"]["ownerReferences"][0]["uid"] == ltj(kube, "gone")["metadata"]["uid"]
    reasons = [e["reason"] for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "gone"]
    assert "Recreated" in reasons, reasons


def _pod_of(kubectl, job: dict, index: int, status: dict, finalizers=(), node=None) -> None:
    """A pod of the trainer Job, made by hand with the status a kubelet and the cluster's
    controllers would give it (the emulator runs no kubelet here); `node`: its spec.nodeName."""
    name = f"{job['metadata']['name']}-{index}-{job['metadata']['uid'][:5]}"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, **({"finalizers": list(finalizers)} if finalizers else {}),
                        "labels": {"batch.kubernetes.io/job-name": job["metadata"]["name"],
                                                 "batch.kubernetes.io/job-completion-index": str(index)},
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                             "uid": job["metadata"]["uid"], "controller": True}]},
           "spec": {**({"nodeName": node} if node else {}),
                    "containers": [{"name": "trainer", "image": "kubelora/trainer"}]}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(pod), check=True)
    kubectl("patch", "pod", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}),
            check=True)


def test_a_gang_restart_waits_for_the_old_pods_to_stop(cluster, kubectl):
    """Node 0 crashed; node 1's pod is still terminating (writing its checkpoint; held here by a
    finalizer, as the emulator has no kubelet) when the gang restart deletes the Job: the new Job
    is made only once that pod is gone, so the new gang never meets the old one's rendezvous."""
    kube = cluster
    crashed = {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "image": "kubelora/trainer", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}
    with operator():
        assert apply(kubectl, manifest("slow", resources__nodes=2)).returncode == 0
        first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "slow"), timeout=30)
        wait_for(lambda: phase(kube, "slow") == "Pending", timeout=30)
        _pod_of(kubectl, first, 1, {"phase": "Running"}, finalizers=["kubelora.test/hold"])
        _pod_of(kubectl, first, 0, crashed)
        kubectl("patch", "job", "slow", "--subresource=status", "--type=merge",
                "-p", '{"status":{"active":1,"failed":1}}', check=True)
        st = wait_for(lambda: (ltj(kube, "slow").get("status") or {}).get("reason") == "WaitingForOldPods"
                      and ltj(kube, "slow")["status"], timeout=60)
        assert st["restartPending"] and kube.get("batch/v1/jobs", "default", "slow") is None, st
        held = f"slow-1-{first['metadata']['uid'][:5]}"
        assert kube.get("v1/pods", "default", held)["metadata"].get("deletionTimestamp")
        kubectl("patch", "pod", held, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=True)
        again = wait_for(lambda: kube.get("batch/v1/jobs", "default", "slow"), timeout=60)
    assert again["metadata"]["uid"] != first["metadata"]["uid"]


def test_a_job_made_again_under_the_same_name_waits_for_its_predecessors_pods(cluster, kubectl):
    """kubectl delete, then apply the same name (Argo CD's Replace=true): the deleted job's pod is
    still terminating (writing its checkpoint; held here by a finalizer) under the same DNS name.
    The new job waits (WaitingForOldPods) and makes its trainer Job once that pod is gone, not
    counted as a restart; its Service selects only its own pods (its uid)."""
    kube = cluster
    with operator():
        assert apply(kubectl, manifest("again")).returncode == 0
        first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "again"), timeout=30)
        wait_for(lambda: phase(kube, "again") == "Pending", timeout=30)
        _pod_of(kubectl, first, 0, {"phase": "Running"}, finalizers=["kubelora.test/hold"])
        old = f"again-0-{first['metadata']['uid'][:5]}"
        kubectl("delete", "loratrainingjob", "again", "--wait=false", check=True)
        wait_for(lambda: (kube.get("v1/pods", "default", old) or {}).get("metadata", {}).get("deletionTimestamp")
                 and kube.get("batch/v1/jobs", "default", "again") is None
                 and kube.get("v1/services", "default", "again-workers") is None, timeout=30)
        assert apply(kubectl, manifest("again")).returncode == 0
        st = wait_for(lambda: (ltj(kube, "again").get("status") or {}).get("reason") == "WaitingForOldPods"
                      and ltj(kube, "again")["status"], timeout=30)
        assert st["phase"] == "Pending" and st["createPending"] and kube.get("batch/v1/jobs", "default", "again") is None and st["trainerImage"]
        kubectl("patch", "pod", old, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=True)
        job = wait_for(lambda: kube.get("batch/v1/jobs", "default", "again"), timeout=30)
        st = wait_for(lambda: not ltj(kube, "again")["status"].get("createPending") and ltj(kube, "again")["status"],
                      timeout=30)
    uid = ltj(kube, "again")["metadata"]["uid"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid != first["metadata"]["ownerReferences"][0]["uid"]
    assert not st.get("restarts"), st
    assert kube.get("v1/services", "default", "again-workers")["spec"]["selector"]["kubelora.dev/job-uid"] == uid


def test_a_gang_restart_after_a_lost_node_is_not_counted_against_the_backoff_limit(cluster, kubectl):
    """A node is lost under a 2-node run: the cluster marks its pod DisruptionTarget (the taint
    manager, after the node's unreachable taint), which the Job's podFailurePolicy ignores, but the
    peer fails in its collective (exit 1), which the Job counts. With runPolicy.backoffLimit 0 the
    gang still restarts, not counted; the same failure without a disruption fails the run."""
    kube = cluster
    crashed = {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "image": "kubelora/trainer", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}
    lost = {"phase": "Running", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
         "message": "Taint manager: deleting due to NoExecute taint"}]}
    with operator():
        assert apply(kubectl, manifest("lost", resources__nodes=2, runPolicy__backoffLimit=0)).returncode == 0
        first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "lost"), timeout=30)
        wait_for(lambda: phase(kube, "lost") == "Pending", timeout=30)
        _pod_of(kubectl, first, 1, lost)
        _pod_of(kubectl, first, 0, crashed)
        kubectl("patch", "job", "lost", "--subresource=status", "--type=merge",
                "-p", '{"status":{"active":1,"failed":1}}', check=True)
        again = wait_for(lambda: (kube.get("batch/v1/jobs", "default", "lost") or {}).get("metadata", {}).get("uid")
                         not in (None, first["metadata"]["uid"]) and kube.get("batch/v1/jobs", "default", "lost"),
                         timeout=60)
        st = wait_for(lambda: not ltj(kube, "lost")["status"].get("restartPending") and ltj(kube, "lost")["status"],
                      timeout=30)
        assert st["restarts"] == 1 and st["disruptionRestarts"] == 1 and st["phase"] == "Pending", st
        # the ranks meet at lost-0.lost-workers: the Service selects the new Job's pods only, not the
        # lost node's (Terminating for ever there, and published: publishNotReadyAddresses)
        selector = kube.get("v1/services", "default", "lost-workers")["spec"]["selector"]
        assert selector["batch.kubernetes.io/controller-uid"] == again["metadata"]["uid"], selector
        assert selector["kubelora.dev/job-uid"] == ltj(kube, "lost")["metadata"]["uid"]
        assert again["spec"]["template"]["metadata"]["labels"].items() >= {
            k: v for k, v in selector.items() if k != "batch.kubernetes.io/controller-uid"}.items()
        _pod_of(kubectl, again, 0, crashed)
        kubectl("patch", "job", "lost", "--subresource=status", "--type=merge",
                "-p", '{"status":{"active":1,"failed":1}}', check=True)
        st = wait_for(lambda: phase(kube, "lost") == "Failed" and ltj(kube, "lost")["status"], timeout=60)
    assert st["reason"] == "BackoffLimitExceeded" and "after 0 gang restart(s)" in st["message"], st
    assert "exited with code 1" in st["message"], st
    # the failed run's Job stays, suspended (its peers stopped), with the crashed pod and its logs
    job = kube.get("batch/v1/jobs", "default", "lost")
    assert job["metadata"]["uid"] == again["metadata"]["uid"] and job["spec"]["suspend"] is True, job
    assert kube.get("v1/pods", "default", f"lost-0-{again['metadata']['uid'][:5]}") is not None
    events = [e for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "lost"]
    restart = next(e["message"] for e in events if e["reason"] == "GangRestart")
    assert "not counted against runPolicy.backoffLimit" in restart and "DeletionByTaintManager" in restart, restart
    assert "exited with code 1" in restart, restart


def _node(kubectl, name: str, ready: str, reason: str) -> None:
    """A Node with the Ready condition the kubelet, or the node lifecycle controller once the
    kubelet stops posting (Unknown, about 40 s), gives it."""
    kubectl("apply", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
            check=True)
    kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"conditions": [{"type": "Ready", "status": ready, "reason": reason}]}}), check=True)


def test_a_gang_failure_while_a_pods_node_is_not_ready_is_not_counted(cluster, kubectl):
    """A node is lost under a 2-node run and its peer fails in a collective (exit 1) before the
    taint manager marks the lost pod DisruptionTarget (300 s): the lost pod's Node is Ready=Unknown
    already, so the gang restart is not counted (the operator's count, checked at
    runPolicy.backoffLimit 0 where a counted restart would fail the run; on a real cluster the
    Job's own backoffLimit would then be 0 too and the Job controller would fail the Job at the
    peer's exit: decisions.md 21) and the Event and status name the pod and its node."""
    kube = cluster
    crashed = {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "image": "kubelora/trainer", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}
    _node(kubectl, "gpu-a", "True", "KubeletReady")
    _node(kubectl, "gpu-b", "Unknown", "NodeStatusUnknown")
    with operator():
        assert apply(kubectl, manifest("unready", resources__nodes=2, runPolicy__backoffLimit=0)).returncode == 0
        first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "unready"), timeout=30)
        wait_for(lambda: phase(kube, "unready") == "Pending", timeout=30)
        _pod_of(kubectl, first, 1, {"phase": "Running"}, node="gpu-b")
        _pod_of(kubectl, first, 0, crashed, node="gpu-a")
        kubectl("patch", "job", "unready", "--subresource=status", "--type=merge",
                "-p", '{"status":{"active":1,"failed":1}}', check=True)
        wait_for(lambda: (kube.get("batch/v1/jobs", "default", "unready") or {}).get("metadata", {}).get("uid")
                 not in (None, first["metadata"]["uid"]), timeout=60)
        st = wait_for(lambda: not ltj(kube, "unready")["status"].get("restartPending") and ltj(kube, "unready")["status"],
                      timeout=30)
    assert st["restarts"] == 1 and st["disruptionRestarts"] == 1 and st["phase"] == "Pending", st
    lost = f"pod unready-1-{first['metadata']['uid'][:5]} on node gpu-b: node Ready=Unknown (NodeStatusUnknown)"
    assert st["lastDisruption"] == lost, st
    events = [e for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "unready"]
    restart = next(e["message"] for e in events if e["reason"] == "GangRestart")
    assert lost in restart and "not counted against runPolicy.backoffLimit" in restart, restart


def test_a_gang_failure_before_its_lost_node_reads_not_ready_is_decided_when_it_does(cluster, kubectl, monkeypatch):
    """A node is lost and its peer fails at once (a NCCL transport error), while the lost node's
    Node still reads Ready (the node lifecycle controller marks it Unknown 40-50 s later): the
    failure is not charged yet (GangFailureDeciding, status.gangFailure), the Job is left alone,
    the Job controller failing it for its own backoffLimit meanwhile does not fail the run, an
    operator restart goes on with the same decision, and once the Node reads Unknown the gang
    restarts uncounted. A second crash, on Ready nodes, is counted once the grace has passed."""
    from datetime import datetime, timezone
    from kubelora_operator import handlers
    kube = cluster
    crashed = {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "image": "kubelora/trainer", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}

    def crash(job):  # after its peer was made: a pod made after the failure cannot explain it
        ended = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        crashed["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = ended
        _pod_of(kubectl, job, 0, crashed, node="gpu-a")
        return ended
    _node(kubectl, "gpu-a", "True", "KubeletReady")
    _node(kubectl, "gpu-c", "True", "KubeletReady")

    def status():
        return ltj(kube, "nccl").get("status") or {}
    with operator():
        assert apply(kubectl, manifest("nccl", resources__nodes=2, runPolicy__backoffLimit=1)).returncode == 0
        first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "nccl"), timeout=30)
        wait_for(lambda: phase(kube, "nccl") == "Pending", timeout=30)
        _pod_of(kubectl, first, 1, {"phase": "Running"}, node="gpu-c")
        ended = crash(first)
        kubectl("patch", "job", "nccl", "--subresource=status", "--type=merge",
                "-p", '{"status":{"active":1,"failed":1}}', check=True)
        st = wait_for(lambda: status().get("reason") == "GangFailureDeciding" and status(), timeout=30)
        held = st["gangFailure"]
        assert held["job"] == first["metadata"]["uid"] and held["since"] <= ended, st
        assert "nccl-1-" in st["message"] and "not counted against runPolicy.backoffLimit" in st["message"], st
        # the Job controller fails the Job for its own backoffLimit meanwhile
        kubectl("patch", "job", "nccl", "--subresource=status", "--type=merge", "-p", json.dumps({"status": {
            "active": 0, "failed": 3, "conditions": [{"type": "Failed", "status": "True",
                                                       "reason": "BackoffLimitExceeded"}]}}), check=True)
    with operator():  # restarted: the decision goes on from the status
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "nccl")["status"].get("failed") == 3, timeout=30)
        assert status()["gangFailure"] == held and status()["phase"] == "Pending", status()
        assert kube.get("batch/v1/jobs", "default", "nccl")["metadata"]["uid"] == first["metadata"]["uid"]
        _node(kubectl, "gpu-c", "Unknown", "NodeStatusUnknown")
        again = wait_for(lambda: (kube.get("batch/v1/jobs", "default", "nccl") or first)["metadata"]["uid"]
                         != first["metadata"]["uid"] and kube.get("batch/v1/jobs", "default", "nccl"), timeout=30)
        st = wait_for(lambda: not status().get("restartPending") and status(), timeout=30)
        assert st["restarts"] == 1 and st["disruptionRestarts"] == 1 and "gangFailure" not in st, st
        assert st["lastDisruption"].endswith("on node gpu-c: node Ready=Unknown (NodeStatusUnknown)"), st
        # a crash of the new gang on Ready nodes: counted once the grace has passed
        monkeypatch.setattr(handlers, "GANG_FAILURE_GRACE_SECONDS", 10.0)  # its first sync comes well within it, even on a busy machine
        _pod_of(kubectl, again, 1, {"phase": "Running"}, node="gpu-a")
        crash(again)
        kubectl("patch", "job", "nccl", "--subresource=status", "--type=merge",
                "-p", '{"status":{"active":1,"failed":1}}', check=True)
        st = wait_for(lambda: status().get("restarts") == 2 and status(), timeout=30)
    assert st["disruptionRestarts"] == 1 and "gangFailure" not in st, st
    events = [e for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "nccl"]
    deciding = [e["message"] for e in events if e["reason"] == "GangFailureDeciding"]
    assert len(deciding) == 2 and "nccl-1-" in deciding[0] and "on node gpu-c" in deciding[0], deciding
    restarts = [e["message"] for e in events if e["reason"] == "GangRestart"]
    assert "not counted against runPolicy.backoffLimit" in restarts[0], restarts
    assert "none read lost" in restarts[1] and "(restart 1 of 1)" in restarts[1], restarts


def test_pods_refused_by_a_quota_are_reported_not_waited_for(cluster, kubectl, monkeypatch):
    """No pod of the Job is made (a ResourceQuota on nvidia.com/gpu refuses them): the Job
    controller says so only in FailedCreate Events on the Job, which the status then shows
    instead of 'waiting for the trainer pods to be scheduled': a quota full for now is a wait
    (QuotaExceeded, not Stalled). The Event is posted by the test, as the Job controller would
    (none runs here)."""
    from kubelora_operator import handlers
    kube = cluster
    monkeypatch.setattr(handlers, "POD_CREATE_GRACE_SECONDS", 0.0)
    refusal = ('pods "quota-0-x" is forbidden: exceeded quota: gpu-quota, requested: nvidia.com/gpu=1, '
               'used: nvidia.com/gpu=8, limited: nvidia.com/gpu=8')
    with operator():
        assert apply(kubectl, manifest("quota")).returncode == 0
        job = wait_for(lambda: kube.get("batch/v1/jobs", "default", "quota"), timeout=30)
        wait_for(lambda: (ltj(kube, "quota").get("status") or {}).get("reason") == "WaitingForPods", timeout=30)
        for uid, name in ((job["metadata"]["uid"], "quota.1"), ("another-jobs-uid", "other.1")):
            apply(kubectl, {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name},
                            "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": "quota",
                                               "namespace": "default", "uid": uid},
                            "reason": "FailedCreate", "type": "Warning", "message": refusal if uid != "another-jobs-uid"
                            else "a predecessor's refusal", "source": {"component": "job-controller"}})
        st = wait_for(lambda: (ltj(kube, "quota").get("status") or {}).get("reason") == "QuotaExceeded"
                      and ltj(kube, "quota")["status"], timeout=30)
    assert st["phase"] == "Pending" and refusal in st["message"] and "predecessor" not in st["message"], st
    assert {c["type"]: c["status"] for c in st["conditions"]}["Stalled"] == "False"


def test_with_job_credentials_only_a_job_without_its_own_is_refused(cluster, kubectl, monkeypatch):
    """operator.s3.jobCredentialsOnly: the operator never reads a bucket with its own keys for a job."""
    from kubelora_operator import handlers
    kube = cluster
    monkeypatch.setattr(handlers, "JOB_CREDENTIALS_ONLY", True)
    with operator():
        assert apply(kubectl, manifest("borrow")).returncode == 0
        st = wait_for(lambda: phase(kube, "borrow") == "Failed" and ltj(kube, "borrow")["status"], timeout=30)
    assert st["reason"] == "InvalidSpec" and "spec.storage.credentialsSecret is required" in st["message"], st
    assert kube.get("batch/v1/jobs", "default", "borrow") is None


def test_children_refused_by_an_object_count_quota_wait_for_room(cluster, kubectl):
    """A namespace's ResourceQuota allows no more Services (the emulator enforces object counts
    with the real admission's 403 'exceeded quota'): the job waits as Pending/CreateDeferred, not
    Failed, and gets its children once the quota has room; no restart is counted."""
    kube = cluster
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "svc", "namespace": "default"},
             "spec": {"hard": {"count/services": "0"}}}
    with operator():
        assert apply(kubectl, quota).returncode == 0
        assert apply(kubectl, manifest("deferred")).returncode == 0
        st = wait_for(lambda: (ltj(kube, "deferred").get("status") or {}).get("reason") == "CreateDeferred"
                      and ltj(kube, "deferred")["status"], timeout=30)
        assert st["phase"] == "Pending" and "exceeded quota: svc" in st["message"] and st.get("createPending"), st
        assert kube.get("batch/v1/jobs", "default", "deferred") is None
        assert kubectl("delete", "resourcequota", "svc").returncode == 0
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "deferred"), timeout=60)
        st = wait_for(lambda: "createPending" not in (ltj(kube, "deferred").get("status") or {"createPending": 1})
                      and ltj(kube, "deferred")["status"], timeout=30)
    assert not st.get("restarts") and st["phase"] == "Pending", st
    assert st["trainerImage"] == kube.get("batch/v1/jobs", "default", "deferred")["spec"]["template"]["spec"]["containers"][0]["image"]
    reasons = [e["reason"] for e in kube.list("v1/events", "default")
               if e["involvedObject"].get("name") == "deferred"]
    assert "CreateDeferred" in reasons and "Created" in reasons and "Recreated" not in reasons, reasons


def test_the_job_is_read_with_its_own_credentials(cluster, kubectl, s3, monkeypatch):
    """The operator's own keys are wrong here; the job's Secret holds keys the S3 server (SeaweedFS,
    which checks signatures) accepts: the finished job's manifest is read with those. With a wrong
    Secret the job is Stalled with the storage error instead of Exporting forever."""
    import base64
    import json
    from kubelora_trainer.local_s3 import SECRET_FILE_KEYS
    kube = cluster
    s3.create_bucket(Bucket="creds-out")
    manifest_json = {"artifacts": [{"uri": "s3://creds-out/run/lora.safetensors", "format": "diffusers",
                                    "sha256": "ab", "size": 3}], "metrics": {"finalLoss": 0.5}}
    s3.put_object(Bucket="creds-out", Key="run/manifest.json", Body=json.dumps(manifest_json).encode())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "operator-key-nobody-knows")
    b64 = lambda v: base64.b64encode(v.encode()).decode()  # noqa: E731
    for name, (key, secret) in (("good-creds", SECRET_FILE_KEYS), ("bad-creds", ("from-secret", "wrong"))):
        apply(kubectl, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                        "data": {"AWS_ACCESS_KEY_ID": b64(key), "AWS_SECRET_ACCESS_KEY": b64(secret)}})
    done = '{"status":{"succeeded":1,"conditions":[{"type":"Complete","status":"True"}]}}'
    with operator():
        for job, secret in (("creds", "good-creds"), ("nocreds", "bad-creds")):
            m = manifest(job, storage__credentialsSecret=secret, output__uri="s3://creds-out/run")
            assert apply(kubectl, m).returncode == 0
            wait_for(lambda: kube.get("batch/v1/jobs", "default", job))
            kubectl("patch", "job", job, "--subresource=status", "--type=merge", "-p", done, check=True)
        st = wait_for(lambda: phase(kube, "creds") == "Succeeded" and ltj(kube, "creds")["status"], timeout=30)
        assert st["artifacts"][0]["uri"] == "s3://creds-out/run/lora.safetensors"
        bad = wait_for(lambda: (ltj(kube, "nocreds").get("status") or {}).get("reason") == "StorageUnreadable"
                       and ltj(kube, "nocreds")["status"], timeout=30)
        # every sync reads the Job (the stalled job is still synced at each tick), but the Secret
        # only once per KUBELORA_SECRET_CACHE_SECONDS (60)
        job_reads = lambda: kube.call(lambda em: sum(1 for r in em._requests  # noqa: E731
                                                     if str(r.method).upper().endswith("GET")
                                                     and r.url.path.endswith("/jobs/nocreds")))
        wait_for(lambda: job_reads() >= 6, timeout=30)
    assert _secret_reads(kube, "bad-creds") <= 2, (job_reads(), _secret_reads(kube, "bad-creds"))
    assert "access denied" in bad["message"] and "spec.storage.credentialsSecret" in bad["message"], bad
    assert {c["type"]: c["status"] for c in bad["conditions"]}["Stalled"] == "True"
    # the secret values are nowhere but in the Secrets: not in the spec, ConfigMaps, Jobs, events or status
    exposed = [kube.list(res, "default") for res in ("v1/configmaps", "v1/events", "batch/v1/jobs",
                                                      "kubelora.dev/v1alpha1/loratrainingjobs")]
    text = json.dumps(exposed)
    assert SECRET_FILE_KEYS[1] not in text and b64(SECRET_FILE_KEYS[1]) not in text


KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"  # what earlier operators (a kopf timer) put on every job


def _secret_reads(kube, name):
    """GETs of the Secret `name` the emulated API server answered so far (its request log)."""
    return kube.call(lambda em: sum(1 for r in em._requests
                                    if str(r.method).upper().endswith("GET") and r.url.path.endswith(f"/secrets/{name}")))


def test_deleting_a_job_namespace_or_crd_needs_no_operator(cluster, kubectl):
    """Nothing the operator makes carries a finalizer: with the operator stopped, `kubectl delete`
    of a job and of a namespace complete, and the children go with their owner (the emulator's
    garbage collection is synchronous; a real cluster's is not, the result is the same)."""
    kube = cluster
    apply(kubectl, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
    in_team = manifest("t1")
    in_team["metadata"]["namespace"] = "team"
    with operator():
        for m in (manifest("doomed"), in_team, manifest("kept")):
            assert apply(kubectl, m).returncode == 0
        for ns, name in (("default", "doomed"), ("team", "t1"), ("default", "kept")):
            wait_for(lambda: kube.get("batch/v1/jobs", ns, name), timeout=30)
            wait_for(lambda: (kube.get(LTJ, ns, name).get("status") or {}).get("phase") == "Pending", timeout=30)
    for obj in (ltj(kube, "doomed"), kube.get("batch/v1/jobs", "default", "doomed"),
                kube.get("v1/configmaps", "default", "doomed-spec"), kube.get("v1/services", "default", "doomed-workers")):
        assert not obj["metadata"].get("finalizers"), obj["metadata"]
    # the operator is stopped: deletion still completes (kubectl waits for the object to be gone)
    p = kubectl("delete", "ltj", "doomed", "--timeout=60s", timeout=90)
    assert p.returncode == 0, p.stderr
    assert kube.get(LTJ, "default", "doomed") is None
    assert kube.get("batch/v1/jobs", "default", "doomed") is None
    assert kube.get("v1/configmaps", "default", "doomed-spec") is None
    assert kube.get("v1/services", "default", "doomed-workers") is None
    p = kubectl("delete", "namespace", "team", "--timeout=60s", timeout=90)
    assert p.returncode == 0, p.stderr
    assert kube.get("v1/namespaces", None, "team") is None and kube.get(LTJ, "team", "t1") is None
    assert kube.get("batch/v1/jobs", "team", "t1") is None
    # uninstall order (README): jobs, operator, CRD. The emulator drops a CRD's objects without
    # waiting for their finalizers, so only the job above shows that none is waited for.
    assert kubectl("delete", "ltj", "--all", "--timeout=60s", timeout=90).returncode == 0
    p = kubectl("delete", "-f", CRD_FILE, "--timeout=60s", timeout=90)
    assert p.returncode == 0, p.stderr
    assert kube.list("batch/v1/jobs", "default") == []


def test_a_job_deleted_while_the_operator_runs_is_not_made_again(cluster, kubectl, s3):
    """Deleting a job (background or foreground cascade) deletes its Job: the Job's DELETED event
    must not make the sync create it again for the job that is going."""
    kube = cluster
    demo_output_bucket(s3)
    with operator():
        for name in ("bg", "fg"):
            assert apply(kubectl, manifest(name)).returncode == 0
        for name in ("bg", "fg"):
            wait_for(lambda: (ltj(kube, name).get("status") or {}).get("reason") == "WaitingForPods", timeout=30)
        assert kubectl("delete", "ltj", "bg", "--timeout=60s", timeout=90).returncode == 0
        assert kubectl("delete", "ltj", "fg", "--cascade=foreground", "--timeout=60s", timeout=90).returncode == 0
        # a job applied afterwards and synced: the operator has handled the deletions' events too
        assert apply(kubectl, manifest("after")).returncode == 0
        wait_for(lambda: (ltj(kube, "after").get("status") or {}).get("reason") == "WaitingForPods", timeout=30)
        assert [j["metadata"]["name"] for j in kube.list("batch/v1/jobs", "default")] == ["after"]
    reasons = [e["reason"] for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] in ("bg", "fg")]
    assert "Recreated" not in reasons, reasons


def test_the_finalizer_of_an_earlier_operator_is_removed_on_sight(cluster, kubectl):
    """Jobs made under an earlier operator carry kopf's finalizer: one deleted while no operator
    ran hangs in deletion until this operator starts and releases it; a live one loses the
    finalizer and is served as usual."""
    kube = cluster
    for name in ("legacy", "legacy-deleted", "legacy-by-hand"):
        m = manifest(name)
        m["metadata"]["finalizers"] = [KOPF_FINALIZER]
        assert apply(kubectl, m).returncode == 0
    for name in ("legacy-deleted", "legacy-by-hand"):
        assert kubectl("delete", "ltj", name, "--wait=false").returncode == 0
        assert ltj(kube, name)["metadata"]["deletionTimestamp"]  # held by the old finalizer
    # the README's way out when no operator will run again
    p = kubectl("patch", "ltj", "legacy-by-hand", "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    assert p.returncode == 0, p.stderr
    assert kube.get(LTJ, "default", "legacy-by-hand") is None
    with operator():
        wait_for(lambda: kube.get(LTJ, "default", "legacy-deleted") is None, timeout=30)
        wait_for(lambda: not ltj(kube, "legacy")["metadata"].get("finalizers"), timeout=30)
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "legacy"), timeout=30)
        wait_for(lambda: phase(kube, "legacy") == "Pending", timeout=30)
    assert not ltj(kube, "legacy")["metadata"].get("finalizers")
    assert kube.get("batch/v1/jobs", "default", "legacy-deleted") is None  # nothing made for a deleted job
    assert kubectl("delete", "ltj", "legacy", "--timeout=60s", timeout=90).returncode == 0


def test_status_follows_the_jobs_watch_events_without_polling(cluster, kubectl, s3, monkeypatch):
    """With the ticker effectively off (one hour), the status still follows the trainer Job: each
    change of the Job arrives as a watch event and syncs its LoRATrainingJob."""
    import json
    from kubelora_operator import handlers
    kube = cluster
    monkeypatch.setattr(handlers, "SYNC_INTERVAL", 3600.0)
    s3.create_bucket(Bucket="events-out")
    with operator():
        assert apply(kubectl, manifest("evt", output__uri="s3://events-out/run")).returncode == 0
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "evt"), timeout=30)
        wait_for(lambda: (ltj(kube, "evt").get("status") or {}).get("reason") == "WaitingForPods", timeout=30)
        kubectl("patch", "job", "evt", "--subresource=status", "--type=merge",
                "-p", '{"status":{"active":1,"ready":1}}', check=True)
        wait_for(lambda: phase(kube, "evt") == "Initializing", timeout=30)
        s3.put_object(Bucket="events-out", Key="run/manifest.json", Body=json.dumps(
            {"artifacts": [{"uri": "s3://events-out/run/lora.safetensors", "format": "diffusers", "sha256": "ab",
                            "size": 3}]}).encode())
        kubectl("patch", "job", "evt", "--subresource=status", "--type=merge", "-p",
                '{"status":{"active":0,"ready":0,"succeeded":1,"conditions":[{"type":"Complete","status":"True"}]}}',
                check=True)
        st = wait_for(lambda: phase(kube, "evt") == "Succeeded" and ltj(kube, "evt")["status"], timeout=30)
    assert st["artifacts"][0]["uri"] == "s3://events-out/run/lora.safetensors"
    reasons = [e["reason"] for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "evt"]
    assert {"Created", "Initializing", "Succeeded"} <= set(reasons), reasons


def test_a_missing_secret_is_reported_from_the_pod_and_the_job_starts_once_it_is_applied(cluster, kubectl, s3,
                                                                                         job_runner):
    """No wait-for-Secret in the operator (it needed `get secrets` cluster-wide): the Job is made,
    its pod cannot start (the runner, as the kubelet, sets CreateContainerConfigError with
    'secret "late-creds" not found') and the status says so. Applying the Secret later (as a
    GitOps tool may) starts the pod; its container is a test shim that exits 0, standing in for a
    finished run."""
    import base64
    import json
    from kubelora_trainer.local_s3 import SECRET_FILE_KEYS
    kube = cluster
    s3.create_bucket(Bucket="late-out")
    job_runner.fail_next("late", index=0, exit_code=0)
    with operator():
        m = manifest("late", storage__credentialsSecret="late-creds", output__uri="s3://late-out/run")
        assert apply(kubectl, m).returncode == 0
        st = wait_for(lambda: (ltj(kube, "late").get("status") or {}).get("reason") == "CreateContainerConfigError"
                      and ltj(kube, "late")["status"], timeout=60)
        assert st["phase"] == "Pending" and 'secret "late-creds" not found' in st["message"], st
        assert "spec.storage.credentialsSecret" in st["message"], st
        assert {c["type"]: c["status"] for c in st["conditions"]}["Stalled"] == "True"
        s3.put_object(Bucket="late-out", Key="run/manifest.json", Body=json.dumps(
            {"artifacts": [{"uri": "s3://late-out/run/lora.safetensors", "format": "diffusers", "sha256": "ab",
                            "size": 3}]}).encode())
        b64 = lambda v: base64.b64encode(v.encode()).decode()  # noqa: E731
        apply(kubectl, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late-creds"},
                        "data": {"AWS_ACCESS_KEY_ID": b64(SECRET_FILE_KEYS[0]),
                                 "AWS_SECRET_ACCESS_KEY": b64(SECRET_FILE_KEYS[1]),
                                 "PYTHONPATH": b64("/var/cache/kubelora/mine")}})   # not for the trainer
        st = wait_for(lambda: phase(kube, "late") == "Succeeded" and ltj(kube, "late")["status"], timeout=90)
    assert st["artifacts"][0]["uri"] == "s3://late-out/run/lora.safetensors"
    assert len(job_runner.pods_started("late")) == 1
    ignored = [e["message"] for e in kube.list("v1/events", "default")
               if e["involvedObject"]["name"] == "late" and e["reason"] == "SecretKeysIgnored"]
    assert len(ignored) == 1 and "holds PYTHONPATH, which the trainer does not get" in ignored[0], ignored


def test_a_job_deleted_while_the_watch_was_down_is_forgotten_not_made_again(cluster, kubectl):
    """A LoRATrainingJob deleted in a watch gap (after 410 Gone kopf lists again and reports no
    DELETED for it): a sync of the remembered body makes nothing and says the job is gone, and the
    syncer then forgets it (no more ticks, no gauges for it)."""
    from kubelora_operator import handlers
    from kubelora_operator.syncer import Syncer
    kube = cluster
    with operator():
        assert apply(kubectl, manifest("gap")).returncode == 0
        wait_for(lambda: phase(kube, "gap") == "Pending")
    body = ltj(kube, "gap")
    kubectl("delete", "loratrainingjob", "gap", check=True)
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "gap") is None, timeout=30)
    syncer = Syncer(handlers.sync, interval=60)
    syncer.owners.remember(body)
    syncer._run(("default", "gap"))
    assert syncer.owners.get(("default", "gap")) is None
    assert kube.get("batch/v1/jobs", "default", "gap") is None and kube.get(LTJ, "default", "gap") is None
    # a finished one is never synced again: the audit looks it up through the real client
    assert apply(kubectl, manifest("done")).returncode == 0
    done = ltj(kube, "done")
    finished = {**done, "status": {"phase": "Succeeded"}}
    audited = Syncer(handlers.sync, interval=60, exists=handlers._exists)
    audited.owners.remember(finished)
    assert audited.audit() == 0 and audited.owners.get(("default", "done")) is not None   # still there
    kubectl("delete", "loratrainingjob", "done", check=True)
    assert audited.audit() == 1 and audited.owners.get(("default", "done")) is None


def test_a_job_made_again_keeps_its_trainer_image_and_only_what_is_left_of_its_deadline(cluster, kubectl, s3, monkeypatch):
    """A Job made again (deleted by hand here; a gang restart likewise) runs the trainer image the
    run started with, though the operator's changed (a helm upgrade), and gets only what is left of
    runPolicy.activeDeadlineSeconds, counted over the run's Jobs (the time each ran); once it is
    spent the job fails (DeadlineExceeded) instead of starting again."""
    from datetime import datetime, timedelta, timezone
    kube = cluster

    def iso(ago):
        return (datetime.now(timezone.utc) - ago).strftime("%Y-%m-%dT%H:%M:%SZ")

    def made_again(old_uid):
        j = kube.get("batch/v1/jobs", "default", "keep")
        return j if j and j["metadata"]["uid"] != old_uid else None

    demo_output_bucket(s3)  # readable: no storage stall
    monkeypatch.setenv("KUBELORA_TRAINER_IMAGE", "registry.example/trainer:1")
    with operator():
        assert apply(kubectl, manifest("keep", runPolicy__activeDeadlineSeconds=7200)).returncode == 0
        first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "keep"))
        wait_for(lambda: phase(kube, "keep") == "Pending")
        assert ltj(kube, "keep")["status"]["trainerImage"] == "registry.example/trainer:1"
        started = iso(timedelta(hours=1))
        kubectl("patch", "job", "keep", "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"startTime": started, "active": 1}}), check=True)
        wait_for(lambda: ltj(kube, "keep")["status"].get("startTime"), timeout=60)  # the Job's, kept
        monkeypatch.setenv("KUBELORA_TRAINER_IMAGE", "registry.example/trainer:2")  # the operator upgraded
        kubectl("delete", "job", "keep", check=True)
        again = wait_for(lambda: made_again(first["metadata"]["uid"]), timeout=60)
        assert again["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/trainer:1"
        assert 3500 <= again["spec"]["activeDeadlineSeconds"] <= 3600, again["spec"]["activeDeadlineSeconds"]
    # the limit spent by earlier Jobs: not made again (the status is edited while the operator is
    # stopped, so no sync in flight writes its own value back)
    kubectl("patch", "loratrainingjob", "keep", "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"deadlineUsedSeconds": 7300}}), check=True)
    kubectl("delete", "job", "keep", check=True)
    with operator():
        st = wait_for(lambda: phase(kube, "keep") == "Failed" and ltj(kube, "keep")["status"], timeout=60)
    assert st["reason"] == "DeadlineExceeded" and "runPolicy.activeDeadlineSeconds (7200 s)" in st["message"], st
    assert kube.get("batch/v1/jobs", "default", "keep") is None


def test_a_gang_restart_recorded_before_its_job_was_deleted_deletes_it_without_counting_again(cluster, kubectl, s3):
    """The operator records a gang restart (status.restartedJob: the failed Job's uid) before it
    deletes the Job; stopped in between, its next sync deletes that Job and makes the next one,
    with the restart counted once."""
    from kubelora_operator import handlers
    kube = cluster
    demo_output_bucket(s3)
    with operator():
        assert apply(kubectl, manifest("half")).returncode == 0
        old = wait_for(lambda: kube.get("batch/v1/jobs", "default", "half"))
        wait_for(lambda: phase(kube, "half") == "Pending")
    # what the operator had written when it stopped: the restart, with the failed Job still there
    kubectl("patch", "loratrainingjob", "half", "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"restarts": 1, "restartPending": True, "restartedJob": old["metadata"]["uid"]}}),
            check=True)
    handlers.sync(ltj(kube, "half"), lambda body: None)
    assert kube.get("batch/v1/jobs", "default", "half") is None
    handlers.sync(ltj(kube, "half"), lambda body: None)
    new = kube.get("batch/v1/jobs", "default", "half")
    assert new is not None and new["metadata"]["uid"] != old["metadata"]["uid"]
    st = ltj(kube, "half")["status"]
    assert st["restarts"] == 1 and "restartPending" not in st and "restartedJob" not in st, st


def test_a_run_started_before_the_trainer_image_was_recorded_keeps_its_jobs_image(cluster, kubectl, s3, monkeypatch):
    """A run an older operator started has no status.trainerImage: the upgraded operator records
    the running Job's image (not its own), so a Job made again keeps the run's trainer."""
    kube = cluster
    demo_output_bucket(s3)
    monkeypatch.setenv("KUBELORA_TRAINER_IMAGE", "registry.example/trainer:1")
    with operator():
        assert apply(kubectl, manifest("older")).returncode == 0
        first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "older"))
        wait_for(lambda: phase(kube, "older") == "Pending")
    kubectl("patch", "loratrainingjob", "older", "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"trainerImage": None}}), check=True)
    monkeypatch.setenv("KUBELORA_TRAINER_IMAGE", "registry.example/trainer:2")   # the operator upgraded
    with operator():
        wait_for(lambda: ltj(kube, "older")["status"].get("trainerImage") == "registry.example/trainer:1", timeout=60)
        kubectl("delete", "job", "older", check=True)
        again = wait_for(lambda: (j := kube.get("batch/v1/jobs", "default", "older")) and
                         j["metadata"]["uid"] != first["metadata"]["uid"] and j, timeout=60)
    assert again["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/trainer:1"


def test_a_secret_without_keys_is_never_read_with_the_operators_credentials(cluster, kubectl, monkeypatch):
    """operator.s3.jobCredentialsOnly: a job naming a Secret that holds no AWS keys (any tenant can
    make one) got the operator's own credentials for its bucket. Now it gets an error naming the
    missing keys; without the setting such a job is read as one without a Secret. A Secret with
    temporary credentials passes its session token on."""
    import base64
    from kubelora_operator import handlers
    from kubelora_trainer.spec import parse_spec
    b64 = lambda v: base64.b64encode(v.encode()).decode()  # noqa: E731
    for name, data in (("no-keys", {"unrelated": "x"}), ("id-only", {"AWS_ACCESS_KEY_ID": "AKIA1"}),
                       ("sts", {"AWS_ACCESS_KEY_ID": "ASIA1", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "tok"})):
        apply(kubectl, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                        "data": {k: b64(v) for k, v in data.items()}})
    from kubelora_operator import kube as k
    k.reset()
    spec = lambda secret: parse_spec(manifest("x", storage__credentialsSecret=secret)["spec"])  # noqa: E731
    monkeypatch.setattr(handlers, "JOB_CREDENTIALS_ONLY", True)
    for name, missing in (("no-keys", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), ("id-only", "AWS_SECRET_ACCESS_KEY")):
        settings, error = handlers._settings(spec(name), "default")
        assert error and f"has no {missing}" in error and settings.access_key is None, (name, error)
    settings, error = handlers._settings(spec("sts"), "default")
    assert error is None and (settings.access_key, settings.session_token) == ("ASIA1", "tok")
    monkeypatch.setattr(handlers, "JOB_CREDENTIALS_ONLY", False)
    settings, error = handlers._settings(spec("no-keys"), "default")
    assert error is None and settings.access_key is None   # the operator's own access, as without a Secret


def test_a_running_job_whose_spec_this_operator_refuses_says_so(cluster, kubectl):
    """A run an older operator admitted, whose spec a check added since refuses (here an evaluation
    folder inside the training folder): its status says so, Stalled, instead of freezing unsynced."""
    from kubelora_operator import handlers
    kube = cluster
    m = manifest("older-spec", evaluation={"sources": [{"uri": DEMO["spec"]["dataset"]["uri"].rstrip("/") + "/held"}]})
    assert apply(kubectl, m).returncode == 0   # the schema admits it: the overlap is the operator's check
    kubectl("patch", "loratrainingjob", "older-spec", "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"phase": "Training", "reason": "Training", "message": "step 10"}}), check=True)
    handlers.sync(ltj(kube, "older-spec"), lambda body: None)
    st = ltj(kube, "older-spec")["status"]
    assert st["reason"] == "InvalidSpec" and "evaluation.sources[0].uri" in st["message"], st
    assert {c["type"]: c["status"] for c in st["conditions"]}["Stalled"] == "True" and st["phase"] == "Training"


def test_a_stale_crd_is_said_at_start_and_on_each_job_it_may_have_cut(kube, kubectl, s3, monkeypatch, caplog):
    """Helm never upgrades a CRD in crds/: after `helm upgrade` alone the API server serves the older
    schema and prunes the fields it lacks, silently for clients that do not ask for strict field
    validation (here kubectl --validate=false stands in for the Python and Go clients). The operator
    compares the installed schema with its own: a warning in its log at start, and a Warning Event
    (CRDOutdated) naming the missing field on the job, which is still made."""
    from kubelora_operator import crd_drift, handlers
    from kubelora_operator import kube as k
    from kubelora_trainer.crd import build_crd, spec_schema
    stale = build_crd()
    del stale["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["dataset"][
        "properties"]["captionPrefix"]
    assert kubectl("apply", "-f", "-", input=yaml.safe_dump(stale)).returncode == 0
    demo_output_bucket(s3)
    monkeypatch.setattr(handlers, "CRD", crd_drift.Checker(lambda: k.read_crd(crd_drift.CRD_NAME), spec_schema))
    with operator():
        job = manifest("trimmed", dataset__captionPrefix="sks, ")
        assert kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(job)).returncode == 0
        assert "captionPrefix" not in ltj(kube, "trimmed")["spec"]["dataset"]   # pruned on the way in
        said = wait_for(lambda: [e["message"] for e in kube.list("v1/events", "default")
                                 if e["involvedObject"]["name"] == "trimmed" and e["reason"] == "CRDOutdated"], timeout=60)
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "trimmed"), timeout=60)
    assert "lacks spec.dataset.captionPrefix" in said[0] and "kubectl apply -f charts/kubelora/crds/" in said[0], said
    logged = [r.getMessage() for r in caplog.records if "is older than this operator" in r.getMessage()]
    assert logged and "spec.dataset.captionPrefix" in logged[0]
