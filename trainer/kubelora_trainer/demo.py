"""`make demo`: a tiny random-weight Flux and a synthetic captioned dataset in a local S3 server
(SeaweedFS; moto in-process if the `weed` binary is not installed), then `kubelora run
examples/demo-flux.yaml` (with two sample prompts added) on 2 CPU processes, then the LoRA and its
report are fetched back."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .cli import DEMO_WORKDIR as WORKDIR, launch  # noqa: F401 - WORKDIR: `kubelora demo`'s default
from .storage import S3Settings, download, ensure_bucket, make_client, upload_tree

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "examples" / "demo-flux.yaml"
BUCKET = "kubelora-demo"
MODEL_DIR, DATA_DIR = "tiny-flux", "dataset"                   # what it builds there
MODEL_KEY, DATA_KEY = "models/tiny-flux", "datasets/shapes"   # and uploads to (docs/operations.md syncs alike)


def start_s3(workdir: Path):
    """(stop, endpoint, access key, secret key) of a fresh local S3 server."""
    from .local_s3 import ACCESS_KEY, SECRET_KEY, SeaweedS3, weed_binary
    if weed_binary():
        shutil.rmtree(workdir / "s3", ignore_errors=True)
        server = SeaweedS3(workdir / "s3")
        return server.stop, server.start(), ACCESS_KEY, SECRET_KEY
    from moto.server import ThreadedMotoServer
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    return moto.stop, f"http://{host}:{port}", "demo", "demo"


def seed_bucket(workdir: Path) -> None:
    """Build the tiny model and dataset and upload them where the demo manifest points."""
    from .models.flux.tiny import build_tiny_flux
    from .synthetic import build_synthetic_dataset
    model, data = workdir / MODEL_DIR, workdir / DATA_DIR
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    build_tiny_flux(model)
    build_synthetic_dataset(data, n=8)
    client = make_client(S3Settings())
    ensure_bucket(client, BUCKET)
    upload_tree(model, f"s3://{BUCKET}/{MODEL_KEY}", client=client)
    upload_tree(data, f"s3://{BUCKET}/{DATA_KEY}", client=client)


def with_samples(manifest: Path, workdir: Path) -> Path:
    """The demo manifest plus two sample prompts every 20 steps, so that the report shows the LoRA
    learning (a tiny model: noise-like pictures that change). Written into workdir; the example
    itself stays the plain base the operator's tests start from."""
    import yaml
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["samples"] = {"prompts": [{"prompt": "a red circle on a white background"},
                                          {"prompt": "a blue square on a white background", "seed": 7}],
                              "everySteps": 20}
    out = workdir / manifest.name
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def local_job(manifest: Path, workdir: Path) -> Path:
    """The demo job with every path on this machine (the tiny model and the images the demo left
    in workdir, an output folder beside them): what `kubelora run` trains without any S3."""
    import yaml
    doc = yaml.safe_load(manifest.read_text())
    spec = doc["spec"]
    spec["model"]["diffusersPath"] = str(workdir / MODEL_DIR)
    spec["dataset"]["uri"] = str(workdir / DATA_DIR)
    spec["output"]["uri"] = str(workdir / "local-output")
    doc["metadata"]["name"] = "demo-flux-local"
    out = workdir / "local-job.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def demo(workdir: Path, nproc: int = 2) -> int:
    from .quiet import quiet_libraries
    quiet_libraries()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stop, endpoint, access_key, secret_key = start_s3(workdir)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
           "AWS_REGION": "us-east-1", "KUBELORA_CACHE_DIR": str(workdir / "cache")}
    os.environ.update(env)
    try:
        print(f"[demo] local S3 at {endpoint}; building a tiny Flux and 8 captioned images", flush=True)
        seed_bucket(workdir)
        shutil.rmtree(workdir / "cache", ignore_errors=True)
        job = with_samples(MANIFEST, workdir)
        rc = launch(str(job), nproc, env)
        if rc != 0:
            print(f"[demo] training failed (exit {rc})")
            return rc
        out = download(f"s3://{BUCKET}/outputs/demo-flux/", workdir / "output", log=lambda m: None)
        lora = out / "lora.safetensors"
        print(f"\n[demo] LoRA: {lora}\n[demo] manifest: {out / 'manifest.json'}\n"
              f"[demo] report (loss curve, buckets, settings): {out / 'report.html'}\n"
              "[demo] load it with diffusers:\n"
              "    from diffusers import FluxPipeline\n"
              f"    pipe = FluxPipeline.from_pretrained('{workdir / MODEL_DIR}')\n"
              f"    pipe.load_lora_weights('{lora}')\n"
              "[demo] or copy it to ComfyUI/models/loras/ and use the LoraLoader node.\n"
              f"[demo] the same job without S3 (local paths only): .venv/bin/kubelora run "
              f"{local_job(job, workdir)}")
        return 0
    finally:
        stop()
