"""Flux LoRA files in the three layouts users load:

- diffusers: `transformer.<diffusers module>.lora_A/B.weight`, alpha/rank folded into lora_B;
- kohya (sd-scripts / ComfyUI / diffusers' Kohya converter): `lora_unet_<BFL module with _>`
  `.lora_down.weight` / `.lora_up.weight` / `.alpha` (the real alpha, not folded);
- comfyui: `diffusion_model.<BFL module>.lora_A/B.weight`, scale folded.

The BFL layout fuses q/k/v (and the single blocks' MLP-in) into one linear: those LoRAs are
fused exactly (lora_fused) and split back exactly. The final modulation's shift/scale halves are
swapped in BFL (as the weights are). Pure tensor code.
"""
from __future__ import annotations

import re
import torch

from ...lora_fused import fuse, split
from ..base import refuse_unknown_modules
from .keys import DOUBLE, SINGLE, TOP, bfl_module, diffusers_parts

FINAL_MOD = "final_layer.adaLN_modulation.1"   # BFL's [scale; shift] vs diffusers' [shift; scale]
MLP_RATIO = 4                                   # Flux's single blocks: MLP-in is 4x the hidden width


def _swap_halves(b: torch.Tensor) -> torch.Tensor:
    first, second = b.chunk(2, dim=0)
    return torch.cat([second, first], 0)


def to_bfl(modules: dict, scale: float, fold: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{BFL module: (A, B)} from {diffusers module: (A, B)}; B times scale when fold."""
    plain, fused = {}, {}
    for module, (a, b) in modules.items():
        hit = bfl_module(module)
        if hit is None:
            raise ValueError(f"LoRA on {module} has no counterpart in the BFL layout that ComfyUI loads; drop it "
                             f"from adapter.targetModules or use the diffusers format")
        name, slot = hit
        b = b.float() * scale if fold else b.float()
        if slot is None:
            plain[name] = (a.float(), _swap_halves(b) if name == FINAL_MOD else b)
        else:
            fused.setdefault(name, {})[slot] = (a.float(), b)
    for name, parts in fused.items():
        hidden = next(iter(parts.values()))[0].shape[1]
        sizes = [hidden] * 3 + ([MLP_RATIO * hidden] if name.endswith("linear1") else [])
        plain[name] = fuse(parts, sizes)
    return dict(sorted(plain.items()))


def from_bfl(fused: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Inverse of to_bfl (without any scale): {diffusers module: (A, B)}."""
    out = {}
    for name, (a, b) in fused.items():
        parts = diffusers_parts(name)
        if parts is None:
            raise ValueError(f"{name}: not a linear of the Flux BFL layout")
        if parts[0][1] is None:
            out[parts[0][0]] = (a, _swap_halves(b) if name == FINAL_MOD else b)
            continue
        hidden = a.shape[1]
        sizes = [hidden] * 3 + ([b.shape[0] - 3 * hidden] if len(parts) == 4 else [])
        for slot, pair in split(a, b, sizes).items():
            out[parts[slot][0]] = pair
    return dict(sorted(out.items()))


def kohya_names() -> dict[str, str]:
    """`lora_unet_` stem -> BFL module name pattern pieces (block index kept as \\d+)."""
    names = {}
    for prefix, table in (("double_blocks", DOUBLE), ("single_blocks", SINGLE)):
        for b_suffix, _ in table.values():
            names[f"{prefix}_N_{b_suffix.replace('.', '_')}"] = f"{prefix}.N.{b_suffix}"
    for b_name in TOP.values():
        names[b_name.replace(".", "_")] = b_name
    return names


KOHYA = kohya_names()


def from_kohya_stem(stem: str) -> str:
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(.+)", stem)
    key = f"{m[1]}_N_{m[3]}" if m else stem
    if key not in KOHYA:
        raise ValueError(f"lora_unet_{stem}: not a linear of the Flux BFL layout")
    return KOHYA[key].replace(".N.", f".{m[2]}.") if m else KOHYA[key]


def export(modules: dict, scale: float, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "diffusers":
        return {**{f"transformer.{m}.lora_A.weight": a.contiguous() for m, (a, b) in modules.items()},
                **{f"transformer.{m}.lora_B.weight": (b.float() * scale).to(b.dtype).contiguous()
                   for m, (a, b) in modules.items()}}
    if fmt == "comfyui":
        out = {}
        for name, (a, b) in to_bfl(modules, scale, fold=True).items():
            out[f"diffusion_model.{name}.lora_A.weight"] = a
            out[f"diffusion_model.{name}.lora_B.weight"] = b
        return out
    if fmt == "kohya":
        out = {}
        for name, (a, b) in to_bfl(modules, scale, fold=False).items():
            stem = "lora_unet_" + name.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = a
            out[f"{stem}.lora_up.weight"] = b
            out[f"{stem}.alpha"] = torch.tensor(float(scale * a.shape[0]))
        return out
    raise ValueError(f"format {fmt!r} is not available for flux (available: diffusers, kohya, comfyui)")


def gaps(modules, fmt: str) -> list[str]:
    """What a loader does not apply from the file, as sentences naming the modules: diffusers'
    Kohya-Flux converter returns the top-level modules (embedders, final layer) without the
    transformer. prefix, so its loader drops them. Pure."""
    top = sorted(m for m in modules if m in TOP)
    if fmt != "kohya" or not top:
        return []
    return [f"diffusers skips these in the kohya file (its Kohya converter drops the top-level modules): "
            f"{', '.join(top)}; ComfyUI applies them; use the diffusers format for diffusers"]


EXAMPLES = {"diffusers": "transformer.<module>.lora_A.weight / lora_B.weight",
            "comfyui": "diffusion_model.<BFL module>.lora_A.weight / lora_B.weight",
            "kohya": "lora_unet_<BFL module>.lora_down.weight / lora_up.weight / alpha"}


def parse(tensors: dict[str, torch.Tensor], fmt: str) -> tuple[dict, float]:
    """Inverse of export: ({diffusers module: (A, B)}, scale still to apply)."""
    patterns = {"diffusers": r"transformer\.(.+)\.lora_([AB])\.weight",
                "comfyui": r"diffusion_model\.(.+)\.lora_([AB])\.weight",
                "kohya": r"lora_unet_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)"}
    if fmt not in patterns:
        raise ValueError(f"format {fmt!r} is not available for flux (available: diffusers, kohya, comfyui)")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(patterns[fmt], key)
        if not m:
            raise ValueError(f"unexpected key {key!r} (expected {EXAMPLES[fmt]})")
        part = {"lora_down.weight": "A", "lora_up.weight": "B"}.get(m[2], m[2])
        groups.setdefault(m[1], {})[part] = t
    for name, g in groups.items():
        if "A" not in g or "B" not in g:
            raise ValueError(f"lora_A/lora_B pair incomplete for {name}")
    if fmt == "diffusers":
        refuse_unknown_modules(groups, lambda m: bfl_module(m) is not None, "Flux")
        return {m: (g["A"], g["B"]) for m, g in sorted(groups.items())}, 1.0
    if fmt == "comfyui":
        return from_bfl({n: (g["A"].float(), g["B"].float()) for n, g in groups.items()}), 1.0
    scales = {n: float(g["alpha"]) / g["A"].shape[0] if "alpha" in g else 1.0 for n, g in groups.items()}
    scale = next(iter(scales.values()), 1.0)
    fused = {from_kohya_stem(n): (g["A"].float(), g["B"].float() * (scales[n] / scale)) for n, g in groups.items()}
    return from_bfl(fused), scale
