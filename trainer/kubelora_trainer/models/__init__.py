"""Model families. One module per family implements `ModelFamily` (base.py); the registry maps
`spec.model.type` to it. Importing this package does not import torch."""
from __future__ import annotations

import importlib

# model.type -> module under kubelora_trainer.models (None: accepted by the spec, not trainable yet)
REGISTRY: dict[str, str | None] = {
    "flux": "flux",
    "sdxl": "sdxl",
    "ltx-video": "ltx_video",
    "hunyuan-video": "hunyuan_video",
    "cosmos": "cosmos",
}


class UnsupportedModel(ValueError):
    pass


def supported_types() -> list[str]:
    return [k for k, v in REGISTRY.items() if v]


def check_supported(model_type: str) -> None:
    if not REGISTRY.get(model_type):
        raise UnsupportedModel(
            f"model.type {model_type!r} is not yet supported by this kubelora version "
            f"(supported: {', '.join(supported_types())})")


def get_family(model_type: str):
    check_supported(model_type)
    return importlib.import_module(f"{__name__}.{REGISTRY[model_type]}").FAMILY
