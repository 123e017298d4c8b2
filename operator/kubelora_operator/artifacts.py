"""Reading what the trainer publishes under spec.output.uri: status/progress.json while it runs,
manifest.json when it is done, with the job's own credentials (its Secret) when it names one.
An object that is not there yet is not an error; anything else (access denied, no bucket) is
returned so the status can say it once it has lasted.

The bucket and the endpoint are the tenant's, so a read must never cost the operator more than a
bounded share of its memory and of its sync workers' time (docs/decisions.md): at most MAX_BYTES
read of an object (its ContentLength checked first), a short timeout and few attempts per request
(operator_settings, apart from the trainer's $KUBELORA_S3_READ_TIMEOUT and $AWS_MAX_ATTEMPTS),
BODY_DEADLINE for a body however slowly it trickles, at most MAX_CLIENTS clients kept, and every
failure (a botocore or urllib3 error included) an error string, never an exception. An error
names S3's own error codes but never echoes an answer that is not S3's (storage.describe_error
with echo=False): storage.endpoint may point at any service the operator can reach."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import OrderedDict
from typing import Optional

from kubelora_trainer import storage
from kubelora_trainer.progress import PROGRESS_KEY  # noqa: F401 - re-exported for the handlers

MANIFEST_KEY = "manifest.json"
MAX_BYTES = 1024 * 1024      # progress.json is < 1 KiB, manifest.json a few KiB
CONNECT_TIMEOUT = 5.0        # seconds, per attempt
READ_TIMEOUT = 10.0          # seconds without a byte, per attempt
MAX_ATTEMPTS = 2             # per request, in all: the next sync (seconds later) reads again anyway
BODY_DEADLINE = 20.0         # seconds for a whole body, however slowly it comes
MAX_CLIENTS = 64             # boto3 clients kept (~45 ms each to make, least recently used dropped)
_CHUNK = 64 * 1024

_clients: "OrderedDict[tuple, object]" = OrderedDict()   # one per (endpoint, region, style, timeouts, keys)
_lock = threading.Lock()  # the syncer's workers are threads


def operator_settings(settings: storage.S3Settings) -> storage.S3Settings:
    """The job's settings with the operator's own short timeouts and attempts (the smaller of
    those and the job's): a tenant's endpoint that never answers holds a sync worker for at most
    MAX_ATTEMPTS x (CONNECT_TIMEOUT + READ_TIMEOUT) per request, not the trainer's 5 x 60 s. Pure."""
    return dataclasses.replace(settings, connect_timeout=min(settings.connect_timeout, CONNECT_TIMEOUT),
                               read_timeout=min(settings.read_timeout, READ_TIMEOUT),
                               max_attempts=min(settings.max_attempts, MAX_ATTEMPTS))


def client_for(settings: storage.S3Settings):
    """The cached client for these settings (the MAX_CLIENTS most recently used are kept). Without
    a job's own keys the client takes the operator's mounted Secret files, read again on each call
    (three small files) so that a rotated Secret makes a new client instead of failing every job
    with the old keys."""
    own = (settings.access_key, settings.secret_key, settings.session_token)
    files = () if all(own[:2]) else tuple(sorted(storage.secret_file_credentials().items()))
    key = (settings.endpoint, settings.region, settings.addressing_style, settings.connect_timeout,
           settings.read_timeout, settings.max_attempts, *own, files)
    with _lock:
        if key in _clients:
            _clients.move_to_end(key)
            return _clients[key]
    client = storage.make_client(settings)  # outside the lock: ~45 ms
    with _lock:
        client = _clients.setdefault(key, client)
        _clients.move_to_end(key)
        while len(_clients) > MAX_CLIENTS:
            _clients.popitem(last=False)
    return client


class TooLarge(ValueError):
    pass


class SlowBody(TooLarge):
    """A body still coming past BODY_DEADLINE (the store answers a byte at a time)."""


def too_large(name: str, size: int) -> str:
    return f"{name} is {size} bytes (limit {MAX_BYTES // (1024 * 1024)} MiB)"


def read_capped(read, name: str, deadline: float, clock=time.monotonic, size: Optional[int] = None) -> bytes:
    """At most MAX_BYTES from read(n) (a file's or a response body's), until it returns b"" or the
    `size` bytes announced have come; TooLarge past MAX_BYTES or when the body is still coming past
    the monotonic deadline. read should return after one receive (_read_some): the deadline is then
    checked at least once per read timeout, however slowly the bytes trickle in."""
    parts, n = [], 0
    while True:
        chunk = read(_CHUNK)
        if not chunk:
            return b"".join(parts)
        n += len(chunk)
        if n > MAX_BYTES:
            raise TooLarge(f"{name} is more than {MAX_BYTES} bytes (limit {MAX_BYTES // (1024 * 1024)} MiB)")
        parts.append(chunk)
        if size is not None and n >= size:
            return b"".join(parts)
        if clock() > deadline:
            raise SlowBody(f"{name} took more than {BODY_DEADLINE:.0f} s to read ({n} bytes so far)")


def _read_some(body):
    """body's read, returning after one receive from the socket where that can be reached
    (http.client's read1 under botocore's urllib3 stream): its plain read(n) waits until n bytes have
    come, each receive within the read timeout, so a body trickled a byte at a time would hold a
    sync for days. The plain read for a content-encoded body (urllib3 decodes it) or another stream."""
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    headers = getattr(raw, "headers", None) or {}
    if fp is not None and hasattr(fp, "read1") and not headers.get("content-encoding"):
        return fp.read1
    return body.read


def _get(loc: storage.Location, key: str, settings: storage.S3Settings) -> bytes:
    if not loc.is_s3:
        with open(loc.key, "rb") as f:
            return read_capped(f.read, key, time.monotonic() + BODY_DEADLINE)
    answer = client_for(settings).get_object(Bucket=loc.bucket, Key=loc.key)
    body = answer["Body"]
    try:
        size = answer.get("ContentLength")
        if isinstance(size, int) and size > MAX_BYTES:
            raise TooLarge(too_large(key, size))
        # the deadline runs from the body's start (the request had its own timeouts)
        return read_capped(_read_some(body), key, time.monotonic() + BODY_DEADLINE,
                           size=size if isinstance(size, int) else None)
    finally:
        body.close()  # unread bytes: the connection is dropped rather than drained


def _code(e: BaseException) -> str:
    return str(((getattr(e, "response", None) or {}).get("Error") or {}).get("Code", ""))


class ReadError(str):
    """read_json's error text; unreachable: the store itself did not answer (a timeout, a refused or
    dropped connection, a gateway's 5xx, a body that did not come), so every job reading it would
    fail alike, unlike a missing key or a refused credential, which are one job's; cause: the
    error's kind in a few words, naming no object."""
    unreachable: bool = False
    cause: str = ""


def _error(text: str, unreachable: bool = False, cause: str = "") -> ReadError:
    e = ReadError(text)
    e.unreachable, e.cause = unreachable, cause
    return e


def store_of(output_uri: str, settings: storage.S3Settings) -> Optional[tuple]:
    """Which store a job's reads go to (endpoint, addressing style, region, bucket): jobs that reach
    one host alike; None for a local path. Pure."""
    try:
        loc = storage.parse_uri(output_uri)
    except storage.StorageError:
        return None
    return ((settings.endpoint or "", settings.addressing_style, settings.region or "", loc.bucket)
            if loc.is_s3 else None)


def store_said(store: tuple) -> str:
    """A store in words, naming no job's object (the store's error is shown on every job reading it). Pure."""
    endpoint, _, _, bucket = store
    return f"bucket {bucket}" + (f" at {endpoint}" if endpoint else "")


class ReadBackoff:
    """Per job and object: after a failed read the next is tried only once a delay has passed that
    doubles from `first` up to `most` seconds; meanwhile the last error is answered at once. A job
    whose endpoint does not answer costs up to MAX_ATTEMPTS x (CONNECT_TIMEOUT + READ_TIMEOUT)
    seconds a read: at every sync, a few of them held the sync workers and every other job's status
    waited. A success forgets the job; at most `size` jobs are remembered (the oldest go).

    Per store too (`store`: store_of): a read that found the store unreachable backs off every job
    reading that store, and once the wait is over one read probes it while the others keep the
    error; so one tenant's dead endpoint, under any number of jobs, holds at most one sync worker at
    a time instead of all of them (eight jobs behind it took the four)."""

    def __init__(self, first: float = 10.0, most: float = 120.0, clock=time.monotonic, size: int = 4096):
        self.first, self.most, self.clock, self.size = first, most, clock, size
        self._entries: OrderedDict = OrderedDict()   # key -> (failures, next try, last error)
        self._probing: set = set()                   # stores one read is trying now
        self._lock = threading.Lock()

    def _failed(self, key, entry, error, now) -> None:
        failures = (entry[0] if entry else 0) + 1
        self._entries[key] = (failures, now + min(self.most, self.first * 2 ** (failures - 1)), error)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def read(self, key, fn, store: Optional[tuple] = None) -> tuple[Optional[dict], Optional[str]]:
        """fn() -> (object, error), as read_json answers, unless key or its store is backing off."""
        now = self.clock()
        skey = ("store", store) if store is not None else None
        probe = False
        with self._lock:
            entry = self._entries.get(key)
            shared = self._entries.get(skey) if skey else None
            if entry is not None and now < entry[1]:
                return None, entry[2]
            if shared is not None:
                if now < shared[1] or skey in self._probing:   # another job's read found it down
                    return None, shared[2]
                self._probing.add(skey)
                probe = True
        answered = False
        try:
            obj, error = fn()
            answered = True
        finally:
            now = self.clock()  # the wait counts from the read's end: a read that hung 30 s used no wait up
            with self._lock:
                if probe:
                    self._probing.discard(skey)
                if answered:   # fn raised: a bug, not the store's answer; nothing learnt
                    self._learn(key, entry, skey, store, probe, error, now)
        return obj, error

    def _learn(self, key, entry, skey, store, probe: bool, error, now: float) -> None:
        """What a read's answer says of its job and its store (under the lock)."""
        if error is None:
            self._entries.pop(key, None)
            if skey:
                self._entries.pop(skey, None)
            return
        self._failed(key, entry, error, now)
        if skey and getattr(error, "unreachable", False):
            # counted once per probe (or at the first failure), not once per read under way
            if probe or skey not in self._entries:
                said = _error(f"{store_said(store)} did not answer the operator's last read "
                              f"({error.cause or 'no answer'}); it is read again for every job once one read "
                              "answers", unreachable=True)
                self._failed(skey, self._entries.get(skey), said, now)
        elif skey:
            self._entries.pop(skey, None)   # it answered (a job's own error): the store is up


def unreachable(e: BaseException) -> bool:
    """Whether an error of a read says the store itself did not answer (no connection or proxy, TLS,
    a timeout, a cut answer, a body that did not come, a gateway's 5xx): not throttling (503
    SlowDown, 429: S3 applies it per prefix), a missing key, a refused credential or a bad answer. Pure."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    if isinstance(e, (SlowBody, BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return True   # botocore's: endpoint, proxy, TLS, timeouts, cut answers; the builtins from read1
    if isinstance(e, ClientError):   # a gateway's 5xx; not throttling (503 SlowDown, 429), which is per prefix
        status = ((e.response or {}).get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
        return status >= 500 and status != 503
    return False


def read_json(output_uri: str, key: str, settings: storage.S3Settings) -> tuple[Optional[dict], Optional[str]]:
    """(the object, None), (None, None) when it is not there yet, or (None, the error): never
    raises for anything the store or the object holds."""
    try:
        loc = storage.parse_uri(output_uri).child(key)
    except storage.StorageError as e:
        return None, _error(str(e))
    try:
        body = _get(loc, key, operator_settings(settings))
    except FileNotFoundError:
        return None, None
    except TooLarge as e:
        slow = isinstance(e, SlowBody)
        return None, _error(f"reading {loc}: {e}", unreachable=slow, cause="a body that came too slowly" if slow else "")
    except Exception as e:  # noqa: BLE001 - classified: a missing key is "not yet", the rest is an error
        if _code(e) in ("NoSuchKey", "404", "NotFound"):
            return None, None
        try:
            hint = (f"the operator waits {READ_TIMEOUT:.0f} s for an answer, {MAX_ATTEMPTS} attempts, "
                    f"and reads again at its next sync")
            described = storage.describe_error(e, loc, "reading", echo=False, timeout_hint=hint)
            return None, _error(str(described), unreachable=unreachable(e), cause=type(e).__name__)
        except Exception:  # noqa: BLE001 - an error no one foresaw is still only this job's error
            return None, _error(f"reading {loc}: {type(e).__name__}")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        return None, f"reading {loc}: not JSON ({str(e)[:100] or type(e).__name__})"
    if not isinstance(obj, dict):
        return None, f"reading {loc}: not a JSON object (a {type(obj).__name__})"
    return obj, None
