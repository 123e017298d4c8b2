"""Aspect-ratio and frame buckets, crops, and the seeded bucket sampler. Pure (no torch, no I/O).

Bucket math follows diffusion-pipe (utils/dataset.py): a resolution is the side of a square area;
with aspect-ratio buckets on, the ratios are spaced evenly in log space from min_ar to max_ar, and
a bucket of ratio ar at area side s is (sqrt(s*s*ar), s*s/w), each side rounded to the family's
multiple. An item goes to the bucket whose log ratio is nearest its own, is resized to cover it
and centre-cropped (the least crop that gives the bucket's shape). A video goes to the longest
frame bucket not longer than it (never to the 1-frame image bucket); images to 1.

The sampler plans one epoch at a time from (seed, epoch, what the last epoch left over): every
sample repeated `repeats` times, grouped by bucket, shuffled, cut into global batches of
micro_batch * world samples from one bucket; the remainder of each bucket is carried to the front
of that bucket in the next epoch (so nothing is dropped for good), and batch order is shuffled.
Rank r takes slice r of each global batch. Its state (epoch, position, carried samples) is a small
dict saved with checkpoints; the same state gives the same batches.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

CLIP_MODES = ("single_beginning", "single_middle", "multiple_overlapping")


def round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def aspect_ratios(enable: bool, min_ar: float = 0.5, max_ar: float = 2.0, num: int = 7) -> list[float]:
    """The bucket ratios (width / height): [1.0] when off, else num ratios evenly spaced in log
    space from min_ar to max_ar (diffusion-pipe's np.geomspace), rounded to 3 decimals as
    diffusion-pipe rounds them before sizing its buckets (else a side can land one multiple off),
    deduplicated and sorted."""
    if not enable:
        return [1.0]
    if num == 1:
        return [round(math.sqrt(min_ar * max_ar), 3)]
    lo, hi = math.log(min_ar), math.log(max_ar)
    return sorted({round(math.exp(lo + (hi - lo) * i / (num - 1)), 3) for i in range(num)})


def bucket_size(ar: float, side: int, multiple: int) -> tuple[int, int]:
    """(width, height) of the bucket with ratio ar and area side*side, sides rounded to multiple."""
    w = math.sqrt(side * side * ar)
    return round_to(w, multiple), round_to(side * side / w, multiple)


def nearest(width: int, height: int, ars: list[float]) -> int:
    """Index of the ratio nearest width/height in log space (ties: the first)."""
    la = math.log(width / height)
    return min(range(len(ars)), key=lambda i: abs(la - math.log(ars[i])))


def frame_bucket(frames: int, buckets: list[int], is_video: bool) -> Optional[int]:
    """The longest bucket not longer than the clip; None when the clip is shorter than every
    bucket, or a video would land in the 1-frame (image) bucket."""
    fits = [b for b in buckets if b <= frames]
    if not fits or (is_video and max(fits) == 1):
        return None
    return max(fits)


def clip_starts(frames: int, target: int, mode: str) -> list[int]:
    """First frame of each clip of `target` frames taken from a video of `frames` frames."""
    if frames < target:
        raise ValueError(f"{frames} frames is shorter than a {target}-frame clip")
    if mode == "single_beginning" or target == 1 and frames == 1:
        return [0]
    if mode == "single_middle":
        return [(frames - target) // 2]
    if mode == "multiple_overlapping":  # the whole video, clips spread evenly, overlapping a little
        n = (frames - 1) // target + 1
        if n == 1:
            return [0]
        return [int((frames - target) * i / (n - 1)) for i in range(n)]
    raise ValueError(f"unknown videoClipMode {mode!r}; use one of {', '.join(CLIP_MODES)}")


def cover_crop(width: int, height: int, bw: int, bh: int) -> tuple[tuple[int, int], tuple[int, int, int, int], float]:
    """Resize (width, height) to cover (bw, bh) keeping its ratio, then centre-crop: returns the
    resized size, the crop box in it (left, top, right, bottom) and the fraction of the source
    image cut away (0 when the ratios match)."""
    s = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * s)), max(bh, round(height * s))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh), 1.0 - (bw * bh) / (rw * rh)


@dataclass(frozen=True)
class BucketConfig:
    """How one source's items are bucketed."""
    ars: tuple[float, ...]                 # aspect ratios; one ratio with fixed=None: square areas
    sides: tuple[int, ...]                 # area sides (each item trained at each)
    frame_buckets: tuple[int, ...]         # [1] for image families
    multiple: int = 16
    fixed: Optional[tuple[int, int]] = None  # width x height set: the only size
    clip_mode: str = "single_beginning"

    def sizes(self, side: int) -> list[tuple[int, int]]:
        if self.fixed:
            return [self.fixed]
        return [bucket_size(ar, side, self.multiple) for ar in self.ars]


# An item whose width/height is more than this factor beyond its nearest bucket's ratio (so that less
# than a quarter of it would survive the centre crop: a 1:9 strip in a square, a 10:1 banner in the
# default 0.5..2 buckets) is skipped as extremeAspectRatio rather than trained as a sliver.
MAX_AR_BEYOND = 4.0


def ratio_beyond(width: int, height: int, cfg: "BucketConfig") -> float:
    """How many times the item's aspect ratio is beyond the nearest of cfg's (1 inside: it fits a
    bucket's ratio exactly). Pure."""
    ars = [cfg.fixed[0] / cfg.fixed[1]] if cfg.fixed else list(cfg.ars)
    la = math.log(width / height)
    return math.exp(min(abs(la - math.log(a)) for a in ars))


@dataclass(frozen=True)
class Unit:
    """One training sample before captions: an item at one bucket (width, height, frames), from
    one clip start (0 for images)."""
    item: int
    bucket: tuple[int, int, int]
    start: int
    crop: float          # fraction of the source image cut away
    source: int = 0


@dataclass
class Assignment:
    units: list[Unit] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)   # (item, reason)


def assign(metas: list[tuple[int, int, int, bool]], configs: list[BucketConfig], sources: list[int]) -> Assignment:
    """metas[i] = (width, height, frames at the training rate, is_video) of item i, from source
    sources[i] bucketed with configs[sources[i]]. Each item becomes one unit per area side (and
    per clip with multiple_overlapping), or is dropped with a reason."""
    out = Assignment()
    for i, (w, h, frames, is_video) in enumerate(metas):
        cfg = configs[sources[i]]
        fb = frame_bucket(frames, list(cfg.frame_buckets), is_video)
        if fb is None:
            longest = [b for b in cfg.frame_buckets if b > 1]
            out.dropped.append((i, "tooShort" if is_video and longest else "noVideoBucket"))
            continue
        starts = clip_starts(frames, fb, cfg.clip_mode) if is_video else [0]
        for side in (cfg.sides if not cfg.fixed else cfg.sides[:1]):
            sizes = cfg.sizes(side)
            bw, bh = sizes[0] if cfg.fixed else sizes[nearest(w, h, list(cfg.ars))]  # nominal ratios, as diffusion-pipe
            crop = cover_crop(w, h, bw, bh)[2]
            for st in starts:
                out.units.append(Unit(i, (bw, bh, fb), st, crop, sources[i]))
    return out


def summary(assignment: Assignment, n_items: int, names: Optional[list[str]] = None) -> dict:
    """Items per bucket, how much was cropped, what was dropped and why (for the log and
    manifest.json). Buckets are named "WxHxF"."""
    per: dict[str, dict] = {}
    for u in assignment.units:
        b = per.setdefault("x".join(map(str, u.bucket)), {"samples": 0, "cropped": 0, "meanCrop": 0.0, "maxCrop": 0.0})
        b["samples"] += 1
        if u.crop > 1e-3:
            b["cropped"] += 1
        b["meanCrop"] += u.crop
        b["maxCrop"] = max(b["maxCrop"], round(u.crop, 4))
    for b in per.values():
        b["meanCrop"] = round(b["meanCrop"] / b["samples"], 4)
    dropped: dict[str, int] = {}
    for _, why in assignment.dropped:
        dropped[why] = dropped.get(why, 0) + 1
    crops = [u.crop for u in assignment.units]
    out = {"items": n_items, "samples": len(assignment.units), "buckets": dict(sorted(per.items())),
           "cropped": sum(1 for c in crops if c > 1e-3), "meanCrop": round(sum(crops) / len(crops), 4) if crops else 0.0,
           "dropped": dropped}
    if names:
        out["droppedItems"] = [f"{names[i]}: {why}" for i, why in assignment.dropped[:10]]
    return out


def format_summary(s: dict) -> list[str]:
    lines = [f"[data] {s['samples']} samples in {len(s['buckets'])} bucket(s) from {s['items']} items; "
             f"{s['cropped']} cropped (mean {100 * s['meanCrop']:.1f}% of the image cut away)"
             + (f"; dropped: {', '.join(f'{v} {k}' for k, v in s['dropped'].items())}" if s["dropped"] else "")]
    for name, b in s["buckets"].items():
        lines.append(f"[data]   bucket {name}: {b['samples']} samples, {b['cropped']} cropped "
                     f"(mean {100 * b['meanCrop']:.1f}%, max {100 * b['maxCrop']:.1f}%)")
    return lines


# ---------------------------------------------------------------- sampler

Sample = tuple[int, int]  # (unit index, caption variant; -1 = the empty caption)


@dataclass(frozen=True)
class SampleSpace:
    """What the sampler draws from: per unit its bucket, repeats, caption variants and caption
    dropout probability."""
    buckets: tuple[tuple[int, int, int], ...]
    repeats: tuple[int, ...]
    variants: tuple[int, ...]
    dropout: tuple[float, ...]

    def digest(self) -> str:
        """What a checkpoint's sampler position is valid for: another space (items added or removed
        under the same dataset URI, other buckets) has other unit indices. Pure."""
        import hashlib
        return hashlib.sha256(repr((self.buckets, self.repeats, self.variants, self.dropout)).encode()).hexdigest()[:16]


def plan_epoch(space: SampleSpace, seed: int, epoch: int, global_batch: int,
               carry_in: list[Sample]) -> tuple[list[list[Sample]], list[Sample]]:
    """One epoch's global batches (each from one bucket) and the samples left over for the next
    epoch. Pure: the same arguments give the same plan on every rank."""
    rng = random.Random(f"{seed}:{epoch}")
    pools: dict[tuple, list[Sample]] = {}
    for s in carry_in:
        pools.setdefault(space.buckets[s[0]], []).append(s)
    fresh: dict[tuple, list[Sample]] = {}
    for u, (b, rep, nv, p) in enumerate(zip(space.buckets, space.repeats, space.variants, space.dropout)):
        for _ in range(rep):
            v = -1 if p > 0 and rng.random() < p else (rng.randrange(nv) if nv > 1 else 0)
            fresh.setdefault(b, []).append((u, v))
    batches, carry_out = [], []
    for b in sorted(set(pools) | set(fresh)):
        extra = fresh.get(b, [])
        rng.shuffle(extra)
        pool = pools.get(b, []) + extra        # carried samples first: they are used this epoch
        n = len(pool) // global_batch * global_batch
        batches += [pool[i:i + global_batch] for i in range(0, n, global_batch)]
        carry_out += pool[n:]
    rng.shuffle(batches)
    return batches, carry_out


class BucketSampler:
    """Hands out micro-batches for one rank. State: epoch, position in its plan, carried samples."""

    def __init__(self, space: SampleSpace, seed: int, micro_batch: int, world: int, rank: int):
        self.space, self.seed, self.micro, self.world, self.rank = space, seed, micro_batch, world, rank
        self.epoch, self.pos, self.carry_in = 0, 0, []
        self._plan: Optional[tuple[list, list]] = None
        self._space_digest: Optional[str] = None

    @property
    def global_batch(self) -> int:
        return self.micro * self.world

    def _current(self):
        if self._plan is None:
            self._plan = plan_epoch(self.space, self.seed, self.epoch, self.global_batch, self.carry_in)
        return self._plan

    def next_batch(self) -> list[Sample]:
        for _ in range(10_000):  # a tiny dataset fills a batch over several epochs: carried, never dropped
            batches, carry_out = self._current()
            if self.pos < len(batches):
                b = batches[self.pos]
                self.pos += 1
                return b[self.rank * self.micro:(self.rank + 1) * self.micro]
            self.epoch, self.pos, self.carry_in, self._plan = self.epoch + 1, 0, carry_out, None
        raise RuntimeError("the sampler found no batch in 10000 epochs (empty dataset?)")

    @property
    def space_digest(self) -> str:
        if self._space_digest is None:
            self._space_digest = self.space.digest()
        return self._space_digest

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "carry_in": [list(s) for s in self.carry_in],
                "space": self.space_digest}

    def fits(self, d: dict) -> bool:
        """Whether a saved position (state_dict) was taken in this sampler's space (one saved before
        positions named their space is taken as fitting, as before). Pure."""
        return d.get("space") in (None, self.space_digest)

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
        self.carry_in, self._plan = [tuple(s) for s in d["carry_in"]], None
