"""The pieces `kubelora import-config` handles keys with: the context a handler writes into, the
Refused error, and small handler makers (mapped to a field, noted, refused, default-only). Shared
by the common tables (import_rules.py) and each family's importer (models/<family>/importer.py).
Pure: no I/O."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def label(section: str) -> str:
    """How a section is written before a key in messages: '', '[model] ', 'dataset ', '[[directory]] '."""
    return {"": "", "dataset": "dataset ", "directory": "[[directory]] "}.get(section, f"[{section}] ")


class Refused(ValueError):
    """A key kubelora cannot honour; `section`/`key` say where, the message what to do."""

    def __init__(self, section: str, key: str, message: str):
        super().__init__(message)
        self.section, self.key = section, key


@dataclass
class Ctx:
    model_type: str
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    section: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # values other handlers read (lr, epochs, ...)

    def note(self, key: str, text: str) -> None:
        self.notes.append(f"{label(self.section)}{key}: {text}")

    def refuse(self, key: str, text: str):
        raise Refused(self.section, key, text)


Handler = Callable[[Ctx, str, Any], None]


# ---------------------------------------------------------------- handler makers

def to(section: str, name: str, convert: Callable[[Any], Any] = lambda v: v) -> Handler:
    def h(ctx: Ctx, key: str, value: Any) -> None:
        getattr(ctx, section)[name] = convert(value)
    return h


def noted(text: str) -> Handler:
    return lambda ctx, key, value: ctx.note(key, text)


def refused(text: str) -> Handler:
    def h(ctx: Ctx, key: str, value: Any) -> None:
        ctx.refuse(key, text)
    return h


def when(default: Any, then: Handler, text: str) -> Handler:
    """No effect at diffusion-pipe's default value (mapped as such); refused otherwise."""
    def h(ctx: Ctx, key: str, value: Any) -> None:
        if value != default:
            ctx.refuse(key, text)
        then(ctx, key, value)
    return h


def keep(ctx: Ctx, key: str, value: Any) -> None:
    """Read by another handler (ctx.extra), or a section handled separately."""
    ctx.extra[key] = value


def nothing(ctx: Ctx, key: str, value: Any) -> None:
    """Mapped to kubelora's behaviour at this value: nothing to write."""


def path(name: str) -> Handler:
    def h(ctx: Ctx, key: str, value: Any) -> None:
        ctx.model[name] = ctx.extra["map_path"](str(value))
    return h


# ---------------------------------------------------------------- keys several families share

def timestep_method(ctx: Ctx, key: str, value: Any) -> None:
    if value not in ("logit_normal", "uniform"):
        ctx.refuse(key, f"{value!r}: use logit_normal or uniform")
    ctx.training["timestepSampling"] = value


SIGMOID_SCALE = when(1.0, nothing, "scaled logit-normal timesteps are not supported; remove the key (scale 1)")
SHIFT = refused("a constant timestep shift is not supported yet (flux: use flux_shift = true for the "
                "resolution-dependent shift); remove the key")
