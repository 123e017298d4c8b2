"""Caption options: where captions come from (same-stem files, captions.json / captions.jsonl),
tag shuffling with a kept head, and the caption variants a sample draws from. Pure apart from
reading the caption map (read_caption_map).

Tag shuffling follows diffusion-pipe's cache_shuffle_num: `variants` shuffled orders of each
caption are made (seeded by the caption and the run's seed) and encoded once each; every sample
draws one of them (and, with captionDropout p, the empty caption with probability p).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

CAPTION_MAPS = ("captions.json", "captions.jsonl")


@dataclass(frozen=True)
class CaptionOptions:
    extension: str = ".txt"
    prefix: str = ""
    missing: str = "skip"            # skip | empty
    shuffle: bool = False
    variants: int = 4
    keep: int = 0
    delimiter: str = ", "
    dropout: float = 0.0


def options_of(dataset, source=None) -> CaptionOptions:
    """The source's caption options, each unset one taken from the dataset."""
    def pick(name):
        v = getattr(source, name, None) if source is not None else None
        return getattr(dataset, name) if v is None else v
    return CaptionOptions(pick("captionExtension"), pick("captionPrefix"), pick("missingCaption"), pick("shuffleTags"),
                          pick("shuffleVariants"), pick("keepTags"), pick("tagDelimiter"), pick("captionDropout"))


def recursive_of(dataset, source=None) -> bool:
    """Whether a source's subfolders hold items too (the source's setting, else the dataset's)."""
    v = getattr(source, "recursive", None) if source is not None else None
    return getattr(dataset, "recursive", True) if v is None else v


def shuffle_tags(caption: str, rng: random.Random, keep: int = 0, delimiter: str = ", ") -> str:
    """The caption's tags (split on delimiter) in a shuffled order, the first `keep` in place."""
    tags = caption.split(delimiter)
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return delimiter.join(head + tail)


def variants(captions: list[str], opts: CaptionOptions, seed: int) -> list[str]:
    """The caption texts a sample of this item draws from (prefix included): the captions as
    they are, or opts.variants shuffled orders of each."""
    if not opts.shuffle:
        return [opts.prefix + c for c in captions]
    out = []
    for c in captions:
        rng = random.Random(f"{seed}:{c}")
        out += [opts.prefix + shuffle_tags(c, rng, opts.keep, opts.delimiter) for _ in range(opts.variants)]
    return out


def read_caption_map(root: Path, present: Callable[[Path], bool] = Path.is_file) -> Optional[dict[str, list[str]]]:
    """captions.json ({file name: caption or [captions]}) or captions.jsonl (one {"file": name,
    "caption": text or [texts]} per line) in root, as {file name: [captions]}; None when neither is there
    (present: whether a file is part of the source). Raises ValueError naming the file and line for
    a malformed map."""
    for name in CAPTION_MAPS:
        p = root / name
        if not present(p):
            continue
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 (byte {e.object[e.start]:#04x} at {e.start}); save it as UTF-8") from None
        try:
            if name.endswith(".jsonl"):
                rows = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
                raw = {}
                for n, row in rows:
                    if not isinstance(row, dict) or "file" not in row or "caption" not in row:
                        raise ValueError(f"line {n}: expected {{\"file\": ..., \"caption\": ...}}")
                    raw[str(row["file"])] = row["caption"]
            else:
                raw = json.loads(text)
                if not isinstance(raw, dict):
                    raise ValueError("expected an object {file name: caption}")
            for k, v in raw.items():  # null, [] or a number would train "None", crash, or train "5"
                if not (isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))):
                    raise ValueError(f"{str(k)!r}: expected a caption (a string) or a non-empty list of captions, "
                                     f"got {json.dumps(v)}; leave the file out for no caption (dataset.missingCaption)")
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from None
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        return {k: [x.strip() for x in (v if isinstance(v, list) else [v])] for k, v in raw.items()}
    return None
