"""Cosmos 1.0 names and configs as pure functions over key names and tensor shapes (no torch).

Three layouts meet here:
  * the original NVIDIA layout of the diffusion transformer (``net.blocks.block0.blocks.0.block.attn.to_q.0``),
    which ComfyUI keeps (its GeneralDIT has the same module tree, so ComfyUI LoRA keys are
    ``diffusion_model.<original module>``). diffusers' ``convert_cosmos_transformer_checkpoint_to_diffusers``
    holds the renaming, but in diffusers 0.42.1 it empties the checkpoint before testing it for a
    Cosmos 1.0 key and so always applies its Cosmos 2.0 table; ``diffusers_param`` /
    ``original_module`` are the same renaming as a table both ways, and the tests assert that they
    agree key for key with diffusers' function (given a dict that keeps its keys, so its 1.0 branch runs);
  * the original tokenizer (VAE) layout of Cosmos-1.0-Tokenizer-CV8x8x8 / ComfyUI's
    ``cosmos_cv8x8x8_1.0.safetensors``; diffusers has no loader for it (only its conversion script
    renames the .jit weights), so ``vae_to_diffusers`` implements that renaming;
  * the T5 encoder in transformers' layout (ComfyUI's ``oldt5_xxl_*.safetensors``).
The ``*_config`` functions derive a diffusers/transformers config from the shapes of a checkpoint,
so a file of any width loads (the shipped configs under configs/ supply what shapes do not
tell, and are themselves checked against this derivation in the tests).
"""
from __future__ import annotations

import re

# ----------------------------------------------------------------------------- transformer

# diffusers module inside transformer_blocks.{i}  ->  original module inside blocks.block{i}
_BLOCK = {
    "norm1.linear_1": "blocks.0.adaLN_modulation.1",
    "norm1.linear_2": "blocks.0.adaLN_modulation.2",
    "norm2.linear_1": "blocks.1.adaLN_modulation.1",
    "norm2.linear_2": "blocks.1.adaLN_modulation.2",
    "norm3.linear_1": "blocks.2.adaLN_modulation.1",
    "norm3.linear_2": "blocks.2.adaLN_modulation.2",
    "ff.net.0.proj": "blocks.2.block.layer1",
    "ff.net.2": "blocks.2.block.layer2",
}
for _attn, _sub in (("attn1", "blocks.0"), ("attn2", "blocks.1")):   # FA (self) then CA (cross)
    _BLOCK.update({
        f"{_attn}.to_q": f"{_sub}.block.attn.to_q.0", f"{_attn}.norm_q": f"{_sub}.block.attn.to_q.1",
        f"{_attn}.to_k": f"{_sub}.block.attn.to_k.0", f"{_attn}.norm_k": f"{_sub}.block.attn.to_k.1",
        f"{_attn}.to_v": f"{_sub}.block.attn.to_v.0", f"{_attn}.to_out.0": f"{_sub}.block.attn.to_out.0",
    })

# diffusers module outside the blocks  ->  original module
_TOP = {
    "patch_embed.proj": "x_embedder.proj.1",
    "learnable_pos_embed": "extra_pos_embedder",
    "time_embed.t_embedder.linear_1": "t_embedder.1.linear_1",
    "time_embed.t_embedder.linear_2": "t_embedder.1.linear_2",
    "time_embed.norm": "affline_norm",
    "norm_out.linear_1": "final_layer.adaLN_modulation.1",
    "norm_out.linear_2": "final_layer.adaLN_modulation.2",
    "proj_out": "final_layer.linear",
}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}

# A Cosmos 1.0 DiT (text2world / video2world) has these; Cosmos-Predict2 has blocks.0.self_attn.
COSMOS1_MARKERS = ("blocks.block0.blocks.0.block.attn.to_q.0.weight", "x_embedder.proj.1.weight")
COSMOS2_MARKER = "blocks.0.self_attn.q_proj.weight"
# Buffers of the original checkpoint that diffusers' model does not hold.
ORIGINAL_EXTRA = ("logvar.", "pos_embedder.seq")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "net.", "")


class UnknownModule(ValueError):
    pass


def original_module(name: str) -> str:
    """diffusers module path of CosmosTransformer3DModel -> original (NVIDIA/ComfyUI) module path."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if m and m[2] in _BLOCK:
        return f"blocks.block{m[1]}.{_BLOCK[m[2]]}"
    if name in _TOP:
        return _TOP[name]
    raise UnknownModule(f"{name!r} has no Cosmos 1.0 original module name (known: attention, MLP, adaLN and "
                    f"embedding linears of CosmosTransformer3DModel)")


def diffusers_module(name: str) -> str:
    """Inverse of original_module."""
    m = re.fullmatch(r"blocks\.block(\d+)\.(.+)", name)
    if m and m[2] in _BLOCK_INV:
        return f"transformer_blocks.{m[1]}.{_BLOCK_INV[m[2]]}"
    if name in _TOP_INV:
        return _TOP_INV[name]
    raise UnknownModule(f"{name!r} is not a module of the Cosmos 1.0 diffusion transformer")


def original_param(name: str) -> str:
    """A diffusers parameter name (module + leaf) in the original layout, without the 'net.' prefix."""
    module, leaf = name.rsplit(".", 1)
    return f"{original_module(module)}.{leaf}"


def diffusers_param(name: str):
    """An original parameter name (without 'net.') in diffusers' names; None for the buffers of the
    original checkpoint that diffusers' model does not hold (logvar, pos_embedder.seq, _extra_state)."""
    if name.startswith(ORIGINAL_EXTRA) or name.endswith("._extra_state"):
        return None
    module, leaf = name.rsplit(".", 1)
    return f"{diffusers_module(module)}.{leaf}"


def strip_prefix(keys) -> str:
    """The prefix under which a checkpoint stores the DiT ('net.' for NVIDIA's model.pt), or None."""
    keys = set(keys)
    for p in PREFIXES:
        if all(p + k in keys for k in COSMOS1_MARKERS):
            return p
    return None


def is_cosmos2(keys) -> bool:
    return any(k.endswith(COSMOS2_MARKER) for k in keys)


def transformer_config(shapes: dict[str, tuple], base: dict) -> dict:
    """CosmosTransformer3DModel config from the shapes of a checkpoint already in diffusers names.
    `base` supplies what shapes do not tell (rope_scale, patch size); patch size (1, 2, 2) and the
    concatenated padding mask are those of every Cosmos 1.0 DiT."""
    hidden, patch_in = shapes["patch_embed.proj.weight"]
    pt, ph, pw = base["patch_size"]
    head_dim = shapes["transformer_blocks.0.attn1.norm_q.weight"][0]
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
    cfg = dict(base)
    cfg.update(
        in_channels=patch_in // (pt * ph * pw) - (1 if base.get("concat_padding_mask", True) else 0),
        out_channels=shapes["proj_out.weight"][0] // (pt * ph * pw),
        num_attention_heads=hidden // head_dim,
        attention_head_dim=head_dim,
        num_layers=layers,
        mlp_ratio=shapes["transformer_blocks.0.ff.net.0.proj.weight"][0] / hidden,
        text_embed_dim=shapes["transformer_blocks.0.attn2.to_k.weight"][1],
        adaln_lora_dim=shapes["transformer_blocks.0.norm1.linear_1.weight"][0],
    )
    if "learnable_pos_embed.pos_emb_t" in shapes:
        cfg["extra_pos_embed_type"] = "learnable"
        cfg["max_size"] = [shapes["learnable_pos_embed.pos_emb_t"][0] * pt, shapes["learnable_pos_embed.pos_emb_h"][0] * ph,
                           shapes["learnable_pos_embed.pos_emb_w"][0] * pw]
    else:
        cfg["extra_pos_embed_type"] = None
    return cfg


# ----------------------------------------------------------------------------- VAE (tokenizer)

VAE_DROP = ("wavelets", "_arange", "patch_size_buffer")     # buffers diffusers rebuilds itself
VAE_MARKERS = ("encoder.conv_in.0.conv3d.weight", "decoder.conv_out.0.conv3d.weight", "quant_conv.conv3d.weight")

# (pattern, replacement) applied in order to ".<original key>"
_VAE_RULES = (
    (r"\.down\.(\d+)\.", r".down_blocks.\1."),
    (r"\.block\.(\d+)\.", r".resnets.\1."),
    (r"\.downsample\.", ".downsamplers.0."),
    (r"\.upsample\.", ".upsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.0\.", ".mid_block.attentions.0."),
    (r"\.mid\.attn_1\.1\.", ".mid_block.temp_attentions.0."),
    (r"\.(q|k|v)\.conv3d\.", r".to_\1."),
    (r"\.proj_out\.conv3d\.", ".to_out.0."),
    (r"\.0\.conv3d\.", ".conv_s."),           # factorized causal conv: spatial (1x3x3) then temporal (3x1x1)
    (r"\.1\.conv3d\.", ".conv_t."),
    (r"\.nin_shortcut\.conv3d\.", ".conv_shortcut."),
    (r"\.conv3d\.", "."),                     # plain causal convs (resamplers, quant_conv, post_quant_conv)
)


def vae_to_diffusers(key: str, n_up: int) -> str:
    """Original tokenizer key -> AutoencoderKLCosmos key. The decoder's levels are stored in the
    opposite order (original up.0 is the last diffusers up block); n_up = number of levels."""
    k = "." + key
    k = re.sub(r"\.up\.(\d+)\.", lambda m: f".up_blocks.{n_up - 1 - int(m[1])}.", k)
    for pat, rep in _VAE_RULES:
        k = re.sub(pat, rep, k)
    return k[1:]


def vae_config(shapes: dict[str, tuple], base: dict) -> dict:
    """AutoencoderKLCosmos config (channels, depth) from the shapes of a checkpoint in diffusers names."""
    def out(k):
        return shapes[k][0]
    n_down = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks."))
    n_up = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.up_blocks."))
    enc = [out("encoder.conv_in.conv_s.weight")] + [out(f"encoder.down_blocks.{i}.resnets.0.conv1.conv_s.weight")
                                                     for i in range(n_down)]
    dec = [out("decoder.conv_in.conv_s.weight")] + [out(f"decoder.up_blocks.{i}.resnets.0.conv1.conv_s.weight")
                                                     for i in range(n_up)]
    layers = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
    cfg = dict(base)
    cfg.update(latent_channels=out("quant_conv.weight"), encoder_block_out_channels=enc,
               decode_block_out_channels=list(reversed(dec)), num_layers=layers)
    return cfg


# ----------------------------------------------------------------------------- T5 encoder

T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
T5_PREFIXES = ("", "transformer.", "t5xxl.transformer.", "text_encoders.t5xxl.transformer.")


def t5_prefix(keys) -> str:
    keys = set(keys)
    return next((p for p in T5_PREFIXES if p + T5_MARKER in keys), None)


def t5_config(shapes: dict[str, tuple], base: dict) -> dict:
    """T5EncoderModel config from the shapes of a transformers-layout T5 encoder state dict."""
    emb = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = "wi_0" if gated else "wi"
    cfg = dict(base)
    cfg.update(
        vocab_size=emb[0], d_model=emb[1], num_heads=heads, d_kv=inner // heads,
        d_ff=shapes[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"][0],
        num_layers=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")),
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return cfg
