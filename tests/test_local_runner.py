"""The local Job runner (tests/kube/local_runner.py) on its own: no operator, no torch. Jobs shaped
like kubelora_operator.manifests.job() (PET_* env with a fieldRef, envFrom a Secret, the spec
ConfigMap at /etc/kubelora, a cache volume, /dev/shm, podFailurePolicy), written by hand through
the `kubernetes` client, with a tiny Python program as the container command."""
from __future__ import annotations

import base64
import json
import re
import textwrap

import kubernetes
import pytest

from kube.fixtures import kube, kube_api, kube_server, wait_for  # noqa: F401 - fixtures
from kube.local_runner import SHIM_BANNER, condition, expand, index_ranges, job_runner  # noqa: F401

NS = "default"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
SPEC_TEXT = "kind: LoRATrainingJob\n"

# Writes what it saw to $KUBELORA_CACHE_DIR/rank-<rank>.json; with HOLD=<rank>|all it then waits
# for the file $KUBELORA_CACHE_DIR/go (or to be killed).
PROGRAM = textwrap.dedent("""
    import json, os, pathlib, sys, time
    rank = os.environ["PET_NODE_RANK"]
    cache = pathlib.Path(os.environ["KUBELORA_CACHE_DIR"])
    seen = {"argv": sys.argv[1:], "spec": pathlib.Path(sys.argv[1]).read_text(),
            "env": {k: os.environ.get(k) for k in ("PET_NODE_RANK", "PET_NNODES", "PET_MASTER_ADDR",
                    "PET_MASTER_PORT", "KUBELORA_CACHE_DIR", "AWS_ACCESS_KEY_ID", "HOSTNAME", "MASTER",
                    "ESCAPED", "FORWARD", "FROM_CM", "TEST_PARENT_VAR", "SHM")}}
    print(f"rank {rank} of {os.environ['PET_NNODES']}", flush=True)
    (cache / f"rank-{rank}.json").write_text(json.dumps(seen))
    if os.environ.get("HOLD") in (rank, "all"):
        while not (cache / "go").exists():
            time.sleep(0.05)
    print(f"rank {rank} done", flush=True)
""")


def job_manifest(name: str, *, completions: int = 2, backoff_limit: int = 3, secret: str = "creds",
                 cache_claim: str | None = None, suspend: bool = False, deadline: int | None = None,
                 hold: str | None = None) -> dict:
    labels = {"app.kubernetes.io/name": "kubelora", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/managed-by": "kubelora-operator", "kubelora.dev/job": name}
    env = [
        {"name": "PET_NNODES", "value": str(completions)},
        {"name": "PET_NPROC_PER_NODE", "value": "1"},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-0.{name}-workers.{NS}.svc"},
        {"name": "PET_MASTER_PORT", "value": "29500"},
        {"name": "KUBELORA_JOB_NAME", "value": name},
        {"name": "KUBELORA_CACHE_DIR", "value": "/var/cache/kubelora"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "MASTER", "value": "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"},
        {"name": "ESCAPED", "value": "$$(PET_NNODES)"},
        {"name": "FORWARD", "value": "$(DEFINED_LATER)"},
        {"name": "DEFINED_LATER", "value": "x"},
        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": f"{name}-spec", "key": "spec.yaml"}}},
        {"name": "SHM", "value": "/dev/shm"},
    ]
    if hold is not None:
        env.append({"name": "HOLD", "value": hold})
    container = {
        "name": "trainer", "image": "ghcr.io/kubelora/trainer:0.1.0", "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-c", PROGRAM],
        "args": ["/etc/kubelora/spec.yaml", "--node-rank=$(PET_NODE_RANK)", "--master-addr=$(PET_MASTER_ADDR)",
                 "--master-port=29500", "$$(PET_NODE_RANK)", "$(UNDEFINED)"],
        "env": env, "envFrom": [{"secretRef": {"name": secret}}],
        "ports": [{"name": "rendezvous", "containerPort": 29500}],
        "volumeMounts": [{"name": "spec", "mountPath": "/etc/kubelora", "readOnly": True},
                         {"name": "cache", "mountPath": "/var/cache/kubelora"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    cache = {"persistentVolumeClaim": {"claimName": cache_claim}} if cache_claim else {"emptyDir": {}}
    spec = {
        "completionMode": "Indexed", "completions": completions, "parallelism": completions,
        "backoffLimit": backoff_limit, "suspend": suspend,
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}]},
        "template": {"metadata": {"labels": labels}, "spec": {
            "subdomain": f"{name}-workers", "restartPolicy": "Never", "containers": [container],
            "volumes": [{"name": "spec", "configMap": {"name": f"{name}-spec"}}, {"name": "cache", **cache},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]}},
    }
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels}, "spec": spec}


class Cluster:
    """What a test creates, through the `kubernetes` client."""

    def __init__(self, api_client):
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)

    def secret(self, name: str = "creds") -> None:
        data = {"AWS_ACCESS_KEY_ID": base64.b64encode(b"local-key").decode()}
        self.core.create_namespaced_secret(NS, {"metadata": {"name": name}, "data": data})

    def configmap(self, job: str) -> None:
        self.core.create_namespaced_config_map(NS, {"metadata": {"name": f"{job}-spec"},
                                                    "data": {"spec.yaml": SPEC_TEXT}})

    def pvc(self, name: str) -> None:
        self.core.create_namespaced_persistent_volume_claim(NS, {
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})

    def job(self, manifest: dict) -> None:
        self.batch.create_namespaced_job(NS, manifest)

    def suspend(self, job: str, value: bool) -> None:
        self.batch.patch_namespaced_job(job, NS, {"spec": {"suspend": value}})


@pytest.fixture()
def cluster(kube_api) -> Cluster:
    return Cluster(kube_api)


def job_pods(kube, job: str) -> list[dict]:
    """The Job's pods in the API, oldest first."""
    pods = [p for p in kube.list(PODS, NS) if p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == job]
    return sorted(pods, key=lambda p: int(kube.history(PODS, NS, p["metadata"]["name"])[0]["metadata"]["resourceVersion"]))


def terminated(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"].get("terminated") or {}


# --------------------------------------------------------------------------------------------
# pure functions


def test_expand_follows_the_kubernetes_rules():
    env = {"A": "1", "B": "two"}.get
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$$(A)", env) == "$(A)"            # escaped
    assert expand("$$$(A)", env) == "$1"
    assert expand("$(C)", env) == "$(C)"             # undefined: left as written
    assert expand("$(A", env) == "$(A"               # unclosed
    assert expand("a$b$", env) == "a$b$"             # other dollars kept
    assert expand("--x=$(A)$(A)", env) == "--x=11"


def test_index_ranges():
    assert index_ranges({0, 1}) == "0-1"
    assert index_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert index_ranges([3]) == "3"


# --------------------------------------------------------------------------------------------
# Jobs


def test_indexed_job_runs_one_local_process_per_index(kube, cluster, job_runner, monkeypatch):
    monkeypatch.setenv("TEST_PARENT_VAR", "inherited")
    cluster.secret()
    cluster.configmap("demo")
    cluster.pvc("cache")
    cluster.job(job_manifest("demo", cache_claim="cache"))
    job = wait_for(lambda: condition(kube.get(JOBS, NS, "demo"), "Complete") and kube.get(JOBS, NS, "demo"))

    status = job["status"]
    assert (status["succeeded"], status["completedIndexes"], status.get("active"), status.get("failed")) == \
        (2, "0-1", None, None)
    assert status["startTime"] and status["completionTime"] and status["ready"] == 0
    assert condition(job, "SuccessCriteriaMet")["reason"] == "CompletionsReached"

    pods = job_pods(kube, "demo")
    assert len(pods) == 2
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert set(by_index) == {"0", "1"}
    uid = job["metadata"]["uid"]
    for index, pod in by_index.items():
        meta, spec = pod["metadata"], pod["spec"]
        assert re.fullmatch(rf"demo-{index}-[a-z0-9]{{5}}", meta["name"])
        assert meta["labels"]["batch.kubernetes.io/job-name"] == "demo"
        assert meta["labels"]["batch.kubernetes.io/job-completion-index"] == index
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubelora-operator"
        assert meta["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": "demo", "uid": uid,
                                            "controller": True, "blockOwnerDeletion": True}]
        assert (spec["hostname"], spec["subdomain"]) == (f"demo-{index}", "demo-workers")
        assert pod["status"]["phase"] == "Succeeded" and pod["status"]["startTime"]
        assert terminated(pod)["exitCode"] == 0 and terminated(pod)["reason"] == "Completed"
    # the pod went Pending -> Running -> Succeeded through the status subresource
    phases = [v["status"]["phase"] for v in kube.history(PODS, NS, pods[0]["metadata"]["name"])
              if v and v.get("status")]
    assert phases[0] == "Pending" and "Running" in phases and phases[-1] == "Succeeded"

    seen = {r: json.loads((job_runner.pvc_dir("cache") / f"rank-{r}.json").read_text()) for r in (0, 1)}
    spec_file = seen[0]["argv"][0]
    assert spec_file.endswith("/spec.yaml") and not spec_file.startswith("/etc/kubelora")
    assert seen[0]["spec"] == SPEC_TEXT
    port = seen[0]["env"]["PET_MASTER_PORT"]
    assert port != "29500" and seen[1]["env"]["PET_MASTER_PORT"] == port   # one port per Job run
    assert seen[1]["argv"][1:] == ["--node-rank=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                                   "$(PET_NODE_RANK)", "$(UNDEFINED)"]
    env = seen[1]["env"]
    assert env["PET_NODE_RANK"] == "1" and env["PET_NNODES"] == "2" and env["PET_MASTER_ADDR"] == "127.0.0.1"
    assert env["KUBELORA_CACHE_DIR"] == str(job_runner.pvc_dir("cache"))
    assert env["AWS_ACCESS_KEY_ID"] == "local-key"                    # envFrom secretRef
    assert env["FROM_CM"] == SPEC_TEXT                                 # configMapKeyRef
    assert env["MASTER"] == f"127.0.0.1:{port}"
    assert (env["ESCAPED"], env["FORWARD"]) == ("$(PET_NNODES)", "$(DEFINED_LATER)")
    assert env["HOSTNAME"] == "demo-1" and env["SHM"] == "/dev/shm"
    assert env["TEST_PARENT_VAR"] == "inherited"
    logs = job_runner.logs("demo")
    assert "rank 0 of 2" in logs and "rank 1 done" in logs
    assert kube.errors() == []


def test_a_failed_pod_is_replaced_within_the_backoff_limit(kube, cluster, job_runner):
    cluster.secret()
    cluster.configmap("retry")
    job_runner.fail_next("retry", index=1, exit_code=1)   # a test shim, not the program
    cluster.job(job_manifest("retry", backoff_limit=1))
    job = wait_for(lambda: condition(kube.get(JOBS, NS, "retry"), "Complete") and kube.get(JOBS, NS, "retry"))
    assert (job["status"]["succeeded"], job["status"]["failed"], job["status"]["completedIndexes"]) == (2, 1, "0-1")
    pods = job_pods(kube, "retry")
    index1 = [p for p in pods if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"]
    assert [p["status"]["phase"] for p in index1] == ["Failed", "Succeeded"]
    assert terminated(index1[0])["exitCode"] == 1 and terminated(index1[0])["reason"] == "Error"
    assert len(pods) == 3   # index 0 ran once: no group restart for a plain command
    assert SHIM_BANNER in job_runner.pod_log(index1[0]["metadata"]["name"])


def test_exit_code_2_fails_the_job_at_once_by_pod_failure_policy(kube, cluster, job_runner):
    cluster.secret()
    cluster.configmap("bad")
    job_runner.fail_next("bad", index=0, exit_code=2, delay=0.5)
    cluster.job(job_manifest("bad", backoff_limit=5, hold="1"))   # index 1 runs until killed
    job = wait_for(lambda: condition(kube.get(JOBS, NS, "bad"), "Failed") and kube.get(JOBS, NS, "bad"))
    failed = condition(job, "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert re.fullmatch(r"Container trainer for pod default/bad-0-\w{5} failed with exit code 2 "
                        r"matching FailJob rule at index 1", failed["message"])
    assert condition(job, "FailureTarget")["reason"] == "PodFailurePolicy"
    assert job_runner.running("bad") == {}
    assert len(job_runner.pods_started("bad")) == 2      # no retry
    # the failed pod stays; the running one was killed and deleted, as the Job controller does
    assert [terminated(p)["exitCode"] for p in job_pods(kube, "bad")] == [2]
    assert job["status"].get("active") is None and job["status"]["failed"] == 2


def test_a_missing_secret_is_a_create_container_config_error(kube, cluster, job_runner):
    cluster.configmap("nosecret")
    cluster.job(job_manifest("nosecret", completions=1, secret="absent"))

    def waiting():
        pods = job_pods(kube, "nosecret")
        statuses = pods and (pods[0].get("status") or {}).get("containerStatuses")
        waiting = statuses and statuses[0]["state"].get("waiting")
        return waiting if waiting and waiting["reason"] != "ContainerCreating" else None

    state = wait_for(waiting)
    assert state == {"reason": "CreateContainerConfigError", "message": 'secret "absent" not found'}
    pod = job_pods(kube, "nosecret")[0]
    assert pod["status"]["phase"] == "Pending"
    wait_for(lambda: (kube.get(JOBS, NS, "nosecret").get("status") or {}).get("active") == 1)
    assert job_runner.running("nosecret") == {}
    cluster.secret("absent")   # the kubelet retries: the pod starts once the Secret exists
    wait_for(lambda: condition(kube.get(JOBS, NS, "nosecret"), "Complete"))
    assert job_pods(kube, "nosecret")[0]["metadata"]["name"] == pod["metadata"]["name"]


def test_suspend_kills_the_processes_and_resume_starts_new_pods(kube, cluster, job_runner):
    cluster.secret()
    cluster.configmap("pause")
    cluster.pvc("pause-cache")
    cluster.job(job_manifest("pause", cache_claim="pause-cache", hold="all"))
    wait_for(lambda: len(job_runner.running("pause")) == 2 and (kube.get(JOBS, NS, "pause").get("status") or {}).get("ready") == 2)
    first = job_runner.pods_started("pause")

    cluster.suspend("pause", True)
    job = wait_for(lambda: (j := kube.get(JOBS, NS, "pause")) and condition(j, "Suspended")
                   and not j["status"].get("active") and not job_pods(kube, "pause") and j)
    assert condition(job, "Suspended")["reason"] == "JobSuspended"
    assert job_runner.running("pause") == {} and "startTime" not in job["status"]
    assert not job["status"].get("failed")

    (job_runner.pvc_dir("pause-cache") / "go").touch()
    cluster.suspend("pause", False)
    job = wait_for(lambda: condition(kube.get(JOBS, NS, "pause"), "Complete") and kube.get(JOBS, NS, "pause"))
    suspended = [c for c in job["status"]["conditions"] if c["type"] == "Suspended"][0]
    assert (suspended["status"], suspended["reason"]) == ("False", "JobResumed")
    started = job_runner.pods_started("pause")
    assert len(started) == 4 and not set(started[2:]) & set(first)
    assert job["status"]["completedIndexes"] == "0-1"


def test_group_restart_kills_the_peers_and_starts_every_index_on_a_new_port(kube, cluster, job_runner):
    job_runner.group_restart = "always"   # as for torchrun (here without torch)
    cluster.secret()
    cluster.configmap("group")
    cluster.pvc("group-cache")
    job_runner.fail_next("group", index=1, exit_code=1, delay=0.3)
    cluster.job(job_manifest("group", cache_claim="group-cache", hold="0"))
    wait_for(lambda: len(job_runner.pods_started("group")) == 4, timeout=10)   # both indexes again
    (job_runner.pvc_dir("group-cache") / "go").touch()
    job = wait_for(lambda: condition(kube.get(JOBS, NS, "group"), "Complete") and kube.get(JOBS, NS, "group"))
    assert job["status"]["failed"] == 2     # the shim's exit 1 and the killed peer, as on a cluster
    info = job_runner.pod_info("group")
    assert [(i["index"], i["shim"], i["exit_code"]) for i in info] == \
        [(0, None, 143), (1, (1, 0.3), 1), (0, None, 0), (1, None, 0)]
    peer = job_pods(kube, "group")[0]
    assert terminated(peer)["exitCode"] == 143 and "group restart" in terminated(peer)["message"]
    ports = [i["env"]["PET_MASTER_PORT"] for i in info]
    assert ports[0] == ports[1] != ports[2] == ports[3]   # a new port for the new run
    assert info[3]["argv"][-3] == f"--master-port={ports[3]}"


def test_deadline_and_deletion(kube, cluster, job_runner):
    cluster.secret()
    cluster.configmap("slow")
    cluster.configmap("gone")
    cluster.job(job_manifest("slow", completions=1, deadline=1, hold="0"))
    cluster.job(job_manifest("gone", completions=1, hold="0"))
    job = wait_for(lambda: condition(kube.get(JOBS, NS, "slow"), "Failed") and kube.get(JOBS, NS, "slow"))
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded"
    assert job_runner.running("slow") == {}
    wait_for(lambda: job_runner.running("gone"))
    cluster.batch.delete_namespaced_job("gone", NS, propagation_policy="Background")
    wait_for(lambda: not job_runner.running("gone"))
    wait_for(lambda: not job_pods(kube, "gone"))   # collected with its Job


def test_a_job_created_suspended_waits_and_a_disrupted_pod_is_not_counted(kube, cluster, job_runner):
    cluster.secret()
    cluster.configmap("later")
    cluster.pvc("later-cache")
    cluster.job(job_manifest("later", completions=1, cache_claim="later-cache", suspend=True, hold="0"))
    job = wait_for(lambda: condition(kube.get(JOBS, NS, "later"), "Suspended") and kube.get(JOBS, NS, "later"))
    assert "startTime" not in job["status"] and not job_pods(kube, "later")
    cluster.suspend("later", False)
    wait_for(lambda: job_runner.running("later"))
    job_runner.disrupt("later", index=0)   # test hook: a DisruptionTarget condition, then killed
    wait_for(lambda: len(job_runner.pods_started("later")) == 2)
    (job_runner.pvc_dir("later-cache") / "go").touch()
    job = wait_for(lambda: condition(kube.get(JOBS, NS, "later"), "Complete") and kube.get(JOBS, NS, "later"))
    assert not job["status"].get("failed")   # the podFailurePolicy Ignore rule
    disrupted = job_pods(kube, "later")[0]
    assert disrupted["status"]["phase"] == "Failed" and condition(disrupted, "DisruptionTarget")
