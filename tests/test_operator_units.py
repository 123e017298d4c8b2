"""Operator logic without a cluster: the manifest builders and the status derivation."""
import pytest
import yaml

from kubelora_operator import manifests
from kubelora_operator import status as st
from kubelora_trainer.spec import parse_spec

SPEC = {
    "model": {"type": "flux", "diffusersPath": "s3://models/flux-dev"},
    "dataset": {"uri": "s3://data/shapes"},
    "output": {"uri": "s3://out/run1"},
    "storage": {"endpoint": "http://minio.minio:9000", "credentialsSecret": "s3-creds"},
    "resources": {"nodes": 3, "gpusPerNode": 8, "nodeSelector": {"gpu": "h100"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  "priorityClassName": "training", "schedulerName": "volcano", "limits": {"memory": "900Gi"}},
    "runPolicy": {"backoffLimit": 2, "activeDeadlineSeconds": 86400},
}


def build(**over):
    spec = parse_spec({**SPEC, **over})
    return manifests.children("ft", "uid-1", "ml", spec, manifests.OperatorConfig(image="reg/trainer:1"))


def test_children_are_owned_labelled_and_ordered():
    cm, svc, job = build()
    assert [o["kind"] for o in (cm, svc, job)] == ["ConfigMap", "Service", "Job"]
    for o in (cm, svc, job):
        assert o["metadata"]["ownerReferences"] == [{"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                                     "name": "ft", "uid": "uid-1", "controller": True,
                                                     "blockOwnerDeletion": True}]
        assert o["metadata"]["labels"]["kubelora.dev/job"] == "ft" and o["metadata"]["namespace"] == "ml"
    resolved = yaml.safe_load(cm["data"]["spec.yaml"])
    assert resolved["kind"] == "LoRATrainingJob" and resolved["spec"]["adapter"]["rank"] == 16  # defaults resolved
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]


def test_indexed_job_shape():
    job = build()[2]
    s = job["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"]) == ("Indexed", 3, 3)
    assert s["backoffLimit"] == 2 * 3  # two retries of the run; a failed run fails all 3 pods
    assert s["activeDeadlineSeconds"] == 86400 and s["suspend"] is False
    rules = s["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2]
    # a peer of a preempted pod stops with a checkpoint and exits 3: ignored like the disruption itself
    assert rules[2]["action"] == "Ignore" and rules[2]["onExitCodes"]["values"] == [3]
    pod = s["template"]["spec"]
    assert pod["subdomain"] == "ft-workers" and pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 120  # time to finish the step and checkpoint on SIGTERM
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["nodeSelector"], pod["priorityClassName"], pod["schedulerName"]) == ({"gpu": "h100"}, "training", "volcano")
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    c = pod["containers"][0]
    assert c["image"] == "reg/trainer:1" and c["command"] == ["python", "-m", "kubelora_trainer", "launch"]
    assert c["resources"]["limits"] == {"memory": "900Gi", "nvidia.com/gpu": "8"}
    env = {e["name"]: e for e in c["env"]}
    assert env["PET_NNODES"]["value"] == "3" and env["PET_NPROC_PER_NODE"]["value"] == "8"
    assert env["PET_MASTER_ADDR"]["value"] == "ft-0.ft-workers.ml.svc"
    assert "job-completion-index" in env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio:9000"
    assert "envFrom" not in c   # every key of the Secret (PYTHONPATH, LD_PRELOAD...) would reach the trainer
    assert {k: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"].get("optional", False))
            for k, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})} == {
        "AWS_ACCESS_KEY_ID": ("s3-creds", False), "AWS_SECRET_ACCESS_KEY": ("s3-creds", False),
        "AWS_SESSION_TOKEN": ("s3-creds", True)}
    assert "--node-rank=$(PET_NODE_RANK)" in c["args"] and c["args"][-2:] == ["--spec", "/etc/kubelora/spec.yaml"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory" and vols["cache"] == {"name": "cache", "emptyDir": {}}
    # /tmp bounded: a runaway write evicts this pod, not the node's other tenants (DiskPressure)
    assert vols["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}
    assert vols["spec"]["configMap"]["name"] == "ft-spec"


def test_cache_pvc_and_cpu_only():
    job = build(resources={"nodes": 1, "gpusPerNode": 0, "cacheVolumeClaim": "model-cache"})[2]
    pod = job["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["cache"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
    c = pod["containers"][0]
    assert "nvidia.com/gpu" not in str(c.get("resources")) and {"name": "KUBELORA_FORCE_CPU", "value": "1"} in c["env"]


def _job(conds=(), active=0):
    return {"status": {"active": active, "conditions": [{"type": t, "status": "True", **extra} for t, extra in conds]}}


def _pod(name="ft-0-abc", phase="Running", waiting=None, terminated=None):
    state = {"waiting": waiting} if waiting else {"terminated": terminated} if terminated else {"running": {}}
    return {"metadata": {"name": name}, "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}


def test_observe_phases():
    assert st.observe(None, [], None, None, False).phase == st.PENDING
    assert st.observe(_job(), [], None, None, False).reason == "WaitingForPods"
    assert st.observe(_job(active=2), [_pod()], None, None, False).phase == st.INITIALIZING
    prog = {"phase": "Training", "step": 5, "totalSteps": 40, "loss": 0.3}
    o = st.observe(_job(active=2), [_pod()], prog, None, False)
    assert o.phase == st.TRAINING and st.progress_summary(o.progress)["summary"] == "5/40"
    assert st.observe(_job([("Suspended", {})]), [], None, None, True).phase == st.SUSPENDED
    assert st.observe(_job([("Complete", {})]), [], None, None, False).phase == st.EXPORTING
    manifest = {"artifacts": [{"uri": "s3://o/lora.safetensors", "format": "diffusers", "sha256": "ab", "size": 3}],
                "metrics": {"finalLoss": 0.25}}
    o = st.observe(_job([("Complete", {})]), [], None, manifest, False)
    assert o.phase == st.SUCCEEDED and o.artifacts[0]["sha256"] == "ab" and "final loss 0.2500" in o.message


def test_pods_are_read_only_when_they_can_explain_something():
    assert not st.needs_pods({"status": {"active": 2, "ready": 2}})
    assert st.needs_pods({"status": {"active": 2, "ready": 1}})          # one not ready: why?
    assert st.needs_pods({"status": {"active": 2, "ready": 2, "failed": 1}})
    assert st.needs_pods(_job([("Failed", {})]))
    assert not st.needs_pods(_job([("Complete", {})]))


def test_failure_reasons_name_the_pod_and_cause():
    oom = _pod(phase="Failed", terminated={"reason": "OOMKilled", "exitCode": 137})
    o = st.observe(_job([("Failed", {"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})]),
                   [oom], None, None, False)
    assert o.phase == st.FAILED and o.reason == "OOMKilled" and "ft-0-abc" in o.message and o.stalled
    pull = _pod(phase="Pending", waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "reg/nope:1"'})
    o = st.observe(_job(active=1), [pull], None, None, False)
    assert (o.phase, o.reason, o.stalled) == (st.PENDING, "ImagePullBackOff", True) and "reg/nope:1" in o.message
    o = st.observe(_job([("Failed", {"reason": "PodFailurePolicy"})]),
                   [_pod(phase="Failed", terminated={"reason": "Error", "exitCode": 2})], None, None, False)
    assert o.reason == "Error" and "exited with code 2" in o.message


def test_conditions_for_kstatus_and_transition_times():
    obs = st.Observed(st.TRAINING, "Training", "training")
    c1 = {c["type"]: c for c in st.conditions([], obs, 3, "2026-01-01T00:00:00Z")}
    assert (c1["Ready"]["status"], c1["Reconciling"]["status"], c1["Stalled"]["status"]) == ("False", "True", "False")
    assert all(c["observedGeneration"] == 3 for c in c1.values())
    c2 = {c["type"]: c for c in st.conditions(list(c1.values()), st.Observed(st.SUCCEEDED, "Published", "ok"), 3,
                                               "2026-01-01T01:00:00Z")}
    assert c2["Ready"]["status"] == "True" and c2["Ready"]["lastTransitionTime"] == "2026-01-01T01:00:00Z"
    assert c2["Stalled"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"  # unchanged status keeps its time
    failed = st.invalid({}, "InvalidSpec", "spec.adapter.rank: ...", 1, "2026-01-01T00:00:00Z")
    assert failed["phase"] == "Failed" and failed["completionTime"]
    assert {c["type"]: c["status"] for c in failed["conditions"]} == {"Ready": "False", "Reconciling": "False",
                                                                      "Stalled": "True", "Suspended": "False"}


def test_operator_imports_without_torch():
    import subprocess
    import sys
    code = "import sys, kubelora_operator.handlers, kubelora_operator.manifests; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ownership_of_an_existing_child():
    from kubelora_operator.kube import ownership
    mine = {"metadata": {"ownerReferences": [{"kind": "LoRATrainingJob", "name": "a", "uid": "u1"}]}}
    assert ownership(mine, "u1") == "ours"
    assert ownership(mine, "u2") == "stale"          # a deleted LoRATrainingJob of the same name
    assert ownership({"metadata": {}}, "u1") == "foreign"
    assert ownership({"metadata": {"ownerReferences": [{"kind": "Deployment", "uid": "x"}]}}, "u1") == "foreign"


def test_local_paths_only_on_the_cache_volume_in_a_cluster():
    from kubelora_operator.manifests import CACHE_MOUNT, cluster_problem
    from kubelora_trainer.spec import parse_spec
    base = {"model": {"type": "flux", "diffusersPath": "s3://models/flux"}, "dataset": {"uri": "s3://data/set"},
            "output": {"uri": "s3://out/run"}}
    assert cluster_problem(parse_spec(base)) is None
    assert "dataset.uri: '/data' is a path inside the trainer pod" in cluster_problem(
        parse_spec({**base, "dataset": {"uri": "/data"}}))
    assert "dataset.sources[0].maskUri: '/masks' is a path inside the trainer pod" in cluster_problem(
        parse_spec({**base, "dataset": {"sources": [{"uri": "s3://data/set", "maskUri": "/masks"}]}}))
    assert "dataset.cacheUri: '/shared' is a path inside the trainer pod, where the shared cache would be lost" in \
        cluster_problem(parse_spec({**base, "dataset": {"uri": "s3://data/set", "cacheUri": "/shared"}}))
    on_pvc = {**base, "dataset": {"uri": f"{CACHE_MOUNT}/data"}}
    assert "dataset.uri" in cluster_problem(parse_spec(on_pvc))
    assert cluster_problem(parse_spec({**on_pvc, "resources": {"cacheVolumeClaim": "shared"}})) is None
    # the operator reads progress and manifest.json from output.uri: it must be S3, claim or not
    out_on_pvc = {**base, "output": {"uri": f"{CACHE_MOUNT}/out"}, "resources": {"cacheVolumeClaim": "shared"}}
    assert "output.uri: '/var/cache/kubelora/out' is on the cache volume claim, which the operator does not mount" \
        in cluster_problem(parse_spec(out_on_pvc))
    # a cache-only job whose cache would go with the pod (its emptyDir): refused; kept somewhere: fine
    cache_only = {**base, "dataset": {"uri": "s3://data/set", "cacheOnly": True}}
    assert "dataset.cacheOnly: the cache would be built in the pod's emptyDir" in cluster_problem(parse_spec(cache_only))
    assert cluster_problem(parse_spec({**cache_only, "resources": {"cacheVolumeClaim": "shared"}})) is None
    assert cluster_problem(parse_spec({**cache_only, "dataset": {**cache_only["dataset"], "cacheUri": "s3://cache/x"}})) is None


def test_pods_waiting_for_gpus_are_pending_with_the_schedulers_message():
    """Job.status.active counts Pending pods: a pod the scheduler cannot place is not 'staging in'."""
    pending = {"metadata": {"name": "ft-1-xyz"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}}
    o = st.observe(_job(active=2), [_pod(), pending], None, None, False)
    assert (o.phase, o.reason) == (st.PENDING, "Unschedulable")
    assert o.message == "pod ft-1-xyz is not scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    assert st.observe(_job(active=2), [_pod()], None, None, False).phase == st.INITIALIZING


def test_a_failed_pod_of_a_multi_node_run_restarts_the_whole_gang():
    failed = {"status": {"active": 1, "failed": 1}}
    assert st.gang_action(failed, nodes=2, restarts=0, backoff_limit=2) == "restart"
    assert st.gang_action(failed, nodes=2, restarts=2, backoff_limit=2) == "fail"
    assert st.gang_action(failed, nodes=1, restarts=0, backoff_limit=2) is None      # the Job's own retry is right
    assert st.gang_action({"status": {"active": 2}}, nodes=2, restarts=0, backoff_limit=2) is None
    done = {"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}}
    assert st.gang_action(done, nodes=2, restarts=0, backoff_limit=2) is None       # FailJob (bad input): no restart


def test_a_failure_after_a_disruption_restarts_the_gang_without_counting():
    failed = {"status": {"active": 1, "failed": 1}}
    lost = {"metadata": {"name": "ft-1-abc"}, "status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "False"},
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
         "message": "Taint manager: deleting due to NoExecute taint"}]}}
    crashed = {"metadata": {"name": "ft-0-abc"}, "status": {"phase": "Failed"}}
    why = st.disrupted([crashed, lost])
    assert why == "pod ft-1-abc: DeletionByTaintManager: Taint manager: deleting due to NoExecute taint"
    assert st.disrupted([crashed]) is None
    assert st.disrupted([{"metadata": {"name": "p"}, "status": {"conditions": [
        {"type": "DisruptionTarget", "status": "False"}]}}]) is None
    assert st.gang_action(failed, nodes=2, restarts=2, backoff_limit=2, disruption=why) == "restart_uncounted"
    assert st.gang_action(failed, nodes=2, restarts=2, backoff_limit=2, disruption=None) == "fail"
    assert st.gang_action({"status": {"active": 2}}, nodes=2, restarts=0, backoff_limit=2, disruption=why) is None
    assert st.counted_restarts({"restarts": 3, "disruptionRestarts": 2}) == 1
    assert st.counted_restarts({}) == 0


def test_status_progress_says_which_checkpoint_the_run_resumed_from():
    assert st.progress_summary({"step": 7, "totalSteps": 8, "resumedFrom": 6})["resumedFrom"] == 6


def test_status_progress_leaves_out_numbers_json_cannot_hold():
    import json
    prog = st.progress_summary({"step": 7, "totalSteps": 8, "evalLoss": float("nan"), "evalStep": 6,
                                "loss": float("inf"), "samplesPerSecond": float("-inf"), "gpuPeakGiB": 1.5})
    json.dumps(prog, allow_nan=False)   # the API server refuses the whole status patch otherwise
    assert prog == {"step": 7, "totalSteps": 8, "evalStep": 6, "gpuPeakGiB": 1.5, "summary": "7/8"}


def _ltj(name="ft", ns="ml", uid="u1", rv="10", generation=1, status=None, spec=None, deleting=False):
    meta = {"name": name, "namespace": ns, "uid": uid, "resourceVersion": rv, "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob", "metadata": meta,
            "spec": spec or {}, "status": status or {}}


def test_a_trainer_job_maps_to_its_owner_and_nothing_else_does():
    from kubelora_operator.syncer import owner_key
    ours = build()[2]
    assert owner_key(ours) == ("ml", "ft")
    assert owner_key({"metadata": {"namespace": "ml", "labels": {"kubelora.dev/job": "ft"}}}) is None  # label only
    other = {"metadata": {"namespace": "ml", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob",
                                                                   "name": "ft", "controller": True}]}}
    assert owner_key(other) is None


def test_the_remembered_job_never_goes_back_to_an_older_state():
    """Our status patch's response can be newer than a watch event that arrives after it: the
    older state must not come back (the next sync would count a gang restart twice)."""
    from kubelora_operator.syncer import Owners, newer
    owners = Owners()
    owners.remember(_ltj(rv="10"))
    owners.remember(_ltj(rv="12", status={"restarts": 1, "restartPending": True}))   # our patch's response
    owners.remember(_ltj(rv="11", status={}))                                         # a late watch event
    assert owners.get(("ml", "ft"))["status"] == {"restarts": 1, "restartPending": True}
    assert newer(_ltj(uid="u2", rv="1"), _ltj(uid="u1", rv="99"))  # a new job of the same name
    assert newer(_ltj(rv="abc"), _ltj(rv="12"))                    # not integers: the newest event wins
    owners.forget(_ltj(uid="other"))
    assert owners.get(("ml", "ft")) is not None                    # another object's DELETED
    owners.forget(_ltj())
    assert owners.get(("ml", "ft")) is None


def test_which_events_and_ticks_sync_a_job():
    from kubelora_operator.syncer import needs_polling, wants_sync
    pending = _ltj(status={"phase": "Pending"})
    assert wants_sync(None, pending)                                   # first seen (operator start)
    assert not wants_sync(pending, _ltj(rv="11", status={"phase": "Pending", "message": "x"}))  # our own patch
    assert wants_sync(pending, _ltj(rv="11", status={"phase": "Training"}))
    assert wants_sync(pending, _ltj(rv="11", generation=2, status={"phase": "Pending"}))        # suspend changed
    assert not wants_sync(None, _ltj(deleting=True))
    for phase in ("Pending", "Initializing", "Training", "Exporting"):
        assert needs_polling(_ltj(status={"phase": phase}))
    assert not needs_polling(_ltj(status={"phase": "Training"}, deleting=True))
    assert needs_polling(_ltj(status={}))       # not made yet: made by the sync if kopf does not (a copied annotation)
    assert not needs_polling(_ltj(status={"phase": "Suspended"}))       # resumes through events
    done = {"phase": "Succeeded", "completionTime": "2026-01-01T00:00:00Z"}
    assert not needs_polling(_ltj(status=done))
    ttl = {"runPolicy": {"ttlSecondsAfterFinished": 60}}
    assert needs_polling(_ltj(status=done, spec=ttl))                   # the TTL is still to run
    assert not needs_polling(_ltj(status={**done, "childrenDeleted": True}, spec=ttl))


def test_the_work_queue_runs_a_key_once_at_a_time_and_again_when_it_changed_meanwhile():
    import asyncio
    import threading
    from kubelora_operator.syncer import WorkQueue

    async def scenario():
        started, release = threading.Event(), threading.Event()
        runs, active, overlap = [], [], []

        def process(key):
            if active:
                overlap.append(key)
            active.append(key)
            runs.append(key)
            if key == ("ns", "slow") and len(runs) == 1:
                started.set()
                release.wait(30)
            if key == ("ns", "bad"):
                active.remove(key)
                raise RuntimeError("a failing sync")
            active.remove(key)

        q = WorkQueue(process, workers=1)
        q.start()
        q.add(("ns", "slow"))
        await asyncio.to_thread(started.wait, 30)
        q.add(("ns", "slow"))           # changed while it runs: once more afterwards
        q.add(("ns", "slow"))           # ... but only once
        q.add(("ns", "bad"))
        q.add(("ns", "bad"))            # already queued: nothing
        release.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not q.idle() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert q.idle()
        q.add(("ns", "after-bad"))      # the worker survived the failing sync
        while not q.idle() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        failed = set(q.failed)          # kept for the ticker to add again, whatever the job's phase
        await q.stop()
        q.add(("ns", "late"))           # stopped: ignored
        return runs, overlap, failed

    runs, overlap, failed = asyncio.run(scenario())
    assert runs == [("ns", "slow"), ("ns", "bad"), ("ns", "slow"), ("ns", "after-bad")], runs
    assert overlap == [] and failed == {("ns", "bad")}


async def _until_idle(q, seconds: float = 30) -> None:
    import asyncio
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not q.idle() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert q.idle()


def test_a_watch_events_key_goes_before_the_tickers_polls_and_runs_once():
    """With hundreds of active jobs the ticker queues them all every interval; an event (a job made,
    a gang's pod failed) used to wait behind that whole round. Urgent keys go first; a key polled
    and then urgent runs once, at its urgent place; one queued urgent is not moved back by a poll."""
    import asyncio
    import threading
    from kubelora_operator.syncer import WorkQueue

    async def scenario():
        started, release, runs = threading.Event(), threading.Event(), []

        def process(key):
            runs.append(key[1])
            if key[1] == "busy":
                started.set()
                release.wait(30)
        q = WorkQueue(process, workers=1)
        q.start()
        q.add(("ns", "busy"))
        await asyncio.to_thread(started.wait, 30)
        for name in ("p1", "p2", "p3"):
            q.add(("ns", name))                  # the ticker's round
        q.add(("ns", "p3"), urgent=True)         # p3's Job failed: ahead of the round, once
        q.add(("ns", "event"), urgent=True)
        q.add(("ns", "event"))                   # a poll of it meanwhile: it stays ahead
        release.set()
        await _until_idle(q)
        await q.stop()
        return runs

    assert asyncio.run(scenario()) == ["busy", "p3", "event", "p1", "p2"]


def test_the_credentials_secret_is_read_once_per_ttl_and_a_missing_one_every_time():
    from kubelora_operator.kube import TTLCache
    now = [0.0]
    cache = TTLCache(60, clock=lambda: now[0])
    reads = []

    def load(value):
        def read():
            reads.append(value)
            return value
        return read

    assert cache.get(("ml", "s3"), load({"k": "1"})) == {"k": "1"}
    now[0] = 59
    assert cache.get(("ml", "s3"), load({"k": "2"})) == {"k": "1"} and len(reads) == 1
    now[0] = 61
    assert cache.get(("ml", "s3"), load({"k": "2"})) == {"k": "2"} and len(reads) == 2   # rotated: within a TTL
    assert cache.get(("ml", "gone"), load(None)) is None
    assert cache.get(("ml", "gone"), load({"k": "3"})) == {"k": "3"}                      # applied later: next sync
    now[0] = 200                                   # a load drops what has expired: no old credentials kept
    cache.get(("ml", "other"), load({"k": "4"}))
    assert set(cache._entries) == {("ml", "other")}


def test_a_missing_secret_is_named_from_the_pods_own_message():
    waiting = _pod(phase="Pending", waiting={"reason": "CreateContainerConfigError",
                                             "message": 'secret "s3-creds" not found'})
    o = st.observe(_job(active=1), [waiting], None, None, False)
    assert (o.phase, o.reason, o.stalled) == (st.PENDING, "CreateContainerConfigError", True)
    named = st.name_missing_secret(o, "s3-creds")
    assert named.message.startswith('pod ft-0-abc: secret "s3-creds" not found (spec.storage.credentialsSecret')
    assert "AWS_ACCESS_KEY_ID" in named.message and named.stalled
    assert st.name_missing_secret(o, "other") is o and st.name_missing_secret(o, None) is o
    # the Secret is there but lacks a key the pods take by name (secretKeyRef)
    keyless = _pod(phase="Pending", waiting={"reason": "CreateContainerConfigError",
                                             "message": "couldn't find key AWS_ACCESS_KEY_ID in Secret ml/s3-creds"})
    o = st.observe(_job(active=1), [keyless], None, None, False)
    named = st.name_missing_secret(o, "s3-creds")
    assert "couldn't find key AWS_ACCESS_KEY_ID in Secret ml/s3-creds (spec.storage.credentialsSecret: the trainer " \
           "pods take its keys" in named.message and named.stalled
    assert st.name_missing_secret(o, "other") is o


def test_an_unreadable_bucket_keeps_the_last_reported_phase():
    assert st.last_reported({"phase": "Training"}) == {"phase": "Training"}
    assert st.last_reported({"phase": "Pending"}) is None
    o = st.observe(_job(active=1), [_pod()], st.last_reported({"phase": "Training"}), None, False)
    assert o.phase == st.TRAINING


def test_events_name_the_job_and_fit_the_api_servers_limit():
    body = {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
            "metadata": {"name": "ft", "namespace": "ml", "uid": "u1"}}
    e = manifests.event(body, "Warning", "GangRestart", "x" * 5000, "2026-01-01T00:00:00Z", "op-7d9f")
    assert e["involvedObject"] == {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob", "name": "ft",
                                   "namespace": "ml", "uid": "u1"}
    assert e["metadata"] == {"generateName": "ft.", "namespace": "ml"} and len(e["message"]) == 1024
    assert (e["type"], e["reason"], e["reportingInstance"]) == ("Warning", "GangRestart", "op-7d9f")


def test_several_nodes_need_a_cache_claim_they_can_all_mount():
    from kubelora_operator.manifests import volume_problem
    from kubelora_trainer.spec import parse_spec

    def spec(nodes, claim="cache"):
        return parse_spec({"model": {"type": "flux", "diffusersPath": "s3://models/f"}, "dataset": {"uri": "s3://data/s"},
                           "output": {"uri": "s3://out/r"}, "resources": {"nodes": nodes, "cacheVolumeClaim": claim}})
    assert "claim 'cache' is ReadWriteOnce, so the 2 nodes' pods" in volume_problem(spec(2), ["ReadWriteOnce"])
    assert "ReadWriteMany claim" in volume_problem(spec(3), ["ReadOnlyMany"])  # the cache is written
    assert volume_problem(spec(2), ["ReadWriteOnce", "ReadWriteMany"]) is None
    assert volume_problem(spec(1), ["ReadWriteOncePod"]) is None  # one node, one pod
    assert volume_problem(spec(2), None) is None  # no such claim: the pods say so
    assert volume_problem(spec(2, None), ["ReadWriteOnce"]) is None


def test_kueue_labels_reach_the_job_which_is_created_suspended_for_kueue_to_admit():
    spec = parse_spec(SPEC)
    cfg = manifests.OperatorConfig(image="reg/trainer:1")
    owner = {"kueue.x-k8s.io/queue-name": "gpu-queue", "kueue.x-k8s.io/priority-class": "high", "team": "ml"}
    job = manifests.children("ft", "uid-1", "ml", spec, cfg, owner)[2]
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue" and labels["kueue.x-k8s.io/priority-class"] == "high"
    assert "team" not in labels and "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    assert job["spec"]["suspend"] is True  # Kueue unsuspends it on admission
    # Kueue's priority without the label: the pod template's priorityClassName
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "training"
    # no queue: the operator owns suspend (runPolicy.suspend)
    assert manifests.job("ft", "u", "ml", spec, cfg, {"team": "ml"})["spec"]["suspend"] is False
    assert manifests.kueue_queue(owner) == "gpu-queue" and manifests.kueue_queue(None) is None


def test_a_job_held_by_kueue_is_pending_with_its_queue_named():
    held = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "gpu-queue"}}, "spec": {"suspend": True},
            "status": {"conditions": [{"type": "Suspended", "status": "True"}]}}
    o = st.observe(held, [], None, None, False, "gpu-queue")
    assert (o.phase, o.reason, o.stalled) == (st.PENDING, "QueuedInKueue", False)
    assert "waiting for Kueue admission in queue 'gpu-queue'" in o.message
    conds = {c["type"]: c["status"] for c in st.conditions([], o, 1, "t")}
    assert conds == {"Ready": "False", "Reconciling": "True", "Stalled": "False", "Suspended": "False"}
    # preempted after it had trained: said so, and that it resumes
    o = st.observe(held, [], {"phase": "Training", "step": 3}, None, False, "gpu-queue")
    assert o.reason == "QueuedInKueue" and "preempted" in o.message and "resumes" in o.message
    # admitted (unsuspended by Kueue): an ordinary run
    admitted = {"spec": {"suspend": False}, "status": {"active": 1, "ready": 1}}
    assert st.observe(admitted, [], None, None, False, "gpu-queue").phase == st.INITIALIZING


def test_a_finished_jobs_status_follows_a_new_generation():
    done = st.status({}, st.Observed(st.SUCCEEDED, "Published", "ok"), 1, None, "2026-01-01T00:00:00Z")
    assert st.follow_generation(done, 1) == {}
    patch = st.follow_generation(done, 2)
    assert patch["observedGeneration"] == 2 and all(c["observedGeneration"] == 2 for c in patch["conditions"])
    before = {c["type"]: c for c in done["conditions"]}
    for c in patch["conditions"]:  # nothing but the generation changes
        assert {**c, "observedGeneration": 1} == before[c["type"]]


def test_a_job_without_pods_past_the_grace_reads_why_they_were_refused():
    from datetime import datetime, timedelta, timezone
    now = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
    made = {"metadata": {"creationTimestamp": "2026-11-26T11:59:00Z"}, "spec": {}, "status": {}}
    assert st.awaits_pods(made, now, 30) and not st.awaits_pods(made, now - timedelta(seconds=45), 30)
    assert not st.awaits_pods({**made, "spec": {"suspend": True}}, now, 30)        # suspended, or queued in Kueue
    assert not st.awaits_pods({**made, "status": {"active": 1}}, now, 30)          # pods exist (maybe unscheduled)
    gang = {**made, "spec": {"parallelism": 4}, "status": {"active": 3}}
    assert st.awaits_pods(gang, now, 30)                                            # 3 of 4: one was refused
    assert not st.awaits_pods({**gang, "status": {"active": 3, "failed": 1}}, now, 30)
    pending = st.Observed(st.PENDING, "WaitingForPods", "waiting for the trainer pods to be scheduled")
    events = [{"message": "old refusal", "lastTimestamp": "2026-11-26T11:59:10Z"},
              {"message": 'pods "x-0" is forbidden: violates PodSecurity "restricted:latest"',
               "lastTimestamp": "2026-11-26T11:59:50Z"}]
    got = st.pods_refused(pending, events, made)
    assert (got.reason, got.stalled) == ("FailedCreate", True) and "violates PodSecurity" in got.message
    assert st.pods_refused(pending, [], made) is pending
    # a refusal the Job controller has not repeated for 10 minutes has passed
    assert st.recent(events, now) == events and st.recent(events, now + timedelta(minutes=10, seconds=30)) == []


def test_a_full_quota_is_a_wait_and_one_the_gang_never_fits_is_stalled():
    refusal = ('Error creating: pods "q-3-x" is forbidden: exceeded quota: gpu, requested: requests.nvidia.com/gpu=8,'
               'requests.memory=64Gi, used: requests.nvidia.com/gpu=24,requests.memory=1Ti, '
               'limited: requests.nvidia.com/gpu={gpus},requests.memory=2Ti')
    job = {"spec": {"parallelism": 4}, "status": {"active": 3}}
    init = st.Observed(st.INITIALIZING, "PodsStarting", "3 pods running")
    wait = st.pods_refused(init, [{"message": refusal.format(gpus=32)}], job)
    assert (wait.phase, wait.reason, wait.stalled) == (st.PENDING, "QuotaExceeded", False)
    assert wait.message.startswith("3 of 4 trainer pods were created") and "Kueue" in wait.message
    never = st.pods_refused(init, [{"message": refusal.format(gpus=24)}], job)
    assert (never.reason, never.stalled) == ("FailedCreate", True)
    assert "the 4 pod(s) ask 32, the quota allows 24" in never.message and "resources.nodes" in never.message
    assert st.quota_shortfall("exceeded quota: q, requested: cpu=500m, used: cpu=1, limited: cpu=2", 2) == []
    assert st.quota_shortfall("admission webhook denied", 2) is None
    assert [st.quantity(q) for q in ("8", "500m", "16Gi", "1e3")] == [8, 0.5, 16 * 2**30, 1000]


def test_operator_settings_read_empty_as_unset_and_refuse_garbage(monkeypatch):
    """helm upgrade --reuse-values over a chart that added a setting renders its variable empty:
    the default, not a crash at start."""
    import pytest
    from kubelora_operator import env
    monkeypatch.setenv("KUBELORA_X", "")
    assert env.number("KUBELORA_X", 60) == 60.0 and env.flag("KUBELORA_X") is False
    monkeypatch.setenv("KUBELORA_X", " 5 ")
    assert env.number("KUBELORA_X", 60) == 5.0
    monkeypatch.setenv("KUBELORA_X", "sixty")
    with pytest.raises(env.SettingError, match="KUBELORA_X='sixty' is not a number"):
        env.number("KUBELORA_X", 60)
    monkeypatch.setenv("KUBELORA_X", "True")
    assert env.flag("KUBELORA_X") is True
    monkeypatch.setenv("KUBELORA_X", "maybe")
    with pytest.raises(env.SettingError, match="not true or false"):
        env.flag("KUBELORA_X")


def test_a_new_gang_waits_for_the_old_pods_but_not_for_a_lost_nodes():
    from datetime import datetime, timezone
    now = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)

    def pod(name, phase="Running", deleted=None, grace=None):
        meta = {"name": name, **({"deletionTimestamp": deleted} if deleted else {}),
                **({"deletionGracePeriodSeconds": grace} if grace is not None else {})}
        return {"metadata": meta, "spec": {"terminationGracePeriodSeconds": 120}, "status": {"phase": phase}}
    # deletionTimestamp is when the grace period ends (the API server's request time + grace)
    pods = [pod("not-collected-yet"), pod("checkpointing", deleted="2026-11-27T12:01:00Z", grace=120),
            pod("just-ended", deleted="2026-11-27T11:59:50Z", grace=120),
            pod("lost-node", deleted="2026-11-27T11:50:00Z", grace=120), pod("crashed", "Failed")]
    assert st.lingering(pods, now) == ["not-collected-yet", "checkpointing", "just-ended"]
    assert st.lingering([], now) == []
    # within a long grace period (up to an hour) on a Node that reads lost now: not waited for
    on = lambda p, node: {**p, "spec": {**p["spec"], "nodeName": node}}  # noqa: E731
    late = [on(pod("long-grace", deleted="2026-11-27T12:59:00Z", grace=3600), "gpu-7"),
            on(pod("healthy", deleted="2026-11-27T12:01:00Z", grace=120), "gpu-1"),
            on(pod("gone-node", deleted="2026-11-27T12:59:00Z", grace=3600), "gpu-9")]
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    unknown = {"status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}}
    assert st.lingering(late, now) == ["long-grace", "healthy", "gone-node"]
    assert st.lingering(late, now, nodes={"gpu-7": unknown, "gpu-1": ready, "gpu-9": None}) == ["healthy"]
    assert st.lingering(late, now, nodes={"gpu-7": ready, "gpu-1": ready, "gpu-9": ready}) == [
        "long-grace", "healthy", "gone-node"]
    # the handlers read Nodes for a multi-node run only (a single node's pod cut off by a partition may
    # still train and checkpoint): a predecessor's node count from its pods' completion indexes
    idx = lambda name, i: {"metadata": {"name": name, "labels": {"batch.kubernetes.io/job-completion-index": i}}}  # noqa: E731
    assert st.gang_size([idx("a-0-x", "0"), idx("a-0-y", "0")]) == 1 and st.gang_size([idx("a", "0"), idx("b", "1")]) == 2


def test_a_shared_clusters_operator_settings_refuse_borrowed_credentials_and_other_endpoints():
    own = parse_spec(SPEC)  # names its credentialsSecret and http://minio.minio:9000
    bare = parse_spec({**SPEC, "storage": {"endpoint": "http://10.0.0.1:80"}})
    assert manifests.tenancy_problem(own, True, ("http://minio.minio:9000/",)) is None
    assert manifests.tenancy_problem(bare, False, ()) is None
    assert "spec.storage.credentialsSecret is required" in manifests.tenancy_problem(bare, True, ())
    msg = manifests.tenancy_problem(bare, False, ("http://minio.minio:9000",))
    assert "spec.storage.endpoint: 'http://10.0.0.1:80' is not one this cluster allows" in msg
    # the trainer image and the ServiceAccount a tenant names: the operator and the Job controller make
    # the pods, so admission policies keyed on who asked never see the tenant
    images, accounts = ("registry.corp/ml/", "ghcr.io/kubelora/trainer:0.1.0"), ("trainer",)
    res = lambda **r: parse_spec({**SPEC, "resources": r})  # noqa: E731
    for ok in (res(), res(image="registry.corp/ml/trainer:2"), res(image="ghcr.io/kubelora/trainer:0.1.0"),
               res(serviceAccountName="trainer")):
        assert manifests.tenancy_problem(ok, False, (), images, accounts) is None
    for image in ("registry.corp/ml-evil/x:1", "ghcr.io/kubelora/trainer:0.1.0-evil", "docker.io/me/miner"):
        msg = manifests.tenancy_problem(res(image=image), False, (), images, accounts)
        assert msg.startswith(f"spec.resources.image: {image!r} is not from a registry this cluster allows"), msg
    msg = manifests.tenancy_problem(res(serviceAccountName="admin"), False, (), images, accounts)
    assert msg.startswith("spec.resources.serviceAccountName: 'admin' is not one this cluster lets jobs run as"), msg
    assert manifests.tenancy_problem(res(image="docker.io/me/miner", serviceAccountName="admin"), False, ()) is None


def test_trainer_pods_leave_the_uid_to_the_platform_when_told(monkeypatch):
    from kubelora_operator import env, handlers
    for value, want in (("platform", None), ("", 1000), ("2000", 2000)):
        monkeypatch.setenv("KUBELORA_TRAINER_RUN_AS_USER", value)
        assert env.user("KUBELORA_TRAINER_RUN_AS_USER", 1000) == want
    monkeypatch.setenv("KUBELORA_TRAINER_RUN_AS_USER", "platform")
    monkeypatch.setenv("KUBELORA_TRAINER_SHM_SIZE", "64Gi")
    cfg = handlers.operator_config()
    spec = parse_spec(SPEC)
    job = manifests.children("ft", "uid-1", "ml", spec, cfg)[2]
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    # with the uid set, a cache claim's files are chowned only when its root does not match (not at
    # every pod start: minutes for a large latent cache)
    monkeypatch.setenv("KUBELORA_TRAINER_RUN_AS_USER", "1000")
    pod = manifests.children("ft", "uid-1", "ml", spec, handlers.operator_config())[2]["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == 1000 and pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_a_mig_profile_and_a_workload_identity_service_account_reach_the_pods():
    spec = parse_spec({**SPEC, "resources": {**SPEC["resources"], "gpuResource": "nvidia.com/mig-3g.40gb",
                                             "serviceAccountName": "s3-reader"}})
    pod = manifests.children("ft", "uid-1", "ml", spec, manifests.OperatorConfig())[2]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == "8" and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert pod["serviceAccountName"] == "s3-reader" and pod["automountServiceAccountToken"] is False
    import pytest
    from kubelora_trainer.spec import SpecError
    with pytest.raises(SpecError, match="resources.limits\\['nvidia.com/mig-3g.40gb'\\] is set from resources.gpusPerNode"):
        parse_spec({**SPEC, "resources": {"gpuResource": "nvidia.com/mig-3g.40gb",
                                          "limits": {"nvidia.com/mig-3g.40gb": "1"}}})


def test_which_refused_creates_are_waited_for():
    from kubelora_operator.kube import deferrable
    quota = 'services "x-workers" is forbidden: exceeded quota: svc, requested: count/services=1'
    assert deferrable(403, quota) and deferrable(429, "Too Many Requests") and deferrable(408, "timeout")
    assert not deferrable(403, 'jobs.batch is forbidden: User "system:serviceaccount:kl:kl" cannot create')
    assert not deferrable(422, "Job.batch is invalid")


def test_a_secret_rbac_does_not_let_the_operator_read_is_said_not_raised(monkeypatch):
    """RBAC is not emulated (every request is allowed there): the 403 the real API server answers
    for a Secret outside rbac.secretNames is stood in for at the kube.secret_data boundary."""
    from kubelora_operator import handlers, kube

    def forbidden(namespace, name):
        raise kube.SecretForbidden(name)
    monkeypatch.setattr(kube, "secret_data", forbidden)
    settings, error = handlers._settings(parse_spec(SPEC), "ml")
    assert "the operator may not read Secret 's3-creds'" in error and "rbac.secretNames" in error


def _node(name, ready, reason=None):
    conds = [{"type": "MemoryPressure", "status": "False"}]
    if ready is not None:
        conds.append({"type": "Ready", "status": ready, **({"reason": reason} if reason else {})})
    return {"metadata": {"name": name}, "status": {"conditions": conds}}


def test_a_gang_failure_while_a_pods_node_is_not_ready_is_a_disruption():
    """The peers of a lost node's pod fail (exit 1) minutes before the taint manager marks that pod
    DisruptionTarget; the node's Ready condition (Unknown within ~40 s) or its removal tells it."""
    crashed = {"metadata": {"name": "ft-0-abc"}, "spec": {"nodeName": "gpu-a"}, "status": {"phase": "Failed"}}
    stuck = {"metadata": {"name": "ft-1-abc"}, "spec": {"nodeName": "gpu-b"}, "status": {"phase": "Running"}}
    pending = {"metadata": {"name": "ft-2-abc"}, "spec": {}, "status": {"phase": "Pending"}}
    pods = [stuck, pending, crashed]
    assert st.pod_nodes(pods) == ["gpu-a", "gpu-b"]
    ready = {"gpu-a": _node("gpu-a", "True"), "gpu-b": _node("gpu-b", "True")}
    assert st.node_lost(pods, ready) is None
    unknown = {**ready, "gpu-b": _node("gpu-b", "Unknown", "NodeStatusUnknown")}
    assert st.node_lost(pods, unknown) == "pod ft-1-abc on node gpu-b: node Ready=Unknown (NodeStatusUnknown)"
    # the pod that failed was reported by its kubelet: its node's Ready=False (PLEG, a runtime
    # restart) does not make its crash a lost node; a running pod's does
    assert st.node_lost(pods, {**ready, "gpu-a": _node("gpu-a", "False")}) is None
    assert st.node_lost(pods, {**ready, "gpu-b": _node("gpu-b", "False")}) == \
        "pod ft-1-abc on node gpu-b: node Ready=False"
    assert st.node_lost(pods, {**ready, "gpu-b": None}) == "pod ft-1-abc on node gpu-b: the node is gone"
    assert st.node_lost(pods, {**ready, "gpu-b": _node("gpu-b", None)}) == \
        "pod ft-1-abc on node gpu-b: the node reports no Ready condition"
    assert st.node_lost(pods, None) is None  # Nodes not readable: the old behaviour
    assert st.node_lost(pods, {}) is None    # nodes not read are not judged
    # a pod marked DisruptionTarget is named, as before
    marked = {**stuck, "status": {"phase": "Running", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}]}}
    assert st.disrupted([crashed, marked]) == "pod ft-1-abc: DeletionByTaintManager"


def test_the_previous_attempts_pod_on_a_lost_node_does_not_excuse_the_next_gangs_crashes():
    """A gang restart makes a new Job of the same name; the old Job's pod on the lost node stays
    Terminating while the Node exists. It is not the new Job's (controller-uid), so a genuine
    crash of the new gang on Ready nodes is counted."""
    job = {"metadata": {"name": "ft", "uid": "new-uid"}}
    uid = lambda u: {"batch.kubernetes.io/controller-uid": u}  # noqa: E731
    old = {"metadata": {"name": "ft-1-old00", "labels": uid("old-uid"), "deletionTimestamp": "2026-11-27T00:00:00Z"},
           "spec": {"nodeName": "gpu-b"}, "status": {"phase": "Running"}}
    new = [{"metadata": {"name": f"ft-{i}-new0{i}", "labels": uid("new-uid")}, "spec": {"nodeName": n},
            "status": {"phase": "Failed"}} for i, n in ((0, "gpu-a"), (1, "gpu-c"))]
    nodes = {"gpu-a": _node("gpu-a", "True"), "gpu-b": _node("gpu-b", "Unknown"), "gpu-c": _node("gpu-c", "True")}
    assert st.node_lost([old, *new], nodes) is not None            # what counting every job-name pod did
    mine = st.own_pods([old, *new], job)
    assert mine == new and st.node_lost(mine, nodes) is None
    unlabeled = {"metadata": {"name": "ft-0-x"}}
    assert st.own_pods([unlabeled], job) == [unlabeled] and st.own_pods([old], {"metadata": {}}) == [old]


def test_nodes_rbac_does_not_let_the_operator_read_are_said_and_judged_as_before(monkeypatch):
    """RBAC is not emulated: the 403 for Nodes is stood in for at the kube.nodes boundary."""
    from kubelora_operator import handlers, kube
    asked = []

    def forbidden(names):
        asked.append(names)
        raise kube.NodesForbidden('nodes "gpu-b" is forbidden: User "system:serviceaccount:kl:kl" cannot get')
    monkeypatch.setattr(kube, "nodes", forbidden)
    pods = [{"metadata": {"name": "ft-1-abc"}, "spec": {"nodeName": "gpu-b"}, "status": {"phase": "Running"}}]
    changes = handlers.Changes()
    assert handlers._gang_nodes(pods, changes) is None and asked == [["gpu-b"]]
    ((type_, reason, message),) = changes.events
    assert type_ == "Warning" and reason == "NodeReadinessUnknown", changes.events
    assert "node readiness cannot be checked" in message and "get on nodes" in message and "cannot get" in message
    assert handlers._gang_nodes([{"metadata": {"name": "p"}, "spec": {}}], handlers.Changes()) == {}  # none scheduled


def test_a_gang_placed_on_the_same_lost_node_again_is_counted():
    """Pods that tolerate every taint can be scheduled onto the NotReady node again: the second
    failure there is counted, so such a run cannot restart uncounted forever."""
    first = "pod ft-1-abc on node gpu-b: node Ready=Unknown (NodeStatusUnknown)"
    assert st.same_lost_node("pod ft-1-xyz on node gpu-b: the node is gone", first)
    assert not st.same_lost_node("pod ft-0-xyz on node gpu-a: node Ready=Unknown", first)
    assert not st.same_lost_node(first, None) and not st.same_lost_node(None, first)
    assert not st.same_lost_node(first, "pod ft-1-abc: DeletionByTaintManager")  # a DisruptionTarget reason


def test_the_deadline_counts_the_time_the_runs_jobs_ran_not_the_time_suspended():
    from datetime import datetime, timezone
    t = lambda h, m=0: datetime(2026, 11, 27, h, m, tzinfo=timezone.utc)  # noqa: E731
    # a Job started at 10:00 runs; a sync at 10:30 changes nothing
    assert st.deadline_used(None, None, "2026-11-27T10:00:00Z", t(10, 30)) == (0.0, "2026-11-27T10:00:00Z")
    # suspended at 11:00 (runPolicy.suspend, a Kueue preemption): the Job controller keeps its old
    # startTime, so the Job reads as stopped by its spec and Suspended condition; seen at 11:20
    job = {"spec": {"suspend": True}, "status": {"startTime": "2026-11-27T10:00:00Z", "conditions": [
        {"type": "Suspended", "status": "True", "lastTransitionTime": "2026-11-27T11:00:00Z"}]}}
    assert st.job_running_since(job) == (None, "2026-11-27T11:00:00Z")
    running, stopped = st.job_running_since(job)
    used, started = st.deadline_used(0.0, "2026-11-27T10:00:00Z", running, t(11, 20), stopped)
    assert (used, started) == (3600.0, None)                   # to the suspension, not to the sync
    assert st.job_running_since({"status": {"startTime": "2026-11-27T13:00:00Z"}}) == ("2026-11-27T13:00:00Z", None)
    # two hours suspended count nothing; resumed at 13:00 (the Job's new startTime), deleted at 13:30
    assert st.deadline_used(used, None, "2026-11-27T13:00:00+00:00", t(13)) == (3600.0, "2026-11-27T13:00:00+00:00")
    used, _ = st.deadline_used(used, "2026-11-27T13:00:00+00:00", None, t(13, 30))
    assert used == 5400.0
    assert st.deadline_left(None, used) is None                 # no limit
    assert st.deadline_left(7200, used) == 1800                 # what a Job made now gets
    assert st.deadline_left(3600, used) == 0                    # spent
    assert st.deadline_left(7200, None) == 7200


def test_a_gang_failure_no_lost_node_explains_yet_waits_for_its_nodes_then_is_decided():
    """A lost node's peers can fail (a NCCL transport error) before the node lifecycle controller
    marks its Node Unknown (40-50 s after the loss): the failure is not charged while a pod of the
    failed gang still runs on a Node that reads Ready, until the grace after the failure passes."""
    from datetime import datetime, timedelta, timezone
    t0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    crashed = {"metadata": {"name": "ft-0-abc", "creationTimestamp": "2026-01-01T11:00:00Z"},
               "spec": {"nodeName": "gpu-a"}, "status": {"phase": "Failed", "containerStatuses": [
                   {"name": "trainer", "state": {"terminated": {"exitCode": 1, "finishedAt": "2026-01-01T12:00:00Z"}}}]}}
    stuck = {"metadata": {"name": "ft-1-abc", "creationTimestamp": "2026-01-01T11:00:00Z"},
             "spec": {"nodeName": "gpu-b"}, "status": {"phase": "Running"}}
    pods = [crashed, stuck]
    ready = {"gpu-a": _node("gpu-a", "True"), "gpu-b": _node("gpu-b", "True")}
    # the failure's time: the earliest container finish, never later than now
    assert st.failed_since(pods, None, t0 + timedelta(seconds=5)) == t0
    assert st.failed_since(pods, None, t0 - timedelta(seconds=5)) == t0 - timedelta(seconds=5)  # a kubelet clock ahead
    assert st.failed_since([stuck], None, t0) == t0                                            # no finish: now
    held = {"job": "uid-1", "since": "2026-01-01T11:59:50Z"}
    assert st.failed_since(pods, held, t0) == t0 - timedelta(seconds=10)                      # the decision's own
    # waited for: the peer still running on a Ready node, within the grace
    assert st.gang_failure_wait(pods, ready, t0, t0 + timedelta(seconds=30), 60) == ["ft-1-abc on node gpu-b"]
    assert st.gang_failure_wait(pods, ready, t0, t0 + timedelta(seconds=60), 60) == []         # grace passed: counted
    assert st.gang_failure_wait(pods, None, t0, t0, 60) == []                                  # Nodes unreadable
    ended = {**stuck, "status": {"phase": "Failed"}}                                           # its kubelet reported it
    assert st.gang_failure_wait([crashed, ended], ready, t0, t0, 60) == []
    replacement = {"metadata": {"name": "ft-0-new", "creationTimestamp": "2026-01-01T12:00:10Z"},
                   "spec": {"nodeName": "gpu-a"}, "status": {"phase": "Running"}}              # the Job controller's
    assert st.gang_failure_wait([crashed, ended, replacement], ready, t0, t0 + timedelta(seconds=20), 60) == []
    unscheduled = {"metadata": {"name": "ft-2-abc"}, "spec": {}, "status": {"phase": "Pending"}}
    assert st.gang_failure_wait([crashed, unscheduled], ready, t0, t0, 60) == []
    # once the Node reads lost, node_lost decides it (uncounted) before any wait is asked
    assert st.node_lost(pods, {**ready, "gpu-b": _node("gpu-b", "Unknown")}) is not None


def test_a_gang_failure_being_decided_is_held_in_the_status_for_its_job_only():
    """The decision survives an operator restart (status.gangFailure) and belongs to one Job: a Job
    made again since (by hand, by a gang restart) starts afresh. While it is decided, the Job
    controller failing the Job for its own backoffLimit does not fail the run; exit 2 (FailJob)
    or the deadline still does."""
    job = {"metadata": {"uid": "uid-1"}, "status": {"active": 1, "failed": 1}}
    held = {"job": "uid-1", "since": "2026-01-01T12:00:00Z"}
    assert st.deciding({"gangFailure": held}, job) == held
    assert st.deciding({"gangFailure": held}, {"metadata": {"uid": "uid-2"}}) is None
    assert st.deciding({"gangFailure": {"job": "uid-1", "since": "soon"}}, job) is None
    assert st.deciding({}, job) is None
    by_itself = {**job, "status": {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    assert st.gang_action(by_itself, nodes=2, restarts=0, backoff_limit=2) is None
    assert st.gang_action(by_itself, nodes=2, restarts=0, backoff_limit=2, deciding=True) == "restart"
    assert st.gang_action(by_itself, nodes=2, restarts=2, backoff_limit=2, deciding=True) == "fail"
    bad_input = {**job, "status": {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}}
    assert st.gang_action(bad_input, nodes=2, restarts=0, backoff_limit=2, deciding=True) is None


def _at(seconds_after_noon: float):
    from datetime import datetime, timedelta, timezone
    return datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc) + timedelta(seconds=seconds_after_noon)


def _gang_pod(index, phase, waiting=None, terminated=None, scheduled=True, message=None, suffix="abc"):
    """A pod of completion index `index` as the Job controller and the kubelet leave it."""
    cond = {"type": "PodScheduled", "status": "True" if scheduled else "False",
            "lastTransitionTime": "2026-11-27T12:00:00Z",
            **({} if scheduled else {"reason": "Unschedulable", "message": message})}
    statuses = []
    if scheduled and (waiting or terminated):
        statuses = [{"name": "trainer", "state": {"waiting": waiting} if waiting else {"terminated": terminated}}]
    return {"metadata": {"name": f"ft-{index}-{suffix}", "uid": f"uid-{index}-{suffix}",
                         "creationTimestamp": "2026-11-27T11:59:50Z",
                         "labels": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"nodeName": "gpu-a"} if scheduled else {},
            "status": {"phase": phase, "conditions": [cond], "containerStatuses": statuses}}


def test_a_gang_whose_peer_never_started_waits_instead_of_counting_node_0s_rendezvous_timeout():
    """Node 0 exits 1 when torchrun's rendezvous gives up on a peer that was never scheduled (no
    free GPUs, an autoscaler still adding a node) or never started (an image that does not pull):
    that gang was never whole, not a failure of the run. A crashed pod's replacement, Pending as
    well, is not such a peer: that crash is counted."""
    rdzv = {"exitCode": 1, "reason": "Error", "message": "the rendezvous timed out after 1800 s: 1 of the 2 nodes ..."}
    node0 = _gang_pod(0, "Failed", terminated=rdzv)
    gpus = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available."
    unscheduled = _gang_pod(1, "Pending", scheduled=False, message=gpus)
    assert st.gang_incomplete([node0, unscheduled], 2) == f"pod ft-1-abc is not scheduled ({gpus})"
    pull = _gang_pod(1, "Pending", waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "r/t:1"'})
    assert st.gang_incomplete([node0, pull], 2) == \
        'pod ft-1-abc has not started its container (ImagePullBackOff: Back-off pulling image "r/t:1")'
    creating = _gang_pod(1, "Pending", waiting={"reason": "ContainerCreating"})
    assert st.gang_incomplete([node0, creating], 2) == "pod ft-1-abc has not started its container (ContainerCreating)"
    assert st.gang_incomplete([node0], 2, counted=1) == \
        "the pod of node 1 was never created (see the Job's FailedCreate events)"            # FailedCreate
    assert st.gang_incomplete([node0], 2, counted=2) is None   # the Job counts a pod not listed: no conclusion
    # node 1 crashed and its replacement is creating: a crash of the run, counted
    crashed1 = _gang_pod(1, "Failed", terminated={"exitCode": 1, "reason": "Error"}, suffix="old")
    assert st.gang_incomplete([node0, crashed1, creating], 2) is None
    running = _gang_pod(1, "Running")
    running["status"]["containerStatuses"] = [{"name": "trainer", "state": {"running": {}}}]
    assert st.gang_incomplete([node0, running], 2) is None
    # node 0's own replacement, still creating, is not the peer that was waited for
    assert st.gang_incomplete([node0, _gang_pod(0, "Pending", waiting={"reason": "ContainerCreating"}, suffix="new"),
                               running], 2) is None
    assert st.counted_restarts({"restarts": 4, "disruptionRestarts": 1, "waitRestarts": 2}) == 1


def _sync_with(monkeypatch, job, pods, previous, spec=None, events=(), progress=None, ready="True"):
    """handlers._sync through its kube boundary: the Job and pods as given (their Nodes' Ready
    condition `ready`), what it deletes kept."""
    from kubelora_operator import handlers, kube
    deleted = []
    monkeypatch.setattr(kube, "get_job", lambda ns, n: job)
    monkeypatch.setattr(kube, "job_pods", lambda ns, n: pods)
    monkeypatch.setattr(kube, "nodes", lambda names: {n: _node(n, ready) for n in names})
    monkeypatch.setattr(kube, "delete_job", lambda ns, n, owner_uid: deleted.append(n))
    monkeypatch.setattr(kube, "set_job_suspend", lambda ns, n, suspend: deleted.append(f"{n} suspended") or True)
    monkeypatch.setattr(kube, "patch_status", lambda ns, n, status, **precondition: {"status": status})
    monkeypatch.setattr(kube, "pod_events", lambda ns, pod: list(events))
    monkeypatch.setattr(kube, "failed_create_events", lambda ns, j: [])
    # the ConfigMap and Service are there, the Service pointed at this Job's pods
    monkeypatch.setattr(kube, "read_child", lambda kind, ns, n: {"spec": {"selector": {
        "batch.kubernetes.io/controller-uid": (job.get("metadata") or {}).get("uid")}}})
    monkeypatch.setattr(kube, "secret_data", lambda ns, n: {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    monkeypatch.setattr(handlers, "READS", handlers.artifacts.ReadBackoff())  # no backoff left by another test
    monkeypatch.setattr(handlers.artifacts, "read_json",
                        lambda uri, key, settings: (progress if key == handlers.artifacts.PROGRESS_KEY else None, None))
    body = {"metadata": {"name": "ft", "namespace": "ml", "uid": "uid-1", "generation": 1},
            "spec": spec or {**SPEC, "resources": {"nodes": 2, "gpusPerNode": 8}}, "status": previous}
    changes = handlers.Changes()
    handlers._sync(body, changes)
    return changes, deleted


def test_a_gang_failure_with_a_peer_never_scheduled_restarts_without_counting(monkeypatch):
    # backoffLimit 0: the Job's own limit is 0, so Kubernetes 1.31+ marks it FailureTarget
    # (BackoffLimitExceeded) at the first pod failure; the operator's decision stands over it
    job = {"metadata": {"name": "ft", "uid": "job-1", "ownerReferences": [{"kind": "LoRATrainingJob", "uid": "uid-1"}]},
           "spec": {"parallelism": 2}, "status": {"active": 1, "failed": 1, "conditions": [
               {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    node0 = _gang_pod(0, "Failed", terminated={"exitCode": 1, "reason": "Error", "message": "the rendezvous timed out"})
    gpus = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    changes, deleted = _sync_with(monkeypatch, job, [node0, _gang_pod(1, "Pending", scheduled=False, message=gpus)],
                                  {"phase": "Pending", "restarts": 0}, spec={**SPEC, "resources": {"nodes": 2},
                                                                            "runPolicy": {"backoffLimit": 0}})
    assert deleted == ["ft"]                                                # restarted, not failed at backoffLimit 0
    s = changes.status
    assert (s["restarts"], s["waitRestarts"], s["reason"]) == (1, 1, "WaitingForGang"), s
    assert s["message"].startswith(f"waiting for the whole gang: pod ft-1-abc is not scheduled ({gpus})"), s
    (restart,) = [m for t, r, m in changes.events if r == "GangRestart"]
    assert "waiting for the whole gang: pod ft-1-abc is not scheduled" in restart and "not counted" in restart


def test_a_pod_that_does_not_start_is_pending_with_its_reason_then_its_newest_event(monkeypatch):
    """A scheduled pod waiting in ContainerCreating (a Multi-Attach, a failed mount, a slow pull)
    is not 'staging in the model': Pending with the kubelet's reason, and past the grace its own
    newest Warning Event."""
    creating = _gang_pod(1, "Pending", waiting={"reason": "ContainerCreating"})
    running = _pod("ft-0-abc")
    o = st.observe(_job(active=2), [running, creating], {"phase": "Training"}, None, False)
    assert (o.phase, o.reason) == (st.PENDING, "ContainerCreating")
    assert o.message == "pod ft-1-abc on node gpu-a has not started its container: ContainerCreating"
    unstarted = {"metadata": {"name": "ft-1-x"}, "spec": {"nodeName": "n"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "True"}]}}                    # no containerStatuses yet
    assert st.observe(_job(active=1), [unstarted], None, None, False).reason == "ContainerCreating"
    new = {"metadata": {"name": "ft-1-y"}, "spec": {}, "status": {"phase": "Pending"}}   # the scheduler has not looked
    assert st.not_started(new) == "not scheduled (the scheduler has not placed it yet)" and st.starting([new]) is None
    assert st.slow_to_start([running, creating], _at(119)) is None
    assert st.slow_to_start([running, creating], _at(120)) is creating   # 120 s since it was scheduled
    attach = ("Multi-Attach error for volume \"pvc-1\" Volume is already used by pod(s) other-0-xyz")
    events = [{"type": "Normal", "reason": "Scheduled", "message": "assigned", "lastTimestamp": "2026-11-27T12:00:00Z"},
              {"type": "Warning", "reason": "FailedAttachVolume", "message": attach, "count": 4,
               "lastTimestamp": "2026-11-27T12:01:50Z"},
              {"type": "Warning", "reason": "FailedMount", "message": "old", "lastTimestamp": "2026-11-27T12:01:00Z"}]
    told = st.pod_events(o, creating, events)
    assert told.message == f"{o.message}; newest event of pod ft-1-abc: FailedAttachVolume (x4): {attach}"
    assert st.pod_events(o, creating, events[:1]) is o
    assert st.pod_events(st.Observed(st.TRAINING, "Training", "training"), creating, events).message == "training"
    # through the sync: the events are read only for the pod past the grace
    job = {"metadata": {"name": "ft", "uid": "job-1", "ownerReferences": [{"kind": "LoRATrainingJob", "uid": "uid-1"}]},
           "spec": {"parallelism": 2}, "status": {"active": 2, "ready": 1}}
    old = {**creating, "status": {**creating["status"], "conditions": [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}]}}
    changes, _ = _sync_with(monkeypatch, job, [running, old], {"phase": "Initializing"}, events=events)
    assert changes.status["reason"] == "ContainerCreating" and attach in changes.status["message"], changes.status


def test_a_transient_pull_or_create_error_is_stalled_only_past_the_grace():
    """A registry's 429 (ErrImagePull) passes at the next pull: not Stalled (Flux and Argo CD would
    mark the job unhealthy) until it lasts; ImagePullBackOff is stalled at once, as before."""
    err = _gang_pod(0, "Pending", waiting={"reason": "ErrImagePull", "message": "429 Too Many Requests"})
    o = st.observe(_job(active=1), [err], None, None, False, now=_at(30))
    assert (o.phase, o.reason, o.stalled) == (st.PENDING, "ErrImagePull", False), o
    o = st.observe(_job(active=1), [err], None, None, False, now=_at(121))
    assert (o.reason, o.stalled) == ("ErrImagePull", True) and "429" in o.message
    create = _gang_pod(0, "Pending", waiting={"reason": "CreateContainerError", "message": "context deadline exceeded"})
    assert not st.observe(_job(active=1), [create], None, None, False, now=_at(30)).stalled
    assert st.observe(_job(active=1), [create], None, None, False, now=_at(300)).stalled
    backoff = _gang_pod(0, "Pending", waiting={"reason": "ImagePullBackOff", "message": "Back-off"})
    assert st.observe(_job(active=1), [backoff], None, None, False, now=_at(1)).stalled


def _evicted(name, message, how="reason"):
    status = {"phase": "Failed", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet", "message": message}]}
    if how == "reason":
        status.update(reason="Evicted", message=message)
    return {"metadata": {"name": name}, "status": status}


def test_evictions_by_the_kubelet_are_counted_said_and_fail_the_run_at_the_limit(monkeypatch):
    disk = "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 2Gi."
    shutdown = {"metadata": {"name": "ft-0-s"}, "status": {"phase": "Failed", "reason": "Terminated", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
         "message": "Pod was terminated in response to imminent node shutdown."}]}}
    pods = [_evicted("ft-0-a", disk), _evicted("ft-0-b", "The node was low on resource: memory.", how="cond"), shutdown]
    assert st.evictions(pods) == [("ft-0-a", disk), ("ft-0-b", "The node was low on resource: memory.")]
    assert "resources.cacheSize" in st.eviction_fix(disk) and "resources.requests.memory" in st.eviction_fix("memory")
    job = {"metadata": {"name": "ft", "uid": "job-1", "ownerReferences": [{"kind": "LoRATrainingJob", "uid": "uid-1"}]},
           "spec": {"parallelism": 1}, "status": {"active": 1, "ready": 0}}
    spec = {**SPEC, "resources": {"nodes": 1}}
    changes, deleted = _sync_with(monkeypatch, job, pods[:1], {"phase": "Training"}, spec=spec)
    assert (changes.status["evictions"], changes.status["evictedPods"], deleted) == (1, ["ft-0-a"], [])
    assert ("Warning", "Evicted", f"pod ft-0-a was evicted by its node's kubelet: {disk}") in changes.events
    seen = {"phase": "Training", "evictions": 1, "evictedPods": ["ft-0-a"]}
    changes, _ = _sync_with(monkeypatch, job, pods[:1], seen, spec=spec)
    assert "evictions" not in changes.status and not [e for e in changes.events if e[1] == "Evicted"]  # once
    third = [*pods[:2], _evicted("ft-0-c", disk)]
    changes, deleted = _sync_with(monkeypatch, job, third, seen, spec=spec)
    s = changes.status
    assert (s["phase"], s["reason"], s["evictions"], deleted) == ("Failed", "Evicted", 3, ["ft suspended"]), s
    assert s["message"].startswith("3 of the run's pods were evicted by their node's kubelet (limit 3); newest: "
                                   f"pod ft-0-c: {disk}; give the cache its disk: resources.cacheSize"), s
    assert s["stopJob"] is None   # recorded with the Failed patch, cleared once the Job was suspended
    # the suspend fails (the API server throttles): the run is Failed, its Job still to stop; the next
    # sync of the finished job stops it (was: left running for good, the Job controller making pods)
    from kubelora_operator import kube

    def throttled(ns, n, suspend):
        raise RuntimeError("429 Too Many Requests")
    changes, _ = _sync_with(monkeypatch, job, third, seen, spec=spec)  # the boundary set afresh
    monkeypatch.setattr(kube, "set_job_suspend", throttled)
    from kubelora_operator import handlers
    body = {"metadata": {"name": "ft", "namespace": "ml", "uid": "uid-1", "generation": 1},
            "spec": spec, "status": seen}
    patched = []
    monkeypatch.setattr(kube, "patch_status", lambda ns, n, status, **kw: patched.append(dict(status)) or {"status": status})
    failing = handlers.Changes()
    with pytest.raises(RuntimeError, match="429"):
        handlers._sync(body, failing)
    assert patched[-1]["phase"] == "Failed" and patched[-1]["stopJob"] == "job-1"
    stopped = []
    monkeypatch.setattr(kube, "set_job_suspend", lambda ns, n, suspend: stopped.append(suspend) or True)
    later = handlers.Changes()
    handlers._sync({**body, "status": {**seen, **patched[-1]}}, later)
    assert stopped == [True] and later.status["stopJob"] is None


def test_the_pods_and_service_carry_the_jobs_uid_and_a_cache_size_sizes_the_emptydir():
    """A job made again under the same name has a new uid: its Service never lists the deleted
    one's pods (still terminating under the same DNS names); resources.cacheSize bounds the
    per-pod cache and requests that much ephemeral storage."""
    cm, svc, job = build()
    assert svc["spec"]["selector"] == {"kubelora.dev/job": "ft", "kubelora.dev/job-uid": "uid-1"}
    assert job["spec"]["template"]["metadata"]["labels"]["kubelora.dev/job-uid"] == "uid-1"
    job = build(resources={"nodes": 1, "cacheSize": "200Gi", "requests": {"memory": "64Gi"}})[2]
    pod = job["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["cache"] == {"name": "cache", "emptyDir": {"sizeLimit": "200Gi"}}
    assert pod["containers"][0]["resources"]["requests"] == {"memory": "64Gi", "ephemeral-storage": "200Gi",
                                                             "nvidia.com/gpu": "1"}
    # the trainer's stage-in checks its downloads against it (the emptyDir's free space is the node's disk's)
    assert {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}["KUBELORA_CACHE_LIMIT_BYTES"] == str(200 * 2**30)
    assert "KUBELORA_CACHE_LIMIT_BYTES" not in {e["name"] for e in build()[2]["spec"]["template"]["spec"]["containers"][0]["env"]}
    import pytest
    from kubelora_trainer.spec import SpecError
    for bad, field in (({"cacheSize": "1Gi", "cacheVolumeClaim": "c"}, "resources.cacheSize"),
                       ({"cacheSize": "1Gi", "requests": {"ephemeral-storage": "2Gi"}}, "ephemeral-storage"),
                       ({"cacheSize": "lots"}, "cacheSize")):
        with pytest.raises(SpecError, match=field):
            parse_spec({**SPEC, "resources": bad})
    pods = [{"metadata": {"name": "ft-0-old", "labels": {"kubelora.dev/job-uid": "old"}}},
            {"metadata": {"name": "ft-0-older", "labels": {}}},
            {"metadata": {"name": "ft-0-mine", "labels": {"kubelora.dev/job-uid": "uid-1"}}}]
    assert [p["metadata"]["name"] for p in st.predecessors(pods, "uid-1", manifests.UID_LABEL)] == ["ft-0-old", "ft-0-older"]


def test_a_job_the_controller_has_decided_to_fail_is_failed_before_its_pods_are_gone():
    """Kubernetes 1.31+: FailureTarget is set when the Job controller decides (exit 2 through the
    podFailurePolicy, the deadline, its backoffLimit) and Failed only once every pod has terminated,
    a grace period or more later. Meanwhile a multi-node run's bad input must not restart the gang on
    GPUs (nor the deadline count a restart), and the job reads Failed with the controller's reason."""
    from datetime import datetime, timezone
    later = datetime(2030, 1, 1, tzinfo=timezone.utc)

    def target(reason):
        return {"metadata": {"uid": "uid-1"}, "spec": {"parallelism": 2}, "status": {
            "active": 1, "failed": 1, "ready": 1, "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason, "message": f"the Job failed: {reason}"}]}}
    for reason in ("PodFailurePolicy", "DeadlineExceeded"):
        job = target(reason)
        assert st.gang_action(job, nodes=2, restarts=0, backoff_limit=2) is None, reason
        assert st.gang_action(job, nodes=2, restarts=0, backoff_limit=2, deciding=True) is None, reason
        obs = st.observe(job, [], None, None, False)
        assert obs.phase == st.FAILED and obs.stalled, reason
        assert st.needs_pods(job) and not st.awaits_pods(job, later, 0)
    assert st.observe(target("DeadlineExceeded"), [], None, None, False).reason == "DeadlineExceeded"
    # the controller's own backoffLimit (runPolicy.backoffLimit x nodes: 0 fails the Job at the first pod
    # failure) is not the run's failure: the operator decides, restarts not counted included
    assert st.gang_action(target("BackoffLimitExceeded"), nodes=2, restarts=0, backoff_limit=2, deciding=True) == "restart"
    assert st.gang_action(target("BackoffLimitExceeded"), nodes=2, restarts=0, backoff_limit=2) == "restart"
    assert st.gang_action(target("BackoffLimitExceeded"), nodes=2, restarts=0, backoff_limit=0,
                          disruption="pod x: node lost") == "restart_uncounted"
    not_yet = {"status": {"active": 1, "failed": 1, "conditions": [{"type": "FailureTarget", "status": "False"}]}}
    assert st.gang_action(not_yet, nodes=2, restarts=0, backoff_limit=2) == "restart"


def test_the_job_follows_run_policy_suspend_when_it_changes():
    """An edit of runPolicy.suspend is written to the Job at the next sync (also one that found no
    Job, being made again for a gang restart), and a Job resumed by hand is suspended again; never
    for a Job queued in Kueue, nor a finished or failed one (the operator suspends a failed run's
    Job itself)."""
    running = {"spec": {"suspend": False}, "status": {"active": 1}}
    assert st.suspend_to_apply(running, True, None) is True
    assert st.suspend_to_apply({"spec": {"suspend": True}}, False, None) is False
    assert st.suspend_to_apply({"spec": {}}, False, None) is None
    assert st.suspend_to_apply(running, False, None) is None
    assert st.suspend_to_apply(running, True, "gpus") is None
    failed = {"spec": {"suspend": True}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    assert st.suspend_to_apply(failed, False, None) is None
    done = {"spec": {"suspend": False}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert st.suspend_to_apply(done, True, None) is None
    # with the value last applied recorded (status.appliedSuspend), a Job is resumed only for the
    # user's edit: one that another controller suspends (Kueue's manageJobsWithoutQueueName, no queue
    # label) is not resumed at every sync, fighting it; stopping is always applied
    held = {"spec": {"suspend": True}, "status": {}}
    assert st.suspend_to_apply(held, False, None, applied=False) is None
    assert st.suspend_to_apply(held, True, None, applied=False) is None     # held already: nothing to write
    assert st.suspend_to_apply(running, True, None, applied=False) is True  # the user's edit
    assert st.suspend_to_apply(held, False, None, applied=True) is False    # and back
    assert st.suspend_to_apply(running, True, None, applied=True) is True   # resumed by someone else: stopped


def test_a_sync_that_changes_nothing_writes_no_status(monkeypatch):
    """The stored status holds keys a sync's new status never has (trainerImage, restarts, ...):
    compared whole, every sync of every running job sent a PATCH (hundreds a minute on a busy
    cluster). Only what the sync writes is compared."""
    running = {"running": {"startedAt": "2026-11-27T12:00:05Z"}}
    job = {"metadata": {"name": "ft", "uid": "job-1", "ownerReferences": [{"kind": "LoRATrainingJob", "uid": "uid-1"}]},
           "spec": {"parallelism": 1}, "status": {"active": 1, "startTime": "2026-11-27T12:00:00Z"}}
    pod = _gang_pod(0, "Running")
    pod["status"]["containerStatuses"] = [{"name": "trainer", "state": running, "ready": True}]
    spec = {**SPEC, "resources": {"nodes": 1}}
    first, _ = _sync_with(monkeypatch, job, [pod], {"phase": "Pending"}, spec=spec)
    assert first.status.get("phase"), first.status
    stored = {**{k: v for k, v in first.status.items() if v is not None}, "trainerImage": "ghcr.io/kubelora/trainer:0.1.0",
              "restarts": 0}
    again, _ = _sync_with(monkeypatch, job, [pod], stored, spec=spec)
    assert again.status == {}, again.status
    # a predecessor's progress.json under the same output.uri (another runId) is not this run's
    theirs = {"phase": "Succeeded", "step": 500, "totalSteps": 500, "runId": "uid-0"}
    other, _ = _sync_with(monkeypatch, job, [pod], stored, spec=spec, progress=theirs)
    assert other.status == {}, other.status
    ours, _ = _sync_with(monkeypatch, job, [pod], stored, spec=spec, progress={**theirs, "phase": "Training",
                                                                                "step": 7, "runId": "uid-1"})
    assert ours.status["phase"] == "Training" and ours.status["progress"]["step"] == 7, ours.status
    from kubelora_operator.handlers import _changes_status
    assert not _changes_status({"phase": "Training"}, {"phase": "Training", "gangFailure": None})  # deletes nothing
    assert _changes_status({"phase": "Training"}, {"phase": "Succeeded"})


def test_a_suspended_job_whose_sync_failed_is_synced_again_at_the_next_tick():
    """The ticker polls only active and finishing jobs; a Suspended job changes through events. A
    sync of it that failed (an API error while un-suspending) was never retried until the next
    event or an operator restart: failed keys are ticked again until one succeeds."""
    import asyncio
    from kubelora_operator.syncer import Syncer
    calls = []

    def sync(body, remember):
        calls.append(body["metadata"]["name"])
        if len(calls) == 1:
            raise RuntimeError("the API server answered 503")

    async def scenario():
        s = Syncer(sync, interval=0.05, workers=1)
        s.start()
        s.saw_owner("ADDED", {"metadata": {"name": "held", "namespace": "ns", "uid": "u", "generation": 2,
                                            "resourceVersion": "5"}, "status": {"phase": "Suspended"}})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(calls) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several more ticks: a successful sync of a Suspended job is not polled
        await s.stop()
        return list(s.queue.failed)

    failed = asyncio.run(scenario())
    assert calls == ["held", "held"] and failed == [], calls


def test_a_bucket_that_does_not_answer_is_read_less_often_not_at_every_sync():
    """A blackholed endpoint costs a read up to 2 x (5 + 10) s: at every 10 s sync, four such jobs
    held the four sync workers and every other job's status waited. After a failure the job's next
    read waits 10, 20, 40 ... 120 s (the last error answered meanwhile, so its status stays put);
    a success forgets it."""
    from kubelora_operator.artifacts import ReadBackoff
    now, reads = [0.0], []
    b = ReadBackoff(first=10, most=40, clock=lambda: now[0], size=2)

    def read(answer):
        def fn():
            reads.append(now[0])
            return answer
        return fn
    down = read((None, "reading s3://out/run/status/progress.json: timed out"))
    assert b.read("a", down) == (None, "reading s3://out/run/status/progress.json: timed out")
    for t in (5, 9.9, 10, 15, 29.9, 30, 69.9, 70, 109.9, 110):
        now[0] = t
        assert b.read("a", down)[1].endswith("timed out")
    assert reads == [0, 10, 30, 70, 110]            # waits of 10, 20, 40, then the most: 40
    assert b.read("b", read(({"step": 3}, None))) == ({"step": 3}, None)
    now[0] = 150
    assert b.read("a", read(({"step": 9}, None))) == ({"step": 9}, None)   # answered again: forgotten
    now[0] = 151
    assert b.read("a", read(({"step": 10}, None)))[0] == {"step": 10} and reads[-1] == 151
    for k in ("c", "d", "e"):                        # bounded: the oldest failing jobs go
        b.read(k, down)
    assert len(b._entries) == 2
    slow = ReadBackoff(first=10, most=40, clock=lambda: now[0])
    now[0] = 0

    def hangs():                                   # a blackholed read: 30 s until it gives up
        now[0] += 30
        return None, "timed out"
    slow.read("x", hangs)
    now[0] = 35                                    # 5 s after it ended: the 10 s wait is not used up by the read
    assert slow.read("x", lambda: ({"step": 1}, None)) == (None, "timed out")


def test_a_running_job_gets_its_network_policy_once_and_a_refusal_only_warns(monkeypatch):
    """networkPolicy.perJob turned on under running jobs: each gets its policy at its next sync (not
    at its next gang restart, days away); no rights on NetworkPolicies warns once and the run goes on
    (it predates the setting), where a new job's first create fails it."""
    from collections import OrderedDict

    from kubelora_operator import handlers, kube
    monkeypatch.setenv("KUBELORA_JOB_NETWORK_POLICY", "true")
    monkeypatch.setattr(handlers, "_FENCED", OrderedDict())
    made = []
    job = {"metadata": {"name": "ft", "uid": "job-1", "ownerReferences": [{"kind": "LoRATrainingJob", "uid": "uid-1"}]},
           "spec": {"parallelism": 1}, "status": {"active": 1}}
    pod = _gang_pod(0, "Running")
    spec = {**SPEC, "resources": {"nodes": 1}}

    def ensure(obj):
        made.append(obj["kind"])
        return obj, True
    monkeypatch.setattr(kube, "ensure", ensure)
    first, _ = _sync_with(monkeypatch, job, [pod], {"phase": "Training"}, spec=spec)
    monkeypatch.setattr(kube, "ensure", ensure)  # _sync_with set the rest of the boundary again
    again, _ = _sync_with(monkeypatch, job, [pod], {"phase": "Training"}, spec=spec)
    assert made == ["NetworkPolicy"]                                          # once per run
    assert [r for _, r, _ in first.events if r == "NetworkPolicy"] and not [r for _, r, _ in again.events if r == "NetworkPolicy"]

    def refused(obj):
        raise kube.ChildRefused("the API server refused NetworkPolicy 'ft-peers' (403): forbidden")
    monkeypatch.setattr(handlers, "_FENCED", OrderedDict())
    monkeypatch.setattr(kube, "ensure", refused)
    changes, _ = _sync_with(monkeypatch, job, [pod], {"phase": "Training"}, spec=spec)
    (warning,) = [(t, m) for t, r, m in changes.events if r == "NetworkPolicyRefused"]
    assert warning[0] == "Warning" and "(403)" in warning[1] and "networkpolicies" in warning[1]
    assert changes.status.get("phase") != "Failed", changes.status
    # deferred (throttled, a quota): tried again at the next sync, nothing said yet
    monkeypatch.setattr(handlers, "_FENCED", OrderedDict())
    tries = []

    def deferred(obj):
        tries.append(1)
        raise kube.ChildDeferred("the API server refused NetworkPolicy 'ft-peers' (429): throttled")
    for _ in range(2):
        monkeypatch.setattr(kube, "ensure", deferred)
        changes, _ = _sync_with(monkeypatch, job, [pod], {"phase": "Training"}, spec=spec)
        assert not [r for _, r, _ in changes.events if r.startswith("NetworkPolicy")]
    assert len(tries) == 2


def test_an_api_server_that_never_answers_does_not_hold_a_call_for_ever(tmp_path, monkeypatch):
    """The kubernetes client waits for ever by default: a connection dropped in silence would hold
    a sync worker (and, with all four, every job's status) while the Lease renews. Every request
    of kube.api() has a timeout unless the call gives one, and TCP keepalive. Against a real
    socket that accepts and never answers."""
    import socket
    import threading
    import time
    import yaml
    from kubelora_operator import kube
    assert kube.request_timeout(None, 60.0) == (10.0, 60.0) and kube.request_timeout(5, 60.0) == 5
    assert kube.request_timeout((1, 2), 60.0) == (1, 2)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # never answered
            except OSError:
                pass
    threading.Thread(target=accept, daemon=True).start()
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.getsockname()[1]}"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}], "users": [{"name": "u", "user": {}}]}))
    from kubernetes.config import kube_config
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))  # read when imported
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube, "API_TIMEOUT_SECONDS", 1.0)
    kube.reset()
    try:
        got = []

        def call():  # in a thread: without the timeout it would never return
            try:
                kube.get_job("default", "x")
            except Exception as e:  # noqa: BLE001
                got.append(e)
        t0 = time.monotonic()
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(60)
        assert not caller.is_alive(), "the call still waits after 60 s"
        assert time.monotonic() - t0 < 30 and got and "timed out" in str(got[0]).lower(), got
        assert held  # the request reached the server, which never answered
        opts = kube.api().configuration.socket_options
        assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in opts
    finally:
        stop.set()
        kube.reset()
        server.close()
        for c in held:
            c.close()


def test_a_one_node_runs_pod_stuck_terminating_on_a_lost_node_restarts_the_run(monkeypatch):
    """One node: no peer fails to tell the loss, and the Job (with its podFailurePolicy) makes a
    replacement only once the pod is gone, which a lost node's pod never is (Terminating until the
    Node is removed). Past the pod's grace period on a Node that reads lost, the run is restarted
    (not counted); on a Ready node it is left to finish; lost twice on the same node, counted."""
    from datetime import datetime, timedelta, timezone
    from kubelora_operator import status as st
    now = datetime.now(timezone.utc)
    job = {"metadata": {"name": "ft", "uid": "job-1", "ownerReferences": [{"kind": "LoRATrainingJob", "uid": "uid-1"}]},
           "spec": {"parallelism": 1}, "status": {"active": 0, "ready": 0, "terminating": 1}}
    pod = _gang_pod(0, "Running")
    pod["metadata"]["deletionTimestamp"] = st.iso(now - timedelta(minutes=5))
    fresh = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": st.iso(now + timedelta(minutes=5))}}
    assert st.needs_pods(job)
    assert st.stranded([pod, fresh, _gang_pod(1, "Running")], now) == ["ft-0-abc"]
    spec = {**SPEC, "resources": {"nodes": 1}}
    changes, deleted = _sync_with(monkeypatch, job, [pod], {"phase": "Training"}, spec=spec, ready="Unknown")
    assert deleted == ["ft"], (deleted, changes.status)
    s = changes.status
    assert s["restarts"] == 1 and s["disruptionRestarts"] == 1 and s["restartPending"], s
    assert s["lastDisruption"].startswith("pod ft-0-abc on node gpu-a: node Ready=Unknown"), s
    (restart,) = [m for t, r, m in changes.events if r == "GangRestart"]
    assert "stayed Terminating past its grace period" in restart and "not counted" in restart, restart
    # within its grace period, or on a Ready node: left alone
    for pods, ready in (([fresh], "Unknown"), ([pod], "True")):
        changes, deleted = _sync_with(monkeypatch, job, pods, {"phase": "Training"}, spec=spec, ready=ready)
        assert deleted == [] and "restarts" not in changes.status, changes.status
    # the same node lost again (pods that tolerate every taint land there again): counted
    changes, deleted = _sync_with(monkeypatch, job, [pod], {"phase": "Training", "restarts": 1, "disruptionRestarts": 1,
                                                            "lastDisruption": s["lastDisruption"]},
                                  spec={**spec, "runPolicy": {"backoffLimit": 3}}, ready="Unknown")
    assert deleted == ["ft"] and changes.status["restarts"] == 2 and "disruptionRestarts" not in changes.status


def test_a_job_kopf_took_for_handled_is_made_by_the_sync_after_a_while_an_invalid_one_failed(monkeypatch):
    """handlers._take_over_creation: a job without a status (kopf skipped its create handler: a
    copied last-handled-configuration annotation) is left to kopf for CREATE_TAKEOVER_SECONDS after
    it was made or the operator started, then created by the sync; one whose spec is invalid gets
    its Failed / InvalidSpec status the same way, not silence."""
    from datetime import datetime, timedelta, timezone
    from kubelora_operator import handlers
    from kubelora_operator import status as st
    now = datetime.now(timezone.utc)
    monkeypatch.setattr(handlers, "STARTED", [now - timedelta(hours=1)])
    made = []
    monkeypatch.setattr(handlers, "_create_children", lambda body, spec, name, ns, uid, runtime, changes: made.append(name))
    body = {"metadata": {"name": "ft", "namespace": "ml", "uid": "u1", "generation": 1,
                         "creationTimestamp": st.iso(now - timedelta(seconds=10))}, "spec": SPEC}
    handlers._sync(body, handlers.Changes())
    assert made == []                                  # kopf's turn still
    body["metadata"]["creationTimestamp"] = st.iso(now - timedelta(minutes=5))
    monkeypatch.setattr(handlers, "STARTED", [now - timedelta(seconds=10)])
    handlers._sync(body, handlers.Changes())
    assert made == []                                  # the operator just started: kopf's turn first
    monkeypatch.setattr(handlers, "STARTED", [now - timedelta(hours=1)])
    handlers._sync(body, handlers.Changes())
    assert made == ["ft"]
    monkeypatch.undo()
    monkeypatch.setattr(handlers, "STARTED", [now - timedelta(hours=1)])
    bad = {**body, "spec": {**SPEC, "training": {"steps": 10, "warmupSteps": 50}}}
    changes = handlers.Changes()
    handlers._sync(bad, changes)
    assert (changes.status["phase"], changes.status["reason"]) == ("Failed", "InvalidSpec"), changes.status
    assert "training.warmupSteps" in changes.status["message"]


def test_a_service_left_on_an_earlier_attempts_pods_is_pointed_at_this_jobs(monkeypatch):
    """handlers._ensure_support: the Service selects an earlier Job's pods (the patch at the gang
    restart failed, or an older operator made it): while this Job's pods are being made it is
    patched to select them; one another owner holds is left alone."""
    from kubelora_operator import handlers, kube, manifests
    job = {"metadata": {"name": "ft", "uid": "job-2", "ownerReferences": [{"kind": "LoRATrainingJob", "uid": "uid-1"}]},
           "spec": {"parallelism": 1}, "status": {"active": 1, "ready": 0}}
    patched = []
    for owner, want in (("uid-1", [{manifests.CONTROLLER_UID_LABEL: "job-2"}]), ("someone-else", [])):
        patched.clear()
        monkeypatch.setattr(kube, "read_child", lambda kind, ns, n, owner=owner: {
            "metadata": {"ownerReferences": [{"kind": "LoRATrainingJob", "uid": owner, "controller": True}]},
            "spec": {"selector": {manifests.CONTROLLER_UID_LABEL: "job-1"}}})
        monkeypatch.setattr(kube, "select_pods_of", lambda ns, name, selector: patched.append(selector) or True)
        handlers._ensure_support({"name": "ft", "uid": "uid-1"}, "ml", "ft", handlers.parse_spec(
            {**SPEC, "resources": {"nodes": 1}}), job, handlers.Changes())
        assert patched == want, owner


def test_crd_drift_names_missing_and_unknown_fields_and_a_missing_version():
    from kubelora_operator import crd_drift
    wanted = {"properties": {"dataset": {"properties": {"uri": {}, "sources": {"items": {"properties": {"uri": {}}}}}}}}
    assert crd_drift.fields(wanted) == {"spec.dataset", "spec.dataset.uri", "spec.dataset.sources",
                                        "spec.dataset.sources[].uri"}
    assert crd_drift.drift(wanted, wanted) is None
    old = {"properties": {"dataset": {"properties": {"uri": {}, "sources": {"items": {"properties": {}}}}}}}
    said = crd_drift.drift(old, wanted)
    assert "is older than this operator: it lacks spec.dataset.sources[].uri, which" in said and "newer" not in said
    said = crd_drift.drift(wanted, old)
    assert "is newer than this operator: it declares spec.dataset.sources[].uri" in said and "older" not in said
    assert "does not serve v1alpha1" in crd_drift.drift(None, wanted)
    reads = []
    checker = crd_drift.Checker(lambda: reads.append(1) or {"spec": {"versions": [
        {"name": "v1alpha1", "schema": {"openAPIV3Schema": {"properties": {"spec": old}}}}]}}, lambda: wanted)
    assert "lacks" in checker.problem(now=0) and "lacks" in checker.problem(now=30) and len(reads) == 1
    assert "lacks" in checker.problem(now=61) and len(reads) == 2   # read again while it differs


def test_a_store_that_does_not_answer_backs_off_every_job_reading_it_and_one_read_probes_it():
    """One tenant's endpoint down under many jobs: each job's first read used to hang up to 30 s, so
    eight of them held the four sync workers and every other tenant's status froze. The store's
    failure now answers the other jobs of that store at once; once the wait is over one read probes
    it (the others keep the error meanwhile) and an answer opens it for all. A job's own error (a
    missing credential, a refused key) is not the store's."""
    import threading
    from kubelora_operator.artifacts import ReadBackoff, _error
    now, reads = [0.0], []
    b = ReadBackoff(first=10, most=40, clock=lambda: now[0])
    store, other = ("http://minio:9000", "path", "", "out"), ("http://minio:9000", "path", "", "elsewhere")
    down = _error("reading s3://out/a/status/progress.json: the server did not answer in time", unreachable=True,
                  cause="ReadTimeoutError")

    def read(job, answer):
        def fn():
            reads.append(job)
            return answer
        return fn
    assert b.read(("a", "progress"), read("a", (None, down)), store) == (None, down)
    got = b.read(("b", "progress"), read("b", (None, None)), store)
    assert got == (None, "bucket out at http://minio:9000 did not answer the operator's last read (ReadTimeoutError); "
                         "it is read again for every job once one read answers")   # not a's object
    assert reads == ["a"]   # b did not wait on the store
    assert b.read(("c", "progress"), read("c", ({"step": 1}, None)), other) == ({"step": 1}, None)  # another bucket
    now[0] = 10.5
    release, started = threading.Event(), threading.Event()

    def probe():
        started.set()
        release.wait(30)
        return {"step": 4}, None
    t = threading.Thread(target=lambda: b.read(("b", "progress"), probe, store))
    t.start()
    assert started.wait(30)
    got = b.read(("d", "progress"), read("d", (None, None)), store)   # while b probes: d keeps the error
    assert got[1] is not None and "d" not in reads
    release.set()
    t.join(30)
    assert b.read(("d", "progress"), read("d", ({"step": 2}, None)), store) == ({"step": 2}, None)  # open again
    # a job's own error says nothing of the store: the next job reads
    denied = _error("reading s3://out/e/status/progress.json: AccessDenied")
    assert b.read(("e", "progress"), read("e", (None, denied)), store) == (None, denied)
    assert b.read(("f", "progress"), read("f", ({"step": 5}, None)), store) == ({"step": 5}, None)


def test_read_errors_say_whether_the_store_answered():
    from botocore.exceptions import ClientError, EndpointConnectionError, ProxyConnectionError, ReadTimeoutError
    from kubelora_operator.artifacts import SlowBody, unreachable

    def client_error(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    assert unreachable(EndpointConnectionError(endpoint_url="http://x"))
    assert unreachable(ReadTimeoutError(endpoint_url="http://x"))
    assert unreachable(ProxyConnectionError(proxy_url="http://proxy:3128", error="refused"))   # a dead proxy
    assert unreachable(client_error(502, "BadGateway")) and unreachable(client_error(500, "InternalError"))
    assert unreachable(SlowBody("progress.json took more than 20 s to read"))
    # throttling is per prefix: one job's hot prefix does not close the bucket for the others
    assert not unreachable(client_error(503, "SlowDown")) and not unreachable(client_error(429, "TooManyRequests"))
    assert not unreachable(client_error(403, "AccessDenied")) and not unreachable(client_error(404, "NoSuchKey"))
    assert not unreachable(ValueError("not JSON"))


def test_the_trainers_metrics_address_reaches_the_pods_when_set(monkeypatch):
    """KUBELORA_TRAINER_METRICS_ADDR (chart operator.listenAddress, '::' on IPv6-only clusters) is
    the trainer's KUBELORA_METRICS_ADDR; unset, the pods get none and the trainer binds 0.0.0.0."""
    from kubelora_operator import handlers
    spec = parse_spec(SPEC)

    def env_of(cfg):
        pod = manifests.children("ft", "uid-1", "ml", spec, cfg)[2]["spec"]["template"]["spec"]
        return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert "KUBELORA_METRICS_ADDR" not in env_of(manifests.OperatorConfig())
    monkeypatch.setenv("KUBELORA_TRAINER_METRICS_ADDR", "::")
    assert env_of(handlers.operator_config())["KUBELORA_METRICS_ADDR"] == "::"


def test_the_ticker_does_not_wait_for_the_audit():
    """The audit's GETs (one per finished job, each up to the API timeout when the server hangs) run
    in a task of their own: the ticker keeps polling the active jobs meanwhile, and a second audit
    does not start while one runs."""
    import asyncio
    import threading
    from kubelora_operator import syncer
    release, audits = threading.Event(), []

    def exists(key, uid):
        audits.append(key)
        release.wait(30)
        return True

    async def main():
        synced = []
        s = syncer.Syncer(lambda b, r: synced.append(b["metadata"]["name"]), interval=0.05, exists=exists,
                          audit_every=1)
        s.owners.remember({"metadata": {"namespace": "ns", "name": "done", "uid": "u1", "resourceVersion": "1"},
                           "status": {"phase": "Succeeded"}})
        s.owners.remember({"metadata": {"namespace": "ns", "name": "active", "uid": "u2", "resourceVersion": "1"},
                           "status": {"phase": "Training"}})
        s.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while synced.count("active") < 5 and loop.time() < deadline:   # polled while the audit hangs
            await asyncio.sleep(0.02)
        hung = list(audits)
        release.set()
        await s.stop()
        return synced.count("active"), hung
    polled, hung = asyncio.run(main())
    assert polled >= 5 and hung == [("ns", "done")]   # one audit at a time, the ticker went on


def test_a_read_that_raises_frees_the_probe_and_changes_no_backoff():
    import pytest
    from kubelora_operator.artifacts import ReadBackoff, _error
    now = [0.0]
    b = ReadBackoff(first=10, most=40, clock=lambda: now[0])
    store = ("http://minio:9000", "path", "", "out")
    down = _error("reading s3://out/a/status/progress.json: timed out", unreachable=True, cause="ReadTimeoutError")
    b.read(("a", "progress"), lambda: (None, down), store)
    now[0] = 11

    def boom():
        raise RuntimeError("a bug in the read")
    with pytest.raises(RuntimeError):
        b.read(("b", "progress"), boom, store)          # the probe raised
    assert ("store", store) in b._entries and not b._probing   # nothing learnt of the store; the flag freed
    got = b.read(("c", "progress"), lambda: ({"step": 1}, None), store)
    assert got == ({"step": 1}, None)                   # c probed and opened it


def test_finished_jobs_deleted_while_the_watch_was_down_are_forgotten_by_the_audit():
    """A re-list after 410 Gone reports no DELETED; an active job's sync finds it gone, but a
    finished one is never synced again, so it stayed in memory and in the operator's metrics until
    a restart. The audit looks up the jobs the ticker does not sync: gone (or another object of the
    name) is forgotten; an API error forgets nothing."""
    from kubelora_operator import syncer

    def body(name, phase, uid):
        return {"metadata": {"namespace": "ns", "name": name, "uid": uid, "resourceVersion": "1"},
                "status": {"phase": phase}}
    answers = {("ns", "gone"): False, ("ns", "kept"): True, ("ns", "deleted"): False, ("ns", "unknown"): None,
               ("ns", "after"): False}
    asked = []

    def exists(key, uid):
        asked.append(key)
        return answers[key]
    s = syncer.Syncer(lambda b, r: None, interval=10, exists=exists)
    for name, phase in (("gone", "Succeeded"), ("kept", "Failed"), ("deleted", "Training"), ("unknown", "Succeeded"),
                        ("after", "Succeeded"), ("running", "Training")):
        b = body(name, phase, f"uid-{name}")
        if name == "deleted":   # last seen being deleted (a foreground cascade), its DELETED lost
            b["metadata"]["deletionTimestamp"] = "2026-11-28T12:00:00Z"
        s.owners.remember(b)
    assert s.audit() == 2   # gone and deleted; the API error at "unknown" ends the pass before "after"
    assert sorted(k[1] for k, _ in s.owners.items()) == ["after", "kept", "running", "unknown"]
    assert ("ns", "running") not in asked and ("ns", "after") not in asked   # an active job's sync finds it gone
