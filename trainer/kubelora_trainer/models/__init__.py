"""Model families, one package each (models/<family>/: __init__.py with its torch-free RULES,
family.py with the `ModelFamily` implementation, keys.py, tiny.py, configs/). FAMILIES is the
whole registry: adding a family is a new folder plus one line here. Importing this package, or a
family's package, does not import torch; `get_family` imports the family module on first use.
"""
from __future__ import annotations

import importlib

# model.type -> package under kubelora_trainer.models
FAMILIES: dict[str, str] = {
    "flux": "flux",
    "sdxl": "sdxl",
    "ltx-video": "ltx_video",
    "hunyuan-video": "hunyuan_video",
    "cosmos": "cosmos",
}


class UnsupportedModel(ValueError):
    pass


def supported_types() -> list[str]:
    return list(FAMILIES)


def check_supported(model_type: str) -> None:
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model.type {model_type!r} is not yet supported by this kubelora version "
            f"(supported: {', '.join(supported_types())})")


def get_family(model_type: str):
    check_supported(model_type)
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}.family").FAMILY
