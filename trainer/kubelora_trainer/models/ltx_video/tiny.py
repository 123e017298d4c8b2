"""A tiny random-weight LTX-Video pipeline in diffusers layout, and tiny synthetic videos, built
offline for the demo and tests. Real classes (LTXVideoTransformer3DModel, AutoencoderKLLTXVideo,
T5EncoderModel) at toy sizes; the VAE compresses 8x in time like the real one (so clips are 8k+1
frames) and 8x in space (the real one: 32x).
"""
from __future__ import annotations

import random
from pathlib import Path

from ...synthetic import COLORS, tiny_t5_tokenizer, write_video


TINY_TRANSFORMER = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                        attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=32)


def build_tiny_ltx_video(out: Path, seed: int = 0) -> Path:
    """Write a tiny LTX-Video pipeline (LTXPipeline layout) to out; returns out."""
    import torch
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    out = Path(out)
    torch.manual_seed(seed)
    tok, vocab = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    with torch.no_grad():  # non-trivial latent statistics, so normalization is exercised
        vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, 8))
        vae.latents_std.copy_(torch.linspace(0.5, 1.5, 8))
    transformer = LTXVideoTransformer3DModel(**TINY_TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
        base_image_seq_len=1024, max_image_seq_len=4096)
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(out)
    return out


def moving_square(n_frames: int, size: int = 32, color=(40, 60, 220), step: int = 2):
    """Frames of a square sliding right on a light background."""
    from PIL import Image

    frames = []
    side = size // 3
    for i in range(n_frames):
        im = Image.new("RGB", (size, size), (245, 245, 245))
        x = (2 + i * step) % (size - side)
        im.paste(color, (x, size // 3, x + side, size // 3 + side))
        frames.append(im)
    return frames


def build_synthetic_videos(out: Path, n: int = 4, frames: int = 9, size: int = 32, seed: int = 0) -> Path:
    """n captioned mp4 clips of coloured squares sliding right (deterministic)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        color = rng.choice(sorted(COLORS))
        write_video(out / f"clip{i:03d}.mp4", moving_square(frames, size, COLORS[color], step=1 + i % 3))
        (out / f"clip{i:03d}.txt").write_text(f"a {color} square sliding right")
    return out
