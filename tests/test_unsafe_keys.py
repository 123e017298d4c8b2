"""Object keys that cannot be files under the download folder ('..', a doubled '/', the stage
index's name): nothing is written outside it. A model prefix, a checkpoint or a report stops
naming the key; a dataset skips it and counts it (unsafeKey).

SeaweedFS (the real server of these tests) stores the index's name as a key, so those cases run
on it alone. It cleans a doubled '/' and refuses '..', which AWS S3 stores and lists as they are:
for those the real client is wrapped so that its listing also names such keys (ListsMore), the
one thing the real server cannot produce; every other request reaches SeaweedFS."""
from pathlib import Path

import pytest
import torch

from kubelora_trainer import checkpoint, cli, dist, storage, train
from kubelora_trainer.spec import LoRATrainingJobSpec
from kubelora_trainer.storage import INDEX_NAME, S3Settings, StorageError, download, unsafe_name


class ListsMore:
    """The real client, whose list_objects_v2 pages also name `extra` keys (as AWS S3 lists them)."""

    def __init__(self, real, extra: list[str]):
        self.real, self.extra = real, extra

    def __getattr__(self, name):
        return getattr(self.real, name)

    def get_paginator(self, name):
        pages, extra = self.real.get_paginator(name), self.extra

        class Pages:
            def paginate(self, Bucket, Prefix):
                yield from pages.paginate(Bucket=Bucket, Prefix=Prefix)
                yield {"Contents": [{"Key": k, "Size": 1, "ETag": '"e"'} for k in extra if k.startswith(Prefix)]}
        return Pages()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_unsafe_name():
    assert unsafe_name("a.png") is None and unsafe_name("sub/a.png") is None and unsafe_name("..a/b..") is None
    assert unsafe_name("sub/.kubelora-stage.json") is None  # only the folder's own index is taken
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a/", "..", "a\0b",
                INDEX_NAME, f"{INDEX_NAME}.tmp12"):
        assert unsafe_name(bad), bad


def test_a_model_prefix_with_an_escaping_key_stops_naming_it(s3, tmp_path):
    s3.create_bucket(Bucket="unsafe-model")
    s3.put_object(Bucket="unsafe-model", Key="m/model_index.json", Body=b"{}")
    dest = tmp_path / "stage" / "m"
    for key in ("m/../../../escaped.txt", f"m/{tmp_path}/abs.txt"):
        with pytest.raises(StorageError) as e:
            download("s3://unsafe-model/m", dest, client=ListsMore(s3, [key]), log=lambda m: None)
        assert f"object key {key!r} cannot be a file under the download folder" in str(e.value)
        assert not e.value.transient
    assert _files(tmp_path) == set()  # nothing fetched, the good file neither: the whole prefix is refused


def test_the_index_name_as_a_key_is_refused_on_the_real_server(s3, tmp_path):
    s3.create_bucket(Bucket="unsafe-index")
    s3.put_object(Bucket="unsafe-index", Key="m/a.json", Body=b"{}")
    s3.put_object(Bucket="unsafe-index", Key=f"m/{INDEX_NAME}", Body=b'{"a.json": {"etag": "forged", "size": 2}}')
    with pytest.raises(StorageError, match=f"'m/{INDEX_NAME}'.*index"):
        download("s3://unsafe-index/m", tmp_path / "d", client=s3, log=lambda m: None)
    skipped = []
    got = download("s3://unsafe-index/m", tmp_path / "d", client=s3, log=lambda m: None, unsafe=skipped)
    assert skipped == [f"m/{INDEX_NAME}"] and (got / "a.json").read_bytes() == b"{}"
    assert "forged" not in (got / INDEX_NAME).read_text()


def test_a_symbolic_link_inside_dest_does_not_lead_out(s3, tmp_path):
    s3.create_bucket(Bucket="unsafe-link")
    s3.put_object(Bucket="unsafe-link", Key="m/sub/x.txt", Body=b"x")
    (tmp_path / "d").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "d" / "sub").symlink_to(tmp_path / "outside")
    with pytest.raises(StorageError, match="symbolic link"):
        download("s3://unsafe-link/m", tmp_path / "d", client=s3, log=lambda m: None)
    assert list((tmp_path / "outside").iterdir()) == []


def test_a_dataset_skips_and_counts_unsafe_keys_at_stage_in(s3, tmp_path, monkeypatch, capsys):
    s3.create_bucket(Bucket="unsafe-data")
    s3.put_object(Bucket="unsafe-data", Key="d/a.png", Body=b"png")
    s3.put_object(Bucket="unsafe-data", Key="d/a.txt", Body=b"a cat")
    s3.put_object(Bucket="unsafe-data", Key=f"d/{INDEX_NAME}", Body=b"{}")
    escaping = "d/../../../../escaped.txt"
    real = storage.make_client
    monkeypatch.setattr(storage, "make_client", lambda settings: ListsMore(real(settings), [escaping]))
    (tmp_path / "model").mkdir()
    spec = LoRATrainingJobSpec.model_validate({"model": {"type": "flux", "diffusersPath": str(tmp_path / "model")},
                                               "dataset": {"uri": "s3://unsafe-data/d"},
                                               "output": {"uri": str(tmp_path / "out")}})
    paths, unsafe, below, later = train.stage_in(spec, dist.DistEnv(0, 1, 0, torch.device("cpu")), S3Settings())
    assert sorted(unsafe["dataset.0"]) == sorted([f"s3://unsafe-data/{escaping}", f"s3://unsafe-data/d/{INDEX_NAME}"])
    # the media are left for the rank that reads them (media_later): listed, scanned, not fetched
    assert _files(Path(paths["dataset.0"])) == {"a.txt", INDEX_NAME} and later.absent("dataset.0") == ["a.png"]
    assert not list(tmp_path.parent.rglob("escaped.txt"))
    out = capsys.readouterr().out
    assert "[stage-in] warning: dataset.uri: skipped 2 object(s)" in out and escaping in out
    assert "fetching 1 (0.0 MiB); 1 media files (0.0 MiB) are fetched by the ranks that read them" in out
    report = train.scan_sources(spec, paths, unsafe, later=later)
    assert report.by_reason() == {"unsafeKey": 2} and report.summary()["unreadable"] == 2
    assert {s.uri for s in report.skipped} == set(unsafe["dataset.0"])
    assert [it.image.name for it in report.items] == ["a.png"] and not report.items[0].image.exists()
    assert later.fetch([it.image for it in report.items]) == 1 and report.items[0].image.read_bytes() == b"png"
    assert not later and later.fetch([it.image for it in report.items]) == 0


def test_a_dataset_read_without_subfolders_does_not_fetch_them_and_counts_their_media(s3, tmp_path):
    """dataset.recursive false (diffusion-pipe's and kohya's reading of a folder): stage-in fetches
    the folder's own objects only; the media below it are counted as a local source's are."""
    s3.create_bucket(Bucket="shallow-data")
    for key in ("d/a.png", "d/a.txt", "d/raw/b.png", "d/raw/b.txt", "d/raw/deep/c.jpg", "d/raw/notes.psd"):
        s3.put_object(Bucket="shallow-data", Key=key, Body=b"x")
    (tmp_path / "model").mkdir()
    spec = LoRATrainingJobSpec.model_validate({"model": {"type": "flux", "diffusersPath": str(tmp_path / "model")},
                                               "dataset": {"uri": "s3://shallow-data/d", "recursive": False},
                                               "output": {"uri": str(tmp_path / "out")}})
    paths, unsafe, below, later = train.stage_in(spec, dist.DistEnv(0, 1, 0, torch.device("cpu")), S3Settings())
    assert _files(Path(paths["dataset.0"])) - {INDEX_NAME} == {"a.txt"} and below == {"dataset.0": 2}
    assert later.absent("dataset.0") == ["a.png"]   # fetched by the rank that reads it
    report = train.scan_sources(spec, paths, unsafe, below, later)
    assert report.in_subfolders == 2 and report.summary()["inSubfolders"] == 2


def test_a_checkpoint_with_an_unsafe_key_fails_the_run(s3, tmp_path):
    s3.create_bucket(Bucket="unsafe-ckpt")
    base = "run/checkpoints/step-5/" + checkpoint.STATE
    s3.put_object(Bucket="unsafe-ckpt", Key=f"{base}/rank-0.pt", Body=b"x")
    s3.put_object(Bucket="unsafe-ckpt", Key=f"{base}/{INDEX_NAME}", Body=b"{}")
    with pytest.raises(StorageError, match=f"{INDEX_NAME}'? cannot be a file under") as e:
        checkpoint._fetch(5, tmp_path / "ckpt", "s3://unsafe-ckpt/run", S3Settings(),
                          dist.DistEnv(0, 1, 0, torch.device("cpu")))
    assert not e.value.transient


def test_kubelora_report_writes_nothing_outside_its_folder(s3, tmp_path, monkeypatch):
    s3.create_bucket(Bucket="unsafe-report")
    s3.put_object(Bucket="unsafe-report", Key="runs/x/report.html", Body=b"<html></html>")
    s3.put_object(Bucket="unsafe-report", Key="runs/x/samples/step-10/p0.png", Body=b"png")
    home = tmp_path / "home"
    home.mkdir()
    evil = f"runs/x/samples/{home}/.bashrc"  # home is absolute: "samples//tmp/.../home/.bashrc"
    real = storage.make_client
    monkeypatch.setattr(storage, "make_client", lambda settings: ListsMore(real(settings), [evil]))
    with pytest.raises(StorageError, match="cannot be a file under the download folder: a doubled '/'"):
        cli.fetch_report("s3://unsafe-report/runs/x", tmp_path / "report")
    assert list(home.iterdir()) == []
    monkeypatch.setattr(storage, "make_client", real)  # a report without samples still fetches
    s3.delete_object(Bucket="unsafe-report", Key="runs/x/samples/step-10/p0.png")
    assert cli.fetch_report("s3://unsafe-report/runs/x", tmp_path / "r2").read_bytes() == b"<html></html>"
    # ... and so does one whose samples/ holds only a folder marker (the S3 console's "Create folder")
    monkeypatch.setattr(storage, "make_client", lambda settings: ListsMore(real(settings), ["runs/x/samples/"]))
    assert cli.fetch_report("s3://unsafe-report/runs/x", tmp_path / "r3").read_bytes() == b"<html></html>"
    with pytest.raises(StorageError, match="no report"):  # a job that has none yet: no empty folder left
        cli.fetch_report("s3://unsafe-report/runs/none", tmp_path / "r4")
    assert not (tmp_path / "r4").exists()


def test_validate_check_storage_says_what_stage_in_will_do(s3, capsys):
    s3.create_bucket(Bucket="unsafe-validate")
    for key in ("data/a.png", f"data/{INDEX_NAME}", "models/flux/model_index.json", f"models/flux/{INDEX_NAME}"):
        s3.put_object(Bucket="unsafe-validate", Key=key, Body=b"{}")
    spec = LoRATrainingJobSpec.model_validate({"model": {"type": "flux", "diffusersPath": "s3://unsafe-validate/models/flux"},
                                               "dataset": {"uri": "s3://unsafe-validate/data"},
                                               "output": {"uri": "s3://unsafe-validate/out"}})
    assert cli.check_storage(spec) == 2
    err = capsys.readouterr().err
    assert f"error: model.diffusersPath: reading s3://unsafe-validate/models/flux: object key 'models/flux/{INDEX_NAME}'" in err
    assert "ok: dataset.uri s3://unsafe-validate/data: 1 object(s) readable" in err
    assert "warning: dataset.uri: 1 object(s) will be skipped (unsafeKey" in err and f"data/{INDEX_NAME}" in err


def test_stage_in_refuses_a_download_that_does_not_fit_the_pods_cache_before_fetching_it(s3, tmp_path, monkeypatch):
    """resources.cacheSize (the emptyDir's sizeLimit, which the volume's free space does not show:
    past it the kubelet evicts the pod, hours of downloading later, at every retry): the operator
    passes it as $KUBELORA_CACHE_LIMIT_BYTES and stage-in refuses what it fetches that does not fit,
    as bad input naming the field, before fetching anything. The media, which the ranks that read
    them fetch, are checked by those ranks before any of them fetches (a node needs room for its
    share, not for the whole dataset: dataset_phase.check_media_room)."""
    from kubelora_trainer import dataset_phase, disk
    s3.create_bucket(Bucket="roomy-data")
    for i in range(3):
        s3.put_object(Bucket="roomy-data", Key=f"d/{i}.png", Body=b"x" * 4000)
    s3.put_object(Bucket="roomy-data", Key="d/0.txt", Body=b"c" * 2000)  # a caption: stage-in fetches it
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "already.bin").write_bytes(b"y" * 3000)  # what the pod's cache holds counts too
    (tmp_path / "model").mkdir()
    spec = LoRATrainingJobSpec.model_validate({"model": {"type": "flux", "diffusersPath": str(tmp_path / "model")},
                                               "dataset": {"uri": "s3://roomy-data/d"},
                                               "output": {"uri": str(tmp_path / "out")}})
    env = dist.DistEnv(0, 1, 0, torch.device("cpu"))
    monkeypatch.setenv(disk.CACHE_LIMIT_ENV, "4000")  # 2000 to fetch, 1000 left
    with pytest.raises(disk.NoRoom) as e:
        train.stage_in(spec, env, S3Settings())
    assert str(e.value).startswith("dataset.uri: stage-in: no room to fetch into ") and "resources.cacheSize" in str(e.value)
    assert "2.0 KiB to fetch" in str(e.value) and not e.value.transient and not list((tmp_path / "cache").rglob("*.txt"))
    monkeypatch.setenv(disk.CACHE_LIMIT_ENV, "14000")  # the caption fits; the media (12000) do not
    paths, _, _, later = train.stage_in(spec, env, S3Settings())
    media = [Path(paths["dataset.0"]) / f"{i}.png" for i in range(3)]
    assert later.to_fetch(media) == 12000 and later.to_fetch(media[:1]) == 4000
    with pytest.raises(disk.NoRoom) as e:
        dataset_phase.check_media_room(env, later.to_fetch(media))
    assert str(e.value).startswith(f"dataset: the media this rank reads: no room to fetch into {tmp_path / 'cache'}: "
                                   "11.7 KiB to fetch, ") and "resources.cacheSize" in str(e.value), e.value
    assert not e.value.transient and not list((tmp_path / "cache").rglob("*.png"))
    monkeypatch.setenv(disk.CACHE_LIMIT_ENV, "19000")
    dataset_phase.check_media_room(env, later.to_fetch(media))
    assert later.fetch(media) == 3 and len(list(Path(paths["dataset.0"]).glob("*.png"))) == 3
    assert later.to_fetch(media) == 0  # fetched: nothing pending
    # changed in the bucket (other ETags), fetched again: each file replaces its old copy, so only
    # what it adds counts, not its whole size (the cache already holds the old copies)
    for i in range(3):
        s3.put_object(Bucket="roomy-data", Key=f"d/{i}.png", Body=b"z" * 4100)
    for marker in (tmp_path / "cache").rglob("staged-*.json"):
        marker.unlink()
    paths, _, _, later = train.stage_in(spec, env, S3Settings())
    assert later.absent("dataset.0") == ["0.png", "1.png", "2.png"]  # the stale copies stay until fetched
    assert later.to_fetch(media) == 300
    dataset_phase.check_media_room(env, later.to_fetch(media))
    later.fetch(media)
    assert all(p.read_bytes() == b"z" * 4100 for p in Path(paths["dataset.0"]).glob("*.png"))
    for marker in (tmp_path / "cache").rglob("staged-*.json"):
        marker.unlink()
    paths, _, _, later = train.stage_in(spec, env, S3Settings())  # what a rank fetched is in the index now
    assert not later and len(list(Path(paths["dataset.0"]).glob("*.png"))) == 3
    # the volume's own free space, without a limit
    assert disk.room_problem(10, free=5, limit_left=None).startswith("10 B to fetch, 5 B free on its volume")
    assert disk.room_problem(10, free=50, limit_left=None) is None
