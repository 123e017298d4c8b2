"""Flux specifics without training: the BFL single-file transformer (model.transformerPath) and
ComfyUI's key map for the default export."""
import json

import pytest
import torch

from kubelora_trainer import lora
from kubelora_trainer.models.flux.family import FAMILY, _single_file_config, image_ids, no_embedding_warning
from kubelora_trainer.models.flux.keys import bfl_module, to_bfl
from kubelora_trainer.spec import parse_spec
from kubelora_trainer.models.flux.tiny import write_bfl_transformer


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


def _random_lora(tr, targets, rank=4, seed=0):
    import re
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g))
            for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(targets, n)}


ALL_LINEARS = r"(transformer_blocks|single_transformer_blocks)\.\d+\..*|proj_out|x_embedder|context_embedder|norm_out\.linear"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui"])
def test_flux_formats_round_trip_exactly_and_land_on_bfl_weights(tiny_flux_dir, fmt):
    """diffusers -> fmt -> diffusers is exact (fused q/k/v[/mlp] split back at the original rank,
    the final modulation's swapped halves swapped back); the kohya stems are ComfyUI's
    `lora_unet_` + BFL weight name with dots as underscores, the comfyui names BFL weight names."""
    from diffusers import FluxTransformer2DModel
    tr = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    bfl_weights = {k.removesuffix(".weight") for k in to_bfl(tr.state_dict()) if k.endswith(".weight")}
    mods = _random_lora(tr, ALL_LINEARS)
    assert "norm_out.linear" in mods and "single_transformer_blocks.0.proj_mlp" in mods
    sd = FAMILY.export({"transformer": mods}, 2.0, fmt)
    back, scale = FAMILY.parse(sd, fmt)
    assert back["transformer"].keys() == mods.keys()
    for m, (a, b) in mods.items():
        ga, gb = back["transformer"][m]
        assert torch.equal(ga, a), m
        torch.testing.assert_close(gb * scale, b * 2.0, rtol=0, atol=0, msg=m)
    if fmt == "comfyui":
        names = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in sd}
        assert names <= bfl_weights, names - bfl_weights
    if fmt == "kohya":
        stems = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in sd}
        comfy_stems = {"lora_unet_" + w.replace(".", "_") for w in bfl_weights}
        assert stems <= comfy_stems, stems - comfy_stems
        assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 2.0 * 12  # fused rank 3 x 4


def test_flux_kohya_file_converts_in_diffusers_to_our_diffusers_file():
    """diffusers' own Kohya-Flux converter (it hard-codes Flux.1's widths, so this uses real-width
    LoRA tensors for one double and one single block) yields the same update per module as the
    diffusers-format export: the file loads in diffusers with the trained effect."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    g = torch.Generator().manual_seed(0)
    h, r = 3072, 2
    mods = {}
    for m, out in [("transformer_blocks.0.attn.to_q", h), ("transformer_blocks.0.attn.to_k", h),
                   ("transformer_blocks.0.attn.to_v", h), ("transformer_blocks.0.ff.net.2", h),
                   ("single_transformer_blocks.0.attn.to_q", h), ("single_transformer_blocks.0.attn.to_k", h),
                   ("single_transformer_blocks.0.attn.to_v", h), ("single_transformer_blocks.0.proj_mlp", 4 * h)]:
        inp = 4 * h if m.endswith("ff.net.2") else h
        mods[m] = (torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g))
    converted = _convert_kohya_flux_lora_to_diffusers(FAMILY.export({"transformer": mods}, 2.0, "kohya"))
    for m, (a, b) in mods.items():
        ca, cb = converted[f"transformer.{m}.lora_A.weight"], converted[f"transformer.{m}.lora_B.weight"]
        torch.testing.assert_close(cb.float() @ ca.float(), 2.0 * b @ a, rtol=1e-4, atol=1e-3, msg=m)


def test_flux_diffusers_file_loads_in_the_pipeline(tiny_flux_dir):
    from diffusers import FluxPipeline
    tr = FluxPipeline.from_pretrained(tiny_flux_dir).transformer
    mods = _random_lora(tr, FAMILY.lora_targets()["transformer"])
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(FAMILY.export({"transformer": mods}, 2.0, "diffusers"))
    assert sum(1 for k, _ in pipe.transformer.named_parameters() if "lora_A" in k) == len(mods)


def test_the_files_metadata_names_every_trained_size():
    """kubelora.resolution is what was trained: a fixed size, or every area of the dataset and its
    sources (it said 512x512, the unused default, for any dataset.resolutions); kohya's single
    ss_resolution is the largest."""
    from kubelora_trainer.export import metadata
    from kubelora_trainer.spec import parse_spec
    base = {"model": {"type": "flux", "diffusersPath": "s3://mdl/flux"}, "output": {"uri": "s3://out/x"}}

    def sizes(dataset, fmt="kohya"):
        meta = metadata(parse_spec({**base, "dataset": dataset}), "j", fmt)
        return meta["kubelora.resolution"], meta.get("ss_resolution")
    assert sizes({"uri": "s3://data/x"}) == ("512x512", "(512, 512)")
    assert sizes({"uri": "s3://data/x", "resolutions": [1024, 512], "enableArBucket": True}) == \
        ("512x512,1024x1024", "(1024, 1024)")
    assert sizes({"sources": [{"uri": "s3://data/a"}, {"uri": "s3://data/b", "resolutions": [768]}],
                  "resolutions": [512]}, "diffusers") == ("512x512,768x768", None)
    assert sizes({"uri": "s3://data/x", "width": 768, "height": 512}) == ("768x512", "(768, 512)")


def test_the_base_model_is_the_trained_denoisers_weights():
    from kubelora_trainer.export import base_model
    from kubelora_trainer.spec import parse_spec

    def base(model):
        return base_model(parse_spec({"model": model, "dataset": {"uri": "s3://data/x"},
                                      "output": {"uri": "s3://out/x"}}).model)
    assert base({"type": "flux", "diffusersPath": "s3://mdl/flux-dev"}) == "s3://mdl/flux-dev"
    # a fine-tuned transformer trained on the dev folder's encoders: the LoRA belongs to the fine-tune
    assert base({"type": "flux", "diffusersPath": "s3://mdl/flux-dev",
                 "transformerPath": "s3://mdl/my-finetune.safetensors"}) == "s3://mdl/my-finetune.safetensors"


def test_kohya_file_names_the_top_level_modules_diffusers_drops_and_diffusers_parse_refuses_others():
    """diffusers' Kohya-Flux converter returns img_in/txt_in/time_in/final_layer LoRAs without the
    transformer. prefix, so its loader drops them (measured on its converter): export names them.
    A diffusers-format file of another family's modules is refused, naming them."""
    from diffusers import FluxPipeline
    g = torch.Generator().manual_seed(0)
    h = 3072
    mods = {"x_embedder": (torch.randn(2, 64, generator=g), torch.randn(h, 2, generator=g)),
            "norm_out.linear": (torch.randn(2, h, generator=g), torch.randn(2 * h, 2, generator=g)),
            "transformer_blocks.0.attn.to_out.0": (torch.randn(2, h, generator=g), torch.randn(h, 2, generator=g))}
    sd = FluxPipeline.lora_state_dict(FAMILY.export({"transformer": mods}, 1.0, "kohya"))
    dropped = {m for m in mods if f"transformer.{m}.lora_A.weight" not in sd}
    assert dropped == {"x_embedder", "norm_out.linear"}
    gaps = FAMILY.export_gaps({"transformer": mods}, "kohya")
    assert len(gaps) == 1 and "diffusers skips" in gaps[0] and "norm_out.linear, x_embedder;" in gaps[0]
    assert "to_out" not in gaps[0]
    assert FAMILY.export_gaps({"transformer": mods}, "diffusers") == FAMILY.export_gaps({"transformer": mods}, "comfyui") == []
    with pytest.raises(ValueError, match=r"not modules of the Flux transformer: transformer_blocks\.0\.attn1\.to_q"):
        FAMILY.parse({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8),
                      "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 2)}, "diffusers")


def test_output_dtype_casts_the_lora_files_floats_only():
    from kubelora_trainer.export import cast
    tensors = {"a.lora_A.weight": torch.randn(4, 8), "a.alpha": torch.tensor(381.0), "ids": torch.arange(3)}
    half = cast(tensors, "bfloat16")
    # a fused layer's alpha (3 x 127) stays exact: bfloat16 would store 380
    assert half["a.lora_A.weight"].dtype == torch.bfloat16 and half["a.alpha"].item() == 381.0
    assert half["ids"].dtype == torch.int64 and cast(tensors, "float32")["a.lora_A.weight"] is tensors["a.lora_A.weight"]
    with pytest.raises(Exception, match="output.dtype: the dtype of LoRA files"):
        parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                    "adapter": {"type": "full"}, "output": {"uri": "s3://bkt/out", "dtype": "bfloat16"}})


def test_image_ids_are_diffusers_ids_made_on_the_device():
    """flux.family.image_ids: the same position ids as FluxPipeline._prepare_latent_image_ids (which
    builds them on the CPU and copies, a host sync per training forward on a GPU), any grid and dtype."""
    from diffusers import FluxPipeline

    for h, w in ((1, 1), (3, 5), (64, 48)):
        for dtype in (torch.float32, torch.bfloat16):
            want = FluxPipeline._prepare_latent_image_ids(2, h, w, torch.device("cpu"), dtype)
            got = image_ids(h, w, torch.device("cpu"), dtype)
            assert got.dtype == want.dtype and torch.equal(got, want), (h, w, dtype)


def test_a_guidance_setting_on_a_transformer_without_the_embedding_is_warned_about():
    """FLUX.1-schnell has no guidance embedding: model.guidance (or the bypass) would change nothing."""
    def spec(**model):
        return parse_spec({"model": {"type": "flux", "diffusersPath": "/m", **model}, "dataset": {"uri": "/d"},
                           "output": {"uri": "/o"}}).model
    assert no_embedding_warning(spec(guidance=3.5), True) is None
    assert no_embedding_warning(spec(), False) is None
    assert no_embedding_warning(spec(guidance=3.5), False).startswith(
        "[model] warning: model.guidance: this transformer has no guidance embedding")
    assert "model.bypassGuidanceEmbedding: this transformer" in no_embedding_warning(spec(bypassGuidanceEmbedding=True), False)
