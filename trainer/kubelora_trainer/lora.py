"""LoRA with peft on any family's transformer: inject, gather under FSDP2, save a checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class AdapterError(ValueError):
    pass


def peft_targets(entries: list[str]):
    """adapter.targetModules as peft's target_modules: the list itself when every entry is a module
    name suffix; else one regular expression (peft full-matches a string against each module name)
    of the pattern entries as given and the suffixes as (anything.)suffix. Pure."""
    import re

    from .spec import is_pattern
    if not any(is_pattern(e) for e in entries):
        return list(entries)
    return "|".join(f"(?:{e})" if is_pattern(e) else rf"(?:.*\.)?{re.escape(e)}" for e in entries)


def unmatched(entries: list[str], adapted: list[str]) -> list[tuple[int, str]]:
    """The adapter.targetModules entries that adapted none of the modules named in adapted, as
    (index, entry): peft drops them without a word as long as another entry matches. A suffix
    matches a module of that name or ending in '.' + it, a pattern the whole name (peft's rules).
    Pure."""
    import re

    from .spec import is_pattern
    out = []
    for i, e in enumerate(entries):
        if is_pattern(e):
            hit = any(re.fullmatch(f"(?:{e})", n) for n in adapted)
        else:
            hit = any(n == e or n.endswith("." + e) for n in adapted)
        if not hit:
            out.append((i, e))
    return out


def lora_config(adapter_spec, targets):
    from peft import LoraConfig
    return LoraConfig(r=adapter_spec.rank, lora_alpha=adapter_spec.alpha or adapter_spec.rank,
                      lora_dropout=adapter_spec.dropout, target_modules=targets, init_lora_weights=True)


def inject(model: nn.Module, cfg, seed: int) -> int:
    """Freeze the base, add the LoRA layers (fp32, same init on every rank); returns trainable count."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(cfg, model, adapter_name="default")
    except ValueError as e:
        raise AdapterError(f"adapter.targetModules: {e}") from None
    n = 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            n += p.numel()
    if n == 0:
        raise AdapterError("adapter.targetModules matched no linear layer of the model")
    return n


def lora_layer(model: nn.Module, module: str):
    """The peft LoRA layer at a module path of model, or None."""
    try:
        sub = model.get_submodule(module)
    except AttributeError:
        return None
    a = getattr(sub, "lora_A", None)
    return sub if isinstance(a, nn.ModuleDict) and "default" in a else None


def adapted(model: nn.Module) -> list[str]:
    """The module paths of model's LoRA layers."""
    return sorted(n for n, m in model.named_modules() if lora_layer(m, "") is not None)


def narrowest(modules) -> tuple[str, int] | None:
    """(name, min(in, out)) of the adapted layer with the fewest dimensions, over all modules."""
    best = None
    for module in modules:
        for name, sub in module.named_modules():
            a = getattr(sub, "lora_A", None)
            if isinstance(a, nn.ModuleDict) and "default" in a:
                width = min(sub.in_features, sub.out_features) if hasattr(sub, "in_features") else None
                if width is not None and (best is None or width < best[1]):
                    best = (name, width)
    return best


def rank_seed(seed: int, rank: int) -> int:
    """The global RNG seed for a rank's LoRA dropout masks once the adapters exist."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2**63


def gather(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full LoRA tensors on CPU, keyed by module path: {module: (lora_A, lora_B)}. A collective
    under FSDP2: every rank must call it."""
    a, b = {}, {}
    for name, p in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        module = name.split(".lora_")[0].replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        (a if ".lora_A." in name else b)[module] = full.detach().cpu().float()
    return {m: (a[m], b[m]) for m in sorted(a)}


def save_checkpoint(lora: dict, cfg, folder: Path, metadata: dict[str, str]) -> list[Path]:
    """One component's peft-style adapter (unscaled weights + adapter_config.json with the real alpha)."""
    from . import safetensors_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {}
    for m, (wa, wb) in lora.items():
        sd[f"{m}.lora_A.weight"] = wa.contiguous()
        sd[f"{m}.lora_B.weight"] = wb.contiguous()
    safetensors_file.save(sd, str(folder / "adapter_model.safetensors"), metadata=metadata)
    d = cfg.to_dict()
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
    (folder / "adapter_config.json").write_text(json.dumps(d, indent=1, default=str))
    return [folder / "adapter_model.safetensors", folder / "adapter_config.json"]
