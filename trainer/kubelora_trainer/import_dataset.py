"""What `kubelora import-config` learns from the dataset's [[directory]] folders when they are on
this machine: the items kubelora would train (read_dirs: kubelora's own scan, and with probe its
header checks and aspect-ratio screen; I/O), and the training.steps that diffusion-pipe's `epochs`
are (epoch_steps: pure). A diffusion-pipe epoch is every item x resolution x caption variant x
num_repeats; a step takes micro_batch_size_per_gpu x gradient_accumulation_steps x GPUs of them.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Union

from .data import DatasetError, ScanReport, Skip, check_item, scan, skipped_text
from .families import RULES, areas_of, source_repeats, source_specs

Dirs = list[tuple[str, str, Optional[str]]]  # per [[directory]]: its path as written, resolved (--cwd), its mask folder


class Uncountable(ValueError):
    """Why the epochs cannot be counted as steps (the message says it, for the --steps error)."""


def read_dirs(spec, dirs: Dirs, probe: bool) -> Union[list[ScanReport], str]:
    """Each directory scanned as a run scans its source (data.scan with the source's caption
    options; items named by the manifest's URIs), or why they cannot be read here. With probe,
    every item is checked as a run checks it (screen): the samples each gives are counted and
    what a run would skip is left out. I/O."""
    from .captions import options_of, recursive_of
    r = RULES[spec.model.type]
    for written, path, _ in dirs:
        if re.match(r"^[a-z0-9]+://", path):
            return f"[[directory]] path {written} is a URI, not a folder on this machine"
        where = path if written == path else f"{path} ([[directory]] path {written!r}, resolved against --cwd)"
        if not Path(path).exists():
            return f"{where} does not exist on this machine"
        if not Path(path).is_dir():
            return f"{where} is not a folder"
    reports = []
    for i, (src, (_, path, mask)) in enumerate(zip(source_specs(spec), dirs)):
        try:
            report = scan(Path(path), video=r.video, opts=options_of(spec.dataset, src), source=i,
                          seed=spec.training.seed, uri=spec.dataset.uris[i],
                          mask_root=Path(mask) if mask and Path(mask).is_dir() else None,
                          recursive=recursive_of(spec.dataset, src))
        except DatasetError as e:
            return str(e)
        except OSError as e:
            return f"{path}: {e.strerror or e}"
        reports.append(report)
    if probe:
        for report in reports:
            screen(spec, report)
    return reports


def screen(spec, report: ScanReport) -> None:
    """Drop the items a run would skip, as it skips them: an image from its header (empty, not an
    image, too large), a video once decoded at the model's frame rate (also too short for every
    frame bucket), either for its aspect ratio; the skips are counted in report.skipped by the
    run's reasons. report.units gets the samples each remaining item gives (its areas x its clips,
    buckets.assign). I/O (image headers, videos decoded)."""
    from . import buckets as bk
    from .dataset_phase import bucket_configs, drop_items, drop_reason, settle  # torch-heavy module: only when counting
    fps = RULES[spec.model.type].fps if RULES[spec.model.type].video else None
    metas, skips = {}, {}
    for i, it in enumerate(report.items):
        meta, skip = check_item(it, fps, decode=False)  # decode=False: images from the header; videos decode
        if skip is None:
            metas[i] = meta
        else:
            skips[i] = skip
    configs = bucket_configs(spec)
    kept = settle(report, metas, skips, configs)  # the skipped leave report.items
    probed = [metas[i] for i in kept]
    assignment = bk.assign(probed, configs, [it.source for it in report.items])
    short = {}
    for i, why in assignment.dropped:
        it = report.items[i]
        detail = drop_reason(it, probed[i], why, configs[it.source], fps or 0).removeprefix(f"{it.image.name}: ")
        short[i] = Skip(it.name, why, detail)
    buckets: list[list[tuple]] = [[] for _ in report.items]
    for u in assignment.units:
        buckets[u.item].append(tuple(u.bucket))
    report.units = [len(b) for i, b in enumerate(buckets) if i not in short]
    report.unit_buckets = [b for i, b in enumerate(buckets) if i not in short]
    drop_items(report, short)


def steps_per_epoch(reports: list[ScanReport], repeats: list[float], batch: int) -> tuple[int, int, int]:
    """diffusion-pipe's steps in one epoch (utils/dataset.py): the samples of each size bucket (an
    item's units there x its caption variants, x its directory's num_repeats, rounded down per
    directory), merged across directories, cut to a multiple of the global batch every epoch, the
    same samples each time (its order is shuffled once, with a fixed seed). Returns (steps,
    samples, samples dropped each epoch). Pure."""
    per_bucket: dict[tuple, int] = {}
    for rep, r in zip(reports, repeats):
        mine: dict[tuple, int] = {}
        for it, units in zip(rep.items, rep.unit_buckets or ()):
            for b in units:
                mine[b] = mine.get(b, 0) + len(it.variants)
        for b, n in mine.items():
            per_bucket[b] = per_bucket.get(b, 0) + int(n * r)
    steps = sum(n // batch for n in per_bucket.values())
    total = sum(per_bucket.values())
    return steps, total, total - steps * batch


def epoch_steps(spec, reports: list[ScanReport], dirs: Dirs, epochs: float) -> tuple[int, str]:
    """training.steps for diffusion-pipe's `epochs` over these items, and the note that shows the
    calculation. Raises Uncountable when no number fits. Pure."""
    d = spec.dataset
    parts, total = [], 0
    for src, rep, repeats, (_, path, _) in zip(source_specs(spec), reports, source_repeats(spec), dirs):
        items = len(rep.items)
        if not items:
            s = rep.summary()
            raise Uncountable(f"{path} holds no item kubelora would train (without a caption: {s['missingCaption']}, "
                              f"skipped: {skipped_text(rep) or 0})")
        areas = 1 if d.width is not None else len(areas_of(d, src))
        units = rep.units if rep.units is not None else [areas] * items  # not probed: one clip each
        clips = sum(units) // areas  # samples per area: an item's clips (1 for an image or a single-clip mode)
        variants = sum(len(it.variants) for it in rep.items)
        n = sum(len(it.variants) * u for it, u in zip(rep.items, units)) * repeats
        total += n
        shown = f"{items} item{'s' * (items != 1)}"
        if clips != items:
            shown += f" ({clips} clips)"
        if variants != items:
            shown += f" x {variants / items:g} caption variants"
        shown += f" x {areas} resolution{'s' * (areas != 1)} x {repeats} repeat{'s' * (repeats != 1)}"
        uncaptioned = rep.missing_caption - rep.empty_caption_used
        left = ", ".join([f"{uncaptioned} without a caption"] * bool(uncaptioned) + [skipped_text(rep)] * bool(rep.skipped))
        parts.append(f"{path}: {shown}" + (f" = {n}" if len(reports) > 1 or clips != items else "")
                     + (f" (not counted, as a run skips them: {left})" if left else ""))
    t, res = spec.training, spec.resources
    gpus = res.nodes * max(res.gpusPerNode, 1)
    batch = t.microBatchSize * t.gradientAccumulationSteps * gpus
    whole = max(1, math.floor(epochs))  # diffusion-pipe stops once an epoch past `epochs` would begin
    how = f"counted in the dataset folders as diffusion-pipe counts an epoch ({'; '.join(parts)})"
    if all(rep.unit_buckets is not None for rep in reports):
        per_epoch, _, dropped = steps_per_epoch(reports, source_repeats(spec), batch)
        if not per_epoch:
            raise Uncountable(f"no size bucket holds a global batch ({batch}) of samples: diffusion-pipe drops them all")
        steps = whole * per_epoch
        note = (f"epochs: training.steps {steps} = {whole} epoch{'s' * (whole != 1)} x {per_epoch} steps ({total} "
                f"samples / global batch {batch}, {how})")
        if dropped:
            note += (f"; diffusion-pipe cuts each size bucket to a multiple of the global batch, so {dropped} of the "
                     f"samples are never trained there, the same ones each epoch: kubelora trains them in the next "
                     f"epoch instead")
    else:  # not probed: no buckets
        steps = max(1, math.ceil(whole * total / batch))
        note = f"epochs: training.steps {steps} = {whole} epochs x {total} samples / global batch {batch}, {how}"
    if whole != epochs:
        note += f"; {epochs:g} epochs are {whole} in diffusion-pipe, which runs whole epochs"
    note += (f"; global batch = micro batch {t.microBatchSize} x accumulation {t.gradientAccumulationSteps} x {gpus} "
             f"GPU{'s' * (gpus != 1)} (assumed: the manifest's default resources; on N GPUs an epoch is N times fewer "
             f"steps). --steps N overrides")
    return steps, note
