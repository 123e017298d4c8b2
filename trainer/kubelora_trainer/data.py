"""Dataset: images with same-stem caption files, one square resolution (bucketing comes later).

Scanning is pure: it returns the usable items and counts what was skipped and why, so a bad
file never stops a run and never goes unnoticed. An empty result is an error before training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".gif", ".mkv")


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str


@dataclass
class ScanReport:
    items: list[Item] = field(default_factory=list)
    missing_caption: int = 0        # images without a caption file (skipped or given "" by policy)
    empty_caption_used: int = 0
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"usable": len(self.items), "missingCaption": self.missing_caption,
                "emptyCaptionUsed": self.empty_caption_used, "unreadable": len(self.unreadable)}


def scan(root: Path, missing_caption: str = "skip", caption_ext: str = ".txt", video: bool = False) -> ScanReport:
    """Find media files under root (images; videos too for video families) and pair them with
    captions. Does not decode anything."""
    report = ScanReport()
    exts = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if video else ())
    images = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in exts)
    for img in images:
        cap = img.with_suffix(caption_ext)
        if cap.is_file():
            text = cap.read_text(encoding="utf-8", errors="replace").strip()
        else:
            report.missing_caption += 1
            if missing_caption == "skip":
                continue
            report.empty_caption_used += 1
            text = ""
        report.items.append(Item(img, text))
    return report


def load_image(path: Path, width: int, height: int | None = None):
    """Decode, resize to cover width x height and centre-crop; returns a float tensor
    [3, height, width] in [-1, 1], or raises OSError/ValueError for an unreadable file."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im).convert("RGB")
    return _to_tensor(_fit(im, width, height or width))


def _fit(im, width: int, height: int):
    """Resize a PIL image to cover width x height, then centre-crop."""
    from PIL import Image
    w, h = im.size
    if min(w, h) < 1:
        raise ValueError("image has no pixels")
    s = max(width / w, height / h)
    im = im.resize((max(width, round(w * s)), max(height, round(h * s))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - width) // 2, (h - height) // 2
    return im.crop((left, top, left + width, top + height))


def _to_tensor(im):
    import numpy as np
    import torch
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


def load_clip(path: Path, width: int, height: int, frames: int):
    """A clip [3, frames, height, width] in [-1, 1]: the first `frames` frames of a video
    (decoded with PyAV), or an image as a one-frame clip (frames must then be 1). Raises
    ValueError for a clip that is too short and OSError/av errors for unreadable files."""
    import torch

    if path.suffix.lower() in IMAGE_EXTENSIONS:
        if frames != 1:
            raise ValueError(f"an image is a 1-frame clip but dataset.frames is {frames}")
        return load_image(path, width, height).unsqueeze(1)
    import av
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append(_to_tensor(_fit(frame.to_image(), width, height)))
            if len(out) == frames:
                break
    if len(out) < frames:
        raise ValueError(f"video has {len(out)} frames, fewer than dataset.frames={frames}")
    return torch.stack(out, dim=1)


def check_usable(report: ScanReport, uri: str) -> None:
    if not report.items:
        s = report.summary()
        raise DatasetError(
            f"dataset {uri}: no usable items (images missing a caption: {s['missingCaption']}, unreadable: "
            f"{s['unreadable']}). Add images ({', '.join(IMAGE_EXTENSIONS)}) with same-stem caption files, "
            f"or set dataset.missingCaption: empty to train images without captions.")


def shard_indices(n_items: int, repeats: int, world: int, rank: int, epoch_seed: Optional[int] = None) -> list[int]:
    """Indices of the items one rank sees in one epoch: the repeated list, shuffled with a
    seed shared by all ranks, padded by wrapping so every rank gets the same count."""
    import random
    order = [i for i in range(n_items) for _ in range(repeats)]
    if epoch_seed is not None:
        random.Random(epoch_seed).shuffle(order)
    per_rank = -(-len(order) // world)
    padded = (order * (-(-per_rank * world // len(order))))[: per_rank * world]
    return padded[rank::world]
