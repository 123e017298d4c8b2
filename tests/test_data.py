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
    assert r.summary() == {"usable": 2, "missingCaption": 1, "emptyCaptionUsed": 1, "unreadable": 0}


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
