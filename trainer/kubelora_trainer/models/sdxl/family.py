"""Stable Diffusion XL (base 1.0 and its fine-tunes: Pony, Illustrious, NoobAI ...): a diffusers
folder (model.diffusersPath) or one original-layout file like sd_xl_base_1.0.safetensors
(model.checkpointPath, read with diffusers' from_single_file and the configs shipped in
configs/sdxl/ (in this folder), so nothing is fetched).

LoRA goes on the UNet's transformer linears and on both text encoders (CLIP-L `text_encoder`,
OpenCLIP-bigG `text_encoder_2`), as Kohya sd-scripts does (training.textEncoderLearningRate 0: on
the UNet only, adapters.prepare leaves the encoders frozen); so the text embeddings are computed in
every step and only latents and token ids are cached (samples, spec.samples, likewise embed their
prompts through the encoders being trained). Captions are not cut at CLIP's 77 positions: as
diffusion-pipe (and long-prompt UIs) do, the tokens go in windows of 75, each with BOS, EOS and
padding, each window is encoded on its own and the hidden states are concatenated along the
sequence; the pooled embedding is the first window's. A batch mixing captions of different window
counts is padded (cache.stack) and the padding windows are masked out of the UNet's cross-attention,
so each caption conditions as it would alone.
Objective: DDPM noise prediction (epsilon, or v with model.vPred), uniform integer timesteps over
the scheduler's 1000, optional Min-SNR-gamma weighting (model.minSnrGamma). SDXL's
micro-conditioning (original size, crop top-left, target size) goes in as add_time_ids.
Export: "kohya" (lora_unet_/lora_te1_/lora_te2_ keys with lora_down/lora_up/alpha, the real alpha)
and "diffusers" (unet./text_encoder./text_encoder_2. + lora_A/lora_B, scale folded into lora_B).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from ...objectives import mask_weights, noise_for, quantile_timestep, weighted_mse
from ..base import Components, ModelError
from .keys import LAYERS_PER_BLOCK, from_kohya_name, kohya_name, te_canonical

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

UNET_TARGETS = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")
TEXT_TARGETS = r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
# keys of the original single file: UNet with the SDXL label embedding, CLIP-L and OpenCLIP-bigG
SGM_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SGM_MARKERS = (SGM_UNET_IN, "model.diffusion_model.label_emb.0.0.weight",
               "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
               "conditioner.embedders.1.model.positional_embedding")
# what a file is when it is not SDXL base (first marker key found)
OTHER_FAMILIES = (
    ("Flux (BFL transformer)", ("double_blocks.0.img_attn.qkv.weight",
                                "model.diffusion_model.double_blocks.0.img_attn.qkv.weight")),
    ("Flux (diffusers transformer)", ("transformer_blocks.0.attn.add_q_proj.weight",)),
    ("SD3", ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",)),
    ("SDXL refiner (no CLIP-L text encoder)", ("conditioner.embedders.0.model.text_projection",)),
    ("Stable Diffusion 1.x", ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",)),
    ("Stable Diffusion 2.x", ("cond_stage_model.model.token_embedding.weight",)),
    ("a diffusers UNet (not a whole checkpoint)", ("down_blocks.0.resnets.0.conv1.weight",)),
    ("a LoRA", ("lora_unet_", "lora_te1_", "diffusion_model.")),
)
# objectives of SDXL-architecture checkpoints that kubelora does not train, by their marker key
UNTRAINED_OBJECTIVES = {
    "edm_vpred": "an EDM v-prediction checkpoint (e.g. CosXL)",
    "edm_mean": "an EDM checkpoint with latent mean/std (e.g. Playground v2.5)",
    "edm_std": "an EDM checkpoint with latent mean/std (e.g. Playground v2.5)",
}
# single-file flavors: UNet conv_in channels -> shipped config folder under configs/
FLAVORS = {320: "sdxl", 32: "sdxl-tiny"}


def identify(keys) -> str:
    """A short name for what a checkpoint's keys look like (for error messages)."""
    keys = list(keys)
    for name, markers in OTHER_FAMILIES:
        if any(k == m or (m.endswith("_") or m.endswith(".")) and k.startswith(m) for m in markers for k in keys):
            return name
    return "an unknown model (first keys: " + ", ".join(keys[:3]) + ")"


def check_single_file_keys(keys, field: str = "model.checkpointPath") -> None:
    for marker, what in UNTRAINED_OBJECTIVES.items():
        if marker in keys:
            raise ModelError(f"{field}: this is {what} (it has a {marker!r} key); kubelora trains SDXL with the DDPM "
                             f"epsilon or v-prediction objective only, and training it as one would produce a "
                             f"broken LoRA. Use an SDXL base, epsilon or v-prediction checkpoint")
    missing = [m for m in SGM_MARKERS if m not in keys]
    if missing:
        raise ModelError(f"{field}: expected an SDXL checkpoint in the original single-file layout (like "
                         f"sd_xl_base_1.0.safetensors, with model.diffusion_model.*, conditioner.embedders.0.* and "
                         f"conditioner.embedders.1.*); this file looks like {identify(keys)} (no {missing[0]})")


def check_diffusers_folder(root: Path) -> None:
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelError(f"model.diffusersPath: {root} has no model_index.json; expected an SDXL folder in "
                         f"diffusers layout (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)")
    cls = json.loads(index.read_text()).get("_class_name")
    if cls not in SDXL_PIPELINES:
        raise ModelError(f"model.diffusersPath: expected an SDXL folder (model_index.json _class_name "
                         f"StableDiffusionXLPipeline, with unet/ and both text encoders); found {cls!r} — "
                         f"is model.type right?")
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not (root / sub).is_dir():
            raise ModelError(f"model.diffusersPath: {root} has no {sub}/; SDXL LoRA training needs the UNet, the VAE "
                             f"and both text encoders with their tokenizers (the refiner has no text_encoder/)")


def clip_byte_alphabet() -> list[str]:
    """CLIP/GPT-2 byte-level alphabet in vocabulary order: printable bytes map to themselves, the
    others to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


@functools.lru_cache(maxsize=None)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (SDXL's tokenizer and tokenizer_2 differ only in the pad token),
    built from the merges shipped in configs/sdxl/ (in this folder) (OpenAI CLIP's bpe_simple_vocab, MIT)."""
    from transformers import CLIPTokenizer

    merges = (CONFIG_DIR / "sdxl" / "clip-merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    alphabet = clip_byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=77,
                         pad_token=pad_token,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def flavor_tokenizers(flavor: str):
    if flavor == "sdxl-tiny":
        from .tiny import tiny_tokenizers
        return tiny_tokenizers()
    return clip_tokenizer(), clip_tokenizer("!")


def load_single_file(ckpt: Path, dtype: torch.dtype, vae: bool = True):
    """StableDiffusionXLPipeline from an original-layout .safetensors with the shipped configs
    (vae=False: without the VAE)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    if ckpt.suffix != ".safetensors":
        raise ModelError(f"model.checkpointPath: {ckpt.name}: only .safetensors checkpoints are read "
                         f"(pickled .ckpt files can run code when loaded); convert it first")
    with safe_open(str(ckpt), "pt") as f:
        keys = set(f.keys())
        check_single_file_keys(keys)
        channels = f.get_slice(SGM_UNET_IN).get_shape()[0]
    if channels not in FLAVORS:
        raise ModelError(f"model.checkpointPath: a UNet with {channels} base channels is not SDXL base "
                         f"(320); only the SDXL base architecture is supported")
    flavor = FLAVORS[channels]
    tok, tok2 = flavor_tokenizers(flavor)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(ckpt), config=str(CONFIG_DIR / flavor), tokenizer=tok, tokenizer_2=tok2, torch_dtype=dtype,
        local_files_only=True, **({} if vae else {"vae": None}))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2") if vae else ("unet", "text_encoder", "text_encoder_2"):
        missing = [n for n, p in getattr(pipe, name).named_parameters() if p.is_meta]
        if missing:
            raise ModelError(f"model.checkpointPath: {ckpt.name} has no weights for {name}.{missing[0]} "
                             f"({len(missing)} missing); expected a complete SDXL base checkpoint")
    return pipe, {"v_pred": "v_pred" in keys, "ztsnr": "ztsnr" in keys}


def _penultimate(te, ids):
    """(output of the second-to-last encoder layer, model output). Read with a hook rather than
    output_hidden_states: transformers finds its output recorders by the model's class, which
    FSDP2 replaces."""
    layers = getattr(te, "text_model", te).encoder.layers
    box = {}
    hook = layers[-2].register_forward_hook(lambda m, i, o: box.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        out = te(ids)
    finally:
        hook.remove()
    return box["h"], out


def chunk_ids(tokenizer, text: str) -> torch.Tensor:
    """A caption's token ids as [n, 77] windows of up to 75 tokens, each with BOS, EOS and the
    tokenizer's padding (diffusion-pipe's get_prompt_embeds; long-prompt UIs alike). A caption within
    75 tokens gives one window, the pipeline's own tokenization; the empty caption one window too."""
    step = tokenizer.model_max_length - 2
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    pieces = [ids[i:i + step] for i in range(0, len(ids), step)] or [[]]
    return torch.tensor([[tokenizer.bos_token_id, *p, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (step - len(p))
                         for p in pieces], dtype=torch.long)


def caption_ids(tokenizers, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tokenizers' windows of each text, [len(texts), n, 77] each: texts with fewer windows
    (or a tokenizer that gives fewer) are padded with windows of the empty caption, as long-prompt
    UIs pad a negative prompt, so the two encoders' hidden states and the texts line up."""
    per = [[chunk_ids(t, x) for t in tokenizers] for x in texts]
    n = max(len(w) for ws in per for w in ws)
    empty = [chunk_ids(t, "") for t in tokenizers]
    return tuple(torch.stack([torch.cat([ws[i], empty[i].expand(n - len(ws[i]), -1)]) for ws in per])
                 for i in range(len(tokenizers)))


def text_conditioning(te, te2, ids, ids2):
    """SDXL's prompt embeddings (penultimate hidden states of both encoders, concatenated) and the
    pooled, projected bigG embedding — what StableDiffusionXLPipeline.encode_prompt computes — for
    ids [B, n, 77]: each window encoded on its own, the hidden states concatenated along the
    sequence ([B, n * 77, D]), the pooled embedding the first window's (diffusion-pipe). [B, 77]
    ids are one window."""
    if ids.dim() == 2:
        ids, ids2 = ids.unsqueeze(1), ids2.unsqueeze(1)
    b, n, length = ids.shape
    h, _ = _penultimate(te, ids.reshape(b * n, length))
    h2, out2 = _penultimate(te2, ids2.reshape(b * n, length))
    return torch.cat([h, h2], dim=-1).reshape(b, n * length, -1), out2.text_embeds.reshape(b, n, -1)[:, 0]


def window_mask(windows: torch.Tensor, n: int, length: int):
    """The UNet's encoder_attention_mask [B, n * length] keeping each caption's own windows
    (windows [B]: its count) and dropping the padding windows of a batch of mixed counts; None
    when no caption has padding windows (the attention runs unmasked)."""
    if bool((windows >= n).all()):
        return None
    return (torch.arange(n * length, device=windows.device)[None] < (windows[:, None] * length)).long()


def ddpm_pair(x0, noise, alpha_bar, v_pred: bool):
    """Noisy latents sqrt(a) x0 + sqrt(1-a) eps and the target: eps, or v = sqrt(a) eps - sqrt(1-a) x0."""
    a = alpha_bar.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return xt, (a.sqrt() * noise - (1 - a).sqrt() * x0) if v_pred else noise


def min_snr_weights(alpha_bar, gamma: float | None, v_pred: bool):
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v-prediction; ones when gamma is unset. Finite at SNR 0 (the
    last timestep of a zero-terminal-SNR schedule), where the epsilon weight is its limit, 1."""
    if not gamma:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    if v_pred:
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.where(snr <= gamma, torch.ones_like(snr), gamma / snr)


def schedule(sched_cfg, zero_terminal_snr: bool) -> torch.Tensor:
    """alphas_cumprod of the checkpoint's DDPM schedule, rescaled to zero terminal SNR if asked
    (Lin et al. 2023, as diffusers' rescale_betas_zero_snr: alphas_cumprod[-1] becomes 0)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(sched_cfg, rescale_betas_zero_snr=zero_terminal_snr).alphas_cumprod.float()


def sampling_scheduler(scheduler, v_pred: bool, ztsnr: bool):
    """The checkpoint's inference scheduler, set to the objective being trained where its config
    says otherwise (model.vPred, model.zeroTerminalSnr: v-prediction, the rescaled schedule with
    trailing timesteps so the first step starts from pure noise)."""
    cfg = scheduler.config
    over = {}
    if v_pred != (cfg.get("prediction_type") == "v_prediction"):
        over["prediction_type"] = "v_prediction" if v_pred else "epsilon"
    if ztsnr != bool(cfg.get("rescale_betas_zero_snr")):
        over.update(rescale_betas_zero_snr=ztsnr, **({"timestep_spacing": "trailing"} if ztsnr else {}))
    return type(scheduler).from_config(cfg, **over) if over else scheduler


def objective(model_spec, sched_cfg, file_marks: dict) -> tuple[bool, bool]:
    """(v-prediction, zero terminal SNR): the spec where it says, else what the checkpoint says
    (single-file v_pred/ztsnr keys, or the diffusers scheduler config)."""
    v_pred = bool(model_spec.vPred or file_marks.get("v_pred") or sched_cfg.get("prediction_type") == "v_prediction")
    ztsnr = model_spec.zeroTerminalSnr
    if ztsnr is None:
        ztsnr = bool(file_marks.get("ztsnr") or sched_cfg.get("rescale_betas_zero_snr"))
    return v_pred, ztsnr


def _on_device(info: dict, key: str, device: torch.device) -> torch.Tensor:
    """info[key] moved to device once and kept there: a copy from host memory at every micro-batch
    waits for the GPU to finish what was queued (twice a step: before and after the UNet's forward)."""
    if info[key].device != device:
        info[key] = info[key].to(device)
    return info[key]


class SDXL:
    name = "sdxl"

    def load(self, model_spec, paths, device, encoders=True):
        """encoders=False: no VAE; the text encoders are trained here, so they are built either way."""
        from diffusers import StableDiffusionXLPipeline

        dtype = getattr(torch, model_spec.dtype)
        marks = {}
        if paths.get("checkpointPath"):
            pipe, marks = load_single_file(Path(paths["checkpointPath"]), dtype, vae=encoders)
        else:
            root = Path(paths["diffusersPath"])
            check_diffusers_folder(root)
            pipe = StableDiffusionXLPipeline.from_pretrained(root, torch_dtype=dtype, **({} if encoders else {"vae": None}))
        unet = pipe.unet
        if unet.config.addition_embed_type != "text_time" or unet.config.layers_per_block != LAYERS_PER_BLOCK:
            raise ModelError("model: the UNet is not SDXL-shaped (needs addition_embed_type text_time and "
                             f"layers_per_block {LAYERS_PER_BLOCK})")
        sched_cfg = pipe.scheduler.config
        v_pred, ztsnr = objective(model_spec, sched_cfg, marks)
        print(f"[model] sdxl: {'v-prediction' if v_pred else 'epsilon prediction'}"
              f"{', zero terminal SNR' if ztsnr else ''}"
              f"{'' if model_spec.vPred or not v_pred else ' (from the checkpoint)'}", flush=True)
        if ztsnr and not v_pred:
            print("[model] warning: model.zeroTerminalSnr with epsilon prediction: at the last timestep the input is "
                  "pure noise and the target equals it; zero terminal SNR is meant for v-prediction (model.vPred)",
                  flush=True)
        alphas = schedule(sched_cfg, ztsnr)
        # Min-SNR weights come from the schedule before the zero-terminal rescale, as sd-scripts and
        # diffusion-pipe compute them (their SNR table is made before the betas are fixed), so the
        # high-noise end keeps a weight above 0
        snr_alphas = schedule(sched_cfg, False) if ztsnr else alphas
        trainable = {"unet": unet.to(device), "text_encoder": pipe.text_encoder.to(device),
                     "text_encoder_2": pipe.text_encoder_2.to(device)}
        if not encoders:
            return Components(trainable=trainable, info={"alphas_cumprod": alphas, "snr_alphas_cumprod": snr_alphas,
                                                         "v_pred": v_pred})
        vae = pipe.vae.to(device, torch.float32)  # encoded once and cached; fp16/bf16 SDXL VAEs overflow
        return Components(trainable=trainable,
                          encoders={"vae": vae, "tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2,
                                    "scheduler": pipe.scheduler},
                          info={"alphas_cumprod": alphas, "snr_alphas_cumprod": snr_alphas, "v_pred": v_pred,
                                "ztsnr": ztsnr,
                                "vae_scale": vae.config.scaling_factor,
                                "force_zeros": bool(pipe.config.get("force_zeros_for_empty_prompt", True))})

    def lora_targets(self):
        return {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS, "text_encoder_2": TEXT_TARGETS}

    def blocks(self, component, module):
        if component == "unet":
            return [module.down_blocks, module.mid_block.attentions, module.up_blocks]
        text_model = getattr(module, "text_model", module)
        return [text_model.encoder.layers]

    @torch.no_grad()
    def encode(self, comps, images, captions):
        vae = comps.encoders["vae"]
        lat = vae.encode(images.to(vae.device, torch.float32)).latent_dist.mode() * comps.info["vae_scale"]
        h, w = images.shape[-2:]
        # each caption's own windows [n, 77] (not padded to the batch's longest: the loader pads and masks)
        ids = [caption_ids([comps.encoders[t] for t in ("tokenizer", "tokenizer_2")], [c]) for c in captions]
        # micro-conditioning: original size, crop top-left, target size, all as the bucket's size and no
        # crop, as diffusion-pipe does (the centre crop of the fit is not described to the UNet)
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)
        return [{"latents": lat[min(i, len(lat) - 1)].cpu(), "input_ids": ids[i][0][0], "input_ids_2": ids[i][1][0],
                 "text_windows": torch.tensor(ids[i][0].shape[1]), "time_ids": time_ids}
                for i in range(len(captions))]

    def loss(self, comps, batch, model_spec, training_spec, generator, quantile=None, noise=None):
        unet, te, te2 = (comps.trainable[c] for c in ("unet", *TEXT_ENCODERS))
        dtype = getattr(torch, model_spec.dtype)
        x0 = batch["latents"].float()
        b = x0.shape[0]
        alphas = _on_device(comps.info, "alphas_cumprod", x0.device)
        if quantile is None:
            t = torch.randint(0, len(alphas), (b,), generator=generator, device=generator.device).to(x0.device)
        else:  # the held-out evaluation: every sample at int(q * num_train_timesteps), as diffusion-pipe
            t = torch.full((b,), quantile_timestep(quantile, len(alphas)), dtype=torch.long, device=x0.device)
        noise = noise_for(x0, generator, noise)
        alpha_bar = alphas[t]
        v_pred = comps.info["v_pred"]
        xt, target = ddpm_pair(x0, noise, alpha_bar, v_pred)
        prompt_embeds, pooled = text_conditioning(te, te2, batch["input_ids"], batch["input_ids_2"])
        ids = batch["input_ids"]
        windows = batch.get("text_windows")
        text_mask = None if windows is None or ids.dim() == 2 else window_mask(windows.to(x0.device), *ids.shape[1:])
        pred = unet(xt.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype), encoder_attention_mask=text_mask,
                    added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": batch["time_ids"].to(dtype)},
                    return_dict=False)[0]
        mask = batch.get("mask")  # [B, h, w] on the latent grid
        per_sample = weighted_mse(pred, target, None if mask is None else mask_weights(mask, x0.shape), per_sample=True)
        snr_alpha_bar = (_on_device(comps.info, "snr_alphas_cumprod", x0.device) if "snr_alphas_cumprod" in comps.info
                         else alphas)[t]
        return (per_sample * min_snr_weights(snr_alpha_bar, model_spec.minSnrGamma, v_pred)).mean()

    def _ids(self, comps, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts' windows as training encodes captions; a negative prompt with fewer windows than
        the prompt is padded with empty-caption windows (the pipeline needs both the same length)."""
        return caption_ids([comps.encoders[t] for t in ("tokenizer", "tokenizer_2")], texts)

    def sampling_kit(self, comps, prompts):
        """For spec.samples: the prompts' token ids (the text encoders are trained, so the
        embeddings are computed at each sample step through them, LoRA active), and the VAE and
        scheduler kept for sampling. An empty negative prompt is zeros (diffusers'
        force_zeros_for_empty_prompt), no ids."""
        ids = []
        for p in prompts:
            # no negative prompt at all: zeros where the model says so (force_zeros_for_empty_prompt), as
            # diffusers does for negative_prompt=None; an explicit one, "" included, is encoded
            neg = p["guidance"] > 1.0 and not (p["negativePrompt"] is None and comps.info["force_zeros"])
            ids.append(self._ids(comps, [p["prompt"]] + ([p["negativePrompt"] or ""] if neg else [])))
        info = comps.info
        return {"vae": comps.encoders["vae"], "ids": ids,
                "scheduler": sampling_scheduler(comps.encoders["scheduler"], info["v_pred"], info["ztsnr"]),
                "force_zeros": comps.info["force_zeros"]}

    @torch.no_grad()
    def sample(self, kit, comps, prompt, generator):
        """One image [H, W, 3] in [0, 1] from StableDiffusionXLPipeline around the UNet being
        trained, with the prompt embedded by the text encoders being trained (one forward of
        each: the negative prompt, when it is encoded, rides in the same batch)."""
        from diffusers import StableDiffusionXLPipeline
        unet, te, te2 = (comps.trainable[c] for c in ("unet", *TEXT_ENCODERS))
        ids, ids2 = kit["ids"][prompt["index"]]
        device = kit["vae"].device
        embeds, pooled = text_conditioning(te, te2, ids.to(device), ids2.to(device))
        cond = {"prompt_embeds": embeds[:1], "pooled_prompt_embeds": pooled[:1]}
        if prompt["guidance"] > 1.0:
            cond["negative_prompt_embeds"] = embeds[1:] if len(embeds) > 1 else torch.zeros_like(embeds[:1])
            cond["negative_pooled_prompt_embeds"] = pooled[1:] if len(pooled) > 1 else torch.zeros_like(pooled[:1])
        pipe = StableDiffusionXLPipeline(vae=kit["vae"], text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=kit["scheduler"],
                                         force_zeros_for_empty_prompt=kit["force_zeros"], add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe(**cond, height=prompt["height"], width=prompt["width"], num_inference_steps=prompt["steps"],
                    guidance_scale=prompt["guidance"], generator=generator, output_type="np").images[0]

    full_file = ("the UNet only, in the original SDXL layout (model.diffusion_model.*, as in "
                 "sd_xl_base_1.0.safetensors): ComfyUI's Load Diffusion Model node and diffusers' "
                 "UNet2DConditionModel.from_single_file load it; the VAE and text encoders are the base model's "
                 "(a full fine-tune leaves them as they were)")

    def export_full(self, state_dict):
        """A full fine-tune's UNet under its original (SGM) names, model.diffusion_model.*: the UNet
        part of an SDXL checkpoint (the inverse of diffusers' convert_ldm_unet_checkpoint)."""
        from .keys import sgm_unet_name
        return {f"model.diffusion_model.{sgm_unet_name(k)}": v for k, v in state_dict.items()}

    def export(self, lora, scale, fmt):
        out = {}
        if fmt == "kohya":
            for component, modules in lora.items():
                for module, (a, b) in modules.items():
                    key = kohya_name(component, module)
                    out[f"{key}.lora_down.weight"] = a.contiguous()
                    out[f"{key}.lora_up.weight"] = b.contiguous()
                    out[f"{key}.alpha"] = torch.tensor(float(scale * a.shape[0]))
        elif fmt == "diffusers":
            for component, modules in lora.items():
                for module, (a, b) in modules.items():
                    name = module if component == "unet" else te_canonical(module)
                    out[f"{component}.{name}.lora_A.weight"] = a.contiguous()
                    out[f"{component}.{name}.lora_B.weight"] = (b.float() * scale).to(b.dtype).contiguous()
        else:
            raise ValueError(f"format {fmt!r} is not available for sdxl (available: kohya, diffusers)")
        return out

    def export_gaps(self, lora, fmt):
        if fmt != "diffusers" or not any(".to_" in m for m in lora.get("unet", {})):
            return []
        return ["ComfyUI does not map this file's UNet attention layers (to_q, to_k, to_v, to_out under diffusers' "
                "names), so it would apply only part of it: load the kohya file in ComfyUI"]

    def parse(self, tensors, fmt):
        if fmt == "kohya":
            return _parse_kohya(tensors)
        if fmt == "diffusers":
            return _parse_diffusers(tensors), 1.0
        raise ValueError(f"format {fmt!r} is not available for sdxl (available: kohya, diffusers)")


def _parse_kohya(tensors):
    """Kohya tensors -> (LoraTensors, scale); modules whose alpha/rank differs from the first one's
    get the ratio folded into lora_up."""
    stems = {}
    for key in tensors:
        m = re.fullmatch(r"(lora_(?:unet|te1|te2)_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if not m:
            raise ValueError(f"unexpected key {key!r} (expected lora_unet_/lora_te1_/lora_te2_<module>"
                             f".lora_down.weight / .lora_up.weight / .alpha)")
        stems.setdefault(m[1], {})[m[2]] = tensors[key]
    lora: dict = {}
    scale = None
    for stem, parts in sorted(stems.items()):
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"lora_down/lora_up pair incomplete for {stem}")
        try:
            component, module = from_kohya_name(stem)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        a, b = parts["lora_down.weight"], parts["lora_up.weight"]
        s = float(parts["alpha"]) / a.shape[0] if "alpha" in parts else 1.0
        scale = s if scale is None else scale
        lora.setdefault(component, {})[_live_name(component, module)] = (a, b if s == scale else b * (s / scale))
    return lora, (1.0 if scale is None else scale)


def _parse_diffusers(tensors):
    pairs: dict = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ValueError(f"unexpected key {key!r} (expected unet./text_encoder./text_encoder_2.<module>"
                             f".lora_A/B.weight)")
        pairs.setdefault((m[1], m[2]), [None, None])["AB".index(m[3])] = t
    lora: dict = {}
    for (component, module), (a, b) in sorted(pairs.items()):
        if a is None or b is None:
            raise ValueError(f"lora_A/lora_B pair incomplete for {component}.{module}")
        lora.setdefault(component, {})[_live_name(component, module)] = (a, b)
    return lora


@functools.lru_cache(maxsize=None)
def _clip_text_model_is_flat() -> bool:
    """Recent transformers build CLIPTextModel without the text_model wrapper."""
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                         max_position_embeddings=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return not hasattr(CLIPTextModel(cfg), "text_model")


def _live_name(component: str, module: str) -> str:
    """Module path as the loaded component names it (CLIP-L may be flat, bigG keeps text_model.)."""
    if component == "text_encoder" and _clip_text_model_is_flat():
        return module.removeprefix("text_model.")
    return module


FAMILY = SDXL()
