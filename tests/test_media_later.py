"""A dataset's media fetched by the ranks that read them (media_later): what stage-in defers, how a
rank decides a file is current, objects deleted after the listing, a mask folder inside the
dataset's folder, the digest memo. Against the real S3 server; the whole runs on two nodes are
in test_cache.py and test_cache_remote.py."""
import os
import socket
import time
from pathlib import Path

import torch

from kubelora_trainer import dist, media_later, storage, train
from kubelora_trainer.spec import LoRATrainingJobSpec
from kubelora_trainer.storage import S3Settings


def _stage(s3, tmp_path, monkeypatch, bucket: str, files: dict, **dataset):
    storage.ensure_bucket(s3, bucket)
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir(exist_ok=True)
    spec = LoRATrainingJobSpec.model_validate({"model": {"type": "flux", "diffusersPath": str(tmp_path / "model")},
                                               "dataset": {"uri": f"s3://{bucket}/d", **dataset},
                                               "output": {"uri": str(tmp_path / "out")}})
    paths, _, _, later = train.stage_in(spec, dist.DistEnv(0, 1, 0, torch.device("cpu")), S3Settings())
    return spec, paths, later


def test_an_empty_object_is_fetched_and_a_deleted_one_is_said_not_fatal(s3, tmp_path, monkeypatch):
    spec, paths, later = _stage(s3, tmp_path, monkeypatch, "ml-gone",
                                {"d/empty.png": b"", "d/a.png": b"png", "d/b.png": b"png2", "d/a.txt": b"x"})
    root = Path(paths["dataset.0"])
    assert later.absent("dataset.0") == ["a.png", "b.png", "empty.png"]
    s3.delete_object(Bucket="ml-gone", Key="d/b.png")   # deleted after the listing
    s3.put_object(Bucket="ml-gone", Key="d/a.png", Body=b"PNG")   # rewritten after it: another ETag
    assert later.fetch([root / "empty.png", root / "a.png", root / "b.png"]) == 1
    assert (root / "empty.png").read_bytes() == b""
    assert later.vanished == {root / "a.png", root / "b.png"} and not later   # neither read, nor recorded
    assert not (root / "a.png").exists() and "a.png" not in storage.load_index(root)


def test_files_deleted_from_the_bucket_are_not_read_from_an_earlier_run_s_copy(s3, tmp_path, monkeypatch):
    """A warm cache folder (a claim) holds files of earlier runs: an s3:// source is what its listing
    holds now, not what the folder holds (media, captions, masks)."""
    files = {"d/a.png": b"a", "d/a.txt": b"cap a", "d/b.png": b"b", "d/b.txt": b"cap b", "d/c.png": b"c",
             "d/c.txt": b"cap c", "m/c.png": b"mask", "m/other.png": b"mask"}
    spec, paths, later = _stage(s3, tmp_path, monkeypatch, "ml-deleted", files, maskUri="s3://ml-deleted/m")
    root = Path(paths["dataset.0"])
    report = train.scan_sources(spec, paths, later=later)
    assert [(it.image.name, it.mask is not None) for it in report.items] == [("a.png", False), ("b.png", False),
                                                                            ("c.png", True)]
    later.fetch([root / "a.png", root / "b.png"])
    s3.delete_objects(Bucket="ml-deleted", Delete={"Objects": [{"Key": "d/a.png"}, {"Key": "d/b.txt"},
                                                               {"Key": "m/c.png"}]})
    spec, paths, later = _stage(s3, tmp_path, monkeypatch, "ml-deleted", {}, maskUri="s3://ml-deleted/m")
    assert (root / "a.png").exists() and (root / "b.txt").exists()   # left in place
    assert (Path(paths["dataset.0.mask"]) / "c.png").exists()
    report = train.scan_sources(spec, paths, later=later)
    assert [(it.image.name, it.mask) for it in report.items] == [("c.png", None)]
    assert report.missing_caption == 1 and report.uncaptioned == ["b.png"]


def test_a_changed_object_is_fetched_again_by_etag_not_by_its_size(s3, tmp_path, monkeypatch):
    """The folder may be shared (a cache claim): stage-in leaves a stale copy in place, and the
    rank that reads it fetches the object again unless an index of the folder records its listed
    ETag; records merge newest first."""
    spec, paths, later = _stage(s3, tmp_path, monkeypatch, "ml-etag", {"d/a.png": b"old!", "d/a.txt": b"x"})
    root = Path(paths["dataset.0"])
    assert later.fetch([root / "a.png"]) == 1
    s3.put_object(Bucket="ml-etag", Key="d/a.png", Body=b"new!")  # same size, other bytes
    _, paths, later = _stage(s3, tmp_path, monkeypatch, "ml-etag", {})
    assert later.absent("dataset.0") == ["a.png"] and (root / "a.png").read_bytes() == b"old!"  # left in place
    again = media_later.Later.from_staged(  # another rank of the node, after this one fetched it
        {"dataset.0": media_later.Later.record("s3://ml-etag/d", *([later.sources["dataset.0"].obj("a.png")],) * 2, {})},
        paths, S3Settings(), 1)
    assert later.fetch([root / "a.png"]) == 1 and (root / "a.png").read_bytes() == b"new!"
    assert again.fetch([root / "a.png"]) == 0   # recorded at this ETag by rank 0's own index
    index = storage.load_index(root)
    assert index["a.png"]["etag"] == s3.head_object(Bucket="ml-etag", Key="d/a.png")["ETag"]
    # an older record in the folder's own index never hides a newer one of a rank
    storage._save_index(root, {"a.png": {"etag": "stale", "size": 4, "at": time.time() - 60}})
    assert storage.load_index(root)["a.png"]["etag"] == index["a.png"]["etag"]


def test_a_mask_folder_inside_the_dataset_folder_is_fetched_by_its_own_download(s3, tmp_path, monkeypatch):
    _, paths, later = _stage(s3, tmp_path, monkeypatch, "ml-masks",
                             {"d/a.png": b"png", "d/a.txt": b"x", "d/masks/a.png": b"mask"}, maskUri="s3://ml-masks/d/masks")
    assert later.absent("dataset.0") == ["a.png"]   # not masks/a.png, which is fetched now, once
    assert (Path(paths["dataset.0.mask"]) / "a.png").read_bytes() == b"mask"


def test_the_digest_memo_knows_unchanged_objects_only():
    objs = [{"rel": "a.png", "Key": "d/a.png", "ETag": '"e1"', "Size": 3},
            {"rel": "b.png", "Key": "d/b.png", "ETag": '"e2"', "Size": 4}]
    memo = {"a.png": ['"e1"', 3, "aa" * 32], "b.png": ['"old"', 4, "bb" * 32]}
    later = media_later.Later.from_staged({"dataset.0": media_later.Later.record("s3://b/d", objs, objs[1:], memo)},
                                          {"dataset.0": "/c/s3/b/d"}, S3Settings(), 0)
    assert later.digest_of(Path("/c/s3/b/d/a.png")) == "aa" * 32 and later.digest_of(Path("/c/s3/b/d/b.png")) is None
    assert later.absent("dataset.0") == ["b.png"] and later.digest_of(Path("/c/other.png")) is None
    assert later.memos({}) == {"dataset.0": {"a.png": ['"e1"', 3, "aa" * 32]}}  # what is still true of the listing
    assert later.memos({Path("/c/s3/b/d/b.png"): "cc" * 32})["dataset.0"]["b.png"] == ['"e2"', 4, "cc" * 32]
    assert media_later.memo_name("s3://b/d/") == media_later.memo_name("s3://b/d")
    # the 8 ranks of a node fetch at once: together as many transfers in flight as one stage-in
    eight = media_later.Later.from_staged({}, {}, S3Settings(), 3, node_ranks=8).settings
    assert (eight.small_concurrency, eight.concurrency) == (4, 2) and later.settings.small_concurrency == 32


def test_a_store_s_etag_is_an_md5_unless_the_object_is_encrypted_with_kms_or_a_customer_key():
    assert storage.etag_is_md5({"ETag": '"ab"'}) and storage.etag_is_md5({"ServerSideEncryption": "AES256"})
    assert not storage.etag_is_md5({"ServerSideEncryption": "aws:kms"})
    assert not storage.etag_is_md5({"SSECustomerAlgorithm": "AES256"})
    assert storage.etag_matches('"' + "1" * 32 + '"', "1" * 32) and not storage.etag_matches("2" * 32, "1" * 32)
    assert storage.etag_matches('"x"', "x", strict=True) and not storage.etag_matches("opaque", "x", strict=True)
    assert storage.quoted("abc") == '"abc"' and storage.quoted('"abc"') == '"abc"'   # If-Match takes quotes



def test_ranks_that_share_a_cache_volume_are_checked_together(tmp_path):
    """A node's ranks (or the nodes sharing a cache claim) read one volume id from the folder, so
    its room is checked once for the sum of their shares; other folders are other volumes."""
    from kubelora_trainer import disk
    a, b = tmp_path / "a", tmp_path / "b"
    ids = [disk.volume_id(a), disk.volume_id(a), disk.volume_id(b)]
    assert ids[0] == ids[1] != ids[2] and len(ids[0]) == 32
    parts = [(ids[0], 100), (ids[0], 50), (ids[2], 70), (ids[2], -1)]
    assert disk.shares_by_volume(parts) == {ids[0]: (0, 150), ids[2]: (2, 70)}
    # an empty id (a writer of an older trainer cut short) is made again, not left to split the volume
    c = tmp_path / "c"
    c.mkdir()
    (c / disk.VOLUME_ID_NAME).write_text("")
    os.utime(c / disk.VOLUME_ID_NAME, (time.time() - 60, time.time() - 60))  # empty for a minute, not being written
    repaired = disk.volume_id(c)
    assert len(repaired) == 32 and (c / disk.VOLUME_ID_NAME).read_text() == repaired == disk.volume_id(c)
    assert [p.name for p in c.iterdir()] == [disk.VOLUME_ID_NAME]  # no temporary file left
    # a folder where the id cannot be written: the host and the device stand in (the same for its ranks)
    (tmp_path / "file").write_bytes(b"")
    assert disk.volume_id(tmp_path / "file" / "cache") == f"{socket.gethostname()}:0"


_NO_HARD_LINKS = """
import os, sys
def no_link(src, dst, **kw):
    raise PermissionError(1, "Operation not permitted")   # what a FUSE mount without hard links answers
os.link = no_link
from kubelora_trainer import disk
sys.stdout.write(disk.volume_id(sys.argv[1]))
"""


def test_without_hard_links_the_ranks_still_read_one_volume_id(tmp_path):
    """Where the cache folder has no hard links (some FUSE filesystems: os.link fails; none of this
    machine's filesystems lack them, so os.link is replaced in each process), the id is made by an
    exclusive create: four processes started together all read one id, and no temporary file is left."""
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", _NO_HARD_LINKS, str(tmp_path / "cache")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    ids = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), ids
    got = {out for out, _ in ids}
    assert len(got) == 1 and len(got.pop()) == 32, ids
    from kubelora_trainer import disk
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [disk.VOLUME_ID_NAME]
