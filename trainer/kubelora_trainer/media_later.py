"""A dataset's media fetched by the ranks that read them, not by every node at stage-in.

Stage-in (node-local rank 0) fetches a source's captions, caption maps and other small files and
lists its media without fetching them (storage.download's `later`); the scan counts the listed
media as present. The rank that hashes and probes an item (dataset_phase.probe_items: item i on
rank i % world) fetches its media first, and the same rank encodes its units
(cache.split_units by the item's probe order), so on a cluster each media file is fetched once
in all, by the node that reads it, instead of once per node. A node with a warm cache folder (a
cache claim) fetches nothing it holds: its stage index says what is current.

What was fetched is recorded in the rank's own index file in the source's folder
(storage.RANK_INDEX), merged into the folder's index at the next stage-in. A failed fetch fails
the phase on every rank with its reason (dist.agree), as a failed stage-in does."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import storage


@dataclass
class Source:
    """One source's media left for later: its URI, staged folder and {rel: listed object}."""
    uri: str
    folder: Path
    objs: dict[str, dict] = field(default_factory=dict)


class Later:
    """The media of every source that stage-in left for the ranks that read them."""

    def __init__(self, sources: dict[str, Source], settings: storage.S3Settings = storage.S3Settings(), rank: int = 0):
        self.sources, self.settings, self.rank = sources, settings, rank
        self._client = None

    @classmethod
    def from_staged(cls, later: dict[str, dict], paths: dict[str, str], settings: storage.S3Settings,
                    rank: int) -> "Later":
        """From stage_in's record ({stage key: {"uri", "objs": [[rel, key, etag, size], ...]}})."""
        return cls({k: Source(v["uri"], Path(paths[k]), {rel: {"Key": key, "ETag": etag, "Size": size, "rel": rel}
                                                          for rel, key, etag, size in v["objs"]})
                    for k, v in later.items()}, settings, rank)

    @staticmethod
    def record(uri: str, objs: list[dict]) -> dict:
        """stage_in's record of one source's deferred objects (compact: a million of them are read
        by every rank of the node)."""
        return {"uri": uri, "objs": [[o["rel"], o["Key"], o["ETag"], o["Size"]] for o in objs]}

    def absent(self, key: str) -> list[str]:
        """The relative names of source `key`'s media not fetched yet (for the scan)."""
        src = self.sources.get(key)
        return list(src.objs) if src is not None else []

    def pending(self, paths: Iterable[Path]) -> dict[str, list[dict]]:
        """{stage key: listed objects} of the paths still to fetch (by this rank). Pure."""
        out: dict[str, list[dict]] = {}
        for p in paths:
            for key, src in self.sources.items():
                if p.parent == src.folder or p.is_relative_to(src.folder):
                    o = src.objs.get(p.relative_to(src.folder).as_posix())
                    if o is not None:
                        out.setdefault(key, []).append(o)
                        break
        return out

    def fetch(self, paths: Iterable[Path], log: Callable[[str], None] = print,
              progress: Optional[Callable[[], None]] = None) -> int:
        """Fetch the media among paths that stage-in left for later (once: then they are local).
        Returns how many files this rank fetched."""
        n = 0
        for key, objs in self.pending(paths).items():
            src = self.sources[key]
            if self._client is None:
                self._client = storage.make_client(self.settings)
            n += storage.fetch_later(src.uri, objs, src.folder, self.settings, self.rank, self._client, log, progress)
            for o in objs:
                src.objs.pop(o["rel"], None)
        return n

    def __bool__(self) -> bool:
        return any(src.objs for src in self.sources.values())


NONE = Later({})
