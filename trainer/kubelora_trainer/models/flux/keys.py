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


def from_bfl(state_dict: dict, hidden: int) -> dict:
    """Inverse of to_bfl: a BFL-layout Flux checkpoint as diffusers parameter names. hidden is
    num_attention_heads x attention_head_dim (the q, k, v width); the single blocks' MLP-in is
    what remains of linear1. Unknown keys raise KeyError naming them."""
    import torch

    inverse: dict[str, tuple[str, Optional[int]]] = {}
    for kind, table, prefix in (("double", DOUBLE, "transformer_blocks"), ("single", SINGLE, "single_transformer_blocks")):
        for d_suffix, (b_suffix, slot) in table.items():
            inverse.setdefault(f"{kind}:{b_suffix}", []).append((d_suffix, slot))
    top = {v: k for k, v in TOP.items()}
    out = {}
    for key, t in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "scale":
            leaf = "weight"
        m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", module)
        if m:
            kind, idx, b_suffix = m.groups()
            targets = inverse.get(f"{kind}:{b_suffix}")
            if not targets:
                raise KeyError(f"unexpected key {key}")
            prefix = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
            if len(targets) == 1 and targets[0][1] is None:
                out[f"{prefix}.{idx}.{targets[0][0]}.{leaf}"] = t
                continue
            sizes = [hidden, hidden, hidden] + ([t.shape[0] - 3 * hidden] if len(targets) == 4 else [])
            parts = torch.split(t, sizes, dim=0)
            for d_suffix, slot in targets:
                out[f"{prefix}.{idx}.{d_suffix}.{leaf}"] = parts[slot]
        elif module in top:
            if top[module] == "norm_out.linear":
                scale, shift = t.chunk(2, dim=0)
                t = torch.cat([shift, scale], dim=0)
            out[f"{top[module]}.{leaf}"] = t
        else:
            raise KeyError(f"unexpected key {key}")
    return out
