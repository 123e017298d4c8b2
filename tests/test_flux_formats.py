"""Flux specifics without training: the BFL single-file transformer (model.transformerPath) and
ComfyUI's key map for the default export."""
import json

import pytest
import torch

from kubelora_trainer import lora
from kubelora_trainer.models.flux import FAMILY, _single_file_config
from kubelora_trainer.models.flux_keys import bfl_module, to_bfl
from kubelora_trainer.spec import parse_spec
from kubelora_trainer.tiny import write_bfl_transformer


def _spec(**model):
    return parse_spec({"model": {"type": "flux", "diffusersPath": "/m/flux", "dtype": "float32", **model},
                       "dataset": {"uri": "/d"}, "output": {"uri": "/o"}})


def test_transformer_path_loads_the_bfl_file_into_the_same_network(tiny_flux_dir, tmp_path):
    from diffusers import FluxTransformer2DModel
    bfl = write_bfl_transformer(tiny_flux_dir, tmp_path / "flux-tiny-bfl.safetensors")
    from safetensors import safe_open
    with safe_open(str(bfl), "pt") as f:
        keys = set(f.keys())
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.1.linear1.weight" in keys
    comps = FAMILY.load(_spec(transformerPath="/m/bfl.safetensors").model,
                        {"diffusersPath": str(tiny_flux_dir), "transformerPath": str(bfl)}, torch.device("cpu"))
    got = comps.trainable["transformer"].state_dict()
    want = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_transformer_path_of_the_wrong_kind_is_refused(tiny_flux_dir, tmp_path):
    from safetensors.torch import save_file
    from kubelora_trainer.models.base import ModelError
    wrong = tmp_path / "sdxl-unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(wrong))
    with pytest.raises(ModelError, match="model.transformerPath: sdxl-unet.safetensors is not a Flux transformer in the BFL layout"):
        FAMILY.load(_spec(transformerPath="/m/x.safetensors").model,
                    {"diffusersPath": str(tiny_flux_dir), "transformerPath": str(wrong)}, torch.device("cpu"))


def test_shipped_single_file_config_chosen_by_guidance_keys(tmp_path):
    from safetensors.torch import save_file
    for name, keys, expect in (("dev", ["guidance_in.in_layer.weight", "img_in.weight"], "flux-dev"),
                               ("schnell", ["img_in.weight"], "flux-schnell")):
        f = tmp_path / f"{name}.safetensors"
        save_file({k: torch.zeros(1) for k in keys}, str(f))
        cfg, sub = _single_file_config(tmp_path / "no-diffusers-folder", f)
        assert cfg.endswith(expect) and sub == "transformer"
        assert json.loads((__import__("pathlib").Path(cfg) / sub / "config.json").read_text())["num_layers"] == 19


def test_every_default_export_key_is_applied_by_comfyui(tiny_flux_dir):
    """ComfyUI maps a Diffusers-format Flux LoRA key `transformer.<module>` through its Flux
    diffusers->BFL table (comfy/utils.py flux_to_diffusers, reimplemented in flux_keys.py from
    reading it) and applies it to that BFL weight (a row range of the fused ones). Every key we
    export must land on a weight that exists in the BFL checkpoint."""
    from diffusers import FluxTransformer2DModel
    tr = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    bfl_keys = set(to_bfl(tr.state_dict()))
    lora.inject(tr, lora.lora_config(_spec().adapter, FAMILY.lora_targets()["transformer"]), seed=0)
    exported = FAMILY.export({"transformer": lora.gather(tr)}, 1.0, "diffusers")
    modules = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in exported}
    assert len(modules) == 2 * 12 + 2 * 5  # 12 linears per double block, 5 per single block
    for m in sorted(modules):
        hit = bfl_module(m)
        assert hit is not None, f"ComfyUI has no mapping for {m}"
        assert f"{hit[0]}.weight" in bfl_keys, (m, hit)
    with pytest.raises(KeyError):
        to_bfl({"not_a_flux_module.weight": torch.zeros(1)})


def test_bypass_guidance_embedding_ignores_the_guidance_embedder(tiny_flux_dir):
    """model.bypassGuidanceEmbedding: the loss runs without guidance, and the guidance embedder's
    weights no longer affect the output."""
    spec = _spec(bypassGuidanceEmbedding=True)
    comps = FAMILY.load(spec.model, {"diffusersPath": str(tiny_flux_dir)}, torch.device("cpu"))
    batch = {"latents": torch.randn(1, 4, 16, 16), "prompt_embeds": torch.randn(1, 12, 32), "pooled": torch.randn(1, 32)}

    def loss():
        return FAMILY.loss(comps, batch, spec.model, spec.training, torch.Generator().manual_seed(0))
    before = loss()
    with torch.no_grad():
        for p in comps.trainable["transformer"].time_text_embed.guidance_embedder.parameters():
            p.add_(1.0)
    assert torch.isfinite(before) and torch.equal(loss(), before)
    plain = FAMILY.load(_spec().model, {"diffusersPath": str(tiny_flux_dir)}, torch.device("cpu"))
    assert not torch.equal(FAMILY.loss(plain, batch, _spec().model, spec.training, torch.Generator().manual_seed(0)), before)
