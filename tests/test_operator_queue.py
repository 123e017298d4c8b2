"""Kueue and GitOps against the emulated API server (real kopf, kubectl, the local Job runner):
Kueue owns a queued Job's spec.suspend, and the status follows every generation (kstatus)."""
import json

from kube.fixtures import kube, kube_server, kubectl, wait_for  # noqa: F401 - fixtures
from kube.local_runner import job_runner  # noqa: F401 - fixture
from test_gitops_health import kstatus
from test_operator import apply, cluster, ltj, manifest, operator, phase  # noqa: F401 - fixture

QUEUE = "kueue.x-k8s.io/queue-name"


def _events(kube, name, reason):
    return [e["message"] for e in kube.list("v1/events", "default")
            if e["involvedObject"]["name"] == name and e["reason"] == reason]


def test_kueue_admits_the_job_the_operator_never_resuspends_it_and_the_status_follows_each_generation(
        cluster, kubectl, s3, job_runner):
    """The runner's pod is a test shim that exits 0, standing in for a finished run; Kueue is played
    by kubectl (it unsuspends the Job it admits)."""
    kube = cluster
    s3.create_bucket(Bucket="queued-out")
    s3.put_object(Bucket="queued-out", Key="run/manifest.json", Body=json.dumps(
        {"artifacts": [{"uri": "s3://queued-out/run/lora.safetensors", "format": "diffusers", "sha256": "ab",
                        "size": 3}]}).encode())
    job_runner.fail_next("kq", index=0, exit_code=0)
    m = manifest("kq", output__uri="s3://queued-out/run")
    m["metadata"]["labels"] = {QUEUE: "gpu-queue", "kueue.x-k8s.io/priority-class": "high"}
    with operator():
        assert apply(kubectl, m).returncode == 0
        job = wait_for(lambda: kube.get("batch/v1/jobs", "default", "kq"), timeout=30)
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"][QUEUE] == "gpu-queue"
        assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
        st = wait_for(lambda: (ltj(kube, "kq").get("status") or {}).get("reason") == "QueuedInKueue"
                      and ltj(kube, "kq")["status"], timeout=30)
        assert st["phase"] == "Pending" and "waiting for Kueue admission in queue 'gpu-queue'" in st["message"]
        assert kstatus(ltj(kube, "kq")) == "InProgress"
        # runPolicy.suspend is Kueue's business now: said, and the Job is left alone
        m["spec"]["runPolicy"] = {"suspend": True}
        assert apply(kubectl, m).returncode == 0
        msg = wait_for(lambda: _events(kube, "kq", "SuspendNotApplied"), timeout=30)[0]
        assert "queued in Kueue (queue 'gpu-queue')" in msg and "spec.active: false" in msg
        assert job_runner.pods_started("kq") == []
        # Kueue admits the workload: it unsuspends the Job; the run starts and is not suspended again
        kubectl("patch", "job", "kq", "--type=merge", "-p", '{"spec":{"suspend":false}}', check=True)
        st = wait_for(lambda: phase(kube, "kq") == "Succeeded" and ltj(kube, "kq")["status"], timeout=90)
        assert st["artifacts"][0]["uri"] == "s3://queued-out/run/lora.safetensors"
        versions = [v for v in kube.history("batch/v1/jobs", "default", "kq") if v]
        unsuspended = next(i for i, v in enumerate(versions) if v["spec"]["suspend"] is False)
        assert all(v["spec"]["suspend"] is False for v in versions[unsuspended:])
        assert len(job_runner.pods_started("kq")) == 1
        assert kstatus(ltj(kube, "kq")) == "Current"
        # a finished job is not run again, but its edited spec is observed (else kstatus and Flux's
        # wait see it InProgress forever)
        generation = ltj(kube, "kq")["metadata"]["generation"]
        m["spec"]["runPolicy"] = {"suspend": False}
        assert apply(kubectl, m).returncode == 0
        obj = wait_for(lambda: ltj(kube, "kq")["metadata"]["generation"] > generation
                       and (ltj(kube, "kq")["status"].get("observedGeneration") == ltj(kube, "kq")["metadata"]["generation"])
                       and ltj(kube, "kq"), timeout=30)
        assert all(c["observedGeneration"] == obj["metadata"]["generation"] for c in obj["status"]["conditions"])
        assert obj["status"]["phase"] == "Succeeded" and kstatus(obj) == "Current"
        assert {c["type"]: c["status"] for c in obj["status"]["conditions"]}["Ready"] == "True"
        assert len(job_runner.pods_started("kq")) == 1
