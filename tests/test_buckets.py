"""Bucket math, clip modes, the bucket sampler and caption options: pure functions, table tests."""
import math
import random
import re

import pytest
from PIL import Image

from kubelora_trainer import buckets as bk
from kubelora_trainer.captions import CaptionOptions, read_caption_map, shuffle_tags, variants
from kubelora_trainer.data import DatasetError, check_usable, load_unit, probe, scan
from kubelora_trainer.spec import SpecError, parse_spec


def test_aspect_ratios_match_diffusion_pipe_geomspace():
    assert bk.aspect_ratios(False) == [1.0]
    ars = bk.aspect_ratios(True, 0.5, 2.0, 7)
    want = [0.5 * 4 ** (i / 6) for i in range(7)]  # np.geomspace(0.5, 2.0, 7)
    assert ars == pytest.approx(want, abs=5e-4) and ars[3] == pytest.approx(1.0)
    assert bk.aspect_ratios(True, 0.5, 2.0, 1) == pytest.approx([1.0])
    # rounded to 3 decimals before sizing, as diffusion-pipe's dedup_and_sort does: at 1248 the 0.794
    # bucket is 1120x1408 there; the unrounded 0.7937 gave 1104x1408
    assert ars == [0.5, 0.63, 0.794, 1.0, 1.26, 1.587, 2.0]
    assert bk.bucket_size(0.794, 1248, 16) == (1120, 1408)


@pytest.mark.parametrize("ar,side,mult,want", [
    (1.0, 512, 16, (512, 512)),
    (2.0, 512, 16, (720, 368)),     # sqrt(512*512*2)=724.1 -> 720; 262144/724.1=362 -> 368
    (0.5, 512, 16, (368, 720)),
    (1.0, 32, 16, (32, 32)),
    (2.0, 32, 16, (48, 16)),        # 45.25 -> 48, 22.6 -> 16
    (2.0, 64, 32, (96, 32)),        # LTX rounds to 32
])
def test_bucket_size_is_an_area_rounded_to_the_multiple(ar, side, mult, want):
    assert bk.bucket_size(ar, side, mult) == want


@pytest.mark.parametrize("w,h,want", [(100, 100, 1.0), (200, 100, 2.0), (36, 120, 0.5), (150, 100, 1.414)])
def test_nearest_bucket_by_log_ratio(w, h, want):
    ars = bk.aspect_ratios(True, 0.5, 2.0, 5)  # 0.5, 0.707, 1, 1.414, 2 (3 decimals)
    assert ars[bk.nearest(w, h, ars)] == pytest.approx(want)


@pytest.mark.parametrize("frames,buckets,video,want", [
    (1, [1, 9, 17], False, 1),
    (12, [1, 9, 17], True, 9),      # the longest bucket not longer than the clip
    (17, [1, 9, 17], True, 17),
    (40, [1, 9, 17], True, 17),
    (5, [1, 9, 17], True, None),    # too short for every video bucket (never the image bucket)
    (5, [1], True, None),
])
def test_frame_bucket(frames, buckets, video, want):
    assert bk.frame_bucket(frames, buckets, video) == want


@pytest.mark.parametrize("frames,target,mode,want", [
    (20, 9, "single_beginning", [0]),
    (20, 9, "single_middle", [5]),
    (9, 9, "multiple_overlapping", [0]),
    (20, 9, "multiple_overlapping", [0, 5, 11]),   # diffusion-pipe: (20-1)//9+1 = 3 clips, linspace(0, 11, 3)
    (18, 9, "multiple_overlapping", [0, 9]),
])
def test_clip_starts(frames, target, mode, want):
    assert bk.clip_starts(frames, target, mode) == want


@pytest.mark.parametrize("w,h,bw,bh,crop", [
    (64, 64, 32, 32, 0.0),
    (64, 32, 32, 32, 0.5),
    (36, 120, 32, 32, 1 - 36 / 120),   # a tall image into a square: 70% of its height cut
    (64, 32, 48, 16, 1 / 3),            # ratio 2 into ratio 3: covered at 48x24, a third of the height cut
])
def test_cover_crop_counts_what_is_cut(w, h, bw, bh, crop):
    size, box, frac = bk.cover_crop(w, h, bw, bh)
    assert box[2] - box[0] == bw and box[3] - box[1] == bh and size[0] >= bw and size[1] >= bh
    assert frac == pytest.approx(crop, abs=0.02)


def test_assign_mixed_dataset_counts_buckets_crops_and_drops():
    cfg = bk.BucketConfig(ars=tuple(bk.aspect_ratios(True, 0.5, 2.0, 3)), sides=(32,), frame_buckets=(1, 9, 17))
    metas = [(64, 64, 1, False), (128, 64, 1, False), (60, 40, 1, False),  # square, wide, 1.5 -> wide bucket
             (64, 64, 12, True), (64, 64, 5, True), (32, 64, 40, True)]    # 9 frames, too short, tall 17
    a = bk.assign(metas, [cfg], [0] * 6)
    got = [(u.item, u.bucket) for u in a.units]
    assert got == [(0, (32, 32, 1)), (1, (48, 16, 1)), (2, (48, 16, 1)), (3, (32, 32, 9)), (5, (16, 48, 17))]
    assert a.dropped == [(4, "tooShort")]
    s = bk.summary(a, 6, [f"f{i}" for i in range(6)])
    assert s["buckets"]["48x16x1"]["samples"] == 2 and s["dropped"] == {"tooShort": 1}
    assert s["cropped"] == 3 and s["droppedItems"] == ["f4: tooShort"]  # 48x16 is 3:1 after rounding: wide ones cut
    assert any("bucket 48x16x1: 2 samples" in line for line in bk.format_summary(s))
    # two areas: every item at each; multiple_overlapping: several clips
    cfg2 = bk.BucketConfig(ars=(1.0,), sides=(16, 32), frame_buckets=(1, 9), clip_mode="multiple_overlapping")
    a2 = bk.assign([(64, 64, 20, True)], [cfg2], [0])
    assert [(u.bucket, u.start) for u in a2.units] == [((16, 16, 9), 0), ((16, 16, 9), 5), ((16, 16, 9), 11),
                                                        ((32, 32, 9), 0), ((32, 32, 9), 5), ((32, 32, 9), 11)]


def _space(buckets, repeats=None, variants=None, dropout=None):
    n = len(buckets)
    return bk.SampleSpace(tuple(buckets), tuple(repeats or [1] * n), tuple(variants or [1] * n), tuple(dropout or [0.0] * n))


def test_every_batch_from_one_bucket_and_leftovers_carried():
    A, B = (32, 32, 1), (48, 16, 1)
    space = _space([A] * 5 + [B] * 3, repeats=[2] * 5 + [1] * 3)
    batches, carry = bk.plan_epoch(space, seed=1, epoch=0, global_batch=4, carry_in=[])
    assert all(len({space.buckets[u] for u, _ in b}) == 1 for b in batches)
    assert len(batches) == 2 and sorted(len(b) for b in batches) == [4, 4] and len(carry) == 10 + 3 - 8
    # carried samples are used first next epoch
    nxt, _ = bk.plan_epoch(space, seed=1, epoch=1, global_batch=4, carry_in=carry)
    used = [s for b in nxt for s in b]
    assert all(s in used for s in carry if space.buckets[s[0]] == A)
    assert bk.plan_epoch(space, 1, 0, 4, []) == (batches, carry)      # deterministic
    assert bk.plan_epoch(space, 2, 0, 4, []) != (batches, carry)      # seeded


def test_a_dataset_smaller_than_a_batch_is_never_dropped():
    s = bk.BucketSampler(_space([(32, 32, 1)]), seed=0, micro_batch=4, world=2, rank=1)
    assert s.next_batch() == [(0, 0)] * 4 and s.epoch == 7  # 8 epochs of 1 sample make one global batch


def test_sampler_ranks_split_global_batches_and_resume_exactly():
    space = _space([(32, 32, 1)] * 6 + [(48, 16, 1)] * 5, variants=[3] * 11, dropout=[0.3] * 11)
    ranks = [bk.BucketSampler(space, 5, 2, 2, r) for r in range(2)]
    for _ in range(7):
        b0, b1 = ranks[0].next_batch(), ranks[1].next_batch()
        assert len({space.buckets[u] for u, _ in b0 + b1}) == 1 and len(b0) == len(b1) == 2
    ref = bk.BucketSampler(space, 5, 2, 2, 0)
    want = [ref.next_batch() for _ in range(20)]
    s = bk.BucketSampler(space, 5, 2, 2, 0)
    got = [s.next_batch() for _ in range(9)]
    resumed = bk.BucketSampler(space, 5, 2, 2, 0)
    resumed.load_state_dict(s.state_dict())
    got += [resumed.next_batch() for _ in range(11)]
    assert got == want
    assert any(v == -1 for b in want for _, v in b) and {v for b in want for _, v in b} <= {-1, 0, 1, 2}


@pytest.mark.parametrize("caption,keep,delim,rng_seed", [("a, b, c, d, e", 2, ", ", 0), ("x|y|z", 0, "|", 3)])
def test_shuffle_tags_keeps_the_head(caption, keep, delim, rng_seed):
    out = shuffle_tags(caption, random.Random(rng_seed), keep, delim)
    tags, orig = out.split(delim), caption.split(delim)
    assert tags[:keep] == orig[:keep] and sorted(tags) == sorted(orig)


def test_caption_variants():
    opts = CaptionOptions(prefix="ohwx, ", shuffle=True, variants=3, keep=1)
    v = variants(["cat, red, small, cute"], opts, seed=1)
    assert len(v) == 3 and all(x.startswith("ohwx, cat, ") for x in v) and v == variants(["cat, red, small, cute"], opts, 1)
    assert variants(["a", "b"], CaptionOptions(prefix="p "), 0) == ["p a", "p b"]


def _img(p, size=(40, 24), caption=None, ext=".txt"):
    Image.new("RGB", size, (200, 10, 10)).save(p)
    if caption is not None:
        p.with_suffix(ext).write_text(caption)


def test_caption_extension_and_maps(tmp_path):
    _img(tmp_path / "a.png", caption="from caption file", ext=".caption")
    _img(tmp_path / "b.png", caption="from caption file", ext=".caption")
    r = scan(tmp_path, "skip")
    assert r.items == [] and r.missing_caption == 2
    with pytest.raises(DatasetError, match=r'Without a caption: a.png, b.png\. 2 of them have a same-stem \.caption '
                                           r'file beside them: set dataset.captionExtension: "\.caption"'):
        check_usable(r, "s3://b/d")
    r = scan(tmp_path, opts=CaptionOptions(extension=".caption"))
    assert [i.caption for i in r.items] == ["from caption file"] * 2
    (tmp_path / "captions.json").write_text('{"a.png": ["one", "two"], "b.png": "three"}')
    r = scan(tmp_path)
    assert [i.variants for i in r.items] == [("one", "two"), ("three",)]
    (tmp_path / "captions.json").unlink()
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "jl"}\n')
    r = scan(tmp_path, "empty")
    assert [(i.image.name, i.caption) for i in r.items] == [("a.png", "jl"), ("b.png", "")]
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match="captions.jsonl: line 1"):
        read_caption_map(tmp_path)
    (tmp_path / "captions.jsonl").unlink()
    for bad in ("[]", "null", "5", '["ok", 3]'):  # crashed (IndexError), trained "None", trained "5"
        (tmp_path / "captions.json").write_text(f'{{"a.png": "fine", "b.png": {bad}}}')
        with pytest.raises(DatasetError, match=rf"captions.json: 'b.png': expected a caption \(a string\) or a "
                                               rf"non-empty list of captions, got {re.escape(bad)}"):
            scan(tmp_path)


def test_probe_and_load_unit(tmp_path):
    _img(tmp_path / "w.png", size=(120, 36))
    assert probe(tmp_path / "w.png") == (120, 36, 1, False)
    t = load_unit(tmp_path / "w.png", 48, 16, 1)
    assert tuple(t.shape) == (3, 16, 48)
    assert tuple(load_unit(tmp_path / "w.png", 48, 16, 1, clip=True).shape) == (3, 1, 16, 48)
    from kubelora_trainer.synthetic import write_video
    import numpy as np
    write_video(tmp_path / "v.mp4", [np.full((32, 64, 3), 10 * i, dtype=np.uint8) for i in range(12)], fps=25)
    w, h, n, video = probe(tmp_path / "v.mp4", 25)
    assert (w, h, video) == (64, 32, True) and n == 12
    assert tuple(load_unit(tmp_path / "v.mp4", 32, 16, 9, start=3, fps=25).shape) == (3, 9, 16, 32)


BASE = {"model": {"type": "flux", "diffusersPath": "s3://bkt/flux"}, "output": {"uri": "s3://bkt/out"}}


@pytest.mark.parametrize("dataset,message", [
    ({}, "set exactly one of dataset.uri"),
    ({"uri": "s3://bkt/a", "sources": [{"uri": "s3://bkt/b"}]}, "set exactly one of dataset.uri"),
    ({"sources": [{"uri": "s3://bkt/a"}], "repeats": 2}, "with dataset.sources, set repeats on each source"),
    ({"uri": "s3://bkt/a", "resolution": 256, "resolutions": [512]}, "set one"),
    ({"uri": "s3://bkt/a", "enableArBucket": True, "width": 64, "height": 32}, "aspect-ratio buckets would ignore"),
    ({"uri": "s3://bkt/a", "keepTags": 1}, "dataset.keepTags applies only with shuffleTags"),
    # a dataset-level value that no shuffling source inherits: every one overrides it, or turns shuffling off
    ({"sources": [{"uri": "s3://bkt/a", "shuffleTags": True, "keepTags": 1}], "keepTags": 3},
     r"dataset.keepTags applies to no source \(none that shuffles tags leaves keepTags unset\)"),
    ({"sources": [{"uri": "s3://bkt/a", "shuffleTags": False}], "shuffleTags": True, "shuffleVariants": 2},
     "dataset.shuffleVariants applies to no source"),
    ({"uri": "s3://bkt/a", "resolutions": [500]}, "multiple of 16"),
    ({"sources": [{"uri": "s3://bkt/a"}, {"uri": "s3://bkt"}]}, r"inside dataset.sources\[1\].uri"),
    ({"uri": "s3://bkt/a", "frameBuckets": [9]}, "flux is an image model"),
    ({"sources": [{"uri": "s3://bkt/a"}], "maskUri": "s3://bkt/m"}, "with dataset.sources, set maskUri on each source"),
    ({"uri": "s3://bkt/a", "maskUri": "s3://bkt/a/"}, r"dataset.maskUri: the masks need a folder of their own"),
    ({"sources": [{"uri": "s3://bkt/a", "maskUri": "s3://bkt"}]}, r"inside dataset.sources\[0\].maskUri"),
])
def test_dataset_spec_refusals(dataset, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**BASE, "dataset": dataset})


def test_dataset_spec_video_and_cosmos_rules():
    ltx = {"type": "ltx-video", "diffusersPath": "s3://bkt/ltx"}
    with pytest.raises(SpecError, match=r"dataset.sources\[0\].frameBuckets: ltx-video needs 8k\+1 frames"):
        parse_spec({**BASE, "model": ltx, "dataset": {"sources": [{"uri": "s3://bkt/a", "frameBuckets": [8]}]}})
    with pytest.raises(SpecError, match="dataset.resolutions: ltx-video needs sides divisible by 32"):
        parse_spec({**BASE, "model": ltx, "dataset": {"uri": "s3://bkt/a", "resolutions": [48]}})
    cosmos = {"type": "cosmos", "transformerPath": "s3://bkt/t.pt", "vaePath": "s3://bkt/v.pt",
              "textEncoderPath": "s3://bkt/t5"}
    with pytest.raises(SpecError, match="dataset.enableArBucket: cosmos trains only at its fixed sizes"):
        parse_spec({**BASE, "model": cosmos, "dataset": {"uri": "s3://bkt/a", "enableArBucket": True}})
    with pytest.raises(SpecError, match="dataset.resolutions: cosmos trains only at its fixed sizes"):
        parse_spec({**BASE, "model": cosmos, "dataset": {"uri": "s3://bkt/a", "resolutions": [960]}})
    with pytest.raises(SpecError, match="dataset.resolutions: dataset.width/height fix the one training size"):
        parse_spec({**BASE, "model": cosmos, "dataset": {"uri": "s3://bkt/a", "width": 960, "height": 960,
                                                         "resolutions": [960]}})
    s = parse_spec({**BASE, "model": ltx, "dataset": {"sources": [{"uri": "s3://bkt/a", "repeats": 3},
                                                                  {"uri": "s3://bkt/b", "frameBuckets": [9, 17]}],
                                                      "frameBuckets": [9], "enableArBucket": True}})
    from kubelora_trainer.families import frame_buckets_of
    assert s.dataset.uris == ["s3://bkt/a", "s3://bkt/b"]
    assert [frame_buckets_of("ltx-video", s.dataset, src) for src in s.dataset.sources] == [[1, 9], [1, 9, 17]]
    assert math.isclose(s.dataset.minAr, 0.5)


@pytest.mark.parametrize("dataset,message", [
    ({"uri": "/d", "minAr": 0.25}, "dataset.minAr applies only with enableArBucket"),
    ({"uri": "/d", "numArBuckets": 9}, "dataset.numArBuckets applies only with enableArBucket"),
    ({"uri": "/d", "videoClipMode": "single_middle"}, "dataset.videoClipMode applies to video families only"),
])
def test_settings_that_would_do_nothing_are_refused(dataset, message):
    from kubelora_trainer.spec import SpecError, parse_spec
    with pytest.raises(SpecError, match=message):
        parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": dataset, "output": {"uri": "/o"}})
