"""SDXL: a tiny SDXL trains UNet + both text encoders from S3 (SeaweedFS) to S3 on 2 torchrun processes
with FSDP2 (gloo); the default Kohya file (lora_unet_/lora_te1_/lora_te2_, real alpha) and the
diffusers file load through StableDiffusionXLPipeline.load_lora_weights with the trained adapter's
effect on the UNet and on both text encoders; every Kohya key is one ComfyUI's loader maps (tiny
and real-size SDXL); the original single-file layout loads like the diffusers folder; bad inputs
fail clearly."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_trainer
from kubelora_trainer.models.sdxl import family as sdxl_mod
from kubelora_trainer.models.base import ModelError
from kubelora_trainer.models.sdxl.keys import diffusers_unet_name, from_kohya_name, sgm_unet_name
from kubelora_trainer.storage import download, upload_tree
from kubelora_trainer.models.sdxl.tiny import build_tiny_sdxl, build_tiny_sdxl_single_file, write_flavor_configs

FAMILY = sdxl_mod.FAMILY
STEPS = 30
CONFIGS = Path(sdxl_mod.__file__).resolve().parent / "configs"


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="module")
def tiny_sdxl_file(tmp_path_factory) -> Path:
    return build_tiny_sdxl_single_file(tmp_path_factory.mktemp("tiny-sdxl-file") / "tiny_sdxl.safetensors")


def manifest(path: Path, bucket: str, **over) -> Path:
    spec = {
        "model": {"type": "sdxl", "diffusersPath": f"s3://{bucket}/models/tiny-sdxl", "dtype": "float32",
                  "vPred": True},
        "dataset": {"uri": f"s3://{bucket}/data", "resolution": 32},
        "adapter": {"rank": 8, "alpha": 16},
        "training": {"steps": STEPS, "learningRate": 3e-2, "textEncoderLearningRate": 1e-2, "microBatchSize": 2,
                     "logEvery": 10, "seed": 1},
        "output": {"uri": f"s3://{bucket}/out/run1", "formats": ["kohya", "diffusers"]},
    }
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v}
    for k in [k for k, v in spec["model"].items() if v is None]:
        del spec["model"][k]
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": "sdxl"}, "spec": spec}))
    return path


def _unet_probe():
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 77, 80, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}, return_dict=False)


@torch.no_grad()
def _outputs(pipe):
    """UNet output on a fixed input, and both text encoders' conditioning for a caption."""
    ids = [t("a blue square", padding="max_length", max_length=77, return_tensors="pt").input_ids
           for t in (pipe.tokenizer, pipe.tokenizer_2)]
    emb, pooled = sdxl_mod.text_conditioning(pipe.text_encoder, pipe.text_encoder_2, *ids)
    return {"unet": pipe.unet(**_unet_probe())[0], "prompt_embeds": emb, "pooled": pooled}


@torch.no_grad()
def _denoise_loss(pipe, image: Path, caption: str) -> float:
    """v-prediction MSE on one image at 16 evenly spaced timesteps with fixed noise."""
    from diffusers import DDPMScheduler
    from kubelora_trainer.data import load_image
    x0 = pipe.vae.encode(load_image(image, 32)[None]).latent_dist.mode() * pipe.vae.config.scaling_factor
    t = torch.linspace(0, 999, 16).long()
    x0 = x0.expand(16, -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt, target = sdxl_mod.ddpm_pair(x0, noise, DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[t], True)
    ids = [tok([caption] * 16, padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    emb, pooled = sdxl_mod.text_conditioning(pipe.text_encoder, pipe.text_encoder_2, *ids)
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(16, -1)
    pred = pipe.unet(xt, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                     return_dict=False)[0]
    return float(((pred - target) ** 2).mean())


def _with_checkpoint(pipe, ckpt: Path):
    """The trained adapter as the trainer saved it (raw lora_A/B + the real alpha) on each component."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file
    for component in ("unet", "text_encoder", "text_encoder_2"):
        folder = ckpt / component
        cfg = LoraConfig(**{k: v for k, v in json.loads((folder / "adapter_config.json").read_text()).items()
                            if k in ("r", "lora_alpha", "target_modules", "lora_dropout")})
        assert (cfg.r, cfg.lora_alpha) == (8, 16)
        module = getattr(pipe, component)
        inject_adapter_in_model(cfg, module)
        sd = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
              for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
        missing, unexpected = module.load_state_dict(sd, strict=False)
        assert not unexpected and not [k for k in missing if "lora_" in k], component
    return pipe


def test_train_two_ranks_s3_to_s3_and_reload_in_diffusers(s3, tmp_path, tiny_sdxl_dir, overfit_data):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    s3.create_bucket(Bucket="sdxl")
    upload_tree(tiny_sdxl_dir, "s3://sdxl/models/tiny-sdxl", client=s3)
    upload_tree(overfit_data, "s3://sdxl/data", client=s3)
    proc = run_trainer(manifest(tmp_path / "job.yaml", "sdxl"), s3.env, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[train] step {STEPS}/{STEPS}" in proc.stdout
    assert "LoRA on unet, text_encoder, text_encoder_2" in proc.stdout

    out = download("s3://sdxl/out/run1", tmp_path / "result", client=s3, log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert [(a["format"], a["file"]) for a in m["artifacts"]] == [("kohya", "lora.safetensors"),
                                                                    ("diffusers", "lora.diffusers.safetensors")]
    assert m["artifacts"][0]["sha256"] == hashlib.sha256((out / "lora.safetensors").read_bytes()).hexdigest()
    assert m["dataset"]["usable"] == 1 and m["metrics"]["worldSize"] == 2
    hist = [loss for _, loss in m["metrics"]["lossHistory"]]
    assert len(hist) == STEPS and all(map(lambda x: x == x and abs(x) < 1e6, hist))
    first, last = sum(hist[:10]) / 10, sum(hist[-10:]) / 10  # per-step losses are noisy (random t)
    assert last < 0.9 * first, (first, last)

    # the Kohya file: three prefixes, lora_down/lora_up/alpha, the real alpha, raw (unscaled) weights
    ckpt = out / "checkpoints" / f"step-{STEPS}"
    kohya = load_file(str(out / "lora.safetensors"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["kubelora.lora_format"] == "kohya"
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert float(kohya[f"{key}.alpha"]) == 16.0
    raw = load_file(str(ckpt / "unet" / "adapter_model.safetensors"))
    torch.testing.assert_close(kohya[f"{key}.lora_up.weight"],
                               raw["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"])
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in kohya

    base_pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ref_pipe = _with_checkpoint(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir), ckpt)
    # the trained adapter denoises the training image better at 16 fixed (t, noise) pairs
    before, after = (_denoise_loss(p, overfit_data / "good.png", "a blue square on a white background")
                     for p in (base_pipe, ref_pipe))
    assert after < 0.85 * before, (before, after)
    base, ref = _outputs(base_pipe), _outputs(ref_pipe)
    for name in ref:
        assert (ref[name] - base[name]).abs().max() > 1e-4, f"the adapter should change {name}"
    for fname in ("lora.safetensors", "lora.diffusers.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        pipe.load_lora_weights(str(out / fname))
        got = _outputs(pipe)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=2e-5, rtol=1e-4, msg=f"{fname}: {name}")


# ---------------------------------------------------------------- ComfyUI key compatibility

_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
             "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
             "self_attn.out_proj": "self_attn_out_proj"}
_TRANSFORMER_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                        "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def comfy_sgm_attention_modules(num_res_blocks, depth_in, depth_out, depth_mid):
    """The SGM names of the UNet's transformer linears, by ComfyUI's rule for an SDXL-style UNet
    (comfy/utils.py unet_to_diffusers, reimplemented): input block n = 1 + (res+1)*level + i holds
    transformer .1 when its depth > 0; output block n = (res+1)*level + i, depths consumed from
    the end of transformer_depth_output; middle_block.1 holds depth_mid blocks."""
    names = set()

    def transformer(prefix, depth):
        names.update({f"{prefix}.proj_in", f"{prefix}.proj_out"})
        names.update(f"{prefix}.transformer_blocks.{t}.{lin}" for t in range(depth) for lin in _TRANSFORMER_LINEARS)
    depth_in, depth_out = list(depth_in), list(depth_out)
    for level, res in enumerate(num_res_blocks):
        for i in range(res):
            d = depth_in.pop(0)
            if d:
                transformer(f"input_blocks.{1 + (res + 1) * level + i}.1", d)
    transformer("middle_block.1", depth_mid)
    for level, res in enumerate(reversed(num_res_blocks)):
        for i in range(res + 1):
            d = depth_out.pop()
            if d:
                transformer(f"output_blocks.{(res + 1) * level + i}.1", d)
    return names


def comfy_key_map(unet_modules, te1_layers, te2_layers):
    """model_lora_keys_unet (SDXL: lora_unet_ + the SGM weight name with "." -> "_") and
    model_lora_keys_clip (SDXL base: lora_te1_/lora_te2_text_model_encoder_layers_{b}_{c})."""
    keys = {"lora_unet_" + m.replace(".", "_") for m in unet_modules}
    keys |= {f"lora_te1_text_model_encoder_layers_{b}_{c}" for b in range(te1_layers) for c in _CLIP_MAP.values()}
    keys |= {f"lora_te2_text_model_encoder_layers_{b}_{c}" for b in range(te2_layers) for c in _CLIP_MAP.values()}
    return keys


def _modules_prefixes(tensors):
    out = set()
    for k in tensors:
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if k.endswith(suffix):
                out.add(k[: -len(suffix)])
                break
        else:
            raise AssertionError(f"{k}: not a suffix ComfyUI's load_lora reads")
    return out


def _default_lora(modules_by_component):
    import re
    targets = FAMILY.lora_targets()
    lora = {}
    for component, names in modules_by_component.items():
        hits = [n for n in names if re.fullmatch(targets[component], n)]
        lora[component] = {n: (torch.zeros(2, 3), torch.zeros(5, 2)) for n in hits}
    return lora


def _meta_components(config_dir: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    return unet, te, te2


@pytest.mark.parametrize("flavor,layout", [
    ("sdxl", ([2, 2, 2], [0, 0, 2, 2, 10, 10], [0, 0, 0, 2, 2, 2, 10, 10, 10], 10, 12, 32)),
    ("sdxl-tiny", ([2, 2], [0, 0, 2, 2], [0, 0, 0, 2, 2, 2], 2, 2, 2)),
])
def test_every_kohya_key_is_one_comfyui_applies(flavor, layout):
    """Default targets of the real-size SDXL (built on the meta device from the shipped configs)
    and of the tiny one, exported as Kohya: every module is in ComfyUI's key map, and ComfyUI's
    map has no transformer linear that the default LoRA misses."""
    res, d_in, d_out, d_mid, te1_layers, te2_layers = layout
    unet, te, te2 = _meta_components(CONFIGS / flavor)
    lora = _default_lora({"unet": [n for n, _ in unet.named_modules()],
                          "text_encoder": [n for n, _ in te.named_modules()],
                          "text_encoder_2": [n for n, _ in te2.named_modules()]})
    exported = _modules_prefixes(FAMILY.export(lora, 2.0, "kohya"))
    comfy_unet = comfy_sgm_attention_modules(res, d_in, d_out, d_mid)
    comfy = comfy_key_map(comfy_unet, te1_layers, te2_layers)
    assert exported - comfy == set()
    assert exported == comfy  # Kohya's default network: all transformer linears + all CLIP attention/MLP linears


def test_single_file_sgm_names_are_the_ones_comfyui_and_diffusers_read(tiny_sdxl_file):
    """The tiny single file's UNet keys (which diffusers' own converter reads back bit-exactly,
    see the next test) contain every attention module ComfyUI's rule names for it."""
    from safetensors import safe_open
    with safe_open(str(tiny_sdxl_file), "pt") as f:
        keys = {k.removeprefix("model.diffusion_model.").removesuffix(".weight") for k in f.keys()
                if k.startswith("model.diffusion_model.")}
    assert comfy_sgm_attention_modules([2, 2], [0, 0, 2, 2], [0, 0, 0, 2, 2, 2], 2) <= keys


# ---------------------------------------------------------------- loading

def _spec(**model):
    from types import SimpleNamespace
    return SimpleNamespace(**{"dtype": "float32", "vPred": False, "minSnrGamma": None, "zeroTerminalSnr": None, **model})


def test_single_file_loads_like_the_diffusers_folder(tiny_sdxl_dir, tiny_sdxl_file):
    a = FAMILY.load(_spec(), {"diffusersPath": str(tiny_sdxl_dir)}, torch.device("cpu"))
    b = FAMILY.load(_spec(), {"checkpointPath": str(tiny_sdxl_file)}, torch.device("cpu"))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        sa, sb = a.trainable[name].state_dict(), b.trainable[name].state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    va, vb = a.encoders["vae"].state_dict(), b.encoders["vae"].state_dict()
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    ea, eb = FAMILY.encode(a, img, ["a red circle"])[0], FAMILY.encode(b, img, ["a red circle"])[0]
    assert ea.keys() == eb.keys() == {"latents", "input_ids", "input_ids_2", "text_windows", "time_ids"}
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k])
    assert ea["time_ids"].tolist() == [32, 32, 0, 0, 32, 32]
    assert int(ea["input_ids_2"][0, -1]) == b.encoders["tokenizer_2"].convert_tokens_to_ids("!")  # SDXL pads te2 with "!"


def test_text_conditioning_matches_the_pipeline(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
        ids = [t(["a red circle"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
               for t in (pipe.tokenizer, pipe.tokenizer_2)]
        got, pooled = sdxl_mod.text_conditioning(pipe.text_encoder, pipe.text_encoder_2, *ids)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(pooled, want_pooled)


def test_long_captions_go_in_75_token_windows_masked_in_mixed_batches(tiny_sdxl_dir):
    """A caption past 77 CLIP tokens is not cut: its tokens go in windows of 75 with BOS/EOS (as
    diffusion-pipe), a short one stays the pipeline's own 77 ids; in a batch with a longer caption the
    short one's padding windows are masked, so the UNet sees it as alone; sample prompts are
    windowed alike, the negative prompt padded to the prompt's windows."""
    from kubelora_trainer import cache
    comps = FAMILY.load(_spec(), {"diffusersPath": str(tiny_sdxl_dir)}, torch.device("cpu"))
    tok, tok2 = comps.encoders["tokenizer"], comps.encoders["tokenizer_2"]
    short, long = "a red circle", " ".join(["a red circle on a blue square"] * 8)
    n_long = len(tok(long, add_special_tokens=False, verbose=False).input_ids)
    assert 150 < n_long <= 225
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    es, el = FAMILY.encode(comps, img, [short, long])
    want = [t([short], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids for t in (tok, tok2)]
    assert torch.equal(es["input_ids"], want[0]) and torch.equal(es["input_ids_2"], want[1]) and int(es["text_windows"]) == 1
    assert el["input_ids"].shape == el["input_ids_2"].shape == (3, 77) and int(el["text_windows"]) == 3
    for ids, t in ((el["input_ids"], tok), (el["input_ids_2"], tok2)):
        assert (ids[:, 0] == t.bos_token_id).all()
        kept = [i for row in ids.tolist() for i in row[1:] if i not in (t.eos_token_id, t.pad_token_id)]
        assert kept == t(long, add_special_tokens=False, verbose=False).input_ids  # nothing cut
    batch = cache.stack([es, el])
    assert batch["input_ids"].shape == (2, 3, 77) and batch["text_windows"].tolist() == [1, 3]
    unet, te, te2 = (comps.trainable[c] for c in ("unet", "text_encoder", "text_encoder_2"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([500, 500])
    with torch.no_grad():
        embeds, pooled = sdxl_mod.text_conditioning(te, te2, batch["input_ids"], batch["input_ids_2"])
        assert embeds.shape[1] == 3 * 77
        mask = sdxl_mod.window_mask(batch["text_windows"], 3, 77)
        cond = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
        mixed = unet(x, t, encoder_hidden_states=embeds, encoder_attention_mask=mask, added_cond_kwargs=cond).sample
        unmasked = unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
        e1, p1 = sdxl_mod.text_conditioning(te, te2, es["input_ids"][None], es["input_ids_2"][None])
        alone = unet(x[:1], t[:1], encoder_hidden_states=e1,
                     added_cond_kwargs={"text_embeds": p1, "time_ids": es["time_ids"][None]}).sample
    torch.testing.assert_close(mixed[:1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked[:1], alone, rtol=1e-4, atol=1e-5)
    assert sdxl_mod.window_mask(torch.tensor([3, 3]), 3, 77) is None
    loss = FAMILY.loss(comps, {**batch, "latents": batch["latents"]}, _spec(), None, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    kit = FAMILY.sampling_kit(comps, [{"prompt": long, "negativePrompt": "blurry", "guidance": 5.0}])
    ids, ids2 = kit["ids"][0]
    assert ids.shape == ids2.shape == (2, 3, 77) and torch.equal(ids[0], el["input_ids"])


def test_single_file_checkpoint_from_s3_trains(s3, tmp_path, tiny_sdxl_file, overfit_data):
    s3.create_bucket(Bucket="sdxlfile")
    s3.upload_file(str(tiny_sdxl_file), "sdxlfile", "models/tiny_sdxl.safetensors")
    upload_tree(overfit_data, "s3://sdxlfile/data", client=s3)
    job = manifest(tmp_path / "job.yaml", "sdxlfile",
                   model={"diffusersPath": None, "checkpointPath": "s3://sdxlfile/models/tiny_sdxl.safetensors",
                          "vPred": False, "minSnrGamma": 5.0},
                   training={"steps": 2, "logEvery": 1}, output={"formats": None})
    proc = run_trainer(job, s3.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = s3.list_objects_v2(Bucket="sdxlfile", Prefix="out/run1/")["Contents"]
    assert "out/run1/lora.safetensors" in {o["Key"] for o in keys}


def test_checkpointing_under_fsdp_does_not_change_the_math(tmp_path, tiny_sdxl_dir, overfit_data):
    """UNet down/up blocks (tuple outputs), the mid attention and the CLIP layers wrapped for
    activation checkpointing and sharded with FSDP2 on one process: the same losses as eager."""
    hist = {}
    for name, extra_env, training in (("eager", {}, {}),
                                      ("fsdp_ckpt", {"KUBELORA_FSDP_SINGLE": "1"}, {"gradientCheckpointing": True})):
        job = manifest(tmp_path / f"{name}.yaml", "unused", model={"diffusersPath": str(tiny_sdxl_dir)},
                       dataset={"uri": str(overfit_data)}, output={"uri": str(tmp_path / name)},
                       training={"steps": 3, "logEvery": 1, **training})
        proc = run_trainer(job, {"KUBELORA_CACHE_DIR": str(tmp_path / "cache"), **extra_env})
        assert proc.returncode == 0, name + proc.stderr[-3000:]
        hist[name] = [loss for _, loss in json.loads((tmp_path / name / "manifest.json").read_text())["metrics"]["lossHistory"]]
    assert hist["fsdp_ckpt"] == pytest.approx(hist["eager"], rel=1e-4)


# ---------------------------------------------------------------- bad input

def test_flux_folder_as_sdxl_fails_naming_what_was_expected(tmp_path, tiny_flux_dir, overfit_data):
    job = manifest(tmp_path / "job.yaml", "unused", model={"diffusersPath": str(tiny_flux_dir)},
                   dataset={"uri": str(overfit_data)}, output={"uri": str(tmp_path / "out")})
    proc = run_trainer(job, {"KUBELORA_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("[error] model.diffusersPath: expected an SDXL folder (model_index.json _class_name "
            "StableDiffusionXLPipeline, with unet/ and both text encoders); found 'FluxPipeline'") in proc.stderr
    assert "Traceback" not in proc.stderr and "[phase] train" not in proc.stdout


def test_wrong_single_files_fail_naming_what_was_expected(tmp_path):
    from safetensors.torch import save_file
    flux = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2), "img_in.weight": torch.zeros(2, 2)}, str(flux))
    with pytest.raises(ModelError, match=r"model.checkpointPath: expected an SDXL checkpoint in the original "
                                         r"single-file layout .* this file looks like Flux \(BFL transformer\)"):
        FAMILY.load(_spec(), {"checkpointPath": str(flux)}, torch.device("cpu"))
    ckpt = tmp_path / "sd_xl_base_1.0.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(ModelError, match="only .safetensors checkpoints are read"):
        FAMILY.load(_spec(), {"checkpointPath": str(ckpt)}, torch.device("cpu"))
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelError, match=r"has no unet/; SDXL LoRA training needs the UNet"):
        FAMILY.load(_spec(), {"diffusersPath": str(folder)}, torch.device("cpu"))


def test_text_encoder_learning_rate_zero_leaves_the_text_encoders_without_lora(tiny_sdxl_dir):
    """training.textEncoderLearningRate 0 (diffusion-pipe's text_encoder_1_lr = text_encoder_2_lr = 0):
    a valid spec; LoRA on the UNet only, the text encoders frozen and in no optimizer group."""
    from kubelora_trainer import adapters, dist
    from kubelora_trainer.spec import parse_spec
    spec = parse_spec({"model": {"type": "sdxl", "diffusersPath": "/m", "dtype": "float32"},
                       "dataset": {"uri": "/d", "resolution": 32}, "adapter": {"rank": 2},
                       "training": {"steps": 1, "textEncoderLearningRate": 0, "compile": False},
                       "output": {"uri": "/o"}})
    comps = FAMILY.load(_spec(), {"diffusersPath": str(tiny_sdxl_dir)}, torch.device("cpu"), encoders=False)
    env = dist.DistEnv(0, 1, 0, torch.device("cpu"))
    ad = adapters.attach(comps, FAMILY, spec, env)
    assert list(ad.configs) == ["unet"] and [g["name"] for g in ad.groups] == ["unet"]
    for name in sdxl_mod.TEXT_ENCODERS:
        assert not any(p.requires_grad for p in comps.trainable[name].parameters()), name
        assert adapters.gather(comps)[name] == {}, name


def test_spec_rules_for_sdxl():
    from kubelora_trainer.spec import SpecError, parse_spec
    base = {"dataset": {"uri": "s3://bkt/d"}, "output": {"uri": "s3://bkt/o"}}
    with pytest.raises((SpecError, ValueError), match="model.type sdxl needs model.diffusersPath or model.checkpointPath"):
        parse_spec({**base, "model": {"type": "sdxl"}})
    with pytest.raises((SpecError, ValueError), match="set only one of"):
        parse_spec({**base, "model": {"type": "sdxl", "diffusersPath": "s3://bkt/m", "checkpointPath": "s3://bkt/m.safetensors"}})
    with pytest.raises((SpecError, ValueError), match="'comfyui' is not available for sdxl"):
        parse_spec({**base, "model": {"type": "sdxl", "diffusersPath": "s3://bkt/m"}, "output": {"uri": "s3://bkt/o", "formats": ["comfyui"]}})


# ---------------------------------------------------------------- pure parts

def test_sgm_names_round_trip_and_known_kohya_keys():
    for flavor in ("sdxl", "sdxl-tiny"):
        unet, _, _ = _meta_components(CONFIGS / flavor)
        for name, _ in unet.named_parameters():
            assert diffusers_unet_name(sgm_unet_name(name)) == name
    # keys as Kohya sd-scripts writes them for SDXL
    assert from_kohya_name("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == (
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert from_kohya_name("lora_unet_middle_block_1_proj_in") == ("unet", "mid_block.attentions.0.proj_in")
    assert from_kohya_name("lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj") == (
        "unet", "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj")
    assert from_kohya_name("lora_unet_output_blocks_2_2_conv") == ("unet", "up_blocks.0.upsamplers.0.conv")
    assert from_kohya_name("lora_unet_input_blocks_7_0_in_layers_2") == ("unet", "down_blocks.2.resnets.0.conv1")
    assert from_kohya_name("lora_te2_text_model_encoder_layers_31_self_attn_out_proj") == (
        "text_encoder_2", "text_model.encoder.layers.31.self_attn.out_proj")


def test_diffusion_pipes_kohya_files_with_diffusers_names_are_read():
    """diffusion-pipe saves SDXL LoRAs with diffusers' convert_state_dict_to_kohya: Kohya spelling of
    diffusers' module names (lora_unet_down_blocks_1_...), which ComfyUI and A1111 read too.
    Every module of the tiny UNet and both text encoders comes back under its own name."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    unet, te, te2 = _meta_components(CONFIGS / "sdxl-tiny")
    linears = {c: [n for n, m in mod.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
               for c, mod in (("unet", unet), ("text_encoder", te), ("text_encoder_2", te2))}
    assert any(".time_emb_proj" in n for n in linears["unet"]) and any("conv_shortcut" in n for n in linears["unet"])
    # diffusion-pipe's PEFT state dict: each component's parameters under its name (unet., text_encoder., ...)
    peft = {f"{c}.{m}.lora_{ab}.weight": torch.ones(2, 2) for c, mods in linears.items() for m in mods for ab in "AB"}
    back, _ = FAMILY.parse(convert_state_dict_to_kohya(peft), "kohya")
    for c in linears:  # under the live modules' names
        assert sorted(back[c]) == sorted(linears[c]), c


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_parse_inverts_export(fmt):
    unet, te, te2 = _meta_components(CONFIGS / "sdxl-tiny")
    lora = _default_lora({"unet": [n for n, _ in unet.named_modules()],
                          "text_encoder": [n for n, _ in te.named_modules()],
                          "text_encoder_2": [n for n, _ in te2.named_modules()]})
    g = torch.Generator().manual_seed(0)
    lora = {c: {m: (torch.randn(2, 3, generator=g), torch.randn(5, 2, generator=g)) for m in mods}
            for c, mods in lora.items()}
    back, scale = FAMILY.parse(FAMILY.export(lora, 2.0, fmt), fmt)
    assert scale == (2.0 if fmt == "kohya" else 1.0)
    assert back.keys() == lora.keys()
    for c in lora:
        assert back[c].keys() == lora[c].keys(), c
        for m, (a, b) in lora[c].items():
            torch.testing.assert_close(back[c][m][0], a)
            torch.testing.assert_close(back[c][m][1] * scale, b * 2.0)
    with pytest.raises(ValueError, match="unexpected key"):
        FAMILY.parse({"transformer.x.lora_A.weight": torch.zeros(1)}, fmt)


def test_objective_pieces():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    a = torch.tensor([0.9, 0.5, 0.01])
    xt, target = sdxl_mod.ddpm_pair(x0, eps, a, v_pred=False)
    assert torch.equal(target, eps)
    ab = a.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    _, v = sdxl_mod.ddpm_pair(x0, eps, a, v_pred=True)
    torch.testing.assert_close(ab.sqrt() * xt - (1 - ab).sqrt() * v, x0)  # x0 = sqrt(a) x_t - sqrt(1-a) v
    snr = a / (1 - a)  # 9, 1, ~0.0101
    torch.testing.assert_close(sdxl_mod.min_snr_weights(a, 5.0, False), torch.stack([5 / snr[0], snr[1] / snr[1], snr[2] / snr[2]]))
    torch.testing.assert_close(sdxl_mod.min_snr_weights(a, 5.0, True), torch.stack([5 / (snr[0] + 1), snr[1] / 2, snr[2] / (snr[2] + 1)]))
    assert torch.equal(sdxl_mod.min_snr_weights(a, None, True), torch.ones(3))


def test_shipped_configs():
    """configs/sdxl builds SDXL base 1.0's exact architecture (its published parameter counts), its
    tokenizer is CLIP's, and configs/sdxl-tiny is what tiny_sdxl builds."""
    from diffusers import AutoencoderKL
    unet, te, te2 = _meta_components(CONFIGS / "sdxl")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "sdxl" / "vae"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(te), count(te2)) == (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)
    tok = sdxl_mod.clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and sdxl_mod.clip_tokenizer("!").pad_token_id == 0


def test_shipped_tiny_configs_match_the_builder(tmp_path):
    write_flavor_configs(tmp_path)
    for f in (CONFIGS / "sdxl-tiny").rglob("*.json"):
        want = json.loads((tmp_path / f.relative_to(CONFIGS / "sdxl-tiny")).read_text())
        got = json.loads(f.read_text())
        drop = ("_diffusers_version", "transformers_version")
        assert {k: v for k, v in got.items() if k not in drop} == {k: v for k, v in want.items() if k not in drop}, f


def _with_marker_keys(src: Path, dst: Path, *markers: str) -> Path:
    """The tiny single file plus the empty marker tensors real checkpoints carry (NoobAI v-pred:
    v_pred and ztsnr; CosXL: edm_vpred; Playground v2.5: edm_mean/edm_std)."""
    from safetensors.torch import load_file, save_file
    save_file({**load_file(str(src)), **{m: torch.zeros(0) for m in markers}}, str(dst))
    return dst


def test_ztsnr_key_gives_a_zero_terminal_snr_v_pred_schedule(tmp_path, tiny_sdxl_file):
    noob = _with_marker_keys(tiny_sdxl_file, tmp_path / "noob.safetensors", "v_pred", "ztsnr")
    comps = FAMILY.load(_spec(), {"checkpointPath": str(noob)}, torch.device("cpu"))
    alphas = comps.info["alphas_cumprod"]
    assert comps.info["v_pred"] is True and float(alphas[-1]) == 0.0 and float(alphas[0]) > 0.99
    # the spec overrides what the file says, both ways
    off = FAMILY.load(_spec(zeroTerminalSnr=False), {"checkpointPath": str(noob)}, torch.device("cpu"))
    assert float(off.info["alphas_cumprod"][-1]) > 0.0
    plain = FAMILY.load(_spec(zeroTerminalSnr=True), {"checkpointPath": str(tiny_sdxl_file)}, torch.device("cpu"))
    assert float(plain.info["alphas_cumprod"][-1]) == 0.0 and plain.info["v_pred"] is False
    # Min-SNR weights use the schedule before the rescale (sd-scripts' and diffusion-pipe's SNR
    # table is made before the betas are fixed): the last timestep keeps a weight above 0
    snr_alphas = comps.info["snr_alphas_cumprod"]
    assert float(snr_alphas[-1]) > 0.0 and torch.equal(snr_alphas, off.info["alphas_cumprod"])
    assert float(sdxl_mod.min_snr_weights(snr_alphas[-1:], 5.0, True)[0]) > 0.004
    assert off.info["snr_alphas_cumprod"] is off.info["alphas_cumprod"]
    batch = {"latents": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
             "input_ids": torch.ones(1, 77, dtype=torch.long), "input_ids_2": torch.ones(1, 77, dtype=torch.long),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():  # the last timestep (quantile 0.9999 -> t 999): weighted, not zeroed
        last = FAMILY.loss(comps, batch, _spec(minSnrGamma=5.0), None, torch.Generator().manual_seed(1), quantile=0.9999)
    assert float(last) > 0.0


def test_min_snr_weights_are_finite_at_zero_terminal_snr():
    a = torch.tensor([0.9, 0.1, 0.0])
    for v_pred in (False, True):
        w = sdxl_mod.min_snr_weights(a, 5.0, v_pred)
        assert torch.isfinite(w).all(), (v_pred, w)
    assert sdxl_mod.min_snr_weights(a, 5.0, False)[-1] == 1.0  # the limit of min(snr, g) / snr as snr -> 0
    assert sdxl_mod.min_snr_weights(a, 5.0, True)[-1] == 0.0


@pytest.mark.parametrize("marker,what", [("edm_vpred", "CosXL"), ("edm_mean", "Playground v2.5")])
def test_edm_checkpoints_are_refused(tmp_path, tiny_sdxl_file, marker, what):
    f = _with_marker_keys(tiny_sdxl_file, tmp_path / "edm.safetensors", marker)
    with pytest.raises(ModelError, match=rf"model.checkpointPath: this is an EDM .*{what}.*epsilon or v-prediction"):
        FAMILY.load(_spec(), {"checkpointPath": str(f)}, torch.device("cpu"))
