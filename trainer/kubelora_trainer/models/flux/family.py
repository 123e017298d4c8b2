"""Flux.1 (dev/schnell and derivatives): diffusers folder, optional BFL single-file transformer.

Training objective: rectified flow. x_t = (1 - t) x0 + t eps, the transformer predicts eps - x0;
t from logit-normal or uniform sampling, optionally shifted by resolution (`fluxShift`).
Export: Diffusers keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` with the
alpha/rank scale folded into lora_B, so loaders that assume scale 1 (ComfyUI, diffusers without
metadata) apply exactly the trained update.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import torch

from ...objectives import (flow_matching_pair, flow_timesteps, mask_weights, noise_for, resolution_shift_mu,
                           time_shift, weighted_mse)
from ..base import Components, ModelError
from . import formats as flux_lora
from .targets import DEFAULT_TARGETS
from .keys import from_bfl, to_bfl

CONFIG_DIR = Path(__file__).resolve().parent / "configs"



def _single_file_config(diffusers_root: Path, ckpt: Path) -> tuple[str, str]:
    """Config for the BFL file: the diffusers folder's own transformer config, else the shipped
    Flux.1-dev/schnell config (chosen by whether the file has a guidance embedding)."""
    if (diffusers_root / "transformer" / "config.json").is_file():
        return str(diffusers_root), "transformer"
    from safetensors import safe_open
    with safe_open(str(ckpt), "pt") as f:
        has_guidance = any(k.startswith("guidance_in.") for k in f.keys())
    return str(CONFIG_DIR / ("flux-dev" if has_guidance else "flux-schnell")), "transformer"


def load_bfl_transformer(diffusers_root: Path, ckpt: Path, dtype):
    """A BFL-layout single file (flux1-dev.safetensors, fine-tunes, fp8 files: upcast to dtype)
    with our own key map (keys.py): diffusers' single-file converter assumes the full 3072
    width, which Flux-shaped derivatives and the tiny test model do not have."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    cfg_dir, sub = _single_file_config(diffusers_root, ckpt)
    config = FluxTransformer2DModel.load_config(cfg_dir, subfolder=sub)
    sd = load_file(str(ckpt))
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    if "double_blocks.0.img_attn.qkv.weight" not in sd:
        raise ModelError(f"model.transformerPath: {ckpt.name} is not a Flux transformer in the BFL layout "
                         "(no double_blocks.0.img_attn.qkv.weight)")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    try:
        converted = from_bfl(sd, hidden)
    except KeyError as e:
        raise ModelError(f"model.transformerPath: {ckpt.name}: {e.args[0]}; expected a Flux transformer in the BFL layout") from None
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    try:
        transformer.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"model.transformerPath: {ckpt.name} does not match the transformer config "
                         f"({cfg_dir}): {str(e).splitlines()[0]}") from None
    return transformer.to(dtype)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """The packed latents' position ids [height * width, 3]: (0, row, column), as diffusers'
    FluxPipeline._prepare_latent_image_ids makes them, but made on the device: theirs is built on
    the CPU and copied, and a copy from pageable memory waits for the GPU (a host sync in every
    training forward, which keeps the CPU from queueing the next kernels ahead)."""
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(height * width, 3).to(dtype)


def no_embedding_warning(model_spec, guidance_embeds: bool) -> str | None:
    """A guidance setting on a transformer without a guidance embedding (guidance_embeds false,
    e.g. FLUX.1-schnell), which feeds no guidance at all; None otherwise. Pure."""
    if guidance_embeds:
        return None
    field = ("model.guidance" if model_spec.guidance is not None else
             "model.bypassGuidanceEmbedding" if model_spec.bypassGuidanceEmbedding else None)
    return field and (f"[model] warning: {field}: this transformer has no guidance embedding (guidance_embeds "
                      "false, e.g. FLUX.1-schnell), so no guidance is fed; the setting changes nothing: remove it")


def _bypass_guidance(transformer) -> None:
    """Make the time/text embedding ignore guidance: training calls it without (guidance=None);
    diffusers' FluxPipeline, used for samples, still passes a guidance whenever the config has
    guidance_embeds, which is dropped here as in training."""
    emb = transformer.time_text_embed

    def forward(self, timestep, *guidance_and_pooled):
        pooled_projection = guidance_and_pooled[-1]
        t = self.timestep_embedder(self.time_proj(timestep).to(dtype=pooled_projection.dtype))
        return t + self.text_embedder(pooled_projection)

    emb.forward = types.MethodType(forward, emb)


class Flux:
    name = "flux"

    def load(self, model_spec, paths, device, encoders=True):
        from diffusers import FluxPipeline, FluxTransformer2DModel

        dtype = getattr(torch, model_spec.dtype)
        root = Path(paths["diffusersPath"])
        if not (root / "model_index.json").is_file():
            raise ModelError(f"model.diffusersPath: {root} has no model_index.json; expected a Flux folder in diffusers layout")
        cls = json.loads((root / "model_index.json").read_text()).get("_class_name", "?")
        if not cls.startswith("Flux"):
            raise ModelError(f"model.diffusersPath: {root} holds a {cls}; expected a Flux pipeline (FluxPipeline)")
        if paths.get("transformerPath"):
            transformer = load_bfl_transformer(root, Path(paths["transformerPath"]), dtype)
        else:
            transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
        transformer.to(device)
        unused = no_embedding_warning(model_spec, bool(transformer.config.guidance_embeds))
        if unused:
            print(unused, flush=True)
        if model_spec.bypassGuidanceEmbedding:
            _bypass_guidance(transformer)
        if not encoders:
            return Components(trainable={"transformer": transformer},
                              info={"guidance_embeds": bool(transformer.config.guidance_embeds)})
        pipe = FluxPipeline.from_pretrained(root, transformer=None, torch_dtype=dtype).to(device)
        return Components(trainable={"transformer": transformer}, encoders={"pipe": pipe},
                          info={"guidance_embeds": bool(transformer.config.guidance_embeds),
                                "vae_shift": pipe.vae.config.shift_factor or 0.0,
                                "vae_scale": pipe.vae.config.scaling_factor})

    def lora_targets(self):
        return {"transformer": DEFAULT_TARGETS}

    def blocks(self, component, transformer):
        return [transformer.transformer_blocks, transformer.single_transformer_blocks]

    @torch.no_grad()
    def encode(self, comps, images, captions):
        pipe = comps.encoders["pipe"]
        images = images.to(pipe.vae.device, pipe.vae.dtype)
        lat = pipe.vae.encode(images).latent_dist.mode()
        lat = (lat - comps.info["vae_shift"]) * comps.info["vae_scale"]
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=images.device,
                                                     max_sequence_length=512)
        return [{"latents": lat[min(i, len(lat) - 1)].cpu(), "prompt_embeds": prompt_embeds[i].cpu(), "pooled": pooled[i].cpu()}
                for i in range(len(captions))]

    def loss(self, comps, batch, model_spec, training_spec, generator, quantile=None, noise=None):
        from diffusers import FluxPipeline

        tr = comps.trainable["transformer"]
        x0 = batch["latents"].float()
        b, c, h, w = x0.shape
        noise = noise_for(x0, generator, noise)
        t = flow_timesteps(b, training_spec, generator, x0.device, quantile)
        if model_spec.fluxShift:
            t = time_shift(resolution_shift_mu((h // 2) * (w // 2)), t)
        xt, target = flow_matching_pair(x0, noise, t)
        dtype = batch["prompt_embeds"].dtype
        packed = FluxPipeline._pack_latents(xt, b, c, h, w).to(dtype)
        img_ids = image_ids(h // 2, w // 2, x0.device, dtype)
        txt_ids = torch.zeros(batch["prompt_embeds"].shape[1], 3, device=x0.device, dtype=dtype)
        guidance = None
        if comps.info["guidance_embeds"] and not model_spec.bypassGuidanceEmbedding:
            g = 1.0 if model_spec.guidance is None else model_spec.guidance
            guidance = torch.full((b,), g, device=x0.device, dtype=torch.float32)
        pred = tr(hidden_states=packed, encoder_hidden_states=batch["prompt_embeds"],
                  pooled_projections=batch["pooled"], timestep=t.to(dtype), img_ids=img_ids, txt_ids=txt_ids,
                  guidance=guidance, return_dict=False)[0]
        mask = batch.get("mask")  # [B, h, w] on the latent grid, packed like the latents
        weight = None if mask is None else FluxPipeline._pack_latents(mask_weights(mask, x0.shape), b, c, h, w)
        return weighted_mse(pred, FluxPipeline._pack_latents(target, b, c, h, w), weight)

    @torch.no_grad()
    def sampling_kit(self, comps, prompts):
        """For spec.samples, while the text encoders are loaded: the prompts' embeddings, and the
        VAE and scheduler kept for sampling (the encoders are freed after caching)."""
        pipe = comps.encoders["pipe"]
        embeds = []
        for p in prompts:
            pe, pooled, _ = pipe.encode_prompt(prompt=[p["prompt"]], prompt_2=None, device=pipe.vae.device,
                                               max_sequence_length=512)
            embeds.append({"prompt_embeds": pe, "pooled_prompt_embeds": pooled})
        return {"vae": pipe.vae, "scheduler": pipe.scheduler, "embeds": embeds}

    @torch.no_grad()
    def sample(self, kit, comps, prompt, generator):
        """One image [H, W, 3] in [0, 1] from FluxPipeline around the transformer being trained."""
        from diffusers import FluxPipeline
        pipe = FluxPipeline(scheduler=kit["scheduler"], vae=kit["vae"], text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=comps.trainable["transformer"])
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kit["embeds"][prompt["index"]], height=prompt["height"], width=prompt["width"],
                    num_inference_steps=prompt["steps"], guidance_scale=prompt["guidance"], generator=generator,
                    output_type="np").images[0]

    def export(self, lora, scale, fmt):
        return flux_lora.export(lora["transformer"], scale, fmt)

    full_file = ("the transformer in the BFL layout (as flux1-dev.safetensors): ComfyUI's Load Diffusion Model "
                 "node, the trainer's model.transformerPath and diffusers' FluxTransformer2DModel.from_single_file "
                 "load it")

    def export_full(self, state_dict):
        """A full fine-tune's transformer as a BFL-layout single file (as flux1-dev.safetensors)."""
        return to_bfl(state_dict)

    def export_gaps(self, lora, fmt):
        return flux_lora.gaps(lora["transformer"], fmt)

    def parse(self, tensors, fmt):
        modules, scale = flux_lora.parse(tensors, fmt)
        return {"transformer": modules}, scale


FAMILY = Flux()
