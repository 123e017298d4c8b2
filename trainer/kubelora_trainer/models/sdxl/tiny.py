"""Tiny random-weight SDXL, offline, in the two layouts users have: a diffusers folder and one
original-layout (SGM) .safetensors like sd_xl_base_1.0.safetensors. Real classes (diffusers UNet
with text_time micro-conditioning, CLIPTextModel + CLIPTextModelWithProjection, AutoencoderKL) at
diffusers' fast-test sizes.

    python -m kubelora_trainer.models.sdxl.tiny /tmp/tiny-sdxl            # both layouts
"""
from __future__ import annotations

import sys
from pathlib import Path

TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled bigG projection
    cross_attention_dim=32 + 48, norm_num_groups=1)    # CLIP-L hidden + bigG hidden
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
    latent_channels=4, norm_num_groups=4, scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")


def tiny_tokenizers():
    """(tokenizer, tokenizer_2): the byte-level CLIP tokenizer of synthetic.py; SDXL pads tokenizer_2 with "!"."""
    from ...synthetic import tiny_clip_tokenizer
    tok, _ = tiny_clip_tokenizer()
    tok2, _ = tiny_clip_tokenizer()
    tok2.pad_token = "!"
    return tok, tok2


def build_tiny_sdxl_pipeline(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok2 = tiny_tokenizers()
    v = len(tok)
    common = dict(vocab_size=v, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=32, bos_token_id=v - 2, eos_token_id=v - 1,
                  pad_token_id=v - 1)
    # the two widths differ as in SDXL (768 / 1280): diffusers' single-file loader tells the
    # encoders apart by the width of their position embeddings
    te = CLIPTextModel(CLIPTextConfig(**common, hidden_size=32, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_size=48, hidden_act="gelu"))
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        unet=UNet2DConditionModel(**TINY_UNET), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))


def build_tiny_sdxl(out: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline in diffusers layout to out; returns out."""
    out = Path(out)
    build_tiny_sdxl_pipeline(seed).save_pretrained(out)
    return out


def build_tiny_sdxl_single_file(out_file: Path, seed: int = 0) -> Path:
    """Write the same tiny SDXL (same seed, same weights) as one original-layout .safetensors."""
    from safetensors.torch import save_file

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sd = original_state_dict(build_tiny_sdxl_pipeline(seed))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out_file))
    return out_file


def write_flavor_configs(dest: Path) -> Path:
    """The config-only folder the single-file loader reads for the tiny flavor (configs/sdxl-tiny)."""
    dest = Path(dest)
    pipe = build_tiny_sdxl_pipeline()
    pipe.save_config(dest)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(dest / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(dest / name)
    return dest


# ---------------------------------------------------------------- diffusers -> original layout

def _vae_name(key: str, n_levels: int) -> str:
    import re
    k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
    for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
    return k


def _open_clip(sd: dict, prefix: str) -> dict:
    """CLIPTextModelWithProjection -> OpenCLIP names (fused qkv, transposed text_projection)."""
    import torch
    out = {}
    tm = "text_model."
    out[prefix + "token_embedding.weight"] = sd[tm + "embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd[tm + "embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd[tm + "final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd[tm + "final_layer_norm.bias"]
    out[prefix + "text_projection"] = sd["text_projection.weight"].T
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(tm + "encoder.layers.")})
    for i in layers:
        src, dst = f"{tm}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
            out[f"{dst}attn.out_proj.{p}"] = sd[f"{src}self_attn.out_proj.{p}"]
            out[f"{dst}ln_1.{p}"] = sd[f"{src}layer_norm1.{p}"]
            out[f"{dst}ln_2.{p}"] = sd[f"{src}layer_norm2.{p}"]
            out[f"{dst}mlp.c_fc.{p}"] = sd[f"{src}mlp.fc1.{p}"]
            out[f"{dst}mlp.c_proj.{p}"] = sd[f"{src}mlp.fc2.{p}"]
    return out


def original_state_dict(pipe) -> dict:
    """An SDXL pipeline's weights under the original single-file names."""
    from .keys import sgm_unet_name, te_canonical

    sd = {f"model.diffusion_model.{sgm_unet_name(k)}": v for k, v in pipe.unet.state_dict().items()}
    n_levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        name = _vae_name(k, n_levels)
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            v = v[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        sd[f"first_stage_model.{name}"] = v
    for k, v in pipe.text_encoder.state_dict().items():
        sd[f"conditioner.embedders.0.transformer.{te_canonical(k)}"] = v
    sd.update(_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return sd


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-sdxl")
    print(build_tiny_sdxl(root / "diffusers"))
    print(build_tiny_sdxl_single_file(root / "tiny_sdxl.safetensors"))
