"""What each model family accepts: its path fields, its options and its data shape rules.
Pure and torch-free: the spec validates with it, the CRD's CEL rules are generated from it,
and the trainer's model modules rely on it having been checked. Each family's rules live in its
package (models/<family>/__init__.py); this module gathers them and checks a spec against them."""
from __future__ import annotations

import importlib
import os
import re
from typing import Optional

from .models import FAMILIES
from .models.rules import FamilyRules

PATH_FIELDS = ("diffusersPath", "checkpointPath", "ckptPath", "transformerPath", "vaePath", "llmPath", "clipPath",
               "textEncoderPath")
OPTION_FIELDS = ("fluxShift", "bypassGuidanceEmbedding", "guidance", "vPred", "zeroTerminalSnr", "minSnrGamma",
                 "causalTemporalPositioning")

RULES: dict[str, FamilyRules] = {t: importlib.import_module(f"{__package__}.models.{m}").RULES for t, m in FAMILIES.items()}
COSMOS_ANY_SIZE_ENV = importlib.import_module(f"{__package__}.models.cosmos").ANY_SIZE_ENV


def _fmt_sources(sources) -> str:
    return " or ".join("+".join(f"model.{f}" for f in src) for src in sources)


def check_family(model, dataset, output=None) -> Optional[str]:
    """The first problem with a model/dataset pair for its family, as a message that names the
    field and the fix; None when it is fine."""
    r = RULES[model.type]
    if not r.video and dataset.videoClipMode != type(dataset).model_fields["videoClipMode"].default:
        return f"dataset.videoClipMode applies to video families only; model.type {model.type} trains images: remove it"
    for f in PATH_FIELDS:
        if getattr(model, f) is not None and f not in r.paths:
            return f"model.{f} does not apply to model.type {model.type} (it takes {_fmt_sources(r.sources)})"
    for f in OPTION_FIELDS:
        v = getattr(model, f)
        # against the field's default (which the API server fills in), not falsiness: guidance 0.0 is a setting
        if v is not None and v != type(model).model_fields[f].default and f not in r.options:
            allowed = ", ".join(f"model.{o}" for o in r.options) or "none"
            return f"model.{f} does not apply to model.type {model.type} (its options: {allowed})"
    for f in r.folder_paths:  # an object key stages that one file, without what must lie beside it
        uri = getattr(model, f) or ""
        if uri.startswith("s3://") and re.search(r"\.(safetensors|pt|pth|bin|ckpt)$", uri):
            return (f"model.{f}: model.type {model.type} needs a folder here, holding the weights and the files "
                    f"beside them (see the field reference); point it at {uri.rsplit('/', 1)[0]}/")
    given = [src for src in r.sources if all(getattr(model, f) is not None for f in src)]
    if not given:
        partial = [f for src in r.sources for f in src if getattr(model, f) is not None]
        missing = [f for src in r.sources for f in src if getattr(model, f) is None and any(getattr(model, g) for g in src)]
        hint = f" (missing: {', '.join('model.' + m for m in missing)})" if partial and missing else ""
        return f"model.type {model.type} needs {_fmt_sources(r.sources)}{hint}"
    if len(given) > 1:
        return f"model.type {model.type}: set only one of {_fmt_sources(given)}"
    if r.sizes and (dataset.enableArBucket or dataset.resolutions or any(s.resolutions for s in dataset.sources or ())):
        field = "enableArBucket" if dataset.enableArBucket else "resolutions"
        return (f"dataset.{field}: {model.type} trains only at its fixed sizes (dataset.width and dataset.height: "
                f"{', '.join(f'{a}x{b}' for a, b in r.sizes)}); remove it")
    w, h = size_of(dataset)
    if (dataset.width is None) != (dataset.height is None):
        return "dataset.width and dataset.height go together: set both, or neither and use dataset.resolution"
    if r.sizes and (w, h) not in r.sizes and not any_size_for_tests(model.type):
        sizes = ", ".join(f"{a}x{b}" for a, b in r.sizes)
        return f"dataset: {model.type} supports only the sizes {sizes} (width x height); got {w}x{h}"
    if w % r.size_multiple or h % r.size_multiple:
        return (f"dataset: {model.type} needs width and height divisible by {r.size_multiple} "
                f"(e.g. {w - w % r.size_multiple or r.size_multiple}x{h - h % r.size_multiple or r.size_multiple}); got {w}x{h}")
    if output is not None and output.formats:
        bad = [f for f in output.formats if f not in r.formats]
        if bad:
            return f"output.formats: {bad[0]!r} is not available for {model.type} (available: {', '.join(r.formats)})"
        if len(set(output.formats)) != len(output.formats):
            return "output.formats: each format may appear once"
    for where, res in [("dataset.resolutions", dataset.resolutions)] + [
            (f"dataset.sources[{i}].resolutions", s.resolutions) for i, s in enumerate(dataset.sources or ())]:
        bad = [x for x in res or () if x % r.size_multiple]
        if bad:
            return f"{where}: {model.type} needs sides divisible by {r.size_multiple}; got {bad[0]}"
    for where, fb in [("dataset.frameBuckets", dataset.frameBuckets)] + [
            (f"dataset.sources[{i}].frameBuckets", s.frameBuckets) for i, s in enumerate(dataset.sources or ())]:
        for f in fb or ():
            problem = _frame_problem(model.type, r, f, where)
            if problem:
                return problem
    frames = dataset.frames
    if frames is not None:
        if not r.video and frames != 1:
            return f"dataset.frames: {model.type} is an image model; frames must be 1 or unset (got {frames})"
        if r.frames and frames not in r.frames:
            return f"dataset.frames: {model.type} supports only {' or '.join(map(str, r.frames))} frames (got {frames})"
        if r.frame_rule:
            a, b = r.frame_rule
            if (frames - b) % a:
                lo = frames - (frames - b) % a
                return (f"dataset.frames: {model.type} needs {a}k+{b} frames (e.g. {lo} or {lo + a}); got {frames}")
    return None


def check_eval_sources(model_type: str, sources) -> Optional[str]:
    """The first problem with evaluation.sources' size and frame overrides for the family (as
    check_family does for dataset.sources); None when fine."""
    r = RULES[model_type]
    for i, s in enumerate(sources):
        where = f"evaluation.sources[{i}]"
        if r.sizes and s.resolutions:
            return (f"{where}.resolutions: {model_type} trains only at its fixed sizes (dataset.width and "
                    f"dataset.height); remove it")
        bad = [x for x in s.resolutions or () if x % r.size_multiple]
        if bad:
            return f"{where}.resolutions: {model_type} needs sides divisible by {r.size_multiple}; got {bad[0]}"
        for f in s.frameBuckets or ():
            problem = _frame_problem(model_type, r, f, f"{where}.frameBuckets")
            if problem:
                return problem
    return None


def eval_source_specs(spec) -> list:
    """evaluation.sources ([] without an evaluation section)."""
    return list(spec.evaluation.sources) if getattr(spec, "evaluation", None) is not None else []


def all_source_specs(spec) -> list:
    """The sources a run scans, probes, buckets and caches, by source index: the training ones
    (source_specs), then evaluation.sources (an eval item's source is >= len(source_specs))."""
    return source_specs(spec) + eval_source_specs(spec)


def _frame_problem(model_type: str, r: FamilyRules, frames: int, where: str) -> Optional[str]:
    if not r.video and frames != 1:
        return f"{where}: {model_type} is an image model; frames must be 1 (got {frames})"
    if r.frames and frames not in r.frames:
        return f"{where}: {model_type} supports only {' or '.join(map(str, r.frames))} frames (got {frames})"
    if r.frame_rule and (frames - r.frame_rule[1]) % r.frame_rule[0]:
        a, b = r.frame_rule
        lo = frames - (frames - b) % a
        return f"{where}: {model_type} needs {a}k+{b} frames (e.g. {lo} or {lo + a}); got {frames}"
    return None


def any_size_for_tests(model_type: str) -> bool:
    """True only for cosmos with KUBELORA_COSMOS_ALLOW_ANY_SIZE=1 (tests); never set it in a deployment."""
    return model_type == "cosmos" and os.environ.get(COSMOS_ANY_SIZE_ENV) == "1"


def size_of(dataset) -> tuple[int, int]:
    """(width, height) of a dataset spec."""
    return (dataset.width or dataset.resolution, dataset.height or dataset.resolution)


def frames_of(model_type: str, dataset) -> int:
    return dataset.frames or RULES[model_type].default_frames


def frame_buckets_of(model_type: str, dataset, source=None) -> list[int]:
    """The clip lengths items may train at: the source's frameBuckets, else the dataset's, else
    [frames]; 1 is always among them for video families (images are 1-frame clips), and the
    only one for image families."""
    if not RULES[model_type].video:
        return [1]
    fb = (source.frameBuckets if source is not None else None) or dataset.frameBuckets or [frames_of(model_type, dataset)]
    return sorted(set(fb) | {1})


def source_specs(spec) -> list:
    """The dataset's sources: dataset.sources, or one made of dataset.uri and dataset.repeats."""
    return list(spec.dataset.sources) if spec.dataset.sources is not None else [None]


def source_repeats(spec) -> list[int]:
    """Each source's repeats (dataset.repeats for dataset.uri)."""
    return [s.repeats if s is not None else spec.dataset.repeats for s in source_specs(spec)]


def areas_of(dataset, source=None) -> list[int]:
    """The training areas as square sides (resolutions of the source, else of the dataset, else
    [resolution]); with width/height one area is unused (the size is fixed)."""
    return sorted(set((source.resolutions if source is not None else None) or dataset.resolutions or [dataset.resolution]))
