"""The tiny Flux (debug flavour): the real diffusers classes at toy sizes with random weights,
written in diffusers layout, and the same transformer as a BFL single file. Built offline for the
demo, tests and benchmarks; product code never imports it.
"""
from __future__ import annotations

from pathlib import Path

from ...synthetic import tiny_clip_tokenizer, tiny_t5_tokenizer


TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=(2, 2, 4))


def build_tiny_flux(out: Path, seed: int = 0) -> Path:
    """Write a tiny Flux pipeline in diffusers layout to out; returns out."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out)
    torch.manual_seed(seed)
    clip_tok, clip_vocab = tiny_clip_tokenizer()
    t5_tok, t5_vocab = tiny_t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1,
        pad_token_id=clip_vocab - 1))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(out)
    return out


def write_bfl_transformer(diffusers_dir: Path, out_file: Path) -> Path:
    """The tiny Flux transformer as a single file in the BFL layout (as flux1-dev.safetensors is)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from .keys import to_bfl
    tr = FluxTransformer2DModel.from_pretrained(diffusers_dir, subfolder="transformer")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_bfl(tr.state_dict()).items()}, str(out_file))
    return out_file
