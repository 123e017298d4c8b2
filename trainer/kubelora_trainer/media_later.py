"""A dataset's media fetched by the ranks that read them, not by every node at stage-in.

Stage-in (node-local rank 0) fetches a source's captions, caption maps and other small files and
lists its media without fetching them (storage.download's `later`); the scan counts the listed
media as present. The rank that hashes and probes an item (dataset_phase.probe_items: item i on
rank i % world) fetches its media first, and the same rank encodes its units
(cache.split_units by the item's probe order), so on a cluster each media file is fetched once
in all, by the node that reads it, instead of once per node. A node with a warm cache folder (a
cache claim) fetches nothing it holds: its stage index says what is current.

With dataset.cacheUri the media's content hashes are shared too: a digest memo per source
(`media/<hash of the source URI>.json.gz` under the prefix: {relative name: [ETag, size,
SHA-256]}) that stage-in pulls, so an item whose object is unchanged (same ETag and size) is keyed
without its bytes; its media are fetched only when its probe or its cache entries are not to be
had otherwise. A node with a warm shared cache fetches no media at all.

What was fetched is recorded in the rank's own index file in the source's folder
(storage.RANK_INDEX), merged into the folder's index at the next stage-in. A failed fetch fails
the phase on every rank with its reason (dist.agree), as a failed stage-in does."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import storage

MEMO_DIR = "media"


def memo_name(uri: str) -> str:
    """A source's digest memo, relative to the cache folder and to dataset.cacheUri."""
    return f"{MEMO_DIR}/{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:32]}.json.gz"


def read_memo(path: Path) -> dict[str, list]:
    """{rel: [etag, size, sha256]} of a memo file; {} when it cannot be read (best effort)."""
    try:
        got = json.loads(gzip.decompress(path.read_bytes()))["media"]
        return {k: v for k, v in got.items() if isinstance(v, list) and len(v) == 3}
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return {}


def write_memo(path: Path, uri: str, memo: dict[str, list]) -> None:
    from .cache import write_bytes_atomic
    write_bytes_atomic(path, gzip.compress(json.dumps({"uri": uri, "media": memo}, sort_keys=True).encode(), 6))


@dataclass
class Source:
    """One source's media: its URI, staged folder, every listed media object ({rel: [key, etag,
    size, sha256 known from the memo or ""]}) and those not fetched yet (pending)."""
    uri: str
    folder: Path
    listed: dict[str, list] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    others: list[str] = field(default_factory=list)  # the other names listed (captions, maps, masks)

    def obj(self, rel: str) -> dict:
        key, etag, size, _ = self.listed[rel]
        return {"Key": key, "ETag": etag, "Size": size, "rel": rel}


class Later:
    """The media of every source that stage-in listed, and those it left for the ranks that read them."""

    def __init__(self, sources: dict[str, Source], settings: storage.S3Settings = storage.S3Settings(), rank: int = 0):
        self.sources, self.settings, self.rank = sources, settings, rank
        self.vanished: set[Path] = set()  # deleted from the bucket since stage-in listed them
        self._client = None
        self._indexes: dict[str, dict] = {}  # each source folder's merged stage index, read once

    @classmethod
    def from_staged(cls, later: dict[str, dict], paths: dict[str, str], settings: storage.S3Settings,
                    rank: int, node_ranks: int = 1) -> "Later":
        """From stage_in's records ({stage key: record()}). The node's node_ranks ranks fetch at
        once, so each keeps its share of the transfers in flight that one stage-in would."""
        settings = dataclasses.replace(settings, small_concurrency=max(4, settings.small_concurrency // node_ranks),
                                       concurrency=max(2, settings.concurrency // node_ranks))
        sources = {}
        for k, v in later.items():
            src = sources[k] = Source(v["uri"], Path(paths[k]), others=v.get("others", []))
            for rel, key, etag, size, put_off, sha in v["objs"]:
                src.listed[rel] = [key, etag, size, sha]
                if put_off:
                    src.pending.add(rel)
        return cls(sources, settings, rank)

    @staticmethod
    def record(uri: str, media: list[dict], deferred: list[dict], memo: dict[str, list],
               others: tuple[str, ...] = ()) -> dict:
        """stage_in's record of a source's listed media objects, which were deferred, and the
        SHA-256 of those the memo knows at their current ETag and size (compact: a million of them
        are read by every rank of the node), and the other names listed. Pure."""
        put_off = {o["rel"] for o in deferred}

        def sha(o: dict) -> str:
            m = memo.get(o["rel"])
            return m[2] if m is not None and [m[0], m[1]] == [o["ETag"], o["Size"]] else ""
        return {"uri": uri, "objs": [[o["rel"], o["Key"], o["ETag"], o["Size"], int(o["rel"] in put_off), sha(o)]
                                     for o in media], "others": list(others)}

    def absent(self, key: str) -> list[str]:
        """The relative names of source `key`'s media not fetched yet (for the scan)."""
        src = self.sources.get(key)
        return sorted(src.pending) if src is not None else []

    def listed(self, key: str) -> Optional[set[str]]:
        """Every name source `key`'s listing held (None: not a source staged from a bucket)."""
        src = self.sources.get(key)
        return None if src is None else {*src.listed, *src.others}

    def _where(self, p: Path) -> Optional[tuple[str, str]]:
        """(stage key, relative name) of a listed media path; None for another file. Pure."""
        for key, src in self.sources.items():
            if p.is_relative_to(src.folder):
                rel = p.relative_to(src.folder).as_posix()
                if rel in src.listed:
                    return key, rel
        return None

    def listed_media(self, p: Path) -> bool:
        """Whether p is a media file of a source listed from a bucket (fetched by the rank that
        reads it, so on that rank's node alone)."""
        return self._where(p) is not None

    def digest_of(self, p: Path) -> Optional[str]:
        """The media's SHA-256 when the memo knows its object unchanged, else None."""
        where = self._where(p)
        return (self.sources[where[0]].listed[where[1]][3] or None) if where else None

    def to_fetch(self, paths: Iterable[Path]) -> int:
        """The bytes fetching the media among paths would add to the disk (a fetched file replaces
        its stale copy, so only what it adds counts, as at stage-in)."""
        need = 0
        for p in paths:
            where = self._where(p)
            if where is not None and where[1] in self.sources[where[0]].pending:
                try:
                    held = p.stat().st_size
                except OSError:
                    held = 0
                need += max(0, self.sources[where[0]].listed[where[1]][2] - held)
        return need

    def fetch(self, paths: Iterable[Path], log: Callable[[str], None] = print,
              progress: Optional[Callable[[], None]] = None) -> int:
        """Fetch the media among paths that stage-in left for later (once: then they are local).
        Returns how many files this rank fetched; those deleted from the bucket since they were
        listed are added to `vanished` (their items are skipped), the others fetched."""
        todo: dict[str, list[dict]] = {}
        for p in paths:
            where = self._where(p)
            if where is not None and where[1] in self.sources[where[0]].pending:
                todo.setdefault(where[0], []).append(self.sources[where[0]].obj(where[1]))
        n = 0
        for key, objs in todo.items():
            src, gone = self.sources[key], []
            if self._client is None:
                self._client = storage.make_client(self.settings)
            if key not in self._indexes:
                self._indexes[key] = storage.load_index(src.folder)
            n += storage.fetch_later(src.uri, objs, src.folder, self.settings, self.rank, self._client, log, progress,
                                     gone, self._indexes[key])
            src.pending -= {o["rel"] for o in objs}
            self.vanished |= {src.folder / o["rel"] for o in gone}
            if not src.pending:  # nothing left to fetch: the index (hundreds of bytes a record) goes
                self._indexes.pop(key, None)
        return n

    def release(self) -> None:
        """Forget the stage indexes read for fetching (the dataset phase is over; the object lives
        on through training)."""
        self._indexes.clear()

    def memos(self, digests: dict[Path, str]) -> dict[str, dict[str, list]]:
        """{stage key: memo} of every source: the media digests the memo knew, with digests (media
        path: SHA-256, this run's) added, for the listed objects only. Pure."""
        out: dict[str, dict[str, list]] = {k: {rel: [etag, size, sha] for rel, (_, etag, size, sha) in src.listed.items()
                                               if sha} for k, src in self.sources.items()}
        for p, sha in digests.items():
            where = self._where(p)
            if where is not None:
                _, etag, size, _ = self.sources[where[0]].listed[where[1]]
                out[where[0]][where[1]] = [etag, size, sha]
        return out

    def __bool__(self) -> bool:
        return any(src.pending for src in self.sources.values())


NONE = Later({})
