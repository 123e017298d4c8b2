"""dataset.cacheUri: the latent cache shared through an S3 prefix (or a shared local path), so that
a job on another node pool or cluster skips encoding.

Layout under the prefix: the cache folder's own, `latents/<key>.pt` and `probes/<name>.json`, and
a digest memo per dataset source, `media/<hash of its URI>.json.gz` (media_later).

- Pre-flight (rank 0, before stage-in): the prefix must be writable (a marker put and deleted, as
  for output.uri) and is listed once (one paginated LIST, no HEAD per key). A bad-input failure
  (no bucket, access denied, no credentials) fails the run with a message naming
  dataset.cacheUri; a transient one is a warning and the run goes on without the shared cache.
- Probes: each rank fetches the listed probes of its own share of the items (dataset_phase.probe_items)
  that its node lacks, so a pulled cache decodes nothing.
- Entries: the entries missing on every rank that are listed are split round robin over all
  ranks; each fetches its share into its node's folder, and the exchange after encoding copies
  them to the other nodes (each entry crosses the store once, however many nodes there are).
- After encoding and the exchange (every node then holds every entry), the entries the listing
  lacks are split round robin over ranks and uploaded, each once; each rank uploads the probes of
  its own items that the listing lacks (storage.upload: one PUT with its Content-MD5, which the
  server checks; a file past the multipart threshold through a temporary key). So a node's older cache is shared too, not only what this run
  encoded.
- A failed download or upload is a warning, never a failed run: what was not downloaded is
  encoded here, what was not uploaded is not shared. After a rank's first failure it tries no
  more (a store that failed one request after its retries would likely fail the next, each
  costing its retries and timeouts).

Planning (what to fetch, who fetches it, what to push) is pure; the transfers are at the edge.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import storage

FIELD = "dataset.cacheUri"
NAME = re.compile(r"^(latents/[0-9a-f]{32}\.pt|probes/[0-9a-f]{32}\.json|media/[0-9a-f]{32}\.json\.gz)$")


# ---------------------------------------------------------------- planning (pure)

def cache_names(listing: dict[str, int]) -> dict[str, int]:
    """The entries and probes of a listing ({name: size}); anything else under the prefix (an
    upload's temporary .part key, a write-check marker, foreign files) is not the cache's."""
    return {k: v for k, v in listing.items() if NAME.match(k)}


def entry_name(key: str) -> str:
    return f"latents/{key}.pt"


def pull_share(missing: list[str], remote: dict[str, int], world: int, rank: int) -> list[str]:
    """The names of the entries (keys missing on every rank) that this rank downloads: those
    listed under the prefix, round robin over ranks in the order given (every rank computes the
    same split from the same lists)."""
    found = [entry_name(k) for k in dict.fromkeys(missing) if entry_name(k) in remote]
    return found[rank::world]


def push_share(keys: list[str], remote: dict[str, int], world: int, rank: int) -> list[str]:
    """The names of the entries (every rank holds every key after the exchange) that the prefix
    lacks and this rank uploads: round robin over ranks, so each is uploaded once."""
    return [entry_name(k) for k in dict.fromkeys(keys) if entry_name(k) not in remote][rank::world]


def push_list(names: list[str], remote: dict[str, int]) -> list[str]:
    """What of names (the probes of this rank's items) the prefix lacks, once each."""
    return [n for n in dict.fromkeys(names) if n not in remote]


def stats(moved: dict[str, Moved]) -> dict:
    """manifest.json's cache counts of the transfers ({"pulled"|"probes pulled"|"pushed"|"probes
    pushed": totals over ranks}). Pure."""
    z = Moved()
    pulled, ppulled = moved.get("pulled", z), moved.get("probes pulled", z)
    pushed, ppushed = moved.get("pushed", z), moved.get("probes pushed", z)
    return {"pulled": pulled.files, "probesPulled": ppulled.files, "pulledBytes": pulled.bytes + ppulled.bytes,
            "pullFailed": pulled.failed + ppulled.failed, "pushed": pushed.files, "probesPushed": ppushed.files,
            "pushedBytes": pushed.bytes + ppushed.bytes, "pushFailed": pushed.failed + ppushed.failed}


@dataclass
class Moved:
    """What one rank moved one way: files, bytes, files not moved (failed, or not tried after a
    failure) and the first failure's message."""
    files: int = 0
    bytes: int = 0
    failed: int = 0
    error: Optional[str] = None
    names: list[str] = field(default_factory=list)   # the names moved
    damaged: list[str] = field(default_factory=list)  # pulled objects that were not cache entries (dropped)

    @staticmethod
    def total(parts: list["Moved"]) -> "Moved":
        """Summed over ranks; the first error kept."""
        return Moved(sum(p.files for p in parts), sum(p.bytes for p in parts), sum(p.failed for p in parts),
                     next((p.error for p in parts if p.error), None), [n for p in parts for n in p.names],
                     [n for p in parts for n in p.damaged])


def transfer_line(verb: str, m: Moved, uri: str) -> str:
    """'[cache] pulled 12 files (3.4 MiB) from s3://b/c' (+ a warning when some failed). Pure."""
    text = f"[cache] {verb} {m.files} file(s) ({m.bytes / storage.MB:.1f} MiB) {'from' if verb == 'pulled' else 'to'} {uri}"
    if m.failed:
        text += (f"; warning: {m.failed} not {verb} (" + ("encoded here instead" if verb == "pulled" else "not shared")
                 + f"); first failure: {m.error}")
    return text


# ---------------------------------------------------------------- transfers

class Damaged(str):
    """Remote.pull's answer for an object that is not a cache entry (dropped here and there)."""


class Remote:
    """The prefix and what the pre-flight listing found under it ({name: size})."""

    def __init__(self, uri: str, settings: storage.S3Settings, listing: dict[str, int]):
        self.uri, self.settings, self.listing = uri.rstrip("/"), settings, cache_names(listing)
        self._client = None
        self.probes: list[str] = []  # the probes of this rank's items (pushed after encoding unless listed)
        self.probes_pulled = Moved()  # this rank's probe downloads (dataset_phase.probe_items)

    def _loc(self, name: str) -> str:
        return str(storage.parse_uri(self.uri).child(name))

    def client(self):
        if self._client is None and storage.parse_uri(self.uri).is_s3:
            self._client = storage.make_client(self.settings)  # boto3 clients are thread-safe
        return self._client

    def _each(self, names: list[str], one: Callable[[str], int]) -> Moved:
        """one(name) -> bytes, over a thread pool; after the first failure no new one starts."""
        out, lock, stop = Moved(), threading.Lock(), threading.Event()

        def run(name: str) -> None:
            if stop.is_set():
                with lock:
                    out.failed += 1
                return
            try:
                n = one(name)
                if isinstance(n, Damaged):  # counted as not pulled (so encoded), the other pulls go on
                    with lock:
                        out.failed += 1
                        out.error = out.error or str(n)
                        out.damaged.append(name)
                    return
            except (storage.StorageError, OSError) as e:
                stop.set()
                with lock:
                    out.failed += 1
                    out.error = out.error or str(e)
                return
            with lock:
                out.files, out.bytes = out.files + 1, out.bytes + n
                out.names.append(name)
        if names:
            with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(names))) as pool:
                list(pool.map(run, names))
        return out

    def pull(self, names: list[str], root: Path) -> Moved:
        """Download these listed names into the cache folder root. An entry that does not load (a
        damaged object in the shared prefix) is dropped here and there, counted as failed: it is
        encoded again and pushed in its place, not trained from or fetched by every later run."""
        def one(name: str) -> int:
            path = root / name
            storage.download_file(self._loc(name), path, self.listing[name], self.settings, self.client())
            if name.startswith("latents/"):
                from .cache import check_entry
                try:
                    check_entry(path)
                except Exception as e:  # noqa: BLE001 - any bytes that are not an entry
                    path.unlink(missing_ok=True)
                    try:
                        storage.delete_object(self._loc(name), self.settings, self.client())
                    except storage.StorageError:
                        pass  # still listed: the next run drops it too
                    return Damaged(f"{self._loc(name)}: not a cache entry ({type(e).__name__}); dropped, encoded again")
            return self.listing[name]
        return self._each(names, one)

    def push(self, names: list[str], root: Path) -> Moved:
        """Upload these files of the cache folder root under the prefix (a name this rank no
        longer has, e.g. an entry dropped since, is skipped)."""
        def one(name: str) -> int:
            return storage.upload(root / name, self._loc(name), self.settings, self.client())["size"]
        return self._each([n for n in names if (root / n).is_file()], one)


def preflight(uri: Optional[str], settings: storage.S3Settings, log: Callable[[str], None]) -> Optional[Remote]:
    """Rank 0, before stage-in: check that the prefix is writable and list it. None when unset or
    when the store failed transiently (a warning: the run goes on without the shared cache);
    raises StorageError naming dataset.cacheUri when the input is wrong."""
    if not uri:
        return None
    try:
        loc = storage.parse_uri(uri)
        client = storage.make_client(settings) if loc.is_s3 else None
        storage.check_writable(uri, settings, client)
        listing = storage.list_sizes(uri, settings, client)
    except storage.StorageError as e:
        if e.transient:
            log(f"[cache] warning: {FIELD} {uri} is unavailable ({e}); encoding here and sharing nothing this run")
            return None
        raise storage.StorageError(f"{FIELD}: {e}", transient=False) from None
    remote = Remote(uri, settings, listing)
    n = sum(1 for k in remote.listing if k.startswith("latents/"))
    probes = sum(1 for k in remote.listing if k.startswith("probes/"))
    log(f"[cache] {FIELD} {uri}: {n} entries and {probes} probes listed")
    return remote


# ---------------------------------------------------------------- over all ranks

def gathered(m: Moved, env) -> Moved:
    """m summed over all ranks (every rank calls it)."""
    from . import dist
    return Moved.total(dist.all_gather(m) if env.world > 1 else [m])


def pull_entries(remote: Remote, missing: list[str], root: Path, env) -> tuple[set[str], Moved]:
    """Every rank downloads its share of the listed entries that no rank has (pull_share) into its
    node's folder; returns the keys pulled by any rank, and the totals. A failure on any rank is a
    warning (Moved.failed): those entries are encoded."""
    from . import dist
    mine = dist.agree(remote.pull, pull_share(missing, remote.listing, env.world, env.rank), root)
    total = gathered(mine, env)
    for name in total.damaged:  # off every rank's listing alike: push_share's split stays the same everywhere,
        remote.listing.pop(name, None)  # and the entry encoded here replaces the damaged object
    return {n[len("latents/"):-len(".pt")] for n in total.names}, total


def push(remote: Remote, names: list[str], root: Path, env, force: tuple[str, ...] = ()) -> Moved:
    """Every rank uploads what of names (its own new entries and probes) the listing lacks, and
    force (probes it rewrote, e.g. a file found corrupt when encoded); returns the totals."""
    from . import dist
    force = list(dict.fromkeys(force))
    todo = push_list([n for n in names if n not in force], remote.listing) + force
    mine = dist.agree(remote.push, todo, root)
    total = gathered(mine, env)
    total.names = []  # not needed past here, and large
    return total
