"""The native single file of a full fine-tune (family.export_full) for SDXL, LTX-Video,
HunyuanVideo and Cosmos, without a training run: a tiny denoiser with every weight perturbed
is written through export_full as the trainer writes it, read back the way the community reads
the released checkpoints (diffusers' from_single_file with a local config, offline; where that
cannot load the file, diffusers' own conversion function, and the trainer's own loader), and every
tensor must come back exactly. Flux's file is checked by test_full_finetune.py after a real run."""

import pytest
import torch

from kubelora_trainer.models import get_family


def _perturbed(model):
    """The model with every parameter and buffer moved off its initial values (zero-initialised
    layers included), so a misplaced or swapped tensor cannot pass."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return model


def _write(family_name: str, model, tmp_path):
    """(file path, its tensors): the model's state dict through the family's export_full, saved
    as export_full.py saves it."""
    from safetensors.torch import load_file, save_file
    family = get_family(family_name)
    assert family.full_file  # what the file holds, for the log and manifest.json
    path = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in family.export_full(model.state_dict()).items()}, str(path))
    return path, load_file(str(path))


def _assert_same(loaded: dict, want: dict):
    assert set(loaded) == set(want), (sorted(set(want) - set(loaded))[:5], sorted(set(loaded) - set(want))[:5])
    for k, v in want.items():
        assert torch.equal(loaded[k].to(v.dtype), v), k


def _from_single_file(cls, path, model, tmp_path):
    """cls.from_single_file with the tiny model's own config from a local folder: no network."""
    cfg = tmp_path / "config"
    model.save_config(cfg)
    return cls.from_single_file(str(path), config=str(cfg), local_files_only=True, torch_dtype=torch.float32)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_sdxl_unet_in_the_original_layout_loads_with_from_single_file(tmp_path):
    from diffusers import UNet2DConditionModel
    from kubelora_trainer.models.sdxl.tiny import TINY_UNET

    torch.manual_seed(0)
    unet = _perturbed(UNet2DConditionModel(**TINY_UNET))
    path, tensors = _write("sdxl", unet, tmp_path)
    # the UNet part of an SDXL checkpoint, under its original names
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
            "model.diffusion_model.out.2.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
            "model.diffusion_model.output_blocks.2.2.conv.weight"} <= set(tensors)
    back = _from_single_file(UNet2DConditionModel, path, unet, tmp_path)
    _assert_same(back.state_dict(), unet.state_dict())


def test_ltx_video_transformer_in_the_original_layout_loads_with_from_single_file(tmp_path):
    from diffusers import LTXVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from kubelora_trainer.models.ltx_video.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    tr = _perturbed(LTXVideoTransformer3DModel(**TINY_TRANSFORMER))
    path, tensors = _write("ltx-video", tr, tmp_path)
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    assert {"model.diffusion_model.patchify_proj.weight", "model.diffusion_model.adaln_single.linear.weight",
            "model.diffusion_model.transformer_blocks.0.attn1.q_norm.weight"} <= set(tensors)
    assert infer_diffusers_model_type(tensors) == "ltx-video"   # diffusers recognises the file
    back = _from_single_file(LTXVideoTransformer3DModel, path, tr, tmp_path)
    _assert_same(back.state_dict(), tr.state_dict())


def test_hunyuan_video_transformer_in_the_original_layout_converts_back_exactly(tmp_path):
    """diffusers' from_single_file splits single_blocks.N.linear1 at the released width (3072,
    hard-coded), so it cannot load a tiny file; its converter, after that one split done at the
    file's real width (keys.original_to_diffusers), and the trainer's model.transformerPath
    loader must give every tensor back."""
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from kubelora_trainer.models.hunyuan_video import keys
    from kubelora_trainer.models.hunyuan_video.family import load_transformer
    from kubelora_trainer.models.hunyuan_video.tiny import TRANSFORMER

    torch.manual_seed(0)
    tr = _perturbed(HunyuanVideoTransformer3DModel(**TRANSFORMER))
    path, tensors = _write("hunyuan-video", tr, tmp_path)
    assert keys.identify(tensors) == "original"
    assert {"double_blocks.0.img_attn_qkv.weight", "single_blocks.0.linear1.weight",
            "final_layer.adaLN_modulation.1.weight"} <= set(tensors)
    assert infer_diffusers_model_type(tensors) == "hunyuan-video"
    _assert_same(keys.original_to_diffusers(dict(tensors)), tr.state_dict())
    _assert_same(load_transformer(path, torch.float32).state_dict(), tr.state_dict())


def test_cosmos_transformer_in_the_original_layout_converts_back_exactly(tmp_path):
    """diffusers 0.42.1's Cosmos conversion empties the checkpoint before testing it for a
    Cosmos 1.0 key, so from_single_file applies its 2.0 table to every 1.0 file (the released
    ones too); its 1.0 table, run on a dict that keeps its keys, and the trainer's
    model.transformerPath loader must give every tensor back."""
    from diffusers import CosmosTransformer3DModel
    from diffusers.loaders.single_file_utils import (convert_cosmos_transformer_checkpoint_to_diffusers,
                                                     infer_diffusers_model_type)
    from kubelora_trainer.models.cosmos.family import load_transformer
    from kubelora_trainer.models.cosmos.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    tr = _perturbed(CosmosTransformer3DModel(**TINY_TRANSFORMER))
    path, tensors = _write("cosmos", tr, tmp_path)
    assert all(k.startswith("net.") for k in tensors)
    assert {"net.x_embedder.proj.1.weight", "net.blocks.block1.blocks.0.block.attn.to_q.0.weight",
            "net.extra_pos_embedder.pos_emb_h", "net.final_layer.linear.weight"} <= set(tensors)
    assert infer_diffusers_model_type(tensors).startswith("cosmos-1.0-t2w")

    class KeepKeys(dict):
        def pop(self, k, *default):
            return self[k]
    _assert_same(convert_cosmos_transformer_checkpoint_to_diffusers(KeepKeys(tensors)), tr.state_dict())
    _assert_same(load_transformer(path, torch.float32).state_dict(), tr.state_dict())


def test_gathered_weights_own_their_storage(tmp_path):
    """A weight split from a fused one at load (HunyuanVideo's qkv read from an original-layout
    file) is a view of the fused tensor; on CPU in float32 the gathered state dict must still be
    writable as a diffusers folder and a single file (a full HunyuanVideo fine-tune on CPU failed
    at export with 'None is covering the entire storage')."""
    from safetensors.torch import load_file, save_file
    from kubelora_trainer.adapters import gather_full
    from kubelora_trainer.export_full import write_diffusers_folder
    from kubelora_trainer.models.base import Components
    from diffusers import ModelMixin, ConfigMixin

    class Split(ModelMixin, ConfigMixin):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)

    model = Split()
    fused = torch.randn(8, 4)
    model.q.weight.data, model.k.weight.data = fused.chunk(2)
    sd = gather_full(Components(trainable={"transformer": model}), torch.float32, keep=True)
    write_diffusers_folder(model, sd, tmp_path / "transformer")
    save_file(sd, str(tmp_path / "single.safetensors"))
    back = load_file(str(tmp_path / "single.safetensors"))
    assert torch.equal(back["q.weight"], fused[:4]) and torch.equal(back["k.weight"], fused[4:])


@pytest.mark.parametrize("causal", [True, False])
def test_ltx_video_single_file_says_how_its_frames_are_positioned(tmp_path, causal):
    """ComfyUI builds LTXVModel from the file's `config` header (model_detection: the "transformer"
    entry of json.loads(metadata["config"])), and without it positions frames uniformly: a 0.9.5+
    model trained causal would run unlike its training. The file export_full writes (to a local
    output) carries it beside kubelora's own keys."""
    import json
    from types import SimpleNamespace
    from diffusers import LTXVideoTransformer3DModel
    from safetensors import safe_open
    from kubelora_trainer import export_full
    from kubelora_trainer.models.ltx_video.tiny import TINY_TRANSFORMER
    from kubelora_trainer.spec import parse_spec
    from kubelora_trainer.storage import S3Settings
    tr = LTXVideoTransformer3DModel(**TINY_TRANSFORMER)
    spec = parse_spec({"model": {"type": "ltx-video", "diffusersPath": "/m"}, "adapter": {"type": "full"},
                       "dataset": {"uri": "/d", "resolution": 64, "frames": 9}, "output": {"uri": str(tmp_path / "out")}})
    comps = SimpleNamespace(trainable={"transformer": tr}, denoiser=tr, info={"causal": causal})
    art = export_full.export_and_upload(spec, "job", get_family("ltx-video"), comps, tr.state_dict(), {}, {},
                                        S3Settings(), tmp_path / "work")
    with safe_open(str(tmp_path / "out" / art["file"]), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]).get("transformer", {}) == {"causal_temporal_positioning": causal}
    assert meta["kubelora.adapter_type"] == "full"
