"""Storage against a real S3 protocol server (moto): prefixes, caching by size+ETag, atomic
files, retries and errors that name the object."""
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
    """Real client whose transfer breaks after writing half the bytes (a dropped connection is
    the one thing moto cannot do on request); every other call goes to the real server."""

    def __init__(self, client, failures):
        self._c, self.failures, self.calls = client, failures, 0

    def __getattr__(self, name):
        return getattr(self._c, name)

    def download_file(self, bucket, key, filename, Config=None):
        self.calls += 1
        if self.calls <= self.failures:
            body = self._c.get_object(Bucket=bucket, Key=key)["Body"].read()
            Path(filename).write_bytes(body[: len(body) // 2])
            raise ConnectionResetError("connection reset by peer (simulated)")
        return self._c.download_file(bucket, key, filename, Config=Config)


def test_interrupted_download_retries_and_never_leaves_partial_file(s3, tmp_path):
    b = _bucket(s3, "intr")
    s3.put_object(Bucket=b, Key="m/w.bin", Body=b"z" * 5000)
    dest = tmp_path / "d"
    flaky = _Interrupting(s3, failures=10)
    with pytest.raises(StorageError, match=r"downloading s3://intr/m/w.bin: ConnectionResetError"):
        download(f"s3://{b}/m", dest, client=flaky, log=lambda m: None)
    assert not (dest / "w.bin").exists()
    assert not list(dest.glob("*.part")), "temporary files must be cleaned up"
    # transient: succeeds on retry, file complete
    flaky = _Interrupting(s3, failures=2)
    download(f"s3://{b}/m", dest, client=flaky, log=lambda m: None)
    assert flaky.calls == 3 and (dest / "w.bin").read_bytes() == b"z" * 5000


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


def test_credentials_from_mounted_secret_files(s3_endpoint, tmp_path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    sec = tmp_path / "secret"
    sec.mkdir()
    (sec / "AWS_ACCESS_KEY_ID").write_text("from-secret\n")
    (sec / "AWS_SECRET_ACCESS_KEY").write_text("s3cr3t\n")
    monkeypatch.setenv(storage.CREDENTIALS_DIR_ENV, str(sec))
    client = storage.make_client(S3Settings(endpoint=s3_endpoint))
    assert client._request_signer._credentials.access_key == "from-secret"
    assert client.meta.config.s3["addressing_style"] == "path"
    client.create_bucket(Bucket="secret-ok")


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
