"""adapter.initFrom: the LoRA file a run's adapters start from instead of zero (diffusion-pipe's
init_from_existing, kohya's network_weights).

read() finds and parses the file with the family's own format parsers (any format `kubelora
convert` reads for the model type), right after stage-in, before the dataset is cached; apply()
copies it into the injected peft layers before they are sharded. The update the file makes is
kept exactly: lora_B is rescaled from the file's scale to the run's adapter.alpha / rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .lora import AdapterError, adapted as targets, lora_layer

FIELD = "adapter.initFrom"


class InitError(AdapterError):
    """A file adapter.initFrom cannot start from: bad input (exits.BAD_INPUT), named with the fix."""


@dataclass
class InitLora:
    path: Path
    fmt: str
    lora: dict     # {component: {module: (A [r, in], B [out, r])}}
    scale: float   # the update is scale * B @ A


def locate(path: Path) -> Path:
    """The .safetensors file: path itself, or the only one directly in the folder path."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if len(found) != 1:
        what = "no .safetensors file" if not found else f"{len(found)} .safetensors files ({', '.join(p.name for p in found[:3])})"
        fix = "give one LoRA file, or a folder holding exactly one"
        if (path / "manifest.json").is_file():  # a kubelora run's output.uri: its files in several formats
            fix = "it is a run's output folder: give one of its LoRA files (e.g. .../lora.safetensors, the primary)"
        raise InitError(f"{FIELD}: {path} holds {what}; {fix}")
    return found[0]


def read(path: Path, model_type: str) -> InitLora:
    """The LoRA at path, parsed as model_type's: the first of the family's formats whose parser
    reads it. Refused: a file kubelora wrote for another model type, a file no parser reads."""
    from .families import RULES
    from .lora_files import LoraFileError, from_parsed, load_file
    from .models import get_family
    file = locate(path)
    try:
        tensors, meta = load_file(file, "initFrom")
    except Exception as e:  # noqa: BLE001 - a bad file is bad input, named with its field
        raise InitError(f"{FIELD}: {file} is not a readable .safetensors file: {e}") from None
    written_by = meta.get("kubelora.model_type")
    if written_by and written_by != model_type:
        raise InitError(f"{FIELD}: {file} is a {written_by} LoRA (its kubelora.model_type), not a {model_type} one")
    family, why = get_family(model_type), {}
    for fmt in RULES[model_type].formats:
        try:
            lora, scale, _ = from_parsed(family.parse(dict(tensors), fmt), meta, fmt)
        except (LoraFileError, ValueError, KeyError) as e:
            why[fmt] = str(e) or type(e).__name__
            continue
        if any(mods for mods in lora.values()):
            return InitLora(file, fmt, lora, float(scale))
        why[fmt] = "no LoRA modules"
    raise InitError(f"{FIELD}: {file} is not a {model_type} LoRA in any of its formats ("
                    + "; ".join(f"{f}: {w[:200]}" for f, w in why.items()) + ")")


@torch.no_grad()
def apply(init: InitLora, trainable: dict[str, nn.Module], rank: int, run_scale: float) -> tuple[int, int]:
    """Copy the file's LoRA into the injected layers of trainable's components (before sharding):
    A as it is, B times file scale / run_scale, so B A times the run's scale is the file's update.
    Returns (modules loaded, targets the file lacks, which keep their zero B). Raises InitError
    naming the fix: a rank other than adapter.rank, a module that is not a target, a component the
    run trains no LoRA on, a shape the model does not have."""
    loaded = 0
    for component, mods in init.lora.items():
        model = trainable.get(component)
        if model is None or not targets(model):
            fix = ("set training.textEncoderLearningRate above 0, or start from a file without one"
                   if component.startswith("text_encoder") else "start from a file without one")
            raise InitError(f"{FIELD}: {init.path.name} holds a LoRA for {component}, on which this run trains none: {fix}")
        unknown = sorted(m for m in mods if lora_layer(model, m) is None)
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            fix = ("a text encoder's LoRA targets are the family's own (adapter.targetModules applies to the "
                   "denoiser): start from a file without them" if component.startswith("text_encoder") else
                   "add them to adapter.targetModules (or start from another file)")
            raise InitError(f"{FIELD}: {len(unknown)} of its {len(mods)} {component} modules are not LoRA targets of this "
                            f"run: {', '.join(unknown[:3])}{more}; {fix}")
        ranks = sorted({a.shape[0] for a, _ in mods.values()})
        if ranks != [rank]:
            raise InitError(f"{FIELD}: {init.path.name} has rank {' and '.join(map(str, ranks))}; set adapter.rank to "
                            f"{ranks[0]} to start from it" + (" (it mixes ranks: not loadable)" if len(ranks) > 1 else ""))
        for m, (a, b) in mods.items():
            layer = lora_layer(model, m)
            wa, wb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if tuple(a.shape) != tuple(wa.shape) or tuple(b.shape) != tuple(wb.shape):
                raise InitError(f"{FIELD}: {component} module {m}: A {tuple(a.shape)}, B {tuple(b.shape)} in the file, "
                                f"{tuple(wa.shape)}, {tuple(wb.shape)} in the model: a LoRA of another model size?")
            wa.copy_(a.to(wa.dtype))
            wb.copy_((b.double() * (init.scale / run_scale)).to(wb.dtype))
            loaded += 1
    missing = sum(len(targets(model)) for c, model in trainable.items() if c not in init.lora) + sum(
        len([t for t in targets(trainable[c]) if t not in mods]) for c, mods in init.lora.items())
    return loaded, missing


def summary(init: InitLora, loaded: int, missing: int) -> str:
    """The log line of a LoRA started from a file."""
    line = f"[model] {FIELD}: started from {init.path.name} ({init.fmt} format, scale {init.scale:g}): {loaded} modules"
    if missing:
        line += f"; warning: {missing} LoRA targets are not in it and start from zero"
    return line
