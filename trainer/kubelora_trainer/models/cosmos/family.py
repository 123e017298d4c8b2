"""Cosmos 1.0 text2world (7B/14B) from the files users have: the original NVIDIA transformer
checkpoint (``model.transformerPath``, a .pt such as Cosmos-1.0-Diffusion-7B-Text2World/model.pt;
a .safetensors with the same keys works too), the CV8x8x8 video tokenizer (``model.vaePath``,
ComfyUI's cosmos_cv8x8x8_1.0.safetensors layout) and the T5 encoder (``model.textEncoderPath``,
ComfyUI's oldt5_xxl .safetensors or a transformers folder; the T5 tokenizer is read from the same
folder or a tokenizer/ folder beside it).

Objective (EDM, as Cosmos 1.0 was trained and as diffusers' EDMEulerScheduler preconditions):
sigma = exp(N(0, 1)), x_t = x0 + sigma * eps, the transformer sees c_in * x_t and timestep
c_noise = log(sigma) / 4, and x0_hat = c_skip * x_t + c_out * F with sigma_data = 0.5;
loss = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 * |x0_hat - x0|^2.
(`training.timestepSampling` belongs to the flow-matching families and is not used here.)

Export: "comfyui" (default) ``diffusion_model.<original module>.lora_A.weight / .lora_B.weight``,
"diffusers" ``transformer.<diffusers module>.lora_A.weight / .lora_B.weight``; both with the
alpha/rank scale folded into lora_B.
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from ...families import RULES
from ...objectives import mask_weights, noise_for, normal_icdf, weighted_mse
from . import keys as K
from ..base import Components, ModelError, refuse_unknown_modules

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SIGMA_DATA = 0.5
P_MEAN, P_STD = 0.0, 1.0      # log-normal training sigmas of Cosmos 1.0 (EDM)
TRAIN_FPS = RULES["cosmos"].fps  # the RoPE base frame rate of Cosmos 1.0 (24); clips are resampled to it
MAX_TEXT_TOKENS = 512

DEFAULT_TARGETS = (r".*transformer_blocks\.\d+\.((attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))")


# ----------------------------------------------------------------------------- EDM (pure)

def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) of EDM, as diffusers' EDMEulerScheduler applies them."""
    s2 = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / s2, sigma * sigma_data / s2.sqrt(), 1.0 / s2.sqrt(), 0.25 * sigma.log()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


# ----------------------------------------------------------------------------- loading

def ensure_torch_resize() -> None:
    """diffusers' Cosmos transformer resizes its padding mask with torchvision.transforms, which
    does not import beside every torch build; give it the same nearest-neighbour resize in torch."""
    import diffusers.models.transformers.transformer_cosmos as tc
    if getattr(tc, "transforms", None) is not None:
        return

    def resize(x, size, interpolation="nearest", **_):
        return F.interpolate(x, size=list(size), mode="nearest")

    tc.transforms = types.SimpleNamespace(functional=types.SimpleNamespace(resize=resize),
                                          InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIG_DIR / name / "config.json").read_text()).items()
            if not k.startswith("_")}


def read_state_dict(path: Path, field: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch.save file (loaded with weights_only=True)."""
    if not path.is_file():
        raise ModelError(f"model.{field}: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not the zip format: no mmap
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the file is not weights
        raise ModelError(f"model.{field}: cannot read {path.name} as a weights file ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"model.{field}: {path.name} holds a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _sample_keys(keys, n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n]) or "no tensors"


def _strict(model, sd: dict, field: str, what: str) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ModelError(f"model.{field}: the {what} does not match its architecture "
                         f"(missing {len(missing)}: {', '.join(missing[:3])}; unexpected {len(unexpected)}: "
                         f"{', '.join(unexpected[:3])})")
    model.load_state_dict(sd, strict=True, assign=True)


def load_transformer(path: Path, dtype: torch.dtype):
    from diffusers import CosmosTransformer3DModel

    sd = read_state_dict(path, "transformerPath")
    prefix = K.strip_prefix(sd)
    if prefix is None:
        if K.is_cosmos2(sd):
            raise ModelError(f"model.transformerPath: {path.name} is a Cosmos-Predict2 (2.0) checkpoint; model.type cosmos "
                             f"trains Cosmos 1.0 (Cosmos-1.0-Diffusion-7B/14B-Text2World model.pt)")
        raise ModelError(f"model.transformerPath: {path.name} is not a Cosmos 1.0 diffusion transformer (expected keys "
                         f"like net.{K.COSMOS1_MARKERS[0]}; found {_sample_keys(sd)})")
    converted, unknown = {}, []
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        try:
            new = K.diffusers_param(k[len(prefix):])
        except K.UnknownModule:
            unknown.append(k)
            continue
        if new is not None:
            converted[new] = v
    if unknown:
        raise ModelError(f"model.transformerPath: {path.name} has {len(unknown)} keys that are not part of the Cosmos 1.0 "
                         f"text2world transformer (e.g. {_sample_keys(unknown)})")
    sd = converted
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    hidden = shapes["patch_embed.proj.weight"][0]
    cfg = K.transformer_config(shapes, _config("transformer-14b" if hidden == 5120 else "transformer-7b"))
    if cfg["in_channels"] != 16:
        raise ModelError(f"model.transformerPath: {path.name} takes {cfg['in_channels']} latent channels (a Video2World "
                         f"checkpoint); model.type cosmos trains the Text2World models (16 channels)")
    with torch.device("meta"):
        model = CosmosTransformer3DModel.from_config(cfg)
    _strict(model, sd, "transformerPath", "Cosmos 1.0 transformer")
    torch.nn.Module.to(model, dtype)   # (ModelMixin.to warns about keep-in-fp32 modules; handled below)
    if dtype == torch.float16 and model.learnable_pos_embed is not None:  # as diffusers keeps it
        model.learnable_pos_embed.float()
    return model


def load_vae(path: Path, dtype: torch.dtype):
    """AutoencoderKLCosmos from the original tokenizer layout; returns (vae, mean [C, N], std [C, N])."""
    from diffusers import AutoencoderKLCosmos

    raw = read_state_dict(path, "vaePath")
    if not all(k in raw for k in K.VAE_MARKERS):
        raise ModelError(f"model.vaePath: {path.name} is not a Cosmos video tokenizer (CV8x8x8) in the original/ComfyUI "
                         f"layout (expected keys like {K.VAE_MARKERS[0]}; found {_sample_keys(raw)})")
    mean, std = raw.pop("latent_mean", None), raw.pop("latent_std", None)
    n_up = 1 + max(int(k.split(".")[2]) for k in raw if k.startswith("decoder.up."))
    sd = {K.vae_to_diffusers(k, n_up): v for k, v in raw.items() if not any(d in k for d in K.VAE_DROP)}
    cfg = K.vae_config({k: tuple(v.shape) for k, v in sd.items()}, _config("vae"))
    c = cfg["latent_channels"]
    if mean is not None:
        cfg.update(latents_mean=mean.float().flatten().tolist(), latents_std=std.float().flatten().tolist())
    vae = AutoencoderKLCosmos.from_config(cfg)   # on CPU: it builds its wavelet buffers itself
    _strict(vae, sd, "vaePath", "Cosmos tokenizer")
    torch.nn.Module.to(vae, dtype).eval()
    mean_t = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(c, -1)
    std_t = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(c, -1)
    return vae, mean_t, std_t


def _tokenizer_dir(te_path: Path) -> Path | None:
    base = te_path if te_path.is_dir() else te_path.parent
    for d in (base, base / "tokenizer", base.parent / "tokenizer"):
        if any((d / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            return d
    return None


def load_tokenizer(te_path: Path):
    d = _tokenizer_dir(te_path)
    if d is None:
        raise ModelError(f"model.textEncoderPath: no T5 tokenizer (tokenizer.json or spiece.model) in {te_path if te_path.is_dir() else te_path.parent} "
                         f"or a tokenizer/ folder beside it; point textEncoderPath at a folder holding the T5 encoder "
                         f".safetensors and the google-t5/t5-11b tokenizer files")
    from transformers import AutoTokenizer, T5TokenizerFast
    try:
        if (d / "tokenizer_config.json").is_file() or (d / "config.json").is_file():
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        if (d / "tokenizer.json").is_file():
            return T5TokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
        return T5TokenizerFast(vocab_file=str(d / "spiece.model"))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model.textEncoderPath: cannot load the T5 tokenizer in {d} ({type(e).__name__}: {e})") from None


def load_text_encoder(te_path: Path, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    if te_path.is_dir() and (te_path / "config.json").is_file():
        try:
            return T5EncoderModel.from_pretrained(str(te_path), torch_dtype=dtype, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"model.textEncoderPath: {te_path} is not a T5 encoder folder ({type(e).__name__}: {e})") from None
    if te_path.is_dir():
        files = sorted(te_path.glob("*.safetensors"))
        if len(files) != 1:
            raise ModelError(f"model.textEncoderPath: {te_path} should hold one T5 encoder .safetensors (found {len(files)})")
        te_path = files[0]
    sd = read_state_dict(te_path, "textEncoderPath")
    prefix = K.t5_prefix(sd)
    if prefix is None:
        raise ModelError(f"model.textEncoderPath: {te_path.name} is not a T5 encoder (expected keys like "
                         f"{K.T5_MARKER}; found {_sample_keys(sd)})")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(prefix + "decoder.")}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.setdefault("encoder.embed_tokens.weight", sd.get("shared.weight"))
    sd = {k: v for k, v in sd.items() if v is not None}
    cfg = K.t5_config({k: tuple(v.shape) for k, v in sd.items()}, _config("text_encoder"))
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**cfg))
    _strict(model, sd, "textEncoderPath", "T5 encoder")
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- sampling

def edm_scheduler():
    """Cosmos 1.0's inference scheduler (nvidia/Cosmos-1.0-Diffusion-7B-Text2World-diffusers
    scheduler_config.json), built here: nothing is fetched."""
    from diffusers import EDMEulerScheduler
    return EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA, sigma_schedule="karras",
                             num_train_timesteps=1000, prediction_type="epsilon", rho=7.0, final_sigmas_type="sigma_min")


class NoGuardrail:
    """A pass-through safety checker, for tests only (GUARDRAIL_ENV=stand-in): the real guardrail's
    models cannot run on the test machines. Not a torch module, so the pipeline's device and dtype
    come from its models."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def guardrail():
    """CosmosTextToWorldPipeline's safety checker: NVIDIA's guardrail (diffusers' CosmosSafetyChecker,
    which needs the cosmos_guardrail package and its models). Samples are never made without it: the
    NVIDIA Open Model License ends the rights of whoever bypasses a model's guardrail. Raises
    ModelError (bad input, the job fails at once) naming spec.samples when it cannot be loaded."""
    from . import GUARDRAIL_ENV
    if os.environ.get(GUARDRAIL_ENV) == "stand-in":
        return NoGuardrail()
    try:
        from diffusers.pipelines.cosmos.pipeline_cosmos_text2world import CosmosSafetyChecker
        return CosmosSafetyChecker()
    except Exception as e:  # noqa: BLE001 - any failure to load it refuses sampling, with its reason
        raise ModelError(
            "spec.samples: Cosmos samples go through NVIDIA's safety guardrail, which the NVIDIA Open Model "
            "License forbids bypassing, and it could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Install the cosmos_guardrail "
            "package in the trainer image with its models in the Hugging Face cache (HF_HOME), or remove "
            "spec.samples from this Cosmos job.") from None


def sampling_pipeline(transformer, vae, safety_checker):
    """CosmosTextToWorldPipeline around `transformer` (no text encoder: embeddings are passed in)."""
    from diffusers import CosmosTextToWorldPipeline
    pipe = CosmosTextToWorldPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                     scheduler=edm_scheduler(), safety_checker=safety_checker)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the family

class Cosmos:
    name = "cosmos"

    def load(self, model_spec, paths, device, encoders=True):
        ensure_torch_resize()
        dtype = getattr(torch, model_spec.dtype)
        transformer = load_transformer(Path(paths["transformerPath"]), dtype).to(device)
        if not encoders:  # loss() reads nothing of the tokenizer's; its normalization is in the cached latents
            return Components(trainable={"transformer": transformer})
        vae, mean, std = load_vae(Path(paths["vaePath"]), dtype)
        te_path = Path(paths["textEncoderPath"])
        tokenizer = load_tokenizer(te_path)
        text_encoder = load_text_encoder(te_path, dtype)
        if text_encoder.config.d_model != transformer.config.text_embed_dim:
            raise ModelError(f"model.textEncoderPath: the T5 encoder gives {text_encoder.config.d_model}-wide embeddings; the "
                             f"transformer expects {transformer.config.text_embed_dim} (Cosmos 1.0 uses google-t5/t5-11b)")
        if vae.config.latent_channels != transformer.config.in_channels:
            raise ModelError(f"model.vaePath: the tokenizer gives {vae.config.latent_channels} latent channels; the transformer "
                             f"takes {transformer.config.in_channels}")
        return Components(trainable={"transformer": transformer},
                          encoders={"vae": vae.to(device), "text_encoder": text_encoder.to(device), "tokenizer": tokenizer},
                          info={"latents_mean": mean, "latents_std": std})

    def lora_targets(self):
        return {"transformer": DEFAULT_TARGETS}

    def blocks(self, component, transformer):
        return [transformer.transformer_blocks]

    @torch.no_grad()
    def encode_prompts(self, comps, captions: list[str], device) -> torch.Tensor:
        """T5 embeddings [B, 512, D], zero after each caption's last token (as the Cosmos pipeline does)."""
        tok, te = comps.encoders["tokenizer"], comps.encoders["text_encoder"]
        t = tok(captions, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt")
        mask = t.attention_mask.to(device)
        emb = te(t.input_ids.to(device), attention_mask=mask).last_hidden_state
        return emb * mask.unsqueeze(-1).to(emb.dtype)

    @torch.no_grad()
    def encode(self, comps, images, captions):
        """images: clips [B, 3, F, H, W] in [-1, 1] -> normalized latents [16, 1 + (F-1)/8, H/8, W/8]."""
        vae = comps.encoders["vae"]
        if images.dim() == 4:
            images = images.unsqueeze(2)
        z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode().float()
        t = z.shape[2]
        mean = comps.info["latents_mean"][:, :t].to(z.device).view(1, -1, t, 1, 1)
        std = comps.info["latents_std"][:, :t].to(z.device).view(1, -1, t, 1, 1)
        lat = ((z - mean) / std * SIGMA_DATA).to(vae.dtype)
        emb = self.encode_prompts(comps, captions, images.device)
        return [{"latents": lat[min(i, len(lat) - 1)].cpu(), "prompt_embeds": emb[i].cpu()} for i in range(len(captions))]

    def loss(self, comps, batch, model_spec, training_spec, generator, quantile=None, noise=None):
        tr = comps.trainable["transformer"]
        x0 = batch["latents"].float()
        b, _, frames, h, w = x0.shape
        noise = noise_for(x0, generator, noise)
        if quantile is None:
            sigma = (P_MEAN + P_STD * torch.randn(b, generator=generator, device=generator.device)).exp().to(x0.device)
        else:  # the held-out evaluation: log sigma at the lognormal's inverse CDF, as diffusion-pipe
            sigma = (P_MEAN + P_STD * normal_icdf(b, quantile, x0.device)).exp()
        sb = sigma.view(-1, 1, 1, 1, 1)
        xt = x0 + sb * noise
        c_skip, c_out, c_in, c_noise = edm_scalings(sb)
        dtype = batch["prompt_embeds"].dtype
        out = tr(hidden_states=(c_in * xt).to(dtype), timestep=c_noise.flatten().to(dtype),
                 encoder_hidden_states=batch["prompt_embeds"], fps=TRAIN_FPS if frames > 1 else None,
                 padding_mask=torch.zeros(1, 1, h, w, device=x0.device, dtype=dtype), return_dict=False)[0]
        x0_hat = c_skip * xt + c_out * out.float()
        mask = batch.get("mask")  # [B, h, w] on the latent grid, every frame
        per_sample = weighted_mse(x0_hat, x0, None if mask is None else mask_weights(mask, x0.shape), per_sample=True)
        return (edm_loss_weight(sigma) * per_sample).mean()

    @torch.no_grad()
    def sampling_kit(self, comps, prompts):
        """For spec.samples, while the T5 encoder is loaded: each prompt's embeddings (and, with
        classifier-free guidance, its negative prompt's: the pipeline's default negative prompt when
        none is given, as CosmosTextToWorldPipeline does), the VAE kept for decoding, and NVIDIA's
        safety guardrail (loaded now, so a job that cannot have it fails before training), which checks
        every prompt's text here (the pipeline, given embeddings, checks only the videos)."""
        from diffusers.pipelines.cosmos.pipeline_cosmos_text2world import DEFAULT_NEGATIVE_PROMPT
        # the pipeline checks a prompt's text only when given the text; it gets embeddings, so here
        rail = guardrail()
        for p in prompts:
            if not rail.check_text_safety(p["prompt"]):
                raise ModelError(f"spec.samples.prompts[{p['index']}]: NVIDIA's guardrail refuses this prompt, and "
                                 "Cosmos samples are made only for prompts it accepts: change or remove it")
        device = comps.encoders["vae"].device
        embeds = []
        for p in prompts:
            e = {"prompt_embeds": self.encode_prompts(comps, [p["prompt"]], device)}
            if p["guidance"] > 1.0:
                neg = DEFAULT_NEGATIVE_PROMPT if p["negativePrompt"] is None else p["negativePrompt"]
                e["negative_prompt_embeds"] = self.encode_prompts(comps, [neg], device)
            embeds.append(e)
        return {"vae": comps.encoders["vae"], "embeds": embeds, "guardrail": rail}

    @torch.no_grad()
    def sample(self, kit, comps, prompt, generator):
        """One clip [F, H, W, 3] in [0, 1] (F = 1 for an image) from CosmosTextToWorldPipeline around
        the transformer being trained, at the training frame rate; see sampling_pipeline."""
        pipe = sampling_pipeline(comps.trainable["transformer"], kit["vae"], kit["guardrail"])
        return pipe(**kit["embeds"][prompt["index"]], height=prompt["height"], width=prompt["width"],
                    num_frames=prompt["frames"], num_inference_steps=prompt["steps"], guidance_scale=prompt["guidance"],
                    fps=TRAIN_FPS, generator=generator, output_type="np").frames[0]

    full_file = ("the diffusion transformer in NVIDIA's original Cosmos 1.0 layout (net.*, the weights of "
                 "model.pt without the training-only logvar): ComfyUI's Load Diffusion Model node and the trainer's "
                 "model.transformerPath load it")

    def export_full(self, state_dict):
        """A full fine-tune's transformer under NVIDIA's original names with the net. prefix of
        model.pt: the inverse of diffusers' Cosmos 1.0 conversion (keys.original_param)."""
        return {"net." + K.original_param(k): v for k, v in state_dict.items()}

    def export(self, lora, scale, fmt):
        if fmt not in ("comfyui", "diffusers"):
            raise ValueError(f"format {fmt!r} is not available for cosmos (available: comfyui, diffusers)")
        out = {}
        for module, (a, b) in lora["transformer"].items():
            key = f"diffusion_model.{K.original_module(module)}" if fmt == "comfyui" else f"transformer.{module}"
            out[f"{key}.lora_A.weight"] = a.contiguous()
            out[f"{key}.lora_B.weight"] = (b.float() * scale).to(b.dtype).contiguous()
        return out

    def export_gaps(self, lora, fmt):
        return []

    def parse(self, tensors, fmt):
        """Inverse of export. A per-module `.alpha` (other trainers' files) is folded into lora_B as
        alpha / rank; diffusion-pipe's Cosmos files (diffusion_model.<original module>, unscaled,
        alpha in its adapter_config.json) parse as comfyui with scale 1."""
        prefix = {"comfyui": "diffusion_model.", "diffusers": "transformer."}.get(fmt)
        if prefix is None:
            raise ValueError(f"format {fmt!r} is not available for cosmos (available: comfyui, diffusers)")
        parts: dict[str, dict] = {}
        for key, t in tensors.items():
            if not key.startswith(prefix) or not key.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")):
                raise ValueError(f"{key!r} is not a Cosmos {fmt} LoRA key ({prefix}<module>.lora_A/lora_B.weight or .alpha)")
            module, kind = (key[len(prefix):-len(".alpha")], "alpha") if key.endswith(".alpha") else \
                (key[len(prefix):].rsplit(".lora_", 1)[0], key[-len("A.weight"):][0])
            if fmt == "comfyui":
                module = K.diffusers_module(module)
            parts.setdefault(module, {})[kind] = t
        out = {}
        for module, p in sorted(parts.items()):
            if "A" not in p or "B" not in p:
                raise ValueError(f"unpaired LoRA weights for {module!r} (a lora_A and a lora_B are needed)")
            b = p["B"]
            if "alpha" in p:
                b = (b.float() * (float(p["alpha"]) / p["A"].shape[0])).to(b.dtype)
            out[module] = (p["A"], b)
        refuse_unknown_modules(out, _has_original_name, "Cosmos")
        return {"transformer": out}, 1.0


def _has_original_name(module: str) -> bool:
    try:
        K.original_module(module)
    except K.UnknownModule:
        return False
    return True


FAMILY = Cosmos()
