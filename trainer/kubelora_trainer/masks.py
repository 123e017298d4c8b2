"""Loss masks (dataset.maskUri / dataset.sources[].maskUri; diffusion-pipe's mask_path).

As diffusion-pipe has them (models/base.py, utils/dataset.py, models/<family>.py):
- an item's mask is the file with the item's stem, any extension, in the mask folder (here: in the
  same relative folder, so a flat dataset matches diffusion-pipe exactly); an item without one trains
  unmasked, with a warning;
- the mask is read as RGB and its first (red) channel is the weight, 0..255 -> 0..1: white trains,
  black is ignored, grey weighs in between; it must be the size of the item (for a video, of its
  frames) and is applied to every frame;
- it is resized and cropped exactly like its item (cover the bucket, centre crop, bicubic), then
  brought to the latent grid with nearest-exact interpolation;
- the squared error is multiplied by it and averaged over all elements (not over the mask), so a
  mostly masked item contributes less to the loss (objectives.weighted_mse).

Differences, both to skip rather than stop or train what was masked out: a mask that does not decode
or is another size skips its item (maskUnreadable, maskSizeMismatch) where diffusion-pipe raises and
stops the run. The cached sample holds the latent-grid mask under "mask" (its key covers the mask's
bytes: media_key); a batch mixing masked and unmasked items gets all-ones masks for the latter.
"""
from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Optional

import torch

MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_mask(mask_root: Path, rel: Path, listed: Optional[set[str]] = None) -> Optional[Path]:
    """The mask of the item at relative path rel: a file with its stem (any image extension) in the
    same relative folder under mask_root; the first in name order when several match. listed: for
    a mask folder staged from a bucket, the names its listing holds (a file an earlier run left
    there, since deleted from the bucket, is not a mask)."""
    folder = Path(mask_root) / Path(rel).parent
    stem = Path(rel).stem
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.glob(f"{glob.escape(stem)}.*")
                  if p.is_file() and p.stem == stem and p.suffix.lower() in MASK_EXTENSIONS
                  and (listed is None or p.relative_to(mask_root).as_posix() in listed))
    return hits[0] if hits else None


def probe_mask(path: Path) -> tuple[int, int]:
    """(width, height) of a mask as its item is measured (EXIF orientation applied), decoding it
    fully so that a corrupt mask fails here; the pixel limit is checked before decoding."""
    from PIL import Image, ImageOps

    from .data import check_pixels
    with Image.open(path) as im:
        check_pixels(*im.size)
        im.load()
        return ImageOps.exif_transpose(im).size


def load_mask(path: Path, width: int, height: int) -> torch.Tensor:
    """The mask resized to cover width x height and centre-cropped as its item is (data._fit), its
    red channel as weights in [0, 1]: a float tensor [height, width]."""
    import numpy as np
    from PIL import Image, ImageOps

    from .data import _fit, to_8bit
    with Image.open(path) as im:
        im.load()
        im = to_8bit(ImageOps.exif_transpose(im)).convert("RGB")  # a 16-bit grey mask's levels kept
    fitted = _fit(im, width, height)
    return torch.from_numpy(np.asarray(fitted, dtype=np.float32)[:, :, 0].copy()) / 255.0


def to_latent_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [H, W] on the latent grid [h, w] (nearest-exact, as diffusion-pipe). Pure."""
    return torch.nn.functional.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest-exact")[0, 0]


def latent_mask(path: Path, width: int, height: int, grid: tuple[int, int]) -> torch.Tensor:
    """What the cache stores for a masked sample at bucket width x height: [h, w] on the latent grid."""
    return to_latent_grid(load_mask(path, width, height), grid)


def media_key(media: bytes, mask: Optional[bytes]) -> bytes:
    """The bytes a cached sample's key covers: the media file's, and for a masked item a digest
    of its mask's (an unmasked item's bytes are its media's alone)."""
    if mask is None:
        return media
    return media + b"\0kubelora-mask\0" + hashlib.sha256(mask).digest()


def fill_masks(samples: list[dict]) -> list[dict]:
    """A batch's samples, every one with a "mask" when any has one (all ones for the unmasked: they
    train normally), none when none has. Samples of one bucket share a latent grid. Pure."""
    grids = {tuple(s["mask"].shape) for s in samples if "mask" in s}
    if not grids:
        return samples
    (grid,) = grids  # one bucket, one grid
    return [s if "mask" in s else {**s, "mask": torch.ones(grid, dtype=torch.float32)} for s in samples]
