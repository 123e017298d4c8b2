"""End to end on the emulated cluster: kubectl apply -> operator (real kopf) -> Indexed Job ->
local runner (stands in for the kubelet and Job controller, which cannot run here) -> torchrun
trainer on 2 "nodes" -> tiny Flux LoRA in the S3 server (SeaweedFS) -> status, kubectl get, cleanup."""
import os

os.environ.setdefault("KUBELORA_SYNC_INTERVAL", "0.5")
os.environ.setdefault("KUBELORA_STORAGE_RETRY_SECONDS", "0.5")
os.environ.setdefault("KUBELORA_STORAGE_RETRY_MAX_SECONDS", "1")
os.environ.setdefault("KUBELORA_RETRY_DELAY", "0.5")

import hashlib  # noqa: E402

import pytest  # noqa: E402

from kube.fixtures import kube, kube_server, kubectl, wait_for  # noqa: E402,F401
from kube.local_runner import job_runner  # noqa: E402,F401
from test_operator import CRD_FILE, apply, ltj, manifest, operator, phase  # noqa: E402


@pytest.fixture()
def demo_bucket(s3, tmp_path, monkeypatch):
    """The demo's tiny Flux and dataset in the S3 server (SeaweedFS) the pods (local processes) will read."""
    from kubelora_trainer.demo import seed_bucket
    monkeypatch.setenv("KUBELORA_PROGRESS_INTERVAL", "1")
    seed_bucket(tmp_path / "seed")
    return s3


def _status(kube, name):
    return ltj(kube, name).get("status") or {}


def test_apply_two_nodes_suspend_resume_restart_succeed_and_ttl(kube, kubectl, demo_bucket, job_runner):
    kubectl("apply", "-f", CRD_FILE, check=True)
    m = manifest("demo", resources__nodes=2, runPolicy__suspend=True, runPolicy__ttlSecondsAfterFinished=2)
    with operator():
        assert apply(kubectl, m).returncode == 0
        # suspended: the Job exists, suspended, and nothing runs
        wait_for(lambda: phase(kube, "demo") == "Suspended", timeout=30)
        assert kube.get("batch/v1/jobs", "default", "demo")["spec"]["suspend"] is True
        assert job_runner.running("demo") == {}
        # resume -> pods start -> the trainer reports progress
        m["spec"]["runPolicy"]["suspend"] = False
        assert apply(kubectl, m).returncode == 0
        wait_for(lambda: phase(kube, "demo") == "Training", timeout=300)
        job_uid = kube.get("batch/v1/jobs", "default", "demo")["metadata"]["uid"]
    # operator restart in the middle of training: the run goes on, nothing is recreated
    with operator():
        wait_for(lambda: phase(kube, "demo") == "Succeeded", timeout=600)  # 2 nodes x 60 steps on a busy CPU
        st = _status(kube, "demo")
        assert len(job_runner.pods_started("demo")) == 2, job_runner.pods_started("demo")
        # the TTL (2 s) may already have deleted the Job: what must hold is that no other Job was
        # ever made and the one there (if still there) is the original
        jobs = kube.list("batch/v1/jobs", "default")
        assert [(j["metadata"]["name"], j["metadata"]["uid"]) for j in jobs] in ([], [("demo", job_uid)]), jobs
        art = st["artifacts"][0]
        assert art["uri"] == "s3://kubelora-demo/outputs/demo-flux/lora.safetensors" and art["format"] == "diffusers"
        body = demo_bucket.get_object(Bucket="kubelora-demo", Key="outputs/demo-flux/lora.safetensors")["Body"].read()
        assert art["sha256"] == hashlib.sha256(body).hexdigest()
        assert st["progress"]["summary"] == "60/60" and st["progress"]["loss"] > 0
        conds = {c["type"]: c["status"] for c in st["conditions"]}
        assert conds == {"Ready": "True", "Reconciling": "False", "Stalled": "False", "Suspended": "False"}
        assert st["startTime"] and st["completionTime"]
        out = kubectl("get", "ltj", "demo").stdout
        assert "Succeeded" in out and "60/60" in out, out
        reasons = [e["reason"] for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "demo"]
        assert {"Created", "Suspended", "Training", "Succeeded"} <= set(reasons), reasons
        # ttlSecondsAfterFinished: children go, the resource and its status stay
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "demo") is None, timeout=30)
        wait_for(lambda: kube.get("v1/configmaps", "default", "demo-spec") is None)
        assert kube.get("v1/services", "default", "demo-workers") is None
        wait_for(lambda: _status(kube, "demo").get("childrenDeleted") is True)  # patched after the deletes
        assert phase(kube, "demo") == "Succeeded" and _status(kube, "demo")["artifacts"]
    # and a later operator start does not bring them back; deleting the resource works
    with operator():
        import time
        time.sleep(2)
        assert kube.get("batch/v1/jobs", "default", "demo") is None
        assert kubectl("delete", "ltj", "demo").returncode == 0
        wait_for(lambda: kube.get("kubelora.dev/v1alpha1/loratrainingjobs", "default", "demo") is None)


def test_a_preempted_node_resumes_without_a_gang_restart_or_the_backoff_budget(kube, kubectl, demo_bucket, job_runner):
    """The runner behaves as the real Job controller (only a failed index is replaced). Node 1's pod
    is preempted (test hook: the DisruptionTarget condition, then SIGTERM, as the kubelet does):
    every rank checkpoints, node 1 exits 143 and node 0 exits 3 (stopped for its peer), and the
    Job's podFailurePolicy ignores both, so each index gets a new pod, they resume from the
    checkpoint and finish; no gang restart, no failed pod counted."""
    job_runner.group_restart = "never"
    job_runner.grace_seconds = 120  # the pods' terminationGracePeriodSeconds (the runner caps it at 3 s)
    kubectl("apply", "-f", CRD_FILE, check=True)
    with operator():
        m = manifest("preempt", resources__nodes=2, runPolicy__backoffLimit=1, training__steps=16,
                     output__uri="s3://kubelora-demo/outputs/preempt")
        assert apply(kubectl, m).returncode == 0
        wait_for(lambda: ((_status(kube, "preempt").get("progress") or {}).get("step") or 0) >= 3, timeout=600)
        job_runner.disrupt("preempt", index=1, reason="PreemptionByScheduler")
        st = wait_for(lambda: phase(kube, "preempt") == "Succeeded" and _status(kube, "preempt"), timeout=600)
    assert not st.get("restarts") and (st["progress"].get("resumedFrom") or 0) >= 3, st
    assert len(job_runner.pods_started("preempt")) == 4, job_runner.pods_started("preempt")
    exits = sorted(p["exit_code"] for p in job_runner.pod_info("preempt") if p["exit_code"])
    assert exits == [3, 143], job_runner.pod_info("preempt")
    job = kube.get("batch/v1/jobs", "default", "preempt")
    assert job is None or not (job.get("status") or {}).get("failed"), job
    reasons = [e["reason"] for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "preempt"]
    assert "GangRestart" not in reasons and "Succeeded" in reasons, reasons


def test_failing_pod_is_retried_then_failed_with_reason_and_delete_cleans_up(kube, kubectl, demo_bucket, job_runner):
    kubectl("apply", "-f", CRD_FILE, check=True)
    for _ in range(2):  # test shim: the pod's process exits 1 instead of running the trainer
        job_runner.fail_next("flaky", index=0, exit_code=1)
    with operator():
        assert apply(kubectl, manifest("flaky", runPolicy__backoffLimit=1)).returncode == 0
        st = wait_for(lambda: phase(kube, "flaky") == "Failed" and _status(kube, "flaky"), timeout=60)
        assert len(job_runner.pods_started("flaky")) == 2  # the first failure was retried once
        assert st["reason"] == "Error" and "exited with code 1" in st["message"], st
        assert "backoff limit" in st["message"].lower()
        assert {c["type"]: c["status"] for c in st["conditions"]}["Stalled"] == "True"
        assert kube.get("batch/v1/jobs", "default", "flaky") is not None
        assert kubectl("delete", "ltj", "flaky").returncode == 0
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "flaky") is None)
        wait_for(lambda: kube.get("v1/configmaps", "default", "flaky-spec") is None)
        assert kube.get("v1/services", "default", "flaky-workers") is None


def test_bad_input_fails_the_job_at_once_through_the_real_launcher(kube, kubectl, demo_bucket, job_runner):
    """No shim: the pod runs the real launcher and torchrun; the trainer finds no usable item in
    the dataset (exit 2 through the launcher), the podFailurePolicy fails the Job without a retry."""
    kubectl("apply", "-f", CRD_FILE, check=True)
    with operator():
        m = manifest("badinput", dataset__uri="s3://kubelora-demo/no-such-prefix", runPolicy__backoffLimit=3,
                     output__uri="s3://kubelora-demo/outputs/badinput")
        assert apply(kubectl, m).returncode == 0
        st = wait_for(lambda: phase(kube, "badinput") == "Failed" and _status(kube, "badinput"), timeout=120)
        assert len(job_runner.pods_started("badinput")) == 1, job_runner.pods_started("badinput")  # not retried
        assert "exited with code 2" in st["message"], st


def test_a_failed_node_restarts_the_whole_gang(kube, kubectl, demo_bucket, job_runner, monkeypatch):
    """The runner behaves as the real Job controller here (only the failed index is replaced, after a
    back-off): the operator must restart both nodes together instead. Index 1's first pod is a test
    shim that exits 1 (a crashed node: a stand-in, nothing crashes on demand here). Index 0 waits at
    the rendezvous on a Ready Node, so the failure is decided once the grace has passed (shortened
    here from 60 s), counted."""
    from kubelora_operator import handlers
    monkeypatch.setattr(handlers, "GANG_FAILURE_GRACE_SECONDS", 3.0)
    job_runner.group_restart, job_runner.backoff_seconds = "never", 120.0
    kubectl("apply", "-f", CRD_FILE, check=True)
    job_runner.fail_next("gang", index=1, exit_code=1)
    with operator():
        m = manifest("gang", resources__nodes=2, runPolicy__backoffLimit=2, output__uri="s3://kubelora-demo/outputs/gang")
        assert apply(kubectl, m).returncode == 0
        st = wait_for(lambda: phase(kube, "gang") == "Succeeded" and _status(kube, "gang"), timeout=600)
    assert st["restarts"] == 1 and not st.get("restartPending"), st
    assert not st.get("disruptionRestarts"), st  # the runner's Node is Ready: a crash, counted
    started = job_runner.pods_started("gang")
    assert len(started) == 4, started  # 2 pods, then 2 again after the gang restart (no lone replacement)
    reasons = [e["reason"] for e in kube.list("v1/events", "default") if e["involvedObject"]["name"] == "gang"]
    assert "GangFailureDeciding" in reasons and "GangRestart" in reasons and "Succeeded" in reasons, reasons
