"""adapter.initFrom: a run's LoRA starts from a file (diffusion-pipe's init_from_existing).

The file is written by the family's own exporter in every format it has (what this or another
trainer's export gives a user), read back by lora_init through the parsers, and copied into a fresh
run's injected layers: the update each module makes must be the file's, whatever the two runs'
alpha. Then the refusals, each naming the field and the fix."""
import pytest
import torch
from safetensors.torch import save_file

from kubelora_trainer import adapters, dist, lora, lora_init
from kubelora_trainer.families import RULES
from kubelora_trainer.models.base import Components
from kubelora_trainer.models.flux.family import FAMILY
from kubelora_trainer.models.flux.tiny import TINY_TRANSFORMER
from kubelora_trainer.spec import SpecError, parse_spec

CPU = dist.DistEnv(0, 1, 0, torch.device("cpu"))


def _spec(**adapter):
    return parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                       "adapter": {"rank": 4, **adapter}, "output": {"uri": "/o"}})


def _comps():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return Components(trainable={"transformer": FluxTransformer2DModel(**TINY_TRANSFORMER)}, info={})


def _deltas(comps, scale):
    return {m: scale * b @ a for m, (a, b) in lora.gather(comps.trainable["transformer"]).items()}


@pytest.fixture(scope="module")
def trained():
    """A 'trained' LoRA: rank 4, alpha 8 (scale 2), random A and B; its per-module updates."""
    spec = _spec(alpha=8)
    comps = _comps()
    adapters.prepare(comps, FAMILY, spec, CPU)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in comps.trainable["transformer"].named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return spec, comps, _deltas(comps, spec.adapter.scale)


@pytest.mark.parametrize("fmt", RULES["flux"].formats)
def test_a_run_starts_from_an_exported_lora_in_every_format(trained, fmt, tmp_path, capsys):
    spec, comps, want = trained
    tensors = FAMILY.export(adapters.gather(comps), spec.adapter.scale, fmt)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "old.safetensors"))
    init = lora_init.read(tmp_path, "flux")  # the folder holding one file, as diffusion-pipe's option
    assert init.path.name == "old.safetensors" and init.fmt == fmt
    fresh, run = _comps(), _spec()  # alpha unset: scale 1, B rescaled to keep the file's update
    adapters.prepare(fresh, FAMILY, run, CPU, init)
    got = _deltas(fresh, run.adapter.scale)
    loaded = [m for m in got if got[m].abs().sum() > 0]
    assert loaded and set(loaded) <= set(want)
    for m in loaded:
        torch.testing.assert_close(got[m], want[m], rtol=2e-3, atol=2e-4)  # the file's dtype: bfloat16 or float32
    out = capsys.readouterr().out
    assert f"started from old.safetensors ({fmt} format" in out and f"{len(loaded)} modules" in out
    if len(loaded) < len(want):  # a format that carries fewer modules: the rest start from zero, said so
        assert f"{len(want) - len(loaded)} LoRA targets are not in it and start from zero" in out


def _file(trained, tmp_path, **meta):
    spec, comps, _ = trained
    tensors = FAMILY.export(adapters.gather(comps), spec.adapter.scale, "diffusers")
    path = tmp_path / "l.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    return path


def test_a_file_it_cannot_start_from_is_refused_naming_the_fix(trained, tmp_path):
    path = _file(trained, tmp_path)
    init = lora_init.read(path, "flux")
    with pytest.raises(lora_init.InitError, match=r"adapter.initFrom: l.safetensors has rank 4; set adapter.rank to 4"):
        adapters.prepare(_comps(), FAMILY, _spec(rank=8), CPU, init)
    with pytest.raises(lora_init.InitError, match=r"adapter.initFrom: \d+ of its \d+ transformer modules are not LoRA "
                                                  r"targets of this run: .*add them to adapter.targetModules"):
        adapters.prepare(_comps(), FAMILY, _spec(targetModules=["attn.to_q"]), CPU, init)
    other = _file(trained, tmp_path / "sdxl", **{"kubelora.model_type": "sdxl"})
    with pytest.raises(lora_init.InitError, match="is a sdxl LoRA .*not a flux one"):
        lora_init.read(other, "flux")
    junk = tmp_path / "junk" / "x.safetensors"
    junk.parent.mkdir()
    save_file({"a.weight": torch.zeros(2, 2)}, str(junk))
    with pytest.raises(lora_init.InitError, match="is not a flux LoRA in any of its formats"):
        lora_init.read(junk.parent, "flux")
    save_file({"a.weight": torch.zeros(2, 2)}, str(junk.parent / "y.safetensors"))
    with pytest.raises(lora_init.InitError, match=r"holds 2 .safetensors files \(x.safetensors, y.safetensors\); "
                                                  "give one LoRA file"):
        lora_init.read(junk.parent, "flux")
    (junk.parent / "manifest.json").write_text("{}")  # a run's output.uri holds its LoRA in several formats
    with pytest.raises(lora_init.InitError, match="it is a run's output folder: give one of its LoRA files"):
        lora_init.read(junk.parent, "flux")
    with pytest.raises(lora_init.InitError, match="holds no .safetensors file"):
        lora_init.read(tmp_path / "missing", "flux")
    with pytest.raises(SpecError, match="adapter.initFrom: applies to adapter.type lora only"):
        parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                    "adapter": {"type": "full", "initFrom": str(path)}, "output": {"uri": "/o"}})


def test_the_file_is_staged_and_checked_as_an_input(tmp_path):
    from kubelora_trainer.train import spec_field, stage_uris
    spec = _spec(initFrom="s3://loras/runs/a/lora.safetensors")
    assert stage_uris(spec)["adapter.initFrom"] == "s3://loras/runs/a/lora.safetensors"
    assert "adapter.initFrom" not in stage_uris(spec, resume=True)  # a resume takes the checkpoint's, reads no file
    assert spec_field(spec, "adapter.initFrom") == "adapter.initFrom"
    assert spec.input_fields() == {"model.diffusersPath": "/m", "adapter.initFrom": "s3://loras/runs/a/lora.safetensors"}
    with pytest.raises(SpecError, match="adapter.initFrom"):
        _spec(initFrom="loras/a.safetensors")  # neither s3:// nor an absolute path


def test_a_target_entry_that_adapts_nothing_is_refused_not_dropped():
    """peft drops an adapter.targetModules entry that matches nothing as long as another entry
    matches: a typo would train fewer layers than asked, without a word."""
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp"]
    assert lora.unmatched(["attn.to_q", "to_k", r"single_.*\.proj_mlp"], names) == []
    assert lora.unmatched(["attn.to_qq", "to_q", r"single_.*\.proj_mlpx", "attn"], names) == [
        (0, "attn.to_qq"), (2, r"single_.*\.proj_mlpx"), (3, "attn")]   # a suffix is a whole name part
    with pytest.raises(lora.AdapterError, match=r"adapter.targetModules\[1\] \('attn.to_qq'\) matches no linear layer "
                                                r"of the transformer: remove or fix it"):
        adapters.prepare(_comps(), FAMILY, _spec(targetModules=["attn.to_q", "attn.to_qq"]), CPU)
    ad = adapters.prepare(_comps(), FAMILY, _spec(targetModules=["attn.to_q", r".*\.ff\.net\.2"]), CPU)
    assert ad.n_trainable > 0


def test_a_suffix_that_also_adapts_modules_outside_the_blocks_is_said(capsys):
    """A suffix matches any module ending so (peft's rule, as diffusers'): `linear` also takes the
    final layer's norm_out.linear. Trained as asked, but said (it was only counted)."""
    comps = _comps()
    adapters.prepare(comps, FAMILY, _spec(targetModules=["attn.to_q", "linear"]), CPU)
    out = capsys.readouterr().out
    assert "[model] adapter.targetModules also adapts" in out and "norm_out.linear" in out, out
    adapted = lora.adapted(comps.trainable["transformer"])
    outside = adapters.outside_blocks(adapted, FAMILY, "transformer", comps.trainable["transformer"])
    assert "norm_out.linear" in outside and not any(".attn.to_q" in n for n in outside)
    adapters.prepare(_comps(), FAMILY, _spec(targetModules=["attn.to_q"]), CPU)
    assert "also adapts" not in capsys.readouterr().out
