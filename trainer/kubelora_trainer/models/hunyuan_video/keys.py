"""HunyuanVideo key layouts, pure functions on state dicts (no model, no I/O).

Two namings of one network:
  original   Tencent's HunyuanVideo modules, used by the official checkpoint, ComfyUI's single
             files and ComfyUI/diffusion-pipe LoRAs: ``double_blocks.0.img_attn_qkv`` (q, k, v
             fused), ``single_blocks.0.linear1`` (q, k, v and the MLP input fused), ...
  diffusers  HunyuanVideoTransformer3DModel: ``transformer_blocks.0.attn.to_q`` / ``to_k`` /
             ``to_v``, ``single_transformer_blocks.0.attn.to_q`` ... ``proj_mlp``, ...

Checkpoints are read with diffusers' own converter (``convert_hunyuan_video_transformer_to_diffusers``);
its one width-specific step, splitting ``single_blocks.N.linear1`` at a hard-coded 3072, is done
here first with the checkpoint's real width (the same split for the released model), so tiny
and full-size files go through one path. ``to_original`` is the inverse, for writing files.

LoRA: training runs on the diffusers modules, one (A, B) per linear. A fused original module
gets the exact equivalent single LoRA: the parts' A matrices stacked, their B matrices placed
block-diagonally (rank = sum of the parts' ranks: 3r for qkv, 4r for linear1):

    B_fused @ A_fused = [[B_q, 0, 0], [0, B_k, 0], [0, 0, B_v]] @ [A_q; A_k; A_v] = [B_q A_q; B_k A_k; B_v A_v]

which is exactly the fused weight's update. Diffusers' converter shares A between the parts and
splits B's rows, giving to_q the LoRA ([B_q, 0, 0], A_fused), whose product is again B_q A_q.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ...lora_fused import fuse, split

# ------------------------------------------------------------------ the name table
# (diffusers module, original module, fused parts in order or None); {i} is a block index and
# {part} one of the fused parts.
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_REF, _REF_O = "context_embedder.token_refiner.refiner_blocks.{i}", "txt_in.individual_token_refiner.blocks.{i}"
_RULES: list[tuple[str, str, Optional[tuple[str, ...]]]] = [
    # double-stream blocks
    ("transformer_blocks.{i}.{part}", "double_blocks.{i}.img_attn_qkv", _QKV),
    ("transformer_blocks.{i}.{part}", "double_blocks.{i}.txt_attn_qkv",
     ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn_proj", None),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn_proj", None),
    ("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img_attn_q_norm", None),
    ("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img_attn_k_norm", None),
    ("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt_attn_q_norm", None),
    ("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt_attn_k_norm", None),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.linear", None),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.linear", None),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.fc1", None),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.fc2", None),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.fc1", None),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.fc2", None),
    # single-stream blocks
    ("single_transformer_blocks.{i}.{part}", "single_blocks.{i}.linear1", _QKV + ("proj_mlp",)),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2", None),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.linear", None),
    ("single_transformer_blocks.{i}.attn.norm_q", "single_blocks.{i}.q_norm", None),
    ("single_transformer_blocks.{i}.attn.norm_k", "single_blocks.{i}.k_norm", None),
    # text token refiner
    (_REF + ".{part}", _REF_O + ".self_attn_qkv", _QKV),
    (_REF + ".attn.to_out.0", _REF_O + ".self_attn_proj", None),
    (_REF + ".ff.net.0.proj", _REF_O + ".mlp.fc1", None),
    (_REF + ".ff.net.2", _REF_O + ".mlp.fc2", None),
    (_REF + ".norm_out.linear", _REF_O + ".adaLN_modulation.1", None),
    (_REF + ".norm1", _REF_O + ".norm1", None),
    (_REF + ".norm2", _REF_O + ".norm2", None),
    ("context_embedder.proj_in", "txt_in.input_embedder", None),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0", None),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2", None),
    ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.linear_1", None),
    ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.linear_2", None),
    # embedders and the final layer
    ("x_embedder.proj", "img_in.proj", None),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.mlp.0", None),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.mlp.2", None),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.0", None),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.mlp.2", None),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", None),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", None),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", None),   # rows (scale, shift) <-> (shift, scale)
    ("proj_out", "final_layer.linear", None),
]


def _pattern(template: str, parts: Optional[tuple[str, ...]] = None) -> re.Pattern:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    if parts:
        rx = rx.replace(r"\{part\}", "(?P<part>" + "|".join(map(re.escape, parts)) + ")")
    return re.compile(rx)


_FORWARD = [(_pattern(d, parts), d, o, parts) for d, o, parts in _RULES]
_BACKWARD = [(_pattern(o), d, o, parts) for d, o, parts in _RULES]
SWAPPED_HALVES = "final_layer.adaLN_modulation.1"   # diffusers orders this output (scale, shift)
# Diffusers' LoRA converter chunks lora_A of the refiner's qkv into three: no fused LoRA there loads.
NOT_EXPORTABLE = re.compile(r"txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn_qkv")
# diffusers' HunyuanVideo loader takes a LoRA file for the original layout only when a key has
# img_attn_qkv in it (lora_state_dict's is_original_hunyuan_video)
DIFFUSERS_DETECTS = re.compile(r"double_blocks\.\d+\.img_attn_qkv")


@dataclass(frozen=True)
class Target:
    module: str                    # original module name
    part: int = 0                  # index of this diffusers module among the fused parts
    parts: tuple[str, ...] = ()    # diffusers module names of all parts (empty: not fused)


def original_target(module: str) -> Optional[Target]:
    """diffusers module path -> where it lives in the original layout (None: no counterpart)."""
    for rx, d, o, parts in _FORWARD:
        m = rx.fullmatch(module)
        if m:
            i = m.groupdict().get("i")
            if parts is None:
                return Target(o.format(i=i))
            return Target(o.format(i=i), parts.index(m.group("part")), tuple(d.format(i=i, part=p) for p in parts))
    return None


def diffusers_parts(module: str) -> Optional[list[str]]:
    """original module -> its diffusers module(s), in fused order (None: not a known module)."""
    for rx, d, o, parts in _BACKWARD:
        m = rx.fullmatch(module)
        if m:
            i = m.groupdict().get("i")
            return [d.format(i=i)] if parts is None else [d.format(i=i, part=p) for p in parts]
    return None


# ------------------------------------------------------------------ checkpoints

ORIGINAL_MARKERS = ("double_blocks.0.img_attn_qkv.weight",
                    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight")
DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.to_q.weight",
                     "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "module.")


def strip_prefix(sd: dict) -> dict:
    """Drop a wrapper prefix that every key shares (ComfyUI checkpoint saves, DeepSpeed)."""
    for p in PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def identify(keys) -> str:
    """'original', 'diffusers', or a guess at what else the file holds (for the error message)."""
    keys = set(keys)
    if all(k in keys for k in ORIGINAL_MARKERS):
        return "original"
    if all(k in keys for k in DIFFUSERS_MARKERS):
        return "diffusers"
    if "double_blocks.0.img_attn.qkv.weight" in keys and any(k.startswith("single_blocks.") for k in keys):
        return "a Flux transformer (BFL layout)" if "txt_in.weight" in keys else "a ComfyUI-internal Flux-style layout"
    if any(k.startswith(("input_blocks.", "model.diffusion_model.input_blocks.")) for k in keys):
        return "a UNet (SD/SDXL) checkpoint"
    if any(k.startswith("transformer_blocks.0.attn1.") for k in keys):
        return "a diffusers transformer of another family (LTX-Video/Cosmos-style attn1/attn2)"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unknown layout (first keys: {sample})"


def _count(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _first(sd: dict, *names: str) -> torch.Tensor:
    for n in names:
        if n in sd:
            return sd[n]
    raise KeyError(f"none of {', '.join(names)} in the file")


def infer_config(sd: dict, base: dict) -> dict:
    """The diffusers transformer config of an original-layout state dict: sizes and depths from
    the tensor shapes, the rest (RoPE, norms) from the shipped config `base`. Raises ValueError
    naming what does not fit."""
    w = sd["img_in.proj.weight"]                      # [hidden, in, pt, p, p]
    hidden, in_ch, pt, p = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    head_dim = _first(sd, "double_blocks.0.img_attn_q_norm.weight", "single_blocks.0.q_norm.weight").shape[0]
    mlp_width = _first(sd, "double_blocks.0.img_mlp.fc1.weight", "single_blocks.0.linear2.weight")
    mlp_width = mlp_width.shape[0] if mlp_width.shape[1] == hidden else mlp_width.shape[1] - hidden
    out_ch = sd["final_layer.linear.weight"].shape[0] // (pt * p * p)
    keys = list(sd)
    cfg = dict(base)
    cfg.update(
        in_channels=in_ch, out_channels=out_ch, num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
        num_layers=_count(keys, "double_blocks."), num_single_layers=_count(keys, "single_blocks."),
        num_refiner_layers=_count(keys, "txt_in.individual_token_refiner.blocks."),
        mlp_ratio=mlp_width / hidden,
        patch_size=p, patch_size_t=pt, guidance_embeds=any(k.startswith("guidance_in.") for k in keys),
        text_embed_dim=sd["txt_in.input_embedder.weight"].shape[1],
        pooled_projection_dim=sd["vector_in.in_layer.weight"].shape[1],
    )
    if in_ch != out_ch:
        raise ValueError(f"the transformer takes {in_ch} input and {out_ch} output channels: an image-to-video "
                         f"variant; only the text-to-video HunyuanVideo (16 in, 16 out) is supported")
    if sum(cfg["rope_axes_dim"]) != head_dim:
        raise ValueError(f"attention head size {head_dim} does not match the RoPE axes {cfg['rope_axes_dim']} "
                         f"(sum {sum(cfg['rope_axes_dim'])}) of HunyuanVideo")
    return cfg


def split_linear1(sd: dict) -> dict:
    """Split every single_blocks.N.linear1 (q, k, v, MLP-in fused) with the checkpoint's real
    width into diffusers-named parts that diffusers' converter passes through unchanged."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"single_blocks\.(\d+)\.linear1\.(weight|bias)", k)
        if not m:
            out[k] = v
            continue
        hidden = sd[f"single_blocks.{m.group(1)}.linear2.weight"].shape[0]
        q, kk, vv, mlp = torch.split(v, [hidden, hidden, hidden, v.shape[0] - 3 * hidden], dim=0)
        for name, t in (("attn.to_q", q), ("attn.to_k", kk), ("attn.to_v", vv), ("proj_mlp", mlp)):
            out[f"single_blocks.{m.group(1)}.{name}.{m.group(2)}"] = t
    return out


def original_to_diffusers(sd: dict) -> dict:
    """Original-layout transformer weights -> diffusers names (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers
    return convert_hunyuan_video_transformer_to_diffusers(split_linear1(dict(sd)))


def to_original(sd: dict) -> dict:
    """Diffusers-named transformer weights -> original layout (fused tensors concatenated,
    final modulation halves swapped): for writing files that look like the released ones."""
    out: dict[str, torch.Tensor] = {}
    for key in sd:
        module, param = key.rsplit(".", 1)
        tgt = original_target(module)
        if tgt is None:
            raise KeyError(f"no original name for {key}")
        name = f"{tgt.module}.{param}"
        if tgt.parts:
            if tgt.part == 0:
                out[name] = torch.cat([sd[f"{p}.{param}"] for p in tgt.parts], dim=0)
        elif tgt.module == SWAPPED_HALVES:
            a, b = sd[key].chunk(2, dim=0)
            out[name] = torch.cat([b, a], dim=0)
        else:
            out[name] = sd[key]
    return out


# ------------------------------------------------------------------ LoRA files

LoraModules = dict[str, tuple[torch.Tensor, torch.Tensor]]   # {diffusers module: (A, B)}


COMFY_SKIPS = re.compile(r"(time_in|guidance_in|txt_in\.t_embedder)\.mlp\.\d+|txt_in\.c_embedder\.linear_\d+")


def original_gaps(modules) -> list[str]:
    """What the original-layout file cannot carry for a loader, as sentences naming the modules:
    modules not written at all, and modules ComfyUI skips ("lora key not loaded")."""
    dropped, comfy, written = [], [], set()
    for module in sorted(modules):
        tgt = original_target(module)
        if tgt is None or NOT_EXPORTABLE.fullmatch(tgt.module):
            dropped.append(module)
            continue
        written.add(tgt.module)
        if COMFY_SKIPS.fullmatch(tgt.module):
            comfy.append(module)
    out = []
    if dropped:
        out.append(f"not written to the original-layout file (no fused LoRA there loads in diffusers): "
                   f"{', '.join(dropped)}; the diffusers format carries them")
    if comfy:
        out.append(f"ComfyUI skips these in the original-layout file (it names the embedder MLPs "
                   f"in_layer/out_layer): {', '.join(comfy)}; diffusers applies them")
    if written and not any(DIFFUSERS_DETECTS.fullmatch(m) for m in written):
        out.append("diffusers loads nothing from this original-layout file: it reads a file in this layout only "
                   "when a double_blocks.N.img_attn_qkv LoRA is in it (transformer_blocks.N.attn.to_q/to_k/to_v "
                   "trained); ComfyUI applies it, and the diffusers format carries it for diffusers")
    return out


def lora_to_original(lora: LoraModules, scale: float) -> dict[str, torch.Tensor]:
    """{diffusers module: (A, B)} -> ``transformer.<original module>.lora_A/B.weight`` with the
    alpha/rank scale folded into B; fused modules as stacked A / block-diagonal B (exact)."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[Target, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for module, (a, b) in lora.items():
        tgt = original_target(module)
        if tgt is None:
            raise ValueError(f"LoRA on {module}: not a module of the HunyuanVideo transformer (no original-layout "
                             f"name); is this a LoRA of another model type?")
        if NOT_EXPORTABLE.fullmatch(tgt.module):
            continue  # not written; original_gaps() names it at export time
        b = b.float() * scale
        if tgt.parts:
            groups.setdefault(tgt.module, (tgt, {}))[1][tgt.part] = (a.float(), b)
            continue
        if tgt.module == SWAPPED_HALVES:
            # diffusers' converter swaps the halves of lora_A's rank rows as well as lora_B's output
            # rows; A = [A; A], B = [B/2, B/2] is the same update and is invariant to the former.
            a, b = torch.cat([a.float(), a.float()], 0), torch.cat([b / 2, b / 2], 1)
            top, bottom = b.chunk(2, dim=0)
            b = torch.cat([bottom, top], 0)
        out[f"transformer.{tgt.module}.lora_A.weight"] = a.float().contiguous()
        out[f"transformer.{tgt.module}.lora_B.weight"] = b.contiguous()
    for name, (tgt, parts) in groups.items():
        a, b = fuse(parts, _part_sizes(name, tgt, parts))
        out[f"transformer.{name}.lora_A.weight"] = a
        out[f"transformer.{name}.lora_B.weight"] = b
    return dict(sorted(out.items()))


def _part_sizes(name: str, tgt: Target, parts: dict) -> list[int]:
    """Output rows of each part of a fused module, some parts possibly untrained: q, k and v
    are as wide as the module's input; the single blocks' MLP part must be trained to be known."""
    hidden = next(iter(parts.values()))[0].shape[1]
    sizes = [parts[i][1].shape[0] if i in parts else (hidden if i < 3 else None) for i in range(len(tgt.parts))]
    if None in sizes:
        raise ValueError(f"LoRA on {name}: {', '.join(tgt.parts[:3])} are trained but not {tgt.parts[3]}; train it too "
                         f"(it shares the fused linear) or use output.formats: [diffusers]")
    return sizes


def _split_sizes(a: torch.Tensor, b: torch.Tensor, n_parts: int) -> list[int]:
    """Output rows of each part of a fused LoRA read from a file."""
    if n_parts == 3:
        return [b.shape[0] // 3] * 3
    hidden = a.shape[1]              # linear1 reads the hidden state
    return [hidden, hidden, hidden, b.shape[0] - 3 * hidden]


def lora_from_original(tensors: dict[str, torch.Tensor]) -> LoraModules:
    """Inverse of lora_to_original (scale already folded: the result has scale 1). A fused
    LoRA whose B is block-diagonal in equal rank blocks comes back at the original rank; any
    other fused LoRA comes back exactly with the shared A."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(?:transformer\.|diffusion_model\.)?(.+)\.lora_([AB])\.weight", k)
        if not m:
            raise ValueError(f"{k}: not a LoRA key of the original HunyuanVideo layout (expected "
                             f"transformer.<module>.lora_A.weight / lora_B.weight)")
        mods.setdefault(m.group(1), {})[m.group(2)] = v
    out: LoraModules = {}
    for name, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{name}: needs both lora_A and lora_B")
        a, b = ab["A"].float(), ab["B"].float()
        parts = diffusers_parts(name)
        if parts is None:
            raise ValueError(f"{name}: not a module of the original HunyuanVideo transformer")
        if len(parts) == 1:
            if name.endswith(SWAPPED_HALVES):
                top, bottom = b.chunk(2, dim=0)
                b = torch.cat([bottom, top], 0)
                r = a.shape[0] // 2
                if r and torch.equal(a[:r], a[r:]):
                    a, b = a[:r], b[:, :r] + b[:, r:]
            out[parts[0]] = (a, b)
            continue
        for slot, pair in split(a, b, _split_sizes(a, b, len(parts))).items():
            out[parts[slot]] = pair
    return dict(sorted(out.items()))
