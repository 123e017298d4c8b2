"""Every object the operator sends passes kubernetes-validate --strict against the real API
schemas (the emulated API server does not validate built-in kinds): types, required fields and no
unknown fields, for a spec that uses every resource option."""
import kubernetes_validate as kv  # a test dependency (pyproject [test])
import pytest

from kubelora_operator import manifests
from kubelora_trainer.spec import parse_spec

FULL = {"model": {"type": "flux", "diffusersPath": "s3://bkt/flux"}, "dataset": {"uri": "s3://bkt/data"},
        "output": {"uri": "s3://bkt/out"}, "storage": {"credentialsSecret": "creds", "endpoint": "http://minio:9000",
                                                       "region": "eu-west-1"},
        "resources": {"nodes": 2, "gpusPerNode": 8, "requests": {"cpu": "32", "memory": "400Gi"},
                      "limits": {"memory": "900Gi"}, "nodeSelector": {"gpu": "h100"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "priorityClassName": "training", "schedulerName": "volcano", "cacheVolumeClaim": "cache",
                      "image": "reg/trainer:1", "gpuResource": "nvidia.com/mig-3g.40gb", "serviceAccountName": "s3-reader",
                      "podAnnotations": {"karpenter.sh/do-not-disrupt": "true"}},
        "runPolicy": {"activeDeadlineSeconds": 3600, "suspend": True}}


# every operator-wide option set (the chart's trainer.imagePullSecrets, metricsPort, metricsLingerSeconds,
# tmpSize, operator.listenAddress)
FULL_CONFIG = manifests.OperatorConfig(image_pull_secrets=("regcred", "mirror"), metrics_port=9500,
                                       metrics_linger_seconds=120, run_as_user=None, shm_size="64Gi",
                                       tmp_size="50Gi", metrics_addr="::")


@pytest.mark.parametrize("spec,cfg", [(FULL, FULL_CONFIG),
                                      ({k: FULL[k] for k in ("model", "dataset", "output")}, manifests.OperatorConfig()),
                                      ({**{k: FULL[k] for k in ("model", "dataset", "output")},
                                        "resources": {"nodes": 2, "cacheSize": "200Gi"}}, manifests.OperatorConfig())],
                         ids=["full", "minimal", "cache-size"])
def test_every_child_passes_strict_validation(spec, cfg):
    objs = manifests.children("ft", "0b7e6c2c-0000-4000-8000-000000000000", "ml", parse_spec(spec), cfg)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]
    for obj in objs:
        kv.validate(obj, "1.33.0", strict=True)  # raises ValidationError naming the field
    pod = objs[-1]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert ("imagePullSecrets" in pod) == bool(cfg.image_pull_secrets)
    assert objs[1]["spec"]["selector"][manifests.UID_LABEL] == objs[-1]["spec"]["template"]["metadata"]["labels"][
        manifests.UID_LABEL] == "0b7e6c2c-0000-4000-8000-000000000000"
    assert objs[-1]["spec"]["template"]["metadata"].get("annotations") == spec.get("resources", {}).get("podAnnotations")


def test_a_job_queued_in_kueue_passes_strict_validation():
    labels = {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high", "app": "x"}
    objs = manifests.children("ft", "0b7e6c2c-0000-4000-8000-000000000000", "ml", parse_spec(FULL),
                              manifests.OperatorConfig(), owner_labels=labels)
    job = objs[-1]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    for obj in objs:
        kv.validate(obj, "1.33.0", strict=True)


def test_events_pass_strict_validation():
    body = {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
            "metadata": {"name": "ft", "namespace": "ml", "uid": "0b7e6c2c-0000-4000-8000-000000000000"}}
    kv.validate(manifests.event(body, "Normal", "Training", "Pending -> Training: training", "2026-01-01T00:00:00Z",
                                "kubelora-operator-7d9f"), "1.33.0", strict=True)


def test_the_example_network_policy_is_valid_and_selects_the_trainer_pods():
    import pathlib

    import yaml
    policy = yaml.safe_load((pathlib.Path(__file__).parent.parent / "examples" / "cluster" / "networkpolicy.yaml").read_text())
    kv.validate(policy, "1.33.0", strict=True)
    pod = manifests.children("ft", "0b7e6c2c-0000-4000-8000-000000000000", "ml", parse_spec(FULL),
                             manifests.OperatorConfig())[-1]["spec"]["template"]
    selected = policy["spec"]["podSelector"]["matchExpressions"][0]
    assert selected == {"key": manifests.JOB_LABEL, "operator": "Exists"} and manifests.JOB_LABEL in pod["metadata"]["labels"]
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0] == selected
    ports = {p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert policy["spec"]["ingress"][1]["ports"][0]["port"] == manifests.OperatorConfig.metrics_port in ports


@pytest.mark.parametrize("namespaces", [None, ("monitoring", "kps"), ()], ids=["any-scraper", "named", "no-scraper"])
def test_a_jobs_own_network_policy_is_valid_and_admits_only_its_pods_and_scrapers(namespaces):
    """networkPolicy.perJob: one policy per job, made before its Job, selecting this run's pods (job
    name and uid), which admit only each other (the rendezvous store takes any client) and, to the
    metrics port, the monitoring namespaces' pods."""
    uid = "0b7e6c2c-0000-4000-8000-000000000000"
    cfg = manifests.OperatorConfig(job_network_policy=True, metrics_namespaces=namespaces)
    objs = manifests.children("ft", uid, "ml", parse_spec(FULL), cfg)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    policy, pod = objs[2], objs[-1]["spec"]["template"]
    kv.validate(policy, "1.33.0", strict=True)
    assert policy["metadata"]["name"] == "ft-peers" and policy["metadata"]["ownerReferences"][0]["uid"] == uid
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items() and selector[manifests.UID_LABEL] == uid
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers, *scrape = policy["spec"]["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": selector}}]}
    if namespaces == ():
        assert scrape == []
    else:
        (rule,) = scrape
        assert rule["ports"] == [{"port": cfg.metrics_port, "protocol": "TCP"}]
        assert ("from" in rule) == bool(namespaces)
    assert [o["kind"] for o in manifests.children("ft", uid, "ml", parse_spec(FULL), manifests.OperatorConfig())] == [
        "ConfigMap", "Service", "Job"]   # off by default


def test_the_service_pointed_at_a_gang_restarts_new_job_passes_strict_validation():
    """A gang restart merges the new Job's controller-uid into the headless Service's selector
    (kube.select_pods_of, a merge patch): the Service it leaves passes the schema too (the emulator
    validates no built-in kind)."""
    cfg_objs = manifests.children("ft", "0b7e6c2c-0000-4000-8000-000000000000", "ml", parse_spec(FULL), FULL_CONFIG)
    service = cfg_objs[1]
    job = {"metadata": {"uid": "5f1d2a9e-1111-4000-8000-000000000000"}}
    patched = {**service, "spec": {**service["spec"], "selector": {**service["spec"]["selector"],
                                                                    **manifests.attempt_selector(job)}}}
    kv.validate(patched, "1.33.0", strict=True)
    assert patched["spec"]["selector"][manifests.CONTROLLER_UID_LABEL] == job["metadata"]["uid"]
