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


def test_convert_applies_and_drops_diffusers_lora_adapter_metadata(tmp_path, capsys):
    """A file from diffusers' own save_lora_weights keeps its LoraConfig (r, lora_alpha,
    rank_pattern, alpha_pattern) in lora_adapter_metadata, which diffusers applies on load: convert
    gives the same update (alpha/r folded per module), and the output does not carry the stale
    config for diffusers to apply a second time."""
    import json
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file
    from kubelora_trainer.cli import main
    from kubelora_trainer.models.flux.tiny import TINY_TRANSFORMER
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**TINY_TRANSFORMER)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "proj_mlp"], init_lora_weights=False,
                     rank_pattern={"transformer_blocks.0.attn.to_k": 2}, alpha_pattern={"proj_mlp": 4})
    tr.add_adapter(cfg)
    want = {}
    for name, mod in tr.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            want[name] = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * mod.scaling["default"]
    assert {round(s, 3) for s in (m.scaling["default"] for m in tr.modules() if hasattr(m, "scaling")
                                  and "default" in getattr(m, "scaling", {}))} == {4.0, 8.0, 1.0}
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(tr),
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    src = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(src), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 16
    for to in ("diffusers", "kohya"):
        out = tmp_path / f"{to}.safetensors"
        assert main(["convert", str(src), str(out), "--model-type", "flux", "--from", "diffusers", "--to", to]) == 0
        printed = capsys.readouterr().out
        assert f"{len(want)} LoRA modules" in printed and "replacing" not in printed
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        if to == "kohya":  # written again over itself: said
            assert main(["convert", str(src), str(out), "--model-type", "flux", "--from", "diffusers", "--to", to]) == 0
            assert f"wrote {out} (replacing the file that was there)" in capsys.readouterr().out
        assert "lora_adapter_metadata" not in meta and all(k == "format" or k.startswith(("kubelora.", "ss_"))
                                                            for k in meta)
        assert meta["kubelora.scale_folded"] == ("true" if to == "diffusers" else "false")
    got = load_file(str(tmp_path / "diffusers.safetensors"))
    for name, delta in want.items():
        a, b = got[f"transformer.{name}.lora_A.weight"], got[f"transformer.{name}.lora_B.weight"]
        torch.testing.assert_close(b @ a, delta.detach(), rtol=1e-5, atol=1e-6)
    kohya = load_file(str(tmp_path / "kohya.safetensors"))   # the real alpha comes along: 16/4 = 4 per rank
    q = kohya["lora_unet_single_blocks_0_linear1.alpha"] / kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0]
    assert float(q) == 4.0


def test_peft_config_scales_follow_peft():
    """rank_pattern/alpha_pattern as peft matches them (regex at the end of the name, first match),
    use_rslora, peft's defaults; fold_scales keeps one scale and folds the others' ratio. Pure."""
    from kubelora_trainer.lora_files import LoraFileError, config_scales, fold_scales
    mods = ["blocks.0.to_q", "blocks.1.to_q", "blocks.10.to_k"]
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"blocks.1.to_q": 2}, "alpha_pattern": {r"to_k": 16}}
    assert config_scales(cfg, mods) == {"blocks.0.to_q": 2.0, "blocks.1.to_q": 4.0, "blocks.10.to_k": 4.0}
    assert config_scales({"r": 16, "lora_alpha": 8, "use_rslora": True}, mods)["blocks.0.to_q"] == 2.0
    assert config_scales({}, mods)["blocks.0.to_q"] == 1.0 and config_scales(None, mods)["blocks.0.to_q"] == 1.0
    with pytest.raises(LoraFileError, match="DoRA"):
        config_scales({"use_dora": True}, mods)
    a, b = torch.ones(2, 3), torch.ones(5, 2)
    lora, scale = fold_scales({"t": {m: (a, b) for m in mods}}, {"t": {mods[0]: 2.0, mods[1]: 4.0, mods[2]: 4.0}})
    assert scale == 4.0 and torch.equal(lora["t"][mods[1]][1], b) and torch.equal(lora["t"][mods[0]][1], b * 0.5)


def test_convert_counts_what_it_writes_prints_the_gaps_and_refuses_what_it_cannot(tmp_path, capsys):
    """The count is of the modules the written file holds, the export gaps are printed; a file
    kubelora wrote for another model type, a module the family does not have and an unwritable
    output are one error line each, exit 2."""
    from safetensors.torch import save_file
    from kubelora_trainer.cli import main
    from kubelora_trainer.models import get_family
    def pair():
        return torch.randn(2, 16), torch.randn(16, 2)
    one = pair()
    hy = {"context_embedder.token_refiner.refiner_blocks.0.attn.to_q": pair(),   # not writable to the original layout
          "transformer_blocks.0.attn.to_q": pair(), "transformer_blocks.0.ff.net.2": pair()}
    src = tmp_path / "hy.safetensors"
    save_file(get_family("hunyuan-video").export({"transformer": hy}, 1.0, "diffusers"), str(src))
    args = ["--model-type", "hunyuan-video", "--from", "diffusers", "--to", "original"]
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), *args]) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and ": 2 LoRA modules" in out and "1 of the 3 read not written" in out
    assert "warning:" in err and "not written to the original-layout file" in err and "refiner_blocks.0.attn.to_q" in err

    save_file(get_family("hunyuan-video").export({"transformer": {"transformer_blocks.0.attn.to_q": one}}, 1.0,
                                                 "diffusers"), str(src), metadata={"kubelora.model_type": "flux"})
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), *args]) == 2
    assert "kubelora trained it for flux" in capsys.readouterr().err
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": one[0], "transformer.blocks.0.attn1.to_q.lora_B.weight": one[1]},
              str(src))
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), *args]) == 2
    assert "not modules of the HunyuanVideo transformer: blocks.0.attn1.to_q" in capsys.readouterr().err
    save_file(get_family("hunyuan-video").export({"transformer": hy}, 1.0, "diffusers"), str(src))
    assert main(["convert", str(src), str(tmp_path / "no" / "o.safetensors"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path / 'no' / 'o.safetensors'}") and len(err.splitlines()) == 1
