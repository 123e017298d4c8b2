"""Dataset scanning and sharding: pure functions, no model."""
from pathlib import Path

import pytest
from PIL import Image

from kubelora_trainer.data import DatasetError, check_usable, load_image, scan


def _img(p: Path, size=(40, 24), caption=None):
    Image.new("RGB", size, (200, 10, 10)).save(p)
    if caption is not None:
        p.with_suffix(".txt").write_text(caption)


def test_scan_pairs_captions_and_counts_missing(tmp_path):
    _img(tmp_path / "a.png", caption="a red thing")
    _img(tmp_path / "b.jpg")
    (tmp_path / "notes.md").write_text("ignored")
    r = scan(tmp_path, "skip")
    assert [i.image.name for i in r.items] == ["a.png"] and r.missing_caption == 1 and r.empty_caption_used == 0
    r = scan(tmp_path, "empty")
    assert [(i.image.name, i.caption) for i in r.items] == [("a.png", "a red thing"), ("b.jpg", "")]
    assert r.summary() == {"usable": 2, "missingCaption": 1, "emptyCaptionUsed": 1, "unreadable": 0,  # no "skipped"
                           "ignoredFiles": {".md": 1}}


def test_load_image_crops_to_square_in_range(tmp_path):
    _img(tmp_path / "a.png", size=(40, 24))
    t = load_image(tmp_path / "a.png", 16)
    assert tuple(t.shape) == (3, 16, 16) and -1.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_unreadable_image_raises_for_the_caller_to_count(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(Exception):
        load_image(tmp_path / "bad.png", 16)


def test_empty_dataset_error_names_the_fix(tmp_path):
    _img(tmp_path / "b.jpg")
    r = scan(tmp_path, "skip")
    with pytest.raises(DatasetError, match="no usable items .*missing a caption: 1.*dataset.missingCaption: empty"):
        check_usable(r, "s3://bkt/data")


def test_caption_prefix_is_put_before_every_caption_verbatim(tmp_path):
    _img(tmp_path / "a.png", caption="a red thing")
    _img(tmp_path / "b.png")
    r = scan(tmp_path, "empty", caption_prefix="ohwx, ")
    assert [i.caption for i in r.items] == ["ohwx, a red thing", "ohwx, "]


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height (8-bit RGB), no pixel data: a decompression
    bomb's header."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _bad_dataset(d: Path) -> Path:
    """One good image and one of each kind of bad file, every one captioned."""
    import io
    from kubelora_trainer.synthetic import write_video
    import numpy as np
    d.mkdir()
    _img(d / "good.png", caption="fine")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "PNG")
    files = {"empty.png": b"", "text.jpg": b"just some text, renamed to .jpg\n",
             "truncated.png": buf.getvalue()[: len(buf.getvalue()) // 2], "bomb.png": _png_header(100_000, 100_000)}
    for name, data in files.items():
        (d / name).write_bytes(data)
        (d / name).with_suffix(".txt").write_text("a caption")
    write_video(d / "clip.mp4", [np.zeros((16, 16, 3), dtype=np.uint8)] * 3, fps=25)
    (d / "clip.mp4").rename(d / "video.png")                         # a video named .png
    (d / "video.txt").write_text("a caption")
    _img(d / "latin1.png")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    _img(d / "strip.png", size=(400, 20), caption="a 20:1 strip")     # 5x beyond the square bucket
    _img(d / "banner.png", size=(120, 36), caption="3.3:1, cropped but kept")
    return d


def test_untrusted_media_is_skipped_counted_by_reason_and_named_by_source_uri(tmp_path):
    from kubelora_trainer import buckets as bk
    from kubelora_trainer.data import check_item
    from kubelora_trainer.dataset_phase import settle
    r = scan(_bad_dataset(tmp_path / "data"), uri="s3://bkt/data/")
    assert [str(s) for s in r.skipped] == ["s3://bkt/data/latin1.png: captionNotUtf8 (latin1.txt: byte 0xe9 at 3)"]
    checked = {i: check_item(it) for i, it in enumerate(r.items)}
    metas = {i: m for i, (m, s) in checked.items() if s is None}
    skips = {i: s for i, (m, s) in checked.items() if s is not None}
    cfg = bk.BucketConfig(ars=(1.0,), sides=(32,), frame_buckets=(1,))
    kept = settle(r, metas, skips, [cfg])
    assert [i.name for i in r.items] == ["s3://bkt/data/banner.png", "s3://bkt/data/good.png"]
    assert [metas[i] for i in kept] == [(120, 36, 1, False), (40, 24, 1, False)]
    reasons = {s.uri.rsplit("/", 1)[1]: s.reason for s in r.skipped}
    assert reasons == {"latin1.png": "captionNotUtf8", "empty.png": "emptyFile", "text.jpg": "wrongExtension",
                       "truncated.png": "corrupt", "bomb.png": "tooLarge", "video.png": "wrongExtension",
                       "strip.png": "extremeAspectRatio"}
    assert all(s.uri.startswith("s3://bkt/data/") for s in r.skipped)
    assert r.summary() == {"usable": 2, "missingCaption": 0, "emptyCaptionUsed": 0, "unreadable": 7,
                           "skipped": {"captionNotUtf8": 1, "corrupt": 1, "emptyFile": 1, "extremeAspectRatio": 1,
                                       "tooLarge": 1, "wrongExtension": 2}}
    strip = next(s for s in r.skipped if s.reason == "extremeAspectRatio")
    assert "400x20 is 20.0x beyond the bucket ratios 1..1" in strip.detail
    # the same strip fits once wide buckets are on (20 is 2.5x beyond the widest, 8)
    assert bk.ratio_beyond(400, 20, bk.BucketConfig(ars=(0.125, 8.0), sides=(32,), frame_buckets=(1,))) == pytest.approx(2.5)
    # nothing usable left: one clear error, counts by reason and the first files by their URI
    r.items = []
    with pytest.raises(DatasetError, match=r"unreadable: 7 \(1 captionNotUtf8, 1 corrupt, .*2 wrongExtension\).*"
                                           r"Skipped: s3://bkt/data/latin1.png: captionNotUtf8"):
        check_usable(r, "s3://bkt/data")


def test_pixel_limits_are_checked_before_decoding(tmp_path, monkeypatch):
    from kubelora_trainer import data
    from kubelora_trainer.metrics import snake
    _img(tmp_path / "a.png", size=(40, 40))
    assert data.probe(tmp_path / "a.png") == (40, 40, 1, False)
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    with pytest.raises(data.MediaTooLarge, match="1,600 pixels; the limit is 1,000"):
        data.probe(tmp_path / "a.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 10 ** 6)
    monkeypatch.setattr(data, "MAX_VIDEO_PIXELS", 16 * 16 * 4)        # 4 frames of 16x16
    from kubelora_trainer.synthetic import write_video
    import numpy as np
    write_video(tmp_path / "v.mp4", [np.zeros((16, 16, 3), dtype=np.uint8)] * 6, fps=25)
    with pytest.raises(data.MediaTooLarge, match="more than 4 frames of 16x16"):
        data.probe(tmp_path / "v.mp4", 25)
    assert data.failure_reason(".mp4", b"\x00\x00\x00\x18ftypisom", ValueError("x")) == "corrupt"
    assert data.failure_reason(".jpg", b"\x89PNG\r\n\x1a\n", OSError("x")) == "corrupt"   # a broken PNG named .jpg
    assert data.failure_reason(".jpg", b"\x1aE\xdf\xa3\x01", OSError("x")) == "wrongExtension"  # a WebM named .jpg
    assert snake("captionNotUtf8") == "caption_not_utf8" and snake("extremeAspectRatio") == "extreme_aspect_ratio"


def test_a_caption_map_that_is_not_utf8_names_the_file(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "captions.json").write_bytes('{"a.png": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"dataset s3://b/d: .*captions.json: not UTF-8 \(byte 0xe9 at 14\)"):
        scan(tmp_path, uri="s3://b/d")


def test_a_failure_of_the_machine_is_not_remembered_as_a_bad_file(tmp_path, monkeypatch):
    """Out of file handles or memory, a vanished path: skipped in this run, but not cached as bad
    (the cache's probes and dataset.cacheUri would otherwise skip good bytes in every later job)."""
    import errno

    import av

    from kubelora_trainer import data
    assert data.is_environmental(OSError(errno.EMFILE, "Too many open files"))
    assert data.is_environmental(MemoryError())
    assert not data.is_environmental(OSError("image file is truncated"))
    assert not data.is_environmental(av.error.InvalidDataError(1094995529, "Invalid data found"))
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    (tmp_path / "a.txt").write_text("x")
    item = scan(tmp_path).items[0]

    def exhausted(*a, **k):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(data, "probe", exhausted)
    _, skip = data.check_item(item)
    assert skip.reason == "corrupt" and skip.lasting is False
    monkeypatch.setattr(data, "probe", lambda *a, **k: (_ for _ in ()).throw(OSError("image file is truncated")))
    assert data.check_item(item)[1].lasting is True


def test_transparent_pixels_train_as_white_not_as_the_colour_they_hide(tmp_path):
    """diffusion-pipe composites RGBA (and palette transparency) onto white; a plain RGB
    conversion kept the black stored under a cut-out's transparent background."""
    from PIL import Image
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (8, 8, 24, 24))
    rgba.save(tmp_path / "cutout.png")
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.paste(1, (8, 8, 24, 24))
    pal.save(tmp_path / "palette.png", transparency=0)
    for name in ("cutout.png", "palette.png"):
        x = load_image(tmp_path / name, 32)
        assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0], name             # the transparent corner: white
        assert x[0, 16, 16] > 0.5 and x[1, 16, 16] < -0.5, name          # the opaque red stays red


def test_files_that_are_not_media_or_captions_are_counted_not_dropped_silently(tmp_path):
    from PIL import Image
    for name in ("a.png", "b.tif", "c.jfif"):
        Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / name, format="PNG" if name.endswith("png") else
                                                   "TIFF" if name.endswith("tif") else "JPEG")
        (tmp_path / name).with_suffix(".txt").write_text("a caption")
    for name in ("d.psd", "e.mp4", ".DS_Store", "captions-notes.md"):
        (tmp_path / name).write_bytes(b"x")
    report = scan(tmp_path, video=False)
    assert sorted(it.image.name for it in report.items) == ["a.png", "b.tif", "c.jfif"]
    assert report.ignored == {".md": 1, ".psd": 1, "video": 1}
    assert report.summary()["ignoredFiles"] == {".md": 1, ".psd": 1, "video": 1}
    assert scan(tmp_path, video=True).ignored == {".md": 1, ".psd": 1}


def test_kohya_repeat_folders_are_named_in_a_warning_with_the_sources_to_write(tmp_path, capsys):
    """img/10_mystyle means 10 repeats in kohya's sd-scripts; kubelora reads it recursively with the
    source's repeats, and says so in the run's log, with the YAML that would repeat it."""
    from kubelora_trainer import dist, metrics
    from kubelora_trainer.data import check_item, kohya_note
    from kubelora_trainer.dataset_phase import layout_data
    from kubelora_trainer.spec import parse_spec
    img = tmp_path / "img"
    for folder, n in (("10_mystyle", 2), ("3_other/deeper", 1), ("plain", 1), ("7_empty", 0)):
        (img / folder).mkdir(parents=True)
        for k in range(n):
            _img(img / folder / f"{k}.png", (32, 32), caption="a red thing")
    report = scan(img, uri="s3://bkt/img/")
    assert report.kohya == {"s3://bkt/img/10_mystyle": (10, 0), "s3://bkt/img/3_other": (3, 0)}  # 7_empty holds nothing
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "s3://models/flux"}, "dataset": {"uri": "s3://bkt/img"},
                       "output": {"uri": "s3://out/run"}})
    metas = [check_item(it, decode=False)[0] for it in report.items]
    layout_data(spec, report, metas, dist.DistEnv(0, 1, 0, None), metrics.Off())
    log = capsys.readouterr().out
    assert "[data] 4 usable items" in log
    assert ("warning: folder names in kohya's <repeats>_<name> form: s3://bkt/img/10_mystyle (10), "
            "s3://bkt/img/3_other (3). kubelora does not read repeats from folder names: their items train with "
            "their source's repeats (1)") in log
    assert ("[data]   dataset:\n[data]     sources:\n[data]       - uri: s3://bkt/img/10_mystyle\n"
            "[data]         repeats: 10\n[data]       - uri: s3://bkt/img/3_other\n[data]         repeats: 3\n") in log
    # a source that already repeats as its name says is not warned about; nor a plain name
    folder = scan(img / "10_mystyle", uri="s3://bkt/img/10_mystyle")
    assert folder.kohya == {"s3://bkt/img/10_mystyle": (10, 0)}
    assert kohya_note(folder.kohya, [10]) == [] and kohya_note(folder.kohya, [1])
    assert scan(img / "plain").kohya == {}


def test_a_caption_map_overriding_caption_files_and_maps_in_subfolders_are_said(tmp_path):
    """A folder's captions.json names its captions (diffusion-pipe ignores .txt files beside one
    too): an item it leaves out that has a same-stem .txt is counted and the hint says why its
    caption is not read; a map in a subfolder is not read, and a warning names it."""
    import json
    from PIL import Image
    from kubelora_trainer.data import caption_hint, nested_maps_warning, scan
    for rel in ("a.png", "c.png", "sub/b.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(tmp_path / rel)
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": ["a red cube"]}))
    (tmp_path / "c.txt").write_text("a blue cube")
    (tmp_path / "sub" / "captions.json").write_text(json.dumps({"b.png": ["a green cube"]}))
    r = scan(tmp_path)
    assert [it.caption for it in r.items] == ["a red cube"] and r.missing_caption == 2
    assert r.unread_captions == 1 and r.nested_maps == ["sub/captions.json"]
    assert "1 of them have a same-stem caption file that is not read" in caption_hint(r)
    assert "sub/captions.json" in nested_maps_warning(r)
    assert nested_maps_warning(scan(tmp_path, recursive=False)) == ""


def _png_with_late_exif(src, dst, orientation: int):
    """src's PNG with an eXIf chunk (orientation) put after its pixels, before IEND."""
    import struct
    import zlib
    from PIL import Image
    ex = Image.Exif()
    ex[0x0112] = orientation
    body = ex.tobytes()
    body = body[6:] if body.startswith(b"Exif\x00\x00") else body
    data = src.read_bytes()
    end = data.rindex(b"IEND") - 4
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    dst.write_bytes(data[:end] + chunk + data[end:])


def test_the_checked_size_is_the_trained_orientation_from_xmp_and_late_png_exif(tmp_path):
    """The check reads the header only; the loader turns the picture as ImageOps.exif_transpose
    does, which also reads XMP's tiff:Orientation and a PNG's eXIf after its pixels. A 300x100
    image turned by either was bucketed landscape and trained portrait (83% cropped away)."""
    from PIL import Image, ImageOps
    from kubelora_trainer.data import probe
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    Image.new("RGB", (300, 100), (9, 9, 9)).save(tmp_path / "xmp.jpg", xmp=xmp.encode())
    Image.new("RGB", (300, 100), (9, 9, 9)).save(tmp_path / "plain.png")
    _png_with_late_exif(tmp_path / "plain.png", tmp_path / "late.png", 6)
    for name in ("xmp.jpg", "late.png", "plain.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            trained = ImageOps.exif_transpose(im).size
        assert probe(tmp_path / name, decode=False)[:2] == trained == probe(tmp_path / name)[:2], name
    assert probe(tmp_path / "xmp.jpg", decode=False)[:2] == (100, 300)
    assert probe(tmp_path / "late.png", decode=False)[:2] == (100, 300)


def test_16_bit_grey_images_and_masks_keep_their_levels(tmp_path):
    """Pillow's convert("RGB") clips a 16-bit grey image at 255: a gradient trained as white, a
    mid-grey mask weighed 1 instead of 0.5."""
    import numpy as np
    from PIL import Image
    from kubelora_trainer.masks import load_mask
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as im:
        assert im.mode.startswith("I")
    x = load_image(tmp_path / "ramp.png", 32)
    assert abs(float(x.mean())) < 0.05 and x[0, 0, 0] < -0.95 and x[0, 0, -1] > 0.95   # black to white, not all white
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "mask.png")
    assert abs(float(load_mask(tmp_path / "mask.png", 16, 16).mean()) - 0.5) < 0.01


def test_a_video_with_a_display_rotation_is_bucketed_and_trained_upright(tmp_path):
    """A phone's portrait video is stored landscape with a rotation in its display matrix: it was
    bucketed landscape and trained sideways. Checked and loaded as it is displayed."""
    import av
    import numpy as np
    from kubelora_trainer.data import load_clip, probe
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=24)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)   # shown turned 90 degrees counterclockwise
        for _ in range(5):
            a = np.zeros((32, 64, 3), np.uint8)
            a[:, :16] = 255          # the stored picture's left quarter white
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    assert probe(path)[:3] == (32, 64, 5)
    clip = load_clip(path, 32, 64, 5)
    assert tuple(clip.shape) == (3, 5, 64, 32)
    # turned counterclockwise, the stored left edge is the bottom: white below, black above
    assert clip[:, 0, -8:, :].mean() > 0.8 and clip[:, 0, :8, :].mean() < -0.8


def test_a_png_turned_by_a_raw_exif_profile_is_checked_as_it_is_trained(tmp_path):
    """ImageMagick writes a PNG's EXIF as a "Raw profile type exif" text chunk: Pillow's getexif
    reads it, so exif_transpose turns the picture by it; the header check reads it too."""
    from PIL import Image, ImageOps, PngImagePlugin
    from kubelora_trainer.data import probe
    ex = Image.Exif()
    ex[0x0112] = 6
    raw = ex.tobytes()
    raw = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    hexed = (b"Exif\x00\x00" + raw).hex()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(hexed) // 2:8d}\n{hexed}\n", zip=True)
    Image.new("RGB", (40, 20)).save(tmp_path / "raw.png", pnginfo=info)
    with Image.open(tmp_path / "raw.png") as im:
        im.load()
        trained = ImageOps.exif_transpose(im).size
    assert trained == (20, 40) and probe(tmp_path / "raw.png", decode=False)[:2] == trained


def test_a_nodes_ranks_share_one_scan_and_a_bad_caption_map_stops_them_once(tmp_path, tiny_flux_dir):
    """On a node of two ranks, local rank 0 scans the dataset for both (train.scan_on_node: each
    rank used to walk the same folders and read every caption file). A malformed caption map fails
    that scan: through the pods' launcher both ranks stop as bad input (exit 2), the cause printed
    once, last, naming the file; nothing of the scan is left in the cache folder."""
    import yaml
    from conftest import run_trainer, the_one_error
    from kubelora_trainer import exits
    data = tmp_path / "data"
    data.mkdir()
    _img(data / "a.png")
    (data / "captions.json").write_text('{"a.png": "a square"')  # cut short
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir)},
                                   "dataset": {"uri": str(data), "resolution": 32},
                                   "output": {"uri": str(tmp_path / "out")}}))
    proc = run_trainer(job, {"KUBELORA_CACHE_DIR": str(tmp_path / "cache"), "KUBELORA_METRICS_PORT": "0"}, nproc=2,
                       launcher=True)
    assert proc.returncode == exits.BAD_INPUT, proc.stderr[-3000:]
    error = the_one_error(proc)
    assert error.startswith(f"[error] rank 0: dataset {data}: ") and "captions.json" in error, error
    assert not list((tmp_path / "cache").rglob(".scan-*"))


_SCAN_WITHOUT_SHARING = """
import errno, os, sys
from pathlib import Path
from kubelora_trainer import cache, dist, train
from kubelora_trainer.spec import parse_spec
env = dist.init()
if env.local_rank == 0:   # the cache volume is full: the report cannot be written
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    cache.write_bytes_atomic = full
data = sys.argv[1]
spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/nowhere"}, "dataset": {"uri": data, "resolution": 32},
                   "output": {"uri": sys.argv[2]}})
report = train.scan_on_node(spec, env, {"dataset.0": data}, job_name="nospace")
print(f"items {len(report.items)}", flush=True)
dist.close()
"""


def test_where_the_scan_cannot_be_shared_each_rank_of_the_node_scans_for_itself(tmp_path):
    """train.scan_on_node's fallback: local rank 0 cannot write its report into the cache folder (a
    full volume; the write is made to fail in that process, as this machine's disks have room). It
    warns once, naming the file and the cause, and the node's other rank scans the dataset itself:
    both ranks go on with every item (two processes in one gloo group, as torchrun starts them)."""
    import os
    import subprocess
    import sys
    from kubelora_trainer.dist import _free_port
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        _img(data / f"{name}.png", caption=f"a red {name}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "KUBELORA_CACHE_DIR": str(tmp_path / "cache"),
           "KUBELORA_FORCE_CPU": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", _SCAN_WITHOUT_SHARING, str(data), str(tmp_path / "out")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.splitlines()[-1] for o in outs] == ["items 3", "items 3"], outs
    warned = [ln for ln in outs[0].splitlines() if "could not be shared" in ln]
    assert len(warned) == 1 and "No space left on device" in warned[0] and "each rank scans for itself" in warned[0]
    assert "scanned the dataset for its node" not in outs[0] + outs[1]
    assert not list((tmp_path / "cache").rglob(".scan-*"))
