"""charts/kubelora: rendered offline with helm-python-sdk (no helm binary, no network) with its
defaults and with variations, linted, its schema refusing unknown keys, and every rendered built-in
object checked by kubernetes-validate --strict (1.33 schemas). The RBAC is checked against the
operator's recorded API calls in test_chart_rbac.py."""
import json
import shutil

import kubernetes_validate as kv
import pytest
import yaml

import helm_python as helm
from chart_render import CHART, NAMESPACE, aggregated, notes, objects
from kubelora_operator import manifests
from kubelora_trainer.crd import render as render_crd
from kubelora_trainer.spec import parse_spec

MONITORING = "monitoring.coreos.com/v1"
MONITORS = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                        "podMonitor": {"enabled": True, "labels": {"release": "kps"}},
                        "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}},
            "dashboard": {"enabled": True}}
NAMESPACED = {"watchNamespaces": ["ml", "research"]}
EXTRAS = {"cacheVolumeClaim": {"create": True, "storageClassName": "nfs", "size": "2Ti"},
          "commonLabels": {"team": "vision"},
          "operator": {"s3": {"credentialsSecret": "op-s3", "endpoint": "http://minio:9000", "region": "eu-west-1"},
                       "extraEnv": [{"name": "AWS_MAX_ATTEMPTS", "value": "8"}],
                       "nodeSelector": {"pool": "system"}, "podLabels": {"cost": "ops"},
                       "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
                       "imagePullSecrets": [{"name": "ghcr"}], "priorityClassName": "system-cluster-critical"},
          "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/kl"}}}
NO_SA = {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False},
         "metrics": {"service": {"enabled": False}}}
SHARED = {"rbac": {"secretNames": ["s3-creds"]}, "runAsUser": "platform", "trainer": {"shmSize": "64Gi"},
          "networkPolicy": {"create": True, "metricsNamespaces": ["monitoring", "kps"]},
          "operator": {"s3": {"jobCredentialsOnly": True, "allowedEndpoints": ["http://minio.minio:9000"]}}}
HA = {"operator": {"replicas": 2, "podDisruptionBudget": {"enabled": True},
                   "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                  "whenUnsatisfiable": "ScheduleAnyway"}]}}
VARIATIONS = {"defaults": {}, "monitors": MONITORS, "ha": HA, "shared-cluster": {**SHARED, **NAMESPACED}, "namespaced": {**NAMESPACED, **MONITORS, "cacheVolumeClaim": {"create": True}},
              "extras": EXTRAS, "no-sa-no-rbac": NO_SA, "scaled-to-zero": {"operator": {"replicas": 0}}}


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind):
    (obj,) = by_kind(objs, kind)
    return obj


def operator_role(objs) -> dict:
    (role,) = [o for o in by_kind(objs, "ClusterRole") if not aggregated(o)]
    return role


def env(container) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_chart_crd_matches_generated():
    assert (CHART / "crds" / "loratrainingjobs.kubelora.dev.yaml").read_text() == render_crd(), \
        "charts/kubelora/crds/ is stale: run `make crd`"


def test_chart_crd_passes_strict_validation():
    kv.validate(yaml.safe_load(render_crd()), "1.33.0", strict=True)


@pytest.mark.parametrize("name", VARIATIONS)
def test_every_built_in_object_passes_strict_validation(name):
    objs = objects(VARIATIONS[name])
    assert objs
    for obj in objs:
        if obj["apiVersion"] == MONITORING:
            assert obj["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")  # CRDs: no schema here
            continue
        kv.validate(obj, "1.33.0", strict=True)  # raises ValidationError naming the field


@pytest.mark.parametrize("name", VARIATIONS)
def test_lints_clean(name):
    report = helm.lint(str(CHART), VARIATIONS[name], strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_defaults_one_locked_down_operator_cluster_wide():
    objs = objects()
    assert sorted(o["kind"] for o in objs) == ["ClusterRole"] * 3 + ["ClusterRoleBinding", "Deployment", "Role",
                                                                     "RoleBinding", "Service", "ServiceAccount"]
    dep = one(objs, "Deployment")
    # leader election: an upgrade rolls; the new pod takes the Lease the old one releases
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"] and c["resources"]["limits"]["memory"]
    assert c["image"] == "ghcr.io/kubelora/operator:0.1.0"
    assert c["args"][:3] == ["python", "-m", "kubelora_operator"] and not any("--namespace" in a for a in c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--liveness=http://0.0.0.0:{ports['liveness']}/healthz" in c["args"]
    assert {"--lease=kubelora/kl-kubelora", "--identity=$(POD_NAME)", "--log-format=full"} <= set(c["args"])
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]
    assert pod["terminationGracePeriodSeconds"] == 90 and c["readinessProbe"]["httpGet"]["port"] == "liveness"
    (lease_role,) = by_kind(objs, "Role")
    assert lease_role["metadata"] == {**lease_role["metadata"], "namespace": NAMESPACE, "name": "kl-kubelora-leader"}
    assert {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"],
            "resourceNames": ["kl-kubelora"]} in lease_role["rules"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    e = env(c)
    assert e["KUBELORA_TRAINER_IMAGE"] == "ghcr.io/kubelora/trainer:0.1.0"
    assert e["KUBELORA_OPERATOR_METRICS_PORT"] == str(ports["metrics"]) == "9401"
    assert {"KUBELORA_SYNC_INTERVAL", "KUBELORA_STORAGE_STALL_SECONDS", "KUBELORA_SECRET_CACHE_SECONDS"} <= set(e)
    svc = one(objs, "Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9401, "targetPort": "metrics", "protocol": "TCP"}]
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]


def test_images_are_values():
    c = one(objects({"operator": {"image": {"repository": "reg.local/kl-op", "tag": "dev", "pullPolicy": "Always"}},
                     "trainer": {"image": {"repository": "reg.local/kl-trainer", "tag": "cu128"}}}),
            "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "reg.local/kl-op:dev" and c["imagePullPolicy"] == "Always"
    assert env(c)["KUBELORA_TRAINER_IMAGE"] == "reg.local/kl-trainer:cu128"


def test_namespaced_mode_roles_per_namespace_and_the_operator_told():
    objs = objects(NAMESPACED)
    c = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in c["args"] if a.startswith("--namespace")] == ["--namespace=ml", "--namespace=research"]
    # a Role in each watched namespace, and the leader Lease's in the release namespace
    assert sorted(r["metadata"]["namespace"] for r in by_kind(objs, "Role")) == [NAMESPACE, "ml", "research"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objs, "RoleBinding")) == [NAMESPACE, "ml", "research"]
    cluster = {r for rule in operator_role(objs)["rules"] for r in rule["resources"]}
    assert cluster == {"customresourcedefinitions", "namespaces", "nodes"}  # cluster-scoped reads only


def test_monitors_select_the_operator_and_the_trainer_pods():
    objs = objects(MONITORS)
    svc, sm, pm = one(objs, "Service"), one(objs, "ServiceMonitor"), one(objs, "PodMonitor")
    for m in (sm, pm):
        assert m["metadata"]["labels"]["release"] == "kps"  # kube-prometheus-stack's selectors
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]]
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    pod_labels = manifests.labels("ft")  # what the operator puts on every trainer pod
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert all(x["key"] in pod_labels for x in pm["spec"]["selector"]["matchExpressions"])
    ns = one(objects({**NAMESPACED, **MONITORS}), "PodMonitor")["spec"]["namespaceSelector"]
    assert ns == {"matchNames": ["ml", "research"]}
    # only the trainer's own series are kept from a trainer pod (its image may be a tenant's)
    import re
    (keep,) = pm["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]
    assert keep["action"] == "keep" and keep["sourceLabels"] == ["__name__"]
    assert re.fullmatch(keep["regex"], "kubelora_trainer_loss") and not re.fullmatch(keep["regex"], "kubelora_operator_leader")


def test_the_pod_monitors_port_is_declared_by_the_trainer_pods(monkeypatch):
    """trainer.metricsPort and trainer.metricsLingerSeconds reach the trainer pods: the chart tells
    the operator, which sets the pods' port and environment from them."""
    from kubelora_operator import handlers
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "s3://models/flux"}, "dataset": {"uri": "s3://data/set"},
                       "output": {"uri": "s3://out/run"}})

    def trainer_pod(cfg):
        job = manifests.children("ft", "0b7e6c2c-0000-4000-8000-000000000000", "ml", spec, cfg)[-1]
        c = job["spec"]["template"]["spec"]["containers"][0]
        return {p["name"]: p["containerPort"] for p in c.get("ports", [])}, env(c)
    ports, e = trainer_pod(manifests.OperatorConfig())
    assert ports["metrics"] == 9400 and e["KUBELORA_METRICS_PORT"] == "9400" and e["KUBELORA_METRICS_LINGER_SECONDS"] == "60"
    # Prometheus scrapes the pod's IP: no address set (0.0.0.0), the port set (a taken one is a warning)
    assert "KUBELORA_METRICS_ADDR" not in e
    op = env(one(objects({"trainer": {"metricsPort": 9500, "metricsLingerSeconds": 120}}),
                 "Deployment")["spec"]["template"]["spec"]["containers"][0])
    for k in ("KUBELORA_TRAINER_METRICS_PORT", "KUBELORA_TRAINER_METRICS_LINGER_SECONDS"):
        monkeypatch.setenv(k, op[k])
    ports, e = trainer_pod(handlers.operator_config())
    assert ports["metrics"] == 9500 and e["KUBELORA_METRICS_PORT"] == "9500" and e["KUBELORA_METRICS_LINGER_SECONDS"] == "120"


def test_trainer_pods_pull_with_the_charts_secrets_and_mount_no_api_token(monkeypatch):
    from kubelora_operator import handlers
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "s3://models/flux"}, "dataset": {"uri": "s3://data/set"},
                       "output": {"uri": "s3://out/run"}})

    def pod(cfg):
        return manifests.children("ft", "0b7e6c2c-0000-4000-8000-000000000000", "ml", spec, cfg)[-1]["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in pod(manifests.OperatorConfig())
    assert pod(manifests.OperatorConfig())["automountServiceAccountToken"] is False
    op = env(one(objects({"trainer": {"imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}]}}),
                 "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert op["KUBELORA_TRAINER_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    monkeypatch.setenv("KUBELORA_TRAINER_IMAGE_PULL_SECRETS", op["KUBELORA_TRAINER_IMAGE_PULL_SECRETS"])
    assert pod(handlers.operator_config())["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "KUBELORA_TRAINER_IMAGE_PULL_SECRETS" not in env(one(objects({}), "Deployment")["spec"]["template"]["spec"]
                                                             ["containers"][0])


def test_alerts_and_dashboard_come_from_the_charts_files(tmp_path):
    if not (CHART / "files" / "alerts.yaml").exists() and not (CHART / "files" / "dashboard.json").exists():
        kinds = {o["kind"] for o in objects(MONITORS)}  # enabled, but nothing to ship yet: nothing rendered
        assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds
        text = notes(MONITORS)
        assert "no files/alerts.yaml" in text and "no files/dashboard.json" in text
    chart = tmp_path / "kubelora"
    shutil.copytree(CHART, chart)
    groups = [{"name": "kubelora", "rules": [{"alert": "KubeloraJobFailed", "expr": "kubelora_jobs{phase=\"Failed\"} > 0",
                                               "for": "1m", "labels": {"severity": "warning"}}]}]
    (chart / "files").mkdir(exist_ok=True)
    (chart / "files" / "alerts.yaml").write_text(yaml.safe_dump({"groups": groups}))
    dashboard = {"title": "kubelora", "uid": "kubelora", "panels": [{"type": "timeseries", "title": "loss"}]}
    (chart / "files" / "dashboard.json").write_text(json.dumps(dashboard, indent=2))
    values = {**MONITORS, "dashboard": {"enabled": True, "label": "grafana_dashboard", "labelValue": "1",
                                        "namespace": "monitoring", "annotations": {"grafana_folder": "kubelora"}}}
    objs = objects(values, chart)
    assert one(objs, "PrometheusRule")["spec"]["groups"] == groups
    cm = one(objs, "ConfigMap")
    kv.validate(cm, "1.33.0", strict=True)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["kubelora.json"]) == dashboard
    assert one(objects({**MONITORS, "dashboard": {"enabled": True, "label": "dash", "labelValue": "yes"}}, chart),
               "ConfigMap")["metadata"]["labels"]["dash"] == "yes"

    # the chart's own rules: KubeloraOperatorAbsent only where its ServiceMonitor has the operator scraped
    def alerts(values):
        return {r["alert"] for g in one(objects(values), "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    shipped = {r["alert"] for g in yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"] for r in g["rules"]}
    assert alerts(MONITORS) == shipped
    no_sm = {**MONITORS, "metrics": {**MONITORS["metrics"], "serviceMonitor": {"enabled": False}}}
    assert alerts(no_sm) == shipped - {"KubeloraOperatorAbsent"}


def test_cache_claim_in_each_watched_namespace():
    claims = by_kind(objects({**NAMESPACED, "cacheVolumeClaim": {"create": True}}), "PersistentVolumeClaim")
    assert sorted(c["metadata"]["namespace"] for c in claims) == ["ml", "research"]
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims)
    assert claims[0]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    (claim,) = by_kind(objects(EXTRAS), "PersistentVolumeClaim")
    assert claim["metadata"]["namespace"] == NAMESPACE and claim["spec"]["storageClassName"] == "nfs"
    assert claim["metadata"]["labels"]["team"] == "vision"


def test_network_policy_in_each_watched_namespace_as_the_example_admits():
    """networkPolicy.create: the policy of examples/cluster/networkpolicy.yaml (checked against the
    operator's pod labels and ports in test_operator_strict.py) in every watched namespace."""
    import pathlib
    example = yaml.safe_load((pathlib.Path(__file__).parent.parent / "examples" / "cluster" / "networkpolicy.yaml").read_text())
    assert not by_kind(objects({}), "NetworkPolicy")  # off by default
    (policy,) = by_kind(objects({"networkPolicy": {"create": True}}), "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE and policy["spec"] == example["spec"]
    policies = by_kind(objects({**NAMESPACED, "networkPolicy": {"create": True, "metricsNamespaces": ["a", "b"]},
                                "trainer": {"metricsPort": 9555}}), "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml", "research"]
    scrape = policies[0]["spec"]["ingress"][1]
    assert [f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in scrape["from"]] == ["a", "b"]
    assert scrape["ports"] == [{"port": 9555, "protocol": "TCP"}]
    (closed,) = by_kind(objects({"networkPolicy": {"create": True, "metricsNamespaces": []}}), "NetworkPolicy")
    assert len(closed["spec"]["ingress"]) == 1  # the job's own pods only
    # perJob: the operator makes each job's policy (its pods only, wherever the job runs), with the rights
    # to do it and the scrapers' namespaces; off by default, and then no such rights
    per_job = objects({"networkPolicy": {"perJob": True, "metricsNamespaces": ["monitoring", "kps"]}})
    e = env(one(per_job, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert e["KUBELORA_JOB_NETWORK_POLICY"] == "true" and e["KUBELORA_METRICS_NAMESPACES"] == "monitoring,kps"
    rule = {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "get", "delete"]}
    assert rule in operator_role(per_job)["rules"] and rule not in operator_role(objects({}))["rules"]
    assert "KUBELORA_JOB_NETWORK_POLICY" not in env(one(objects({}), "Deployment")["spec"]["template"]["spec"]["containers"][0])
    # cluster-wide: the namespaces the jobs run in are named, else only the release's is covered, said
    listed = by_kind(objects({"networkPolicy": {"create": True, "namespaces": ["team-a", "team-b"]}}), "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in listed) == ["team-a", "team-b"]
    assert "WARNING: networkPolicy.create in a cluster-wide install covers only" in notes({"networkPolicy": {"create": True}})
    assert "WARNING" not in notes({"networkPolicy": {"create": True, "namespaces": ["team-a"]}})
    assert "WARNING" not in notes({**NAMESPACED, "networkPolicy": {"create": True}})


def test_extras_reach_the_pod():
    objs = objects(EXTRAS)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    e = env(c)
    assert e["AWS_ENDPOINT_URL"] == "http://minio:9000" and e["AWS_MAX_ATTEMPTS"] == "8"
    assert e["KUBELORA_S3_CREDENTIALS_DIR"] == "/var/run/secrets/kubelora/s3"
    assert {"name": "s3-credentials", "secret": {"secretName": "op-s3"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"pool": "system"} and pod["imagePullSecrets"] == [{"name": "ghcr"}]
    assert all(o["metadata"]["labels"]["team"] == "vision" for o in objs)


def test_no_service_account_or_rbac_when_brought_by_the_user():
    objs = objects(NO_SA)
    assert sorted(o["kind"] for o in objs) == ["Deployment"]
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


@pytest.mark.parametrize("values", [{"bogus": 1}, {"operator": {"bogus": 1}}, {"operator": {"settings": {"syncInterval": 5}}},
                                    {"metrics": {"serviceMonitor": {"enabled": True, "label": {"a": "b"}}}},
                                    {"operator": {"image": {"repo": "x"}}}, {"dashboard": {"enable": True}}],
                         ids=["top", "operator", "settings", "serviceMonitor", "image", "dashboard"])
def test_the_schema_rejects_unknown_keys(values):
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmValuesError, match="additional properties|additionalProperties"):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="kl", namespace=NAMESPACE)


def test_every_level_of_the_schema_is_closed():
    schema = json.loads((CHART / "values.schema.json").read_text())
    passthrough = {"global"}  # Helm's own key for parent charts

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for k, v in node["properties"].items():
                if k not in passthrough:
                    walk(v, f"{path}.{k}")
        elif node.get("type") == "object" and path.split(".")[-1] not in (  # Kubernetes types, checked by the API server
                "valueFrom", "tolerations[]", "claims[]", "nodeAffinity", "podAffinity", "podAntiAffinity", "labelSelector"):
            assert isinstance(node.get("additionalProperties"), dict), f"{path}: a map needs a value type"
        if node.get("type") == "array":
            walk(node["items"], f"{path}[]")
    walk(schema, "values")
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(yaml.safe_load((CHART / "values.yaml").read_text()))  # the defaults pass


def test_replicas_need_leader_election_and_its_timings_are_checked():
    """Two replicas: one acts, one stands by (the Lease); without leader election at most one, and
    an upgrade stops the old pod first."""
    chart = helm.Chart.load(str(CHART))
    two = objects({"operator": {"replicas": 2}})
    assert one(two, "Deployment")["spec"]["replicas"] == 2
    without = {"operator": {"leaderElection": {"enabled": False}}}
    with pytest.raises(helm.HelmError, match="replicas: at most 1 without"):
        chart.render({"operator": {"replicas": 2, **without["operator"]}}, name="kl", namespace=NAMESPACE)
    solo = objects(without)
    dep = one(solo, "Deployment")
    assert dep["spec"]["strategy"] == {"type": "Recreate"} and not by_kind(solo, "Role")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert not any(a.startswith(("--lease", "--identity")) for a in c["args"])
    for bad, match in (({"renewDeadlineSeconds": 15}, "renewDeadlineSeconds must be below"),
                       ({"retryPeriodSeconds": 10}, "retryPeriodSeconds must be below")):
        with pytest.raises(helm.HelmError, match=match):
            chart.render({"operator": {"leaderElection": bad}}, name="kl", namespace=NAMESPACE)


def test_rbac_without_a_named_service_account_is_refused():
    """serviceAccount.create=false and no name would bind the operator's rights (create Jobs, read
    Secrets) to the namespace's default ServiceAccount, and so to every pod there."""
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError, match="needs serviceAccount.name"):
        chart.render({"serviceAccount": {"create": False}}, name="kl", namespace=NAMESPACE)
    objs = objects({"serviceAccount": {"create": False, "name": "ops"}})
    assert {s["name"] for o in objs if o["kind"].endswith("Binding") for s in o["subjects"]} == {"ops"}


def test_the_metrics_port_cannot_be_the_liveness_port():
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError, match="metricsPort and operator.livenessPort must differ"):
        chart.render({"operator": {"metricsPort": 8080}}, name="kl", namespace=NAMESPACE)


def test_a_shared_cluster_can_narrow_secrets_and_buckets_the_operator_reads():
    objs = objects({"rbac": {"secretNames": ["s3-creds", "team-b-s3"]},
                    "operator": {"s3": {"jobCredentialsOnly": True, "allowedEndpoints": ["http://minio.minio:9000"]}}})
    (secrets,) = [r for r in operator_role(objs)["rules"] if "secrets" in r["resources"]]
    assert secrets == {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                       "resourceNames": ["s3-creds", "team-b-s3"]}
    e = env(one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert e["KUBELORA_JOB_CREDENTIALS_ONLY"] == "true" and e["KUBELORA_S3_ALLOWED_ENDPOINTS"] == "http://minio.minio:9000"
    (default,) = [r for r in operator_role(objects({}))["rules"] if "secrets" in r["resources"]]
    assert default["resourceNames"] == ["ml-s3-credentials"]   # least privilege by default: the examples' name
    (every,) = [r for r in operator_role(objects({"rbac": {"secretNames": []}}))["rules"] if "secrets" in r["resources"]]
    assert "resourceNames" not in every                          # any Secret: asked for explicitly
    assert "KUBELORA_JOB_CREDENTIALS_ONLY" not in env(one(objects({}), "Deployment")["spec"]["template"]["spec"]["containers"][0])
    pods = {"allowedImages": ["registry.corp/ml/", "ghcr.io/kubelora/trainer:0.1.0"], "allowedServiceAccounts": ["trainer"]}
    e = env(one(objects({"operator": {"pods": pods}}), "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert e["KUBELORA_ALLOWED_IMAGES"] == "registry.corp/ml/,ghcr.io/kubelora/trainer:0.1.0"
    assert e["KUBELORA_ALLOWED_SERVICE_ACCOUNTS"] == "trainer"


def test_openshift_assigns_the_uids_when_run_as_user_is_platform():
    objs = objects({"runAsUser": "platform", "trainer": {"shmSize": "64Gi"}})
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    e = env(pod["containers"][0])
    assert e["KUBELORA_TRAINER_RUN_AS_USER"] == "platform" and e["KUBELORA_TRAINER_SHM_SIZE"] == "64Gi"
    default = one(objects({}), "Deployment")["spec"]["template"]["spec"]
    assert default["securityContext"]["fsGroup"] == 1000
    assert env(default["containers"][0])["KUBELORA_TRAINER_RUN_AS_USER"] == "1000"
    # a value missing from an older release's values (helm upgrade --reuse-values) is the default
    reused = one(objects({"runAsUser": None}), "Deployment")["spec"]["template"]["spec"]
    assert reused["securityContext"]["runAsUser"] == 1000
    assert env(reused["containers"][0])["KUBELORA_TRAINER_RUN_AS_USER"] == "1000"
    # values added since (leader election, the log format): the chart's defaults, election on
    old = objects({"operator": {"leaderElection": None, "logFormat": None}})
    c = one(old, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"--lease=kubelora/kl-kubelora", "--log-format=full"} <= set(c["args"])
    assert env(c)["KUBELORA_LEASE_DURATION_SECONDS"] == "15" and by_kind(old, "Role")
    partial = one(objects({"operator": {"leaderElection": {"enabled": False}}}), "Deployment")
    assert not any(a.startswith("--lease") for a in partial["spec"]["template"]["spec"]["containers"][0]["args"])
    # ... and this session's: the network policy map, the pods' allow-lists, the storage retry settings
    gone = {"networkPolicy": None, "operator": {"pods": None, "settings": {"storageRetrySeconds": None,
                                                                         "storageRetryMaxSeconds": None}}}
    old = objects(gone)
    c = one(old, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert not by_kind(old, "NetworkPolicy") and "KUBELORA_JOB_NETWORK_POLICY" not in env(c)
    assert env(c)["KUBELORA_STORAGE_RETRY_SECONDS"] in ("", None) and "KUBELORA_ALLOWED_IMAGES" not in env(c)  # the default
    assert "WARNING: networkPolicy" not in notes(gone)


def test_namespace_users_get_loratrainingjobs_through_the_default_roles():
    """edit/admin may create and delete jobs, view may read them; nothing else is granted, and the
    aggregated roles can be left out."""
    roles = {o["metadata"]["name"]: o for o in by_kind(objects({}), "ClusterRole") if aggregated(o)}
    edit, view = roles["kl-kubelora-edit"], roles["kl-kubelora-view"]
    assert {"rbac.authorization.k8s.io/aggregate-to-edit", "rbac.authorization.k8s.io/aggregate-to-admin"} <= set(
        edit["metadata"]["labels"])
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert [r["resources"] for r in edit["rules"]] == [["loratrainingjobs"]] and "create" in edit["rules"][0]["verbs"]
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert not [o for o in by_kind(objects({"rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole") if aggregated(o)]


def test_an_ipv6_only_cluster_gets_servers_that_listen_on_ipv6():
    """operator.listenAddress '::': kopf's liveness endpoint, the operator's metrics and the trainer
    pods' metrics bind IPv6 (the kubelet and Prometheus reach a pod by its IPv6 address there; they
    bound 0.0.0.0 only, so the pod never became Ready). The default stays IPv4."""
    def container(values):
        return one(objects(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    c = container({"operator": {"listenAddress": "::"}})
    assert "--liveness=http://[::]:8080/healthz" in c["args"]
    assert env(c)["KUBELORA_OPERATOR_METRICS_ADDR"] == "::" and env(c)["KUBELORA_TRAINER_METRICS_ADDR"] == "::"
    c = container({})
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"] and env(c)["KUBELORA_OPERATOR_METRICS_ADDR"] == "0.0.0.0"
    with pytest.raises(helm.HelmError, match="listenAddress"):
        helm.Chart.load(str(CHART)).render({"operator": {"listenAddress": "localhost"}}, name="kl", namespace=NAMESPACE)


def test_the_metrics_servers_bind_an_ipv6_address():
    """What the chart's '::' asks of the code: the trainer's (and the operator's) metrics server on an
    IPv6 address answers there (wsgiref's server binds IPv4 only by itself)."""
    import urllib.request
    from prometheus_client import CollectorRegistry, Gauge
    from kubelora_trainer import metrics
    registry = CollectorRegistry()
    Gauge("kubelora_probe", "a probe", registry=registry).set(7)
    server = metrics.Server(registry, 0, "::1")
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/metrics", timeout=30) as r:
            assert b"kubelora_probe 7.0" in r.read()
    finally:
        server.stop()


def test_two_replicas_spread_over_nodes_and_a_drain_keeps_one():
    """High availability: with leader election, two replicas spread by the operator's own labels
    (the chart adds the selector), and a PodDisruptionBudget so that a node drain never evicts both."""
    objs = objects(HA)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    (spread,) = pod["topologySpreadConstraints"]
    selector = one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["labelSelector"] == {"matchLabels": selector}
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    assert not by_kind(objects({}), "PodDisruptionBudget")   # opt-in
    with pytest.raises(helm.HelmError, match="minAvailable must be below operator.replicas"):
        helm.Chart.load(str(CHART)).render({"operator": {"podDisruptionBudget": {"enabled": True}}}, name="kl",
                                           namespace=NAMESPACE)
    zero = objects({"operator": {"replicas": 2, "podDisruptionBudget": {"enabled": True, "minAvailable": 0}}})
    assert one(zero, "PodDisruptionBudget")["spec"]["minAvailable"] == 0   # 0 is 0, not the default 1
    assert not by_kind(objects({"operator": {"replicas": 0, "podDisruptionBudget": {"enabled": True}}}),
                       "PodDisruptionBudget")   # scaled to zero: nothing to keep
    # a constraint with its own selector keeps it as written
    own = {"matchLabels": {"app.kubernetes.io/name": "kubelora"}}
    pod = one(objects({"operator": {"replicas": 2, "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": own}]}}),
        "Deployment")["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"][0]["labelSelector"] == own


@pytest.mark.parametrize("values", [{"operator": {"podLabels": {"app.kubernetes.io/component": "x"}}},
                                    {"commonLabels": {"app.kubernetes.io/instance": "y"}}])
def test_labels_that_would_break_the_deployments_selector_are_refused(values):
    with pytest.raises(helm.HelmError, match="may not set app.kubernetes.io/"):
        helm.Chart.load(str(CHART)).render(values, name="kl", namespace=NAMESPACE)


def test_the_trainers_metrics_port_cannot_be_its_rendezvous_port():
    from kubelora_operator.manifests import MASTER_PORT
    with pytest.raises(helm.HelmError, match="29500 is the trainer pods' rendezvous port"):
        helm.Chart.load(str(CHART)).render({"trainer": {"metricsPort": MASTER_PORT}}, name="kl", namespace=NAMESPACE)
