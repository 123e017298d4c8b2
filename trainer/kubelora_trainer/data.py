"""Dataset: images (and videos) with captions, from one or several sources; bucket math is in
buckets.py, caption options in captions.py.

Scanning is pure: it returns the usable items and counts what was skipped and why, so a bad
file never stops a run and never goes unnoticed. An empty result is an error before training.

Media is untrusted: every file is checked before it is trained (check_item, split over ranks by
dataset_phase.probe_items) and skipped with one of SKIP_REASONS, counted by reason and named by its
source URI (s3://bucket/data/x.png, not the staged local path). Limits: MAX_PIXELS per image or
video frame, MAX_VIDEO_PIXELS for a whole video (frames x pixels), MAX_AR_BEYOND in buckets.py for
aspect ratios. Masks (dataset.maskUri): masks.py.
"""
from __future__ import annotations

import errno
import re

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".avif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".gif", ".mkv")

# PIL's own DecompressionBombError threshold (2 x Image.MAX_IMAGE_PIXELS's default): ~13400 x 13400,
# 537 MB decoded as RGB. Checked from the header, before anything is decoded.
MAX_PIXELS = 178_956_970
# A whole video, decoded frames x pixels per frame (~8300 frames of 1080p, ~2070 of 4K): beyond it
# probing alone would take minutes; a tiny file that decodes to that much is a decompression bomb.
MAX_VIDEO_PIXELS = 2 ** 34

SKIP_REASONS = {   # why an item was skipped (manifest.json dataset.skipped, the log, the metrics' reason)
    "emptyFile": "the media file has zero bytes",
    "wrongExtension": "the content is not what the extension says (e.g. text or a video named .jpg)",
    "corrupt": "a known format that does not decode (truncated, damaged)",
    "tooLarge": f"more than {MAX_PIXELS:,} pixels per image or frame, or {MAX_VIDEO_PIXELS:,} per video",
    "captionNotUtf8": "the caption file is not UTF-8",
    "extremeAspectRatio": "aspect ratio more than 4x beyond the nearest bucket's (less than a quarter would be kept)",
    "maskUnreadable": "the item's mask does not decode",
    "maskSizeMismatch": "the item's mask is not the size of the item",
    "unsafeKey": "the object's key cannot be a file under the staged folder ('..', '.', an empty segment, a doubled '/' "
                 "or the stage index's name); never downloaded",
    "vanished": "the object was deleted from the bucket, or rewritten, after stage-in listed it",
}


class DatasetError(ValueError):
    pass


class MediaTooLarge(ValueError):
    """More pixels than MAX_PIXELS (an image or frame) or MAX_VIDEO_PIXELS (a video)."""


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str                     # the first caption variant
    captions: tuple[str, ...] = ()   # every variant a sample may draw (default: caption alone)
    source: int = 0
    dropout: float = 0.0
    uri: str = ""                    # where it came from (the source URI + its relative path), for messages
    mask: Optional[Path] = None      # its mask (masks.py), when its source has a mask folder holding one
    seq: int = -1                    # its index when probed: the rank that probes it (seq % world) encodes it

    @property
    def variants(self) -> tuple[str, ...]:
        return self.captions or (self.caption,)

    @property
    def name(self) -> str:
        return self.uri or str(self.image)


@dataclass(frozen=True)
class Skip:
    uri: str        # the item's source URI
    reason: str     # one of SKIP_REASONS
    detail: str = ""
    # False for a failure of this machine rather than of the file (is_environmental): skipped in this
    # run only, never remembered in the cache's probes nor shared through dataset.cacheUri
    lasting: bool = field(default=True, compare=False)

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class ScanReport:
    items: list[Item] = field(default_factory=list)
    missing_caption: int = 0        # images without a caption file (skipped or given "" by policy)
    empty_caption_used: int = 0
    skipped: list[Skip] = field(default_factory=list)      # bad files, each with its reason
    uncaptioned: list[str] = field(default_factory=list)    # the first few media files without a caption
    beside: dict[str, int] = field(default_factory=dict)   # other file extensions next to them: how many
    unmasked: list[str] = field(default_factory=list)      # items of a masked source without a mask (trained unmasked)
    masked_sources: int = 0
    ignored: dict[str, int] = field(default_factory=dict)  # files that are neither media nor captions: by extension
    in_subfolders: int = 0          # media files in a source's subfolders, left out (dataset.recursive: false)
    unread_captions: int = 0        # uncaptioned items whose same-stem caption file the source's caption map overrides
    nested_maps: list[str] = field(default_factory=list)   # caption maps in subfolders (not read)
    # folders named like kohya's "<repeats>_<name>" holding items: folder (by source URI) -> (its number, source)
    kohya: dict[str, tuple[int, int]] = field(default_factory=dict)
    # import-config's epoch count (import_dataset.screen): training samples per item of `items`
    # (its areas x its clips), once every item is probed
    units: Optional[list[int]] = None
    unit_buckets: Optional[list[list[tuple]]] = None  # import-config's screen: each item's units' buckets
    # evaluation.sources (train.scan_sources): their items are in `items` (source >= first_held), their
    # counts and skips here, apart from the training data's
    held: Optional["ScanReport"] = None
    first_held: Optional[int] = None

    def is_held(self, item: "Item") -> bool:
        return self.first_held is not None and item.source >= self.first_held

    def merge(self, other: "ScanReport") -> None:
        self.items += other.items
        self.missing_caption += other.missing_caption
        self.empty_caption_used += other.empty_caption_used
        self.skipped += other.skipped
        self.uncaptioned += other.uncaptioned[: max(0, 5 - len(self.uncaptioned))]
        for k, v in other.beside.items():
            self.beside[k] = self.beside.get(k, 0) + v
        self.unmasked += other.unmasked
        self.masked_sources += other.masked_sources
        for k, v in other.ignored.items():
            self.ignored[k] = self.ignored.get(k, 0) + v
        self.in_subfolders += other.in_subfolders
        self.unread_captions += other.unread_captions
        self.nested_maps += other.nested_maps
        self.kohya.update(other.kohya)

    def skip(self, uri: str, reason: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        self.skipped.append(Skip(uri, reason, detail))

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.skipped:
            out[s.reason] = out.get(s.reason, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        """For the log and manifest.json: `unreadable` counts every bad file, `skipped` (present
        when any) by reason; `masked`/`unmasked` when a source has masks."""
        out = {"usable": len(self.items), "missingCaption": self.missing_caption,
               "emptyCaptionUsed": self.empty_caption_used, "unreadable": len(self.skipped)}
        if self.skipped:
            out["skipped"] = self.by_reason()
        if self.ignored:
            out["ignoredFiles"] = dict(sorted(self.ignored.items()))
        if self.in_subfolders:
            out["inSubfolders"] = self.in_subfolders
        if self.masked_sources:
            out["masked"] = sum(1 for it in self.items if it.mask is not None and not self.is_held(it))
            out["unmasked"] = sum(1 for it in self.items if it.mask is None and not self.is_held(it))
        return out


def scan(root: Path, missing_caption: str = "skip", caption_ext: str = ".txt", video: bool = False,
         caption_prefix: str = "", opts=None, source: int = 0, seed: int = 0, uri: Optional[str] = None,
         mask_root: Optional[Path] = None, recursive: bool = True, absent: Iterable[str] = (),
         listed: Optional[set[str]] = None, mask_listed: Optional[set[str]] = None) -> ScanReport:
    """Find media files under root (images; videos too for video families) and pair them with
    captions: a captions.json/.jsonl map in root, else same-stem files with caption_ext
    (caption_prefix put before each, verbatim). With opts (captions.CaptionOptions) its settings
    replace the loose arguments. uri: root's source URI, to name items by. mask_root: the
    source's staged mask folder (its files are not items, even inside root); each item's mask is
    the same-stem file in the same relative folder there (masks.find_mask). recursive=False: only
    root's own files are items (those in subfolders are counted in `in_subfolders`). A caption file that is
    not UTF-8 skips its item (captionNotUtf8). absent: the relative names of media files listed in
    the source but not fetched yet (media_later), scanned as present. listed: for a source staged
    from a bucket, every name its listing holds; other files in root (left by an earlier run, since
    deleted from the bucket) are not part of it; mask_listed: the same of mask_root. Does not read
    any media."""
    from .captions import CAPTION_MAPS, CaptionOptions, read_caption_map, variants
    from .masks import find_mask
    opts = opts or CaptionOptions(extension=caption_ext, prefix=caption_prefix, missing=missing_caption)
    root = Path(root)
    report = ScanReport(masked_sources=int(mask_root is not None))
    exts = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if video else ())
    mask_root = Path(mask_root) if mask_root is not None else None
    inside = mask_root is not None and mask_root.resolve().is_relative_to(root.resolve())
    files = sorted(p for p in {*(p for p in root.rglob("*") if p.is_file()), *(root / rel for rel in absent)}
                   if not (inside and p.resolve().is_relative_to(mask_root.resolve()))
                   and (listed is None or p.relative_to(root).as_posix() in listed))
    present = Path.is_file if listed is None else (lambda p, _in=frozenset(files): p in _in)
    if not recursive:  # the folder's own files; media below it counted, not silently dropped
        report.in_subfolders = sum(1 for p in files if p.parent != root and p.suffix.lower() in exts)
        files = [p for p in files if p.parent == root]
    images = [p for p in files if p.suffix.lower() in exts]
    for p in files:  # said, not silently dropped: a video in an image family, a .psd, a tar shard
        if p.suffix.lower() not in exts and p.suffix != opts.extension and p.name not in CAPTION_MAPS \
                and not p.name.startswith("."):
            what = "video" if p.suffix.lower() in VIDEO_EXTENSIONS else p.suffix.lower() or p.name
            report.ignored[what] = report.ignored.get(what, 0) + 1
    try:
        cmap = read_caption_map(root, present)
    except ValueError as e:  # a malformed or non-UTF-8 caption map: the whole source's captions
        raise DatasetError(f"dataset {uri or root}: {e}") from None
    report.nested_maps = [p.relative_to(root).as_posix() for p in files if p.name in CAPTION_MAPS and p.parent != root]
    stems: dict[tuple[Path, str], list[str]] = {}
    for p in files:
        stems.setdefault((p.parent, p.stem), []).append(p.suffix)
    for img in images:
        rel = img.relative_to(root).as_posix()
        name = f"{uri.rstrip('/')}/{rel}" if uri else str(img)
        texts = None
        if cmap is not None:
            texts = cmap.get(rel) or cmap.get(img.name)
        else:
            cap = img.with_suffix(opts.extension)
            if present(cap):
                try:
                    texts = [read_caption(cap)]
                except UnicodeDecodeError as e:
                    report.skip(name, "captionNotUtf8", f"{cap.name}: byte {e.object[e.start]:#04x} at {e.start}")
                    continue
        if texts is None:
            report.missing_caption += 1
            # a map names the source's captions (diffusion-pipe reads a folder with one the same way)
            report.unread_captions += cmap is not None and present(img.with_suffix(opts.extension))
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
        mask = find_mask(mask_root, img.relative_to(root), mask_listed) if mask_root is not None else None
        if mask_root is not None and mask is None:
            report.unmasked.append(name)
        report.items.append(Item(img, caps[0], caps, source, opts.dropout, uri=name, mask=mask))
    report.kohya = kohya_folders([it.image.relative_to(root) for it in report.items], uri or str(root), source)
    return report


KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya sd-scripts: img/10_mystyle = mystyle's items, 10 times per epoch


def kohya_folders(rel_paths: list[Path], root_uri: str, source: int = 0) -> dict[str, tuple[int, int]]:
    """The folders, named by URI, whose name has kohya's `<repeats>_<name>` form and that hold some
    of these items (paths relative to the source's root): the root itself (by its URI's last
    segment), else the outermost such folder of each item (kohya reads the folders directly
    in its train_data_dir), with their number and the source. Pure."""
    root_uri = root_uri.rstrip("/")
    if rel_paths and (n := kohya_number(root_uri)) is not None:
        return {root_uri: (n, source)}
    out = {}
    for rel in rel_paths:
        for depth, part in enumerate(rel.parent.parts):
            if (n := kohya_number(part)) is not None:
                out["/".join([root_uri, *rel.parent.parts[:depth + 1]])] = (n, source)
                break
    return dict(sorted(out.items()))


def kohya_number(path: str) -> Optional[int]:
    """N when the path's last segment is kohya's `<N>_<name>`, else None. Pure."""
    m = KOHYA_FOLDER.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(m[1]) if m else None


def kohya_note(folders: dict[str, tuple[int, int]], repeats: list[int]) -> list[str]:
    """A warning (its lines, the first without "warning:") for folders named like kohya's
    `<repeats>_<name>` whose number is not the repeats their source trains with (repeats: per
    source), with the dataset.sources YAML that would train each folder that many times; [] when
    there are none. Kept a warning: the number may be just part of a name. Pure."""
    odd = {f: (n, s) for f, (n, s) in folders.items() if n != repeats[s]}
    if not odd:
        return []
    shown = list(odd.items())[:8]
    named = ", ".join(f"{f} ({n})" for f, (n, _) in shown)
    named += f" and {len(odd) - len(shown)} more" if len(odd) > len(shown) else ""
    now = sorted({repeats[s] for _, s in odd.values()})
    lines = [f"folder names in kohya's <repeats>_<name> form: {named}. kubelora does not read repeats from "
             f"folder names: their items train with their source's repeats ({', '.join(map(str, now))}), read "
             f"recursively. If the numbers are repeat counts, list each folder as a source of its own with "
             f"that number as its repeats (dataset.sources[].repeats), and no source above them:",
             "  dataset:", "    sources:"]
    for f, (n, _) in shown:
        lines += [f"      - uri: {f}", f"        repeats: {n}"]
    if len(odd) > len(shown):
        lines.append(f"      # ... and the other {len(odd) - len(shown)} folders")
    return lines


def read_caption(path: Path) -> str:
    """A caption file's text, stripped (a UTF-8 byte order mark dropped); raises UnicodeDecodeError
    for bytes that are not UTF-8 (rather than training on replacement characters)."""
    return path.read_bytes().decode("utf-8-sig").strip()


def sniff(head: bytes) -> Optional[str]:
    """"image" or "video" from a file's first bytes (its magic number), or None when unknown."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if (head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip") or head.startswith((b"\x1aE\xdf\xa3", b"GIF8"))
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")):
        return "video"
    return None


ENVIRONMENTAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.ENOSPC, errno.EAGAIN, errno.ENOENT,
                        errno.ESTALE, errno.ETIMEDOUT, errno.EACCES}


def is_environmental(err: BaseException) -> bool:
    """Whether a failure to read a file says something about this machine (memory, file handles,
    disk, a vanished or unreadable path) rather than about the file's bytes. Pure."""
    return isinstance(err, MemoryError) or (isinstance(err, OSError) and err.errno in ENVIRONMENTAL_ERRNOS)


def failure_reason(suffix: str, head: bytes, err: BaseException) -> str:
    """Why a media file that failed to probe is skipped (one of SKIP_REASONS): tooLarge for a pixel
    limit, wrongExtension when its content is not the kind (image, video) its extension says,
    corrupt otherwise. Pure: the content is only sniffed to name the failure, so a PNG named .jpg
    that decodes is still trained."""
    from PIL import Image
    if isinstance(err, (MediaTooLarge, Image.DecompressionBombError)):
        return "tooLarge"
    kind = "image" if suffix.lower() in IMAGE_EXTENSIONS else "video"
    return "corrupt" if sniff(head) == kind else "wrongExtension"


def check_item(item: Item, fps: float | None = None, decode: bool = True):
    """Check one item before training: its media file (not empty, decodes, within the pixel limits)
    and its mask (decodes, the item's size). Returns (probe, None) or (None, Skip). decode=False:
    an image is read from its header only (see probe)."""
    path = item.image
    try:
        size = path.stat().st_size
        if size == 0:
            return None, Skip(item.name, "emptyFile")
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return None, Skip(item.name, "corrupt", f"{type(e).__name__}: {e}", lasting=not is_environmental(e))
    try:
        meta = probe(path, fps, decode)
    except Exception as e:  # noqa: BLE001 - any decoder failure means skip and count
        return None, decode_skip(item, e, head)
    if item.mask is not None:
        from .masks import probe_mask
        try:
            mw, mh = probe_mask(item.mask)
        except Exception as e:  # noqa: BLE001
            return None, Skip(item.name, "maskUnreadable", f"{item.mask.name}: {type(e).__name__}: {e}"[:300],
                              lasting=not is_environmental(e))
        if (mw, mh) != meta[:2]:
            return None, Skip(item.name, "maskSizeMismatch", f"{item.mask.name} is {mw}x{mh}, the item {meta[0]}x{meta[1]}")
    return meta, None


def decode_skip(item: Item, err: BaseException, head: bytes | None = None) -> Skip:
    """Why an item whose media failed to decode (here, or later for the cache) is skipped, named by
    failure_reason from the file's first bytes (read when not given); not lasting when the machine,
    not the file, failed."""
    if head is None:
        try:
            with open(item.image, "rb") as f:
                head = f.read(16)
        except OSError:
            head = b""
    return Skip(item.name, failure_reason(item.image.suffix, head, err), f"{type(err).__name__}: {err}"[:300],
                lasting=not is_environmental(err))


def probe(path: Path, fps: float | None = None, decode: bool = True) -> tuple[int, int, int, bool]:
    """(width, height, frames, is_video) of a media file, decoding it fully (so a corrupt file
    fails here): frames counted at the training rate fps (as load_clip would give them), 1 for
    an image. decode=False reads an image's header only (its size and EXIF orientation): a file
    corrupt past its header then fails when it is decoded for the cache. Raises MediaTooLarge
    beyond MAX_PIXELS (from the header, before decoding) or MAX_VIDEO_PIXELS, OSError/ValueError/av
    errors for unreadable files."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        from PIL import Image, ImageOps
        with Image.open(path) as im:
            check_pixels(*im.size)
            if decode or (im.format == "PNG" and png_metadata_after_pixels(path)):
                im.load()  # a PNG's eXIf or XMP after its pixels is read only by decoding it
                w, h = ImageOps.exif_transpose(im).size
            else:  # orientations 5-8 turn by 90 degrees
                w, h = im.size[::-1] if header_orientation(im) in (5, 6, 7, 8) else im.size
        if min(w, h) < 1:
            raise ValueError("image has no pixels")
        return w, h, 1, False
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        check_pixels(stream.codec_context.width or 0, stream.codec_context.height or 0)
        w = h = 0
        timed = []
        for frame in container.decode(stream):
            w, h = (frame.height, frame.width) if upright_quarter_turns(frame) % 2 else (frame.width, frame.height)
            check_pixels(w, h, len(timed) + 1)
            timed.append((frame.time, None))
    if not timed:
        raise ValueError("video has no frames")
    n = sum(1 for _ in pick_frames(iter(timed), 10 ** 9, fps)) if fps else len(timed)
    return w, h, n, True


def header_orientation(im) -> Optional[int]:
    """The orientation ImageOps.exif_transpose will apply to an opened image (EXIF's, a PNG's
    "Raw profile type exif" text, else XMP's tiff:Orientation, as Pillow's getexif reads them),
    without decoding it: PngImageFile.getexif() decodes the whole picture first, the base class's
    reads what the header gave (a PNG's chunks after its pixels: png_metadata_after_pixels)."""
    from PIL import Image
    return Image.Image.getexif(im).get(0x0112)


def upright_quarter_turns(frame) -> int:
    """Quarter turns counterclockwise that show a decoded video frame as its container says it is
    displayed (the display matrix a phone writes for a portrait video; frame.rotation, in degrees
    counterclockwise); 0 without one."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def upright(frame):
    """The frame as a PIL image, turned as it is displayed (upright_quarter_turns): a portrait phone
    video is stored landscape with a rotation, and trained sideways without it."""
    from PIL import Image
    turns = upright_quarter_turns(frame)
    im = frame.to_image()
    return im.transpose((None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                         Image.Transpose.ROTATE_270)[turns]) if turns else im


def png_metadata_after_pixels(path: Path) -> bool:
    """Whether a PNG has an eXIf or text chunk (XMP is an iTXt) after its first IDAT: Pillow reads
    those, and ImageOps.exif_transpose turns the picture by them, only once it is decoded. Reads
    the chunk headers only. I/O."""
    import struct
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
        seen_pixels = False
        while True:
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IDAT":
                seen_pixels = True
            elif seen_pixels and kind in (b"eXIf", b"iTXt", b"tEXt", b"zTXt"):
                return True
            elif kind == b"IEND":
                return False
            f.seek(length + 4, 1)  # the data and its CRC


def to_8bit(im):
    """A 16-bit or 32-bit single-channel image (PNG's I;16, I, F) scaled to 8 bits: convert("RGB")
    would clip it at 255 (a 16-bit grey gradient trains as white, a mid-grey mask weighs 1). Other
    modes as they are. Pure."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    import numpy as np
    from PIL import Image
    a = np.asarray(im, dtype=np.float64)
    top = 1.0 if im.mode == "F" and a.size and a.max() <= 1.0 else 65535.0 if a.size and a.max() <= 65535 else float(a.max())
    return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def check_pixels(width: int, height: int, frames: int = 1) -> None:
    """Raise MediaTooLarge for an image or frame beyond MAX_PIXELS, or a video beyond MAX_VIDEO_PIXELS."""
    if width * height > MAX_PIXELS:
        raise MediaTooLarge(f"{width}x{height} is {width * height:,} pixels; the limit is {MAX_PIXELS:,} per image or frame")
    if frames > 1 and frames * width * height > MAX_VIDEO_PIXELS:
        raise MediaTooLarge(f"more than {frames - 1} frames of {width}x{height}: over the limit of "
                            f"{MAX_VIDEO_PIXELS:,} pixels per video")


def load_image(path: Path, width: int, height: int | None = None):
    """Decode, resize to cover width x height and centre-crop; returns a float tensor
    [3, height, width] in [-1, 1], or raises OSError/ValueError for an unreadable file."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = on_white(ImageOps.exif_transpose(im))
    return _to_tensor(_fit(im, width, height or width))


def on_white(im):
    """RGB, with transparent pixels composited onto white (as diffusion-pipe does): converting
    straight to RGB would train on whatever colour a transparent area stores, often black. A 16-bit
    grey image is scaled to 8 bits first (to_8bit), not clipped."""
    from PIL import Image
    im = to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode != "RGB" and "transparency" in im.info):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(im)
        return canvas.convert("RGB")
    return im.convert("RGB")


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
            cache[id(frame)] = _to_tensor(_fit(upright(frame), width, height))
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
    if report.unread_captions:
        hint += (f" {report.unread_captions} of them have a same-stem caption file that is not read: their folder's "
                 f"captions.json/.jsonl names the captions there (as in diffusion-pipe); add them to it, or remove it.")
    return hint


def nested_maps_warning(report: ScanReport) -> str:
    """Caption maps below a source's folder are not read (only the source folder's is): said."""
    if not report.nested_maps:
        return ""
    shown = ", ".join(report.nested_maps[:5]) + (" ..." if len(report.nested_maps) > 5 else "")
    return (f"caption maps in subfolders are not read, only the one in a source's own folder ({shown}): the "
            "items they name are captioned by their same-stem caption files, else missing a caption; make each "
            "such folder a source of its own")


def skipped_text(report: ScanReport) -> str:
    """'2 corrupt, 1 emptyFile' (by reason), or ''."""
    return ", ".join(f"{n} {r}" for r, n in report.by_reason().items())


def check_usable(report: ScanReport, uri: str, dropped: str = "") -> None:
    if not report.items:
        s = report.summary()
        why = f" ({skipped_text(report)})" if report.skipped else ""
        named = (f" Skipped: {'; '.join(str(k) for k in report.skipped[:5])}" + (" ..." if len(report.skipped) > 5 else "")
                 + ".") if report.skipped else ""
        raise DatasetError(
            f"dataset {uri}: no usable items (images missing a caption: {s['missingCaption']}, unreadable: "
            f"{s['unreadable']}{why}{dropped}). Add images ({', '.join(IMAGE_EXTENSIONS)}) with same-stem caption files, "
            f"or set dataset.missingCaption: empty to train images without captions." + caption_hint(report) + named)
