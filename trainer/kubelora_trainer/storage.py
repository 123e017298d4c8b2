"""Storage: s3:// URIs through boto3 (AWS or any S3-compatible store) and local paths.

- Credentials come from the standard AWS environment/config chain, or from files mounted from a
  Kubernetes Secret (``$KUBELORA_S3_CREDENTIALS_DIR``, default ``/var/run/secrets/kubelora/s3``,
  holding ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` [/ ``AWS_SESSION_TOKEN``]); never from
  the spec.
- Downloads use s3transfer's parallel ranged GETs, skip files already present and complete
  (size + ETag recorded beside the cache), and write to a temporary name that is renamed only when
  the file is complete and of the listed size.
- Uploads use multipart above 64 MiB, record sha256 in the object metadata and verify the size.
- Retries, bounded: botocore retries each request (5xx, throttling, dropped connections, read
  timeouts) up to ``max_attempts`` times in all (``$AWS_MAX_ATTEMPTS``, default 5) and each retry is
  logged; s3transfer re-reads a GET body cut midway as often; this module retries a whole transfer
  only when its own check fails (size, ETag), never an error the layers below already retried.
  A server that stops answering costs ``read_timeout`` (``$KUBELORA_S3_READ_TIMEOUT``, 60 s) per
  attempt: at most max_attempts for most requests, max_attempts² for a GET (botocore's attempts
  at each of s3transfer's).
- Every StorageError says whether it is ``transient`` (the store or the network failed: a 5xx or
  throttling answer that outlasted the retries, a timeout, a dropped connection, a cut body) or
  the input is wrong (no such bucket or key, access denied, no credentials, a bad URI): the trainer
  exits with a retryable code for the first and fails the Job at once for the second
  (``is_transient``, docs/decisions.md).
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

CREDENTIALS_DIR_ENV = "KUBELORA_S3_CREDENTIALS_DIR"
READ_TIMEOUT_ENV = "KUBELORA_S3_READ_TIMEOUT"
MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # the AWS SDKs' own name: attempts in all, the first included
DEFAULT_CREDENTIALS_DIR = "/var/run/secrets/kubelora/s3"
INDEX_NAME = ".kubelora-stage.json"
MB = 1024 * 1024


class StorageError(RuntimeError):
    """An object store or path problem, naming the bucket/key and the cause. transient: the store
    or the network failed (a later run may succeed), rather than the input (no retry can help)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):
        return type(self), (str(self), self.transient)


class NoSuchObject(StorageError):
    """The key is not in the bucket (deleted since it was listed, or never there), or no longer
    holds the bytes it was listed with (another ETag)."""


class Mismatch(OSError):
    """What was stored or fetched differs from what was sent or listed (size, ETag): worth
    another whole transfer."""


# Called with ("download" | "upload", bytes) after each object transferred in full (the trainer's
# metrics listen here); a listener's failure never fails a transfer.
transfer_listeners: list[Callable[[str, int], None]] = []


def _transferred(direction: str, nbytes: int) -> None:
    for listener in list(transfer_listeners):
        try:
            listener(direction, nbytes)
        except Exception:  # noqa: BLE001 - metrics must never break a transfer
            pass


def _env_number(name: str, default: float, kind=float):
    """A positive number from the environment, else default (a bad value is reported, not fatal:
    this runs when S3Settings() defaults are made, at import)."""
    raw = os.environ.get(name)
    try:
        value = kind(raw) if raw else default
    except ValueError:
        value = 0
    if value <= 0:
        print(f"[storage] ignoring ${name}={raw!r}: not a positive {kind.__name__}; using {default}", file=sys.stderr)
        return default
    return value


@dataclass(frozen=True)
class S3Settings:
    endpoint: Optional[str] = None
    region: Optional[str] = None
    addressing_style: str = "auto"
    max_attempts: int = field(default_factory=lambda: _env_number(MAX_ATTEMPTS_ENV, 5, int))  # per request, in all
    connect_timeout: float = 10.0
    read_timeout: float = field(default_factory=lambda: _env_number(READ_TIMEOUT_ENV, 60.0))
    concurrency: int = 8
    # a download of small objects only (a dataset of images): this many objects in flight, each a
    # single GET (latency-bound: at 30 ms an answer, 8 fetch some 250 objects a second)
    small_concurrency: int = 32
    multipart_threshold: int = 64 * MB
    multipart_chunksize: int = 16 * MB
    # explicit credentials (the operator reading with a job's Secret); else the environment
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)   # temporary (STS) credentials

    @classmethod
    def from_spec(cls, storage) -> "S3Settings":
        return cls(endpoint=storage.endpoint, region=storage.region, addressing_style=storage.addressingStyle)


@dataclass(frozen=True)
class Location:
    """A parsed URI: s3 (bucket + key) or a local path."""
    bucket: Optional[str]
    key: str

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.is_s3 else self.key

    def child(self, name: str) -> "Location":
        if self.is_s3:
            return Location(self.bucket, f"{self.key.rstrip('/')}/{name}" if self.key else name)
        return Location(None, str(Path(self.key) / name))


def parse_uri(uri: str) -> Location:
    if uri.startswith("s3://"):
        rest = uri[5:]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri!r}: missing bucket name (expected s3://bucket/key)")
        return Location(bucket, key)
    if uri.startswith("file://"):
        return Location(None, uri[7:])
    if uri.startswith("/"):
        return Location(None, uri)
    raise StorageError(f"{uri!r}: unsupported URI; use s3://bucket/key or an absolute local path")


# ---------------------------------------------------------------- client and errors

def secret_file_credentials() -> dict[str, str]:
    d = Path(os.environ.get(CREDENTIALS_DIR_ENV, DEFAULT_CREDENTIALS_DIR))
    out = {}
    for name, arg in (("AWS_ACCESS_KEY_ID", "aws_access_key_id"), ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                      ("AWS_SESSION_TOKEN", "aws_session_token")):
        f = d / name
        if f.is_file():
            out[arg] = f.read_text().strip()
    return out


_CLIENT_LOCK = threading.Lock()


def make_client(settings: S3Settings):
    import boto3
    from botocore.config import Config

    style = settings.addressing_style
    if style == "auto":
        style = "path" if (settings.endpoint or os.environ.get("AWS_ENDPOINT_URL")) else "virtual"
    cfg = Config(
        retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
        s3={"addressing_style": style},
        max_pool_connections=max(10, settings.concurrency * 2, settings.small_concurrency),
    )
    region = settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs = secret_file_credentials()
    if settings.access_key and settings.secret_key:
        kwargs = {"aws_access_key_id": settings.access_key, "aws_secret_access_key": settings.secret_key,
                  **({"aws_session_token": settings.session_token} if settings.session_token else {})}
    with _CLIENT_LOCK:  # boto3's default session is not thread-safe while it makes a client
        client = boto3.client("s3", endpoint_url=settings.endpoint, region_name=region, config=cfg, **kwargs)
    client.meta.events.register("needs-retry.s3", _retry_logger(settings.max_attempts))
    return client


def retry_cause(attempts: int, max_attempts: int, response=None, caught_exception=None) -> Optional[str]:
    """Why botocore is about to retry a request (a 5xx or 429 answer, or a connection error or
    timeout), or None: no retry (success, a 4xx, or the last attempt). Pure."""
    if attempts >= max_attempts:
        return None
    if caught_exception is not None:
        return f"{type(caught_exception).__name__}: {caught_exception}"
    if response is None:
        return None
    http, parsed = response
    if http.status_code < 500 and http.status_code != 429:
        return None
    return f"{http.status_code} {(parsed or {}).get('Error', {}).get('Code', '')}".rstrip()


def _retry_logger(max_attempts: int):
    """A botocore needs-retry handler that prints each retry (botocore itself retries silently)."""
    def log(attempts, response=None, caught_exception=None, operation=None, request_dict=None, **_):
        cause = retry_cause(attempts, max_attempts, response, caught_exception)
        if cause is not None:
            params = (request_dict or {}).get("context", {}).get("input_params", {})
            what = f"s3://{params.get('Bucket', '')}/{params.get('Key', '')}"
            print(f"[storage] {getattr(operation, 'name', 'request')} {what}: {cause}; "
                  f"retrying (attempt {attempts} of {max_attempts} failed)", flush=True)
    return log


def _unwrap(exc: BaseException) -> BaseException:
    """boto3's transfer manager wraps the real client error (S3UploadFailedError), and the last
    error of a GET it gave up re-reading (RetriesExceededError)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    if isinstance(exc, (RetriesExceededError, TransferRetriesExceededError)) and exc.last_exception is not None:
        return exc.last_exception
    return exc


# S3's own error codes (AWS's list, and what S3-compatible stores answer): their messages are the
# store's explanations. describe_error(echo=False) keeps the message of these alone.
S3_ERROR_CODES = frozenset({
    "AccessDenied", "AccountProblem", "AllAccessDisabled", "AuthorizationHeaderMalformed", "BadDigest",
    "BucketAlreadyExists", "BucketAlreadyOwnedByYou", "BucketNotEmpty", "CredentialsNotSupported",
    "EntityTooLarge", "EntityTooSmall", "ExpiredToken", "IllegalLocationConstraintException", "IncompleteBody",
    "InvalidAccessKeyId", "InvalidArgument", "InvalidBucketName", "InvalidBucketState", "InvalidDigest",
    "InvalidObjectState", "InvalidPart", "InvalidRange", "InvalidRequest", "InvalidSecurity", "InvalidToken",
    "InvalidURI", "KeyTooLongError", "MalformedXML", "MethodNotAllowed", "MissingContentLength",
    "MissingSecurityHeader", "NoSuchBucket", "NoSuchKey", "NoSuchUpload", "NotImplemented", "NotSignedUp",
    "PermanentRedirect", "PreconditionFailed", "Redirect", "RequestTimeTooSkewed", "SignatureDoesNotMatch",
    "TemporaryRedirect", "TokenRefreshRequired", "UnauthorizedAccess", "XAmzContentSHA256Mismatch",
    "AuthorizationQueryParametersError", "InvalidEncryptionAlgorithmError", "KMS.DisabledException",
    "NotFound", "Forbidden", "BadRequest",
})  # and TRANSIENT_CODES


def server_words(code: str, message: str, status, echo: bool) -> str:
    """What an error answer says, for a message: its code and its message; with echo=False (the
    operator reading a tenant's endpoint, which may be any service it can reach) an S3 error code's
    message cut to 100 characters, and of anything else only the HTTP status. Pure."""
    if echo:
        return f"{code or status}: {message}"
    if code in S3_ERROR_CODES or code in TRANSIENT_CODES:
        return f"{code}: {message[:100]}" + ("..." if len(message) > 100 else "")
    if code.isdigit():  # an answer without a body (HEAD): the code is the status
        return f"HTTP {code}"
    return (f"HTTP {status}, not an S3 error answer (not shown: is storage.endpoint an S3 store?)" if status
            else "an answer that is not S3's (not shown: is storage.endpoint an S3 store?)")


def describe_error(exc: BaseException, loc: Location, action: str, echo: bool = True,
                   timeout_hint: str = f"the read timeout is ${READ_TIMEOUT_ENV}") -> StorageError:
    """Turn a boto/botocore exception into a message naming the object and the cause. echo=False:
    nothing the server wrote is repeated but S3's own error codes and their messages (server_words),
    nor the text of an exception not recognised here. timeout_hint: what sets the read timeout."""
    from botocore.exceptions import (ClientError, ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError,
                                     IncompleteReadError, NoCredentialsError, ReadTimeoutError, ResponseStreamingError)

    exc = _unwrap(exc)
    where = str(loc)
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            cause = f"bucket {loc.bucket!r} does not exist"
        elif code in ("NoSuchKey", "404", "NotFound"):
            cause = f"no such key {loc.key!r} in bucket {loc.bucket!r}"
        elif code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            cause = (f"access denied ({code}); check the credentials (the Secret named in spec.storage.credentialsSecret "
                     f"in a cluster, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY on a workstation) and the bucket policy")
        else:
            message = str(exc.response.get("Error", {}).get("Message", exc if echo else ""))
            cause = server_words(code, message, status, echo)
            tries = exc.response.get("ResponseMetadata", {}).get("RetryAttempts")
            cause += f" ({tries + 1} attempts)" if tries else ""
    elif isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        cause = f"endpoint unreachable ({exc}); check storage.endpoint / AWS_ENDPOINT_URL and the network"
    elif isinstance(exc, ReadTimeoutError):
        cause = f"the server did not answer in time ({exc}); {timeout_hint}"
    elif isinstance(exc, (IncompleteReadError, ResponseStreamingError, ConnectionClosedError)):
        cause = f"the connection ended early ({type(exc).__name__}: {exc})"
    elif isinstance(exc, NoCredentialsError):
        cause = (f"no credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or mount a Secret at "
                 f"${CREDENTIALS_DIR_ENV}")
    elif echo:
        cause = f"{type(exc).__name__}: {exc}"
    else:  # e.g. a ResponseParserError quotes the body it could not parse
        cause = type(exc).__name__
    code = str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""
    if code in ("PreconditionFailed", "412"):  # a GET pinned to the listed ETag (_get_small)
        return NoSuchObject(f"{action} {where}: it changed in the bucket after it was listed", transient=True)
    # a HEAD's 404 has no body: it may be a missing bucket, not a missing key
    return (NoSuchObject if code == "NoSuchKey" else StorageError)(f"{action} {where}: {cause}",
                                                                   transient=is_transient(exc))


# Error codes S3 (and S3-compatible stores) answer when they are overloaded or briefly failing,
# whatever the HTTP status (RequestTimeout is a 400, an InternalError can come in a 200 answer).
TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "OperationAborted", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "EC2ThrottledException", "ProvisionedThroughputExceededException",
})


def is_transient(exc: BaseException) -> bool:
    """Whether a storage failure is the store's or the network's (transient: a 5xx other than 501,
    a 408/429 or a throttling/SlowDown/InternalError code, an endpoint that cannot be reached, a
    timeout, a connection dropped or a body cut short, stored bytes that differed from those sent)
    rather than the input's (no such bucket or key, access denied, wrong or no credentials, an
    invalid request, a local path problem), which no retry can fix. Looks through the transfer
    manager's wrappers (S3UploadFailedError, RetriesExceededError) to the error they carry.
    Anything not recognised counts as input, as before. Pure."""
    import http.client

    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import (ClientError, ConnectionError as EndpointError, HTTPClientError,
                                     IncompleteReadError)
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError
    exc = _unwrap(exc)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {}) or {}
        code = str(error.get("Code", ""))
        status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
        if not status and code.isdigit():
            status = int(code)  # HEAD answers have no body: the code is the status
        if code in TRANSIENT_CODES:
            return True
        return status in (408, 429) or (isinstance(status, int) and status >= 500 and status != 501)
    # EndpointConnectionError, ConnectTimeoutError, SSLError, ProxyConnectionError (EndpointError);
    # ReadTimeoutError, ConnectionClosedError, ResponseStreamingError (HTTPClientError)
    # RetriesExceededError without its last error: a GET re-read until s3transfer gave up
    if isinstance(exc, (EndpointError, HTTPClientError, IncompleteReadError, Mismatch, RetriesExceededError,
                        TransferRetriesExceededError)):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError, http.client.IncompleteRead)):  # the builtins: resets, timeouts
        return True
    try:
        from urllib3.exceptions import NewConnectionError, ProtocolError, TimeoutError as Urllib3Timeout
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        return False
    return isinstance(exc, (NewConnectionError, ProtocolError, Urllib3Timeout))


def _worth_another_transfer(exc: BaseException) -> bool:
    """Worth retrying the whole transfer: our own check failed, a 5xx botocore has not retried to
    its limit, or an OS error from outside botocore. Errors botocore or s3transfer have already
    retried (connections, timeouts, cut bodies, a 5xx after max_attempts) are not retried again:
    the attempts would multiply."""
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError
    from . import disk
    if isinstance(exc, (RetriesExceededError, TransferRetriesExceededError)):  # re-read to its limit already
        return False
    exc = _unwrap(exc)
    if disk.find(exc):  # a full local disk stays full
        return False
    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode") or 0
        return (status >= 500 or status == 429) and not meta.get("MaxAttemptsReached")
    if isinstance(exc, (BotoCoreError, RetriesExceededError)):
        return False
    return isinstance(exc, OSError)


def with_retries(fn: Callable[[], object], what: str, attempts: int = 4, base_delay: float = 0.5):
    """Run fn, retrying transient errors with exponential backoff; other errors propagate at once."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if i == attempts - 1 or not _worth_another_transfer(exc):
                raise
            delay = base_delay * (2 ** i)
            print(f"[storage] {what}: {type(exc).__name__}: {exc}; retrying in {delay:.1f}s", flush=True)
            time.sleep(delay)


def _transfer_config(settings: S3Settings):
    from boto3.s3.transfer import TransferConfig
    return TransferConfig(multipart_threshold=settings.multipart_threshold,
                          multipart_chunksize=settings.multipart_chunksize, max_concurrency=settings.concurrency,
                          use_threads=True, num_download_attempts=settings.max_attempts)


# ---------------------------------------------------------------- download

def unsafe_name(rel: str) -> Optional[str]:
    """Why rel (an object's key less the listed prefix) cannot be written as a file under the
    download folder, or None when it can: empty, absolute (a key with a doubled '/'), a '.', '..'
    or empty segment, a NUL, or the folder's own index (INDEX_NAME). S3 stores any such key; a
    file written at dest/rel would land outside dest or overwrite the index. Pure."""
    if not rel:
        return "an empty name"
    if "\0" in rel:
        return "a NUL character"
    if rel.startswith("/"):
        return "a doubled '/' (an absolute name)"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a '.', '..' or empty path segment"
    if parts[0].startswith(INDEX_NAME):  # the index, its temporary copies and the ranks' own (RANK_INDEX)
        return f"the name of the download folder's own index ({INDEX_NAME})"
    return None


def _inside(root: Path, rel: str) -> bool:
    """Whether root/rel, symbolic links resolved, stays inside root (a resolved path)."""
    return (root / rel).resolve().is_relative_to(root)


def unsafe_error(loc: Location, key: str, why: str) -> StorageError:
    return StorageError(f"reading {loc}: object key {key!r} cannot be a file under the download folder: {why}; "
                        f"rename or delete that object")


def _list(client, loc: Location, unsafe: Optional[list[str]] = None) -> list[dict]:
    """Objects under loc.key: the key itself if it is an object, else everything below 'key/'.
    A key that cannot be a file under the download folder (unsafe_name) raises StorageError
    naming it, or with a list for unsafe, is left out and appended there."""
    try:
        head = client.head_object(Bucket=loc.bucket, Key=loc.key) if loc.key and not loc.key.endswith("/") else None
    except Exception as exc:  # noqa: BLE001
        from botocore.exceptions import ClientError
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""
        if code not in ("404", "NoSuchKey", "NotFound"):
            raise describe_error(exc, loc, "reading") from None
        head = None
    if head is not None:
        name = loc.key.rsplit("/", 1)[-1]
        why = unsafe_name(name)
        if why:
            raise unsafe_error(loc, loc.key, why)
        return [{"Key": loc.key, "Size": head["ContentLength"], "ETag": head["ETag"], "rel": name}]
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    out, left_out = [], []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    rel = obj["Key"][len(prefix):]
                    why = unsafe_name(rel)
                    if why and unsafe is None:
                        raise unsafe_error(loc, obj["Key"], why)
                    if why:
                        left_out.append(obj["Key"])
                    else:
                        out.append({"Key": obj["Key"], "Size": obj["Size"], "ETag": obj["ETag"], "rel": rel})
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise describe_error(exc, loc, "listing") from None
    if unsafe is not None:
        unsafe += left_out
    if not out and not left_out:
        raise StorageError(f"reading {loc}: no such key {loc.key!r} and no objects under {prefix!r} in bucket {loc.bucket!r}")
    return out


RANK_INDEX = INDEX_NAME + ".r{rank}"  # what one rank fetched later (fetch_later), merged in at the next download


def _read_index(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_index(dest: Path, name: str = INDEX_NAME) -> dict:
    """The folder's index ({rel: {etag, size, at}}); the folder's own with the ranks' merged in,
    the newest record of each name winning (`at`: when its bytes arrived)."""
    index = _read_index(dest / name)
    if name == INDEX_NAME:
        for side in sorted(dest.glob(RANK_INDEX.format(rank="*"))):
            for rel, rec in _read_index(side).items():
                if rec.get("at", 0) >= index.get(rel, {}).get("at", 0):
                    index[rel] = rec
    return index


def _save_index(dest: Path, index: dict, name: str = INDEX_NAME) -> float:
    """Write the index (json's C encoder: no indent, 1M entries in about 2 s) through a temporary
    file of its own (ranks and jobs may share the folder); the seconds it took."""
    t0 = time.monotonic()
    fd, tmp = tempfile.mkstemp(prefix=f"{INDEX_NAME}.tmp", dir=dest)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(index, sort_keys=True))
        os.replace(tmp, dest / name)
    finally:
        Path(tmp).unlink(missing_ok=True)  # a full disk: no partial copy left behind
    return time.monotonic() - t0


def _download_one(client, settings: S3Settings, bucket: str, obj: dict, target: Path,
                  moved: Optional[Callable[[int], None]] = None) -> None:
    """moved(n): n more bytes arrived (from the transfer's threads)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    loc = Location(bucket, obj["Key"])

    def attempt():
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        try:
            if obj["Size"] < settings.multipart_threshold:  # the listed bytes, or 412: the index records
                _get_small(client, bucket, obj["Key"], tmp, settings.max_attempts, moved, obj.get("ETag"))
            else:  # ranged GETs in parallel (one HEAD first: nothing next to a multi-GB file)
                _same_etag(client, bucket, obj)
                client.download_file(bucket, obj["Key"], tmp, Config=_transfer_config(settings), Callback=moved)
            if os.path.getsize(tmp) != obj["Size"]:
                raise Mismatch(f"size mismatch: got {os.path.getsize(tmp)} bytes, expected {obj['Size']}")
            os.replace(tmp, target)
            _transferred("download", obj["Size"])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    try:
        with_retries(attempt, f"downloading {loc}")
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _local_full(exc, loc, target) or describe_error(exc, loc, "downloading") from None


def quoted(etag: str) -> str:
    """An entity tag as If-Match takes it (RFC 9110: in double quotes), however a listing gave it
    (some S3-compatible stores list ETags without their quotes). Pure."""
    return etag if etag.startswith('"') else f'"{etag}"'


def _same_etag(client, bucket: str, obj: dict) -> None:
    """Before a large download (s3transfer takes no If-Match): the object still has its listed ETag."""
    if obj.get("ETag") and not etag_matches(client.head_object(Bucket=bucket, Key=obj["Key"])["ETag"], obj["ETag"],
                                            strict=True):
        from botocore.exceptions import ClientError
        raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "another ETag than listed"},
                           "ResponseMetadata": {"HTTPStatusCode": 412}}, "HeadObject")


def _get_small(client, bucket: str, key: str, path: str, attempts: int,
               moved: Optional[Callable[[int], None]] = None, etag: Optional[str] = None) -> None:
    """One GET into path: the listing gave the size, so no HEAD first (boto3's download_file makes
    one for every object: twice the requests for a dataset of small images). With etag (the
    listed one) the GET is conditional: an object rewritten since is refused (412), never recorded
    in the index under the ETag it was listed with. As s3transfer does,
    a GET whose answer timed out or whose body was cut short is made again, attempts in all
    (botocore retries a request, not the reading of its body); then the last such error is raised
    inside a RetriesExceededError, as s3transfer's, so no layer above retries it again."""
    from boto3.exceptions import RetriesExceededError
    from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS
    for attempt in range(attempts):
        try:
            body = client.get_object(Bucket=bucket, Key=key, **({"IfMatch": quoted(etag)} if etag else {}))["Body"]
            try:
                with open(path, "wb") as f:
                    for chunk in body.iter_chunks(1 << 20):
                        f.write(chunk)
                        if moved is not None:
                            moved(len(chunk))
            finally:
                body.close()
            return
        except S3_RETRYABLE_DOWNLOAD_ERRORS as e:
            if attempt == attempts - 1:
                raise RetriesExceededError(e) from e


def _local_full(exc: BaseException, loc: Location, target: Path) -> Optional[StorageError]:
    """disk.NoRoom when fetching loc to target failed because the local disk is full (bad input:
    the message names the volume and the fix), None otherwise."""
    from . import disk
    return disk.no_room(exc, f"downloading {loc}", path=target)


PROGRESS_SECONDS = 30.0  # a long download's progress line and index save, at most this often
HEARTBEAT_POLL_SECONDS = 5.0  # how often a download with nothing finished looks whether bytes came in


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def download(uri: str, dest: str | Path, settings: S3Settings = S3Settings(), client=None,
             log: Callable[[str], None] = print, unsafe: Optional[list[str]] = None,
             below: Optional[list[str]] = None, progress: Optional[Callable[[], None]] = None,
             room: Optional[Callable[[int, Path], None]] = None,
             later: Optional[Callable[[str], bool]] = None, deferred: Optional[list[dict]] = None,
             listing: Optional[list[dict]] = None) -> Path:
    """Fetch an object or a whole prefix into dest (a folder). Returns the local path of the
    object (dest/<name>) or of the folder (dest). Complete files (size + ETag) are not fetched
    again; a local URI is returned as it is. Nothing is written outside dest: a key that cannot be
    a file under it (unsafe_name: '..', a doubled '/', the index's name) raises StorageError
    naming the key (bad input), or, given a list for unsafe (a dataset: a bad file is skipped), is
    not fetched and its key appended there. Given a list for below (a dataset read without its
    subfolders), the objects in subfolders of the prefix are not fetched and their relative names
    are appended there. Given later(rel) and a list for deferred, the objects to fetch whose
    relative name later() accepts (a dataset's media) are not fetched but appended to deferred
    (listed objects, with "rel"): fetch_later fetches them where they are read (a stale copy is
    left in place until then: the folder may be shared with other nodes and jobs, whose ranks may
    be reading their current copy). Given a list for listing, every object kept is appended there.
    A long download says how far it is every PROGRESS_SECONDS and saves its
    index as often, so what was fetched is kept when it stops (a failed object stops the others:
    those not started are not fetched); progress() is called after each object. room(bytes, dest)
    is asked before anything is fetched (it raises when they do not fit); deferred objects are not
    counted there (the ranks that fetch them check their room together: media_later.Later.to_fetch)."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        p = Path(loc.key)
        if not p.exists():
            raise StorageError(f"reading {p}: no such file or directory")
        return p
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    client = client or make_client(settings)
    objs = _list(client, loc, unsafe)
    kept, root = [], dest.resolve()
    for obj in objs:  # the names were checked segment by segment; this catches a symbolic link within dest
        if _inside(root, obj["rel"]):
            kept.append(obj)
        elif unsafe is None:
            raise unsafe_error(loc, obj["Key"], f"it leads outside {dest} through a symbolic link")
        else:
            unsafe.append(obj["Key"])
    objs = kept
    if below is not None:
        below += [o["rel"] for o in objs if "/" in o["rel"]]
        objs = [o for o in objs if "/" not in o["rel"]]
    if listing is not None:
        listing += objs
    index = load_index(dest)
    todo = []
    for obj in objs:
        target = dest / obj["rel"]
        rec = index.get(obj["rel"])
        if rec and rec.get("etag") == obj["ETag"] and target.is_file() and target.stat().st_size == obj["Size"]:
            continue
        todo.append(obj)
    put_off, now = [], []
    for o in todo:
        (put_off if later is not None and deferred is not None and later(o["rel"]) else now).append(o)
    todo, total, total_later = now, sum(o["Size"] for o in now), sum(o["Size"] for o in put_off)
    if room is not None and todo:  # a file fetched again replaces its old copy: only what it adds
        room(sum(max(0, o["Size"] - _size_of(dest / o["rel"])) for o in todo), dest)
    if deferred is not None:
        deferred += put_off
    log(f"[stage-in] {loc}: {len(objs)} objects, {len(objs) - len(todo) - len(put_off)} already cached, "
        f"fetching {len(todo)} ({total / MB:.1f} MiB)"
        + (f"; {len(put_off)} media files ({total_later / MB:.1f} MiB) are fetched by the ranks that read them"
           if put_off else ""))
    _fetch(client, settings, loc, todo, dest, index, log, progress)
    single = len(objs) == 1 and objs[0]["Key"] == loc.key
    return dest / objs[0]["rel"] if single else dest


def fetch_later(uri: str, objs: list[dict], dest: Path, settings: S3Settings, rank: int, client=None,
                log: Callable[[str], None] = print, progress: Optional[Callable[[], None]] = None,
                gone: Optional[list[dict]] = None, index: Optional[dict] = None) -> int:
    """Fetch objects that download(uri, dest) deferred (listed objects with "rel") into dest, on any
    rank; those that another rank (or job) sharing the folder has fetched since, as its index
    records at their listed ETag and size, are left alone. Each is recorded in this rank's own
    index (RANK_INDEX), which the next download merges into the folder's. An object deleted from the
    bucket or rewritten since it was listed is appended to gone, when given, and the others are
    fetched. Returns how many were fetched. index: the folder's merged index, when the caller
    loaded it already (a million records take seconds to read)."""
    index = load_index(dest) if index is None else index

    def current(o: dict) -> bool:
        rec = index.get(o["rel"], {})
        return rec.get("etag") == o["ETag"] and rec.get("size") == o["Size"] and (dest / o["rel"]).is_file() \
            and _size_of(dest / o["rel"]) == o["Size"]
    todo = [o for o in objs if not current(o)]
    if todo:
        name = RANK_INDEX.format(rank=rank)
        _fetch(client or make_client(settings), settings, parse_uri(uri), todo, dest, load_index(dest, name), log,
               progress, name, "[data]", gone)
    return len(todo) - len(gone or ())


def _fetch(client, settings: S3Settings, loc: Location, todo: list[dict], dest: Path, index: dict,
           log: Callable[[str], None], progress: Optional[Callable[[], None]], index_name: str = INDEX_NAME,
           tag: str = "[stage-in]", gone: Optional[list[dict]] = None) -> None:
    """Fetch the listed objects todo into dest, in parallel, recording each in index (saved as
    index_name every PROGRESS_SECONDS and at the end, also after a failure). With a list for
    gone, an object no longer in the bucket as listed is appended there instead of failing the
    download; without, that fails it as transient (a retry lists the bucket again)."""
    total = sum(o["Size"] for o in todo)
    t0 = last = time.time()
    done = fetched = 0
    arrived, arrived_lock, beat_at = [0], threading.Lock(), [0]

    def moved(n: int) -> None:  # from the transfers' threads
        with arrived_lock:
            arrived[0] += n

    def record(o: dict) -> None:
        nonlocal done, fetched
        index[o["rel"]] = {"etag": o["ETag"], "size": o["Size"], "at": time.time()}
        done, fetched = done + 1, fetched + o["Size"]

    finished, save_every = False, PROGRESS_SECONDS
    small = all(o["Size"] < settings.multipart_threshold for o in todo)  # large ones run their own threads
    workers = min(settings.small_concurrency if small else settings.concurrency, max(1, len(todo)))
    pool = ThreadPoolExecutor(max_workers=workers)
    queue, running = iter(todo), {}  # a few objects per thread at a time, not a future per object of millions

    def top_up() -> None:
        while len(running) < 4 * workers and (o := next(queue, None)) is not None:
            running[pool.submit(_download_one, client, settings, loc.bucket, o, dest / o["rel"], moved)] = o
    try:
        top_up()
        while running:
            ready, _ = wait(running, timeout=HEARTBEAT_POLL_SECONDS, return_when=FIRST_COMPLETED)
            for fut in ready:
                o = running.pop(fut)
                try:
                    fut.result()  # re-raises the first StorageError: nothing more is started
                except NoSuchObject as e:
                    if gone is None:  # it was listed: deleted or rewritten since, which a retry lists anew
                        raise NoSuchObject(str(e), transient=True) from None
                    gone.append(o)
                    continue
                record(o)
            top_up()
            if progress is not None and arrived[0] != beat_at[0]:  # bytes came in: one large object is
                beat_at[0] = arrived[0]                           # progress too
                progress()
            if time.time() - last >= save_every:
                save_every = max(PROGRESS_SECONDS, 20 * _save_index(dest, index, index_name))  # a large index: less often
                last = time.time()
                log(f"{tag} {loc}: {done}/{len(todo)} fetched ({fetched / MB:.1f} of {total / MB:.1f} MiB, "
                    f"{fetched / MB / max(last - t0, 1e-6):.1f} MiB/s)")
        finished = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure: the objects not started are not
        for fut, o in running.items():  # fetched before the failure was seen, or while it was: kept too
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                record(o)
        try:
            if finished or done:  # what was fetched before a failure is kept
                _save_index(dest, index, index_name)
        except OSError:
            if finished:  # else the download's own error is the one to say
                raise
    if todo:
        dt = max(time.time() - t0, 1e-6)
        log(f"{tag} {loc}: {len(todo)} fetched in {dt:.1f}s ({total / MB / dt:.1f} MiB/s)")


# ---------------------------------------------------------------- upload

def sha256_file(path: str | Path, chunk: int = 4 * MB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def expected_etag(path: str | Path, size: int, threshold: int, chunk: int) -> str:
    """The ETag S3 gives an object uploaded with these transfer settings: the MD5 of the file, or
    for a multipart upload the MD5 of the parts' MD5s and "-<parts>". Pure but for reading path."""
    with open(path, "rb") as f:
        if size < threshold:
            h = hashlib.md5()
            for block in iter(lambda: f.read(4 * MB), b""):
                h.update(block)
            return h.hexdigest()
        digests = [hashlib.md5(block).digest() for block in iter(lambda: f.read(chunk), b"")]
    return hashlib.md5(b"".join(digests)).hexdigest() + f"-{len(digests)}"


def etag_matches(stored: str, expected: str, strict: bool = False) -> bool:
    """False only when the store gives an MD5-style ETag that differs (some stores give other
    ETags, e.g. with SSE-KMS: those cannot be checked this way). strict: two ETags as the store
    gives them (a listed one and a HEAD's), equal or not."""
    stored, expected = stored.strip('"'), expected.strip('"')
    if strict:
        return stored == expected
    looks_md5 = len(stored.split("-")[0]) == 32 and stored.count("-") == expected.count("-")
    return stored == expected or not looks_md5


def etag_is_md5(answer: dict) -> bool:
    """Whether a PUT's or HEAD's answer has an ETag that is the content's MD5: not under SSE-KMS
    or SSE-C, whose ETags look like an MD5 and are not one."""
    return answer.get("ServerSideEncryption") not in ("aws:kms", "aws:kms:dsse") and not answer.get("SSECustomerAlgorithm")


UMASK = os.umask(0o022)  # the process's umask (read by setting it, then put back): a published file's mode
os.umask(UMASK)


def upload(path: str | Path, uri: str, settings: S3Settings = S3Settings(), client=None,
           content_type: str = "application/octet-stream") -> dict:
    """Publish one file; returns {uri, sha256, size}. A failed or corrupted upload never appears
    under its final name, and a retried job publishes the same bytes again rather than a partial
    file: a file under the multipart threshold goes up in one PUT carrying its MD5 (_put_small);
    a larger one goes to a temporary key first and reaches the final key (a server-side copy) only
    after the stored size and content checksum (ETag) match the file."""
    path = Path(path)
    digest, size = sha256_file(path), path.stat().st_size
    loc = parse_uri(uri)
    if not loc.is_s3:
        target = Path(loc.key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # a temporary name of its own: two jobs (or ranks) publishing the same name at once into a
        # shared folder (a cacheUri on a shared volume) never write into one file
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        try:
            os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 would keep other users (jobs, readers) out
            shutil.copyfile(path, tmp)
            if os.path.getsize(tmp) != size:
                raise StorageError(f"writing {target}: {os.path.getsize(tmp)} of {size} bytes written")
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return {"uri": str(target), "sha256": digest, "size": size}
    client = client or make_client(settings)
    config = _transfer_config(settings)
    if size < config.multipart_threshold:
        try:
            with_retries(lambda: _put_small(client, path, loc, digest, content_type), f"uploading {loc}")
        except Exception as exc:  # noqa: BLE001
            raise describe_error(exc, loc, "uploading") from None
        _transferred("upload", size)
        return {"uri": str(loc), "sha256": digest, "size": size}
    etag = expected_etag(path, size, config.multipart_threshold, config.multipart_chunksize)
    parent, _, name = loc.key.rpartition("/")
    tmp_key = f"{parent + '/' if parent else ''}.{name}.{os.getpid()}-{int(time.time() * 1000)}.part"
    extra = {"Metadata": {"sha256": digest}, "ContentType": content_type}

    def attempt():
        client.upload_file(str(path), loc.bucket, tmp_key, Config=config, ExtraArgs=extra)
        head = client.head_object(Bucket=loc.bucket, Key=tmp_key)
        if head["ContentLength"] != size or (etag_is_md5(head) and not etag_matches(head.get("ETag", ""), etag)):
            raise Mismatch(f"stored object differs from {path} (size {head['ContentLength']} vs {size}, "
                           f"ETag {head.get('ETag')} vs {etag})")
        client.copy({"Bucket": loc.bucket, "Key": tmp_key}, loc.bucket, loc.key, Config=config,
                    ExtraArgs={**extra, "MetadataDirective": "REPLACE"})
        final = client.head_object(Bucket=loc.bucket, Key=loc.key)
        if final["ContentLength"] != size or final.get("Metadata", {}).get("sha256") != digest:
            raise Mismatch(f"published object differs from {path}")

    try:
        with_retries(attempt, f"uploading {loc}")
    except Exception as exc:  # noqa: BLE001
        raise describe_error(exc, loc, "uploading") from None
    finally:
        try:
            client.delete_object(Bucket=loc.bucket, Key=tmp_key)
        except Exception:  # noqa: BLE001 - best effort: a leftover .part is never read as an artifact
            pass
    _transferred("upload", size)
    return {"uri": str(loc), "sha256": digest, "size": size}


def _put_small(client, path: Path, loc: Location, digest: str, content_type: str) -> None:
    """One PutObject with the file's MD5 as Content-MD5: S3 stores a PUT's body whole or not at
    all and refuses one whose MD5 is not the one sent (BadDigest), so no temporary key is needed
    (with one, a file took five requests: a shared cache pushes a file per entry). The answer's
    ETag is checked too (where it is an MD5), for a store that ignores Content-MD5: a mismatch fails
    the upload (retried).
    The file must still be the one hashed (sha256, kept in the object's metadata)."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise Mismatch(f"{path} changed while it was being uploaded")
    md5 = hashlib.md5(data)
    from botocore.exceptions import ClientError
    try:
        answer = client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, ContentType=content_type,
                                   ContentMD5=base64.b64encode(md5.digest()).decode(), Metadata={"sha256": digest})
    except ClientError as e:  # the server refused the body: other bytes arrived than were sent (a retry may do)
        if e.response.get("Error", {}).get("Code") != "BadDigest":
            raise
        raise Mismatch(f"stored object differs from {path}: the server refused the body as corrupt (BadDigest)") from None
    # a store that ignores Content-MD5 (the final name then holds what it stored, and the upload fails:
    # never reported as success; a retry puts the file again). Not deleted: it may have been a good
    # object that this upload was to replace
    if etag_is_md5(answer) and not etag_matches(answer.get("ETag", ""), md5.hexdigest()):
        raise Mismatch(f"stored object differs from {path} (ETag {answer.get('ETag')} vs {md5.hexdigest()})")


def upload_tree(folder: str | Path, uri: str, settings: S3Settings = S3Settings(), client=None) -> list[dict]:
    folder = Path(folder)
    loc = parse_uri(uri)
    client = client or (make_client(settings) if loc.is_s3 else None)
    return [upload(f, str(loc.child(str(f.relative_to(folder)))), settings, client)
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != INDEX_NAME]


# ---------------------------------------------------------------- pre-flight

def check_writable(uri: str, settings: S3Settings = S3Settings(), client=None, create: bool = True) -> None:
    """Write and delete a small marker under uri, so a missing or read-only output is found before
    any GPU time is spent rather than after the last step. Raises StorageError naming uri. A
    local folder is made first; with create=False (a check that must leave nothing behind:
    `kubelora validate --check-storage`) the marker goes to its nearest existing parent."""
    loc = parse_uri(uri)
    marker = f".kubelora-write-check-{os.getpid()}"
    if not loc.is_s3:
        folder = Path(loc.key)
        try:
            if create:
                folder.mkdir(parents=True, exist_ok=True)
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            (folder / marker).write_bytes(b"ok")
            (folder / marker).unlink()
        except OSError as e:
            raise StorageError(f"writing to {loc}: {e.strerror or e}; it must be writable") from None
        return
    client = client or make_client(settings)
    key = loc.child(marker)
    try:
        with_retries(lambda: client.put_object(Bucket=loc.bucket, Key=key.key, Body=b"ok"), f"writing to {key}")
        with_retries(lambda: client.delete_object(Bucket=loc.bucket, Key=key.key), f"deleting {key}")
    except Exception as exc:  # noqa: BLE001
        raise describe_error(exc, loc, "writing to") from None


def check_readable(uri: str, settings: S3Settings = S3Settings(), client=None,
                   unsafe: Optional[list[str]] = None, sizes: Optional[dict[str, int]] = None) -> tuple[int, int]:
    """(objects, bytes) under uri that download would fetch; raises StorageError when it cannot be
    read or is empty, or names a key that cannot be a file (unsafe_name) unless given a list for
    unsafe, which then gets those keys (as download). Given a dict for sizes, an s3 URI's objects
    go there ({relative name: bytes})."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        path = Path(loc.key)
        if not path.exists():
            raise StorageError(f"reading {loc}: no such file or directory")
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        if not files:
            raise StorageError(f"reading {loc}: the folder holds no files")
        return len(files), sum(f.stat().st_size for f in files)
    objs = _list(client or make_client(settings), loc, unsafe)
    if sizes is not None:
        sizes.update((o["rel"], o["Size"]) for o in objs)
    return len(objs), sum(o["Size"] for o in objs)


# ---------------------------------------------------------------- listing and deleting (checkpoints)

def list_keys(uri: str, settings: S3Settings = S3Settings(), client=None) -> list[str]:
    """Names of the objects (files) under uri, relative to it; [] when there are none."""
    return sorted(list_sizes(uri, settings, client))


def list_sizes(uri: str, settings: S3Settings = S3Settings(), client=None) -> dict[str, int]:
    """{name relative to uri: size in bytes} of the objects (files) under uri, from one paginated
    LIST (no HEAD per object); {} when there are none."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        root = Path(loc.key)
        return {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*") if f.is_file()} if root.is_dir() else {}
    client = client or make_client(settings)
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    try:
        return {o["Key"][len(prefix):]: o["Size"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=loc.bucket, Prefix=prefix) for o in page.get("Contents", [])}
    except Exception as exc:  # noqa: BLE001
        raise describe_error(exc, loc, "listing") from None


def download_file(uri: str, target: str | Path, size: int, settings: S3Settings = S3Settings(), client=None) -> None:
    """Fetch one object of a known size (from a listing) to the file target, through a temporary
    name renamed only when complete and of that size (a local uri: copied the same way)."""
    loc, target = parse_uri(uri), Path(target)
    if loc.is_s3:
        _download_one(client or make_client(settings), settings, loc.bucket, {"Key": loc.key, "Size": size}, target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own per call: threads of one process may fetch the same object at once
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        shutil.copyfile(loc.key, tmp)
        if tmp.stat().st_size != size:
            raise StorageError(f"reading {loc}: {tmp.stat().st_size} bytes, expected {size}")
        os.replace(tmp, target)
    except OSError as e:
        raise _local_full(e, loc, target) or StorageError(f"reading {loc}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def delete_prefix(uri: str, settings: S3Settings = S3Settings(), client=None, first: tuple[str, ...] = ()) -> None:
    """Delete every object under uri (a local folder: the folder); objects whose name is in first
    (a completion marker) before any other, so a delete that fails part-way never leaves a marker
    beside missing files. Raises StorageError when any object could not be deleted: S3's batch
    delete answers 200 and lists its failures in Errors, which would otherwise pass unseen."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        root = Path(loc.key)
        try:
            for name in first:
                for p in list(root.rglob(name)):
                    p.unlink()
            shutil.rmtree(root)
        except FileNotFoundError:
            pass
        except OSError as e:
            transient = e.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EBUSY, errno.EAGAIN)  # a flaky mount
            raise StorageError(f"deleting {uri}: {e.strerror or e} ({e.filename})", transient=transient) from None
        return
    client = client or make_client(settings)
    keys = [str(loc.child(k).key) for k in list_keys(uri, settings, client)]
    markers = [k for k in keys if k.rsplit("/", 1)[-1] in first]
    rest = [k for k in keys if k.rsplit("/", 1)[-1] not in first]
    try:  # the markers in batches of their own (at most 1000 keys each), answered before the rest is sent
        batches = [part[i:i + 1000] for part in (markers, rest) for i in range(0, len(part), 1000)]
        for batch in batches:
            resp = client.delete_objects(Bucket=loc.bucket, Delete={"Objects": [{"Key": k} for k in batch]})
            if failed := resp.get("Errors"):
                codes = sorted({str(e.get("Code", "")) for e in failed})
                raise StorageError(
                    f"deleting s3://{loc.bucket}/{loc.key}: {len(failed)} of {len(batch)} objects not deleted "
                    f"({', '.join(codes)}; first {failed[0].get('Key')}: {failed[0].get('Message', '')})",
                    transient=any(c in TRANSIENT_CODES for c in codes))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise describe_error(exc, loc, "deleting") from None


# a machine's own I/O failures (a network filesystem's, a flaky disk's): worth another attempt
MACHINE_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY, errno.ENOMEM,
                            errno.EMFILE, errno.ENFILE, errno.ENOLCK, errno.ECONNRESET, errno.ENETUNREACH,
                            errno.EHOSTUNREACH, errno.ENOTCONN})


def read_object(uri: str, settings: S3Settings = S3Settings(), client=None) -> Optional[bytes]:
    """A small object's (a local file's) bytes; None when there is none. A failure is transient
    where another attempt may pass (a network filesystem's EIO or ESTALE, the store's 5xx)."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        p = Path(loc.key)
        try:
            return p.read_bytes() if p.is_file() else None
        except OSError as e:
            raise StorageError(f"reading {p}: {e.strerror or e}", transient=e.errno in MACHINE_ERRNOS) from None
    from botocore.exceptions import ClientError
    client = client or make_client(settings)

    def get() -> Optional[bytes]:
        from boto3.exceptions import RetriesExceededError
        from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS
        for attempt in range(settings.max_attempts):
            try:  # the request: botocore retries it (a 5xx, a timeout), not again here
                body = client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            try:  # its body: botocore does not read it again when it is cut short, so this does
                with body:
                    return body.read()
            except S3_RETRYABLE_DOWNLOAD_ERRORS as e:
                if attempt == settings.max_attempts - 1:
                    raise RetriesExceededError(e) from e
    try:
        return with_retries(get, f"reading {loc}")
    except Exception as exc:  # noqa: BLE001
        raise describe_error(exc, loc, "reading") from None


def delete_object(uri: str, settings: S3Settings = S3Settings(), client=None) -> None:
    """Delete one object (a local file); one that is not there is fine."""
    loc = parse_uri(uri)
    try:
        if not loc.is_s3:
            Path(loc.key).unlink(missing_ok=True)
        else:
            (client or make_client(settings)).delete_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:  # noqa: BLE001
        raise describe_error(exc, loc, "deleting") from None


def ensure_bucket(client, name: str) -> None:
    """Create a bucket unless this account already has it (S3 answers BucketAlreadyOwnedByYou)."""
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
