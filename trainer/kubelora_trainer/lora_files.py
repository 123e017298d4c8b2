"""Reading LoRA files for `kubelora convert`: a single .safetensors in one of a family's formats,
or kubelora's own peft checkpoint (checkpoints/step-N/<component>/adapter_model.safetensors with
adapter_config.json, unscaled weights and the real alpha)."""
from __future__ import annotations

import json
import re
from pathlib import Path


class LoraFileError(ValueError):
    pass


def read_lora(path: Path, family, fmt: str) -> tuple[dict, float, dict[str, str]]:
    """(LoraTensors, scale still to apply, file metadata)."""
    if fmt == "peft":
        return read_peft(path)
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not path.is_file():
        raise LoraFileError(f"no such file (for --from {fmt}, give the .safetensors file)")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    lora, scale = family.parse(load_file(str(path)), fmt)
    return lora, scale, meta


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
