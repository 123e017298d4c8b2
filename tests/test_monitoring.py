"""Monitoring, checked by the real tools: a real Prometheus (Debian's package) scrapes a tiny
2-process training run (tiny Flux from SeaweedFS) and the operator's registry; the alert rules go
through `promtool check rules` and `promtool test rules`; every PromQL expression of the Grafana
dashboard parses, names only exported metrics and returns data from that Prometheus."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import promql_parser
import pytest

from conftest import write_overfit_data
import yaml
from prometheus_client.parser import text_string_to_metric_families

from prometheus_server import Prometheus, binary, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "charts" / "kubelora" / "files" / "alerts.yaml"
ALERT_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yaml"
DASHBOARD = REPO / "charts" / "kubelora" / "files" / "dashboard.json"
LTJ, NAMESPACE, STEPS = "mon-job", "team-a", 30
CPU_ONLY_EMPTY = {"kubelora_trainer_gpu_memory_bytes"}  # no CUDA here: these series stay empty
# the monitored run has no spec.evaluation: its held-out loss stays empty (tests/test_flux_train.py evaluates)
RUN_WITHOUT_EVALUATION = {"kubelora_trainer_eval_loss"}


def exported_names() -> set[str]:
    from kubelora_operator import metrics as operator_metrics
    from kubelora_trainer.metrics import TrainerMetrics
    return TrainerMetrics("x").names() | operator_metrics.names()


def metric_names(expr: str) -> set[str]:
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return {s.name: s for fam in text_string_to_metric_families(r.read().decode()) for s in fam.samples}


# ---------------------------------------------------------------- registries, no Prometheus

def test_kubelora_run_serves_metrics_to_this_machine_only_unless_told_otherwise():
    from kubelora_trainer.cli import local_env
    assert local_env({}, 2)["KUBELORA_METRICS_ADDR"] == "127.0.0.1"
    assert local_env({"KUBELORA_METRICS_ADDR": "0.0.0.0"}, 2)["KUBELORA_METRICS_ADDR"] == "0.0.0.0"
    assert "KUBELORA_METRICS_PORT" not in local_env({}, 1)   # unset: the default port, a taken one only a note


def test_a_local_run_says_when_its_world_is_not_the_clusters_and_honours_a_cpu_spec():
    from kubelora_trainer.cli import default_nproc, world_note
    from kubelora_trainer.spec import parse_spec

    def spec(**resources):
        return parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                           "output": {"uri": "/o"}, "training": {"microBatchSize": 2, "gradientAccumulationSteps": 3},
                           "resources": resources})
    assert world_note(spec(), 1) is None and world_note(spec(nodes=2, gpusPerNode=4), 8) is None
    assert world_note(spec(nodes=2, gpusPerNode=4), 2) == (
        "[kubelora] note: resources ask a cluster for 8 process(es) (2 node(s) x 4); this machine runs 2, so a "
        "step trains 12 samples, not 48 (--nproc sets the count)")
    assert default_nproc(spec(gpusPerNode=0)) == 1   # "0 trains on CPU": one process (the launch forces the CPU)


def test_a_local_run_names_the_cluster_settings_it_does_not_apply():
    """kubelora run (cli.launch) prints command.cluster_only_note: the pods' settings a workstation
    has no use for, and resources.cacheSize, which limits a pod's fresh emptyDir and would here count
    every earlier run's files in the shared cache folder. Defaults (filled in by the API server) are
    not named."""
    from kubelora_trainer.command import cluster_only_note
    from kubelora_trainer.spec import parse_spec
    base = {"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"}, "output": {"uri": "/o"}}
    assert cluster_only_note(parse_spec({**base, "resources": {"nodes": 1, "gpusPerNode": 0}})) is None
    spec = parse_spec({**base, "runPolicy": {"suspend": True, "backoffLimit": 3, "activeDeadlineSeconds": 60},
                       "resources": {"cacheSize": "1Gi", "nodeSelector": {"gpu": "h100"}},
                       "storage": {"credentialsSecret": "s3-creds"}})
    assert cluster_only_note(spec) == (
        "[kubelora] note: runPolicy.activeDeadlineSeconds, runPolicy.suspend, resources.nodeSelector, "
        "resources.cacheSize, storage.credentialsSecret are for a cluster and not applied on this machine "
        "(the operator's pods apply them)")


def test_trainer_endpoint_serves_lingers_and_never_breaks_on_a_taken_port():
    from kubelora_trainer import metrics, storage
    m = metrics.TrainerMetrics(LTJ, NAMESPACE)
    server = metrics.serve(m.registry, free_port(), "127.0.0.1")
    try:
        m.start("flux", 2, 10)
        m.phase("Training")
        m.step(3, 1, 0.25, 1e-4, 0.5, 8, 4.0, 12.0, 0.01)
        got = scrape(server.port)
        assert got["kubelora_trainer_step"].value == 3 and got["kubelora_trainer_samples_total"].value == 8
        assert got["kubelora_trainer_step"].labels == {"ltj": LTJ, "namespace": NAMESPACE}
        assert not any(n.endswith("_created") for n in got), "no *_created series"
        # a taken port is a warning, not an error
        said = []
        assert metrics.serve(m.registry, server.port, "127.0.0.1", log=said.append) is None
        assert "cannot serve metrics" in said[0] and "training goes on" in said[0]
        # the default port, not set, taken (a second `kubelora run` on a workstation): one plain line
        assert metrics.serve(m.registry, server.port, "127.0.0.1", log=said.append, port_set=False) is None
        assert said[1] == (f"[metrics] off for this run: 127.0.0.1:{server.port} is in use (another kubelora "
                           "run?); set KUBELORA_METRICS_PORT to another port to serve them")
        # after the run, serving lasts until one scrape has fetched the final state
        run = metrics.Run(m, server)
        storage.transfer_listeners.append(m.transferred)
        storage._transferred("download", 1234)
        assert scrape(server.port)["kubelora_trainer_storage_downloaded_bytes_total"].value == 1234
        t0 = time.monotonic()
        import threading
        threading.Thread(target=lambda: (time.sleep(0.3), scrape(server.port)), daemon=True).start()
        run.finish(linger=60)
        assert time.monotonic() - t0 < 30 and m.transferred not in storage.transfer_listeners
        with pytest.raises(OSError):
            scrape(server.port)
    finally:
        if m.transferred in storage.transfer_listeners:
            storage.transfer_listeners.remove(m.transferred)
    off = metrics.start(0, 1, LTJ)  # a local rank other than 0 serves nothing, updates are no-ops
    off.step(1, 1, 0.1, 1e-4, None, 4, None, None, 0.0)
    off.finish()


def test_the_bucket_summary_is_exported_and_a_new_layout_replaces_it():
    from kubelora_trainer import buckets as bk
    from kubelora_trainer.metrics import TrainerMetrics
    m = TrainerMetrics(LTJ, NAMESPACE)
    units = [bk.Unit(0, (32, 32, 1), 0, 0.0), bk.Unit(1, (48, 32, 1), 0, 0.25), bk.Unit(2, (48, 32, 1), 0, 0.0)]
    m.buckets(bk.summary(bk.Assignment(units=units, dropped=[(3, "tooShort")]), 4))

    def value(name, **labels):
        return m.registry.get_sample_value(name, {"ltj": LTJ, "namespace": NAMESPACE, **labels})
    assert value("kubelora_trainer_bucket_samples", bucket="48x32x1") == 2
    assert value("kubelora_trainer_bucket_samples", bucket="32x32x1") == 1
    assert value("kubelora_trainer_bucket_cropped_samples", bucket="48x32x1") == 1
    assert value("kubelora_trainer_bucket_mean_crop_ratio", bucket="48x32x1") == 0.125
    assert value("kubelora_trainer_bucket_dropped_items", reason="too_short") == 1
    m.buckets(bk.summary(bk.Assignment(units=units[:1], dropped=[]), 1))   # the layout made again without two items
    assert value("kubelora_trainer_bucket_samples", bucket="48x32x1") is None
    assert value("kubelora_trainer_bucket_dropped_items", reason="too_short") is None
    assert TrainerMetrics(LTJ, main=False).buckets({"buckets": {"1x1x1": {}}, "dropped": {}}) is None  # rank 0 only


def test_operator_registry_counts_reconciles_errors_and_jobs_by_phase():
    from kubelora_operator import metrics
    before = metrics.RECONCILE_ERRORS.labels("sync", "ValueError")._value.get()
    with metrics.reconcile("sync"):
        pass
    with pytest.raises(ValueError), metrics.reconcile("sync"):
        raise ValueError("boom")
    assert metrics.RECONCILE_ERRORS.labels("sync", "ValueError")._value.get() == before + 1
    jobs = [{"metadata": {"name": "a", "namespace": "n"}, "status": {"phase": "Training"}},
            {"metadata": {"name": "b", "namespace": "n"}, "status": {"phase": "Failed"}},
            {"metadata": {"name": "c", "namespace": "n", "deletionTimestamp": "x"}, "status": {"phase": "Failed"}},
            {"metadata": {"name": "d", "namespace": "m"}},
            {"metadata": {"name": "e", "namespace": "m"}, "status": {"phase": "Pending", "conditions": [
                {"type": "Stalled", "status": "True", "reason": "FailedCreate"}]}},
            {"metadata": {"name": "f", "namespace": "m"}, "status": {"phase": "Failed", "conditions": [
                {"type": "Stalled", "status": "True", "reason": "Error"}]}},
            {"metadata": {"name": "g", "namespace": "m", "labels": {"kueue.x-k8s.io/queue-name": "gpu"}},
             "status": {"phase": "Pending", "reason": "QueuedInKueue"}},
            {"metadata": {"name": "h", "namespace": "m"}, "status": {"phase": "Pending", "reason": "QuotaExceeded"}},
            {"metadata": {"name": "i", "namespace": "m"}, "status": {"phase": "Training", "restarts": 5,
                                                                       "disruptionRestarts": 2, "waitRestarts": 1}}]
    metrics.watch(lambda: jobs)
    try:
        fams = {f.name: f for f in metrics.registry.collect()}
        by_phase = {s.labels["phase"]: s.value for s in fams["kubelora_operator_jobs"].samples}
        assert by_phase["Training"] == 2 and by_phase["Failed"] == 2 and by_phase["New"] == 1 and by_phase["Pending"] == 3
        each = {(s.labels["namespace"], s.labels["ltj"], s.labels["phase"]) for s in fams["kubelora_operator_job_phase"].samples}
        assert each == {("n", "a", "Training"), ("n", "b", "Failed"), ("m", "d", "New"), ("m", "e", "Pending"),
                        ("m", "f", "Failed"), ("m", "g", "Pending"), ("m", "h", "Pending"), ("m", "i", "Training")}
        stalled = {(s.labels["ltj"], s.labels["phase"], s.labels["reason"]) for s in fams["kubelora_operator_job_stalled"].samples}
        assert stalled == {("e", "Pending", "FailedCreate")}   # a failed job has KubeloraJobFailed
        queued = {(s.labels["ltj"], s.labels["queue"]) for s in fams["kubelora_operator_job_queued"].samples}
        assert queued == {("g", "gpu")}
        waiting = {(s.labels["ltj"], s.labels["reason"]) for s in fams["kubelora_operator_job_waiting"].samples}
        assert waiting == {("h", "QuotaExceeded")}
        restarts = {(s.labels["ltj"], s.labels["kind"]): s.value for s in fams["kubelora_operator_job_restarts"].samples
                    if s.name.endswith("_total")}
        assert {k: v for k, v in restarts.items() if k[0] == "i"} == {("i", "failure"): 2, ("i", "disruption"): 2,
                                                                     ("i", "incomplete"): 1}  # KubeloraJobRestarting
        assert restarts[("a", "failure")] == 0   # from 0 for every job: increase() sees the first restart
    finally:
        metrics.watch(None)


def test_trainer_pods_get_the_metrics_port_and_labels():
    from kubelora_operator import manifests
    from kubelora_trainer.spec import parse_spec
    demo = yaml.safe_load((REPO / "examples" / "demo-flux.yaml").read_text())
    job = manifests.job("j", "uid", "ns1", parse_spec(demo["spec"]), manifests.OperatorConfig())
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBELORA_JOB_NAME"] == "j" and env["KUBELORA_NAMESPACE"] == "ns1"
    assert env["KUBELORA_METRICS_PORT"] == "9400" and {"name": "metrics", "containerPort": 9400} in c["ports"]
    # 0 turns the trainer's endpoint off: no port (the API server refuses containerPort 0)
    off = manifests.job("j", "uid", "ns1", parse_spec(demo["spec"]), manifests.OperatorConfig(metrics_port=0))
    c = off["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in c["ports"]] == ["rendezvous"]
    assert {e["name"]: e.get("value") for e in c["env"]}["KUBELORA_METRICS_PORT"] == "0"
    import kubernetes_validate
    kubernetes_validate.validate(off, "1.33.0", strict=True)


# ---------------------------------------------------------------- alerts

def test_alert_rules_check_and_every_alert_is_unit_tested():
    promtool = binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, cwd=REPO)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr

    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == firing, f"alerts without a firing test: {alerts - firing}"
    known = exported_names()
    for r in rules:
        assert metric_names(r["expr"]) <= known, (r["alert"], metric_names(r["expr"]) - known)


# ---------------------------------------------------------------- dashboard (static)

def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def concrete(expr: str) -> str:
    """Grafana's variables replaced as Grafana would for 'All' and a short run."""
    expr = expr.replace("$__rate_interval", "15s").replace("$namespace", ".*").replace("$ltj", ".*")
    m = re.fullmatch(r"label_values\((.*), *(\w+)\)", expr)
    return f"group by ({m[2]}) ({m[1]})" if m else expr


def test_dashboard_exprs_parse_and_name_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "ltj"} <= variables
    known = exported_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        names = metric_names(concrete(expr))  # raises on a parse error
        assert names and names <= known, (expr, names - known)
        assert "job=" not in expr and "job," not in expr, "the LoRATrainingJob label is ltj"
    panel_exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert all('ltj=~"$ltj"' in e for e in panel_exprs if "kubelora_trainer_" in e)


# ---------------------------------------------------------------- a real Prometheus, a real run

@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, s3_endpoint, tiny_flux_dir):
    """Prometheus scraping a 2-process run (lingering until its final state is scraped) and the
    operator's registry; yields (prometheus, run facts). One run for every test below."""
    from kubelora_operator import metrics as operator_metrics
    from kubelora_trainer.local_s3 import ACCESS_KEY, SECRET_KEY
    from kubelora_trainer.storage import S3Settings, ensure_bucket, make_client, upload_tree
    tmp = tmp_path_factory.mktemp("monitoring")
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": "us-east-1", "KUBELORA_CACHE_DIR": str(tmp / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s3 = make_client(S3Settings())
        ensure_bucket(s3, "mon")
        upload_tree(tiny_flux_dir, "s3://mon/models/tiny-flux", client=s3)
        upload_tree(write_overfit_data(tmp / "data"), "s3://mon/data", client=s3)
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                   "metadata": {"name": "ignored"}, "spec": {
        "model": {"type": "flux", "diffusersPath": "s3://mon/models/tiny-flux", "dtype": "float32"},
        "dataset": {"uri": "s3://mon/data", "resolution": 32},
        "adapter": {"rank": 4},
        "training": {"steps": STEPS, "learningRate": 3e-3, "microBatchSize": 2, "logEvery": 10, "seed": 1,
                     "checkpointEverySteps": 15, "maxGradNorm": 1.0},
        "output": {"uri": "s3://mon/out"}}}))

    trainer_port, operator_port = free_port(), free_port()
    operator_metrics.watch(lambda: [{"metadata": {"name": LTJ, "namespace": NAMESPACE}, "status": {"phase": "Training"}}])
    op_server = operator_metrics.serve(operator_port, "127.0.0.1")
    prom = Prometheus(tmp / "prometheus", {"kubelora-trainer": [f"127.0.0.1:{trainer_port}"],
                                           "kubelora-operator": [f"127.0.0.1:{operator_port}"]})
    try:
        # the operator's handlers are exercised in test_operator.py; here its registry gets one of each
        with operator_metrics.reconcile("sync"):
            operator_metrics.created("Job")
            operator_metrics.restarted("gang")
        with pytest.raises(RuntimeError), operator_metrics.reconcile("sync"):
            raise RuntimeError("a reconcile error")
        prom.start()
        run_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                   "KUBELORA_METRICS_PORT": str(trainer_port), "KUBELORA_METRICS_ADDR": "127.0.0.1",
                   "KUBELORA_METRICS_LINGER_SECONDS": "120", "KUBELORA_JOB_NAME": LTJ, "KUBELORA_NAMESPACE": NAMESPACE}
        t0 = time.time()
        log = tmp / "trainer.log"
        with open(log, "w") as out:
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                   "-m", "kubelora_trainer", "run", "--spec", str(job)],
                                  env=run_env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
        t1 = time.time()
        text = log.read_text()
        assert proc.returncode == 0, text[-4000:]
        # the final state was scraped before the trainer exited (it lingers for exactly that)
        wait_for("the final phase in Prometheus",
                 lambda: prom.query(f'last_over_time(kubelora_trainer_phase{{phase="Succeeded",ltj="{LTJ}"}}[10m]) == 1'),
                 timeout=30)
        yield prom, {"start": t0, "end": time.time(), "log": text, "trained_until": t1}
    finally:
        prom.stop()
        if op_server:
            op_server.stop()
        operator_metrics.watch(None)


def last(prom: Prometheus, metric: str, **labels) -> float:
    sel = ",".join([f'ltj="{LTJ}"'] + [f'{k}="{v}"' for k, v in labels.items()])
    return prom.value(f"last_over_time({metric}{{{sel}}}[10m])")


def test_prometheus_scrapes_the_trainer_series_with_sane_values(monitored_run):
    prom, run = monitored_run
    assert "[metrics] serving on" in run["log"]
    assert last(prom, "kubelora_trainer_step") == STEPS and last(prom, "kubelora_trainer_total_steps") == STEPS
    assert last(prom, "kubelora_trainer_phase", phase="Succeeded") == 1
    assert last(prom, "kubelora_trainer_phase", phase="Training") == 0
    assert prom.value(f'max_over_time(kubelora_trainer_phase{{ltj="{LTJ}",phase="Training"}}[10m])') == 1
    loss = last(prom, "kubelora_trainer_loss")
    assert math.isfinite(loss) and loss > 0
    assert prom.value(f'max_over_time(kubelora_trainer_samples_per_second{{ltj="{LTJ}"}}[10m])') > 0
    # the tiny Flux at 32x32: its VAE halves each side (16x16 latents), 2x2 patches: 64 tokens a sample
    sps = prom.value(f'max_over_time(kubelora_trainer_samples_per_second{{ltj="{LTJ}"}}[10m])')
    tps = prom.value(f'max_over_time(kubelora_trainer_tokens_per_second{{ltj="{LTJ}"}}[10m])')
    assert tps == pytest.approx(64 * sps, rel=1e-6)
    assert last(prom, "kubelora_trainer_samples_total") == STEPS * 2 * 2  # microBatchSize 2 x 2 ranks
    assert last(prom, "kubelora_trainer_learning_rate") > 0
    grad = last(prom, "kubelora_trainer_grad_norm")
    assert math.isfinite(grad) and grad > 0
    assert last(prom, "kubelora_trainer_epoch") >= 1 and last(prom, "kubelora_trainer_eta_seconds") >= 0
    assert last(prom, "kubelora_trainer_data_wait_seconds_total") > 0
    assert last(prom, "kubelora_trainer_storage_downloaded_bytes_total") > 10_000  # the model and the data
    assert last(prom, "kubelora_trainer_storage_uploaded_bytes_total") > 10_000    # checkpoints, the LoRA
    assert last(prom, "kubelora_trainer_dataset_usable_items") == 1
    assert last(prom, "kubelora_trainer_dataset_skipped_items", reason="corrupt") == 1   # broken.png
    assert last(prom, "kubelora_trainer_dataset_skipped_items", reason="missing_caption") == 1
    assert last(prom, "kubelora_trainer_bucket_samples", bucket="32x32x1") == 1              # good.png
    assert last(prom, "kubelora_trainer_last_checkpoint_step") == STEPS
    assert run["start"] <= last(prom, "kubelora_trainer_last_checkpoint_timestamp_seconds") <= run["trained_until"]
    assert last(prom, "kubelora_trainer_resumed_from_step") == 0
    info = prom.query(f'last_over_time(kubelora_trainer_info{{ltj="{LTJ}"}}[10m])')
    assert info[0]["metric"]["model_type"] == "flux" and info[0]["metric"]["world_size"] == "2"

    # every trainer series: our labels, Prometheus' own `job`, no exported_job clash
    series = prom.api("series", **{"match[]": '{__name__=~"kubelora_trainer_.+"}', "start": str(run["start"])})
    assert len({s["__name__"] for s in series}) >= 20
    for s in series:
        assert s["ltj"] == LTJ and s["namespace"] == NAMESPACE and s["job"] == "kubelora-trainer", s
        assert "exported_job" not in s and "exported_namespace" not in s, s
    assert prom.value('last_over_time(kubelora_operator_job_phase{phase="Training"}[10m])') == 1


def test_dashboard_queries_return_data_from_the_run(monitored_run):
    prom, run = monitored_run
    empty = []
    for expr in dashboard_exprs():
        q = concrete(expr)
        data = prom.api("query_range", query=q, start=f"{run['start']:.3f}", end=f"{run['end']:.3f}", step="1")
        if not data["result"] and not metric_names(q) <= CPU_ONLY_EMPTY | RUN_WITHOUT_EVALUATION:
            empty.append(q)
    assert not empty, f"dashboard queries without data: {empty}"


def test_a_failed_runs_last_state_is_served_through_torchruns_sigterm():
    """On a failure the node's other processes exit at once and torchrun SIGTERMs the one serving
    the metrics: it died within a second, so the Failed phase and a NaN loss were scraped almost
    never. It lingers through the SIGTERM (torchrun's SIGKILL comes after its shutdown timeout).
    Run in its own process: without the fix the SIGTERM ends it."""
    script = (
        "import os, signal, time\n"
        "from kubelora_trainer.metrics import Run, TrainerMetrics\n"
        "class Server:\n"
        "    def wait_for_a_new_scrape(self, timeout):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # as torchrun sends it\n"
        "        time.sleep(0.5)\n"
        "        print('served after SIGTERM', flush=True)\n"
        "        return True\n"
        "    def stop(self):\n"
        "        print('stopped', flush=True)\n"
        "Run(TrainerMetrics('j'), Server()).finish(linger=30)\n"
        "print('default handler back:', signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.splitlines() == ["served after SIGTERM", "stopped", "default handler back: True"], p.stdout


def test_a_run_stopped_by_a_signal_lingers_only_while_its_pods_grace_lasts():
    """A preempted pod's worker checkpoints, then serves its final metrics until scraped: no longer
    than what is left of torchrun's shutdown timeout since the signal (the pod's grace less the
    launcher's margin), less a few seconds to exit, so it ends 143 rather than SIGKILLed (137) after
    a slow checkpoint."""
    from kubelora_trainer.train import stop_linger
    env = {"KUBELORA_METRICS_LINGER_SECONDS": "60", "KUBELORA_STOP_GRACE_SECONDS": "120"}  # shutdown at 110 s
    assert stop_linger(env, signaled_at=100.0, now=110.0) == 60.0       # a quick checkpoint: the whole linger
    assert stop_linger(env, signaled_at=100.0, now=170.0) == 35.0       # 60 s spent: 110 - 60 - 5 left
    assert stop_linger(env, signaled_at=100.0, now=300.0) == 0.0        # past it: exit at once
    assert stop_linger({"KUBELORA_METRICS_LINGER_SECONDS": "60"}, 100.0, 170.0) is None  # a local run
    assert stop_linger(env, signaled_at=None, now=170.0) is None        # stopped for a peer: not signaled


def test_a_stopped_node_waits_for_node_0s_old_store_only_while_its_grace_lasts():
    """After its worker's linger a preempted node's launcher waits for node 0's old rendezvous store
    to close (its replacement must not meet it): no longer than the pod's grace leaves, less 3 s,
    else the kubelet's SIGKILL ends it 137 (the e2e preemption test's failure: the local pods share
    one address, so node 0's replacement kept the 'old' store open for the whole wait)."""
    from kubelora_trainer.launch import master_wait
    env = {"KUBELORA_STOP_GRACE_SECONDS": "120"}
    assert master_wait(60.0, env, signaled_at=100.0, now=130.0) == 60.0   # early: the whole wait
    assert master_wait(60.0, env, signaled_at=100.0, now=170.0) == 47.0   # 120 - 70 - 3
    assert master_wait(60.0, env, signaled_at=100.0, now=230.0) == 0.0
    assert master_wait(60.0, env, signaled_at=None, now=230.0) == 60.0     # not signaled (stopped for a peer)
    assert master_wait(60.0, {}, signaled_at=100.0, now=230.0) == 60.0     # a local run
