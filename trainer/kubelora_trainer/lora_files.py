"""Reading LoRA files for `kubelora convert`: a single .safetensors in one of a family's formats,
or kubelora's own peft checkpoint (checkpoints/step-N/<component>/adapter_model.safetensors with
adapter_config.json, unscaled weights and the real alpha).

A diffusers-format file written by diffusers' own save_lora_weights keeps its LoraConfig in the
`lora_adapter_metadata` JSON (per component prefix: r, lora_alpha, rank_pattern, alpha_pattern,
use_rslora), and diffusers applies it on load: its alpha/r goes into the scale here, as for the
peft checkpoint's adapter_config.json."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"   # diffusers.loaders.lora_base
PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA = 8, 8             # peft.LoraConfig's defaults


class LoraFileError(ValueError):
    pass


def load_file(path: Path, fmt: str) -> tuple[dict, dict[str, str]]:
    """A .safetensors LoRA file's (tensors, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file as load
    if not path.is_file():
        raise LoraFileError(f"no such file (for --from {fmt}, give the .safetensors file)")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    return load(str(path)), meta


def from_parsed(parsed: tuple[dict, float], meta: dict[str, str], fmt: str) -> tuple[dict, float, dict[str, str]]:
    """A family's parse of a file, with diffusers' lora_adapter_metadata applied to the scale:
    (LoraTensors, scale still to apply, file metadata)."""
    lora, scale = parsed
    raw = meta.get(LORA_ADAPTER_METADATA_KEY)
    if fmt == "diffusers" and raw:
        try:
            config = json.loads(raw)
        except ValueError as e:
            raise LoraFileError(f"metadata {LORA_ADAPTER_METADATA_KEY} is not JSON: {e}") from None
        lora, factor = fold_scales(lora, {c: config_scales(component_config(config, c), mods)
                                          for c, mods in lora.items()})
        scale *= factor
        meta["kubelora.scale_folded"] = "false"   # lora_B did not carry alpha/r; the scale now does
    return lora, scale, meta


def component_config(config: dict, component: str) -> dict | None:
    """One component's LoraConfig from lora_adapter_metadata ('transformer.r', 'unet.lora_alpha',
    ...), None when it has none (diffusers then loads it at scale 1 as well). Pure."""
    prefix = f"{component}."
    own = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    return own or None


def config_scales(cfg: dict | None, modules) -> dict[str, float]:
    """Each module's scale as peft's LoraConfig gives it: lora_alpha / r, or / sqrt(r) with
    use_rslora; rank_pattern and alpha_pattern keys are regexes matched at the end of the module
    name, the first that matches wins (peft.utils.other.get_pattern_key). Pure."""
    if cfg is None:
        return {m: 1.0 for m in modules}
    if cfg.get("use_dora"):
        raise LoraFileError("a DoRA adapter (use_dora in lora_adapter_metadata) has magnitude vectors no LoRA "
                            "format here carries; it cannot be converted")
    r0 = cfg.get("r") or PEFT_DEFAULT_R
    alpha0 = cfg.get("lora_alpha") or PEFT_DEFAULT_ALPHA
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def pick(patterns: dict, module: str, default):
        # SDXL's CLIP-L may be loaded without the text_model. wrapper that diffusers' names keep
        for name in (module, f"text_model.{module}"):
            for key, value in patterns.items():
                if re.match(rf"(.*\.)?({key})$", name):
                    return value
        return default

    out = {}
    for m in modules:
        r, alpha = pick(ranks, m, r0), pick(alphas, m, alpha0)
        out[m] = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))
    return out


def fold_scales(lora: dict, scales: dict[str, dict[str, float]]) -> tuple[dict, float]:
    """One scale for the whole LoRA: the most common of the per-module scales; a module with
    another gets the ratio folded into its lora_B. Pure."""
    counts = Counter(s for per in scales.values() for s in per.values())
    if not counts:
        return lora, 1.0
    common = counts.most_common(1)[0][0]
    out = {c: {m: (a, b if scales[c][m] == common else (b.float() * (scales[c][m] / common)).to(b.dtype))
               for m, (a, b) in mods.items()} for c, mods in lora.items()}
    return out, common


def read_peft(path: Path) -> tuple[dict, float, dict[str, str]]:
    """A checkpoint folder (one sub-folder per component) or one component's folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    folders = [path] if (path / "adapter_config.json").is_file() else sorted(
        p for p in path.iterdir() if (p / "adapter_config.json").is_file()) if path.is_dir() else []
    if not folders:
        raise LoraFileError("expected a kubelora checkpoint folder (checkpoints/step-N) or one of its component "
                            "folders, with adapter_config.json and adapter_model.safetensors")
    lora, scales, meta = {}, {}, {}
    for folder in folders:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        scales[folder.name] = float(cfg.get("lora_alpha") or cfg["r"]) / float(cfg["r"])
        weights = folder / "adapter_model.safetensors"
        with safe_open(str(weights), "pt") as f:
            meta = dict(f.metadata() or {}) or meta
        pairs: dict[str, list] = {}
        for key, t in load_file(str(weights)).items():
            m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
            if not m:
                raise LoraFileError(f"{weights}: unexpected key {key!r}")
            pairs.setdefault(m[1], [None, None])["AB".index(m[2])] = t
        lora[folder.name] = {k: (a, b) for k, (a, b) in sorted(pairs.items())}
    if len(set(scales.values())) > 1:
        raise LoraFileError(f"components trained with different alpha/rank: {scales}")
    return lora, next(iter(scales.values())), meta
