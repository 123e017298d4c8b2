"""Storage against a real S3 server (SeaweedFS): prefixes, caching by size+ETag, atomic
files, retries and errors that name the object."""
import json
import os
import socket
from pathlib import Path

import pytest

from kubelora_trainer import storage
from kubelora_trainer.storage import S3Settings, StorageError, download, parse_uri, upload, upload_tree


def _bucket(s3, name):
    s3.create_bucket(Bucket=name)
    return name


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text('{"a": 1}')
    (root / "sub" / "b.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    return root


def test_parse_uri():
    assert parse_uri("s3://bkt/a/b") == storage.Location("bkt", "a/b")
    assert parse_uri("/data/x").key == "/data/x" and not parse_uri("/data/x").is_s3
    with pytest.raises(StorageError, match="unsupported URI"):
        parse_uri("gs://bkt/x")


def test_prefix_roundtrip_and_cache_skip(s3, tmp_path):
    b = _bucket(s3, "roundtrip")
    src = _tree(tmp_path / "src")
    arts = upload_tree(src, f"s3://{b}/model", client=s3)
    assert {a["uri"] for a in arts} == {f"s3://{b}/model/a.json", f"s3://{b}/model/sub/b.bin"}
    head = s3.head_object(Bucket=b, Key="model/sub/b.bin")
    assert head["Metadata"]["sha256"] == storage.sha256_file(src / "sub" / "b.bin")

    logs = []
    dest = download(f"s3://{b}/model", tmp_path / "dst", client=s3, log=logs.append)
    assert (dest / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert "fetching 2" in logs[0]
    mtime = (dest / "sub" / "b.bin").stat().st_mtime_ns
    download(f"s3://{b}/model", tmp_path / "dst", client=s3, log=logs.append)
    assert "2 already cached, fetching 0" in logs[-1]  # and no "done" line: nothing transferred
    assert (dest / "sub" / "b.bin").stat().st_mtime_ns == mtime

    # the object changes (new ETag): fetched again
    s3.put_object(Bucket=b, Key="model/a.json", Body=b'{"a": 2}')
    download(f"s3://{b}/model", tmp_path / "dst", client=s3, log=logs.append)
    assert "1 already cached, fetching 1" in logs[-2]
    assert (dest / "a.json").read_text() == '{"a": 2}'


def test_single_object_download(s3, tmp_path):
    b = _bucket(s3, "single")
    s3.put_object(Bucket=b, Key="ckpt/flux.safetensors", Body=b"x" * 100)
    p = download(f"s3://{b}/ckpt/flux.safetensors", tmp_path / "d", client=s3, log=lambda m: None)
    assert p == tmp_path / "d" / "flux.safetensors" and p.read_bytes() == b"x" * 100


def test_truncated_file_is_not_trusted(s3, tmp_path):
    """A file left under the final name by something else (wrong size, no index) is fetched again."""
    b = _bucket(s3, "trunc")
    s3.put_object(Bucket=b, Key="m/w.bin", Body=b"y" * 1000)
    dest = tmp_path / "d"
    download(f"s3://{b}/m", dest, client=s3, log=lambda m: None)
    (dest / "w.bin").write_bytes(b"y" * 10)
    download(f"s3://{b}/m", dest, client=s3, log=lambda m: None)
    assert (dest / "w.bin").read_bytes() == b"y" * 1000


class _Interrupting:
    """Real client whose GETs break after half the body (a dropped connection is the one thing a
    real server cannot be asked to do; tests/test_s3_faults.py cuts real answers through a proxy);
    every other call goes to the real server."""

    def __init__(self, client, failures):
        self._c, self.failures, self.calls = client, failures, 0

    def __getattr__(self, name):
        return getattr(self._c, name)

    def get_object(self, **kw):
        self.calls += 1
        answer = self._c.get_object(**kw)
        if self.calls <= self.failures:
            answer["Body"] = _HalfBody(answer["Body"].read())
        return answer


class _HalfBody:
    def __init__(self, data):
        self.data = data

    def iter_chunks(self, size):
        yield self.data[: len(self.data) // 2]
        raise ConnectionResetError("connection reset by peer (simulated)")

    def close(self):
        pass


def test_interrupted_download_retries_and_never_leaves_partial_file(s3, tmp_path):
    b = _bucket(s3, "intr")
    s3.put_object(Bucket=b, Key="m/w.bin", Body=b"z" * 5000)
    dest = tmp_path / "d"
    flaky = _Interrupting(s3, failures=1000)
    with pytest.raises(StorageError, match=r"downloading s3://intr/m/w.bin: ConnectionResetError"):
        download(f"s3://{b}/m", dest, client=flaky, log=lambda m: None)
    assert not (dest / "w.bin").exists()
    assert not list(dest.glob("*.part")), "temporary files must be cleaned up"
    assert flaky.calls == S3Settings().max_attempts  # re-GETs as s3transfer's, not retried again on top
    # transient: succeeds on retry, file complete
    flaky = _Interrupting(s3, failures=2)
    download(f"s3://{b}/m", dest, client=flaky, log=lambda m: None)
    assert flaky.calls == 3 and (dest / "w.bin").read_bytes() == b"z" * 5000


def test_a_failed_object_stops_the_download_and_what_was_fetched_is_kept(s3, tmp_path):
    """One object that cannot be read (gone between the listing and its GET): the objects not
    started are not fetched, and those fetched are in the index, so the next download skips them."""
    b = _bucket(s3, "partial")
    for i in range(40):
        s3.put_object(Bucket=b, Key=f"d/{i:02d}.txt", Body=b"x" * 100)
    dest = tmp_path / "d"

    class Vanishing:  # the listing has d/05.txt; its GET finds it gone
        calls = 0

        def __getattr__(self, name):
            return getattr(s3, name)

        def get_object(self, **kw):
            Vanishing.calls += 1
            if kw["Key"] == "d/05.txt":
                s3.delete_object(Bucket=b, Key="d/05.txt")
            return s3.get_object(**kw)

    with pytest.raises(StorageError, match=r"s3://partial/d/05.txt"):
        download(f"s3://{b}/d", dest, S3Settings(small_concurrency=1), client=Vanishing(), log=lambda m: None)
    assert Vanishing.calls <= 7  # 00..05 in order, one at a time, and the one begun as 05 failed: no others
    kept = json.loads((dest / ".kubelora-stage.json").read_text())
    first = {f"{i:02d}.txt" for i in range(5)}
    assert first <= set(kept) <= first | {"06.txt"}  # and the one begun as 05 failed, when it was fetched
    s3.put_object(Bucket=b, Key="d/05.txt", Body=b"x" * 100)
    lines = []
    download(f"s3://{b}/d", dest, client=s3, log=lines.append)
    assert f"{len(kept)} already cached, fetching {40 - len(kept)}" in lines[0], lines


def test_errors_name_bucket_key_and_cause(s3, tmp_path):
    b = _bucket(s3, "errs")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        download("s3://no-such-bucket/x", tmp_path, client=s3, log=lambda m: None)
    with pytest.raises(StorageError, match=r"s3://errs/missing/thing: no such key 'missing/thing'"):
        download(f"s3://{b}/missing/thing", tmp_path, client=s3, log=lambda m: None)
    with pytest.raises(StorageError, match="uploading s3://no-such-bucket/f: bucket 'no-such-bucket' does not exist"):
        f = tmp_path / "f"
        f.write_text("x")
        upload(f, "s3://no-such-bucket/f", client=s3)


def test_unreachable_endpoint(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    settings = S3Settings(endpoint=f"http://127.0.0.1:{port}", max_attempts=1, connect_timeout=1)
    with pytest.raises(StorageError, match="endpoint unreachable"):
        download("s3://bkt/x", tmp_path, settings, log=lambda m: None)


def _client_error(code, status, message="m"):
    from botocore.exceptions import ClientError
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 2}}, "GetObject")


def _wrapped_upload_error(cause):
    """What boto3's upload_file raises: S3UploadFailedError with the client error as its context."""
    from boto3.exceptions import S3UploadFailedError
    try:
        try:
            raise cause
        except Exception:
            raise S3UploadFailedError("Failed to upload")
    except S3UploadFailedError as e:
        return e


def _storage_error_table():
    import errno
    import http.client

    from boto3.exceptions import RetriesExceededError as Boto3RetriesExceededError
    from botocore.exceptions import (ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError,
                                     IncompleteReadError, NoCredentialsError, ParamValidationError,
                                     PartialCredentialsError, ReadTimeoutError, ResponseStreamingError, SSLError)
    from s3transfer.exceptions import RetriesExceededError
    url = "http://s3.example:9000/b/k"
    return [
        # the store or the network: transient, the run is retried and resumes
        (_client_error("SlowDown", 503), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("InternalError", 200), True),           # an error inside a 200 (CompleteMultipartUpload)
        (_client_error("502", 502), True),                     # HEAD: no body, the code is the status
        (_client_error("503", None), True),
        (_client_error("GatewayTimeout", 504), True),
        (_client_error("RequestTimeout", 400), True),
        (_client_error("TooManyRequests", 429), True),
        (_client_error("Throttling", 400), True),
        (_client_error("OperationAborted", 409), True),
        (EndpointConnectionError(endpoint_url=url), True),
        (ConnectTimeoutError(endpoint_url=url), True),
        (ReadTimeoutError(endpoint_url=url), True),
        (ConnectionClosedError(endpoint_url=url), True),
        (IncompleteReadError(actual_bytes=450, expected_bytes=500), True),
        (ResponseStreamingError(error="Connection broken: IncompleteRead(450 bytes read, 50 more expected)"), True),
        (SSLError(endpoint_url=url, error="EOF occurred in violation of protocol"), True),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
        (TimeoutError("timed out"), True),
        (http.client.IncompleteRead(b"x" * 450, 50), True),
        (storage.Mismatch("size mismatch: got 450 bytes, expected 500"), True),
        (RetriesExceededError(ReadTimeoutError(endpoint_url=url)), True),            # s3transfer gave up re-reading
        (Boto3RetriesExceededError(IncompleteReadError(actual_bytes=1, expected_bytes=2)), True),
        (RetriesExceededError(None), True),
        (_wrapped_upload_error(_client_error("SlowDown", 503)), True),
        # the input: no retry can help, the Job fails at once
        (_client_error("NoSuchBucket", 404), False),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("404", 404), False),
        (_client_error("AccessDenied", 403), False),
        (_client_error("403", None), False),
        (_client_error("InvalidAccessKeyId", 403), False),
        (_client_error("SignatureDoesNotMatch", 403), False),
        (_client_error("InvalidBucketName", 400), False),
        (_client_error("NotImplemented", 501), False),         # the store lacks the feature: a 5xx that lasts
        (_client_error("", None), False),
        (NoCredentialsError(), False),
        (PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), False),
        (ParamValidationError(report="Invalid bucket name"), False),
        (_wrapped_upload_error(_client_error("AccessDenied", 403)), False),
        (RetriesExceededError(_client_error("NoSuchKey", 404)), False),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), False),
        (ValueError("not an s3 answer"), False),
    ]


def test_storage_errors_are_transient_or_bad_input():
    """The class of a storage failure decides the exit code: transient (the store or the network
    failed) is retried by the Job, bad input fails it at once."""
    from kubelora_trainer import exits
    wrong = [(type(exc).__name__, str(exc)[:60], want) for exc, want in _storage_error_table()
             if storage.is_transient(exc) != want]
    assert not wrong, wrong
    loc = parse_uri("s3://b/models/flux/w.safetensors")
    slow = storage.describe_error(_client_error("SlowDown", 503, "Please reduce your request rate."), loc, "downloading")
    assert (str(slow), slow.transient) == ("downloading s3://b/models/flux/w.safetensors: SlowDown: Please reduce your "
                                           "request rate. (3 attempts)", True)
    missing = storage.describe_error(_client_error("NoSuchBucket", 404), loc, "downloading")
    assert not missing.transient and "bucket 'b' does not exist" in str(missing)
    assert (exits.code_of(slow), exits.code_of(missing)) == (exits.FAILED, exits.BAD_INPUT)
    assert not StorageError("reading /x: no such file or directory").transient  # made by the storage code itself
    assert not pytest.raises(StorageError, parse_uri, "gs://b/k").value.transient
    import pickle
    assert pickle.loads(pickle.dumps(slow)).transient and str(pickle.loads(pickle.dumps(slow))) == str(slow)


def test_peers_stop_with_the_failing_ranks_exit_code(monkeypatch):
    """dist.fail_together: the rank that failed re-raises its own error; the others raise
    PeerFailed naming it, with its exit code, so every pod of a gang exits alike."""
    from kubelora_trainer import dist, exits
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "phase_barrier", lambda what: None)
    outage = StorageError("downloading s3://b/k: SlowDown: Please reduce your request rate. (5 attempts)", transient=True)
    missing = StorageError("output.uri: writing to s3://nope/out: bucket 'nope' does not exist")
    for error, code in ((outage, exits.FAILED), (missing, exits.BAD_INPUT)):
        monkeypatch.setattr(dist, "all_gather", lambda obj, e=error: [(str(e), exits.code_of(e)), obj])
        with pytest.raises(StorageError) as own:
            dist.fail_together(error)  # rank 0
        assert own.value is error
        with pytest.raises(dist.PeerFailed) as peer:
            dist.fail_together(None)   # rank 1
        assert (str(peer.value), peer.value.code) == (f"rank 0 failed: {error}", code)
    monkeypatch.setattr(dist, "all_gather", lambda obj: [obj, obj])
    assert dist.fail_together(None) is None


def _secret_dir_only(tmp_path, monkeypatch) -> Path:
    """Credentials only from a mounted Secret's files (a folder the test fills): no keys in the
    environment, no shared credentials or config file."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    sec = tmp_path / "secret"
    sec.mkdir()
    monkeypatch.setenv(storage.CREDENTIALS_DIR_ENV, str(sec))
    return sec


def test_credentials_from_mounted_secret_files(s3_endpoint, tmp_path, monkeypatch):
    sec = _secret_dir_only(tmp_path, monkeypatch)
    (sec / "AWS_ACCESS_KEY_ID").write_text("from-secret\n")
    (sec / "AWS_SECRET_ACCESS_KEY").write_text("s3cr3t\n")
    client = storage.make_client(S3Settings(endpoint=s3_endpoint))
    assert client._request_signer._credentials.access_key == "from-secret"
    assert client.meta.config.s3["addressing_style"] == "path"
    client.create_bucket(Bucket="secret-ok")


def test_the_operator_reads_with_rotated_secret_files_without_a_restart(s3_endpoint, tmp_path, monkeypatch):
    """The operator's own credentials are a mounted Secret: after a rotation its cached client must
    not keep the old keys (every job without its own credentials would stall on them)."""
    from kubelora_operator import artifacts
    from kubelora_trainer.local_s3 import SECRET_FILE_KEYS
    sec = _secret_dir_only(tmp_path, monkeypatch)

    def mount(key: str, secret: str) -> None:
        (sec / "AWS_ACCESS_KEY_ID").write_text(key)
        (sec / "AWS_SECRET_ACCESS_KEY").write_text(secret)
    settings = S3Settings(endpoint=s3_endpoint, max_attempts=1)
    mount(SECRET_FILE_KEYS[0], "revoked")
    got, error = artifacts.read_json("s3://rotated/run", "manifest.json", settings)
    assert got is None and "access denied" in error, error
    mount(*SECRET_FILE_KEYS)  # the Secret is rotated: the kubelet updates the files
    got, error = artifacts.read_json("s3://rotated/run", "manifest.json", settings)
    assert error is None or "access denied" not in error, error


class _FlakyUpload:
    def __init__(self, client, failures):
        self._c, self.failures, self.calls = client, failures, 0

    def __getattr__(self, name):
        return getattr(self._c, name)

    def upload_file(self, *a, **kw):
        self.calls += 1
        if self.calls <= self.failures:
            from botocore.exceptions import ClientError
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your request rate"},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
        return self._c.upload_file(*a, **kw)


def test_upload_retries_transient_errors_and_never_reports_failure_as_success(s3, tmp_path):
    b = _bucket(s3, "uploads")
    f = tmp_path / "lora.safetensors"
    f.write_bytes(os.urandom(70 * 1024 * 1024))  # above the multipart threshold
    flaky = _FlakyUpload(s3, failures=1)
    art = upload(f, f"s3://{b}/out/lora.safetensors", client=flaky)
    assert flaky.calls == 2 and art["size"] == f.stat().st_size
    assert s3.head_object(Bucket=b, Key="out/lora.safetensors")["Metadata"]["sha256"] == art["sha256"]
    with pytest.raises(StorageError, match="SlowDown"):
        upload(f, f"s3://{b}/out/other", client=_FlakyUpload(s3, failures=99))
    assert "Contents" not in s3.list_objects_v2(Bucket=b, Prefix="out/other")


def test_missing_output_bucket_fails_before_any_model_load(s3, tmp_path, tiny_flux_dir, overfit_data):
    """Pre-flight: the trainer writes (and deletes) a marker under output.uri before staging in or
    loading anything, so a missing bucket costs seconds, not a training run."""
    import yaml
    from conftest import run_trainer
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir)},
                                   "dataset": {"uri": str(overfit_data), "resolution": 32},
                                   "output": {"uri": "s3://no-such-output-bucket/runs/a"}}))
    proc = run_trainer(job, s3.env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "[error] output.uri: writing to s3://no-such-output-bucket/runs/a: bucket 'no-such-output-bucket' " \
           "does not exist" in proc.stderr, proc.stderr[-2000:]
    assert "[phase] stage-in" not in proc.stdout and "[phase] cache" not in proc.stdout


def test_validate_check_storage_reads_inputs_and_writes_the_output(s3, tmp_path):
    import subprocess
    import sys
    import yaml
    s3.create_bucket(Bucket="cs-in")
    for name in ("a.png", "b.png"):
        s3.put_object(Bucket="cs-in", Key=f"data/{name}", Body=b"x" * 2000)
    s3.put_object(Bucket="cs-in", Key="data/a.txt", Body=b"c" * 100)
    s3.put_object(Bucket="cs-in", Key="models/flux/model_index.json", Body=b"{}")
    job = tmp_path / "job.yaml"

    def check(output, **resources):
        job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": "s3://cs-in/models/flux"},
                                       "dataset": {"uri": "s3://cs-in/data"}, "output": {"uri": output},
                                       **({"resources": resources} if resources else {})}))
        return subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "validate", str(job), "--check-storage"],
                              capture_output=True, text=True, env={**__import__("os").environ, **s3.env})

    ok = check("s3://cs-in/out")
    assert ok.returncode == 0, ok.stderr
    assert "ok: model.diffusersPath s3://cs-in/models/flux: 1 object(s) readable (0.00 GiB)" in ok.stderr
    assert "ok: output.uri s3://cs-in/out: writable" in ok.stderr
    # the inputs against the pod's cache they are fetched into (stage-in would refuse them)
    small = check("s3://cs-in/out", cacheSize="2")
    assert small.returncode == 2 and ("error: resources.cacheSize (2) is smaller than the inputs a node fetches "
                                      "into it (0.00 GiB: the model, the captions and about 1/1 of the media, before "
                                      "any latent is cached)") in small.stderr, small.stderr
    assert check("s3://cs-in/out", cacheSize="4102").returncode == 0
    # on two nodes each fetches about half of the media (its ranks' share), the model and the captions whole
    assert check("s3://cs-in/out", cacheSize="2200", nodes=1).returncode == 2
    assert check("s3://cs-in/out", cacheSize="2200", nodes=2).returncode == 0
    assert check("s3://cs-in/out", cacheSize="2101", nodes=2).returncode == 2
    assert not s3.list_objects_v2(Bucket="cs-in", Prefix="out/").get("Contents")  # the marker is gone
    bad = check("s3://cs-missing/out")
    assert bad.returncode == 2 and "error: output.uri: writing to s3://cs-missing/out: bucket 'cs-missing' does not exist" in bad.stderr
    # nothing listening at the endpoint: every check fails, transiently, so the exit code says "try again"
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    s3.env.update(AWS_ENDPOINT_URL=closed, AWS_MAX_ATTEMPTS="1")
    down = check("s3://cs-in/out")
    assert down.returncode == 1, down.stderr
    assert "error: output.uri:" in down.stderr and "(transient: try again)" in down.stderr


def test_a_wrong_secret_is_refused_by_the_server(s3_endpoint, tmp_path):
    """SigV4 is checked (a stand-in that accepts any key would hide a broken credentials path)."""
    import boto3
    bad = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="kubelora-test",
                       aws_secret_access_key="wrong", region_name="us-east-1")
    with pytest.raises(StorageError, match="access denied"):
        download("s3://secret-ok/x", tmp_path, client=bad, log=lambda m: None)


class _CorruptingUpload:
    """Real client whose upload stores other bytes of the same size (a stand-in for corruption in
    transit, which a real server cannot be asked to do); every other call is real."""

    def __init__(self, client):
        self._c = client

    def __getattr__(self, name):
        return getattr(self._c, name)

    def upload_file(self, filename, bucket, key, Config=None, ExtraArgs=None):
        bad = Path(filename).with_suffix(".bad")
        data = bytearray(Path(filename).read_bytes())
        data[0] ^= 0xFF
        bad.write_bytes(bytes(data))
        return self._c.upload_file(str(bad), bucket, key, Config=Config, ExtraArgs=ExtraArgs)


class _CorruptingPut(_CorruptingUpload):
    """Real client whose single PUT sends other bytes of the same size, with the file's Content-MD5."""

    def put_object(self, Body, **kw):
        return self._c.put_object(Body=bytes([Body[0] ^ 0xFF]) + Body[1:], **kw)


def test_a_corrupted_upload_is_never_published(s3, tmp_path):
    """A large file (temporary key, multipart): our check of the stored ETag refuses it; a small
    one (one PUT with its Content-MD5): the server itself refuses the body (BadDigest)."""
    b = _bucket(s3, "publish")
    f = tmp_path / "lora.safetensors"
    f.write_bytes(os.urandom(4096))
    large = S3Settings(multipart_threshold=1024, multipart_chunksize=5 * 1024 * 1024)
    with pytest.raises(StorageError, match="stored object differs"):
        upload(f, f"s3://{b}/out/lora.safetensors", large, client=_CorruptingUpload(s3))
    with pytest.raises(StorageError, match="BadDigest") as e:
        upload(f, f"s3://{b}/out/lora.safetensors", client=_CorruptingPut(s3))
    assert e.value.transient and "refused the body as corrupt" in str(e.value)   # retried, then the Job retries
    assert "Contents" not in s3.list_objects_v2(Bucket=b, Prefix="out/")  # neither the file nor a .part
    for settings in (large, S3Settings()):
        art = upload(f, f"s3://{b}/out/lora.safetensors", settings, client=s3)
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=b, Prefix="out/")["Contents"]] == ["out/lora.safetensors"]
        body = s3.get_object(Bucket=b, Key="out/lora.safetensors")["Body"].read()
        assert body == f.read_bytes() and art["sha256"] == __import__("hashlib").sha256(body).hexdigest()
        assert s3.head_object(Bucket=b, Key="out/lora.safetensors")["Metadata"]["sha256"] == art["sha256"]


def test_a_small_file_is_published_in_one_request(s3, tmp_path):
    """A shared cache (dataset.cacheUri) pushes a small file per entry and probe: one PUT each, not
    a temporary key, two HEADs, a copy and a delete."""
    from kubelora_trainer import storage
    b = _bucket(s3, "one-put")
    client = storage.make_client(S3Settings())
    calls = []
    client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    f = tmp_path / "entry.pt"
    f.write_bytes(os.urandom(30_000))
    upload(f, f"s3://{b}/latents/entry.pt", client=client)
    assert calls == ["PutObject"], calls
    assert s3.get_object(Bucket=b, Key="latents/entry.pt")["Body"].read() == f.read_bytes()


def test_an_empty_local_folder_is_not_readable_input(tmp_path):
    """As an empty S3 prefix: `validate --check-storage` must not pass a model or dataset folder
    that holds nothing."""
    from kubelora_trainer.storage import check_readable
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(StorageError, match="the folder holds no files"):
        check_readable(str(tmp_path / "empty"))
    (tmp_path / "empty" / "sub" / "a.png").write_bytes(b"x")
    assert check_readable(str(tmp_path / "empty"))[0] == 1



def test_the_write_check_of_validate_leaves_no_folder_behind(tmp_path):
    from kubelora_trainer.storage import check_writable
    check_writable(str(tmp_path / "runs" / "a"), create=False)
    assert list(tmp_path.iterdir()) == []
    check_writable(str(tmp_path / "runs" / "a"))  # the trainer's pre-flight makes the output folder
    assert [p.name for p in (tmp_path / "runs" / "a").iterdir()] == []


def test_a_missing_input_names_the_spec_field_at_stage_in(tmp_path, monkeypatch):
    """As `validate --check-storage` does: the error of a missing model or dataset path names the
    field it came from, not only the path."""
    import torch
    from kubelora_trainer import dist, train
    from kubelora_trainer.spec import LoRATrainingJobSpec
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    env = dist.DistEnv(0, 1, 0, torch.device("cpu"))
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "x.png").write_bytes(b"x")

    def staged(model: dict, dataset: dict) -> str:
        spec = LoRATrainingJobSpec.model_validate({"model": {"type": "flux", **model}, "dataset": dataset,
                                                   "output": {"uri": str(tmp_path / "out")}})
        with pytest.raises(StorageError) as e:
            train.stage_in(spec, env, S3Settings())
        return str(e.value)

    assert staged({"diffusersPath": str(tmp_path / "no-flux")}, {"uri": str(tmp_path / "data")}) \
        == f"model.diffusersPath: reading {tmp_path / 'no-flux'}: no such file or directory"
    assert staged({"diffusersPath": str(tmp_path / "data")}, {"uri": str(tmp_path / "no-data")}) \
        .startswith("dataset.uri: reading ")
    assert staged({"diffusersPath": str(tmp_path / "data")},
                  {"sources": [{"uri": str(tmp_path / "data" / "a")},
                               {"uri": str(tmp_path / "data" / "a"), "maskUri": str(tmp_path / "no-masks")}]}) \
        .startswith("dataset.sources[1].maskUri: reading ")


def test_a_delete_the_store_answers_in_part_is_an_error_and_markers_go_first(s3, tmp_path):
    """S3's DeleteObjects answers 200 and lists the keys it could not delete in Errors (an object
    lock, a permission on one key, an overloaded store): such a delete raised nothing, so pruning or
    overwrite left a checkpoint's COMPLETE behind. SeaweedFS deletes everything asked, so its
    answer is given Errors here for one key (a stand-in for the store's partial failure)."""
    s3.create_bucket(Bucket="deletes")
    for key in ("ck/step-2/state/COMPLETE", "ck/step-2/state/__0_0.distcp", "ck/step-2/state/rank-0.pt"):
        s3.put_object(Bucket="deletes", Key=key, Body=b"x")
    real, sent = storage.make_client(S3Settings()), []

    class Refuses:
        def __getattr__(self, name):
            return getattr(real, name)

        def delete_objects(self, Bucket, Delete):
            keys = [o["Key"] for o in Delete["Objects"]]
            sent.append(keys)
            resp = real.delete_objects(Bucket=Bucket, Delete={"Objects": [{"Key": k} for k in keys
                                                                           if not k.endswith("rank-0.pt")]})
            if any(k.endswith("rank-0.pt") for k in keys):
                resp["Errors"] = [{"Key": "ck/step-2/state/rank-0.pt", "Code": "SlowDown", "Message": "Reduce your rate"}]
            return resp
    with pytest.raises(StorageError, match=r"deleting s3://deletes/ck/step-2: 1 of 2 objects not deleted \(SlowDown; "
                                           r"first ck/step-2/state/rank-0.pt: Reduce your rate\)") as e:
        storage.delete_prefix("s3://deletes/ck/step-2", S3Settings(), client=Refuses(), first=("COMPLETE",))
    assert e.value.transient  # SlowDown: the store's, retried
    assert sent[0] == ["ck/step-2/state/COMPLETE"]  # the marker first, in a batch of its own
    left = [o["Key"] for o in s3.list_objects_v2(Bucket="deletes").get("Contents", [])]
    assert left == ["ck/step-2/state/rank-0.pt"]    # an incomplete step, never a marker beside missing files
    storage.delete_prefix("s3://deletes/ck", S3Settings(), first=("COMPLETE",))
    assert not s3.list_objects_v2(Bucket="deletes").get("Contents")
    s3.put_object(Bucket="deletes", Key="latents/ab.pt", Body=b"x")   # one object (a damaged cache entry)
    storage.delete_object("s3://deletes/latents/ab.pt", S3Settings())
    storage.delete_object("s3://deletes/latents/ab.pt", S3Settings())   # not there: fine
    assert not s3.list_objects_v2(Bucket="deletes").get("Contents")
    local = tmp_path / "ck" / "step-2" / "state"
    local.mkdir(parents=True)
    (local / "COMPLETE").write_text("2\n")
    storage.delete_prefix(str(tmp_path / "ck"), first=("COMPLETE",))
    assert not (tmp_path / "ck").exists()
    storage.delete_prefix(str(tmp_path / "ck"))  # nothing there: fine
