"""The latent cache key covers everything a cached tensor depends on, so a later job on a shared
cache volume never trains on another job's latents (pure functions, no model)."""
from kubelora_trainer.spec import parse_spec
from kubelora_trainer.train import CACHE_FORMAT, cache_inputs, cache_key, model_fingerprint


def _spec(**dataset):
    return parse_spec({"model": {"type": "ltx-video", "diffusersPath": "s3://bkt/ltx"},
                       "dataset": {"uri": "s3://bkt/data", "resolution": 32, "frames": 9, **dataset},
                       "output": {"uri": "s3://bkt/out"}})


def _key(spec, files="f1", caption="a cat", media=b"bytes"):
    return cache_key(cache_inputs(spec, files), caption, media)


def test_key_changes_with_every_input():
    base = _key(_spec())
    assert base == _key(_spec())  # stable
    others = [_key(_spec(frames=17)), _key(_spec(resolution=64)), _key(_spec(width=64, height=32)),
              _key(_spec(), files="f2"), _key(_spec(), caption="a dog"), _key(_spec(), media=b"other")]
    assert len({base, *others}) == 1 + len(others)


def test_inputs_name_frame_rate_fit_and_format():
    inputs = cache_inputs(_spec(), "f1")
    assert inputs["frames"] == 9 and inputs["fps"] == 25 and inputs["format"] == CACHE_FORMAT
    assert inputs["fit"] and inputs["model"]["diffusersPath"] == "s3://bkt/ltx"


def test_model_fingerprint_sees_a_replaced_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vae.safetensors").write_bytes(b"x" * 10)
    paths = {"diffusersPath": str(tmp_path / "m"), "dataset": str(tmp_path / "d")}
    before = model_fingerprint(paths)
    (tmp_path / "m" / "vae.safetensors").write_bytes(b"x" * 11)
    assert model_fingerprint(paths) != before
