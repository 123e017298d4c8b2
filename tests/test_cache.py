"""The latent cache on disk: planned by pure functions (what to encode, who sends what between
nodes), streamed with a read-ahead that leaves the sampler's checkpointed state alone, and, on
the tiny Flux, counted: a second run on the same data constructs no VAE or text encoder, calls
no encoder and decodes nothing; a new resolution encodes only its own samples. One 2-node run
(two torchrun launchers, each node with its own cache folder) ends with every entry on both."""
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from conftest import one_rank_env
from kubelora_trainer import buckets as bk
from kubelora_trainer import cache, data, dataset_phase
from kubelora_trainer.data import Skip


# ---------------------------------------------------------------- pure planning

def test_exchange_rounds_send_each_missing_entry_once_in_bounded_rounds():
    haves = [[True, True, False, True, False, True],
             [False, True, True, False, False, True],
             [True, True, False, False, False, True]]
    sizes = [[h * 40 for h in row] for row in haves]
    rounds = cache.exchange_rounds(haves, sizes, chunk_bytes=80)
    sent = [x for rnd in rounds for x in rnd]
    # entry 1 and 5: everyone has them; 4: no one; 0 and 3 from rank 0 (the lowest holder), 2 from rank 1
    assert sent == [(0, 0), (2, 1), (3, 0)]
    assert [len(r) for r in rounds] == [2, 1]      # 80 bytes per round: two 40-byte entries
    assert all(sum(sizes[s][i] for i, s in r) <= 80 for r in rounds)
    assert cache.exchange_rounds(haves, sizes, chunk_bytes=1) == [[(0, 0)], [(2, 1)], [(3, 0)]]  # too big: alone
    assert cache.missing_everywhere(haves) == [4]
    assert cache.split_units([3, 5, 8, 9, 11], world=2, rank=1) == [5, 9]
    assert cache.first_entries(["a", "b", "a", "c", "b"], {"a", "b"}) == [0, 1]


def test_units_are_encoded_by_the_rank_that_probed_their_item():
    """Item.seq (its index when probed, split i % world): that rank fetched the media (media_later),
    so it encodes all the item's units; units whose media every rank reads where they are (owner
    -1: a local folder) are balanced over the ranks, so one long video's many clips are not all on
    one rank; without owners, round robin by unit."""
    owners = [0, 0, 1, 1, 2, 2, 3, 3]   # two units per item
    assert cache.split_units(list(range(8)), 2, 0, owners) == [0, 1, 4, 5]
    assert cache.split_units(list(range(8)), 2, 1, owners) == [2, 3, 6, 7]
    assert cache.split_units([2, 3, 4], 2, 1, owners) == [2, 3]   # what is left to encode
    assert cache.split_units(list(range(8)), 2, 0, [-1] * 8) == [0, 2, 4, 6]
    assert cache.split_units(list(range(8)), 2, 0) == [0, 2, 4, 6]
    # a video of 6 clips (units 0-5, fetched by rank 0) and a local one of 6 clips: rank 1 gets the local clips
    mixed = [0] * 6 + [-1] * 6
    shares = [cache.split_units(list(range(12)), 2, r, mixed) for r in range(2)]
    assert shares == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert sorted(shares[0] + shares[1]) == list(range(12))
    # local media only, an uneven mix: every rank within one unit of the others
    shares = [cache.split_units(list(range(7)), 3, r, [-1] * 7) for r in range(3)]
    assert sorted(len(s) for s in shares) == [2, 2, 3] and sorted(sum(shares, [])) == list(range(7))


def test_key_of_a_unit_ignores_the_dataset_wide_size():
    """Adding a resolution keeps the keys of the samples at the old one."""
    from kubelora_trainer.spec import parse_spec
    a, b = (parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "output": {"uri": "/o"},
                        "dataset": {"uri": "/d", **d}}) for d in ({"resolution": 32}, {"resolutions": [32, 48]}))
    unit = bk.Unit(0, (32, 32, 1), 0, 0.0)
    ka, kb = (cache.cache_key(cache.cache_inputs(s, "f"), "cap", b"digest", unit) for s in (a, b))
    assert ka == kb
    assert cache.cache_key(cache.cache_inputs(a, "f"), "cap", b"digest", bk.Unit(0, (48, 48, 1), 0, 0.0)) != ka


def test_probe_results_are_kept_by_content(tmp_path):
    meta = (64, 40, 1, False)
    cache.write_probe(tmp_path, "ab" * 32, None, meta)
    assert cache.read_probe(tmp_path, "ab" * 32, None) == meta
    assert cache.read_probe(tmp_path, "ab" * 32, 25.0) is None        # another training rate: probed again
    cache.write_probe(tmp_path, "cd" * 32, None, Skip("s3://b/x.png", "corrupt", "OSError: image file is truncated"))
    assert cache.read_probe(tmp_path, "cd" * 32, None) == Skip("", "corrupt", "OSError: image file is truncated")
    assert not list(tmp_path.rglob("*.tmp"))


def truncated_png(path: Path) -> Path:
    """A PNG whose header is whole and whose pixels are cut off."""
    from PIL import Image
    buf = io.BytesIO()
    Image.effect_noise((64, 40), 50).convert("RGB").save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_a_media_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    f, memo = tmp_path / "a.png", tmp_path / "cache"
    f.write_bytes(b"x" * 1000)
    old = 1_600_000_000_000_000_000
    os.utime(f, ns=(old, old))
    hashed, real = [], cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(p) or real(p))  # counts full reads
    first = cache.media_digest(f, memo)
    assert first == _sha(f) and len(hashed) == 1
    assert cache.media_digest(f, memo) == first and len(hashed) == 1       # read from the memo
    f.write_bytes(b"y" * 1000)                                                # same size, new content
    os.utime(f, ns=(old + 10**9, old + 10**9))
    assert cache.media_digest(f, memo) == _sha(f) != first and len(hashed) == 2
    # changed right after hashing, within the racy window: the mtime cannot be trusted, hash again
    now = __import__("time").time_ns()
    os.utime(f, ns=(now, now))
    cache.media_digest(f, memo)
    cache.media_digest(f, memo)
    assert len(hashed) == 4
    for m in (memo / "digests").iterdir():
        m.write_text("{not json")                                             # a damaged memo is ignored
    os.utime(f, ns=(old, old))
    assert cache.media_digest(f, memo) == _sha(f) and len(hashed) == 5
    assert cache.media_digest(f) == _sha(f) and len(hashed) == 6              # no memo root: always hashed


def _sha(p):
    import hashlib
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_probe_reads_the_header_only(tmp_path):
    from PIL import Image
    from kubelora_trainer.data import load_image, probe
    bad = truncated_png(tmp_path / "cut.png")
    assert probe(bad, decode=False) == (64, 40, 1, False)   # found when encoded
    with pytest.raises(OSError):
        load_image(bad, 32)
    ex = Image.Exif()
    ex[0x0112] = 6  # turned by 90 degrees
    for fmt in ("png", "jpeg"):
        Image.new("RGB", (64, 40)).save(tmp_path / f"o.{fmt}", exif=ex.tobytes())
        assert probe(tmp_path / f"o.{fmt}", decode=False) == probe(tmp_path / f"o.{fmt}") == (40, 64, 1, False)


# ---------------------------------------------------------------- streaming

def _space():
    return bk.SampleSpace(buckets=((32, 32, 1),) * 5 + ((48, 16, 1),) * 3, repeats=(1,) * 8, variants=(2,) * 8,
                          dropout=(0.0,) * 8)


@pytest.mark.parametrize("depth", [0, 2])
def test_loader_streams_the_sampler_s_batches_and_leaves_its_state_alone(depth):
    reads = []

    def read(s):
        reads.append(s)
        return {"latents": torch.full((2,), float(s[0] * 10 + s[1]))}

    ref = bk.BucketSampler(_space(), 7, 2, 1, 0)
    sampler = bk.BucketSampler(_space(), 7, 2, 1, 0)
    loader = cache.Loader(read, sampler, depth=depth)
    try:
        for _ in range(5):
            ids, batch = loader.next()
            assert ids == ref.next_batch()
            assert batch["latents"][:, 0].tolist() == [float(u * 10 + v) for u, v in ids]
            assert sampler.state_dict() == ref.state_dict()   # what a checkpoint saves: the batches taken
        assert len(reads) <= (5 + depth + 1) * 2               # read ahead by at most depth (+1 in hand) batches
    finally:
        loader.close()
    # a resume: a new sampler from the saved state and a new loader continue where it stopped
    resumed = bk.BucketSampler(_space(), 7, 2, 1, 0)
    resumed.load_state_dict(sampler.state_dict())
    loader = cache.Loader(read, resumed, depth=depth)
    try:
        assert [loader.next()[0] for _ in range(4)] == [ref.next_batch() for _ in range(4)]
    finally:
        loader.close()


def test_loader_raises_a_read_error_in_the_training_thread():
    def read(s):
        raise FileNotFoundError(f"entry {s} is gone")
    loader = cache.Loader(read, bk.BucketSampler(_space(), 1, 2, 1, 0), depth=2)
    try:
        with pytest.raises(FileNotFoundError, match="is gone"):
            loader.next()
    finally:
        loader.close()


# ---------------------------------------------------------------- counted runs on the tiny Flux

def _images(d: Path, n: int, bad: bool = False) -> Path:
    from PIL import Image
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + 8 * i, 40), (40 * i, 90, 200)).save(d / f"img{i}.png")
        (d / f"img{i}.txt").write_text(f"a picture number {i}")
    if bad:
        truncated_png(d / "cut.png")
        (d / "cut.txt").write_text("never trained")
    return d


def _spec(model: Path, data: Path, out: Path, **dataset):
    from kubelora_trainer.spec import parse_spec
    return parse_spec({"model": {"type": "flux", "diffusersPath": str(model), "dtype": "float32"},
                       "dataset": {"uri": str(data), **dataset},
                       "training": {"steps": 2, "microBatchSize": 1, "logEvery": 1},
                       "output": {"uri": str(out), "onExisting": "overwrite"}})


def _wrap_init(cls, counts: dict):
    real = cls.__init__

    @functools.wraps(real)  # diffusers reads the config's defaults from __init__'s signature
    def init(self, *a, **k):
        counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
        real(self, *a, **k)
    return mock.patch.object(cls, "__init__", init)


def _counted_run(spec, monkeypatch, capsys) -> tuple[dict, str]:
    """train.run in this process, one rank; counts encoder constructions, encode calls, probes
    and media decodes."""
    import diffusers
    import transformers
    from kubelora_trainer import train
    from kubelora_trainer.models.flux.family import Flux
    one_rank_env(monkeypatch)
    counts: dict = {}

    def counter(name, fn):
        @functools.wraps(fn)
        def f(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            return fn(*a, **k)
        return f
    with contextlib.ExitStack() as st:
        for cls in (diffusers.AutoencoderKL, transformers.CLIPTextModel, transformers.T5EncoderModel):
            st.enter_context(_wrap_init(cls, counts))
        st.enter_context(mock.patch.object(Flux, "encode", counter("encode", Flux.encode)))
        st.enter_context(mock.patch.object(data, "probe", counter("probe", data.probe)))  # called by check_item
        st.enter_context(mock.patch.object(dataset_phase, "load_unit", counter("decode", dataset_phase.load_unit)))
        rc = train.run(spec, "cache-test")
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    return counts, out.out


def test_second_run_builds_no_encoder_and_a_new_resolution_encodes_only_its_samples(tmp_path, tiny_flux_dir,
                                                                                      monkeypatch, capsys):
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    data = _images(tmp_path / "data", 3, bad=True)
    one = _spec(tiny_flux_dir, data, tmp_path / "out", resolutions=[32])

    first, log = _counted_run(one, monkeypatch, capsys)
    assert first["encode"] == 3 and first["AutoencoderKL"] >= 1 and first["CLIPTextModel"] >= 1
    assert first["T5EncoderModel"] >= 1
    assert first["probe"] == 4 and first["decode"] == 4          # header probes; each decoded once, for the cache
    assert "cut.png: corrupt (OSError" in log
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["dataset"]["usable"] == 3 and m["dataset"]["unreadable"] == 1

    again, log = _counted_run(one, monkeypatch, capsys)
    assert again == {}, again                # no VAE, no text encoder built or called, nothing decoded
    assert "3 entries: 3 cached, 0 to encode; the VAE and text encoders are not loaded; " \
           f"cache folder {tmp_path / 'cache'} ($KUBELORA_CACHE_DIR)" in log
    assert "cut.png: corrupt (OSError" in log    # remembered with its probe
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["dataset"]["unreadable"] == 1

    both, log = _counted_run(_spec(tiny_flux_dir, data, tmp_path / "out", resolutions=[32, 48]), monkeypatch, capsys)
    assert both["encode"] == 3 and both["decode"] == 3 and "probe" not in both   # only the 48x48 samples
    assert "6 entries: 3 cached, 3 to encode" in log
    assert len(list((tmp_path / "cache" / "latents").glob("*.pt"))) == 6

    # cacheOnly: nothing to train; manifest.json says so, and a later training run is not fooled by it
    only = _spec(tiny_flux_dir, data, tmp_path / "only", resolutions=[32], cacheOnly=True)
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "other-node"))  # a node with an empty cache
    counts, log = _counted_run(only, monkeypatch, capsys)
    assert counts["encode"] == 3 and "[done] dataset.cacheOnly" in log and "[phase] train" not in log
    assert "[cache] encoding: 4/4 samples" in log    # the final progress line (cut.png failed on this node too)
    m = json.loads((tmp_path / "only" / "manifest.json").read_text())
    assert m["cacheOnly"] is True and m["artifacts"] == [] and m["cache"]["entries"] == 3
    from kubelora_trainer import storage, train
    assert train.read_manifest(only, storage.S3Settings()).get("cacheOnly") is True   # not a finished run
    assert train.read_manifest(one, storage.S3Settings()).get("cacheOnly") is None
    # ... and a cache-only job never replaces a finished run's manifest.json
    before = (tmp_path / "out" / "manifest.json").read_text()
    only_here = _spec(tiny_flux_dir, data, tmp_path / "out", resolutions=[32], cacheOnly=True)
    refused = only_here.model_copy(update={"output": only_here.output.model_copy(update={"onExisting": "resume"})})
    one_rank_env(monkeypatch)
    assert train.run(refused, "c") == 2
    assert "dataset.cacheOnly: " in capsys.readouterr().err and (tmp_path / "out" / "manifest.json").read_text() == before


# ---------------------------------------------------------------- two nodes, each with its own cache folder

def test_two_nodes_with_their_own_cache_folders_end_with_every_entry(s3, tmp_path, tiny_flux_dir):
    """Two torchrun launchers (--nnodes 2), two processes each, as two pods with an emptyDir each
    shared by their ranks: the encoding is split over the four, each node receives the other's
    entries once (its local rank 0 writes them, so each copy is counted once), every rank trains on
    any sample; a file corrupt past its header is dropped on all. The dataset is in a bucket: each
    media file is fetched once in all, by the node whose rank probes and encodes it."""
    data = _images(tmp_path / "data", 5, bad=True)
    s3.create_bucket(Bucket="two-nodes")
    for f in data.iterdir():
        s3.upload_file(str(f), "two-nodes", f"d/{f.name}")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob", "spec": {
        "model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
        "dataset": {"uri": "s3://two-nodes/d", "resolutions": [32, 48], "enableArBucket": True, "numArBuckets": 3},
        "training": {"steps": 2, "microBatchSize": 1, "logEvery": 1},
        "output": {"uri": str(tmp_path / "out")}}}))
    from kubelora_trainer.dist import _free_port
    port = _free_port()
    procs = []
    for node in range(2):
        env = {**os.environ, **s3.env, "KUBELORA_CACHE_DIR": str(tmp_path / f"node{node}"), "KUBELORA_METRICS_PORT": "0",
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KUBELORA_CACHE_EXCHANGE_MB": "0.001"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
             "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "kubelora_trainer", "run", "--spec", str(job)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    log = outs[0][0]
    assert "12 entries: 0 cached, 12 to encode" in log and "[train] step 2/2" in log, log
    assert "cut.png: corrupt (OSError" in log
    files = [sorted(f.name for f in (tmp_path / f"node{n}" / "latents").glob("*.pt")) for n in range(2)]
    assert len(files[0]) == 10 and files[0] == files[1]
    assert "10 entries ready on every rank: 10 encoded, 0 were cached; 10 copied between nodes" in log, log
    assert not list(tmp_path.rglob("*.tmp"))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["dataset"]["usable"] == 5 and m["dataset"]["unreadable"] == 1
    media = [{f.name for f in (tmp_path / f"node{n}" / "s3" / "two-nodes" / "d").glob("*.png")} for n in range(2)]
    # items in order cut, img0..img4: ranks 0, 1 (node 0) probe and encode items 0, 1, 4, 5, ranks 2, 3 the others
    # (two units per item: split round robin by unit, node 0 would encode items 0, 2, 4 and fetch img1 too)
    assert media == [{"cut.png", "img0.png", "img3.png", "img4.png"}, {"img1.png", "img2.png"}], media
    # each node's local rank 0 scanned the dataset for both of its ranks
    assert [ln.split(":")[0] for ln in (outs[0][0] + outs[1][0]).splitlines() if " scanned the dataset " in ln] == [
        "[data] rank 0 scanned the dataset for its node's 2 ranks", "[data] rank 2 scanned the dataset for its node's 2 ranks"]
    assert not list(tmp_path.rglob(".scan-*"))
    # each node checked the room for its own share (its two ranks write into its folder), not the dataset's
    from kubelora_trainer.disk import size_text
    for n in range(2):
        need = size_text(sum((data / name).stat().st_size for name in media[n]))
        assert f"[data] {need} of media to fetch into {tmp_path / f'node{n}'} (the media its 2 ranks read; " in outs[n][0], \
            outs[n][0][-3000:]


def test_operator_reports_a_cache_only_run_as_cache_built():
    from kubelora_operator import status as st
    job = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    obs = st.observe(job, [], None, {"cacheOnly": True, "cache": {"entries": 12}, "artifacts": []}, False)
    assert (obs.phase, obs.reason) == (st.SUCCEEDED, "CacheBuilt") and "12 entries" in obs.message
    assert obs.artifacts == []


def test_a_units_caption_variants_share_one_vae_encode(tiny_flux_dir):
    """family.encode with one image and several captions (a unit's caption variants, as
    dataset_phase.encode_missing calls it): the VAE runs once, every caption gets those latents and the text
    embeddings it gets alone."""
    from kubelora_trainer.models.flux.family import FAMILY
    spec = _spec(tiny_flux_dir, Path("/data"), Path("/out"))
    comps = FAMILY.load(spec.model, {"diffusersPath": str(tiny_flux_dir)}, torch.device("cpu"))
    vae = comps.encoders["pipe"].vae
    calls = []
    real = vae.encode
    vae.encode = lambda *a, **k: calls.append(1) or real(*a, **k)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    many = FAMILY.encode(comps, x, ["a red circle", "a blue square", ""])
    assert len(calls) == 1 and len(many) == 3
    for caption, got in zip(["a red circle", "a blue square", ""], many):
        alone = FAMILY.encode(comps, x, [caption])[0]
        torch.testing.assert_close(got["latents"], alone["latents"])
        torch.testing.assert_close(got["prompt_embeds"], alone["prompt_embeds"], rtol=1e-4, atol=1e-5)
    assert not torch.equal(many[0]["prompt_embeds"], many[1]["prompt_embeds"])
