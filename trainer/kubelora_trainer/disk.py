"""The node's cache folder, and a full disk: which errors say so, and the one message that names
the full volume, its free space and the fix. Retrying cannot help (the same run fills the same
volume at the same place), so a full disk is bad input (NoRoom is a StorageError that is not
transient: exit 2), not a crash to retry on GPUs. No torch here: storage.py uses it."""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from .storage import StorageError

CACHE_ENV = "KUBELORA_CACHE_DIR"
# bytes the pod's cache may hold (resources.cacheSize: its emptyDir's sizeLimit, past which the
# kubelet evicts the pod; the volume's free space, what statvfs shows, is the node's whole disk)
CACHE_LIMIT_ENV = "KUBELORA_CACHE_LIMIT_BYTES"

# no space left, a quota reached, a file larger than the process or filesystem allows
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class NoRoom(StorageError):
    pass


def cache_root(environ=None) -> Path:
    """The node's cache folder: $KUBELORA_CACHE_DIR (the pod's cache volume), else ~/.cache/kubelora.
    The staged model and data, the latent cache, checkpoints and outputs live there."""
    return Path((os.environ if environ is None else environ).get(CACHE_ENV) or Path.home() / ".cache" / "kubelora")


def cache_root_said(environ=None) -> str:
    """Where the cache is and what chose it, for the log: '/home/u/.cache/kubelora (the default;
    $KUBELORA_CACHE_DIR moves it)' or '/var/cache/kubelora ($KUBELORA_CACHE_DIR)'. Pure."""
    environ = os.environ if environ is None else environ
    why = f"${CACHE_ENV}" if environ.get(CACHE_ENV) else f"the default; ${CACHE_ENV} moves it"
    return f"{cache_root(environ)} ({why})"


def find(exc: BaseException) -> Optional[OSError]:
    """The OSError that says a disk is full, looked for in exc, what it was raised from or while
    handling, and the per-rank failures a distributed checkpoint gathers; None when there is none.
    Pure."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_ROOM_ERRNOS:
            return e
        # writers in Rust report the errno only in their text (safetensors' save_file: "I/O error:
        # No space left on device (os error 28)")
        code = re.search(r"\(os error (\d+)\)", str(e)) if not isinstance(e, OSError) else None
        if code and int(code.group(1)) in NO_ROOM_ERRNOS:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def usage(path: Path) -> str:
    """'12.0 MiB free of 1.0 GiB' for the volume holding path (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        u = shutil.disk_usage(p)
    except OSError:
        return "its free space unknown"
    return f"{size_text(u.free)} free of {size_text(u.total)}"


def size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cache_limit_left(environ=None) -> Optional[int]:
    """Of $KUBELORA_CACHE_LIMIT_BYTES (the operator sets it from resources.cacheSize), what the
    cache folder does not hold yet; None without a limit."""
    limit = (os.environ if environ is None else environ).get(CACHE_LIMIT_ENV)
    if not limit:
        return None
    used = 0
    for folder, _, files in os.walk(cache_root(environ)):
        for name in files:
            try:
                used += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return int(limit) - used


def room_problem(need: int, free: int, limit_left: Optional[int]) -> Optional[str]:
    """Why need bytes cannot be written where free bytes are free and, with a cache limit,
    limit_left bytes of it are left; None when they can. Pure."""
    if need <= 0:
        return None
    if limit_left is not None and need > limit_left:
        return (f"{size_text(need)} to fetch, {size_text(max(limit_left, 0))} left of the pod's cache "
                f"(resources.cacheSize; past it the kubelet evicts the pod): a larger resources.cacheSize, or a "
                f"resources.cacheVolumeClaim")
    if need > free:
        return (f"{size_text(need)} to fetch, {size_text(free)} free on its volume: give the cache volume "
                f"more room (a larger resources.cacheSize or resources.cacheVolumeClaim; on a workstation, "
                f"${CACHE_ENV} on a larger disk)")
    return None


def check_room(need: int, path: Path, limit_left: Optional[int], what: str) -> None:
    """NoRoom (bad input: a retry fills the same disk) before fetching need bytes into path, when
    they do not fit (room_problem), instead of hours of downloading and an eviction or a full disk
    at the end."""
    problem = room_problem(need, shutil.disk_usage(path).free, limit_left)
    if problem:
        raise NoRoom(f"{what}: no room to fetch into {path}: {problem}")


VOLUME_ID_NAME = ".volume-id"


def volume_id(root: Optional[Path] = None) -> str:
    """Who shares this cache folder: an id written once into it (the first process to look
    creates it, whole: a temporary file linked into place), so processes that read the same id
    write into one volume: a node's ranks, and with a cache claim shared by nodes (ReadWriteMany),
    those nodes too. Where it cannot be written (a read-only or full volume, a filesystem without
    hard links), the host's name and the folder's device stand in. Never raises."""
    root = Path(root or cache_root())
    path = root / VOLUME_ID_NAME
    try:
        for _ in range(40):
            try:
                got = path.read_text().strip()
                if got:
                    return got
                if time.time() - path.stat().st_mtime < 5:  # being written (an exclusive create): read again
                    time.sleep(0.05)
                    continue
                path.unlink(missing_ok=True)  # empty for a while: a writer cut short; made again
            except FileNotFoundError:
                pass
            root.mkdir(parents=True, exist_ok=True)
            new_id = uuid.uuid4().hex
            fd, tmp = tempfile.mkstemp(prefix=f"{VOLUME_ID_NAME}.", dir=root)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(new_id)
                os.link(tmp, path)  # fails if another process made it first: then its id is read
            except FileExistsError:
                pass
            except OSError:  # no hard links (some FUSE filesystems): an exclusive create, written at once
                try:
                    with open(path, "x") as f:
                        f.write(new_id)
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp)
    except OSError:
        pass
    try:
        dev = os.stat(root).st_dev
    except OSError:
        dev = 0
    return f"{socket.gethostname()}:{dev}"


def shares_by_volume(parts: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """[(volume id, bytes to fetch)] per rank -> {volume id: (its first rank, the bytes of all its
    ranks)}: the ranks that write into one volume fetch into it together, so it needs room for
    their sum, and one of them checks that. Pure."""
    out: dict[str, tuple[int, int]] = {}
    for rank, (vol, need) in enumerate(parts):
        first, total = out.get(vol, (rank, 0))
        out[vol] = (first, total + max(0, int(need)))
    return out


def no_room(exc: BaseException, what: str = "", path: Optional[Path] = None) -> Optional[NoRoom]:
    """A NoRoom for an error that says a disk is full, None for any other. path: the file being
    written, where the error does not name it (a failed write() names none). The fix named is
    the cache volume's when that file is under cache_root()."""
    e = find(exc)
    if e is None:
        return None
    cache_dir = cache_root()
    target = Path(path or e.filename or cache_dir)
    where = target.parent if path or e.filename else target
    try:
        in_cache = where.resolve().is_relative_to(cache_dir.resolve())
    except OSError:
        in_cache = False
    if in_cache:
        fix = ("give the cache volume more room (a larger resources.cacheVolumeClaim, or more ephemeral storage on "
               "the node for the default emptyDir; on a workstation, $KUBELORA_CACHE_DIR on a larger disk)"
               + (", or cache less (fewer dataset.resolutions or frame buckets)" if "latents" in target.parts else "")
               + "; what was written is kept, so a rerun goes on from it")
    else:
        fix = "free space there or choose a path on a larger disk"
    lead = f"{what}: " if what else ""
    return NoRoom(f"{lead}no room left to write {target} ({e.strerror or errno.errorcode.get(e.errno)}; "
                  f"{usage(where)} on its volume): {fix}")
