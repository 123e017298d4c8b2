"""HunyuanVideo (text-to-video, 720p release and fine-tunes of it).

Sources (families.RULES["hunyuan-video"]): either the official release folder (model.ckptPath:
hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt, hunyuan-video-t2v-720p/vae/,
text_encoder/ = llava-llama-3 as a Llama, text_encoder_2/ = CLIP-L), or the ComfyUI files
(model.transformerPath: one .safetensors in the original key layout, bf16 or fp8 e4m3fn;
model.vaePath; model.llmPath: Llama folder with its tokenizer; model.clipPath: CLIP-L folder).
The transformer is diffusers' HunyuanVideoTransformer3DModel, its weights converted by
diffusers' converter (keys.py) and its config the shipped full-size one
(configs/) with sizes and depths read from the tensors: nothing is fetched.
An fp8 transformer file is upcast to model.dtype when loaded, and said (fp8_note); with
model.transformerDtype: float8 the frozen weights are then quantized again per row (fp8.py).

Text: the prompt goes through HunyuanVideoPipeline.encode_prompt: the video-description
template for clips, the image-description one (HunyuanVideo's "dit-llm-encode") for one-frame
items and the caption-dropout entry, as diffusion-pipe (a clip whose own caption is empty keeps
the video one); the VAE encodes with the original's tiling (enable_vae_tiling), as diffusion-pipe; the Llama hidden states two layers before the last with the template's tokens cropped
off (256 tokens, masked), and CLIP's pooled output.

Training objective: rectified flow on the scaled VAE latents [B, 16, F', H', W'] (F' = (F-1)/4+1):
x_t = (1 - t) x0 + t eps, the transformer predicts eps - x0 at timestep 1000 t; guidance-
distilled checkpoints get the embedded guidance 1.0 (x1000) as at inference with guidance 1.
t from training.timestepSampling (logit_normal or uniform).

Attention without a mask where it changes nothing: diffusers always hands the blocks' attention a
[B, 1, 1, video + text] mask built from the caption mask, even an all-true one, and SDPA's flash
kernel takes no mask: with cuDNN attention off (training.attentionBackend flash) every block's
attention ran on the slower memory-efficient kernel, ~1.9x the step time of the stock stack
(whose torch picks cuDNN attention, which takes masks, on the H100). So the loss first drops the
text positions that are padding in every caption of the batch (exact: padded keys are masked out,
padded queries reach nothing the loss sees, text gets no RoPE), and the blocks' attention gets no
mask whenever every remaining text position is a caption token (always at batch 1): flash
attention, same result. A batch of captions of different lengths keeps the mask, and one or two
padding positions more where a masked key length would be 64 mod 128 (trim_text_padding).

Export: "original" (default): ``transformer.<original module>.lora_A.weight`` / ``lora_B.weight``
(e.g. ``transformer.double_blocks.0.img_attn_qkv.lora_A.weight``); the LoRAs trained on separate
q, k, v (and the single blocks' MLP input) are written as the exactly equivalent LoRA of the fused
module (stacked A, block-diagonal B: rank 3r for qkv, 4r for linear1). ComfyUI maps these names
for HunyuanVideo and diffusers' HunyuanVideo loader converts them. "diffusers":
``transformer.<diffusers module>...``. The alpha/rank scale is folded into lora_B in both.
See docs/formats/hunyuan-video.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ...objectives import flow_matching_pair, flow_timesteps, mask_weights, noise_for, weighted_mse
from . import keys
from .targets import DEFAULT_TARGETS
from ..base import Components, ModelError, refuse_unknown_modules, trim_text_padding

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FORMATS = ("original", "diffusers")
MAX_TOKENS = 256                 # HunyuanVideoPipeline's max_sequence_length
EMBEDDED_GUIDANCE = 1.0
OFFICIAL = {
    "transformer": "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt",
    "vae": "hunyuan-video-t2v-720p/vae/pytorch_model.pt",
    "llm": "text_encoder",
    "clip": "text_encoder_2",
}
COMFY_FIELDS = {"transformer": "transformerPath", "vae": "vaePath", "llm": "llmPath", "clip": "clipPath"}



# ------------------------------------------------------------------ files

def resolve_sources(paths: dict[str, str]) -> dict[str, tuple[str, Path]]:
    """{component: (spec field, local path)} from either source; refuses missing files naming
    the field and the expected layout. With model.ckptPath, a single part given beside it
    (transformerPath, vaePath, llmPath, clipPath) replaces that part of the official layout, as
    diffusion-pipe's transformer_path does with ckpt_path."""
    given = {c: (f"model.{f}", Path(paths[f])) for c, f in COMFY_FIELDS.items() if paths.get(f)}
    if paths.get("ckptPath"):
        root = Path(paths["ckptPath"])
        official = {c: ("model.ckptPath", root / rel) for c, rel in OFFICIAL.items() if c not in given}
        missing = [OFFICIAL[c] for c, (_, p) in official.items() if not p.exists()]
        if missing:
            raise ModelError(f"model.ckptPath: {root} lacks {', '.join(missing)}; expected the official HunyuanVideo "
                             f"layout ({', '.join(OFFICIAL.values())})")
        given = {**official, **given}
    for c, (field, p) in given.items():
        if field != "model.ckptPath":
            _check_part(c, field, p)
    return {c: given[c] for c in OFFICIAL}


def _check_part(component: str, field: str, p: Path) -> None:
    if not p.exists():
        raise ModelError(f"{field}: {p} does not exist")
    if component in ("transformer", "vae") and not p.is_file():
        raise ModelError(f"{field}: {p} is a folder; expected a single .safetensors file")
    if component in ("llm", "clip") and not (p / "config.json").is_file():
        raise ModelError(f"{field}: {p} has no config.json; expected a transformers model folder with its tokenizer")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch .pt/.pth checkpoint (tensors only; the official
    {"module": ...} wrapper is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:                # a legacy (non-zip) torch file cannot be memory-mapped
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for k in ("module", "state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
            break
    return obj


def upcast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor in `dtype`; fp8 weights (e4m3fn/e5m2) are upcast, times their ComfyUI
    ``scale_weight`` when the file is a scaled-fp8 one."""
    out = {}
    for k, v in sd.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        scale = sd.get(k[: -len(".weight")] + ".scale_weight") if k.endswith(".weight") else None
        if scale is not None:
            out[k] = (v.to(torch.float32) * scale.to(torch.float32)).to(dtype)
        else:
            out[k] = v.to(dtype) if v.is_floating_point() else v     # no copy when already in dtype
    return out


def _build(cls, cfg: dict, sd: dict, field: str, path: Path, what: str):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:3]
        raise ModelError(f"{field}: {path} does not fit {what}: {' '.join(s.strip() for s in first)}") from None
    return model


def fp8_note(sd: dict, dtype: torch.dtype, field: str, path: Path, float8: bool) -> Optional[str]:
    """What loading a file of fp8 weights does, said once (None for a file without any). Pure."""
    n = sum(1 for v in sd.values() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
    if not n:
        return None
    held = str(dtype).replace("torch.", "")
    if float8:
        return (f"[model] note: {field} {path.name} holds {n} fp8 tensors: they are upcast to {held}, then the frozen "
                "linear weights quantized again per row (model.transformerDtype: float8), a second rounding: not "
                "bit-for-bit the file's")
    return (f"[model] note: {field} {path.name} holds {n} fp8 tensors: they are upcast to {held} and held so, about "
            f"twice the file's weight memory; model.transformerDtype: float8 keeps the frozen weights in fp8")


def load_transformer(path: Path, dtype: torch.dtype, field: str = "model.transformerPath", float8: bool = False):
    """HunyuanVideoTransformer3DModel from an original-layout (or diffusers-layout) file."""
    from diffusers import HunyuanVideoTransformer3DModel

    sd = keys.strip_prefix(read_state_dict(path))
    note = fp8_note(sd, dtype, field, path, float8)
    if note and os.environ.get("RANK", "0") == "0":
        print(note, flush=True)
    kind = keys.identify(sd)
    if kind == "diffusers":
        sd = keys.to_original(sd)
    elif kind != "original":
        raise ModelError(f"{field}: {path} holds {kind}; expected a HunyuanVideo transformer in the original layout "
                         f"(keys such as {', '.join(keys.ORIGINAL_MARKERS)}), e.g. hunyuan_video_t2v_720p_bf16.safetensors")
    sd = upcast(sd, dtype)
    try:
        cfg = keys.infer_config(sd, dict(HunyuanVideoTransformer3DModel.load_config(CONFIG_DIR / "transformer")))
    except (KeyError, ValueError) as e:
        raise ModelError(f"{field}: {path}: {e}") from None
    return _build(HunyuanVideoTransformer3DModel, cfg, keys.original_to_diffusers(sd), field, path,
                  "HunyuanVideoTransformer3DModel")


def vae_config(sd: dict, base: dict) -> dict:
    """The VAE config: channel widths and depth from the tensors, the rest as released."""
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
    cfg = dict(base)
    cfg.update(
        block_out_channels=[sd[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"].shape[0] for i in range(n)],
        layers_per_block=1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets.")),
        latent_channels=sd["encoder.conv_out.conv.weight"].shape[0] // 2,
        in_channels=sd["encoder.conv_in.conv.weight"].shape[1], out_channels=sd["decoder.conv_out.conv.weight"].shape[0],
        mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in sd),
        down_block_types=[base["down_block_types"][0]] * n, up_block_types=[base["up_block_types"][0]] * n,
    )
    return cfg


def load_vae(path: Path, dtype: torch.dtype, field: str):
    from diffusers import AutoencoderKLHunyuanVideo

    sd = read_state_dict(path)
    if sd and all(k.startswith("vae.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items()}
    conv_in = sd.get("encoder.conv_in.conv.weight")
    if conv_in is None or conv_in.dim() != 5:
        raise ModelError(f"{field}: {path} is not the HunyuanVideo causal 3D VAE (no 3-D encoder.conv_in.conv.weight); "
                         f"expected e.g. hunyuan_video_vae_bf16.safetensors")
    cfg = vae_config(sd, dict(AutoencoderKLHunyuanVideo.load_config(CONFIG_DIR / "vae")))
    return _build(AutoencoderKLHunyuanVideo, cfg, upcast(sd, dtype), field, path, "AutoencoderKLHunyuanVideo")


def _model_type(folder: Path) -> str:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type", "?")
    except (OSError, ValueError):
        return "?"


def load_text_encoders(llm_dir: Path, clip_dir: Path, dtype: torch.dtype, llm_field: str, clip_field: str):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

    if _model_type(llm_dir) != "llama":
        raise ModelError(f"{llm_field}: {llm_dir} holds a {_model_type(llm_dir)!r} model; expected the llava-llama-3 "
                         f"text encoder as a Llama model with its tokenizer (llava-llama-3-8b-text-encoder-tokenizer)")
    if _model_type(clip_dir) not in ("clip", "clip_text_model"):
        raise ModelError(f"{clip_field}: {clip_dir} holds a {_model_type(clip_dir)!r} model; expected CLIP-L "
                         f"(clip-vit-large-patch14)")
    llm = LlamaModel.from_pretrained(llm_dir, torch_dtype=dtype)
    tok = AutoTokenizer.from_pretrained(llm_dir, padding_side="right")
    clip = CLIPTextModel.from_pretrained(clip_dir, torch_dtype=dtype)
    clip_tok = CLIPTokenizer.from_pretrained(clip_dir)
    return llm, tok, clip, clip_tok


# the original VAE's tiles (hyvideo AutoencoderKLCausal3D: sample_size 256, sample_tsize 64, overlap 0.25)
VAE_TILE = {"tile_sample_min_height": 256, "tile_sample_min_width": 256, "tile_sample_min_num_frames": 64,
            "tile_sample_stride_height": 192, "tile_sample_stride_width": 192, "tile_sample_stride_num_frames": 48}


def enable_vae_tiling(vae) -> None:
    """As diffusion-pipe (vae.enable_tiling() on HunyuanVideo's own VAE, "enabled by default in
    inference scripts"): clips wider or taller than 256 px are encoded in 256 px tiles 192 apart,
    blended, and clips longer than 64 frames in 64-frame tiles 48 apart. diffusers' VAE without this
    encodes in one piece spatially (more memory) but in 16-frame tiles in time (its framewise
    default), neither of which the original does; its tiling code is the original's, ported, so
    with the original's tile sizes it gives the original's latents."""
    vae.enable_tiling(**VAE_TILE)


# HunyuanVideo's image template (hyvideo/constants.py PROMPT_TEMPLATE["dit-llm-encode"]), which
# its code and diffusion-pipe use for images (one-frame items) and the empty caption
IMAGE_PROMPT_TEMPLATE = {
    "template": ("<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, "
                 "texture, quantity, text, spatial relationships of the objects and background:<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"),
    "crop_start": 36,
}


def prompt_template(tokenizer, image: bool = False) -> dict:
    """diffusers' (video) template, or with image=True the image one; crop_start (the template's own
    tokens, BOS included) as released for Llama-3's vocabulary, else counted with this tokenizer
    by diffusers' rule."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = IMAGE_PROMPT_TEMPLATE if image else DEFAULT_PROMPT_TEMPLATE
    if len(tokenizer) >= 128000:
        return dict(template)
    n = len(tokenizer(template["template"])["input_ids"]) - 2   # less "{}" and <|eot_id|>
    return {"template": template["template"], "crop_start": n}


def uses_image_template(frames: int, dropout: bool = False) -> bool:
    """diffusion-pipe's choice, by what the entry is, not by its text: one-frame items, and the
    caption-dropout entry (diffusion-pipe encodes one empty caption, as an image, for every item's
    dropout: utils/dataset.py cache_text_embeddings), get the image template; clips the video one,
    an empty caption of a clip included."""
    return frames == 1 or dropout


# ------------------------------------------------------------------ text mask and attention

class _TextMask:
    """Whether every text position of the transformer's latest forward is a caption token; set by
    a forward pre-hook on the transformer from its encoder_attention_mask, or from `told`: (the
    mask, whether it is full) from a caller that read it already (trim_text_padding), for the next
    forward with that very mask (no second read on the host)."""
    full = False
    told = None


class UnmaskedWhenFull:
    """The blocks' attention processor: the model's own, called without the attention mask when
    every text position is a caption token (the mask is then all true and only keeps SDPA off
    flash attention). The state is read again when checkpointed blocks recompute in backward,
    which is right as long as each forward's backward runs before the next forward (the
    training loop); compiled blocks keep the choice traced in forward."""

    def __init__(self, inner, state: _TextMask):
        self.inner, self.state = inner, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.state.full:
            attention_mask = None
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def unmask_full_captions(transformer) -> _TextMask:
    """Install UnmaskedWhenFull on the attention of both block kinds (not the token refiner,
    whose short text attention keeps its mask) and the pre-hook that sets the state; once per
    transformer, before or after adapters.attach wrapped and compiled the blocks."""
    state = getattr(transformer, "_kubelora_text_mask", None)
    if state is not None:
        return state
    state = _TextMask()
    for blocks in FAMILY.blocks("transformer", transformer):
        for block in blocks:
            for m in block.modules():
                if hasattr(m, "set_processor") and getattr(m, "processor", None) is not None \
                        and not isinstance(m.processor, UnmaskedWhenFull):
                    m.set_processor(UnmaskedWhenFull(m.processor, state))

    def note(module, args, kwargs):
        mask = kwargs["encoder_attention_mask"] if "encoder_attention_mask" in kwargs else args[3]
        told, state.told = state.told, None
        state.full = told[1] if told is not None and told[0] is mask else bool(mask.bool().all())  # else a host sync

    transformer.register_forward_pre_hook(note, with_kwargs=True)
    transformer._kubelora_text_mask = state
    return state


# ------------------------------------------------------------------ the family

class HunyuanVideo:
    name = "hunyuan-video"

    def load(self, model_spec, paths, device, encoders=True):
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

        dtype = getattr(torch, model_spec.dtype)
        src = resolve_sources(paths)
        transformer = load_transformer(src["transformer"][1], dtype, src["transformer"][0],
                                       float8=getattr(model_spec, "transformerDtype", None) == "float8")
        if not encoders:
            return Components(trainable={"transformer": transformer.to(device)},
                              info={"guidance_embeds": bool(transformer.config.guidance_embeds)})
        vae = load_vae(src["vae"][1], dtype, src["vae"][0])
        enable_vae_tiling(vae)
        llm, tok, clip, clip_tok = load_text_encoders(src["llm"][1], src["clip"][1], dtype, src["llm"][0], src["clip"][0])
        if llm.config.hidden_size != transformer.config.text_embed_dim:
            raise ModelError(f"{src['llm'][0]}: the text encoder's width {llm.config.hidden_size} does not match the "
                             f"transformer's text input {transformer.config.text_embed_dim}")
        pipe = HunyuanVideoPipeline(text_encoder=llm, tokenizer=tok, transformer=None, vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                    text_encoder_2=clip, tokenizer_2=clip_tok).to(device)
        transformer.to(device)
        return Components(trainable={"transformer": transformer}, encoders={"pipe": pipe},
                          info={"guidance_embeds": bool(transformer.config.guidance_embeds),
                                "vae_scale": vae.config.scaling_factor, "template": prompt_template(tok),
                                "image_template": prompt_template(tok, image=True)})

    def lora_targets(self):
        return {"transformer": DEFAULT_TARGETS}

    def blocks(self, component, transformer):
        return [transformer.transformer_blocks, transformer.single_transformer_blocks]

    @torch.no_grad()
    def encode(self, comps, images, captions, dropout=None):
        """dropout: per caption, whether it is the caption-dropout entry (the image template)."""
        pipe = comps.encoders["pipe"]
        dropout = list(dropout) if dropout is not None else [False] * len(captions)
        clips = images.to(pipe.vae.device, pipe.vae.dtype)
        if clips.dim() == 4:                       # [B, 3, H, W] -> one-frame clips
            clips = clips.unsqueeze(2)
        lat = pipe.vae.encode(clips).latent_dist.mode() * comps.info["vae_scale"]
        text = [None] * len(captions)
        for image in (False, True):   # the captions of each template in one call
            idx = [i for i in range(len(captions)) if uses_image_template(clips.shape[2], dropout[i]) == image]
            if idx:
                embeds, pooled, mask = pipe.encode_prompt(prompt=[captions[i] for i in idx], device=clips.device,
                                                          prompt_template=self._template(comps.info, image),
                                                          max_sequence_length=MAX_TOKENS)
                for j, i in enumerate(idx):
                    text[i] = (embeds[j], mask[j], pooled[j])
        return [{"latents": lat[min(i, len(lat) - 1)].cpu(), "prompt_embeds": text[i][0].cpu(),
                 "prompt_mask": text[i][1].cpu(), "pooled": text[i][2].cpu()} for i in range(len(captions))]

    @staticmethod
    def _template(info, image: bool) -> dict:
        return info["image_template"] if image else info["template"]

    def loss(self, comps, batch, model_spec, training_spec, generator, quantile=None, noise=None):
        tr = comps.trainable["transformer"]
        x0 = batch["latents"].float()
        b = x0.shape[0]
        noise = noise_for(x0, generator, noise)
        t = flow_timesteps(b, training_spec, generator, x0.device, quantile)
        xt, target = flow_matching_pair(x0, noise, t)
        dtype = batch["prompt_embeds"].dtype
        guidance = None
        if comps.info["guidance_embeds"]:
            guidance = torch.full((b,), EMBEDDED_GUIDANCE * 1000.0, device=x0.device, dtype=dtype)
        state = unmask_full_captions(tr)
        # masked attention over the video tokens and the text (the blocks), and over the text alone
        # (the token refiner)
        p, pt = tr.config.patch_size, tr.config.patch_size_t
        video_tokens = (x0.shape[2] // pt) * (x0.shape[3] // p) * (x0.shape[4] // p)
        embeds, mask, full = trim_text_padding(batch["prompt_embeds"], batch["prompt_mask"],
                                               key_offsets=(video_tokens, 0))
        state.told = (mask, full)
        # as HunyuanVideoPipeline: latents in the model dtype, the timestep (0..1000) in float32
        pred = tr(hidden_states=xt.to(dtype), timestep=t * 1000.0,
                  encoder_hidden_states=embeds, encoder_attention_mask=mask,
                  pooled_projections=batch["pooled"], guidance=guidance, return_dict=False)[0]
        lmask = batch.get("mask")  # [B, h, w] on the latent grid, every frame
        return weighted_mse(pred, target, None if lmask is None else mask_weights(lmask, x0.shape))

    @torch.no_grad()
    def sampling_kit(self, comps, prompts):
        """For spec.samples, while the Llama and CLIP encoders are loaded: each prompt's embeddings,
        their mask and CLIP's pooled output, and the VAE and scheduler kept for sampling."""
        pipe = comps.encoders["pipe"]
        embeds = []
        templates = []
        for p in prompts:   # as training encodes captions: the image template for one-frame samples
            template = self._template(comps.info, uses_image_template(p["frames"]))
            e, pooled, mask = pipe.encode_prompt(prompt=[p["prompt"]], prompt_template=template,
                                                 device=pipe.vae.device, max_sequence_length=MAX_TOKENS)
            embeds.append({"prompt_embeds": e, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask})
            templates.append(template)
        return {"vae": pipe.vae, "scheduler": pipe.scheduler, "embeds": embeds, "templates": templates}

    @torch.no_grad()
    def sample(self, kit, comps, prompt, generator):
        """One clip [F, H, W, 3] in [0, 1] from HunyuanVideoPipeline around the transformer being
        trained; the guidance is the embedded (distilled) guidance, as the pipeline's guidance_scale."""
        from diffusers import HunyuanVideoPipeline
        pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=comps.trainable["transformer"],
                                    vae=kit["vae"], scheduler=kit["scheduler"], text_encoder_2=None, tokenizer_2=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kit["embeds"][prompt["index"]], height=prompt["height"], width=prompt["width"],
                    num_frames=prompt["frames"], num_inference_steps=prompt["steps"], guidance_scale=prompt["guidance"],
                    prompt_template=kit["templates"][prompt["index"]], max_sequence_length=MAX_TOKENS, generator=generator,
                    output_type="np").frames[0]

    full_file = ("the transformer in the original HunyuanVideo layout (fused qkv and linear1, as "
                 "hunyuan_video_t2v_720p_bf16.safetensors): ComfyUI's Load Diffusion Model node and the trainer's "
                 "model.transformerPath load it, diffusers' HunyuanVideoTransformer3DModel.from_single_file at the "
                 "released width (3072)")

    def export_full(self, state_dict):
        """A full fine-tune's transformer in the original layout (keys.to_original: the inverse of
        diffusers' convert_hunyuan_video_transformer_to_diffusers)."""
        return keys.to_original(state_dict)

    def export(self, lora, scale, fmt):
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r} is not available for hunyuan-video (available: {', '.join(FORMATS)})")
        if fmt == "original":
            return keys.lora_to_original(lora["transformer"], scale)
        out = {}
        for module, (a, b) in lora["transformer"].items():
            out[f"transformer.{module}.lora_A.weight"] = a.contiguous()
            out[f"transformer.{module}.lora_B.weight"] = (b.float() * scale).to(b.dtype).contiguous()
        return out

    def export_gaps(self, lora, fmt):
        return keys.original_gaps(lora["transformer"]) if fmt == "original" else []

    def parse(self, tensors, fmt):
        if fmt == "original":
            return {"transformer": keys.lora_from_original(tensors)}, 1.0
        if fmt != "diffusers":
            raise ValueError(f"format {fmt!r} is not available for hunyuan-video (available: {', '.join(FORMATS)})")
        mods: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if not (k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))):
                raise ValueError(f"{k}: not a diffusers HunyuanVideo LoRA key (transformer.<module>.lora_A.weight)")
            mods.setdefault(k[len("transformer."):-len(".lora_A.weight")], {})[k[-len("A.weight"):-len(".weight")]] = v
        refuse_unknown_modules(mods, lambda m: keys.original_target(m) is not None, "HunyuanVideo")
        for m, ab in mods.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{m}: needs both lora_A and lora_B")
        return {"transformer": {m: (ab["A"], ab["B"]) for m, ab in sorted(mods.items())}}, 1.0


FAMILY = HunyuanVideo()
