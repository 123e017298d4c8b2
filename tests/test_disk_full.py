"""A full disk is bad input (exit 2) with one message naming the file, the volume's free space and
the fix, never a retry on GPUs or a traceback, and it leaves no temporary file behind.

The end-to-end test fills a real filesystem: a tmpfs of a few hundred KiB mounted as the cache
folder in a mount namespace of its own (`unshare -m`, which needs root or user namespaces), so the
kernel itself answers ENOSPC to the trainer's writes. The classification is tested through pure
functions with the errors real writers raise."""
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kubelora_trainer import disk, exits, storage

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------- classification (pure)

def test_a_full_disk_is_found_through_wrappers_and_writers_that_keep_only_the_text():
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    assert disk.find(NO_SPACE) is NO_SPACE
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/cache/latents/x.pt")
        except OSError as e:
            raise RuntimeError("cache exchange failed") from e
    except RuntimeError as wrapped:
        assert disk.find(wrapped).errno == errno.EDQUOT
    gathered = CheckpointException("dcp.save failed", {1: (NO_SPACE, None)})  # per-rank failures
    assert disk.find(gathered) is NO_SPACE
    # the text safetensors' save_file raises on a full tmpfs (its errno is only in the message)
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk.find(rust).errno == errno.ENOSPC
    assert disk.find(OSError(errno.EACCES, "Permission denied", "/cache/x")) is None
    assert disk.find(RuntimeError("(os error 13)")) is None
    assert disk.no_room(ValueError("bad")) is None


def test_the_message_names_the_file_the_free_space_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(disk.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache" / "latents").mkdir(parents=True)
    room = disk.no_room(NO_SPACE, "caching", path=tmp_path / "cache" / "latents" / "k.pt")
    text = str(room)
    assert text.startswith(f"caching: no room left to write {tmp_path}/cache/latents/k.pt (No space left on device; ")
    assert " free of " in text and "resources.cacheVolumeClaim" in text and "a rerun goes on from it" in text
    assert exits.code_of(room) == exits.BAD_INPUT and isinstance(room, storage.StorageError)
    elsewhere = str(disk.no_room(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "lora.bin"))))
    assert "no room left to write" in elsewhere and "free space there" in elsewhere
    assert "cacheVolumeClaim" not in elsewhere


def test_the_log_says_where_the_cache_is_and_what_chose_it():
    home = Path.home() / ".cache" / "kubelora"
    assert disk.cache_root_said({}) == f"{home} (the default; $KUBELORA_CACHE_DIR moves it)"
    assert disk.cache_root_said({"KUBELORA_CACHE_DIR": "/big/cache"}) == "/big/cache ($KUBELORA_CACHE_DIR)"


def test_a_full_disk_is_not_worth_another_transfer():
    assert storage._worth_another_transfer(NO_SPACE) is False
    assert storage._worth_another_transfer(ConnectionResetError(errno.ECONNRESET, "reset")) is True


# ---------------------------------------------------------------- a real full filesystem

def _namespace_prefix(probe_dir: Path) -> list[str]:
    """The command prefix that runs a shell in a mount namespace where tmpfs can be mounted: as
    root, or as a user with user namespaces; fails the test loudly where neither works."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    tried = []
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        if shutil.which(prefix[0]) is None:
            tried.append("unshare: not installed (util-linux)")
            break
        r = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe_dir}"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return prefix
        tried.append(f"{' '.join(prefix)}: {r.stderr.strip()}")
    pytest.fail("cannot mount a small tmpfs to fill (this test needs root or unprivileged user namespaces): "
                + "; ".join(tried))


def test_a_full_cache_volume_fails_once_clearly_leaves_no_partial_file_and_a_rerun_goes_on(
        s3, tmp_path, tiny_flux_dir):
    """Four real runs of the trainer on one tmpfs cache folder: (1) 64 KiB, the model staged from
    S3 does not fit: exit 2 before anything is fetched (not retried), no `.part` file left;
    (2) 1 MiB, a local model: the latent cache fills up while encoding: exit 2 naming the entry, no
    temporary file left, the entries written are whole; (3) the same volume grown to 32 MiB: the
    rerun uses the entries already written and trains; (4) 256 KiB, a dataset in S3 of 96 tiny
    images, whose bytes fit but whose files do not (a tmpfs file takes a 4 KiB page): the volume
    fills while a rank fetches its media (media_later), exit 2 naming the file, no `.part` left."""
    from test_cache import _images

    prefix = _namespace_prefix(tmp_path / "probe")
    storage.ensure_bucket(s3, "disk-full")
    storage.upload_tree(tiny_flux_dir, "s3://disk-full/model", client=s3)
    data = _images(tmp_path / "data", 12)
    from PIL import Image
    for i in range(96):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, format="PNG")
        s3.put_object(Bucket="disk-full", Key=f"many/{i:02d}.png", Body=buf.getvalue())
    s3.put_object(Bucket="disk-full", Key="many/captions.json",
                  Body=json.dumps({f"{i:02d}.png": "a dot" for i in range(96)}).encode())

    def job(name: str, model: str, dataset: str = str(data)) -> Path:
        spec = {"model": {"type": "flux", "diffusersPath": model, "dtype": "float32"},
                "dataset": {"uri": dataset, "resolutions": [32, 48]},
                "training": {"steps": 2, "microBatchSize": 1, "logEvery": 1},
                "output": {"uri": str(tmp_path / f"out-{name}"), "onExisting": "overwrite"}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    cache, logs = tmp_path / "cache", tmp_path / "logs"
    cache.mkdir()
    logs.mkdir()
    run = f"{sys.executable} -m kubelora_trainer run --spec"
    script = textwrap.dedent(f"""\
        set -u
        survey() {{ find {cache} -name '*.part' -o -name '*.tmp' > {logs}/$1.partial; \\
                    ls {cache}/latents 2>/dev/null | wc -l > {logs}/$1.entries; }}
        mount -t tmpfs -o size=64k tmpfs {cache}
        {run} {job("s3", "s3://disk-full/model")} > {logs}/1.out 2> {logs}/1.err; echo $? > {logs}/1.rc; survey 1
        umount {cache}; mount -t tmpfs -o size=1m tmpfs {cache}
        {run} {job("local", str(tiny_flux_dir))} > {logs}/2.out 2> {logs}/2.err; echo $? > {logs}/2.rc; survey 2
        {sys.executable} -c "import sys, torch, pathlib; [torch.load(p, weights_only=True) for p in \\
            pathlib.Path('{cache}/latents').glob('*.pt')]" 2> {logs}/2.load; echo $? > {logs}/2.loadrc
        mount -o remount,size=32m {cache}
        {run} {tmp_path / "local.yaml"} > {logs}/3.out 2> {logs}/3.err; echo $? > {logs}/3.rc; survey 3
        umount {cache}; mount -t tmpfs -o size=256k tmpfs {cache}
        {run} {job("many", str(tiny_flux_dir), "s3://disk-full/many")} > {logs}/4.out 2> {logs}/4.err; \
            echo $? > {logs}/4.rc; survey 4
        """)
    env = {**os.environ, **s3.env, "KUBELORA_CACHE_DIR": str(cache), "KUBELORA_METRICS_PORT": "0",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run([*prefix, "sh", "-c", script], env=env, timeout=900, check=True)

    def read(name: str) -> str:
        return (logs / name).read_text()

    def last_error(n: int) -> str:
        lines = [ln for ln in read(f"{n}.err").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("[error]")]
        assert len(errors) == 1 and lines[-1] == errors[0], read(f"{n}.err")[-3000:]
        assert "Traceback" not in read(f"{n}.err"), read(f"{n}.err")[-3000:]
        return errors[0]

    # (1) stage-in: bad input at once, before anything is fetched (the model is larger than the
    # volume's free space), the field and the folder named, not retried
    assert read("1.rc").strip() == "2", read("1.err")[-3000:]
    first = last_error(1)
    assert first.startswith(f"[error] model.diffusersPath: stage-in: no room to fetch into {cache}/s3/disk-full/model: "), first
    assert " to fetch, " in first and " free on its volume" in first and "resources.cacheVolumeClaim" in first, first
    assert "dataset.resolutions" not in first, first  # caching less does not help a model that does not fit
    assert "retrying" not in read("1.out") + read("1.err")
    assert read("1.partial") == "", read("1.partial")

    # (2) the latent cache: bad input, the entry named, no temporary file, the entries whole
    assert read("2.rc").strip() == "2", read("2.err")[-3000:]
    second = last_error(2)
    assert f"no room left to write {cache}/latents/" in second and "free of 1.0 MiB" in second, second
    assert "fewer dataset.resolutions" in second, second
    assert read("2.partial") == "", read("2.partial")
    written = int(read("2.entries"))
    assert written > 0, "nothing was cached before the volume filled"
    assert read("2.loadrc").strip() == "0", read("2.load")

    # (3) more room: the rerun goes on from what was written
    assert read("3.rc").strip() == "0", read("3.err")[-3000:]
    assert f"{written} cached" in read("3.out"), read("3.out")[-3000:]
    assert read("3.partial") == ""

    # (4) a rank fetching its media: the file that did not fit named, bad input, nothing partial left
    assert "96 media files (0.0 MiB) are fetched by the ranks that read them" in read("4.out"), read("4.out")[-3000:]
    assert read("4.rc").strip() == "2", read("4.err")[-3000:]
    fourth = last_error(4)
    assert "downloading s3://disk-full/many/" in fourth and f"no room left to write {cache}/s3/disk-full/many/" in fourth, \
        fourth
    assert "retrying" not in read("4.out") + read("4.err")
    assert read("4.partial") == "", read("4.partial")


def test_a_node_whose_cache_fills_in_the_exchange_stops_both_nodes_as_bad_input(tmp_path, tiny_flux_dir):
    """Two nodes (two real launchers, one process each), each encoding half of the entries: node
    1's cache folder is a tmpfs with room for its own half but not for what node 0 sends it. The
    exchange's write fails there: node 1 exits 2 naming the entry and the fix, node 0 stops with
    the same code (a peer's failure), and each prints the cause once, last, with no traceback of
    the trainer's."""
    from kubelora_trainer.dist import _free_port
    from test_cache import _images

    prefix = _namespace_prefix(tmp_path / "probe")
    data = _images(tmp_path / "data", 12)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
        "dataset": {"uri": str(data), "resolutions": [32, 48]},
        "training": {"steps": 2, "microBatchSize": 1, "logEvery": 1},
        "output": {"uri": str(tmp_path / "out"), "onExisting": "overwrite"}}))
    port = _free_port()
    procs = []
    for node in range(2):
        cache = tmp_path / f"node{node}"
        cache.mkdir()
        launch = [sys.executable, "-m", "kubelora_trainer", "launch", "--nnodes=2", f"--node-rank={node}",
                  "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                  "-m", "kubelora_trainer", "run", "--spec", str(job)]
        if node == 1:  # room for its own half of the entries (about 1 MiB), not for the other half
            launch = [*prefix, "sh", "-c", f"mount -t tmpfs -o size=1400k tmpfs {cache} && exec \"$@\"", "sh",
                      *launch]
        env = {**os.environ, "KUBELORA_CACHE_DIR": str(cache), "KUBELORA_METRICS_PORT": "0", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 2, out[-3000:] + err[-3000:]
        assert "kubelora_trainer/" not in err and err.count("[error]") == 1, err[-3000:]  # torchrun's own report aside
    node1 = [ln for ln in outs[1][1].splitlines() if ln.strip()][-1]
    assert node1.startswith("[error] ") and "cache exchange: no room left to write" in node1, outs[1][1][-3000:]
    assert f"{tmp_path}/node1/latents/" in node1 and "fewer dataset.resolutions" in node1, node1
    assert "entries ready on every rank" not in outs[0][0] + outs[1][0]
    node0 = [ln for ln in outs[0][1].splitlines() if ln.strip()][-1]
    assert node0.startswith("[error] ") and "rank 1 failed" in node0 and "no room left" in node0, outs[0][1][-3000:]
