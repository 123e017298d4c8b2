"""Dataset: images (and videos) with captions, from one or several sources; bucket math is in
buckets.py, caption options in captions.py.

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
    caption: str                     # the first caption variant
    captions: tuple[str, ...] = ()   # every variant a sample may draw (default: caption alone)
    source: int = 0
    dropout: float = 0.0

    @property
    def variants(self) -> tuple[str, ...]:
        return self.captions or (self.caption,)


@dataclass
class ScanReport:
    items: list[Item] = field(default_factory=list)
    missing_caption: int = 0        # images without a caption file (skipped or given "" by policy)
    empty_caption_used: int = 0
    unreadable: list[str] = field(default_factory=list)
    uncaptioned: list[str] = field(default_factory=list)    # the first few media files without a caption
    beside: dict[str, int] = field(default_factory=dict)   # other file extensions next to them: how many

    def merge(self, other: "ScanReport") -> None:
        self.items += other.items
        self.missing_caption += other.missing_caption
        self.empty_caption_used += other.empty_caption_used
        self.unreadable += other.unreadable
        self.uncaptioned += other.uncaptioned[: max(0, 5 - len(self.uncaptioned))]
        for k, v in other.beside.items():
            self.beside[k] = self.beside.get(k, 0) + v

    def summary(self) -> dict:
        return {"usable": len(self.items), "missingCaption": self.missing_caption,
                "emptyCaptionUsed": self.empty_caption_used, "unreadable": len(self.unreadable)}


def scan(root: Path, missing_caption: str = "skip", caption_ext: str = ".txt", video: bool = False,
         caption_prefix: str = "", opts=None, source: int = 0, seed: int = 0) -> ScanReport:
    """Find media files under root (images; videos too for video families) and pair them with
    captions: a captions.json/.jsonl map in root, else same-stem files with caption_ext
    (caption_prefix put before each, verbatim). With opts (captions.CaptionOptions) its settings
    replace the loose arguments. Does not decode anything."""
    from .captions import CaptionOptions, read_caption_map, variants
    opts = opts or CaptionOptions(extension=caption_ext, prefix=caption_prefix, missing=missing_caption)
    root = Path(root)
    report = ScanReport()
    exts = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if video else ())
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in exts]
    cmap = read_caption_map(root)
    stems: dict[tuple[Path, str], list[str]] = {}
    for p in files:
        stems.setdefault((p.parent, p.stem), []).append(p.suffix)
    for img in images:
        texts = None
        if cmap is not None:
            texts = cmap.get(img.relative_to(root).as_posix()) or cmap.get(img.name)
        else:
            cap = img.with_suffix(opts.extension)
            if cap.is_file():
                texts = [cap.read_text(encoding="utf-8", errors="replace").strip()]
        if texts is None:
            report.missing_caption += 1
            if len(report.uncaptioned) < 5:
                report.uncaptioned.append(str(img.relative_to(root)))
            for ext in stems.get((img.parent, img.stem), []):
                if ext.lower() not in exts and ext != opts.extension:
                    report.beside[ext] = report.beside.get(ext, 0) + 1
            if opts.missing == "skip":
                continue
            report.empty_caption_used += 1
            texts = [""]
        caps = tuple(variants(texts, opts, seed))
        report.items.append(Item(img, caps[0], caps, source, opts.dropout))
    return report


def probe(path: Path, fps: float | None = None, decode: bool = True) -> tuple[int, int, int, bool]:
    """(width, height, frames, is_video) of a media file, decoding it fully (so a corrupt file
    fails here): frames counted at the training rate fps (as load_clip would give them), 1 for
    an image. decode=False reads an image's header only (its size and EXIF orientation): a file
    corrupt past its header then fails when it is decoded for the cache. Raises
    OSError/ValueError/av errors for unreadable files."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        from PIL import Image, ImageOps
        with Image.open(path) as im:
            if decode:
                im.load()
                w, h = ImageOps.exif_transpose(im).size
            else:  # EXIF from the header (getexif() would decode a PNG); orientations 5-8 turn by 90 degrees
                exif = Image.Exif()
                if im.info.get("exif"):
                    exif.load(im.info["exif"])
                w, h = im.size[::-1] if exif.get(0x0112) in (5, 6, 7, 8) else im.size
        if min(w, h) < 1:
            raise ValueError("image has no pixels")
        return w, h, 1, False
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        w = h = 0
        timed = []
        for frame in container.decode(stream):
            w, h = frame.width, frame.height
            timed.append((frame.time, None))
    if not timed:
        raise ValueError("video has no frames")
    n = sum(1 for _ in pick_frames(iter(timed), 10 ** 9, fps)) if fps else len(timed)
    return w, h, n, True


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


def load_clip(path: Path, width: int, height: int, frames: int, fps: float | None = None):
    """A clip [3, frames, height, width] in [-1, 1] from the start of a video (decoded with PyAV),
    or an image as a one-frame clip (frames must then be 1).

    With fps (the model family's training rate), the video is resampled in time to that rate
    first: output frame k shows what the source shows at k / fps seconds (the nearest source
    frame; frames are dropped for faster sources and repeated for slower ones), so a 60 fps
    source is not trained as slow motion. Decoding stops once the last needed frame is reached.
    Raises ValueError for a clip that is too short and OSError/av errors for unreadable files."""
    import torch

    if path.suffix.lower() in IMAGE_EXTENSIONS:
        if frames != 1:
            raise ValueError(f"an image is a 1-frame clip but dataset.frames is {frames}")
        return load_image(path, width, height).unsqueeze(1)
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = ((frame.time, frame) for frame in container.decode(stream))
        picked = list(pick_frames(decoded, frames, fps))
        src_fps = float(stream.average_rate or 0) or None
    if len(picked) < frames:
        need = [f"{frames / fps:.2f} s at the model's {fps:g} fps"] if fps else []
        need += [f"the file is {src_fps:g} fps"] if src_fps else []
        raise ValueError(f"video is too short: {len(picked)} of the {frames} frames that dataset.frames asks for"
                         + (f" ({'; '.join(need)})" if need else ""))
    cache: dict[int, object] = {}
    out = []
    for frame in picked:  # a repeated source frame is converted once
        if id(frame) not in cache:
            cache[id(frame)] = _to_tensor(_fit(frame.to_image(), width, height))
        out.append(cache[id(frame)])
    return torch.stack(out, dim=1)


def load_unit(path: Path, width: int, height: int, frames: int, start: int = 0, fps: float | None = None,
              clip: bool = False):
    """One training sample: an image [3, H, W] ([3, 1, H, W] with clip), or frames start..start+frames
    of a video at the training rate fps [3, F, H, W]; resized to cover width x height and centre-cropped."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        t = load_image(path, width, height)
        return t.unsqueeze(1) if clip else t
    return load_clip(path, width, height, start + frames, fps=fps)[:, start:]


def pick_frames(timed_frames, n: int, fps: float | None):
    """From (time in seconds, frame) pairs in decoding order, the n frames a clip at `fps` shows
    at times 0, 1/fps, 2/fps... (nearest source frame; ties go to the earlier one). Without fps,
    the first n frames. Pure and lazy: stops consuming once the n-th frame is chosen."""
    if fps is None:
        for k, (_, frame) in zip(range(n), timed_frames):
            yield frame
        return
    k, t0, prev, step = 0, None, None, None
    for t, frame in timed_frames:
        t = float(t or 0.0)
        t0 = t if t0 is None else t0
        t -= t0
        if prev is not None:
            step = t - prev[0]
        while k < n and t >= k / fps:
            target = k / fps
            yield prev[1] if prev is not None and target - prev[0] <= t - target + 1e-9 else frame
            k += 1
        if k == n:
            return
        prev = (t, frame)
    # past the last decoded frame: it is still on screen for one frame duration
    while prev is not None and step and k < n and k / fps < prev[0] + step:
        yield prev[1]
        k += 1


def caption_hint(report: ScanReport) -> str:
    """When media files lack captions: which ones (the first few), and, when files with another
    extension sit beside them, the captionExtension that would pair them."""
    if not report.missing_caption:
        return ""
    hint = f" Without a caption: {', '.join(report.uncaptioned)}" + (" ..." if report.missing_caption > len(report.uncaptioned) else "") + "."
    if report.beside:
        ext = max(report.beside, key=report.beside.get)
        hint += (f" {report.beside[ext]} of them have a same-stem {ext} file beside them: set "
                 f"dataset.captionExtension: \"{ext}\" if those are the captions.")
    return hint


def check_usable(report: ScanReport, uri: str, dropped: str = "") -> None:
    if not report.items:
        s = report.summary()
        raise DatasetError(
            f"dataset {uri}: no usable items (images missing a caption: {s['missingCaption']}, unreadable: "
            f"{s['unreadable']}{dropped}). Add images ({', '.join(IMAGE_EXTENSIONS)}) with same-stem caption files, "
            f"or set dataset.missingCaption: empty to train images without captions." + caption_hint(report))
