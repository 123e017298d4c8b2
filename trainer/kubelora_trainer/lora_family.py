"""Which model family a LoRA file is for, for `kubelora convert`: the file's kubelora.model_type
when it has one, else --model-type, else the families whose parser reads its keys, less those
whose released model has no such block (families.RULES[t].released_blocks).

Names alone do not always tell: Flux.1's and HunyuanVideo's diffusers transformers share every
block module name (and, at the released sizes, every shape: both 3072 wide with a 4x MLP), and
LTX-Video's and Cosmos' share their attention and MLP names. A file that still fits several
families is refused, naming them and --model-type; a file read as the family --model-type names
while another fits too gets a note saying so. Pure but for `readers`, which runs the parsers."""
from __future__ import annotations

import re
from typing import Iterable, Optional


class FamilyChoiceError(ValueError):
    pass


def readers(tensors: dict, fmt: str) -> tuple[dict[str, tuple[dict, float]], dict[str, str]]:
    """({model type: parse(tensors, fmt)} for each family whose fmt parser reads the tensors,
    {model type: why not} for the other families that have the format)."""
    from .families import RULES
    from .models import get_family
    fits, why = {}, {}
    for t, rules in RULES.items():
        if fmt not in rules.formats:
            continue
        try:
            fits[t] = get_family(t).parse(dict(tensors), fmt)
        except Exception as e:  # noqa: BLE001 -- any parser failure means "not this family's file"
            why[t] = str(e) or type(e).__name__
    return fits, why


def beyond_release(model_type: str, modules: Iterable[str]) -> Optional[str]:
    """A sentence naming a module on a block that the family's largest released model does not
    have (e.g. Flux.1's transformer_blocks stop at 18, HunyuanVideo's at 19); None when none is."""
    from .families import RULES
    worst = None
    for prefix, count in RULES[model_type].released_blocks:
        rx = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
        for m in modules:
            hit = rx.match(m)
            if hit and int(hit[1]) >= count and (worst is None or int(hit[1]) > worst[0]):
                worst = (int(hit[1]), m, prefix, count)
    if worst is None:
        return None
    _, m, prefix, count = worst
    return f"{m} is past the released {model_type} model's {count} {prefix} ({prefix}.0-{count - 1})"


def _names(types: list[str], joint: str = "and") -> str:
    return types[0] if len(types) == 1 else f"{', '.join(types[:-1])} {joint} {types[-1]}"


def choose(fits: dict[str, Iterable[str]], named: Optional[str]) -> tuple[str, list[str]]:
    """(model type, notes to print) for a file without kubelora.model_type metadata, from
    {model type: its modules} of the families whose parser reads it and --model-type (None: not
    given). Raises FamilyChoiceError when the file does not say which: several families fit and
    no block tells them apart, or --model-type names a family whose released model lacks one of
    its blocks while another family fits. --model-type naming a family that does not read the file
    is returned as is: its parser's error says why."""
    reasons = {t: beyond_release(t, mods) for t, mods in fits.items()}
    plausible = [t for t in fits if reasons[t] is None]
    if named is not None:
        if named not in fits:
            return named, []
        others = [t for t in plausible if t != named]
        if reasons[named] and others:
            raise FamilyChoiceError(f"{reasons[named]}; it fits {_names(others)}: is it a {_names(others, 'or')} "
                                    f"LoRA? (--model-type {others[0]})")
        if reasons[named]:
            return named, [f"warning: {reasons[named]}; converting it as {named}, as --model-type says"]
        if others:
            return named, [f"note: its module names fit {_names(others)} too (no kubelora.model_type metadata "
                           f"says which); converting it as {named}, as --model-type says"]
        return named, []
    if not fits:
        raise FamilyChoiceError("no family reads it")   # the caller says why, per family
    candidates = plausible or list(fits)
    if len(candidates) > 1:
        unsure = "" if plausible else f" ({'; '.join(reasons[t] for t in fits)})"
        raise FamilyChoiceError(
            f"its module names fit {_names(candidates)}{unsure}, and nothing in the file tells which (no kubelora."
            f"model_type metadata); choose with {_names([f'--model-type {t}' for t in candidates], 'or')}")
    t = candidates[0]
    if reasons[t]:
        return t, [f"warning: {reasons[t]}; converting it as {t}, the only family whose module names fit"]
    ruled_out = [f"{o} fits its names too, but {reasons[o]}" for o in fits if o != t]
    return t, [f"note: converting it as {t}, the family its module names fit{'; ' if ruled_out else ''}"
               f"{'; '.join(ruled_out)} (--model-type chooses another)"]
