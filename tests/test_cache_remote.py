"""dataset.cacheUri: the latent cache shared through a prefix. What to pull and push is planned by
pure functions (tested with lists); a failed transfer stops that rank's transfers and leaves the
rest to be encoded (a local prefix with a file gone); the pre-flight fails naming the field for a
missing bucket and is a warning for an unreachable store; and, on the real S3 server (SeaweedFS)
with the tiny Flux, job A pushes its entries and probes, and job B on an empty cache folder pulls
them and constructs no VAE or text encoder, decodes and probes nothing."""
import json

import pytest

from kubelora_trainer import cache_remote as cr
from kubelora_trainer import media_later, storage

from test_cache import _counted_run, _images, _spec

K = ["a" * 32, "b" * 32, "c" * 32, "d" * 32, "e" * 32]


def names(*keys):
    return {cr.entry_name(k): 100 for k in keys}


# ---------------------------------------------------------------- planning (pure)

def test_pull_share_splits_the_listed_missing_entries_over_ranks():
    remote = names(K[0], K[1], K[3], K[4])
    missing = [K[0], K[1], K[2], K[3], K[0]]          # K[2] is not listed: encoded; a repeat is fetched once
    shares = [cr.pull_share(missing, remote, world=2, rank=r) for r in range(2)]
    assert shares == [[cr.entry_name(K[0]), cr.entry_name(K[3])], [cr.entry_name(K[1])]]
    assert cr.pull_share([], remote, 2, 0) == [] and cr.pull_share(missing, {}, 1, 0) == []


def test_push_share_uploads_what_the_prefix_lacks_once():
    remote = names(K[1])
    shares = [cr.push_share(K[:4], remote, world=3, rank=r) for r in range(3)]
    assert sorted(n for s in shares for n in s) == sorted(cr.entry_name(k) for k in (K[0], K[2], K[3]))
    assert cr.push_list(["probes/" + "1" * 32 + ".json", cr.entry_name(K[1]), "probes/" + "1" * 32 + ".json"],
                        remote) == ["probes/" + "1" * 32 + ".json"]


def test_only_entries_and_probes_count_as_the_cache():
    listing = {**names(K[0]), "probes/" + "f" * 32 + ".json": 12, "latents/.x.pt.1-2.part": 5,
               ".kubelora-write-check-7": 2, "latents/notakey.pt": 1, "README": 3}
    assert cr.cache_names(listing) == {cr.entry_name(K[0]): 100, "probes/" + "f" * 32 + ".json": 12}


def test_stats_and_log_lines():
    moved = {"pulled": cr.Moved(3, 3000), "probes pulled": cr.Moved(4, 40, 1, "reading x: gone"),
             "pushed": cr.Moved(0, 0, 2, "uploading y: 503")}
    assert cr.stats(moved) == {"pulled": 3, "probesPulled": 4, "pulledBytes": 3040, "pullFailed": 1,
                               "pushed": 0, "probesPushed": 0, "pushedBytes": 0, "pushFailed": 2}
    line = cr.transfer_line("pushed", moved["pushed"], "s3://b/c")
    assert line.startswith("[cache] pushed 0 file(s) (0.0 MiB) to s3://b/c; warning: 2 not pushed (not shared)")
    assert "uploading y: 503" in line
    assert cr.transfer_line("pulled", cr.Moved(2, 3 * storage.MB), "s3://b/c") == \
        "[cache] pulled 2 file(s) (3.0 MiB) from s3://b/c"


# ---------------------------------------------------------------- transfers (a local prefix)

def _entry_bytes() -> bytes:
    import io

    import torch
    buf = io.BytesIO()
    torch.save({"latents": torch.zeros(2)}, buf)
    return buf.getvalue()


def test_a_failed_download_stops_the_rank_s_pulls_and_is_counted(tmp_path):
    prefix, data = tmp_path / "shared", _entry_bytes()
    for k in K[:3]:
        (prefix / "latents").mkdir(parents=True, exist_ok=True)
        (prefix / "latents" / f"{k}.pt").write_bytes(data)
    remote = cr.Remote(str(prefix), storage.S3Settings(concurrency=1), storage.list_sizes(str(prefix)))
    (prefix / "latents" / f"{K[1]}.pt").unlink()     # listed, then gone
    got = remote.pull([cr.entry_name(k) for k in K[:3]], tmp_path / "node")
    assert (got.files, got.bytes, got.failed) == (1, len(data), 2)   # K[2] is not tried after K[1] failed
    assert "no such file" in got.error.lower() or "errno" in got.error.lower()
    assert got.names == [cr.entry_name(K[0])]
    assert [p.name for p in (tmp_path / "node").rglob("*") if p.is_file()] == [f"{K[0]}.pt"]  # no partial file
    up = remote.push([cr.entry_name(K[0])], tmp_path / "node")
    assert (up.files, up.failed) == (1, 0) and (prefix / "latents" / f"{K[0]}.pt").read_bytes() == data


def test_a_damaged_shared_entry_is_dropped_there_and_encoded_again(tmp_path):
    """An object in dataset.cacheUri that is not an entry (cut short, overwritten): kept, it was
    pulled by every later run, which failed on it at every retry; now it is dropped from the node and
    the prefix, counted as failed (so encoded) and pushed again after encoding."""
    prefix, data = tmp_path / "shared", _entry_bytes()
    (prefix / "latents").mkdir(parents=True)
    (prefix / "latents" / f"{K[0]}.pt").write_bytes(data[: len(data) // 2])
    (prefix / "latents" / f"{K[1]}.pt").write_bytes(data)
    remote = cr.Remote(str(prefix), storage.S3Settings(concurrency=1), storage.list_sizes(str(prefix)))
    got = remote.pull([cr.entry_name(K[0]), cr.entry_name(K[1])], tmp_path / "node")
    assert (got.files, got.failed) == (1, 1) and "not a cache entry" in got.error, got.error   # the next pull went on
    assert got.damaged == [cr.entry_name(K[0])] and got.names == [cr.entry_name(K[1])]
    assert not (tmp_path / "node" / "latents" / f"{K[0]}.pt").exists()
    assert not (prefix / "latents" / f"{K[0]}.pt").exists()
    # pull_entries takes it off the listing (of every rank alike): pushed once encoded
    from types import SimpleNamespace
    (prefix / "latents" / f"{K[2]}.pt").write_bytes(b"not torch")
    remote = cr.Remote(str(prefix), storage.S3Settings(concurrency=1), storage.list_sizes(str(prefix)))
    pulled, moved = cr.pull_entries(remote, [K[2]], tmp_path / "node2", SimpleNamespace(world=1, rank=0))
    assert pulled == set() and moved.damaged == [cr.entry_name(K[2])] and cr.entry_name(K[2]) not in remote.listing
    assert cr.push_list([cr.entry_name(K[2])], remote.listing) == [cr.entry_name(K[2])]


def test_an_entry_that_does_not_load_is_deleted_and_an_empty_one_is_not_present(tmp_path):
    """An entry emptied or cut short by a crash (or a damaged disk) counted as cached for good: every
    retry failed loading it. Empty files are not present (encoded again); one that does not load is
    deleted with an error naming it, so the retried run encodes it."""
    import torch

    from kubelora_trainer import cache
    cache.save_entry(tmp_path, "good", {"latents": torch.ones(3)})
    cache.entry_path(tmp_path, "empty").write_bytes(b"")
    cut = cache.entry_path(tmp_path, "good").read_bytes()
    cache.entry_path(tmp_path, "cut").write_bytes(cut[: len(cut) // 2])
    assert cache.present(tmp_path, ["good", "empty", "cut", "none"]) == [True, False, True, False]
    assert torch.equal(cache.load_entry(tmp_path, "good")["latents"], torch.ones(3))
    with pytest.raises(cache.CorruptEntry, match=r"does not load .*it is deleted, and the retried run encodes it again"):
        cache.load_entry(tmp_path, "cut")
    assert cache.present(tmp_path, ["cut"]) == [False]
    with pytest.raises(cache.CorruptEntry, match="is gone"):   # deleted by another process of the node: retried
        cache.load_entry(tmp_path, "none")


def test_preflight_names_the_field_for_a_missing_bucket_and_warns_for_an_unreachable_store(s3, tmp_path):
    with pytest.raises(storage.StorageError) as e:
        cr.preflight("s3://no-such-cache-bucket/c", storage.S3Settings(), print)
    assert str(e.value).startswith("dataset.cacheUri: ") and "does not exist" in str(e.value) and not e.value.transient
    said = []
    down = storage.S3Settings(endpoint="http://127.0.0.1:9", max_attempts=1, connect_timeout=2)
    assert cr.preflight("s3://bucket/c", down, said.append) is None
    assert "dataset.cacheUri s3://bucket/c is unavailable" in said[0] and "sharing nothing this run" in said[0]
    assert cr.preflight(None, storage.S3Settings(), said.append) is None


# ---------------------------------------------------------------- two jobs on the tiny Flux, one S3 prefix

def test_a_second_job_on_another_node_pulls_the_cache_and_loads_no_encoder(s3, tmp_path, tiny_flux_dir,
                                                                           monkeypatch, capsys):
    storage.ensure_bucket(s3, "shared-cache")
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    data = _images(tmp_path / "data", 3, bad=True)     # cut.png: corrupt past its header, found when encoded
    uri = "s3://shared-cache/flux"

    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "pool-a"))
    a, log = _counted_run(_spec(tiny_flux_dir, data, tmp_path / "out-a", resolutions=[32], cacheUri=uri),
                          monkeypatch, capsys)
    assert a["encode"] == 3 and a["AutoencoderKL"] >= 1
    assert "[cache] pushed 7 file(s)" in log, log      # 3 entries and 4 probes (cut.png's says why it is skipped)
    listed = storage.list_keys(uri)
    assert sum(n.startswith("latents/") for n in listed) == 3 and sum(n.startswith("probes/") for n in listed) == 4
    assert not [n for n in listed if not cr.NAME.match(n)]   # no .part or marker left behind
    stats = json.loads((tmp_path / "out-a" / "manifest.json").read_text())["cache"]
    assert stats["pushed"] == 3 and stats["probesPushed"] == 4 and stats["encoded"] == 3 and stats["pulled"] == 0
    assert stats["pushedBytes"] > 0 and stats["pushFailed"] == 0

    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "pool-b"))   # another node pool: an empty cache folder
    b, log = _counted_run(_spec(tiny_flux_dir, data, tmp_path / "out-b", resolutions=[32], cacheUri=uri),
                          monkeypatch, capsys)
    assert b == {}, b          # no VAE or text encoder built, nothing encoded, probed or decoded
    assert "[cache] pulled 7 file(s)" in log
    assert "3 entries: 0 cached, 3 pulled from dataset.cacheUri, 0 to encode; the VAE and text encoders are not " \
           "loaded" in log, log
    assert "cut.png: corrupt (OSError" in log          # skipped from its pulled probe
    m = json.loads((tmp_path / "out-b" / "manifest.json").read_text())
    assert m["dataset"]["usable"] == 3 and m["dataset"]["unreadable"] == 1
    assert (m["cache"]["pulled"], m["cache"]["probesPulled"], m["cache"]["encoded"], m["cache"]["pushed"]) == (3, 4, 0, 0)
    assert m["cache"]["pulledBytes"] == stats["pushedBytes"] and m["cache"]["pullFailed"] == 0


def test_two_nodes_pull_the_shared_cache_once_between_them_and_encode_nothing(s3, tmp_path, tiny_flux_dir,
                                                                             monkeypatch, capsys):
    """Job A (one process) pushes; job B runs on two fresh nodes (two torchrun launchers, each with
    its own cache folder): the ranks split the pulls, the exchange gives each node the other's
    share, nothing is encoded and no encoder is loaded on either node. The dataset is in a bucket:
    job A pushed its media's digests too (media_later's memo), so job B's nodes fetch no media."""
    import os
    import subprocess
    import sys

    import yaml

    from kubelora_trainer.dist import _free_port
    storage.ensure_bucket(s3, "shared-two")
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    data = _images(tmp_path / "data", 4)
    for f in data.iterdir():
        s3.upload_file(str(f), "shared-two", f"data/{f.name}")
    uri = "s3://shared-two/flux"
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "pool-a"))
    a, _ = _counted_run(_spec(tiny_flux_dir, "s3://shared-two/data", tmp_path / "out-a", resolutions=[32],
                              cacheUri=uri), monkeypatch, capsys)
    assert a["encode"] == 4
    assert [k["Key"] for k in s3.list_objects_v2(Bucket="shared-two", Prefix="flux/media/")["Contents"]] == \
        ["flux/" + media_later.memo_name("s3://shared-two/data")]

    job = tmp_path / "b.yaml"
    job.write_text(yaml.safe_dump(_spec(tiny_flux_dir, "s3://shared-two/data", tmp_path / "out-b", resolutions=[32],
                                        cacheUri=uri).model_dump(mode="json", exclude_none=True)))
    port = _free_port()
    procs = []
    for node in range(2):
        env = {**os.environ, **s3.env, "KUBELORA_CACHE_DIR": str(tmp_path / f"b-node{node}"),
               "KUBELORA_METRICS_PORT": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kubelora_trainer", "launch", "--nnodes=2", f"--node-rank={node}",
             "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "kubelora_trainer", "run", "--spec", str(job)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    log = outs[0][0]
    assert "4 entries: 0 cached, 4 pulled from dataset.cacheUri, 0 to encode; the VAE and text encoders are not " \
           "loaded" in log, log
    m = json.loads((tmp_path / "out-b" / "manifest.json").read_text())["cache"]
    assert (m["pulled"], m["encoded"], m["pushed"], m["pullFailed"]) == (4, 0, 0, 0), m
    assert m["copiedBetweenNodes"] == 4, m     # each node pulled its half and received the other's
    held = [sorted(f.name for f in (tmp_path / f"b-node{n}" / "latents").glob("*.pt")) for n in range(2)]
    assert len(held[0]) == 4 and held[0] == held[1]
    # each node fetched the captions only: the digests, probes and entries came from dataset.cacheUri
    staged = [sorted(f.name for f in (tmp_path / f"b-node{n}" / "s3" / "shared-two" / "data").iterdir()
                     if not f.name.startswith(".")) for n in range(2)]
    assert staged == [["img0.txt", "img1.txt", "img2.txt", "img3.txt"]] * 2, staged
    assert "[cache] s3://shared-two/data: the digests of 4 of 4 media files are known from dataset.cacheUri" in log
    assert "media file(s) of its share" not in outs[0][0] + outs[1][0]
    # job C, a new resolution on a fresh node: every probe comes from dataset.cacheUri (keyed by the
    # media's digest), no entry does, so the media are fetched to encode them; their room is checked
    # first (they were not counted when the items were probed)
    from kubelora_trainer.disk import size_text
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "pool-c"))
    c, out = _counted_run(_spec(tiny_flux_dir, "s3://shared-two/data", tmp_path / "out-c", resolutions=[48],
                                cacheUri=uri), monkeypatch, capsys)
    need = size_text(sum(f.stat().st_size for f in data.glob("*.png")))
    assert f"[data] {need} of media to fetch into {tmp_path / 'pool-c'} (the media this rank reads; " in out, out[-3000:]
    assert c["encode"] == 4 and not c.get("probe"), c
