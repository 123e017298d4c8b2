"""A tiny random-weight Cosmos 1.0 text2world in the files users have, built offline: the
transformer as an original NVIDIA checkpoint (.pt, ``net.``-prefixed original module names plus the
``logvar``/``pos_embedder`` buffers the real model.pt carries), the CV8x8x8 tokenizer in the
original/ComfyUI layout (.safetensors with latent_mean/latent_std), and a T5 encoder
(.safetensors in transformers' layout) with its tokenizer in one folder.

    from kubelora_trainer.models.cosmos.tiny import build_tiny_cosmos
    paths = build_tiny_cosmos("/tmp/tiny-cosmos")   # {"transformerPath": ..., "vaePath": ..., "textEncoderPath": ...}
"""
from __future__ import annotations

import re
from pathlib import Path

from .keys import original_param, vae_to_diffusers
from ...synthetic import tiny_t5_tokenizer

TRANSFORMER_FILE = "cosmos-1.0-diffusion-text2world.pt"
VAE_FILE = "cosmos_cv8x8x8_1.0.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
TEXT_ENCODER_FILE = "oldt5_xxl_fp32.safetensors"

TINY_TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                        mlp_ratio=4.0, text_embed_dim=32, adaln_lora_dim=8, max_size=(128, 240, 240),
                        patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True,
                        extra_pos_embed_type="learnable")
TINY_VAE = dict(latent_channels=16, encoder_block_out_channels=(8, 8, 16, 16), decode_block_out_channels=(8, 16, 16, 16),
                num_layers=1)

# diffusers AutoencoderKLCosmos key -> original tokenizer key (".key" in, ".key" out), in order
_VAE_INVERSE = (
    (r"\.down_blocks\.(\d+)\.", r".down.\1."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1.0."),
    (r"\.mid_block\.temp_attentions\.0\.", ".mid.attn_1.1."),
    (r"\.resnets\.(\d+)\.", r".block.\1."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.to_(q|k|v)\.", r".\1.conv3d."),
    (r"\.to_out\.0\.", ".proj_out.conv3d."),
    (r"\.conv_s\.", ".0.conv3d."),
    (r"\.conv_t\.", ".1.conv3d."),
    (r"\.conv_shortcut\.", ".nin_shortcut.conv3d."),
    (r"\.(downsample|upsample)\.(conv\d)\.", r".\1.\2.conv3d."),
    (r"^\.(quant_conv|post_quant_conv)\.", r".\1.conv3d."),
)


def vae_to_original(key: str, n_up: int) -> str:
    k = re.sub(r"\.up_blocks\.(\d+)\.", lambda m: f".up.{n_up - 1 - int(m[1])}.", "." + key)
    for pat, rep in _VAE_INVERSE:
        k = re.sub(pat, rep, k)
    return k[1:]


def build_tiny_cosmos(out: Path, seed: int = 0) -> dict[str, str]:
    import torch
    from diffusers import AutoencoderKLCosmos, CosmosTransformer3DModel
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    transformer = CosmosTransformer3DModel(**TINY_TRANSFORMER)
    sd = {"net." + original_param(k): v.clone() for k, v in transformer.state_dict().items()}
    sd.update({"logvar.0.freqs": torch.randn(128), "logvar.0.phases": torch.rand(128),
               "logvar.1.weight": torch.randn(1, 128), "net.pos_embedder.seq": torch.arange(240, dtype=torch.float32)})
    torch.save(sd, out / TRANSFORMER_FILE)

    vae = AutoencoderKLCosmos(**TINY_VAE)
    n_up = len(vae.decoder.up_blocks)
    vsd = {}
    for k, v in vae.state_dict().items():
        orig = vae_to_original(k, n_up)
        assert vae_to_diffusers(orig, n_up) == k, (k, orig)   # the loader's renaming inverts this one
        vsd[orig] = v.clone().contiguous()
    vsd["latent_mean"] = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
    vsd["latent_std"] = torch.tensor(vae.config.latents_std, dtype=torch.float32)
    for part in ("encoder.patcher", "decoder.unpatcher"):   # buffers the original tokenizer saves
        vsd[f"{part}.wavelets"] = torch.tensor([0.7071067811865476, 0.7071067811865476])
        vsd[f"{part}._arange"] = torch.arange(2)
    save_file(vsd, str(out / VAE_FILE))

    tok, vocab = tiny_t5_tokenizer()
    te = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                 relative_attention_num_buckets=8, feed_forward_proj="relu", pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0))
    te_dir = out / TEXT_ENCODER_DIR
    te_dir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in te.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(te_dir / TEXT_ENCODER_FILE))
    tok.save_pretrained(str(te_dir))
    return {"transformerPath": str(out / TRANSFORMER_FILE), "vaePath": str(out / VAE_FILE), "textEncoderPath": str(te_dir)}
