"""`kubelora import-config` (diffusion-pipe TOML -> manifest) and `kubelora convert`."""
import subprocess
import sys

import pytest
import torch
import yaml

from kubelora_trainer.import_config import convert
from kubelora_trainer.spec import parse_spec

MAIN = """
output_dir = '/data/runs/flux-style'
dataset = 'dataset.toml'
epochs = 100
micro_batch_size_per_gpu = 2
pipeline_stages = 1
gradient_accumulation_steps = 4
gradient_clipping = 1.0
warmup_steps = 100
activation_checkpointing = true
save_every_n_epochs = 5

[model]
type = 'flux'
diffusers_path = '/data/models/FLUX.1-dev'
transformer_path = '/data/models/flux-dev-de-distill.safetensors'
dtype = 'bfloat16'
transformer_dtype = 'float8'
timestep_sample_method = 'logit_normal'
flux_shift = true
bypass_guidance_embedding = true

[adapter]
type = 'lora'
rank = 32
dtype = 'bfloat16'

[optimizer]
type = 'adamw_optimi'
lr = 2e-5
betas = [0.9, 0.99]
weight_decay = 0.01
eps = 1e-8
"""
DATASET = """
resolutions = [1024]
enable_ar_bucket = true
min_ar = 0.5
max_ar = 2.0
num_ar_buckets = 7

[[directory]]
path = '/data/datasets/style'
num_repeats = 10
"""


def test_convert_maps_every_key_or_names_it():
    import tomllib
    manifest, notes = convert(tomllib.loads(MAIN), tomllib.loads(DATASET), name="Flux_Style", steps=3000,
                              path_map={"/data/models": "s3://models", "/data/datasets": "s3://datasets",
                                        "/data/runs": "s3://loras"})
    spec = parse_spec(manifest)
    assert manifest["metadata"]["name"] == "flux-style"
    assert spec.model.diffusersPath == "s3://models/FLUX.1-dev"
    assert spec.model.transformerPath == "s3://models/flux-dev-de-distill.safetensors"
    assert spec.model.fluxShift and spec.model.bypassGuidanceEmbedding
    assert (spec.adapter.rank, spec.training.learningRate, spec.training.microBatchSize) == (32, 2e-5, 2)
    assert (spec.training.gradientAccumulationSteps, spec.training.maxGradNorm, spec.training.warmupSteps) == (4, 1.0, 100)
    assert spec.training.gradientCheckpointing and spec.training.steps == 3000
    assert (spec.dataset.uri, spec.dataset.resolution, spec.dataset.repeats) == ("s3://datasets/style", 1024, 10)
    assert spec.output.uri == "s3://loras/flux-style"
    assert any("float8" in n for n in notes)  # mapped with diffusion-pipe's meaning, and said so
    assert (spec.model.transformerDtype, spec.model.float8Compute) == ("float8", "dequant")
    assert spec.dataset.enableArBucket and (spec.dataset.minAr, spec.dataset.numArBuckets) == (0.5, 7)


def test_convert_needs_steps_and_a_known_model():
    import tomllib
    with pytest.raises(ValueError, match="pass --steps"):
        convert(tomllib.loads(MAIN), tomllib.loads(DATASET))
    bad = tomllib.loads(MAIN.replace("type = 'flux'", "type = 'wan'"))
    with pytest.raises(ValueError, match=r"type: 'wan' \(a diffusion-pipe model kubelora does not train yet\)"):
        convert(bad, tomllib.loads(DATASET), steps=10)


def test_import_config_cli(tmp_path):
    (tmp_path / "train.toml").write_text(MAIN)
    (tmp_path / "dataset.toml").write_text(DATASET)
    p = subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "import-config", str(tmp_path / "train.toml"),
                        "--steps", "500", "--map", "/data=s3://bucket", "--cwd", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    doc = yaml.safe_load(p.stdout)
    assert doc["spec"]["dataset"]["uri"] == "s3://bucket/datasets/style" and "note: [model] transformer_dtype" in p.stderr


def test_convert_cli_roundtrip_and_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    a, b = torch.randn(4, 16), torch.randn(16, 4)
    src = tmp_path / "in.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b}, str(src), metadata={"kubelora.rank": "4"})
    out = tmp_path / "out.safetensors"
    cmd = [sys.executable, "-m", "kubelora_trainer.cli", "convert", str(src), str(out), "--model-type", "flux"]
    p = subprocess.run(cmd + ["--from", "diffusers", "--to", "diffusers"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = load_file(str(out))
    assert torch.equal(got["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"], b)
    p = subprocess.run(cmd + ["--from", "original", "--to", "diffusers"], capture_output=True, text=True)
    assert p.returncode == 2 and "format 'original' is not available for flux" in p.stderr
    save_file({"lora_unet_x.lora_down.weight": a}, str(src))
    p = subprocess.run(cmd + ["--from", "diffusers", "--to", "diffusers"], capture_output=True, text=True)
    assert p.returncode == 2 and "is not a flux LoRA in diffusers format: unexpected key" in p.stderr


def test_convert_reads_the_peft_checkpoint_and_keeps_metadata_true(tmp_path):
    """kubelora's own checkpoint (unscaled weights, real alpha) -> Kohya keeps the real alpha in the
    .alpha tensors; a diffusers file (alpha folded into lora_B) -> Kohya says so: .alpha = rank,
    kubelora.scale_folded true, ss_network_alpha = rank."""
    from types import SimpleNamespace
    from safetensors import safe_open
    from safetensors.torch import load_file
    from kubelora_trainer import lora
    g = torch.Generator().manual_seed(0)
    mods = {f"transformer_blocks.0.attn.{m}": (torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g))
            for m in ("to_q", "to_k", "to_v", "to_out.0")}
    cfg = lora.lora_config(SimpleNamespace(rank=4, alpha=8.0, dropout=0.0), list(mods))
    ckpt = tmp_path / "checkpoints" / "step-10"
    lora.save_checkpoint(mods, cfg, ckpt / "transformer",
                         {"kubelora.rank": "4", "kubelora.alpha": "8", "kubelora.model_type": "flux", "kubelora.steps": "10"})
    base = [sys.executable, "-m", "kubelora_trainer.cli", "convert"]

    def run(src, out, frm, to):
        p = subprocess.run(base + [str(src), str(out), "--model-type", "flux", "--from", frm, "--to", to],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        with safe_open(str(out), "pt") as f:
            return load_file(str(out)), f.metadata()

    kohya, meta = run(ckpt, tmp_path / "k.safetensors", "peft", "kohya")
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 2.0 * 12   # alpha/rank 2 x fused rank 12
    assert meta["kubelora.scale_folded"] == "false" and meta["kubelora.alpha"] == "8" and meta["ss_network_alpha"] == "8"
    assert (meta["ss_network_dim"], meta["ss_base_model_version"], meta["ss_steps"]) == ("4", "flux1", "10")
    diff, meta = run(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "kohya", "diffusers")
    torch.testing.assert_close(diff["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"], mods[
        "transformer_blocks.0.attn.to_k"][1] * 2.0)
    assert meta["kubelora.scale_folded"] == "true" and "ss_network_alpha" not in meta
    kohya2, meta = run(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "diffusers", "kohya")
    assert float(kohya2["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 12.0     # scale 1: alpha = rank
    assert meta["kubelora.scale_folded"] == "true" and meta["ss_network_alpha"] == "4"
    back, _ = run(tmp_path / "k2.safetensors", tmp_path / "d2.safetensors", "kohya", "diffusers")
    assert back.keys() == diff.keys() and all(torch.equal(back[k], diff[k]) for k in diff)   # A -> B -> A exact
