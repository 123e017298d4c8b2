"""Loss masks (dataset.maskUri): finding, fitting like the item, the latent grid, the cache key, mixed
batches, and every family's loss giving a masked-out region exactly no gradient (tiny real models)."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from kubelora_trainer import masks
from kubelora_trainer.data import load_image, scan
from kubelora_trainer.objectives import mask_weights, weighted_mse


def _half_mask(path: Path, size=(64, 32), mode="RGB"):
    """Left half black (ignored), right half white (trained), a 128 stripe at columns 40..44."""
    im = Image.new("RGB", size, (0, 0, 0))
    im.paste((255, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    im.paste((128, 0, 0), (40, 0, 44, size[1]))   # red channel only: the weight is red
    (im.convert("L") if mode == "L" else im).save(path)
    return path


def test_mask_is_fitted_like_its_item_then_taken_to_the_latent_grid(tmp_path):
    """A 64x32 mask in a 32x32 bucket: covered (64x32) and centre-cropped (columns 16..48), as
    data.load_image fits the item; the red channel is the weight (128 -> 0.502)."""
    m = masks.load_mask(_half_mask(tmp_path / "m.png"), 32, 32)
    assert m.shape == (32, 32) and m.dtype == torch.float32
    assert m[:, :16].max() == 0 and m[:, 16:24].min() == 1 and m[:, 28:].min() == 1
    assert m[:, 24:28].tolist() == [[pytest.approx(128 / 255)] * 4] * 32
    item = load_image(tmp_path / "m.png", 32, 32)    # the same file as an item: the same pixels land
    torch.testing.assert_close((item[0] + 1) * 127.5 / 255, m, atol=1e-6, rtol=0)
    grid = masks.to_latent_grid(m, (8, 8))           # pixels 2, 6, ..., 30 of each row
    assert grid.tolist() == [[0.0] * 4 + [1.0, 1.0, pytest.approx(128 / 255), 1.0]] * 8
    # a bucket of another shape: cover + centre crop, then any grid
    assert masks.latent_mask(tmp_path / "m.png", 48, 16, (2, 6)).tolist() == [[0.0] * 3 + [1.0] * 3] * 2
    # nearest-exact (diffusion-pipe's): output cell i samples input pixel 2i+1 at half size
    ramp = torch.arange(8.0).repeat(8, 1)
    assert masks.to_latent_grid(ramp, (4, 4))[0].tolist() == [1.0, 3.0, 5.0, 7.0]
    # a grayscale ("L") mask reads the same
    assert torch.equal(masks.load_mask(_half_mask(tmp_path / "l.png", mode="L"), 32, 32)[:, :24], m[:, :24])


def test_masks_are_found_by_stem_in_the_same_relative_folder(tmp_path):
    data, mk = tmp_path / "data", tmp_path / "data" / "masks"   # the mask folder inside the data: not items
    (data / "sub").mkdir(parents=True)
    (mk / "sub").mkdir(parents=True)
    for rel in ("a.png", "b.png", "sub/c.jpg"):
        Image.new("RGB", (8, 8)).save(data / rel)
        (data / rel).with_suffix(".txt").write_text("x")
    Image.new("L", (8, 8)).save(mk / "a.webp")                  # any image extension
    Image.new("L", (8, 8)).save(mk / "sub" / "c.png")
    (mk / "b.txt").write_text("not a mask")
    r = scan(data, uri="s3://bkt/data", mask_root=mk)
    assert [(i.uri, i.mask and i.mask.relative_to(mk).as_posix()) for i in r.items] == [
        ("s3://bkt/data/a.png", "a.webp"), ("s3://bkt/data/b.png", None), ("s3://bkt/data/sub/c.jpg", "sub/c.png")]
    assert r.unmasked == ["s3://bkt/data/b.png"]
    assert r.summary()["masked"] == 2 and r.summary()["unmasked"] == 1


def test_a_mask_that_does_not_decode_or_fit_skips_its_item(tmp_path):
    """diffusion-pipe stops the run on a mask of another size; training the item unmasked would train
    what was masked out: the item is skipped and counted instead."""
    from kubelora_trainer.data import check_item
    data, mk = tmp_path / "data", tmp_path / "masks"
    data.mkdir(), mk.mkdir()
    for n in ("ok", "broken", "small"):
        Image.new("RGB", (40, 24)).save(data / f"{n}.png")
        (data / f"{n}.txt").write_text("x")
    _half_mask(mk / "ok.png", size=(40, 24))
    (mk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    _half_mask(mk / "small.png", size=(20, 12))
    r = scan(data, uri="s3://b/d", mask_root=mk)
    got = {it.uri: check_item(it) for it in r.items}
    assert got["s3://b/d/ok.png"] == ((40, 24, 1, False), None)
    assert got["s3://b/d/broken.png"][1].reason == "maskUnreadable"
    assert str(got["s3://b/d/small.png"][1]) == "s3://b/d/small.png: maskSizeMismatch (small.png is 20x12, the item 40x24)"


def test_cache_key_bytes_cover_the_mask_and_mixed_batches_get_ones():
    assert masks.media_key(b"img", None) == b"img"                # unmasked: the media's bytes alone
    assert len({masks.media_key(b"img", None), masks.media_key(b"img", b"m1"), masks.media_key(b"img", b"m2")}) == 3
    a = {"latents": torch.zeros(4, 2, 3), "mask": torch.zeros(2, 3)}
    b = {"latents": torch.zeros(4, 2, 3)}
    filled = masks.fill_masks([a, b])
    assert filled[0] is a and torch.equal(filled[1]["mask"], torch.ones(2, 3)) and "mask" not in b
    assert masks.fill_masks([b, b]) == [b, b]                   # no mask anywhere: none added


def test_weighted_mse_zero_weight_means_zero_gradient():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 3, 6, 6, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 3, 6, 6, generator=g)
    mask = torch.ones(2, 6, 6)
    mask[0, :, :3] = 0
    w = mask_weights(mask, pred.shape)
    assert w.shape == pred.shape and w[0, 2, 1, 4, :3].sum() == 0 and w[1].min() == 1
    assert torch.equal(weighted_mse(pred, target, torch.ones_like(pred)), weighted_mse(pred, target))
    assert torch.equal(weighted_mse(pred, target), torch.nn.functional.mse_loss(pred, target))
    loss = weighted_mse(pred, target, w)
    loss.backward()
    assert pred.grad[0, ..., :3].abs().max() == 0 and pred.grad[0, ..., 3:].abs().min() > 0
    assert pred.grad[1].abs().min() > 0
    # the mean is over all elements (diffusion-pipe), so the masked sample's loss shrinks with its mask
    per = weighted_mse(pred, target, w, per_sample=True)
    full = weighted_mse(pred, target, per_sample=True)
    assert per.shape == (2,) and per[1] == full[1] and per[0] < full[0]


def _tiny(name, tmp_path):
    from kubelora_trainer.spec import ModelSpec
    if name == "flux":
        from kubelora_trainer.models.flux.tiny import build_tiny_flux
        return ModelSpec(type="flux", diffusersPath="/x", dtype="float32"), {"diffusersPath": str(build_tiny_flux(tmp_path))}
    if name == "sdxl":
        from kubelora_trainer.models.sdxl.tiny import build_tiny_sdxl
        return ModelSpec(type="sdxl", diffusersPath="/x", dtype="float32"), {"diffusersPath": str(build_tiny_sdxl(tmp_path))}
    if name == "ltx-video":
        from kubelora_trainer.models.ltx_video.tiny import build_tiny_ltx_video
        return (ModelSpec(type="ltx-video", diffusersPath="/x", dtype="float32"),
                {"diffusersPath": str(build_tiny_ltx_video(tmp_path))})
    if name == "cosmos":
        from kubelora_trainer.models.cosmos.tiny import build_tiny_cosmos
        paths = build_tiny_cosmos(tmp_path)
        return ModelSpec(type="cosmos", dtype="float32", **{k: "/x" for k in paths}), paths
    from kubelora_trainer.models.hunyuan_video.tiny import build_tiny_hunyuan_video
    paths = build_tiny_hunyuan_video(tmp_path, transformer_dtype="float32")
    return ModelSpec(type="hunyuan-video", dtype="float32", **{k: "/x" for k in paths}), paths


def _unpack(name, out, latents_shape, comps):
    """The denoiser's output (its gradient) in the latents' layout [B, C, (F,) h, w], by diffusers'
    own unpacking (independent of how the loss packs the mask)."""
    if name == "flux":
        from diffusers import FluxPipeline
        return FluxPipeline._unpack_latents(out, latents_shape[-2], latents_shape[-1], 1)
    if name == "ltx-video":
        from diffusers import LTXPipeline
        _, _, f, h, w = latents_shape
        return LTXPipeline._unpack_latents(out, f, h, w, comps.info["patch"], comps.info["patch_t"])
    return out


@pytest.mark.parametrize("name", ["flux", "sdxl", "ltx-video", "hunyuan-video", "cosmos"])
def test_a_masked_out_region_gets_no_gradient_in_every_family(name, tmp_path):
    """A batch of a masked item (left half of the latent grid masked out) and an unmasked one (all
    ones at stack time, as cache.stack gives it): the gradient of the loss w.r.t. the denoiser's
    prediction is exactly zero in the masked-out region, non-zero in the rest and for the unmasked
    item; an all-ones mask gives the unmasked loss exactly."""
    from kubelora_trainer.models import get_family
    from kubelora_trainer.spec import TrainingSpec
    from kubelora_trainer.cache import stack
    fam = get_family(name)
    model_spec, paths = _tiny(name, tmp_path / "model")
    comps = fam.load(model_spec, paths, torch.device("cpu"))
    video = name in ("ltx-video", "hunyuan-video", "cosmos")
    x = torch.rand(1, 3, *((9,) if video else ()), 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        enc = {k: v.detach() for k, v in fam.encode(comps, x, ["a red circle"])[0].items()}
    h, w = enc["latents"].shape[-2:]
    mask = torch.ones(h, w)
    mask[:, : w // 2] = 0
    batch = stack([{**enc, "mask": mask}, enc])
    assert torch.equal(batch["mask"][1], torch.ones(h, w))
    training = TrainingSpec(steps=1, timestepSampling="uniform")
    denoiser = comps.trainable["unet" if name == "sdxl" else "transformer"]
    seen = []

    def keep(module, args, out):   # returns None: the output is left as it is
        if out[0].requires_grad:
            out[0].retain_grad()
        seen.append(out[0])
    denoiser.register_forward_hook(keep)
    loss = fam.loss(comps, batch, model_spec, training, torch.Generator().manual_seed(1))
    loss.backward()
    grad = _unpack(name, seen[-1].grad, batch["latents"].shape, comps)
    assert grad.shape == batch["latents"].shape
    assert grad[0, ..., : w // 2].abs().max() == 0                       # masked out: exactly no gradient
    assert grad[0, ..., w // 2:].abs().amax(dim=-1).min() > 0             # the rest trains
    assert grad[1].abs().amax(dim=-1).min() > 0                           # the unmasked item trains everywhere
    ones = {**batch, "mask": torch.ones_like(batch["mask"])}
    plain = {k: v for k, v in batch.items() if k != "mask"}
    with torch.no_grad():
        assert torch.equal(fam.loss(comps, ones, model_spec, training, torch.Generator().manual_seed(1)),
                           fam.loss(comps, plain, model_spec, training, torch.Generator().manual_seed(1)))


def test_a_mask_that_vanished_is_counted_as_an_unreadable_mask(tmp_path, monkeypatch):
    """Reading the bytes that key the item fails on its mask (deleted after the scan found it): the
    item is skipped as maskUnreadable, not as a corrupt media file, and not remembered (a vanished
    path says nothing about the bytes)."""
    from conftest import one_rank_env
    from kubelora_trainer import dist
    from kubelora_trainer.data import ScanReport
    from kubelora_trainer.spec import parse_spec
    from kubelora_trainer.dataset_phase import probe_items
    one_rank_env(monkeypatch)
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    data, mask_root = tmp_path / "d", tmp_path / "m"
    data.mkdir()
    mask_root.mkdir()
    Image.new("RGB", (32, 32)).save(data / "a.png")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(mask_root / "a.png")
    (data / "a.txt").write_text("x")
    report = ScanReport()
    report.merge(scan(data, mask_root=mask_root, uri="s3://b/d/"))
    assert report.items[0].mask == mask_root / "a.png"
    (mask_root / "a.png").unlink()
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d", "resolution": 32},
                       "output": {"uri": "/o"}})
    env = dist.init()
    try:
        assert probe_items(report, env, spec) == ([], [])
    finally:
        dist.close()
    assert [(s.reason, s.uri, s.lasting) for s in report.skipped] == [("maskUnreadable", "s3://b/d/a.png", False)]
