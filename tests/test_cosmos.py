"""Cosmos 1.0 text2world: a tiny model in the original NVIDIA/ComfyUI file layout trains on 2
torchrun processes (FSDP2, gloo) from S3 (SeaweedFS) to S3; the ComfyUI file (default) carries only keys
ComfyUI's LoRA loader applies and, applied the way ComfyUI applies it, reproduces the trained
adapter; the diffusers file loads through CosmosTransformer3DModel.load_lora_adapter with the same
effect; the key renaming agrees with diffusers' own Cosmos checkpoint conversion; bad inputs are
refused with the field named.

The trainer runs in subprocesses, so the tiny 32x32 run sets KUBELORA_COSMOS_ALLOW_ANY_SIZE=1
(families.py: test-only) to lift Cosmos's fixed 960/1280 px sizes; everything else is the product path.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_trainer
from kubelora_trainer.families import COSMOS_ANY_SIZE_ENV
from kubelora_trainer.models.cosmos import keys as K
from kubelora_trainer.models.base import ModelError
from kubelora_trainer.models.cosmos.family import FAMILY, ensure_torch_resize, load_text_encoder, load_tokenizer, load_transformer, load_vae
from kubelora_trainer.spec import SpecError, parse_spec
from kubelora_trainer.storage import download, upload_tree
from kubelora_trainer.models.cosmos.tiny import TEXT_ENCODER_FILE, TINY_TRANSFORMER, build_tiny_cosmos

CONFIGS = Path(K.__file__).resolve().parent / "configs"


@pytest.fixture(scope="session")
def tiny_cosmos(tmp_path_factory) -> dict:
    return build_tiny_cosmos(tmp_path_factory.mktemp("tiny-cosmos") / "model")


def _diffusers_convert(sd: dict) -> dict:
    """diffusers' own Cosmos checkpoint conversion. In 0.42.1 it pops every key before testing the
    checkpoint for a Cosmos 1.0 key (so it always takes its 2.0 table); a dict whose pop keeps the
    key lets its 1.0 branch run as intended."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    class KeepKeys(dict):
        def pop(self, k, *default):
            return self[k]
    return convert_cosmos_transformer_checkpoint_to_diffusers(KeepKeys(sd))


def _comfyui_dit_weights(n_blocks: int) -> set[str]:
    """The weight names of ComfyUI's Cosmos 1.0 GeneralDIT (comfy/ldm/cosmos: x_embedder PatchEmbed
    with proj = Sequential(Rearrange, Linear); t_embedder = Sequential(Timesteps, TimestepEmbedding);
    blocks = ModuleDict block{i} of GeneralDITTransformerBlock("FA-CA-MLP") whose DITBuildingBlocks
    hold adaLN_modulation = Sequential(SiLU, Linear, Linear) and block = VideoAttn(attn = Attention with
    to_q/to_k = Sequential(Linear, RMSNorm), to_v = Sequential(Linear, Identity), to_out =
    Sequential(Linear, Dropout)) or GPT2FeedForward(layer1, layer2); final_layer with linear and
    adaLN_modulation; affline_norm RMSNorm), written from that source, not from our tables."""
    names = {"x_embedder.proj.1.weight", "t_embedder.1.linear_1.weight", "t_embedder.1.linear_2.weight",
             "affline_norm.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
             "final_layer.adaLN_modulation.2.weight"}
    for i in range(n_blocks):
        for j in range(3):
            names |= {f"blocks.block{i}.blocks.{j}.adaLN_modulation.{k}.weight" for k in (1, 2)}
        for j in (0, 1):
            a = f"blocks.block{i}.blocks.{j}.block.attn"
            names |= {f"{a}.to_q.0.weight", f"{a}.to_q.1.weight", f"{a}.to_k.0.weight", f"{a}.to_k.1.weight",
                      f"{a}.to_v.0.weight", f"{a}.to_out.0.weight"}
        names |= {f"blocks.block{i}.blocks.2.block.layer1.weight", f"blocks.block{i}.blocks.2.block.layer2.weight"}
    return names


def comfyui_lora_key_map(dit_weight_names) -> dict[str, str]:
    """ComfyUI's comfy/lora.py model_lora_keys_unet rule for a model whose state dict is
    diffusion_model.<name>: each weight is reachable as lora_unet_<name with _> and, in the generic
    format, as diffusion_model.<module> (the weight key without .weight)."""
    out = {}
    for n in dit_weight_names:
        k = f"diffusion_model.{n}"
        if k.endswith(".weight"):
            out["lora_unet_" + n[:-len(".weight")].replace(".", "_")] = k
            out[k[:-len(".weight")]] = k
    return out


def _probe(cfg: dict, frames: int = 2):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, frames, 4, 6, generator=g), timestep=torch.tensor([0.1]),
                encoder_hidden_states=torch.randn(1, 12, cfg["text_embed_dim"], generator=g), fps=24,
                padding_mask=torch.zeros(1, 1, 4, 6), return_dict=False)


def _manifest(path: Path, bucket: str, **over) -> Path:
    m = f"s3://{bucket}/models/cosmos"
    spec = {
        "model": {"type": "cosmos", "transformerPath": f"{m}/cosmos-1.0-diffusion-text2world.pt",
                  "vaePath": f"{m}/cosmos_cv8x8x8_1.0.safetensors", "textEncoderPath": f"{m}/text_encoder",
                  "dtype": "float32"},
        "dataset": {"uri": f"s3://{bucket}/data", "width": 32, "height": 32, "frames": 1},
        "adapter": {"rank": 8, "alpha": 16},
        "training": {"steps": 40, "learningRate": 3e-3, "microBatchSize": 4, "logEvery": 10, "seed": 1},
        "output": {"uri": f"s3://{bucket}/out/run1", "formats": ["comfyui", "diffusers"]},
    }
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v}
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": "cosmos-t"}, "spec": spec}))
    return path


def _seed_bucket(s3, bucket, tiny_cosmos, data: Path):
    s3.create_bucket(Bucket=bucket)
    upload_tree(Path(tiny_cosmos["vaePath"]).parent, f"s3://{bucket}/models/cosmos", client=s3)
    upload_tree(data, f"s3://{bucket}/data", client=s3)


@pytest.fixture()
def overfit_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    im = Image.new("RGB", (32, 32), (245, 245, 245))
    im.paste((40, 60, 220), (6, 6, 26, 26))
    im.save(d / "square.png")
    (d / "square.txt").write_text("a blue square on a white background")
    return d


def test_train_two_ranks_s3_to_s3_comfyui_and_diffusers_files(s3, tmp_path, tiny_cosmos, overfit_data):
    from diffusers import CosmosTransformer3DModel
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    _seed_bucket(s3, "cos", tiny_cosmos, overfit_data)
    proc = run_trainer(_manifest(tmp_path / "job.yaml", "cos"), {**s3.env, COSMOS_ANY_SIZE_ENV: "1"}, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[train] step 40/40" in proc.stdout, proc.stdout

    out = download("s3://cos/out/run1", tmp_path / "result", client=s3, log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert [(a["file"], a["format"]) for a in m["artifacts"]] == [("lora.safetensors", "comfyui"),
                                                                    ("lora.diffusers.safetensors", "diffusers")]
    assert m["metrics"]["worldSize"] == 2
    hist = [loss for _, loss in m["metrics"]["lossHistory"]]
    assert all(torch.isfinite(torch.tensor(hist)))
    first, last = sum(hist[:5]) / 5, sum(hist[-10:]) / 10
    assert last < 0.8 * first, (first, last)

    comfy = load_file(str(out / "lora.safetensors"))
    diff = load_file(str(out / "lora.diffusers.safetensors"))
    ckpt = out / "checkpoints" / "step-40" / "transformer"
    trained = load_file(str(ckpt / "adapter_model.safetensors"))
    adapted = {k.rsplit(".lora_", 1)[0] for k in trained}            # modules that carried the adapter
    assert "transformer_blocks.1.attn2.to_k" in adapted and "transformer_blocks.0.ff.net.2" in adapted

    # (c) every ComfyUI key is one ComfyUI's loader applies to the Cosmos 1.0 DiT
    key_map = comfyui_lora_key_map(_comfyui_dit_weights(TINY_TRANSFORMER["num_layers"]))
    comfy_modules = {k.rsplit(".lora_", 1)[0] for k in comfy}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in comfy)
    assert comfy_modules <= set(key_map), sorted(comfy_modules - set(key_map))[:5]
    assert "diffusion_model.blocks.block1.blocks.1.block.attn.to_k.0" in comfy_modules

    # the ComfyUI names map one-to-one, through diffusers' own conversion, onto the adapted modules
    # (the values tag each key, so the renamed dict tells which ComfyUI module became which)
    marker = {"net.blocks.block1.blocks.0.block.attn.to_q.0.weight": "marker"}   # Cosmos 1.0 branch
    converted = _diffusers_convert(marker | {f"net.{cm[len('diffusion_model.'):]}.weight": cm for cm in comfy_modules})
    to_diffusers = {cm: k[:-len(".weight")] for k, cm in converted.items() if cm != "marker"}
    assert set(to_diffusers) == comfy_modules
    assert len(set(to_diffusers.values())) == len(to_diffusers) == len(adapted)
    assert set(to_diffusers.values()) == adapted

    # reference: the trained adapter (peft checkpoint with the real alpha) on the base transformer
    cfg = LoraConfig(**{k: v for k, v in json.loads((ckpt / "adapter_config.json").read_text()).items()
                        if k in ("r", "lora_alpha", "target_modules", "lora_dropout")})
    assert (cfg.r, cfg.lora_alpha) == (8, 16)
    ensure_torch_resize()
    base = load_transformer(Path(tiny_cosmos["transformerPath"]), torch.float32)
    with torch.no_grad():
        base_out = base(**_probe(TINY_TRANSFORMER))[0]
    ref = load_transformer(Path(tiny_cosmos["transformerPath"]), torch.float32)
    inject_adapter_in_model(cfg, ref)
    sd = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in trained.items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    with torch.no_grad():
        ref_out = ref(**_probe(TINY_TRANSFORMER))[0]
    assert (ref_out - base_out).abs().max() > 1e-3, "the adapter should change the output"

    # (b) the diffusers file through diffusers' loader
    pipe_tr = load_transformer(Path(tiny_cosmos["transformerPath"]), torch.float32)
    assert isinstance(pipe_tr, CosmosTransformer3DModel)
    pipe_tr.load_lora_adapter(str(out / "lora.diffusers.safetensors"), prefix="transformer")
    n_lora = sum(1 for _, mod in pipe_tr.named_modules() if hasattr(mod, "lora_A") and mod.lora_A)
    assert n_lora == len(diff) // 2 == len(adapted)
    with torch.no_grad():
        got = pipe_tr(**_probe(TINY_TRANSFORMER))[0]
    torch.testing.assert_close(got, ref_out, atol=2e-5, rtol=1e-4)

    # the ComfyUI file applied as ComfyUI applies a lora_A/lora_B pair without alpha: W += B @ A
    merged = load_transformer(Path(tiny_cosmos["transformerPath"]), torch.float32)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for cm, dm in to_diffusers.items():
            params[f"{dm}.weight"] += comfy[f"{cm}.lora_B.weight"] @ comfy[f"{cm}.lora_A.weight"]
        merged_out = merged(**_probe(TINY_TRANSFORMER))[0]
    torch.testing.assert_close(merged_out, ref_out, atol=2e-5, rtol=1e-4)

    # parse is the inverse of export for both files
    for fmt, tensors in (("comfyui", comfy), ("diffusers", diff)):
        lora, scale = FAMILY.parse(tensors, fmt)
        assert scale == 1.0 and set(lora["transformer"]) == adapted
        assert FAMILY.export(lora, 1.0, fmt).keys() == tensors.keys()


def test_key_renaming_agrees_with_diffusers_and_comfyui(tiny_cosmos):
    """Our original<->diffusers table equals diffusers' conversion on every key of the tiny
    checkpoint and of a full-size 7B key set (meta tensors), and the tiny checkpoint has exactly
    ComfyUI's GeneralDIT weight names."""
    from diffusers import CosmosTransformer3DModel

    sd = torch.load(tiny_cosmos["transformerPath"], weights_only=True)
    converted = _diffusers_convert(sd)
    ours = {K.diffusers_param(k.removeprefix("net.")): k for k in sd}
    ours.pop(None)
    assert set(converted) == set(ours) == set(CosmosTransformer3DModel(**TINY_TRANSFORMER).state_dict())
    dit = {k[len("net."):] for k in sd if k.startswith("net.") and k.endswith(".weight")}
    assert dit == _comfyui_dit_weights(TINY_TRANSFORMER["num_layers"])

    with torch.device("meta"):
        big = CosmosTransformer3DModel(**json.loads((CONFIGS / "transformer-7b" / "config.json").read_text()))
    names = list(big.state_dict())
    original = {"net." + K.original_param(k): None for k in names}
    assert len(original) == len(names)
    assert set(_diffusers_convert(original)) == set(names)
    for k in names:
        module = k.rsplit(".", 1)[0]
        assert K.diffusers_module(K.original_module(module)) == module


@pytest.mark.parametrize("name", ["transformer-7b", "transformer-14b", "vae", "text_encoder"])
def test_shipped_configs_match_what_the_loader_derives_from_shapes(name):
    """Each shipped config equals the config derived from the shapes of the model it builds, so
    real checkpoints load with the shipped values and tiny ones with their own shapes."""
    from diffusers import AutoencoderKLCosmos, CosmosTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    raw = json.loads((CONFIGS / name / "config.json").read_text())
    cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
    with torch.device("meta"):
        if name.startswith("transformer"):
            model, derive = CosmosTransformer3DModel(**cfg), K.transformer_config
        elif name == "vae":
            model, derive = AutoencoderKLCosmos(**cfg), K.vae_config
        else:
            model, derive = T5EncoderModel(T5Config(**cfg)), K.t5_config
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    derived = derive(shapes, {k: cfg[k] for k in ("patch_size", "concat_padding_mask") if k in cfg})
    for k, v in derived.items():
        assert v == (list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]), k


def test_video_clip_encodes_and_trains_in_process(tiny_cosmos):
    """A 9-frame clip (1 + 8 frames: two latent frames) through encode and the EDM loss, with the
    video RoPE (fps) path and the torch-only padding-mask resize."""
    from types import SimpleNamespace
    comps = FAMILY.load(SimpleNamespace(dtype="float32"), tiny_cosmos, torch.device("cpu"))
    clip = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    item = FAMILY.encode(comps, clip, ["a red circle"])[0]
    assert item["latents"].shape == (16, 2, 4, 4) and item["prompt_embeds"].shape == (512, 32)
    n_tokens = len(comps.encoders["tokenizer"]("a red circle").input_ids)
    assert item["prompt_embeds"][n_tokens:].abs().max() == 0 and item["prompt_embeds"][:n_tokens].abs().max() > 0
    batch = {k: v.unsqueeze(0) for k, v in item.items()}
    loss = FAMILY.loss(comps, batch, None, None, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert comps.trainable["transformer"].patch_embed.proj.weight.grad is not None


def test_edm_preconditioning_matches_diffusers_scheduler():
    from diffusers import EDMEulerScheduler

    from kubelora_trainer.models.cosmos.family import edm_loss_weight, edm_scalings
    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, prediction_type="epsilon")
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
    x, f = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(sched.precondition_inputs(x, sigma), c_in * x)
    torch.testing.assert_close(sched.precondition_noise(sigma), c_noise)
    torch.testing.assert_close(sched.precondition_outputs(x, f, sigma), c_skip * x + c_out * f)
    torch.testing.assert_close(edm_loss_weight(sigma) * c_out ** 2, torch.ones(4))   # weight = 1 / c_out^2


def _spec(**over):
    m = "s3://models/cosmos"
    spec = {"model": {"type": "cosmos", "transformerPath": f"{m}/model.pt", "vaePath": f"{m}/vae.safetensors",
                      "textEncoderPath": f"{m}/text_encoder"},
            "dataset": {"uri": "s3://data/clips", "width": 1280, "height": 704, "frames": 121},
            "output": {"uri": "s3://out/x"}}
    for k, v in over.items():
        spec[k] = {**spec[k], **v}
    return parse_spec(spec)


def test_spec_refuses_bad_cosmos_inputs(monkeypatch):
    monkeypatch.delenv(COSMOS_ANY_SIZE_ENV, raising=False)
    assert _spec().model.type == "cosmos"
    assert _spec(dataset={"width": 960, "height": 960, "frames": 1}).dataset.frames == 1
    with pytest.raises(SpecError, match=r"cosmos supports only the sizes 960x960, 960x704, 704x960, 1280x704, "
                                        r"704x1280 \(width x height\); got 1024x576"):
        _spec(dataset={"width": 1024, "height": 576})
    with pytest.raises(SpecError, match=r"got 512x512"):
        _spec(dataset={"width": None, "height": None, "resolution": 512})
    with pytest.raises(SpecError, match=r"dataset.frames: cosmos supports only 1 or 121 frames \(got 33\)"):
        _spec(dataset={"frames": 33})
    with pytest.raises(SpecError, match=r"model.type cosmos needs model.transformerPath\+model.vaePath\+"
                                        r"model.textEncoderPath \(missing: model.vaePath\)"):
        _spec(model={"vaePath": None})
    with pytest.raises(SpecError, match=r"model.diffusersPath does not apply to model.type cosmos"):
        _spec(model={"diffusersPath": "s3://models/flux"})
    # an object key stages that file alone, without the tokenizer the T5 folder holds
    with pytest.raises(SpecError, match=r"model.textEncoderPath: model.type cosmos needs a folder here.*"
                                        r"point it at s3://models/comfyui/text_encoders/$"):
        _spec(model={"textEncoderPath": "s3://models/comfyui/text_encoders/oldt5_xxl_fp16.safetensors"})
    with pytest.raises(SpecError, match=r"output.formats: 'kohya' is not available for cosmos"):
        _spec(output={"formats": ["kohya"]})
    monkeypatch.setenv(COSMOS_ANY_SIZE_ENV, "1")                  # the test-only escape lifts sizes only
    assert _spec(dataset={"width": 32, "height": 32, "frames": 1}).dataset.width == 32
    with pytest.raises(SpecError, match=r"supports only 1 or 121 frames"):
        _spec(dataset={"width": 32, "height": 32, "frames": 9})


def test_wrong_family_and_broken_files_are_refused_with_the_field(tiny_cosmos, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    flux = tmp_path / "flux1-dev.safetensors"
    save_file(FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                     axes_dims_rope=(2, 2, 4)).state_dict(), str(flux))
    with pytest.raises(ModelError, match=r"model.transformerPath: flux1-dev.safetensors is not a Cosmos 1.0 diffusion transformer"):
        load_transformer(flux, torch.float32)
    predict2 = tmp_path / "cosmos-predict2.pt"
    torch.save({"net.x_embedder.proj.1.weight": torch.zeros(2, 2), "net.blocks.0.self_attn.q_proj.weight": torch.zeros(2, 2)},
               predict2)
    with pytest.raises(ModelError, match=r"is a Cosmos-Predict2 \(2.0\) checkpoint; model.type cosmos trains Cosmos 1.0"):
        load_transformer(predict2, torch.float32)
    with pytest.raises(ModelError, match=r"model.vaePath: cosmos-1.0-diffusion-text2world.pt is not a Cosmos video tokenizer"):
        load_vae(Path(tiny_cosmos["transformerPath"]), torch.float32)
    clip = tmp_path / "clip_l.safetensors"
    save_file(CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2)).state_dict(), str(clip))
    with pytest.raises(ModelError, match=r"model.textEncoderPath: clip_l.safetensors is not a T5 encoder"):
        load_text_encoder(clip, torch.float32)
    with pytest.raises(ModelError, match=r"model.textEncoderPath: no T5 tokenizer"):
        load_tokenizer(clip)
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"model.transformerPath: cannot read model.pt as a weights file"):
        load_transformer(garbage, torch.float32)
    # the T5 encoder may also be named as the file, with its tokenizer beside it
    te_file = Path(tiny_cosmos["textEncoderPath"]) / TEXT_ENCODER_FILE
    assert load_text_encoder(te_file, torch.float32).config.d_model == 32
    assert load_tokenizer(te_file)("a red square").input_ids[-1] == 1


def test_trainer_exits_with_the_field_for_a_wrong_family_checkpoint(s3, tmp_path, tiny_cosmos, overfit_data):
    _seed_bucket(s3, "cwf", tiny_cosmos, overfit_data)
    m = "s3://cwf/models/cosmos"
    job = _manifest(tmp_path / "job.yaml", "cwf", model={"transformerPath": f"{m}/cosmos_cv8x8x8_1.0.safetensors"})
    proc = run_trainer(job, {**s3.env, COSMOS_ANY_SIZE_ENV: "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.transformerPath: cosmos_cv8x8x8_1.0.safetensors is not a Cosmos 1.0 diffusion transformer" in proc.stderr
    assert "Traceback" not in proc.stderr and "[phase] train" not in proc.stdout


def test_parse_reads_other_trainers_files_and_folds_alpha():
    """diffusion-pipe's Cosmos LoRA is diffusion_model.<original module> (unscaled); a per-module
    .alpha is folded into lora_B as alpha / rank, and export writes the same names back."""
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    key = "diffusion_model.blocks.block0.blocks.1.block.attn.to_k.0"
    lora, scale = FAMILY.parse({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b, f"{key}.alpha": torch.tensor(8.0)},
                               "comfyui")
    assert scale == 1.0 and list(lora["transformer"]) == ["transformer_blocks.0.attn2.to_k"]
    torch.testing.assert_close(lora["transformer"]["transformer_blocks.0.attn2.to_k"][1], b * 2)
    assert sorted(FAMILY.export(lora, 1.0, "comfyui")) == [f"{key}.lora_A.weight", f"{key}.lora_B.weight"]
    with pytest.raises(ValueError, match="unpaired LoRA weights"):
        FAMILY.parse({f"{key}.lora_A.weight": a}, "comfyui")
    with pytest.raises(ValueError, match="is not a Cosmos comfyui LoRA key"):
        FAMILY.parse({"transformer.x.lora_A.weight": a}, "comfyui")
    flux = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,   # a Flux diffusers file
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b}
    with pytest.raises(ValueError, match=r"not modules of the Cosmos transformer: transformer_blocks\.0\.attn\.to_q"):
        FAMILY.parse(flux, "diffusers")
