"""LTX-Video: a tiny LTX pipeline trains on videos from S3 (SeaweedFS) to S3 on 2 torchrun processes with
FSDP2 (gloo); the default file (ComfyUI layout, ``diffusion_model.`` keys) loads through diffusers'
LTXPipeline.load_lora_weights with the trained adapter's effect; every key is one ComfyUI's LoRA
loader maps for LTXV, and applying it by ComfyUI's rule gives the same model; bad inputs fail clearly."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_trainer
from kubelora_trainer.storage import download, upload_tree
from kubelora_trainer.models.ltx_video.tiny import build_tiny_ltx_video, moving_square
from kubelora_trainer.synthetic import write_video

STEPS = 40


@pytest.fixture(scope="module")
def tiny_ltx_dir(tmp_path_factory) -> Path:
    return build_tiny_ltx_video(tmp_path_factory.mktemp("tiny-ltx") / "model")


@pytest.fixture()
def video_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_video(d / "slide.mp4", moving_square(12))                       # 12 frames: the first 9 train
    (d / "slide.txt").write_text("a blue square sliding right")
    write_video(d / "short.mp4", moving_square(5))                        # shorter than dataset.frames
    (d / "short.txt").write_text("too short to train")
    write_video(d / "uncaptioned.webm", moving_square(9), codec="libvpx")  # no caption: skipped, counted
    return d


def manifest(path: Path, bucket: str, **over) -> Path:
    spec = {
        "model": {"type": "ltx-video", "diffusersPath": f"s3://{bucket}/models/tiny-ltx", "dtype": "float32"},
        "dataset": {"uri": f"s3://{bucket}/data", "resolution": 32, "frames": 9},
        "adapter": {"rank": 8, "alpha": 16},
        "training": {"steps": STEPS, "learningRate": 3e-3, "microBatchSize": 2, "logEvery": 10, "seed": 1,
                     "timestepSampling": "uniform"},
        "output": {"uri": f"s3://{bucket}/out/run1", "formats": ["comfyui", "diffusers"]},
    }
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v}
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": "ltx"}, "spec": spec}))
    return path


def _probe():
    """A fixed transformer input: 2 latent frames of 4x4 tokens, 12 text tokens (3 padded)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 12)
    mask[:, 9:] = 0
    return dict(hidden_states=torch.randn(1, 32, 8, generator=g), encoder_hidden_states=torch.randn(1, 12, 32, generator=g),
                timestep=torch.tensor([600.0]), encoder_attention_mask=mask, num_frames=2, height=4, width=4,
                rope_interpolation_scale=(8 / 25, 8, 8), return_dict=False)


def _peft_reference(tiny_ltx_dir, ckpt: Path):
    """The trained adapter as the trainer saved it (raw lora_A/lora_B, real alpha) on the base."""
    from diffusers import LTXVideoTransformer3DModel
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file
    ref = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx_dir, subfolder="transformer")
    cfg = LoraConfig(**{k: v for k, v in json.loads((ckpt / "adapter_config.json").read_text()).items()
                        if k in ("r", "lora_alpha", "target_modules", "lora_dropout")})
    assert (cfg.r, cfg.lora_alpha) == (8, 16)
    inject_adapter_in_model(cfg, ref)
    sd = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
          for k, v in load_file(str(ckpt / "adapter_model.safetensors")).items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    with torch.no_grad():
        return ref(**_probe())[0]


# ComfyUI's LTXV model (comfy/ldm/lightricks/model.py, LTXVModel) names four things differently from
# diffusers: patchify_proj, adaln_single, and q_norm/k_norm in every attention; the blocks
# (transformer_blocks.N.attn1/attn2.to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2), proj_out,
# caption_projection and scale_shift_table are named alike. Written here from that file, not taken
# from the trainer; checked below against diffusers' own single-file conversion.
COMFY_LTXV_NAMES = {"proj_in": "patchify_proj", "time_embed": "adaln_single", "norm_q": "q_norm", "norm_k": "k_norm"}


def comfy_ltxv_state_dict(transformer) -> dict:
    """The state dict ComfyUI's LTXV model has: 'diffusion_model.' + its module names."""
    return {"diffusion_model." + ".".join(COMFY_LTXV_NAMES.get(p, p) for p in k.split(".")): v.detach().clone()
            for k, v in transformer.state_dict().items()}


def comfy_lora_key_map(comfy_sd: dict) -> dict:
    """comfy/lora.py model_lora_keys_unet, the rule that applies to LTXV (it has no model-specific
    branch): every 'diffusion_model.<name>.weight' is reachable as the LoRA module 'diffusion_model.<name>'."""
    return {k[:-len(".weight")]: k for k in comfy_sd if k.startswith("diffusion_model.") and k.endswith(".weight")}


def comfy_apply(comfy_sd: dict, key_map: dict, lora: dict) -> set:
    """comfy/lora.py load_lora + calculate_weight for the 'diffusers2' layout (<x>.lora_B.weight is up,
    <x>.lora_A.weight is down; no <x>.alpha means alpha 1): W += up @ down at strength 1. Returns the
    keys it consumed (ComfyUI warns 'lora key not loaded' for the others)."""
    used = set()
    for x, target in key_map.items():
        up, down = f"{x}.lora_B.weight", f"{x}.lora_A.weight"
        if up in lora:
            comfy_sd[target] += lora[up].float() @ lora[down].float()
            used |= {up, down}
    return used


def to_diffusers(comfy_sd: dict) -> dict:
    """Back to diffusers names through diffusers' single-file converter (original LTX checkpoints
    carry 'model.diffusion_model.' where ComfyUI's model has 'diffusion_model.')."""
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers
    return convert_ltx_transformer_checkpoint_to_diffusers({"model." + k: v for k, v in comfy_sd.items()})


def test_train_two_ranks_videos_s3_to_s3_then_load_in_diffusers_and_comfyui(s3, tmp_path, tiny_ltx_dir, video_data):
    s3.create_bucket(Bucket="ltx")
    upload_tree(tiny_ltx_dir, "s3://ltx/models/tiny-ltx", client=s3)
    upload_tree(video_data, "s3://ltx/data", client=s3)
    proc = run_trainer(manifest(tmp_path / "job.yaml", "ltx"), s3.env, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[train] step {STEPS}/{STEPS}" in proc.stdout, proc.stdout
    assert ("skipped short.mp4: video is too short: 6 frames at the model's 25 fps; the shortest video frame bucket "
            "is 9") in proc.stdout

    out = download("s3://ltx/out/run1", tmp_path / "result", client=s3, log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == {"usable": 1, "missingCaption": 1, "emptyCaptionUsed": 0, "unreadable": 0}
    # unset, the temporal positions were decided by the tiny (0.9.1-style) VAE: recorded as resolved
    spec_json = json.loads((out / "checkpoints" / f"step-{STEPS}" / "state" / "spec.json").read_text())
    assert m["spec"]["model"]["causalTemporalPositioning"] is False is spec_json["model"]["causalTemporalPositioning"]
    assert m["buckets"]["dropped"] == {"tooShort": 1} and list(m["buckets"]["buckets"]) == ["32x32x9"]
    assert [(a["file"], a["format"]) for a in m["artifacts"]] == [("lora.safetensors", "comfyui"),
                                                                  ("lora.diffusers.safetensors", "diffusers")]
    assert m["artifacts"][0]["sha256"] == hashlib.sha256((out / "lora.safetensors").read_bytes()).hexdigest()
    assert m["metrics"]["worldSize"] == 2
    hist = [loss for _, loss in m["metrics"]["lossHistory"]]
    assert len(hist) == STEPS and all(map(torch.isfinite, torch.tensor(hist)))
    first, last = sum(hist[:5]) / 5, sum(hist[-10:]) / 10
    assert last < 0.85 * first, (first, last)

    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["kubelora.lora_format"] == "comfyui" and meta["kubelora.rank"] == "8" and meta["kubelora.alpha"] == "16"
    comfy_file = load_file(str(out / "lora.safetensors"))
    diffusers_file = load_file(str(out / "lora.diffusers.safetensors"))
    # 2 blocks x (2 attentions x 4 linears + 2 MLP linears) x (A, B); nothing outside the blocks
    assert len(comfy_file) == 2 * 10 * 2
    assert "diffusion_model.transformer_blocks.1.attn2.to_out.0.lora_B.weight" in comfy_file
    assert "diffusion_model.transformer_blocks.0.ff.net.0.proj.lora_A.weight" in comfy_file
    assert sorted(k.replace("diffusion_model.", "transformer.", 1) for k in comfy_file) == sorted(diffusers_file)

    ref_out = _peft_reference(tiny_ltx_dir, out / "checkpoints" / f"step-{STEPS}" / "transformer")
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel
    with torch.no_grad():
        base_out = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx_dir, subfolder="transformer")(**_probe())[0]
    assert (ref_out - base_out).abs().max() > 1e-3, "the adapter should change the output"

    # (b) both files through diffusers' own LTX loader
    for name in ("lora.safetensors", "lora.diffusers.safetensors"):
        pipe = LTXPipeline.from_pretrained(tiny_ltx_dir)
        pipe.load_lora_weights(str(out / name))
        n_lora = sum(1 for _, mod in pipe.transformer.named_modules() if hasattr(mod, "lora_A") and mod.lora_A)
        assert n_lora == len(comfy_file) // 2, name
        with torch.no_grad():
            got = pipe.transformer(**_probe())[0]
        torch.testing.assert_close(got, ref_out, atol=2e-5, rtol=1e-4, msg=name)

    # (c) ComfyUI: every key of the default file is one its loader maps and consumes ...
    base = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx_dir, subfolder="transformer")
    comfy_sd = comfy_ltxv_state_dict(base)
    assert set(to_diffusers(dict(comfy_sd))) == set(base.state_dict()), "ComfyUI names must invert diffusers' conversion"
    key_map = comfy_lora_key_map(comfy_sd)
    for key in comfy_file:
        module, _, suffix = key.rpartition(".lora_")
        assert suffix in ("A.weight", "B.weight") and module in key_map, key
    assert comfy_apply(comfy_sd, key_map, comfy_file) == set(comfy_file)
    # ... while the seed's Diffusers keys ('transformer.…') are dropped by it, every one
    assert comfy_apply(comfy_ltxv_state_dict(base), key_map, diffusers_file) == set()
    # ... and applying it by ComfyUI's rule gives the trained model's output
    merged = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx_dir, subfolder="transformer")
    merged.load_state_dict(to_diffusers(comfy_sd), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**_probe())[0], ref_out, atol=2e-5, rtol=1e-4)


def test_images_train_as_one_frame_clips(tiny_ltx_dir, tmp_path):
    """frames unset (1): an image is a one-frame clip; encode + loss run on it, both timestep samplers."""
    from types import SimpleNamespace
    from kubelora_trainer.data import load_clip
    from kubelora_trainer.models import get_family
    fam = get_family("ltx-video")
    moving_square(1)[0].save(tmp_path / "im.png")
    comps = fam.load(SimpleNamespace(dtype="float32"), {"diffusersPath": str(tiny_ltx_dir)}, torch.device("cpu"))
    clip = load_clip(tmp_path / "im.png", 32, 32, 1)
    (enc,) = fam.encode(comps, clip.unsqueeze(0), ["a blue square"])
    assert enc["latents"].shape == (8, 1, 4, 4) and enc["prompt_embeds"].shape == (256, 32)
    batch = {k: v.unsqueeze(0) for k, v in enc.items()}
    for method in ("logit_normal", "uniform"):
        g = torch.Generator().manual_seed(0)
        loss = fam.loss(comps, batch, None, SimpleNamespace(timestepSampling=method, sigmoidScale=1.0, timestepShift=None), g)
        assert torch.isfinite(loss) and loss > 0


def test_captions_keep_256_t5_tokens(tiny_ltx_dir):
    """T5 text is kept to 256 tokens (LTX-Video's encode_prompt default, as diffusion-pipe), not
    LTXPipeline's 128: a caption of ~200 tokens keeps its tail in the mask and the embeddings."""
    from types import SimpleNamespace
    from kubelora_trainer.models import get_family
    fam = get_family("ltx-video")
    comps = fam.load(SimpleNamespace(dtype="float32"), {"diffusersPath": str(tiny_ltx_dir)}, torch.device("cpu"))
    tok = comps.encoders["pipe"].tokenizer
    long = " ".join(["a blue square"] * 20)
    n = len(tok(long).input_ids)
    assert 128 < n < 256
    clip = torch.zeros(1, 3, 1, 32, 32)
    (short_enc,) = fam.encode(comps, clip, ["a blue square"])
    (enc,) = fam.encode(comps, clip, [long])
    assert enc["prompt_embeds"].shape == (256, 32) and int(enc["prompt_mask"].sum()) == n
    # the cut-off tail changes what the text encoder gives for the kept tokens' tail
    (cut,) = fam.encode(comps, clip, [tok.decode(tok(long).input_ids[:127])])
    assert int(cut["prompt_mask"].sum()) < n and not torch.allclose(enc["prompt_embeds"][:n], cut["prompt_embeds"][:n])
    assert int(short_enc["prompt_mask"].sum()) == len(tok("a blue square").input_ids)


def test_t5_runs_with_the_caption_mask_in_training_and_samples(tiny_ltx_dir):
    """As the original LTX pipeline diffusion-pipe calls (text_encoder(ids, attention_mask=mask)), not
    diffusers' LTXPipeline.encode_prompt (T5 without the mask): the cached caption embeddings and the
    sample prompts' (and negative prompts') are T5's with the mask over 256 max-length-padded tokens."""
    from types import SimpleNamespace
    from kubelora_trainer.models import get_family
    fam = get_family("ltx-video")
    comps = fam.load(SimpleNamespace(dtype="float32"), {"diffusersPath": str(tiny_ltx_dir)}, torch.device("cpu"))
    pipe = comps.encoders["pipe"]

    def reference(text):
        t = pipe.tokenizer([text], padding="max_length", max_length=256, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return pipe.text_encoder(t.input_ids, attention_mask=t.attention_mask)[0][0], t.attention_mask[0].bool()
    caption = "a red square moving right"
    (enc,) = fam.encode(comps, torch.zeros(1, 3, 1, 32, 32), [caption])
    want, mask = reference(caption)
    assert torch.equal(enc["prompt_mask"], mask)
    n = int(mask.sum())
    torch.testing.assert_close(enc["prompt_embeds"][:n], want[:n])
    kit = fam.sampling_kit(comps, [{"prompt": caption, "negativePrompt": "blurry", "guidance": 3.0},
                                   {"prompt": caption, "negativePrompt": None, "guidance": 1.0}])
    cfg, plain = kit["embeds"]
    torch.testing.assert_close(cfg["prompt_embeds"][0], enc["prompt_embeds"])
    neg, neg_mask = reference("blurry")
    assert torch.equal(cfg["negative_prompt_attention_mask"][0], neg_mask)
    m = int(neg_mask.sum())
    torch.testing.assert_close(cfg["negative_prompt_embeds"][0][:m], neg[:m])
    assert "negative_prompt_embeds" not in plain and torch.equal(plain["prompt_attention_mask"][0], mask)


def test_text_padding_is_trimmed_and_a_full_mask_dropped_with_the_same_loss(tiny_ltx_dir):
    """Padded text keys are masked out anyway: the loss with the trimmed, unmasked text equals the
    transformer's loss with the whole padded text and its mask; with every caption filling the
    kept positions the attention runs without a mask (flash attention on a GPU)."""
    from types import SimpleNamespace
    from unittest import mock

    from kubelora_trainer.models import get_family
    fam = get_family("ltx-video")
    comps = fam.load(SimpleNamespace(dtype="float32"), {"diffusersPath": str(tiny_ltx_dir)}, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 8, 1, 4, 4, generator=g)
    embeds = torch.randn(2, 128, 32, generator=g)
    mask = torch.zeros(2, 128, dtype=torch.long)
    mask[0, :7], mask[1, :7] = 1, 1
    spec = SimpleNamespace(timestepSampling="uniform", sigmoidScale=1.0, timestepShift=None)
    masks = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real_sdpa(*args, **kwargs)
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", spy):
        ours = fam.loss(comps, {"latents": latents, "prompt_embeds": embeds, "prompt_mask": mask}, None, spec,
                        torch.Generator().manual_seed(5))
    assert masks and all(m is None for m in masks)
    # the reference: the same noise and timesteps, the whole padded text with its mask
    from kubelora_trainer.models.ltx_video import family as ltx
    with mock.patch.object(ltx, "trim_text_padding", lambda e, m, **k: (e, m, bool(m.bool().all()))):
        ref = fam.loss(comps, {"latents": latents, "prompt_embeds": embeds, "prompt_mask": mask}, None, spec,
                       torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_export_parse_round_trip_and_comfy_names():
    from kubelora_trainer.models.ltx_video.family import FAMILY
    g = torch.Generator().manual_seed(0)
    lora = {"transformer": {m: (torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g))
                            for m in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2", "proj_in",
                                      "time_embed.linear")}}
    comfy = FAMILY.export(lora, 2.0, "comfyui")
    # modules named differently in ComfyUI get its names (only reachable with adapter.targetModules)
    assert {k.rsplit(".lora_", 1)[0] for k in comfy} == {
        "diffusion_model.transformer_blocks.0.attn1.to_q", "diffusion_model.transformer_blocks.0.ff.net.2",
        "diffusion_model.patchify_proj", "diffusion_model.adaln_single.linear"}
    torch.testing.assert_close(comfy["diffusion_model.patchify_proj.lora_B.weight"], lora["transformer"]["proj_in"][1] * 2)
    for fmt in ("comfyui", "diffusers"):
        parsed, scale = FAMILY.parse(FAMILY.export(lora, 2.0, fmt), fmt)
        assert scale == 1.0 and sorted(parsed["transformer"]) == sorted(lora["transformer"])
        for m, (a, b) in lora["transformer"].items():
            torch.testing.assert_close(parsed["transformer"][m][0], a)
            torch.testing.assert_close(parsed["transformer"][m][1], b * 2)
        assert FAMILY.export(parsed, 1.0, fmt).keys() == FAMILY.export(lora, 2.0, fmt).keys()
    # another trainer's file with alpha: folded into B
    other = {"diffusion_model.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.ones(4, 16),
             "diffusion_model.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.ones(16, 4),
             "diffusion_model.transformer_blocks.0.attn1.to_k.alpha": torch.tensor(2.0)}
    parsed, _ = FAMILY.parse(other, "comfyui")
    torch.testing.assert_close(parsed["transformer"]["transformer_blocks.0.attn1.to_k"][1], torch.full((16, 4), 0.5))
    with pytest.raises(ValueError, match="format 'kohya' is not available for ltx-video"):
        FAMILY.export(lora, 1.0, "kohya")
    with pytest.raises(ValueError, match="does not start with 'diffusion_model.'"):
        FAMILY.parse({"transformer.x.lora_A.weight": torch.ones(1)}, "comfyui")


BASE = {"output": {"uri": "s3://out/x"}}
LTX = {"type": "ltx-video", "diffusersPath": "s3://models/ltx"}


@pytest.mark.parametrize("model,dataset,expect", [
    (LTX, {"frames": 24}, "dataset.frames: ltx-video needs 8k+1 frames (e.g. 17 or 25); got 24"),
    (LTX, {"resolution": 48}, "dataset: ltx-video needs width and height divisible by 32 (e.g. 32x32); got 48x48"),
    (LTX, {"width": 768, "height": 496}, "dataset: ltx-video needs width and height divisible by 32 (e.g. 768x480); got 768x496"),
    ({"type": "ltx-video"}, {}, "model.type ltx-video needs model.diffusersPath"),
    ({**LTX, "transformerPath": "s3://models/t.safetensors"}, {},
     "model.transformerPath does not apply to model.type ltx-video (it takes model.diffusersPath)"),
])
def test_spec_refuses(model, dataset, expect):
    from kubelora_trainer.spec import SpecError, parse_spec
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "model": model, "dataset": {"uri": "s3://data/x", **dataset}})
    assert expect in str(e.value)


def test_spec_accepts_ltx_shapes():
    from kubelora_trainer.spec import parse_spec
    for ds in ({"frames": 121, "width": 768, "height": 512}, {"frames": 1, "resolution": 512}, {}):
        parse_spec({**BASE, "model": LTX, "dataset": {"uri": "s3://data/x", **ds}})


def test_layout_errors_name_what_was_expected(tmp_path, tiny_ltx_dir):
    from kubelora_trainer.models.base import ModelError
    from kubelora_trainer.models.ltx_video.family import check_layout
    with pytest.raises(ModelError, match=r"model.diffusersPath: .* has no model_index.json; expected an LTX-Video folder"):
        check_layout(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_ltx_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelError, match=r"lacks vae/; expected an LTX-Video folder in diffusers layout"):
        check_layout(partial)


def test_wrong_family_checkpoint_fails_clearly(tmp_path, tiny_flux_dir):
    """A Flux folder given as an LTX model: exit 2 naming what was found and expected, no traceback."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(data / "a.png")
    (data / "a.txt").write_text("red")
    job = manifest(tmp_path / "job.yaml", "unused", model={"diffusersPath": str(tiny_flux_dir)},
                   dataset={"uri": str(data), "frames": 1}, output={"uri": str(tmp_path / "out")})
    proc = run_trainer(job, {"KUBELORA_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("holds a FluxPipeline whose transformer is FluxTransformer2DModel; expected an LTX-Video folder in "
            "diffusers layout") in proc.stderr
    assert "with an LTXVideoTransformer3DModel" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_modules_diffusers_skips_in_the_comfyui_file_are_named_at_export():
    from kubelora_trainer.models.ltx_video.family import FAMILY
    lora = {"transformer": {"proj_in": (torch.ones(2, 8), torch.ones(8, 2)),
                            "transformer_blocks.0.attn1.to_q": (torch.ones(2, 8), torch.ones(8, 2))}}
    gaps = FAMILY.export_gaps(lora, "comfyui")
    assert len(gaps) == 1 and "diffusers skips" in gaps[0] and "proj_in" in gaps[0] and "to_q" not in gaps[0]
    assert FAMILY.export_gaps(lora, "diffusers") == []


def test_parse_takes_every_linear_of_the_transformer_and_refuses_other_families_files():
    """LINEARS names every nn.Linear of LTXVideoTransformer3DModel; a Flux or Cosmos ComfyUI LoRA
    (same diffusion_model. prefix) is refused naming its modules instead of converting."""
    from diffusers import LTXVideoTransformer3DModel
    from kubelora_trainer.models import get_family
    from kubelora_trainer.models.ltx_video.family import FAMILY
    from kubelora_trainer.models.ltx_video.tiny import TINY_TRANSFORMER
    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(**TINY_TRANSFORMER)
    lora = {"transformer": {n: (torch.ones(2, m.in_features), torch.ones(m.out_features, 2))
                            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}}
    for fmt in ("comfyui", "diffusers"):
        back, _ = FAMILY.parse(FAMILY.export(lora, 1.0, fmt), fmt)
        assert back["transformer"].keys() == lora["transformer"].keys()
    one = (torch.ones(2, 16), torch.ones(16, 2))
    for other, module in (("flux", "transformer_blocks.0.attn.to_q"), ("cosmos", "transformer_blocks.0.attn1.to_q")):
        file = get_family(other).export({"transformer": {module: one}}, 1.0, "comfyui")
        with pytest.raises(ValueError, match="not modules of the LTX-Video transformer: .*another model type"):
            FAMILY.parse(file, "comfyui")


def test_causal_temporal_positions_follow_diffusers_ltx_condition_pipeline(tiny_ltx_dir):
    """video_coords: uniform positions give exactly the rotary embedding LTXPipeline's
    rope_interpolation_scale gives; causal ones are LTXConditionPipeline's own video ids (8f-7,
    clamped at 0, in seconds). Unset, the checkpoint decides by its VAE, as diffusers' loader does."""
    from diffusers import LTXConditionPipeline, LTXVideoTransformer3DModel
    from kubelora_trainer.models.ltx_video.family import causal_positions, video_coords

    tr = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx_dir, subfolder="transformer")
    b, f, h, w, fps = 2, 3, 4, 5, 25
    hidden = torch.zeros(b, f * h * w, 8)
    uniform = video_coords(b, f, h, w, temporal=8, spatial=32, patch=1, patch_t=1, fps=fps, causal=False)
    ref = tr.rope(hidden, f, h, w, (8 / fps, 32, 32), None)
    for got, want in zip(tr.rope(hidden, f, h, w, None, uniform), ref):
        torch.testing.assert_close(got, want)
    causal = video_coords(b, f, h, w, temporal=8, spatial=32, patch=1, patch_t=1, fps=fps, causal=True)
    ids = LTXConditionPipeline._scale_video_ids(LTXConditionPipeline._prepare_video_ids(b, f, h, w), 32, 8).float()
    ids[:, 0] = ids[:, 0] / fps
    torch.testing.assert_close(causal, ids)
    assert sorted(set(causal[0, 0].tolist())) == pytest.approx([0, 1 / fps, 9 / fps])  # frames 0, 1, 9
    # which checkpoint: the setting wins; unset, the 0.9.5+ VAE means causal
    new_vae = {"down_block_types": ["LTXVideoDownBlock3D"] * 3 + ["LTXVideo095DownBlock3D"]}
    assert causal_positions(None, new_vae)[0] and not causal_positions(None, {"down_block_types": ["LTXVideoDownBlock3D"]})[0]
    assert causal_positions(False, new_vae) == (False, "model.causalTemporalPositioning")


def test_causal_positions_change_video_training_not_images_and_samples_follow(tiny_ltx_dir):
    """With causal positions a clip's loss differs (frames sit elsewhere in time), a one-frame
    item's is identical (frame 0 is at 0 either way); samples then come from LTXConditionPipeline."""
    from types import SimpleNamespace
    from kubelora_trainer.models import get_family

    fam = get_family("ltx-video")
    comps = {c: fam.load(SimpleNamespace(dtype="float32", causalTemporalPositioning=c), {"diffusersPath": str(tiny_ltx_dir)},
                         torch.device("cpu")) for c in (False, True)}
    comps[True].trainable["transformer"].load_state_dict(comps[False].trainable["transformer"].state_dict())
    assert comps[True].info["causal"] and not comps[False].info["causal"]
    g = torch.Generator().manual_seed(0)
    spec = SimpleNamespace(timestepSampling="uniform", sigmoidScale=1.0, timestepShift=None)
    for frames, same in ((3, False), (1, True)):
        batch = {"latents": torch.randn(1, 8, frames, 4, 4, generator=g), "prompt_embeds": torch.randn(1, 6, 32, generator=g),
                 "prompt_mask": torch.ones(1, 6, dtype=torch.long)}
        losses = [fam.loss(comps[c], batch, None, spec, torch.Generator().manual_seed(1)) for c in (False, True)]
        assert bool(torch.equal(losses[0], losses[1])) == same, (frames, losses)
    prompt = {"prompt": "a blue square", "negativePrompt": "", "guidance": 1.0, "index": 0, "height": 32, "width": 32,
              "frames": 9, "steps": 2}
    kit = fam.sampling_kit(comps[True], [prompt])
    clip = fam.sample(kit, comps[True], prompt, torch.Generator().manual_seed(0))
    assert clip.shape == (9, 32, 32, 3) and (0 <= clip).all() and (clip <= 1).all()
