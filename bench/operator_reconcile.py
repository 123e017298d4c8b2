"""Operator reconcile speed on the emulated API server (tests/kube): create-to-Job latency for
one LoRATrainingJob, and how long 200 created at once take until every one has its Job and a
status. Real kopf, real kubernetes client; no pods run (nothing would run them here).

    .venv/bin/python bench/operator_reconcile.py [--jobs 200]
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("KUBELORA_SYNC_INTERVAL", "10")
LTJ = "kubelora.dev/v1alpha1/loratrainingjobs"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--single", type=int, default=5, help="single-job latency samples")
    args = p.parse_args()
    from kube.emulator import KubeServer
    from kube.fixtures import use_kubeconfig, write_kubeconfig

    tmp = Path(tempfile.mkdtemp())
    server = KubeServer().start()
    use_kubeconfig(write_kubeconfig(tmp / "kubeconfig", server.url))
    import kopf
    import kubernetes
    from kopf.testing import KopfRunner
    from kubelora_operator import handlers

    api = kubernetes.config.new_client_from_config(config_file=str(tmp / "kubeconfig"))
    kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(
        yaml.safe_load((REPO / "crds" / "loratrainingjobs.kubelora.dev.yaml").read_text()))
    co = kubernetes.client.CustomObjectsApi(api)
    base = yaml.safe_load((REPO / "examples" / "demo-flux.yaml").read_text())

    def body(name):
        b = copy.deepcopy(base)
        b["metadata"] = {"name": name}
        b["spec"]["output"]["uri"] = str(tmp / "out" / name)  # local: the status sync reads no bucket
        return b

    def wait(pred, timeout=600, every=0.01):
        t0 = time.perf_counter()
        while not pred():
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError
            time.sleep(every)
        return time.perf_counter() - t0

    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 30
    with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=handlers.registry, settings=settings,
                    timeout=900):
        time.sleep(2)
        single = []
        for i in range(args.single):
            name = f"single-{i}"
            t0 = time.perf_counter()
            co.create_namespaced_custom_object("kubelora.dev", "v1alpha1", "default", "loratrainingjobs", body(name))
            wait(lambda: server.get("batch/v1/jobs", "default", name))
            single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(args.jobs):
            co.create_namespaced_custom_object("kubelora.dev", "v1alpha1", "default", "loratrainingjobs", body(f"many-{i}"))
        created = time.perf_counter() - t0
        def count_jobs():
            return sum(j["metadata"]["name"].startswith("many-") for j in server.list("batch/v1/jobs", "default"))

        def count_status():
            return sum(bool((o.get("status") or {}).get("phase")) for o in server.list(LTJ, "default")
                       if o["metadata"]["name"].startswith("many-"))
        wait(lambda: count_jobs() == args.jobs, every=0.25)
        all_jobs = time.perf_counter() - t0
        wait(lambda: count_status() == args.jobs, every=0.25)
        all_status = time.perf_counter() - t0
    server.stop()
    print(f"create-to-Job latency, single job: median {statistics.median(single) * 1000:.0f} ms "
          f"(min {min(single) * 1000:.0f}, max {max(single) * 1000:.0f}; n={len(single)})")
    print(f"{args.jobs} jobs: created in {created:.1f} s; all Jobs exist after {all_jobs:.1f} s; "
          f"all have a status after {all_status:.1f} s ({args.jobs / all_jobs:.1f} jobs/s)")


if __name__ == "__main__":
    main()
