"""Flux: diffusers parameter names <-> the original BFL checkpoint names (the layout of
flux1-dev.safetensors and of ComfyUI's Flux model). Pure tables.

The same rules decide which LoRA keys ComfyUI applies: for a Diffusers-format Flux LoRA it maps
`transformer.<diffusers module>` onto the BFL module this table names (q/k/v and the single
blocks' MLP-in land in row ranges of one fused BFL weight).
"""
from __future__ import annotations

import re
from typing import Optional

# per double block: diffusers suffix -> (BFL suffix, fused slot index or None)
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "attn.norm_q": ("img_attn.norm.query_norm", None), "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None), "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
}
# per single block; slot 3 of linear1 is the MLP-in, 4x as wide as q, k or v
SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
    "attn.norm_q": ("norm.query_norm", None), "attn.norm_k": ("norm.key_norm", None),
}
TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def bfl_module(diffusers_module: str) -> Optional[tuple[str, Optional[int]]]:
    """(BFL module, fused slot or None) for a diffusers module path; None if unmapped."""
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", diffusers_module)
    if m:
        table, prefix = (DOUBLE, "double_blocks") if m.group(1) == "transformer_blocks" else (SINGLE, "single_blocks")
        hit = table.get(m.group(3))
        return (f"{prefix}.{m.group(2)}.{hit[0]}", hit[1]) if hit else None
    return (TOP[diffusers_module], None) if diffusers_module in TOP else None


def to_bfl(state_dict: dict) -> dict:
    """A diffusers Flux transformer state dict in the BFL layout (fused q/k/v[/mlp] weights;
    RMSNorm `.weight` -> `.scale`; the final modulation's shift/scale halves swapped)."""
    import torch

    out, fused = {}, {}
    for key, t in state_dict.items():
        module, _, leaf = key.rpartition(".")
        hit = bfl_module(module)
        if hit is None:
            raise KeyError(f"no BFL name for {key}")
        name, slot = hit
        if "norm" in name and name.endswith(("query_norm", "key_norm")):
            leaf = "scale"
        if module == "norm_out.linear":
            shift, scale = t.chunk(2, dim=0)
            t = torch.cat([scale, shift], dim=0)
        if slot is None:
            out[f"{name}.{leaf}"] = t
        else:
            fused.setdefault(f"{name}.{leaf}", {})[slot] = t
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


def diffusers_parts(bfl: str) -> Optional[list[tuple[str, Optional[int]]]]:
    """The diffusers module(s) a BFL module holds, with their fused slot (None when not fused);
    None for a name that is not a BFL module."""
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", bfl)
    if m:
        table, prefix = (DOUBLE, "transformer_blocks") if m[1] == "double" else (SINGLE, "single_transformer_blocks")
        parts = [(f"{prefix}.{m[2]}.{d}", slot) for d, (b, slot) in table.items() if b == m[3]]
        return sorted(parts, key=lambda p: p[1] or 0) or None
    top = [d for d, b in TOP.items() if b == bfl]
    return [(top[0], None)] if top else None


def from_bfl(state_dict: dict, hidden: int) -> dict:
    """Inverse of to_bfl: a BFL-layout Flux checkpoint as diffusers parameter names. hidden is
    num_attention_heads x attention_head_dim (the q, k, v width); the single blocks' MLP-in is
    what remains of linear1. Unknown keys raise KeyError naming them."""
    import torch

    out = {}
    for key, t in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "scale":
            leaf = "weight"
        parts = diffusers_parts(module)
        if parts is None:
            raise KeyError(f"unexpected key {key}")
        if parts[0][1] is None:
            if parts[0][0] == "norm_out.linear":
                scale, shift = t.chunk(2, dim=0)
                t = torch.cat([shift, scale], dim=0)
            out[f"{parts[0][0]}.{leaf}"] = t
            continue
        sizes = [hidden, hidden, hidden] + ([t.shape[0] - 3 * hidden] if len(parts) == 4 else [])
        for (name, _), piece in zip(parts, torch.split(t, sizes, dim=0)):
            out[f"{name}.{leaf}"] = piece
    return out
