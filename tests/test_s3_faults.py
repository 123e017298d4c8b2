"""S3 faults injected by a proxy (tests/s3_fault_proxy.py) between the trainer's storage code and
the real S3 server (SeaweedFS): 5xx bursts, slow answers, dropped connections, cut bodies. Every
transfer goes through the functions training uses (storage.download for stage-in and checkpoint
restore, storage.upload for artifacts and checkpoints); one test runs the real trainer."""
import json
import os
import time

import pytest
import yaml

from kubelora_trainer import storage
from kubelora_trainer.local_s3 import ACCESS_KEY, SECRET_KEY
from kubelora_trainer.storage import S3Settings, StorageError, download, upload
from s3_fault_proxy import FaultProxy, s3_operation

MB = 1024 * 1024
# small parts, so that a multipart upload (UploadPart) costs 11 MiB rather than 70
SMALL_PARTS = dict(multipart_threshold=8 * MB, multipart_chunksize=5 * MB)


@pytest.fixture()
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint).start()
    yield p
    p.stop()


@pytest.fixture()
def direct(s3_server):
    """A client on the server itself (no proxy): to set up and to inspect."""
    return s3_server.client()


def _settings(proxy, **kw) -> S3Settings:
    return S3Settings(endpoint=proxy.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, **kw)


def _bucket(direct, name):
    storage.ensure_bucket(direct, name)
    return name


def _keys(direct, bucket, prefix=""):
    return sorted(o["Key"] for o in direct.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_s3_operation_names_requests():
    assert s3_operation("GET", "/b/m/w.safetensors", {}) == ("GetObject", "b", "m/w.safetensors")
    assert s3_operation("PUT", "/b/k?partNumber=2&uploadId=x", {})[0] == "UploadPart"
    assert s3_operation("PUT", "/b/k", {"X-Amz-Copy-Source": "b/j"})[0] == "CopyObject"
    assert s3_operation("POST", "/b/k?uploadId=x", {})[0] == "CompleteMultipartUpload"
    assert s3_operation("GET", "/b?list-type=2&prefix=m%2F", {}) == ("ListObjectsV2", "b", "")


def test_a_5xx_burst_on_get_is_retried_and_the_file_is_complete(proxy, direct, tmp_path, capsys):
    """Stage-in of a model folder: two 503 SlowDown and one lost answer on the weights' GET are
    retried by botocore, each retry logged; the file is complete."""
    b = _bucket(direct, "fault-get-5xx")
    weights = os.urandom(300_000)
    direct.put_object(Bucket=b, Key="model/transformer/w.safetensors", Body=weights)
    direct.put_object(Bucket=b, Key="model/model_index.json", Body=b"{}")
    slow_down = proxy.fail(times=2, ops=("GetObject",), key="*.safetensors")  # 503 SlowDown
    lost = proxy.drop(at="response", times=1, ops=("GetObject",), key="*.safetensors")
    dest = download(f"s3://{b}/model", tmp_path / "stage", _settings(proxy, max_attempts=5), log=print)
    assert (dest / "transformer" / "w.safetensors").read_bytes() == weights
    assert (dest / "model_index.json").read_bytes() == b"{}"
    assert (slow_down.injected, lost.injected) == (2, 1)
    assert proxy.seen("GetObject", "*.safetensors") == ["status", "status", "drop", 200]
    out = capsys.readouterr().out
    assert out.count(f"GetObject s3://{b}/model/transformer/w.safetensors: 503 SlowDown; retrying") == 2, out
    assert out.count("ConnectionClosedError") == 1 and "(attempt 3 of 5 failed)" in out, out


def test_a_5xx_burst_on_put_and_upload_part_is_retried(proxy, direct, tmp_path, capsys):
    """Artifact uploads: 500s on the single PUT, 503s on two parts of a multipart upload."""
    b = _bucket(direct, "fault-put-5xx")
    small, big = tmp_path / "lora.safetensors", tmp_path / "big.safetensors"
    small.write_bytes(os.urandom(100_000))
    big.write_bytes(os.urandom(11 * MB))  # 3 parts
    puts = proxy.fail(times=3, ops=("PutObject",), status=500, code="InternalError",
                      message="We encountered an internal error.")
    parts = proxy.fail(times=2, ops=("UploadPart",), status=503)
    settings = _settings(proxy, max_attempts=5, **SMALL_PARTS)
    art = upload(small, f"s3://{b}/out/lora.safetensors", settings)
    upload(big, f"s3://{b}/out/big.safetensors", settings)
    assert (puts.injected, parts.injected) == (3, 2)
    assert _keys(direct, b) == ["out/big.safetensors", "out/lora.safetensors"]  # no .part left
    for f in (small, big):
        assert direct.get_object(Bucket=b, Key=f"out/{f.name}")["Body"].read() == f.read_bytes()
    assert direct.head_object(Bucket=b, Key="out/lora.safetensors")["Metadata"]["sha256"] == art["sha256"]
    out = capsys.readouterr().out
    assert out.count("] PutObject s3://") == 3 and out.count("500 InternalError; retrying") == 3, out
    assert out.count("] UploadPart s3://") == 2, out


def test_a_cut_download_is_retried_or_fails_naming_the_key_and_leaves_no_file(proxy, direct, tmp_path):
    """Bodies shorter than their Content-Length: re-read (s3transfer) and never used; cut every
    time, the download fails once, naming the key and the cause, after max_attempts GETs, and
    leaves no file (neither under the final name nor a temporary one)."""
    b = _bucket(direct, "fault-truncated")
    weights = os.urandom(500_000)
    direct.put_object(Bucket=b, Key="m/w.safetensors", Body=weights)
    settings = _settings(proxy, max_attempts=3)
    cut = proxy.truncate(keep=0.5, times=2, ops=("GetObject",))
    p = download(f"s3://{b}/m/w.safetensors", tmp_path / "a", settings, log=print)
    assert p.read_bytes() == weights and cut.injected == 2

    proxy.clear()
    proxy.truncate(keep=0.9, ops=("GetObject",))  # every time
    dest = tmp_path / "b"
    with pytest.raises(StorageError) as e:
        download(f"s3://{b}/m/w.safetensors", dest, settings, log=print)
    assert str(e.value).startswith(f"downloading s3://{b}/m/w.safetensors: the connection ended early "
                                   f"(IncompleteReadError: 450000 read, but total bytes expected is 500000"), e.value
    assert _files(dest) == []
    assert proxy.seen("GetObject") == ["truncate"] * 2 + [200] + ["truncate"] * 3  # not 3 x our retries


def test_a_dropped_upload_never_publishes_a_partial_artifact(proxy, direct, tmp_path):
    """Connections cut in the middle of a PUT or an UploadPart, answers lost after the server
    stored a part or completed the upload: the final key holds exactly the file or does not exist,
    and no .part object or unfinished multipart upload is left."""
    b = _bucket(direct, "fault-dropped-put")
    lora, big = tmp_path / "lora.safetensors", tmp_path / "big.safetensors"
    lora.write_bytes(os.urandom(2 * MB))
    big.write_bytes(os.urandom(11 * MB))
    settings = _settings(proxy, max_attempts=3, **SMALL_PARTS)

    proxy.drop(at="request", ops=("PutObject", "UploadPart"))  # every upload cut midway
    for f in (lora, big):
        with pytest.raises(StorageError, match=rf"uploading s3://{b}/out/{f.name}: the connection ended early"):
            upload(f, f"s3://{b}/out/{f.name}", settings)
    assert proxy.seen("PutObject") == ["drop"] * 3
    assert _keys(direct, b) == [] and not direct.list_multipart_uploads(Bucket=b).get("Uploads")

    proxy.clear()
    proxy.drop(at="request", times=1, ops=("UploadPart",))
    proxy.drop(at="response", times=1, ops=("UploadPart",))
    proxy.drop(at="response", times=1, ops=("CompleteMultipartUpload",))
    proxy.drop(at="request", times=2, ops=("PutObject",))
    for f in (lora, big):
        upload(f, f"s3://{b}/out/{f.name}", settings)
        assert direct.get_object(Bucket=b, Key=f"out/{f.name}")["Body"].read() == f.read_bytes()
    assert _keys(direct, b) == ["out/big.safetensors", "out/lora.safetensors"]
    assert not direct.list_multipart_uploads(Bucket=b).get("Uploads")
    assert [f.injected for f in proxy.faults] == [1, 1, 1, 2]


def test_a_slow_answer_beyond_the_read_timeout_is_retried_then_fails_clearly(proxy, direct, tmp_path, capsys):
    """A GET that gets no answer, then one whose body stalls, each for longer than the read
    timeout: retried, the file complete. A server that stops answering: the download fails naming
    the key and the timeout after max_attempts (botocore) x max_attempts (s3transfer) GETs, each
    cut at the read timeout rather than waiting for the answer."""
    b = _bucket(direct, "fault-slow")
    weights = os.urandom(300_000)
    direct.put_object(Bucket=b, Key="m/w.safetensors", Body=weights)
    settings = _settings(proxy, read_timeout=1.0, max_attempts=2)
    proxy.delay(60, times=1, ops=("GetObject",))                   # no answer at all
    proxy.delay(60, times=1, after_bytes=1000, ops=("GetObject",))  # the body stalls
    p = download(f"s3://{b}/m/w.safetensors", tmp_path / "a", settings, log=print)
    assert p.read_bytes() == weights
    seen = proxy.seen("GetObject")
    assert seen[:2] == ["delay", "delay"] and seen[-1] == 200, seen  # (a busy machine may add a retry)
    assert f"GetObject s3://{b}/m/w.safetensors: ReadTimeoutError" in capsys.readouterr().out

    proxy.clear()
    proxy.delay(60, ops=("GetObject",))  # a server that stopped answering
    before, t0 = len(proxy.seen("GetObject")), time.monotonic()
    with pytest.raises(StorageError, match=rf"downloading s3://{b}/m/w.safetensors: the server did not answer in "
                                           rf"time \(Read timeout on endpoint URL: .*\); the read timeout is "
                                           rf"\$KUBELORA_S3_READ_TIMEOUT$"):
        download(f"s3://{b}/m/w.safetensors", tmp_path / "b", settings, log=print)
    assert time.monotonic() - t0 < 30  # 4 attempts of 1 s, not one of 60 s
    assert proxy.seen("GetObject")[before:] == ["delay"] * 4
    assert _files(tmp_path / "b") == []


def _job_with_failing_gets(proxy, direct, tmp_path, bucket, failing: str, weights: bool = True):
    """A tiny job in its own bucket (a model folder, one captioned image) whose GETs of the keys
    matching `failing` answer 503 SlowDown every time (a store that stays overloaded). Returns (the
    manifest, the bucket)."""
    b = _bucket(direct, bucket)
    direct.put_object(Bucket=b, Key="models/flux/model_index.json", Body=b"{}")
    if weights:
        direct.put_object(Bucket=b, Key="models/flux/transformer/diffusion_pytorch_model.safetensors", Body=b"x" * 1000)
    direct.put_object(Bucket=b, Key="data/a.png", Body=b"x")
    direct.put_object(Bucket=b, Key="data/a.txt", Body=b"a square")
    proxy.fail(ops=("GetObject",), key=failing)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": f"s3://{b}/models/flux"},
                                   "dataset": {"uri": f"s3://{b}/data", "resolution": 32},
                                   "output": {"uri": f"s3://{b}/out"}}))
    return job, b


def _run_with_unreadable_weights(proxy, direct, tmp_path, bucket):
    """A job whose model weights answer 503 SlowDown to every GET."""
    job, b = _job_with_failing_gets(proxy, direct, tmp_path, bucket, "*.safetensors")
    return job, f"s3://{b}/models/flux/transformer/diffusion_pytorch_model.safetensors"


def test_a_persistent_5xx_fails_the_run_once_naming_the_key(proxy, direct, s3, tmp_path):
    """The real trainer: every GET of the model's weights answers 503. The run stops in stage-in
    with a retryable exit code (1: the Job retries the run, which resumes; not 2, which would fail
    the Job as bad input) and one [error] line naming the object and the cause, after
    $AWS_MAX_ATTEMPTS GETs (not that many times our own retries), each retry logged."""
    from conftest import run_trainer
    from kubelora_trainer import exits
    job, key = _run_with_unreadable_weights(proxy, direct, tmp_path, "fault-run")
    proc = run_trainer(job, {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "3"})
    assert proc.returncode == exits.FAILED != exits.BAD_INPUT, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "[error]" in line]
    assert errors == [f"[error] model.diffusersPath: downloading {key}: SlowDown: Please reduce your request rate. "
                      f"(3 attempts)"], \
        proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proxy.seen("GetObject", "*.safetensors") == ["status"] * 3
    assert proc.stdout.count(f"[storage] GetObject {key}: 503 SlowDown; retrying") == 2, proc.stdout
    assert "[phase] cache" not in proc.stdout


def test_a_persistent_5xx_on_two_ranks_exits_retryable_through_the_launcher(proxy, direct, s3, tmp_path):
    """The pods' launcher, 2 ranks: rank 0 stages in and fails; rank 1 stops as its peer with the
    same (retryable) code instead of exit 2, so the Job retries the run; the root cause is printed
    once, last, naming the object."""
    import subprocess
    import sys
    from kubelora_trainer import exits
    job, key = _run_with_unreadable_weights(proxy, direct, tmp_path, "fault-run-2")
    env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "3",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "kubelora_trainer", "launch", "--standalone", "--nproc-per-node=2",
                           "-m", "kubelora_trainer", "run", "--spec", str(job)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == exits.FAILED, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "[error]" in line]
    assert errors == [f"[error] rank 0: model.diffusersPath: downloading {key}: SlowDown: Please reduce your request rate. "
                      f"(3 attempts)"], proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert proxy.seen("GetObject", "*.safetensors") == ["status"] * 3  # one stage-in per node
    assert "[phase] cache" not in proc.stdout


def test_a_failed_prune_of_old_checkpoints_is_a_warning_and_the_next_one_deletes_them(proxy, direct, capsys):
    """After a checkpoint is written, deleting the older ones can fail (the store throttles deletes,
    a bucket policy without DeleteObject): said in a warning, the run goes on (it stopped every rank
    right after a good checkpoint), and the next checkpoint's prune deletes them."""
    from kubelora_trainer import checkpoint
    b = _bucket(direct, "fault-prune")
    for step in (10, 20, 30):
        for name in ("rank-0.pt", checkpoint.MARKER):
            direct.put_object(Bucket=b, Key=f"run/checkpoints/step-{step}/{checkpoint.STATE}/{name}", Body=b"x")
    settings = _settings(proxy, max_attempts=1)
    proxy.fail(ops=("DeleteObjects", "DeleteObject"))
    checkpoint.prune_or_warn(f"s3://{b}/run", settings, keep=1)
    assert (f"[warning] deleting the checkpoints older than the newest 1 under s3://{b}/run/checkpoints failed ("
            in capsys.readouterr().out)
    steps = {k["Key"].split("/")[2] for k in direct.list_objects_v2(Bucket=b, Prefix="run/")["Contents"]}
    assert steps == {"step-10", "step-20", "step-30"}
    proxy.clear()
    checkpoint.prune_or_warn(f"s3://{b}/run", settings, keep=1)
    steps = {k["Key"].split("/")[2] for k in direct.list_objects_v2(Bucket=b, Prefix="run/")["Contents"]}
    assert steps == {"step-30"} and "[warning]" not in capsys.readouterr().out


def test_progress_is_published_without_holding_the_step_loop_and_the_last_word_waits(proxy, direct, monkeypatch):
    """progress.json goes up in a thread of its own: a store that takes seconds to answer does not
    hold rank 0's step (and with it every rank's next collective); the newest progress replaces one
    not sent yet; the run's last word (force) waits until it is stored."""
    from kubelora_trainer.progress import Progress, Publisher
    b = _bucket(direct, "fault-progress")
    monkeypatch.setenv("KUBELORA_PROGRESS_INTERVAL", "0")
    publish = Publisher(f"s3://{b}/run", _settings(proxy))
    slow = proxy.delay(3, ops=("PutObject",))
    publish(Progress(phase="Training", step=1, totalSteps=9))
    deadline = time.monotonic() + 60
    while not proxy.seen("PutObject"):  # step 1's upload is under way, its answer 3 s late
        assert time.monotonic() < deadline, "the first progress was never sent"
        time.sleep(0.05)
    t0 = time.monotonic()
    for step in range(2, 6):
        publish(Progress(phase="Training", step=step, totalSteps=9))
    assert time.monotonic() - t0 < 1.5  # four calls, none of them waiting for the store
    publish(Progress(phase="Succeeded", step=9, totalSteps=9), force=True, wait=True)
    stored = json.loads(direct.get_object(Bucket=b, Key="run/status/progress.json")["Body"].read())
    assert (stored["phase"], stored["step"]) == ("Succeeded", 9)
    assert slow.injected == 2, proxy.requests  # step 1, then the newest: steps 2-5 replaced by the last word


def test_a_media_fetch_that_fails_on_one_rank_stops_both_once_through_the_launcher(proxy, direct, s3, tmp_path):
    """Media are fetched by the rank that reads them (media_later), after stage-in: every GET of the
    one image answers 503. Through the pods' launcher on 2 ranks, rank 0 (whose share holds it) fails
    with a retryable code, rank 1 stops as its peer, the cause is printed once, last, naming the
    object; the image was asked for by that rank only ($AWS_MAX_ATTEMPTS GETs), not at stage-in."""
    from conftest import run_trainer, the_one_error
    from kubelora_trainer import exits
    job, b = _job_with_failing_gets(proxy, direct, tmp_path, "fault-media", "*.png", weights=False)
    proc = run_trainer(job, {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "3"}, nproc=2,
                       launcher=True)
    assert proc.returncode == exits.FAILED, proc.stderr[-3000:]
    assert the_one_error(proc).startswith(f"[error] rank 0: downloading s3://{b}/data/a.png: SlowDown"), proc.stderr
    assert "1 media files (0.0 MiB) are fetched by the ranks that read them" in proc.stdout, proc.stdout[-3000:]
    assert proxy.seen("GetObject", "*.png") == ["status"] * 3
    assert "[phase] cache" not in proc.stdout


def test_a_small_object_read_is_retried_and_fails_clearly_when_it_never_comes_whole(proxy, direct, capsys):
    """storage.read_object (the checkpoint claim, the stage indexes): 503s and a body cut short are
    retried and the bytes are whole; a missing key is None; a body cut every time fails once, a
    transient StorageError naming the key, after a bounded number of GETs."""
    b = _bucket(direct, "fault-read-object")
    body = os.urandom(40_000)
    direct.put_object(Bucket=b, Key="run/checkpoints/ATTEMPT", Body=body)
    uri = f"s3://{b}/run/checkpoints/ATTEMPT"
    settings = _settings(proxy, max_attempts=2)
    busy = proxy.fail(times=1, ops=("GetObject",))
    cut = proxy.truncate(keep=0.5, times=1, ops=("GetObject",))
    assert storage.read_object(uri, settings) == body
    assert (busy.injected, cut.injected) == (1, 1)
    assert "retrying" in capsys.readouterr().out
    assert storage.read_object(f"s3://{b}/run/checkpoints/NOTHING", settings) is None

    proxy.clear()
    proxy.truncate(keep=0.5, ops=("GetObject",))
    with pytest.raises(StorageError) as e:
        storage.read_object(uri, settings)
    assert e.value.transient and str(e.value).startswith(f"reading {uri}: "), e.value
    # read again max_attempts times in all (botocore retries a request, not its body), not once more per layer
    assert proxy.seen("GetObject", "*/ATTEMPT")[3:] == ["truncate"] * 2

    # a server that stopped answering: botocore's max_attempts requests, each cut at the read timeout,
    # not as many again for each (the claim is read on rank 0 while its peers wait in a collective)
    proxy.clear()
    proxy.delay(60, ops=("GetObject",))
    before = len(proxy.seen("GetObject"))
    with pytest.raises(StorageError, match="the server did not answer in time") as e:
        storage.read_object(uri, _settings(proxy, max_attempts=2, read_timeout=1.0))
    assert e.value.transient
    assert proxy.seen("GetObject")[before:] == ["delay"] * 2
