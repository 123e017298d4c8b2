"""The latent cache key covers everything a cached tensor depends on, so a later job on a shared
cache volume never trains on another job's latents (pure functions, no model)."""
from kubelora_trainer.spec import parse_spec
from kubelora_trainer.cache import CACHE_FORMAT, cache_inputs, cache_key, model_fingerprint


def _spec(**dataset):
    return parse_spec({"model": {"type": "ltx-video", "diffusersPath": "s3://bkt/ltx"},
                       "dataset": {"uri": "s3://bkt/data", "resolution": 32, "frames": 9, **dataset},
                       "output": {"uri": "s3://bkt/out"}})


def _key(spec, files="f1", caption="a cat", media=b"bytes"):
    return cache_key(cache_inputs(spec, files), caption, media)


def test_key_changes_with_every_input():
    base = _key(_spec())
    assert base == _key(_spec())  # stable
    others = [_key(_spec(frames=17)), _key(_spec(resolution=64)), _key(_spec(resolution=512, width=64, height=32)),
              _key(_spec(), files="f2"), _key(_spec(), caption="a dog"), _key(_spec(), media=b"other")]
    assert len({base, *others}) == 1 + len(others)


def test_inputs_name_frame_rate_fit_and_format():
    inputs = cache_inputs(_spec(), "f1")
    assert inputs["frames"] == 9 and inputs["fps"] == 25 and inputs["format"] == CACHE_FORMAT
    assert inputs["fit"] and inputs["model"] == {"type": "ltx-video", "dtype": "bfloat16"}


def test_a_family_cache_format_keys_only_that_family(monkeypatch):
    """A family whose encode() changed bumps its FamilyRules.cache_format: its keys change, the
    other families' keys do not."""
    import dataclasses
    from kubelora_trainer import cache
    flux = parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt/flux"}, "dataset": {"uri": "s3://bkt/data"},
                       "output": {"uri": "s3://bkt/out"}})
    assert cache.RULES["ltx-video"].cache_format >= 1 and not cache.RULES["flux"].cache_format
    assert cache_inputs(_spec(), "f1")["family_format"] == cache.RULES["ltx-video"].cache_format
    assert "family_format" not in cache_inputs(flux, "f1")
    ltx_key, flux_key = _key(_spec()), _key(flux)
    rules = dict(cache.RULES)
    rules["ltx-video"] = dataclasses.replace(rules["ltx-video"], cache_format=rules["ltx-video"].cache_format + 1)
    monkeypatch.setattr(cache, "RULES", rules)
    assert _key(_spec()) != ltx_key and _key(flux) == flux_key


def test_what_the_encoders_never_see_leaves_the_key_alone():
    """The model's URI (the files are fingerprinted instead) and the settings of the denoiser and the
    loss: another cluster's copy of the model, or fp8, or min-SNR, reuse the cache."""
    def flux(**model):
        return parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt-a/models/flux", **model},
                           "dataset": {"uri": "s3://bkt/data"}, "output": {"uri": "s3://bkt/out"}})
    base = cache_key(cache_inputs(flux(), "f1"), "a cat", b"bytes")
    for other in (flux(diffusersPath="s3://bkt-b/models/flux"), flux(transformerDtype="float8"), flux(fluxShift=False),
                  flux(guidance=3.5), flux(transformerPath="s3://bkt-a/models/flux1-dev.safetensors")):
        assert cache_key(cache_inputs(other, "f1"), "a cat", b"bytes") == base
    assert cache_key(cache_inputs(flux(dtype="float32"), "f1"), "a cat", b"bytes") != base


def test_model_fingerprint_covers_the_encoders_bytes_not_the_denoiser_nor_the_path(tmp_path):
    def model(root, vae=b"v" * 300_000, transformer=b"t" * 10):
        (root / "vae").mkdir(parents=True, exist_ok=True)
        (root / "transformer").mkdir(exist_ok=True)
        (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(vae)
        (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(transformer)
        return {"diffusersPath": str(root)}
    a = model_fingerprint(model(tmp_path / "a"))
    assert model_fingerprint(model(tmp_path / "elsewhere")) == a
    assert model_fingerprint(model(tmp_path / "b", transformer=b"u" * 12)) == a         # a fine-tuned denoiser
    tuned = bytearray(b"v" * 300_000)
    tuned[150_000] = ord("w")                                                              # same size, other bytes
    assert model_fingerprint(model(tmp_path / "c", vae=bytes(tuned))) != a
    assert model_fingerprint({**model(tmp_path / "d"), "transformerPath": str(tmp_path / "x.safetensors")}) == a


def test_model_fingerprint_sees_every_byte_of_a_large_file_and_not_the_stage_index(tmp_path):
    """A VAE baked into a single SDXL checkpoint is 160 MB of a 7 GB file: blocks sampled over the
    file could miss it, and two checkpoints differing only there shared keys (latents of the wrong
    VAE). Every byte is hashed (once per node: remembered by path, size, mtime and inode). The
    stage-in index (ETags: another bucket's copy of the same files has others) and other hidden
    files are not the model's."""
    root = tmp_path / "m"
    root.mkdir()
    ckpt = bytearray(b"w" * (3 << 20))
    (root / "sdxl.safetensors").write_bytes(bytes(ckpt))
    paths = {"checkpointPath": str(root / "sdxl.safetensors")}
    memo = tmp_path / "memo"
    a = model_fingerprint(paths, memo)
    ckpt[(3 << 20) // 2 + 12345] = ord("v")   # between any 16 blocks of 64 KiB spread over the file
    (tmp_path / "other.safetensors").write_bytes(bytes(ckpt))
    assert model_fingerprint({"checkpointPath": str(tmp_path / "other.safetensors")}, memo) != a
    assert model_fingerprint(paths, memo) == a and list((memo / "digests").iterdir())  # remembered
    folder = {"diffusersPath": str(tmp_path / "f")}
    (tmp_path / "f" / "vae").mkdir(parents=True)
    (tmp_path / "f" / "vae" / "w.safetensors").write_bytes(b"x")
    before = model_fingerprint(folder)
    (tmp_path / "f" / ".kubelora-stage.json").write_text('{"vae/w.safetensors": "etag-1"}')
    (tmp_path / "f" / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "f" / ".cache" / "huggingface" / "x.metadata").write_text("hub")
    assert model_fingerprint(folder) == before


def test_model_fingerprint_sees_a_replaced_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vae.safetensors").write_bytes(b"x" * 10)
    paths = {"diffusersPath": str(tmp_path / "m"), "dataset": str(tmp_path / "d")}
    before = model_fingerprint(paths)
    (tmp_path / "m" / "vae.safetensors").write_bytes(b"x" * 11)
    assert model_fingerprint(paths) != before


def test_the_dropout_entry_is_keyed_apart_from_an_empty_caption_only_where_encoded_apart():
    """HunyuanVideo encodes caption dropout with the image template and a clip's own empty caption
    with the video one (FamilyRules.dropout_text): the two entries of one unit get different keys.
    Other families encode them alike and keep one key (their cached entries stay valid)."""
    from types import SimpleNamespace
    from kubelora_trainer import buckets as bk
    from kubelora_trainer.dataset_phase import entry_keys
    report = SimpleNamespace(items=[SimpleNamespace(variants=["", "a cat"])])
    units = [bk.Unit(0, (32, 32, 5), 0, 0.0)]
    entries = [(0, 0), (0, 1), (0, -1)]
    hv = parse_spec({"model": {"type": "hunyuan-video", "ckptPath": "s3://bkt/hv"},
                     "dataset": {"uri": "s3://bkt/data", "resolution": 32, "frames": 5}, "output": {"uri": "s3://bkt/out"}})
    empty, cat, dropout = entry_keys(report, units, entries, ["00" * 8], cache_inputs(hv, "f1"))
    assert len({empty, cat, dropout}) == 3
    empty, cat, dropout = entry_keys(report, units, entries, ["00" * 8], cache_inputs(_spec(frames=None), "f1"))
    assert empty == dropout != cat
