"""End to end: tiny Flux from S3 (SeaweedFS) to S3 on 2 torchrun processes with FSDP2 (gloo), and
the uploaded LoRA reloaded through diffusers reproduces the trained adapter's output."""
import json
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_trainer
from kubelora_trainer.storage import download, ensure_bucket, upload_tree


def manifest(path: Path, bucket: str, **over) -> Path:
    spec = {
        "model": {"type": "flux", "diffusersPath": f"s3://{bucket}/models/tiny-flux", "dtype": "float32",
                  "fluxShift": True},
        "dataset": {"uri": f"s3://{bucket}/data", "resolution": 32},
        "adapter": {"rank": 8, "alpha": 16},
        "training": {"steps": 60, "learningRate": 3e-3, "microBatchSize": 4, "logEvery": 10, "seed": 1},
        "output": {"uri": f"s3://{bucket}/out/run1"},
    }
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v}
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": "t"}, "spec": spec}))
    return path


def seed(s3, bucket, tiny_flux_dir, data: Path):
    ensure_bucket(s3, bucket)
    upload_tree(tiny_flux_dir, f"s3://{bucket}/models/tiny-flux", client=s3)
    upload_tree(data, f"s3://{bucket}/data", client=s3)


def _probe_inputs():
    g = torch.Generator().manual_seed(0)
    from diffusers import FluxPipeline
    return dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 12, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.6]),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
                txt_ids=torch.zeros(12, 3), guidance=torch.tensor([1.0]), return_dict=False)


def test_train_two_ranks_s3_to_s3_and_reload_in_diffusers(s3, tmp_path, tiny_flux_dir, overfit_data):
    seed(s3, "e2e", tiny_flux_dir, overfit_data)
    proc = run_trainer(manifest(tmp_path / "job.yaml", "e2e"), s3.env, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[train] step 60/60" in proc.stdout, proc.stdout
    assert "[data] skipped s3://e2e/data/broken.png: corrupt (" in proc.stdout, proc.stdout   # its source URI

    out = download("s3://e2e/out/run1", tmp_path / "result", client=s3, log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == {"usable": 1, "missingCaption": 1, "emptyCaptionUsed": 0, "unreadable": 1,
                            "skipped": {"corrupt": 1}}
    art = m["artifacts"][0]
    assert art["uri"] == "s3://e2e/out/run1/lora.safetensors" and art["format"] == "diffusers"
    import hashlib
    assert art["sha256"] == hashlib.sha256((out / "lora.safetensors").read_bytes()).hexdigest()
    assert m["metrics"]["worldSize"] == 2

    # the loss on the one-image set falls clearly
    hist = [loss for _, loss in m["metrics"]["lossHistory"]]
    assert len(hist) == 60
    first, last = sum(hist[:5]) / 5, sum(hist[-10:]) / 10
    assert last < 0.85 * first, (first, last)

    # file metadata
    from safetensors import safe_open
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["kubelora.rank"] == "8" and meta["kubelora.alpha"] == "16" and meta["kubelora.steps"] == "60"
    assert meta["kubelora.base_model"] == "s3://e2e/models/tiny-flux"
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.1.proj_out.lora_B.weight" in keys
    assert not any(k == "transformer.proj_out.lora_A.weight" for k in keys)

    # reference: the trained adapter (peft checkpoint, real alpha) on the base transformer
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file
    ckpt = out / "checkpoints" / "step-60" / "transformer"
    ref = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    base_out = ref(**_probe_inputs())[0]
    cfg = LoraConfig(**{k: v for k, v in json.loads((ckpt / "adapter_config.json").read_text()).items()
                        if k in ("r", "lora_alpha", "target_modules", "lora_dropout")})
    assert cfg.lora_alpha == 16 and cfg.r == 8
    inject_adapter_in_model(cfg, ref)
    sd = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
          for k, v in load_file(str(ckpt / "adapter_model.safetensors")).items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    ref_out = ref(**_probe_inputs())[0]

    # the exported file through diffusers' own loader
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    n_lora_layers = sum(1 for _, mod in pipe.transformer.named_modules() if hasattr(mod, "lora_A") and mod.lora_A)
    assert n_lora_layers == len(keys) // 2
    with torch.no_grad():
        got = pipe.transformer(**_probe_inputs())[0]
    assert (ref_out - base_out).abs().max() > 1e-3, "the adapter should change the output"
    torch.testing.assert_close(got, ref_out, atol=2e-5, rtol=1e-4)

    # a second run starts from the exported file (adapter.initFrom, staged from S3): its first
    # steps' loss is where the first run ended, not where it began
    job2 = manifest(tmp_path / "job2.yaml", "e2e", adapter={"initFrom": art["uri"]},
                    training={"steps": 3, "logEvery": 1}, output={"uri": "s3://e2e/out/run2"})
    proc = run_trainer(job2, s3.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[model] adapter.initFrom: started from lora.safetensors (diffusers format" in proc.stdout, proc.stdout
    m2 = json.loads(download("s3://e2e/out/run2", tmp_path / "result2", client=s3, log=lambda m: None)
                    .joinpath("manifest.json").read_text())
    hist2 = [loss for _, loss in m2["metrics"]["lossHistory"]]
    assert sum(hist2) / len(hist2) < 0.85 * first, (first, last, hist2)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dataset_without_usable_items_fails_before_training(s3, tmp_path, tiny_flux_dir, overfit_data):
    (overfit_data / "good.png").unlink()
    seed(s3, "nodata", tiny_flux_dir, overfit_data)
    proc = run_trainer(manifest(tmp_path / "job.yaml", "nodata"), s3.env)
    assert proc.returncode != 0
    assert "no usable items (images missing a caption: 1, unreadable: 1 (1 corrupt))" in proc.stderr
    assert "Skipped: s3://nodata/data/broken.png: corrupt" in proc.stderr
    assert "[phase] train" not in proc.stdout and "[phase] cache" not in proc.stdout
    written = [o["Key"] for o in s3.list_objects_v2(Bucket="nodata", Prefix="out/").get("Contents", [])]
    assert written == ["out/run1/status/progress.json"], written  # progress only: no LoRA, no manifest


@pytest.mark.parametrize("case", ["missing-bucket", "missing-key", "unreachable"])
def test_storage_failures_exit_nonzero_with_clear_error(case, s3, tmp_path, tiny_flux_dir, overfit_data):
    """Bad input (a missing bucket or key) exits 2: the Job fails at once. An endpoint that cannot
    be reached may be an outage: exit 1, the Job retries the run."""
    seed(s3, "stor", tiny_flux_dir, overfit_data)
    env = dict(s3.env)
    over, code = {}, 2
    if case == "missing-bucket":
        over = {"dataset": {"uri": "s3://no-such-bucket/data"}}
        expect = "bucket 'no-such-bucket' does not exist"
    elif case == "missing-key":
        over = {"model": {"diffusersPath": "s3://stor/models/not-there"}}
        expect = "no such key 'models/not-there'"
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_closed_port()}"
        env["AWS_MAX_ATTEMPTS"] = "1"
        expect, code = "endpoint unreachable", 1
    proc = run_trainer(manifest(tmp_path / "job.yaml", "stor", **over), env)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr


def test_launcher_refuses_bad_manifests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob", "spec": {
        "model": {"type": "flux", "diffusersPath": "s3://models/x"}, "dataset": {"uri": "s3://data/x"},
        "adapter": {"rank": 0}, "output": {"uri": "s3://out/x"}}}))
    p = subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "run", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and "spec.adapter.rank: Input should be greater than or equal to 1" in p.stderr


def test_unsupported_family_message():
    from kubelora_trainer import models
    with pytest.raises(models.UnsupportedModel, match="model.type 'wan' is not yet supported by this kubelora version"):
        models.get_family("wan")


def _local_job(tmp_path, tiny_flux_dir, data, name, **training):
    return manifest(tmp_path / f"{name}.yaml", "unused", model={"diffusersPath": str(tiny_flux_dir)},
                    dataset={"uri": str(data)}, output={"uri": str(tmp_path / name)},
                    training={"steps": 3, "logEvery": 1, **training})


def _held_out(d: Path) -> Path:
    """Two captioned images unlike the training one, and one without a caption (skipped)."""
    from PIL import Image
    d.mkdir()
    for i, colour in enumerate([(220, 40, 40), (40, 200, 60)]):
        im = Image.new("RGB", (48, 48), (250, 250, 250))
        im.paste(colour, (4 + 8 * i, 4, 36, 40))
        im.save(d / f"e{i}.png")
        (d / f"e{i}.txt").write_text(f"a {'red' if i == 0 else 'green'} square on a white background")
    Image.new("RGB", (48, 48)).save(d / "nocap.png")
    return d


def test_parallelism_options_do_not_change_the_math(tmp_path, tiny_flux_dir, overfit_data):
    """Eager single process (autocast path), regional compile + activation checkpointing, and
    FSDP2 forced on one process with checkpointing: same losses, same exported keys. Local
    paths (no S3) for model, data and output. The eager run again with a held-out evaluation
    (spec.evaluation) trains bit-identically (the evaluation draws nothing the training draws, and
    its items are never trained on), evaluates at steps 0, 2 and 3, and encodes only its own items."""
    env = {"KUBELORA_CACHE_DIR": str(tmp_path / "cache")}
    held = _held_out(tmp_path / "held")
    runs = {
        "eager": ({}, {}),
        "compile_ckpt": ({"compile": True, "gradientCheckpointing": True}, {}),
        "fsdp_ckpt": ({"gradientCheckpointing": True}, {"KUBELORA_FSDP_SINGLE": "1"}),
        "eager_eval": ({}, {}),
    }
    hist, keys, tensors, out = {}, {}, {}, {}
    for name, (training, extra_env) in runs.items():
        job = _local_job(tmp_path, tiny_flux_dir, overfit_data, name, **training)
        if name == "eager_eval":
            doc = yaml.safe_load(job.read_text())
            doc["spec"]["evaluation"] = {"sources": [{"uri": str(held)}], "everySteps": 2, "microBatchSize": 1}
            job.write_text(yaml.safe_dump(doc))
        proc = run_trainer(job, {**env, **extra_env})
        assert proc.returncode == 0, name + proc.stderr[-3000:]
        out[name] = proc.stdout
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        hist[name] = [loss for _, loss in m["metrics"]["lossHistory"]]
        from safetensors.torch import load_file
        tensors[name] = load_file(str(tmp_path / name / "lora.safetensors"))
        keys[name] = sorted(tensors[name])
    for name in ("compile_ckpt", "fsdp_ckpt"):
        assert keys[name] == keys["eager"], name
        assert hist[name] == pytest.approx(hist["eager"], rel=1e-3), name
    # with the evaluation: the same losses and weights, bit for bit
    assert hist["eager_eval"] == hist["eager"]
    assert all(torch.equal(tensors["eager_eval"][k], tensors["eager"][k]) for k in keys["eager"])
    m = json.loads((tmp_path / "eager_eval" / "manifest.json").read_text())
    evals = m["metrics"]["evalHistory"]
    assert [r["step"] for r in evals] == [0, 2, 3] and all(r["samples"] == 2 for r in evals)
    assert all(len(r["quantiles"]) == 9 and math.isfinite(r["loss"]) for r in evals)
    assert evals[0]["loss"] != evals[-1]["loss"] and m["metrics"]["evalLoss"] == evals[-1]["loss"]
    assert m["dataset"]["evaluation"]["buckets"]["samples"] == 2
    # the held-out folder's counts are its own: the training data's are the eager run's
    assert m["dataset"] == {**json.loads((tmp_path / "eager" / "manifest.json").read_text())["dataset"],
                            "evaluation": m["dataset"]["evaluation"]}
    assert {k: v for k, v in m["dataset"]["evaluation"].items() if k != "buckets"} == {
        "items": 2, "usable": 2, "missingCaption": 1, "emptyCaptionUsed": 0, "unreadable": 0}
    lines = [ln for ln in out["eager_eval"].splitlines() if ln.startswith("[eval]")]
    assert len(lines) == 3 and re.fullmatch(r"\[eval\] step 0: loss \d\.\d{4} \(q0\.1 \d\.\d{4}, .*, q0\.9 \d\.\d{4}\) "
                                            r"over 2 samples in \d+\.\d s", lines[0]), lines
    # the training items' cache entries are the eager run's: only the held-out ones are encoded
    assert "[cache] 3 entries: 1 cached, 2 to encode" in out["eager_eval"], out["eager_eval"]
    assert "held-out evaluation loss" in (tmp_path / "eager_eval" / "report.html").read_text()


def test_two_sources_aspect_ratio_buckets_on_two_ranks(tmp_path, tiny_flux_dir):
    """Two local sources (wide images x1 with loss masks for two of them, tall and square ones x2 with
    shuffled tags and caption dropout) and three bad files in aspect-ratio buckets on 2 processes:
    every micro-batch from one bucket, the bucket summary and the skips by reason in the log and
    manifest.json, the masks in the cached samples, and the same run again encodes nothing (disk cache).
    A held-out folder (spec.evaluation) of three items in two buckets, one per batch: three batches
    over two ranks (one rank repeats one, uncounted); the base model's evaluation (step 0) is the
    same on one rank."""
    from PIL import Image
    wide, tall, wide_masks = tmp_path / "wide", tmp_path / "tall", tmp_path / "wide-masks"
    wide.mkdir(), tall.mkdir(), wide_masks.mkdir()
    for i in range(3):
        Image.new("RGB", (96, 48), (30 * i, 90, 200)).save(wide / f"w{i}.png")
        (wide / f"w{i}.txt").write_text(f"a wide banner {i}")
    for i in range(2):   # w2 has no mask: it trains unmasked, in the same bucket as the masked ones
        mask = Image.new("L", (96, 48), 255)
        mask.paste(0, (0, 0, 48, 48))
        mask.save(wide_masks / f"w{i}.png")
    Image.new("RGB", (96, 48)).save(wide / "latin1.png")
    (wide / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))      # bad: a caption that is not UTF-8
    (tall / "empty.png").write_bytes(b"")                              # bad: zero bytes
    (tall / "fake.jpg").write_text("text, not a JPEG")                 # bad: not what its extension says
    for i in range(2):
        Image.new("RGB", (40, 80), (200, 30 * i, 60)).save(tall / f"t{i}.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tall / "sq.png")
    (tall / "captions.json").write_text(json.dumps({"t0.png": "tall, red, thin", "t1.png": "tall, pink, thin",
                                                    "sq.png": "square, green", "empty.png": "x", "fake.jpg": "y"}))
    Image.new("RGB", (64, 64)).save(tall / "nocap.png")          # not in captions.json: skipped, counted
    held = tmp_path / "held"
    held.mkdir()
    for i, size in enumerate([(96, 48), (96, 48), (64, 64)]):
        Image.new("RGB", size, (40 * i, 120, 90)).save(held / f"h{i}.png")
        (held / f"h{i}.txt").write_text(f"held out {i}")
    job = manifest(tmp_path / "job.yaml", "unused", model={"diffusersPath": str(tiny_flux_dir)},
                   dataset={"sources": [{"uri": str(wide), "maskUri": str(wide_masks)},
                                        {"uri": str(tall), "repeats": 2, "shuffleTags": True, "shuffleVariants": 2,
                                         "captionDropout": 0.25}],
                            "resolutions": [32], "enableArBucket": True, "minAr": 0.5, "maxAr": 2.0, "numArBuckets": 3},
                   training={"steps": 6, "microBatchSize": 2, "logEvery": 1, "checkpointEverySteps": 6},
                   output={"uri": str(tmp_path / "out")})
    doc = yaml.safe_load(job.read_text())
    del doc["spec"]["dataset"]["uri"], doc["spec"]["dataset"]["resolution"]
    doc["spec"]["evaluation"] = {"sources": [{"uri": str(held)}], "everySteps": 3, "microBatchSize": 1,
                                 "quantiles": [0.25, 0.75]}
    job.write_text(yaml.safe_dump(doc))
    env = {"KUBELORA_CACHE_DIR": str(tmp_path / "cache")}
    proc = run_trainer(job, env, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[data] 6 usable items" in proc.stdout and "bucket 48x16x1: 3 samples" in proc.stdout, proc.stdout
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {k: v for k, v in m["dataset"].items() if k != "evaluation"} == {
                            "usable": 6, "missingCaption": 1, "emptyCaptionUsed": 0, "unreadable": 3,
                            "skipped": {"captionNotUtf8": 1, "emptyFile": 1, "wrongExtension": 1},
                            "masked": 2, "unmasked": 4}
    assert f"[data] skipped {tall / 'fake.jpg'}: wrongExtension" in proc.stdout, proc.stdout
    assert "3 unreadable (1 captionNotUtf8, 1 emptyFile, 1 wrongExtension)" in proc.stdout, proc.stdout
    assert f"[data] 2 items with a loss mask, 4 without (trained unmasked; warning: no mask for {wide / 'w2.png'})" \
        in proc.stdout, proc.stdout
    cached = [torch.load(f, weights_only=True) for f in (tmp_path / "cache" / "latents").glob("*.pt")]
    masked = [c["mask"] for c in cached if "mask" in c]   # w0 and w1 (one caption each), on the 24x8 latent grid
    assert len(masked) == 2 and all(mk.shape == (8, 24) and mk[:, :10].max() == 0 and mk[:, 14:].min() == 1 for mk in masked)
    b = m["buckets"]
    # wide 2:1 -> the 2.0 bucket (48x16 after rounding to 16: a third of each image cut); tall 1:2 -> 16x48;
    # the square one -> 32x32, uncut
    assert {k: v["samples"] for k, v in b["buckets"].items()} == {"16x48x1": 2, "32x32x1": 1, "48x16x1": 3}
    assert b["buckets"]["32x32x1"]["cropped"] == 0 and b["buckets"]["48x16x1"]["meanCrop"] == pytest.approx(1 / 3, abs=0.01)
    assert b["cropped"] == 5 and b["dropped"] == {}
    # 3 wide + 3 tall/square units x (2 shuffled variants + the empty caption), split over 2 ranks;
    # t0.png and sq.png get the same shuffled caption twice (seed 1): one entry each
    # + the 3 held-out items (one caption each)
    assert "[cache] 13 entries: 0 cached, 13 to encode" in proc.stdout, proc.stdout
    assert "[cache] 13 entries ready on every rank: 13 encoded, 0 were cached\n" in proc.stdout, [  # one folder
        ln for ln in proc.stdout.splitlines() if ln.startswith("[cache]")]
    evals = m["metrics"]["evalHistory"]
    assert [(r["step"], r["samples"]) for r in evals] == [(0, 3), (3, 3), (6, 3)]
    assert m["dataset"]["evaluation"]["buckets"]["buckets"].keys() == {"32x32x1", "48x16x1"}

    # the same data again, on one rank: every sample from the disk cache, the same base-model evaluation
    import shutil
    shutil.rmtree(tmp_path / "out")
    proc = run_trainer(job, env, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[cache] 13 entries: 13 cached, 0 to encode; the VAE and text encoders are not loaded" in proc.stdout
    one = json.loads((tmp_path / "out" / "manifest.json").read_text())["metrics"]["evalHistory"][0]
    assert one["step"] == 0 and one["quantiles"] == pytest.approx(evals[0]["quantiles"], rel=1e-6)


def test_the_guidance_bypass_ignores_guidance_in_training_and_when_sampling(tiny_flux_dir):
    """model.bypassGuidanceEmbedding: training calls the embedding without guidance; diffusers'
    FluxPipeline (the samples) still passes one when the config has guidance_embeds. Both must
    work and give the same output (the guidance is dropped)."""
    from diffusers import FluxTransformer2DModel

    from kubelora_trainer.models.flux.family import _bypass_guidance
    from kubelora_trainer.spec import SpecError, parse_spec
    transformer = FluxTransformer2DModel.from_pretrained(str(tiny_flux_dir / "transformer")).eval()
    assert transformer.config.guidance_embeds
    _bypass_guidance(transformer)
    with torch.no_grad():
        inputs = _probe_inputs()
        sampled = transformer(**inputs)[0]                                   # the pipeline's call
        trained = transformer(**{**inputs, "guidance": None})[0]             # the loss's call
        other = transformer(**{**inputs, "guidance": torch.tensor([7.0])})[0]
    torch.testing.assert_close(sampled, trained)
    torch.testing.assert_close(sampled, other)
    base = {"model": {"type": "flux", "diffusersPath": "s3://mdl/flux", "bypassGuidanceEmbedding": True},
            "dataset": {"uri": "s3://data/x"}, "output": {"uri": "s3://out/x"}}
    parse_spec(base)
    with pytest.raises(SpecError, match="model.guidance: model.bypassGuidanceEmbedding leaves the guidance embedding out"):
        parse_spec({**base, "model": {**base["model"], "guidance": 3.5}})
