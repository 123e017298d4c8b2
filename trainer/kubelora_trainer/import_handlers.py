"""The pieces `kubelora import-config` handles keys with: the context a handler writes into, the
Refused error, and small handler makers (mapped to a field, noted, refused, default-only). Shared
by the common tables (import_rules.py) and each family's importer (models/<family>/importer.py).
Pure: no I/O."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


def label(section: str) -> str:
    """How a section is written before a key in messages: '', '[model] ', 'dataset ', '[[directory]] '."""
    return {"": "", "dataset": "dataset ", "directory": "[[directory]] "}.get(section, f"[{section}] ")


class Refused(ValueError):
    """A key kubelora cannot honour; `section`/`key` (and `index`, which [[directory]]) say where,
    the message what to do."""

    def __init__(self, section: str, key: str, message: str, index: Optional[int] = None):
        super().__init__(message)
        self.section, self.key, self.index = section, key, index


class BadValue(TypeError):
    """A value of the wrong type or shape; the message says what is expected (import_rules.apply
    turns it into a Refused naming the key)."""


@dataclass
class Ctx:
    model_type: str
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)  # besides output.uri
    notes: list[str] = field(default_factory=list)
    section: str = ""
    directory: Optional[int] = None  # which [[directory]] is being read (0-based), for error lines
    extra: dict[str, Any] = field(default_factory=dict)  # values other handlers read (lr, epochs, ...)
    # dataset field -> (section, directory, key) of the TOML key that set it (import_rules.apply)
    origin: dict[str, tuple[str, Optional[int], str]] = field(default_factory=dict)

    def note(self, key: str, text: str) -> None:
        self.notes.append(f"{label(self.section)}{key}: {text}")

    def refuse(self, key: str, text: str):
        raise Refused(self.section, key, text, self.directory)

    def note_field(self, name: str, text: str) -> None:
        """A note naming the TOML key that set dataset field `name`."""
        section, _, key = self.origin.get(name, (self.section, None, name))
        self.notes.append(f"{label(section)}{key}: {text}")

    def refuse_field(self, name: str, text: str, fallback: str = "path"):
        """Refuse naming the TOML key that set dataset field `name` (where it was set)."""
        section, index, key = self.origin.get(name, (self.section, self.directory, fallback))
        raise Refused(section, key, text, index)


# ---------------------------------------------------------------- value checks (raise BadValue)

def number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadValue("a number")
    return float(v)


def positive(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise BadValue("a number above 0")
    return float(v)


def whole(v: Any) -> int:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadValue("a whole number")
    return v


def flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise BadValue("true or false")
    return v


def text(v: Any) -> str:
    if not isinstance(v, str):
        raise BadValue("a string")
    return v


def listed(v: Any, item: Callable[[Any], Any], what: str, length: Optional[int] = None) -> list:
    """[item(x) for x in v], or BadValue(what) when v is not such a list."""
    if not isinstance(v, list) or (length is not None and len(v) != length):
        raise BadValue(what)
    try:
        return [item(x) for x in v]
    except BadValue:
        raise BadValue(what) from None


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


def kept(convert: Callable[[Any], Any]) -> Handler:
    """keep, with the value checked and converted."""
    def h(ctx: Ctx, key: str, value: Any) -> None:
        ctx.extra[key] = convert(value)
    return h


def nothing(ctx: Ctx, key: str, value: Any) -> None:
    """Mapped to kubelora's behaviour at this value: nothing to write."""


def path(name: str) -> Handler:
    def h(ctx: Ctx, key: str, value: Any) -> None:
        ctx.model[name] = ctx.extra["map_path"](text(value))
    return h


# ---------------------------------------------------------------- keys several families share

def timestep_method(ctx: Ctx, key: str, value: Any) -> None:
    if value not in ("logit_normal", "uniform"):
        ctx.refuse(key, f"{value!r}: use logit_normal or uniform")
    ctx.training["timestepSampling"] = value


def transformer_dtype(ctx: Ctx, key: str, value: Any) -> None:
    """The families whose diffusion-pipe model reads transformer_dtype (flux, ltx-video,
    hunyuan-video); the others note it as ignored, as diffusion-pipe ignores it there."""
    if value in ("float8", "float8_e4m3fn"):
        # diffusion-pipe casts the weights to e4m3 and autocast upcasts them at each use: fp8
        # storage, bf16 GEMMs; kubelora's float8Compute dequant is that (with a scale per row)
        ctx.model.update(transformerDtype="float8", float8Compute="dequant")
        ctx.note(key, "float8 weights that multiply in model.dtype, as diffusion-pipe does (kubelora keeps a scale "
                      "per row); model.float8Compute: fp8 also runs the GEMMs in fp8, faster on Ada/Hopper GPUs")
    elif str(value).startswith("float8"):
        ctx.refuse(key, f"{value!r}: kubelora stores float8 weights as e4m3 (float8 / float8_e4m3fn)")
    elif value != ctx.extra.get("dtype"):
        ctx.refuse(key, f"{value!r}: the base weights are kept in model.dtype; remove the key or set it to dtype")


def SIGMOID_SCALE(ctx: Ctx, key: str, value: Any) -> None:
    """training.sigmoidScale (1, diffusion-pipe's default, writes nothing)."""
    if (v := positive(value)) != 1.0:
        ctx.training["sigmoidScale"] = v


def SHIFT(ctx: Ctx, key: str, value: Any) -> None:
    """diffusion-pipe's constant shift (`if shift := model_config.get('shift')`: 0 shifts nothing)."""
    v = number(value)
    if v < 0:
        raise BadValue("a number >= 0")
    if v:
        ctx.training["timestepShift"] = v
    else:
        ctx.note(key, "0: no shift, as in diffusion-pipe")
