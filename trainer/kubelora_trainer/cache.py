"""The latent cache on the node's cache volume, and the loader that streams it during training.

Layout under cache_root() (the node's emptyDir or PVC, $KUBELORA_CACHE_DIR):

    latents/<key>.pt     one sample's tensors (family.encode's dict for one unit and one caption),
                         key = cache_key(): everything the tensors depend on (model files, family
                         settings, bucket size and frames, clip start, fit, caption, media bytes)
    probes/<key>.json    a media file's (width, height, frames at the training rate, is_video),
                         keyed by its content hash and the rate: a later run decodes nothing
    digests/<id>.json    a media file's content hash, by its path, size, mtime and inode: a later
                         run hashes only what changed (media_digest)

Every file is written to a temporary name and renamed into place (os.replace), so ranks sharing
one folder (the ranks of a node) or a killed run never leave a partial entry under a final name.

Which entries a run needs is known before any model is loaded (the keys need only the encoder
files' fingerprints, the spec, the media bytes and the captions): a run whose entries all
exist on some rank loads neither the VAE nor the text encoders (family.load(encoders=False)).
Missing entries are encoded split over all ranks, then each rank receives the entries its node
lacks (exchange(): bounded rounds, each sender's share broadcast from it), so every rank can read every sample.

Pure planning (what to encode, who sends what in which round) is separate from the I/O.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import buckets as bk
from . import disk
from .families import PATH_FIELDS, RULES, frames_of, size_of

CACHE_FORMAT = 6  # bump whenever what encode() writes for the same inputs changes (5: keyed by the encoders only; 6: 16-bit grey scaled, not clipped);
# a change in one family's encode() bumps that family's FamilyRules.cache_format instead
# model settings the encoders never see (the denoiser's storage, the loss, the guidance input): not in
# the key, so changing one, or the model's URI, reuses the cache (dataset.cacheUri across clusters too)
TRAINING_ONLY = {"transformerDtype", "float8Compute", "fluxShift", "bypassGuidanceEmbedding", "guidance", "vPred",
                 "zeroTerminalSnr", "minSnrGamma", "causalTemporalPositioning"}
# files of the denoiser, which encoding does not use: a separate transformer file, or these folders
DENOISER_FIELDS = {"transformerPath"}
DENOISER_DIRS = {"transformer", "transformers", "unet"}
PROBE_FORMAT = 3  # bump whenever data.check_item's answer for the same bytes changes (2: skips with reasons;
                  # 3: XMP and late PNG orientation, video display rotation)
EXCHANGE_MB_ENV = "KUBELORA_CACHE_EXCHANGE_MB"   # bytes per exchange round (default 256 MiB)
PROGRESS_SECONDS_ENV = "KUBELORA_CACHE_PROGRESS_SECONDS"  # the encoding progress line's period (default 10)
PREFETCH_ENV = "KUBELORA_PREFETCH_BATCHES"   # micro-batches read ahead during training (default 2; 0: none)
FIT = "cover+center-crop+alpha-on-white"


# ---------------------------------------------------------------- keys (pure)

def cache_inputs(spec, model_fingerprint: str) -> dict:
    """Everything besides the media bytes and the caption that a cached tensor depends on."""
    w, h = size_of(spec.dataset)
    r = RULES[spec.model.type]
    model = {k: v for k, v in spec.model.model_dump(mode="json").items() if k not in TRAINING_ONLY | set(PATH_FIELDS)}
    return {"format": CACHE_FORMAT, **({"family_format": r.cache_format} if r.cache_format else {}),
            "model": model, "files": model_fingerprint,
            "size": [w, h], "fit": FIT, "frames": frames_of(spec.model.type, spec.dataset) if r.video else 1,
            "fps": r.fps if r.video else None}


def cache_key(inputs: dict, caption: str, media: bytes, unit: Optional[bk.Unit] = None, dropout: bool = False) -> str:
    """media: the media file's bytes or its content digest. With a unit, its bucket size,
    frames, clip start and fit are part of the key and the dataset-wide size and frames are not
    (so adding a resolution re-encodes only the new bucket's samples). dropout: the caption-dropout
    entry of a family that encodes it apart from an empty caption (FamilyRules.dropout_text)."""
    if dropout:
        inputs = {**inputs, "dropout": True}
    if unit is not None:
        inputs = {k: v for k, v in inputs.items() if k not in ("size", "frames")}
        inputs = {**inputs, "unit": {"size": list(unit.bucket[:2]), "frames": unit.bucket[2], "start": unit.start,
                                     "fit": FIT}}
    h = hashlib.sha256(json.dumps({**inputs, "caption": caption}, sort_keys=True).encode())
    h.update(media)
    return h.hexdigest()[:32]


def model_fingerprint(paths: dict[str, str], memo_root: Optional[Path] = None) -> str:
    """The staged encoder files (VAE, text encoders, tokenizers; not the denoiser's, not the
    dataset), by relative name and the sha256 of their whole bytes (media_digest, remembered under
    memo_root so a node hashes a file once): the same files under another URI give the same keys, a
    model replaced at the same URI other keys, a fine-tuned VAE baked into a single SDXL checkpoint
    of the same size included (a sample of blocks spread over a 7 GB file could miss a 160 MB VAE).
    Hidden files (the stage-in index with its ETags, a hub's .cache) are not the model's and are left
    out. Nothing local (paths, mtimes) goes in."""
    h = hashlib.sha256()
    for field in sorted(f for f in paths if f in PATH_FIELDS and f not in DENOISER_FIELDS):
        root = Path(paths[field])
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            rel = p.relative_to(root) if root.is_dir() else Path(p.name)
            if DENOISER_DIRS & set(rel.parts[:-1]) or any(part.startswith(".") for part in rel.parts):
                continue
            h.update(f"{field}|{rel.as_posix()}|{media_digest(p, memo_root)}\n".encode())
    return h.hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


RACY_NS = 2_000_000_000  # a file changed this close to its hashing may not show it in its mtime


def media_digest(path: Path, memo_root: Optional[Path] = None) -> str:
    """sha256 of a media file's bytes (hex). With memo_root, remembered under
    memo_root/digests/ by the file's path, size, mtime and inode, as git's index does: a later
    start reads the memo instead of the whole file while all three match. A memo written less
    than RACY_NS after the file's last change is not trusted (a change within the filesystem's
    time granularity would keep the mtime), nor one that cannot be read."""
    path = Path(path)
    if memo_root is None:
        return sha256_file(path)
    st = path.stat()
    sig = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo = memo_root / "digests" / f"{hashlib.sha1(str(path.resolve()).encode()).hexdigest()}.json"
    try:
        rec = json.loads(memo.read_text())
        if rec["sig"] == sig and rec["at"] - st.st_mtime_ns > RACY_NS:
            return rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    at = time.time_ns()  # before reading: a change while hashing leaves the memo untrusted
    digest = sha256_file(path)
    try:
        write_bytes_atomic(memo, json.dumps({"sig": sig, "at": at, "sha256": digest}).encode())
    except (OSError, disk.NoRoom):
        pass  # a full or read-only cache volume: hashed again next time
    return digest


# ---------------------------------------------------------------- files

def entry_path(root: Path, key: str) -> Path:
    return root / "latents" / f"{key}.pt"


def probe_path(root: Path, digest: str, fps: Optional[float]) -> Path:
    from .data import MAX_PIXELS, MAX_VIDEO_PIXELS  # other limits: probed again, not a stale answer
    name = hashlib.sha256(f"{PROBE_FORMAT}|{digest}|{fps}|{MAX_PIXELS}|{MAX_VIDEO_PIXELS}".encode()).hexdigest()[:32]
    return root / "probes" / f"{name}.json"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader sees the whole file or none. A failed
    write leaves no temporary file (on a full volume it would hold space for good); a full volume
    raises disk.NoRoom naming it and the fix."""
    tmp = _tmp(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name: a node that crashes right
        os.replace(tmp, path)     # after never leaves an empty or partial file under the final name
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk.no_room(e, path=path) or e from None


def save_entry(root: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    # serialised in memory first (an entry is one sample's latents): torch.save's own file writer
    # reports a full disk as a RuntimeError without the errno
    buf = io.BytesIO()
    torch.save(tensors, buf)
    write_bytes_atomic(entry_path(root, key), buf.getvalue())


class CorruptEntry(RuntimeError):
    """A cache entry that does not load (truncated, emptied by a crash, damaged on its disk): it is
    deleted, so the retried run (exit 1) encodes it again instead of failing on it at every retry."""


def load_entry(root: Path, key: str) -> dict[str, torch.Tensor]:
    path = entry_path(root, key)
    try:
        return check_entry(path)
    except FileNotFoundError:  # after the exchange every entry is on every node: gone means a rank of this
        # node found it corrupt and deleted it (or the disk lost it), not bad input: the retry encodes it
        raise CorruptEntry(f"the cache entry {path} is gone (deleted as unreadable by another process of this "
                           "node, or lost); the retried run encodes it again") from None
    except Exception as e:  # noqa: BLE001 - any failure to load the bytes
        path.unlink(missing_ok=True)
        raise CorruptEntry(f"the cache entry {path} does not load ({type(e).__name__}: {str(e)[:200]}); it is "
                           f"deleted, and the retried run encodes it again") from None


def check_entry(path: Path) -> dict[str, torch.Tensor]:
    """An entry's tensors, or the error of a file that is not one (never unpickles code)."""
    got = torch.load(path, weights_only=True)
    if not isinstance(got, dict):
        raise ValueError(f"not a dict of tensors (a {type(got).__name__})")
    return got


def read_probe(root: Path, digest: str, fps: Optional[float]):
    """The cached check of these bytes (data.check_item): (width, height, frames, is_video), a
    data.Skip without its uri (why they are skipped, found by this or an earlier run), or None (not
    checked yet)."""
    from .data import Skip
    try:
        got = json.loads(probe_path(root, digest, fps).read_text())
        if isinstance(got, dict):
            return Skip("", str(got["skip"][0]), str(got["skip"][1]))
        w, h, frames, video = got
        return int(w), int(h), int(frames), bool(video)
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None


def write_probe(root: Path, digest: str, fps: Optional[float], meta) -> None:
    """meta: a probe tuple, or a data.Skip saying why the bytes are skipped."""
    body = {"skip": [meta.reason, meta.detail]} if hasattr(meta, "reason") else list(meta)
    write_bytes_atomic(probe_path(root, digest, fps), json.dumps(body).encode())


def present(root: Path, keys: list[str]) -> list[bool]:
    """Which entries this node has: an empty file (left by a crash) is none, as exchange counts it."""
    def has(k: str) -> bool:
        try:
            return entry_path(root, k).stat().st_size > 0
        except OSError:
            return False
    return [has(k) for k in keys]


# ---------------------------------------------------------------- planning (pure)

def missing_everywhere(haves: list[list[bool]]) -> list[int]:
    """Indices of the entries that no rank has (they must be encoded)."""
    return [i for i in range(len(haves[0]) if haves else 0) if not any(h[i] for h in haves)]


def first_entries(keys: list[str], wanted: set[str]) -> list[int]:
    """The first entry with each wanted key (equal samples, e.g. two shuffled captions that came
    out alike, are encoded once)."""
    seen, out = set(), []
    for i, k in enumerate(keys):
        if k in wanted and k not in seen:
            seen.add(k)
            out.append(i)
    return out


def split_units(todo_units: list[int], world: int, rank: int, owners: Optional[list[int]] = None) -> list[int]:
    """This rank's share of the units to encode: with owners (per unit, its item's probe order,
    Item.seq, or -1) a unit whose owner is set goes to the rank that probed its item, which alone
    has fetched its media (media_later); the others (media every rank reads where they are: a
    local folder or a volume) go to the least loaded rank, so a few long videos of many clips do
    not all land on one rank; without owners round robin in unit order. Pure: every rank computes
    the same plan."""
    if owners is None:
        return todo_units[rank::world]
    load, plan = [0] * world, {}
    for u in todo_units:
        if owners[u] >= 0:
            plan[u] = owners[u] % world
            load[plan[u]] += 1
    for u in todo_units:
        if u not in plan:
            plan[u] = min(range(world), key=lambda r: (load[r], r))
            load[plan[u]] += 1
    return [u for u in todo_units if plan[u] == rank]


def exchange_rounds(haves: list[list[bool]], sizes: list[list[int]], chunk_bytes: int) -> list[list[tuple[int, int]]]:
    """Who sends which entry in which round, so that afterwards every rank has every entry some
    rank has. haves[r][i]: rank r holds entry i (sizes[r][i] its bytes). An entry that some rank
    lacks is sent once, by the lowest rank holding it; a round carries at most chunk_bytes in all
    (an entry larger than that goes alone), so no rank holds more than about chunk_bytes of
    received entries at a time (dataset_phase.exchange broadcasts each sender's share in turn). Returns rounds of (entry, sender). Pure: every rank computes the
    same plan from the same gathered lists."""
    rounds, cur, used = [], [], 0
    for i in range(len(haves[0]) if haves else 0):
        holders = [r for r, h in enumerate(haves) if h[i]]
        if not holders or len(holders) == len(haves):
            continue
        size = sizes[holders[0]][i]
        if cur and used + size > chunk_bytes:
            rounds.append(cur)
            cur, used = [], 0
        cur.append((i, holders[0]))
        used += size
    if cur:
        rounds.append(cur)
    return rounds


def format_rate(done: int, total: int, seconds: float) -> str:
    """'120/500 samples, 3.2 samples/s, eta 1:58' (pure)."""
    from .progress import format_eta
    rate = done / seconds if seconds > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    return f"{done}/{total} samples, {rate:.2f} samples/s, eta {format_eta(eta)}"


# ---------------------------------------------------------------- progress over ranks

class EncodeProgress:
    """Samples encoded by all ranks, counted on the rendezvous store (no collective): every
    rank adds what it finished, and on a failure or at the end what it will not do, so the
    count always reaches the total. Rank 0 logs a line every $KUBELORA_CACHE_PROGRESS_SECONDS
    (10) and at the end; wait() lets rank 0 keep logging while the others finish."""

    _runs = [0]

    def __init__(self, total: int, mine: int, env, log: Callable[[str], None]):
        import torch.distributed as tdist
        self.total, self.mine, self.env, self.log = total, mine, env, log
        self.interval = float(os.environ.get(PROGRESS_SECONDS_ENV, "10"))
        self.t0 = self.last = time.monotonic()
        self.own = 0
        self.store = tdist.distributed_c10d._get_default_store() if env.world > 1 else None
        EncodeProgress._runs[0] += 1
        self.key = f"kubelora/cache/encoded/{EncodeProgress._runs[0]}"

    def _count(self, n: int = 0) -> int:
        if self.store is None:
            return self.own
        return int(self.store.add(self.key, n))

    def add(self, n: int = 1) -> None:
        self.own += n
        done = self._count(n)
        self._maybe_log(done)

    def _maybe_log(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.env.rank == 0 and (force or now - self.last >= self.interval):
            self.last = now
            self.log(f"[cache] encoding: {format_rate(done, self.total, now - self.t0)}")

    def finish(self) -> None:
        """This rank is done (or failed): count what it will not encode."""
        left = self.mine - self.own
        if left > 0:
            self.own = self.mine
            self._count(left)

    def wait(self, timeout: float = 7200.0) -> None:
        """Rank 0: log until every rank has finished, then the final line."""
        deadline = time.monotonic() + timeout
        done = self._count()
        while done < self.total and time.monotonic() < deadline:
            time.sleep(0.2)
            done = self._count()
            self._maybe_log(done)
        self._maybe_log(done, force=True)


# ---------------------------------------------------------------- streaming

Sample = bk.Sample


def stack(samples: list[dict]) -> dict[str, torch.Tensor]:
    from .masks import fill_masks
    samples = pad_ragged(fill_masks(samples))  # a batch mixing masked and unmasked items: all ones for the latter
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def pad_ragged(samples: list[dict]) -> list[dict]:
    """Tensors of one key whose first dimension differs between a batch's samples (SDXL's caption
    windows, [n, 77] for a caption of n windows) padded with zeros to the longest; the family stores
    each sample's own length beside them and masks the padding (SDXL: text_windows)."""
    out = samples
    for k in samples[0]:
        shapes = {tuple(s[k].shape) for s in samples}
        if len(shapes) < 2 or any(len(sh) == 0 for sh in shapes) or len({sh[1:] for sh in shapes}) > 1:
            continue
        n = max(sh[0] for sh in shapes)
        out = [s if s[k].shape[0] == n else
               {**s, k: torch.cat([s[k], s[k].new_zeros((n - s[k].shape[0], *s[k].shape[1:]))])} for s in out]
    return out


class Loader:
    """Micro-batches read from the cache files as training asks for them; nothing is kept after
    its step, so memory does not grow with the dataset. A background thread reads the next
    `depth` batches ahead, drawn from its own copy of the bucket sampler (the sampler itself, whose
    state checkpoints save, advances only as the loop takes batches). The thread starts on the
    first batch, after a resume has restored the sampler."""

    def __init__(self, read: Callable[[Sample], dict], sampler: bk.BucketSampler, depth: int = 2):
        self.read, self.sampler, self.depth = read, sampler, depth
        self._q: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.loaded = 0   # samples read from disk

    def _ahead(self) -> bk.BucketSampler:
        s = self.sampler
        ahead = bk.BucketSampler(s.space, s.seed, s.micro, s.world, s.rank)
        ahead.load_state_dict(s.state_dict())
        return ahead

    def _work(self, ahead: bk.BucketSampler) -> None:
        try:
            while not self._stop.is_set():
                ids = ahead.next_batch()
                item = (ids, stack([self._read(s) for s in ids]))
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._q.put((None, e))

    def _read(self, s: Sample) -> dict:
        self.loaded += 1
        return self.read(s)

    def next(self) -> tuple[list[Sample], dict[str, torch.Tensor]]:
        """The sampler's next micro-batch: (sample ids, stacked CPU tensors)."""
        if self.depth <= 0:
            ids = self.sampler.next_batch()
            return ids, stack([self._read(s) for s in ids])
        if self._thread is None:
            self._q = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._work, args=(self._ahead(),), daemon=True,
                                            name="kubelora-cache-loader")
            self._thread.start()
        ids = self.sampler.next_batch()
        got, tensors = self._q.get()
        if got is None:
            raise tensors
        if got != ids:  # the copy draws exactly what the sampler draws
            raise RuntimeError(f"cache loader out of step with the sampler ({got} != {ids})")
        return ids, tensors

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
