"""LTX-Video (0.9.x): a diffusers folder with LTXVideoTransformer3DModel, AutoencoderKLLTXVideo
and a T5 text encoder.

Training objective: rectified flow on normalized VAE latents [B, C, F', H', W']. x_t = (1 - t) x0
+ t eps, the transformer predicts eps - x0; t from logit-normal or uniform sampling
(training.timestepSampling; diffusion-pipe's timestep_sample_method). The transformer gets
t * 1000, the positions scaled as LTXPipeline scales them at inference, and the T5 mask.
Clips are 8k+1 frames (spec rule); images train as 1-frame clips.

Export ("comfyui", the default): ``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight``
with the alpha/rank scale folded into lora_B. ComfyUI maps ``diffusion_model.<name>`` for every
weight of its LTXV model, and diffusers' LTX loader converts the prefix; their module names agree
on the transformer blocks (the default targets). "diffusers": ``transformer.<module>...``, which
diffusers loads but ComfyUI ignores for LTX. See docs/formats/ltx-video.md.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ...families import RULES
from ...objectives import flow_matching_pair, flow_timesteps, mask_weights, noise_for, weighted_mse
from ..base import Components, ModelError, refuse_unknown_modules, trim_text_padding

# Attention (self and cross) and MLP linears of every block; peft matches with re.fullmatch.
# Not proj_in / time_embed: ComfyUI names them patchify_proj / adaln_single, and diffusers'
# LTX loader does not rename them back.
DEFAULT_TARGETS = r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"

TRANSFORMER_CLASS = "LTXVideoTransformer3DModel"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
MAX_TOKENS = 256     # LTX-Video's encode_prompt default text_encoder_max_tokens, as diffusion-pipe (LTXPipeline: 128)
FRAME_RATE = RULES["ltx-video"].fps  # LTXPipeline's default 25; clips are resampled to it; sets the RoPE time scale
FORMATS = ("comfyui", "diffusers")

# diffusers module name -> the original LTX / ComfyUI name, where they differ (the inverse of
# diffusers' single-file conversion). Everything else, the blocks included, is named alike.
# every linear of LTXVideoTransformer3DModel (diffusers names): what a LoRA file may hold
LINEARS = re.compile(r"proj_in|proj_out|time_embed\.(linear|emb\.timestep_embedder\.linear_[12])"
                     r"|caption_projection\.linear_[12]"
                     r"|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))")
COMFY_RENAMES = {"proj_in": "patchify_proj", "time_embed": "adaln_single", "norm_q": "q_norm", "norm_k": "k_norm"}
DIFFUSERS_RENAMES = {v: k for k, v in COMFY_RENAMES.items()}


def check_layout(root: Path) -> None:
    """Refuse a folder that is not an LTX-Video diffusers pipeline, naming what is missing or
    what was found instead."""
    field = "model.diffusersPath"
    expected = (f"an LTX-Video folder in diffusers layout (model_index.json, {', '.join(c + '/' for c in COMPONENTS)}"
                f" with an {TRANSFORMER_CLASS})")
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{field}: {root} has no model_index.json; expected {expected}")
    try:
        pipeline = json.loads(index.read_text()).get("_class_name", "?")
    except ValueError as e:
        raise ModelError(f"{field}: {index} is not valid JSON ({e}); expected {expected}") from None
    cfg = root / "transformer" / "config.json"
    found = json.loads(cfg.read_text()).get("_class_name", "?") if cfg.is_file() else None
    if found != TRANSFORMER_CLASS:
        what = f"a {pipeline} whose transformer is {found}" if found else f"a {pipeline} without transformer/config.json"
        raise ModelError(f"{field}: {root} holds {what}; expected {expected}")
    missing = [c + "/" for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise ModelError(f"{field}: {root} lacks {', '.join(missing)}; expected {expected}")


def causal_positions(setting, vae_config: dict) -> tuple[bool, str]:
    """(causal, why): model.causalTemporalPositioning, or unset, what the checkpoint is. LTX-Video
    0.9.5 and later (whose original configs set causal_temporal_positioning) have a VAE whose
    encoder ends in an LTXVideo095DownBlock3D, which is how diffusers' own loader tells them from
    0.9.0/0.9.1; a diffusers folder keeps no other trace of the setting. Pure."""
    if setting is not None:
        return bool(setting), "model.causalTemporalPositioning"
    new_vae = "LTXVideo095DownBlock3D" in (vae_config.get("down_block_types") or ())
    return new_vae, ("the checkpoint's VAE is LTX-Video 0.9.5's or later" if new_vae
                     else "the checkpoint's VAE is LTX-Video 0.9.0/0.9.1's")


def video_coords(batch: int, frames: int, height: int, width: int, *, temporal: int, spatial: int,
                 patch: int, patch_t: int, fps: float, causal: bool, device=None) -> torch.Tensor:
    """[batch, 3, tokens] positions of the packed latent tokens in (seconds, pixels, pixels), as
    the transformer's rotary embedding takes them (video_coords): latent frame f at
    max(0, temporal*f + 1 - temporal) frames when causal (LTXConditionPipeline, the original
    pipeline's causal_fix), at temporal*f otherwise (what LTXPipeline's rope_interpolation_scale
    gives). frames/height/width count tokens; the grid steps by the patch sizes. Pure."""
    f = torch.arange(frames, dtype=torch.float32, device=device) * patch_t * temporal
    if causal:
        f = (f + 1 - temporal).clamp(min=0)
    h = torch.arange(height, dtype=torch.float32, device=device) * patch * spatial
    w = torch.arange(width, dtype=torch.float32, device=device) * patch * spatial
    grid = torch.stack(torch.meshgrid(f / fps, h, w, indexing="ij"), dim=0).reshape(3, -1)
    return grid.unsqueeze(0).expand(batch, -1, -1)


def t5_embeds(tokenizer, text_encoder, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings [N, MAX_TOKENS, D] and their bool mask [N, MAX_TOKENS], as the original LTX-Video
    pipeline's encode_prompt (which diffusion-pipe calls) computes them: stripped texts padded to
    MAX_TOKENS and T5 run with the attention mask, so padding does not reach the caption tokens.
    diffusers' LTXPipeline.encode_prompt runs T5 without the mask, which changes every embedding."""
    t = tokenizer([x.strip() for x in texts], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                  add_special_tokens=True, return_tensors="pt")
    mask = t.attention_mask.to(device)
    embeds = text_encoder(t.input_ids.to(device), attention_mask=mask)[0]
    return embeds.to(text_encoder.dtype), mask.bool()


def comfy_name(module: str) -> str:
    """diffusers module path -> ComfyUI's (path components renamed one by one)."""
    return ".".join(COMFY_RENAMES.get(part, part) for part in module.split("."))


def diffusers_name(module: str) -> str:
    return ".".join(DIFFUSERS_RENAMES.get(part, part) for part in module.split("."))


def _prefix(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not available for ltx-video (available: {', '.join(FORMATS)})")
    return "diffusion_model." if fmt == "comfyui" else "transformer."


class LTXVideo:
    name = "ltx-video"

    def load(self, model_spec, paths, device, encoders=True):
        from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

        root = Path(paths["diffusersPath"])
        check_layout(root)
        dtype = getattr(torch, model_spec.dtype)
        transformer = LTXVideoTransformer3DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
        transformer.to(device)
        vae_config = AutoencoderKLLTXVideo.load_config(root, subfolder="vae")
        causal, why = causal_positions(getattr(model_spec, "causalTemporalPositioning", None), vae_config)
        if os.environ.get("RANK", "0") == "0":
            print(f"[model] ltx-video: latent frame f at {'max(0, 8f-7)' if causal else '8f'} frames in the rotary "
                  f"positions ({'causal' if causal else 'uniform'}, {why})", flush=True)
        info = {"patch": transformer.config.patch_size, "patch_t": transformer.config.patch_size_t, "causal": causal}
        if not encoders:  # the VAE's compression ratios from its config, as its __init__ computes them
            import inspect
            defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLLTXVideo.__init__).parameters.items()}
            cfg = {**defaults, **vae_config}
            scaled = sum(cfg["spatio_temporal_scaling"])
            info.update(spatial=cfg["spatial_compression_ratio"] or cfg["patch_size"] * 2 ** scaled,
                        temporal=cfg["temporal_compression_ratio"] or cfg["patch_size_t"] * 2 ** scaled)
            return Components(trainable={"transformer": transformer}, info=info)
        pipe = LTXPipeline.from_pretrained(root, transformer=None, torch_dtype=dtype).to(device)
        vae = pipe.vae
        return Components(trainable={"transformer": transformer}, encoders={"pipe": pipe},
                          info={**info, "spatial": vae.spatial_compression_ratio,
                                "temporal": vae.temporal_compression_ratio})

    def resolved(self, comps) -> dict:
        """The model settings that, unset, this model decided when it loaded (checkpoints record these)."""
        return {"causalTemporalPositioning": comps.info["causal"]}

    def lora_targets(self):
        return {"transformer": DEFAULT_TARGETS}

    def blocks(self, component, transformer):
        return [transformer.transformer_blocks]

    @torch.no_grad()
    def encode(self, comps, clips, captions):
        """clips [B, 3, F, H, W] in [-1, 1] -> normalized latents [C, F', H', W'], T5 embeddings
        [MAX_TOKENS, D] and their mask (t5_embeds: T5 run with the mask, as diffusion-pipe)."""
        from diffusers import LTXPipeline

        pipe = comps.encoders["pipe"]
        vae = pipe.vae
        if clips.dim() == 4:  # [B, 3, H, W]: images as one-frame clips
            clips = clips.unsqueeze(2)
        lat = vae.encode(clips.to(vae.device, vae.dtype)).latent_dist.mode()
        lat = LTXPipeline._normalize_latents(lat, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        embeds, mask = t5_embeds(pipe.tokenizer, pipe.text_encoder, captions, vae.device)
        return [{"latents": lat[min(i, len(lat) - 1)].cpu(), "prompt_embeds": embeds[i].cpu(), "prompt_mask": mask[i].cpu()}
                for i in range(len(captions))]

    def loss(self, comps, batch, model_spec, training_spec, generator, quantile=None, noise=None):
        from diffusers import LTXPipeline

        tr = comps.trainable["transformer"]
        info = comps.info
        x0 = batch["latents"].float()
        b, _, f, h, w = x0.shape
        noise = noise_for(x0, generator, noise)
        t = flow_timesteps(b, training_spec, generator, x0.device, quantile)
        xt, target = flow_matching_pair(x0, noise, t)
        dtype = batch["prompt_embeds"].dtype
        p, pt = info["patch"], info["patch_t"]
        # text positions that are padding in every caption go; a mask left all true is dropped
        # (it only adds zeros to the scores, and keeps SDPA off flash attention)
        embeds, mask, full = trim_text_padding(batch["prompt_embeds"], batch["prompt_mask"])
        mask = None if full else mask
        if info.get("causal"):
            positions = {"video_coords": video_coords(b, f // pt, h // p, w // p, temporal=info["temporal"],
                                                      spatial=info["spatial"], patch=p, patch_t=pt, fps=FRAME_RATE,
                                                      causal=True, device=x0.device)}
        else:
            positions = {"rope_interpolation_scale": (info["temporal"] / FRAME_RATE, info["spatial"], info["spatial"])}
        pred = tr(hidden_states=LTXPipeline._pack_latents(xt, p, pt).to(dtype),
                  encoder_hidden_states=embeds, timestep=t * 1000,
                  encoder_attention_mask=mask, num_frames=f // pt, height=h // p, width=w // p,
                  **positions, return_dict=False)[0]
        lmask = batch.get("mask")  # [B, h, w] on the latent grid, every frame, packed like the latents
        weight = None if lmask is None else LTXPipeline._pack_latents(mask_weights(lmask, x0.shape), p, pt)
        return weighted_mse(pred, LTXPipeline._pack_latents(target, p, pt), weight)

    @torch.no_grad()
    def sampling_kit(self, comps, prompts):
        """For spec.samples, while the T5 encoder is loaded: the prompts' (and negative prompts')
        embeddings (t5_embeds, as training encodes captions), and the VAE and scheduler kept for sampling."""
        pipe = comps.encoders["pipe"]
        embeds = []
        for p in prompts:
            cfg = p["guidance"] > 1.0
            texts = [p["prompt"]] + ([p["negativePrompt"] or ""] if cfg else [])
            e, m = t5_embeds(pipe.tokenizer, pipe.text_encoder, texts, pipe.vae.device)
            embeds.append({"prompt_embeds": e[:1], "prompt_attention_mask": m[:1],
                           **({"negative_prompt_embeds": e[1:], "negative_prompt_attention_mask": m[1:]} if cfg else {})})
        return {"vae": pipe.vae, "scheduler": pipe.scheduler, "embeds": embeds}

    @torch.no_grad()
    def sample(self, kit, comps, prompt, generator):
        """One clip [F, H, W, 3] in [0, 1] from LTXPipeline around the transformer being trained
        (LTXConditionPipeline, without conditions, with causal temporal positions: it places frames
        as the training did)."""
        from diffusers import LTXConditionPipeline, LTXPipeline
        scheduler, cls = kit["scheduler"], LTXPipeline
        if comps.info.get("causal"):
            # its own timesteps (linear-quadratic), which a dynamically shifting scheduler (the
            # 0.9.0/0.9.1 pipelines' config) refuses without a shift
            cls = LTXConditionPipeline
            scheduler = type(scheduler).from_config(scheduler.config, use_dynamic_shifting=False)
        pipe = cls(scheduler=scheduler, vae=kit["vae"], text_encoder=None, tokenizer=None,
                   transformer=comps.trainable["transformer"])
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kit["embeds"][prompt["index"]], height=prompt["height"], width=prompt["width"],
                    num_frames=prompt["frames"], frame_rate=FRAME_RATE, num_inference_steps=prompt["steps"],
                    guidance_scale=prompt["guidance"], max_sequence_length=MAX_TOKENS, generator=generator,
                    output_type="np").frames[0]

    full_file = ("the transformer in the original LTX-Video layout (model.diffusion_model.*, the transformer part "
                 "of ltx-video-2b-v0.9.safetensors, without its vae.*): ComfyUI's Load Diffusion Model node and "
                 "diffusers' LTXVideoTransformer3DModel.from_single_file load it")

    def export_full(self, state_dict):
        """A full fine-tune's transformer under the original/ComfyUI names (patchify_proj,
        adaln_single, q_norm, k_norm): the inverse of diffusers' convert_ltx_transformer_checkpoint_to_diffusers."""
        return {f"model.diffusion_model.{comfy_name(k)}": v for k, v in state_dict.items()}

    def full_metadata(self, comps) -> dict[str, str]:
        """The single file's `config` header entry, as the official checkpoints carry it: ComfyUI
        reads the transformer's settings from it (model_detection: metadata["config"]["transformer"]),
        and without it runs LTXVModel with uniform frame positions, unlike a 0.9.5+ model trained causal."""
        return {"config": json.dumps({"transformer": {"causal_temporal_positioning": bool(comps.info["causal"])}})}

    def export(self, lora, scale, fmt):
        prefix = _prefix(fmt)
        out = {}
        for module, (a, b) in lora["transformer"].items():
            name = prefix + (comfy_name(module) if fmt == "comfyui" else module)
            out[f"{name}.lora_A.weight"] = a.contiguous()
            out[f"{name}.lora_B.weight"] = (b.float() * scale).to(b.dtype).contiguous()
        return out

    def export_gaps(self, lora, fmt):
        renamed = sorted(m for m in lora["transformer"] if comfy_name(m) != m)
        if fmt != "comfyui" or not renamed:
            return []
        return [f"diffusers skips these in the comfyui file (ComfyUI's names differ from diffusers' there): "
                f"{', '.join(renamed)}; ComfyUI applies them, and the diffusers format carries them for diffusers"]

    def parse(self, tensors, fmt):
        """A LoRA file in either format back to {transformer: {module: (A, B)}} with scale 1; a
        per-module `.alpha` (other trainers' files) is folded into B as alpha / rank."""
        prefix = _prefix(fmt)
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if not key.startswith(prefix):
                raise ValueError(f"{fmt} LoRA key {key!r} does not start with {prefix!r}")
            module, _, part = key[len(prefix):].rpartition(".lora_")
            if part in ("A.weight", "B.weight"):
                modules.setdefault(module, {})[part[0]] = v
            elif key.endswith(".alpha"):
                modules.setdefault(key[len(prefix):-len(".alpha")], {})["alpha"] = v
            else:
                raise ValueError(f"{fmt} LoRA key {key!r} is not a lora_A / lora_B weight or alpha")
        out = {}
        for module, parts in modules.items():
            if "A" not in parts or "B" not in parts:
                raise ValueError(f"{fmt} LoRA module {module!r} lacks its lora_A or lora_B weight")
            a, b = parts["A"], parts["B"]
            if "alpha" in parts:
                b = (b.float() * (float(parts["alpha"]) / a.shape[0])).to(b.dtype)
            out[diffusers_name(module) if fmt == "comfyui" else module] = (a, b)
        refuse_unknown_modules(out, LINEARS.fullmatch, "LTX-Video")
        return {"transformer": dict(sorted(out.items()))}, 1.0


FAMILY = LTXVideo()
