"""HunyuanVideo: a tiny model in the ComfyUI file layout (original-layout transformer .safetensors,
VAE file, Llama and CLIP folders) trains on a video from S3 (SeaweedFS) to S3 on 2 torchrun processes
with FSDP2 (gloo). The default file (original module names, fused qkv/linear1) has exactly the
trained adapter's effect when applied by ComfyUI's rule and when loaded by diffusers'
HunyuanVideoPipeline.load_lora_weights (checked at the released 3072 width, the only width
diffusers' converter handles); the "diffusers" file loads with the same effect on the tiny model.
Both checkpoint layouts (official folder, ComfyUI files) and fp8 files load; bad inputs fail clearly."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_trainer
from kubelora_trainer.models.hunyuan_video import keys as K
from kubelora_trainer.models.base import ModelError
from kubelora_trainer.models.hunyuan_video.family import DEFAULT_TARGETS, FAMILY, load_transformer
from kubelora_trainer.storage import download, upload_tree
from kubelora_trainer.models.hunyuan_video.tiny import (build_tiny_hunyuan_video, sliding_square, tiny_weights,
                                                        write_flux_bfl_like)
from kubelora_trainer.synthetic import write_video

STEPS = 40
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def tiny_hv(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-hv") / "comfyui"
    return {"root": root, **build_tiny_hunyuan_video(root)}


@pytest.fixture()
def video_data(tmp_path):
    d = tmp_path / "data"
    write_video(d / "slide.mp4", sliding_square(7))                  # 7 frames: the first 5 train
    (d / "slide.txt").write_text("a red square sliding right")
    write_video(d / "uncaptioned.mp4", sliding_square(5))            # no caption: skipped, counted
    Image.new("RGB", (32, 32), (40, 60, 220)).save(d / "still.png")  # an image trains as a 1-frame clip
    (d / "still.txt").write_text("a blue still")
    return d


def manifest(path: Path, bucket: str, model: dict, **over) -> Path:
    spec = {
        "model": {"type": "hunyuan-video", "dtype": "float32", **model},
        "dataset": {"uri": f"s3://{bucket}/data", "resolution": 32, "frames": 5},
        "adapter": {"rank": RANK, "alpha": ALPHA},
        "training": {"steps": STEPS, "learningRate": 5e-3, "microBatchSize": 1, "logEvery": 10, "seed": 3,
                     "timestepSampling": "uniform"},
        "output": {"uri": f"s3://{bucket}/out/run1", "formats": ["original", "diffusers"]},
    }
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v}
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": "hv"}, "spec": spec}))
    return path


def s3_model(tiny_hv, bucket) -> dict:
    rel = {f: Path(tiny_hv[f]).relative_to(tiny_hv["root"]) for f in ("transformerPath", "vaePath", "llmPath", "clipPath")}
    return {f: f"s3://{bucket}/models/hv/{r}" for f, r in rel.items()}


def probe(in_channels=16, text_dim=32, pooled_dim=32, guidance=True, frames=2, side=4):
    """A fixed transformer input: `frames` latent frames of side x side, 12 text tokens (3 padded)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[:, 9:] = 0
    return dict(hidden_states=torch.randn(1, in_channels, frames, side, side, generator=g), timestep=torch.tensor([600.0]),
                encoder_hidden_states=torch.randn(1, 12, text_dim, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(1, pooled_dim, generator=g),
                guidance=torch.tensor([1000.0]) if guidance else None, return_dict=False)


def peft_reference(model, ckpt: Path, r=RANK, alpha=ALPHA):
    """The trained adapter (peft checkpoint with its real r/alpha) on `model`, in place."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["r"] == r and cfg["lora_alpha"] == alpha
    inject_adapter_in_model(LoraConfig(**{k: cfg[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout")}), model)
    sd = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
          for k, v in load_file(str(ckpt / "adapter_model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return model


# ---------------------------------------------------------------- ComfyUI's rules, re-derived
# comfy/supported_models.py HunyuanVideo.process_unet_state_dict: original checkpoint keys ->
# ComfyUI's own module names (its Flux-style HunyuanVideo class), by ordered substring renames.
COMFY_LOAD_RENAMES = [
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."), ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."), ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
    ("_attn_q_norm.weight", "_attn.norm.query_norm.weight"), ("_attn_k_norm.weight", "_attn.norm.key_norm.weight"),
    (".q_norm.weight", ".norm.query_norm.weight"), (".k_norm.weight", ".norm.key_norm.weight"),
    ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
    ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."),
]
# comfy/lora.py model_lora_keys_unet, HunyuanVideo branch ("diffusion-pipe lora format"): each
# "diffusion_model.<comfy name>.weight" is reachable as "transformer.<name'>" and
# "diffusion_model.<name'>", name' = the comfy name with these renames; plus the generic
# "diffusion_model.<comfy name>" every model gets.
COMFY_LORA_RENAMES = [("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                      ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear.")]


def _renamed(key: str, renames) -> str:
    for a, b in renames:
        key = key.replace(a, b)
    return key


def comfy_lora_key_map(original_sd: dict) -> tuple[dict, dict]:
    """(LoRA module name -> ComfyUI model weight key, ComfyUI model weight key -> original key)."""
    to_original = {"diffusion_model." + _renamed(k, COMFY_LOAD_RENAMES): k for k in original_sd}
    key_map = {}
    for k in to_original:
        if k.endswith(".weight"):
            key_map[k[: -len(".weight")]] = k
            name = _renamed(k, COMFY_LORA_RENAMES)[len("diffusion_model."):-len(".weight")]
            key_map[f"transformer.{name}"] = k
            key_map[f"diffusion_model.{name}"] = k
    return key_map, to_original


def comfy_apply(original_sd: dict, lora: dict) -> dict:
    """ComfyUI's LoRA patch of a checkpoint: W += up @ down for each mapped module (no alpha key:
    scale 1). Every LoRA key must be consumed."""
    key_map, to_original = comfy_lora_key_map(original_sd)
    out = dict(original_sd)
    used = set()
    for x, weight_key in key_map.items():
        up, down = f"{x}.lora_B.weight", f"{x}.lora_A.weight"
        if up in lora:
            k = to_original[weight_key]
            out[k] = out[k] + (lora[up].float() @ lora[down].float()).reshape(out[k].shape).to(out[k].dtype)
            used |= {up, down}
    assert set(lora) == used, f"ComfyUI would not load: {sorted(set(lora) - used)[:5]}"
    return out


# ---------------------------------------------------------------- end to end

def test_train_two_ranks_s3_to_s3_then_comfyui_and_diffusers_apply_it(s3, tmp_path, tiny_hv, video_data):
    s3.create_bucket(Bucket="hv-e2e")
    upload_tree(tiny_hv["root"], "s3://hv-e2e/models/hv", client=s3)
    upload_tree(video_data, "s3://hv-e2e/data", client=s3)
    proc = run_trainer(manifest(tmp_path / "job.yaml", "hv-e2e", s3_model(tiny_hv, "hv-e2e")), s3.env, nproc=2)
    (tmp_path / "trainer.log").write_text(proc.stdout + "\n---- stderr\n" + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[train] step {STEPS}/{STEPS}" in proc.stdout

    out = download("s3://hv-e2e/out/run1", tmp_path / "result", client=s3, log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == {"usable": 2, "missingCaption": 1, "emptyCaptionUsed": 0, "unreadable": 0}
    assert sorted(m["buckets"]["buckets"]) == ["32x32x1", "32x32x5"]
    assert [(a["format"], a["file"]) for a in m["artifacts"]] == [("original", "lora.safetensors"),
                                                                 ("diffusers", "lora.diffusers.safetensors")]
    hist = [loss for _, loss in m["metrics"]["lossHistory"]]
    first, last = sum(hist[:5]) / 5, sum(hist[-10:]) / 10
    assert all(map(torch.isfinite, torch.tensor(hist))) and last < 0.85 * first, (first, last)

    from safetensors import safe_open
    from safetensors.torch import load_file
    original = load_file(str(out / "lora.safetensors"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["kubelora.lora_format"] == "original"
    assert original["transformer.double_blocks.0.img_attn_qkv.lora_A.weight"].shape == (3 * RANK, 256)
    assert original["transformer.double_blocks.0.img_attn_qkv.lora_B.weight"].shape == (3 * 256, 3 * RANK)
    assert original["transformer.single_blocks.0.linear1.lora_A.weight"].shape == (4 * RANK, 256)
    assert original["transformer.single_blocks.0.linear1.lora_B.weight"].shape == (3 * 256 + 512, 4 * RANK)
    modules = {k.rsplit(".lora_", 1)[0] for k in original}
    assert modules == {f"transformer.{m}" for m in (
        "double_blocks.0.img_attn_qkv", "double_blocks.0.txt_attn_qkv", "double_blocks.0.img_attn_proj",
        "double_blocks.0.txt_attn_proj", "double_blocks.0.img_mlp.fc1", "double_blocks.0.img_mlp.fc2",
        "double_blocks.0.txt_mlp.fc1", "double_blocks.0.txt_mlp.fc2", "single_blocks.0.linear1", "single_blocks.0.linear2")}

    # reference: the trained adapter (peft checkpoint) on the base transformer
    ckpt = out / "checkpoints" / f"step-{STEPS}" / "transformer"
    base = load_transformer(Path(tiny_hv["transformerPath"]), torch.float32)
    with torch.no_grad():
        base_out = base(**probe())[0]
        ref_out = peft_reference(base, ckpt)(**probe())[0]
    assert (ref_out - base_out).abs().max() > 1e-3, "the adapter should change the output"

    # ComfyUI: every key maps, and patching the original checkpoint by its rule gives the trained model
    original_sd = K.strip_prefix(load_file(str(tiny_hv["transformerPath"])))
    patched = comfy_apply({k: v.float() for k, v in original_sd.items()}, original)
    patched_file = tmp_path / "patched.safetensors"
    from safetensors.torch import save_file
    save_file(patched, str(patched_file))
    with torch.no_grad():
        comfy_out = load_transformer(patched_file, torch.float32)(**probe())[0]
    torch.testing.assert_close(comfy_out, ref_out, atol=2e-5, rtol=1e-4)

    # diffusers' own loader: the "diffusers" file on the tiny model
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    pipe = HunyuanVideoPipeline(transformer=load_transformer(Path(tiny_hv["transformerPath"]), torch.float32), vae=None,
                                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(out / "lora.diffusers.safetensors"))
    with torch.no_grad():
        got = pipe.transformer(**probe())[0]
    torch.testing.assert_close(got, ref_out, atol=2e-5, rtol=1e-4)

    # the original file parses back to the trained updates (kubelora convert = parse + export)
    parsed, scale = FAMILY.parse(original, "original")
    trained = load_file(str(ckpt / "adapter_model.safetensors"))
    for module, (a, b) in parsed["transformer"].items():
        want = (ALPHA / RANK) * trained[f"{module}.lora_B.weight"] @ trained[f"{module}.lora_A.weight"]
        torch.testing.assert_close(scale * b @ a, want, atol=1e-6, rtol=1e-5)
        assert a.shape[0] == RANK, module          # block-diagonal fused LoRAs come back at rank r


def _wide_model(cfg: dict, seed: int = 0):
    """A released-width HunyuanVideoTransformer3DModel (3072 = 24 x 128), cheap random weights."""
    from diffusers import HunyuanVideoTransformer3DModel
    with torch.device("meta"):
        m = HunyuanVideoTransformer3DModel(**cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.empty(v.shape).uniform_(-0.03 if v.dim() > 1 else 0.9, 0.03 if v.dim() > 1 else 1.1, generator=g)
          for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    return m, sd


def test_original_file_loads_in_diffusers_at_the_released_width(tmp_path):
    """diffusers' HunyuanVideo LoRA converter splits single_blocks.N.linear1 at a hard-coded 3072,
    so the fused file is checked through HunyuanVideoPipeline.load_lora_weights on a 3072-wide
    model (one block of each kind): same output as the separate-q/k/v adapter it came from."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import save_file

    from kubelora_trainer import lora

    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=24, attention_head_dim=128, num_layers=1,
               num_single_layers=1, num_refiner_layers=0, mlp_ratio=0.25, patch_size=1, patch_size_t=1,
               guidance_embeds=False, text_embed_dim=32, pooled_projection_dim=32)
    x = probe(in_channels=4, guidance=False, frames=1, side=2)
    ref, sd = _wide_model(cfg)
    with torch.no_grad():
        base_out = ref(**x)[0]
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=DEFAULT_TARGETS), ref)
    g = torch.Generator().manual_seed(1)
    for name, p in ref.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    with torch.no_grad():
        ref_out = ref(**x)[0]
    tensors = FAMILY.export({"transformer": lora.gather(ref)}, 2.0, "original")
    assert tensors["transformer.single_blocks.0.linear1.lora_B.weight"].shape == (3 * 3072 + 768, 8)
    save_file(tensors, str(tmp_path / "wide.safetensors"))
    del ref

    with torch.device("meta"):
        fresh = HunyuanVideoTransformer3DModel(**cfg)
    fresh.load_state_dict(sd, assign=True)
    pipe = HunyuanVideoPipeline(transformer=fresh, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(tmp_path / "wide.safetensors"))
    with torch.no_grad():
        got = pipe.transformer(**x)[0]
    assert (ref_out - base_out).abs().max() > 0.1
    torch.testing.assert_close(got, ref_out, atol=1e-4, rtol=1e-4)


def test_other_targets_in_the_original_file_load_in_diffusers():
    """Modulation linears, the final (shift, scale) modulation stored as A=[A;A], B=[B/2,B/2], the
    refiner's projection/MLP and the embedders, written under original names, load through
    HunyuanVideoPipeline.load_lora_weights with the adapter's effect (tiny width: no linear1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from peft import LoraConfig, inject_adapter_in_model

    from kubelora_trainer import lora
    from kubelora_trainer.models.hunyuan_video.tiny import TRANSFORMER

    targets = (r"(transformer_blocks\.\d+\.(norm1\.linear|norm1_context\.linear|attn\.(to_q|to_k|to_v))|norm_out\.linear"
               r"|proj_out|context_embedder\.(proj_in|token_refiner\.refiner_blocks\.\d+\.(attn\.to_out\.0|ff\.net\.2|norm_out\.linear))"
               r"|time_text_embed\.(timestep_embedder|guidance_embedder)\.linear_1)")
    torch.manual_seed(0)
    ref = HunyuanVideoTransformer3DModel(**TRANSFORMER)
    sd = ref.state_dict()
    with torch.no_grad():
        base_out = ref(**probe())[0]
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=targets), ref)
    g = torch.Generator().manual_seed(2)
    for name, p in ref.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    with torch.no_grad():
        ref_out = ref(**probe())[0]
    tensors = FAMILY.export({"transformer": lora.gather(ref)}, 3.0, "original")
    assert "transformer.final_layer.adaLN_modulation.1.lora_A.weight" in tensors
    assert "transformer.txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.lora_B.weight" in tensors
    fresh = HunyuanVideoTransformer3DModel(**TRANSFORMER)
    fresh.load_state_dict(sd)
    pipe = HunyuanVideoPipeline(transformer=fresh, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(tensors)
    with torch.no_grad():
        got = pipe.transformer(**probe())[0]
    assert (ref_out - base_out).abs().max() > 1e-2
    torch.testing.assert_close(got, ref_out, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- formats (pure)

def _random_lora(names: list[str], shapes: dict, r: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(r, shapes[n][1], generator=g), torch.randn(shapes[n][0], r, generator=g)) for n in names}


def test_fused_export_is_exact_and_parses_back():
    """Every diffusers linear that has an original counterpart: the exported original-layout update
    equals the separate updates placed where the original fuses them (torch.cat of the parts),
    and parse() recovers each (A, B) pair."""
    from diffusers import HunyuanVideoTransformer3DModel
    from kubelora_trainer.models.hunyuan_video.tiny import TRANSFORMER

    model = HunyuanVideoTransformer3DModel(**TRANSFORMER)
    linears = {n: tuple(mod.weight.shape) for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    exportable = [n for n in linears if not K.NOT_EXPORTABLE.fullmatch(K.original_target(n).module)]
    assert "norm_out.linear" in exportable and "transformer_blocks.0.norm1.linear" in exportable
    lora = _random_lora(exportable, linears)
    deltas = {n: 0.5 * b @ a for n, (a, b) in lora.items()}
    out = FAMILY.export({"transformer": lora}, 0.5, "original")
    for key in [k for k in out if k.endswith(".lora_A.weight")]:
        module = key[len("transformer."):-len(".lora_A.weight")]
        got = out[key.replace("lora_A", "lora_B")] @ out[key]
        parts = K.diffusers_parts(module)
        want = torch.cat([deltas[p] for p in parts], 0)
        if module == K.SWAPPED_HALVES:                # original (shift, scale) = diffusers (scale, shift) swapped
            hi, lo = want.chunk(2, 0)
            want = torch.cat([lo, hi], 0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    back, scale = FAMILY.parse(out, "original")
    assert scale == 1.0 and set(back["transformer"]) == set(exportable)
    for n, (a, b) in back["transformer"].items():
        torch.testing.assert_close(b @ a, deltas[n], atol=1e-5, rtol=1e-5)
    d_back, _ = FAMILY.parse(FAMILY.export({"transformer": lora}, 0.5, "diffusers"), "diffusers")
    for n, (a, b) in d_back["transformer"].items():
        torch.testing.assert_close(b @ a, deltas[n])


def test_what_the_original_format_cannot_carry_is_skipped_and_named_at_export():
    """After the GPU hours are spent, export writes what each loader can apply and says what not."""
    lora = {"context_embedder.token_refiner.refiner_blocks.0.attn.to_q": (torch.zeros(2, 8), torch.zeros(8, 2)),
            "time_text_embed.timestep_embedder.linear_1": (torch.ones(2, 8), torch.ones(8, 2)),
            "transformer_blocks.0.ff.net.2": (torch.ones(2, 8), torch.ones(8, 2))}
    out = FAMILY.export({"transformer": lora}, 1.0, "original")
    assert not any("token_refiner" in k for k in out)
    assert "transformer.time_in.mlp.0.lora_A.weight" in out and "transformer.double_blocks.0.img_mlp.fc2.lora_A.weight" in out
    gaps = FAMILY.export_gaps({"transformer": lora}, "original")
    assert len(gaps) == 3 and "not written" in gaps[0] and "refiner_blocks.0.attn.to_q" in gaps[0]
    assert "ComfyUI skips" in gaps[1] and "time_text_embed.timestep_embedder.linear_1" in gaps[1]
    # no img_attn_qkv key: diffusers' loader does not take the file for the original layout at all
    assert "diffusers loads nothing" in gaps[2] and "double_blocks.N.img_attn_qkv" in gaps[2]
    with_qkv = {**lora, "transformer_blocks.1.attn.to_k": (torch.ones(2, 8), torch.ones(8, 2))}
    assert not any("loads nothing" in g for g in FAMILY.export_gaps({"transformer": with_qkv}, "original"))
    assert FAMILY.export_gaps({"transformer": lora}, "diffusers") == []
    unknown = {**lora, "blocks.0.attn1.to_q": (torch.ones(2, 8), torch.ones(8, 2))}
    with pytest.raises(ValueError, match=r"LoRA on blocks\.0\.attn1\.to_q: not a module of the HunyuanVideo"):
        FAMILY.export({"transformer": unknown}, 1.0, "original")
    with pytest.raises(ValueError, match=r"not modules of the HunyuanVideo transformer: blocks\.0\.attn1\.to_q"):
        FAMILY.parse(FAMILY.export({"transformer": unknown}, 1.0, "diffusers"), "diffusers")
    with pytest.raises(ValueError, match="format 'comfyui' is not available for hunyuan-video"):
        FAMILY.export({"transformer": {}}, 1.0, "comfyui")


def test_default_targets_are_the_attention_and_mlp_linears_of_both_block_kinds():
    from diffusers import HunyuanVideoTransformer3DModel
    from kubelora_trainer.models.hunyuan_video.tiny import TRANSFORMER

    names = [n for n, mod in HunyuanVideoTransformer3DModel(**TRANSFORMER).named_modules() if isinstance(mod, torch.nn.Linear)]
    hit = {K.original_target(n).module for n in names if re.fullmatch(DEFAULT_TARGETS, n)}
    assert hit == {"double_blocks.0.img_attn_qkv", "double_blocks.0.txt_attn_qkv", "double_blocks.0.img_attn_proj",
                   "double_blocks.0.txt_attn_proj", "double_blocks.0.img_mlp.fc1", "double_blocks.0.img_mlp.fc2",
                   "double_blocks.0.txt_mlp.fc1", "double_blocks.0.txt_mlp.fc2", "single_blocks.0.linear1",
                   "single_blocks.0.linear2"}


# ---------------------------------------------------------------- attention without a needless mask

def _spy_sdpa(monkeypatch) -> list:
    """Record (query length, attn_mask is None) of every SDPA call diffusers makes."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append((query.shape[-2], attn_mask is None))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _tiny_transformer():
    from diffusers import HunyuanVideoTransformer3DModel
    from kubelora_trainer.models.hunyuan_video.tiny import TRANSFORMER

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(**TRANSFORMER).eval()


def test_blocks_attend_without_a_mask_when_every_text_position_is_a_caption_token(monkeypatch):
    """diffusers hands the blocks' attention a [B, 1, 1, N] mask even when it is all true, which keeps
    SDPA off flash attention (1.9x the step time on the H100 with cuDNN attention off). The loss
    trims text padding shared by the whole batch and the blocks then attend without a mask: the
    4 block attentions (1 double + 1 single, forward and checkpoint recompute) of a batch-1 step
    whose caption is padded (9 of 12 tokens), as of one whose caption fills the text length."""
    import types
    from kubelora_trainer import dist
    from kubelora_trainer.models.base import Components

    video = 2 * 2 * 2                                    # 2 frames of 4x4 latents, 2x2 patches
    p = probe()
    for n_text, mask in ((9, p["encoder_attention_mask"]), (12, torch.ones(1, 12, dtype=torch.long))):
        tr = _tiny_transformer()
        tr.requires_grad_(False)
        lora_like = tr.transformer_blocks[0].attn.to_q.weight   # a weight to train, so blocks recompute
        lora_like.requires_grad_(True)
        lists = FAMILY.blocks("transformer", tr)
        dist.parallelize(tr, lists, sharding="none", compute_dtype=torch.float32,
                         recompute={(j, i) for j, blocks in enumerate(lists) for i in range(len(blocks))})
        batch = {"latents": p["hidden_states"], "prompt_embeds": p["encoder_hidden_states"], "prompt_mask": mask,
                 "pooled": p["pooled_projections"]}
        comps = Components(trainable={"transformer": tr}, info={"guidance_embeds": True})
        calls = _spy_sdpa(monkeypatch)
        loss = FAMILY.loss(comps, batch, None, types.SimpleNamespace(timestepSampling="uniform", sigmoidScale=1.0, timestepShift=None),
                           torch.Generator().manual_seed(1))
        loss.backward()
        blocks = [c for c in calls if c[0] == video + n_text]
        assert len(blocks) == 4 and all(unmasked for _, unmasked in blocks), calls
        assert lora_like.grad is not None
        monkeypatch.undo()


def test_no_masked_attention_gets_cudnns_bad_key_length_in_a_real_step(monkeypatch):
    """The loss counts the video tokens the blocks' attention joins the text to (with the model's
    own patch sizes) and keeps the masked key lengths off 64 mod 128 (cuDNN's NaN backward): two
    captions of 8 and 5 tokens beside 2 x 4 x 7 = 56 video tokens would give 64 keys; they get 65,
    checked on every SDPA call of a real forward of the tiny transformer."""
    import types
    from kubelora_trainer.models.base import Components

    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        seen.append((key.shape[-2], attn_mask is not None))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    p = probe(frames=2, side=4)
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, :8], mask[1, :5] = 1, 1
    batch = {"latents": torch.randn(2, 16, 2, 8, 14, generator=g),
             "prompt_embeds": p["encoder_hidden_states"].repeat(2, 1, 1), "prompt_mask": mask,
             "pooled": p["pooled_projections"].repeat(2, 1)}
    comps = Components(trainable={"transformer": _tiny_transformer()}, info={"guidance_embeds": True})
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        FAMILY.loss(comps, batch, None, types.SimpleNamespace(timestepSampling="uniform", sigmoidScale=1.0, timestepShift=None),
                    torch.Generator().manual_seed(1))
    masked = {k for k, m in seen if m}
    assert 56 + 9 in masked and all(k % 128 != 64 for k in masked), seen


def test_trimmed_unmasked_attention_gives_the_masked_result():
    """Exactness: padded caption at batch 1 (trimmed, then no mask), and a batch of two captions of
    different lengths (trimmed to the longer, padding kept or added past the cached length where a
    key length would be cuDNN's bad one, mask kept) give the transformer's output on the padded
    inputs with diffusers' masks."""
    from kubelora_trainer.models.hunyuan_video.family import trim_text_padding, unmask_full_captions

    ref, model = _tiny_transformer(), _tiny_transformer()
    state = unmask_full_captions(model)
    p = probe()
    mask2 = torch.ones(2, 12, dtype=torch.long)
    mask2[0, 9:] = 0
    mask2[1, 7:] = 0
    two = dict(p, hidden_states=p["hidden_states"].repeat(2, 1, 1, 1, 1),
               encoder_hidden_states=torch.cat([p["encoder_hidden_states"], p["encoder_hidden_states"].flip(1)]),
               encoder_attention_mask=mask2, pooled_projections=p["pooled_projections"].repeat(2, 1),
               timestep=torch.tensor([600.0, 300.0]), guidance=torch.tensor([1000.0, 1000.0]))
    # offset 55: 55 + 9 is 64 (cuDNN's bad key length), so one padding position more; offset 52 and
    # the text kept whole (12): 52 + 12 is 64 again, so one position past the padded 12 (zeros, masked)
    two_whole = dict(two, encoder_attention_mask=torch.ones(2, 12, dtype=torch.long))
    two_whole["encoder_attention_mask"][1, 7:] = 0
    for inputs, full, kept, offsets in ((p, True, 9, (55,)), (two, False, 10, (55,)), (two_whole, False, 13, (52,))):
        emb, mask, told = trim_text_padding(inputs["encoder_hidden_states"], inputs["encoder_attention_mask"],
                                            key_offsets=offsets)
        assert emb.shape[1] == mask.shape[1] == kept and told is full
        for say in (None, (mask, told), (mask.clone(), not told)):  # read by the hook; told (the loss);
            state.told = say                                      # told about another tensor: read
            with torch.no_grad():
                want = ref(**inputs)[0]
                got = model(**dict(inputs, encoder_hidden_states=emb, encoder_attention_mask=mask))[0]
            assert state.full is full and state.told is None
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- checkpoint layouts

def test_one_frame_items_and_caption_dropout_use_the_image_template_clips_the_video_one(tiny_hv):
    """As HunyuanVideo's code and diffusion-pipe: one-frame items and the caption-dropout entry are
    encoded with the image template ("Describe the image ..."), clips with the video one, a clip whose
    own caption is empty included (diffusion-pipe encodes it as a video; only its uncond embedding is
    an image's); samples alike, by their frames."""
    import types
    from kubelora_trainer.models.hunyuan_video.family import MAX_TOKENS
    comps = FAMILY.load(types.SimpleNamespace(dtype="float32"), {k: str(v) for k, v in tiny_hv.items() if k != "root"},
                        torch.device("cpu"))
    pipe, info = comps.encoders["pipe"], comps.info
    assert "Describe the image" in info["image_template"]["template"] and "video" in info["template"]["template"]
    assert 0 < info["image_template"]["crop_start"] < info["template"]["crop_start"]

    def want(caption, template):
        e, p, m = pipe.encode_prompt(prompt=[caption], prompt_template=template, device="cpu", max_sequence_length=MAX_TOKENS)
        return e[0], p[0]
    caption = "a red square sliding right"
    g = torch.Generator().manual_seed(0)
    (image,) = FAMILY.encode(comps, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, [caption])
    clip, empty, dropout = FAMILY.encode(comps, torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1, [caption, "", ""],
                                         dropout=[False, False, True])
    for enc, (caption_, template) in ((image, (caption, info["image_template"])), (clip, (caption, info["template"])),
                                      (empty, ("", info["template"])), (dropout, ("", info["image_template"]))):
        e, p = want(caption_, template)
        n = int(enc["prompt_mask"].sum())
        torch.testing.assert_close(enc["prompt_embeds"][:n], e[:n])
        torch.testing.assert_close(enc["pooled"], p)
    assert not torch.allclose(image["prompt_embeds"], clip["prompt_embeds"])
    assert not torch.allclose(empty["prompt_embeds"], dropout["prompt_embeds"])
    kit = FAMILY.sampling_kit(comps, [{"prompt": caption, "frames": 1}, {"prompt": caption, "frames": 5},
                                      {"prompt": "", "frames": 5}])
    assert [t["template"] for t in kit["templates"]] == [info["image_template"]["template"],
                                                         info["template"]["template"], info["template"]["template"]]
    torch.testing.assert_close(kit["embeds"][0]["prompt_embeds"][0], image["prompt_embeds"])
    torch.testing.assert_close(kit["embeds"][1]["prompt_embeds"][0], clip["prompt_embeds"])


def test_the_cache_encodes_a_clips_dropout_entry_with_the_image_template_and_its_empty_caption_not(
        tiny_hv, tmp_path, monkeypatch):
    """dataset_phase.encode_missing tells the family which entry is the caption dropout: a clip with
    an empty caption and dropout gets two entries, under two keys, with the two templates."""
    import types
    from kubelora_trainer import dist
    from kubelora_trainer import buckets as bk
    from kubelora_trainer.cache import cache_inputs, load_entry
    from kubelora_trainer.data import Item, ScanReport
    from kubelora_trainer.dataset_phase import encode_missing, entry_keys, sample_entries
    from kubelora_trainer.spec import parse_spec
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    write_video(tmp_path / "slide.mp4", sliding_square(5))
    spec = parse_spec({"model": {"type": "hunyuan-video", "ckptPath": "/m", "dtype": "float32"},
                       "dataset": {"uri": "/d", "resolution": 32, "frames": 5}, "output": {"uri": "/o"}})
    report = ScanReport(items=[Item(tmp_path / "slide.mp4", "", ("",), dropout=0.5)])
    units = [bk.Unit(0, (32, 32, 5), 0, 0.0)]
    entries = sample_entries(report, units)
    digests = ["ab" * 16]
    keys = entry_keys(report, units, entries, digests, cache_inputs(spec, "f"))
    assert entries == [(0, 0), (0, -1)] and keys[0] != keys[1]
    comps = FAMILY.load(types.SimpleNamespace(dtype="float32"), {k: str(v) for k, v in tiny_hv.items() if k != "root"},
                        torch.device("cpu"))
    env = dist.DistEnv(0, 1, 0, torch.device("cpu"))
    assert encode_missing(spec, FAMILY, comps, report.items, digests, units, entries, keys, [0, 1], env) == []
    empty, dropout = (load_entry(tmp_path / "cache", k) for k in keys)
    pipe = comps.encoders["pipe"]
    for got, template in ((empty, comps.info["template"]), (dropout, comps.info["image_template"])):
        want = pipe.encode_prompt(prompt=[""], prompt_template=template, device="cpu", max_sequence_length=256)[0][0]
        n = int(got["prompt_mask"].sum())
        torch.testing.assert_close(got["prompt_embeds"][:n], want[:n])


def test_the_vae_encodes_with_the_original_tiling_as_diffusion_pipe(tiny_hv):
    """diffusion-pipe calls enable_tiling() on HunyuanVideo's own VAE: 256 px tiles 192 apart, and
    64-frame tiles 48 apart only past 64 frames. The loaded VAE tiles so; a 17-frame clip (past
    diffusers' 16-frame framewise default) is encoded in one piece, as the original encodes it."""
    import types
    comps = FAMILY.load(types.SimpleNamespace(dtype="float32"), {k: str(v) for k, v in tiny_hv.items() if k != "root"},
                        torch.device("cpu"))
    vae = comps.encoders["pipe"].vae
    assert vae.use_tiling
    assert (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height,
            vae.tile_sample_stride_width) == (256, 256, 192, 192)
    assert (vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames) == (64, 48)
    x = torch.rand(1, 3, 17, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (enc,) = FAMILY.encode(comps, x, ["a red square"])
    with torch.no_grad():
        whole = vae.quant_conv(vae.encoder(x))[:, :16] * comps.info["vae_scale"]   # the mean, untiled
    torch.testing.assert_close(enc["latents"], whole[0])


def test_official_layout_comfyui_files_and_fp8_load_the_same_network(tmp_path, tiny_hv, capsys):
    import types
    official = build_tiny_hunyuan_video(tmp_path / "ckpts", layout="official")
    fp8 = build_tiny_hunyuan_video(tmp_path / "fp8", transformer_dtype="float8_e4m3fn")
    spec = types.SimpleNamespace(dtype="float32")
    a = FAMILY.load(spec, {k: str(v) for k, v in official.items()}, torch.device("cpu"))
    b = FAMILY.load(spec, {k: str(v) for k, v in tiny_hv.items() if k != "root"}, torch.device("cpu"))
    sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.info["template"]["crop_start"] == b.info["template"]["crop_start"] > 0

    assert "fp8 tensors" not in capsys.readouterr().out
    # the fp8 file: upcast on load to the fp8-rounded weights, and said (twice the file's memory)
    tr8 = load_transformer(Path(fp8["transformerPath"]), torch.float32)
    note = capsys.readouterr().out
    assert "fp8 tensors: they are upcast to float32 and held so" in note and "model.transformerDtype: float8" in note
    original, _ = tiny_weights(0)
    want = K.original_to_diffusers({k: v.to(torch.float8_e4m3fn).float() for k, v in original.items()})
    got = tr8.state_dict()
    assert all(v.dtype == torch.float32 for v in got.values())
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.isfinite(tr8(**probe())[0]).all()


def test_scaled_fp8_weights_are_multiplied_by_their_scale():
    from kubelora_trainer.models.hunyuan_video.family import upcast
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    sd = {"a.weight": w.to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor(3.0), "a.bias": torch.ones(2),
          "b.weight": w.to(torch.float8_e4m3fn), "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    out = upcast(sd, torch.bfloat16)
    assert set(out) == {"a.weight", "a.bias", "b.weight"} and all(v.dtype == torch.bfloat16 for v in out.values())
    assert torch.equal(out["a.weight"].float(), 3 * w) and torch.equal(out["b.weight"].float(), w)


def test_round_trip_of_the_checkpoint_key_layout():
    original, _ = tiny_weights(1)
    diffusers_sd = K.original_to_diffusers(dict(original))
    assert K.to_original(diffusers_sd).keys() == original.keys()
    assert all(torch.equal(K.to_original(diffusers_sd)[k], original[k]) for k in original)


# ---------------------------------------------------------------- bad input

def _spec(model: dict, dataset: dict | None = None):
    from kubelora_trainer.spec import LoRATrainingJobSpec
    return LoRATrainingJobSpec.model_validate({"model": {"type": "hunyuan-video", **model},
                                               "dataset": {"uri": "s3://bkt/data", **(dataset or {})},
                                               "output": {"uri": "s3://bkt/out"}})


COMFY = {"transformerPath": "s3://bkt/t.safetensors", "vaePath": "s3://bkt/vae.safetensors", "llmPath": "s3://bkt/llm",
         "clipPath": "s3://bkt/clip"}


@pytest.mark.parametrize("model,dataset,expect", [
    ({"transformerPath": COMFY["transformerPath"], "vaePath": COMFY["vaePath"], "clipPath": COMFY["clipPath"]}, None,
     "needs model.ckptPath or model.transformerPath+model.vaePath+model.llmPath+model.clipPath (missing: model.llmPath)"),
    ({"transformerPath": COMFY["transformerPath"]}, None, "missing: model.vaePath, model.llmPath, model.clipPath"),
    ({**COMFY, "ckptPath": "s3://bkt/ckpts"}, None, "set only one of model.ckptPath or"),
    ({"diffusersPath": "s3://bkt/hv"}, None, "model.diffusersPath does not apply to model.type hunyuan-video"),
    ({"ckptPath": "s3://bkt/ckpts"}, {"frames": 8}, "dataset.frames: hunyuan-video needs 4k+1 frames (e.g. 5 or 9); got 8"),
])
def test_spec_refuses(model, dataset, expect):
    from pydantic import ValidationError
    with pytest.raises(ValidationError) as e:
        _spec(model, dataset)
    assert expect in str(e.value), str(e.value)


def test_spec_accepts_both_sources():
    assert _spec(COMFY, {"frames": 33}).model.transformerPath == COMFY["transformerPath"]
    assert _spec({"ckptPath": "s3://bkt/ckpts"}, {"frames": 1}).model.ckptPath == "s3://bkt/ckpts"


def test_wrong_or_missing_files_name_what_was_expected(tmp_path, tiny_hv):
    import types
    spec = types.SimpleNamespace(dtype="float32")
    paths = {k: str(v) for k, v in tiny_hv.items() if k != "root"}
    flux = write_flux_bfl_like(tmp_path / "flux1-dev.safetensors")
    with pytest.raises(ModelError, match=r"model.transformerPath: .*flux1-dev.safetensors holds a Flux transformer "
                                         r"\(BFL layout\); expected a HunyuanVideo transformer in the original layout"):
        FAMILY.load(spec, {**paths, "transformerPath": str(flux)}, torch.device("cpu"))
    with pytest.raises(ModelError, match="model.vaePath: .* is not the HunyuanVideo causal 3D VAE"):
        FAMILY.load(spec, {**paths, "vaePath": str(flux)}, torch.device("cpu"))
    with pytest.raises(ModelError, match="model.llmPath: .* holds a 'clip_text_model' model; expected the llava-llama-3"):
        FAMILY.load(spec, {**paths, "llmPath": paths["clipPath"]}, torch.device("cpu"))
    with pytest.raises(ModelError, match="model.llmPath: .* has no config.json"):
        FAMILY.load(spec, {**paths, "llmPath": str(tmp_path)}, torch.device("cpu"))
    official = build_tiny_hunyuan_video(tmp_path / "ckpts", layout="official")
    shutil.rmtree(official["ckptPath"] / "text_encoder_2")
    (official["ckptPath"] / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ModelError, match="model.ckptPath: .* lacks hunyuan-video-t2v-720p/transformers/"
                                         "mp_rank_00_model_states.pt, text_encoder_2; expected the official HunyuanVideo layout"):
        FAMILY.load(spec, {k: str(v) for k, v in official.items()}, torch.device("cpu"))


def test_trainer_refuses_a_flux_file_without_a_traceback(tmp_path, tiny_hv, video_data):
    flux = write_flux_bfl_like(tmp_path / "models" / "flux1-dev.safetensors")
    model = {k: str(v) for k, v in tiny_hv.items() if k != "root"}
    model["transformerPath"] = str(flux)
    job = manifest(tmp_path / "job.yaml", "unused", model, dataset={"uri": str(video_data)},
                   output={"uri": str(tmp_path / "out")})
    proc = run_trainer(job, {"KUBELORA_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "holds a Flux transformer (BFL layout); expected a HunyuanVideo transformer in the original layout" in proc.stderr
    assert "Traceback" not in proc.stderr and "[phase] train" not in proc.stdout


def test_transformer_path_beside_ckpt_path_replaces_the_official_transformer(tmp_path, tiny_hv):
    """diffusion-pipe's ckpt_path + transformer_path: the official layout with another transformer."""
    from kubelora_trainer.models.hunyuan_video.family import resolve_sources
    official = build_tiny_hunyuan_video(tmp_path / "ckpts", layout="official")
    src = resolve_sources({"ckptPath": str(official["ckptPath"]), "transformerPath": str(tiny_hv["transformerPath"])})
    assert src["transformer"] == ("model.transformerPath", Path(tiny_hv["transformerPath"]))
    assert src["vae"][0] == src["llm"][0] == src["clip"][0] == "model.ckptPath"
    # the official transformer is not needed then, and the override is checked like any part
    (official["ckptPath"] / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt").unlink()
    assert resolve_sources({"ckptPath": str(official["ckptPath"]),
                            "transformerPath": str(tiny_hv["transformerPath"])})["transformer"][0] == "model.transformerPath"
    with pytest.raises(ModelError, match="model.transformerPath: .* does not exist"):
        resolve_sources({"ckptPath": str(official["ckptPath"]), "transformerPath": str(tmp_path / "nope.safetensors")})


def test_targets_an_output_format_cannot_hold_are_refused_when_the_adapters_are_injected():
    """Single-block to_q/to_k/to_v without proj_mlp cannot be fused into linear1 of the original
    layout: adapters.prepare refuses it before training, naming both fields; the diffusers format
    alone takes it."""
    from kubelora_trainer import adapters, dist
    from kubelora_trainer.lora import AdapterError
    from kubelora_trainer.models.base import Components
    from kubelora_trainer.spec import parse_spec

    def spec(formats):
        return parse_spec({"model": {"type": "hunyuan-video", "ckptPath": "/m", "dtype": "float32"},
                           "dataset": {"uri": "/d", "resolution": 32, "frames": 5},
                           "adapter": {"rank": 2, "targetModules": ["to_q", "to_k", "to_v"]},
                           "training": {"steps": 1}, "output": {"uri": "/o", "formats": formats}})
    env = dist.DistEnv(0, 1, 0, torch.device("cpu"))
    with pytest.raises(AdapterError, match=r"adapter\.targetModules and output\.formats: the original file .*proj_mlp"):
        adapters.prepare(Components(trainable={"transformer": _tiny_transformer()}), FAMILY, spec(["diffusers", "original"]), env)
    ad = adapters.prepare(Components(trainable={"transformer": _tiny_transformer()}), FAMILY, spec(["diffusers"]), env)
    assert ad.n_trainable > 0


def test_the_peft_checkpoint_is_written_before_any_format_can_fail(tmp_path):
    """Should a format's export fail after training anyway, the trained adapter is on disk first
    (kubelora convert --from peft writes the formats from it)."""
    from types import SimpleNamespace
    from kubelora_trainer import export, lora
    from kubelora_trainer.spec import parse_spec
    spec = parse_spec({"model": {"type": "hunyuan-video", "ckptPath": "/m", "dtype": "float32"},
                       "dataset": {"uri": "/d", "resolution": 32, "frames": 5}, "adapter": {"rank": 2},
                       "training": {"steps": 7}, "output": {"uri": str(tmp_path / "o"), "formats": ["original"]}})
    mods = {"single_transformer_blocks.0.attn.to_q": (torch.ones(2, 8), torch.ones(8, 2))}   # linear1 without proj_mlp
    cfg = lora.lora_config(SimpleNamespace(rank=2, alpha=None, dropout=0.0), list(mods))
    with pytest.raises(ValueError, match="proj_mlp"):
        export.export_and_upload(spec, "hv", FAMILY, {"transformer": cfg}, {"transformer": mods}, {}, {}, None,
                                 tmp_path / "work")
    assert (tmp_path / "work" / "checkpoints" / "step-7" / "transformer" / "adapter_model.safetensors").is_file()
