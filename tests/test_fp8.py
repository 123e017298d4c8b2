"""model.transformerDtype float8: frozen base linears stored once in e4m3 and run as fp8 GEMMs.

The same code runs here (torch._scaled_mm has a CPU kernel) as on a GPU; what cannot be shown on
CPU is the speed (bench/gpu/lora_step.py, docs/benchmarks.md)."""
import importlib

import pytest
import torch
from torch import nn

from kubelora_trainer import adapters, dist, fp8
from kubelora_trainer.families import RULES
from kubelora_trainer.models import FAMILIES
from kubelora_trainer.models.base import Components
from kubelora_trainer.spec import SpecError, ignored_settings, parse_spec

CPU = torch.device("cpu")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_quantize_to_e4m3_with_one_scale_each():
    t = torch.randn(8, 64) * torch.logspace(-3, 3, 8).unsqueeze(1)  # rows 6 decades apart
    t[3] = 0
    t8, s = fp8.quantize_rows(t)
    assert t8.dtype == torch.float8_e4m3fn and s.shape == (8, 1)
    assert s[3].item() == 1.0 and t8[3].float().abs().sum() == 0
    back = fp8.dequantize(t8, s, torch.float32)
    for r in (0, 7):  # per-row scales keep small rows as precise as large ones
        assert rel(back[r], t[r]) < 0.05
    assert t8.float().abs().amax() == fp8.E4M3_MAX


@pytest.mark.parametrize("compute,tol", [("fp8", 0.06), ("fp8_transposed", 0.06), ("dequant", 0.04)])
def test_a_float8_linear_matches_the_linear_and_gives_only_the_input_gradient(compute, tol):
    torch.manual_seed(0)
    lin = nn.Linear(96, 160).requires_grad_(False)
    f = fp8.Float8Linear(lin, torch.float32, compute)
    x = torch.randn(3, 40, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = f(x)
    (y * torch.linspace(-1, 1, 160)).sum().backward()
    g = x.grad.clone()
    x.grad = None
    yr = lin(x)
    (yr * torch.linspace(-1, 1, 160)).sum().backward()
    assert rel(y, yr) < tol and rel(g, x.grad) < tol
    assert y.shape == yr.shape and y.dtype == torch.float32
    # nothing of the input is kept for backward: only the stored weight and its scales
    stored = {f.weight8.data_ptr(), f.scale.data_ptr()} | ({f.weight8_t.data_ptr()} if f.weight8_t is not None else set())
    assert {t.data_ptr() for t in saved if t is not None} <= stored
    assert not any(p.requires_grad for p in f.parameters())
    assert f.weight8.numel() * f.weight8.element_size() == lin.weight.numel()  # one byte per weight
    if compute == "fp8_transposed":  # the backward's layout stored: a [K, N] row-major copy
        assert f.weight8_t.shape == (96, 160) and f.weight8_t.is_contiguous()
        assert torch.equal(f.weight8_t.t().float(), f.weight8.float())


def test_under_autocast_the_output_is_in_the_autocast_dtype():
    f = fp8.Float8Linear(nn.Linear(32, 48), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f(torch.randn(4, 32)).dtype == torch.bfloat16
    assert f(torch.randn(4, 32)).dtype == torch.bfloat16  # compute dtype outside autocast


@pytest.mark.parametrize("path,dims,want,cuda,expected", [
    ("transformer_blocks.0.attn.to_q", (64, 64), "fp8", True, ("fp8", "fp8")),
    ("transformer_blocks.0.norm1.linear", (64, 384), "fp8", True, ("dequant", "sensitive")),
    ("transformer_blocks.0.norm1_context.linear", (64, 384), "fp8", False, ("dequant", "sensitive")),
    ("down_blocks.1.resnets.0.time_emb_proj", (64, 64), "fp8", True, ("dequant", "sensitive")),
    ("transformer_blocks.0.ff.net.0.proj", (40, 64), "fp8", True, ("dequant", "unaligned")),
    ("transformer_blocks.0.ff.net.0.proj", (40, 64), "fp8", False, ("fp8", "fp8")),  # CPU needs no alignment
    ("transformer_blocks.0.attn.to_q", (64, 64), "dequant", True, ("dequant", "dequant")),
    ("transformer_blocks.0.attn.to_q", (64, 64), "fp8_transposed", True, ("fp8_transposed", "fp8")),
    ("transformer_blocks.0.norm1.linear", (64, 384), "fp8_transposed", True, ("dequant", "sensitive")),
])
def test_which_linears_run_as_fp8_gemms(path, dims, want, cuda, expected):
    lin = nn.Linear(*dims, device="meta")
    assert fp8.compute_mode(path, lin, RULES["flux"].fp8_sensitive, want, cuda) == expected


def tiny_denoiser(family: str) -> tuple[nn.Module, object]:
    import diffusers
    pkg = FAMILIES[family]
    tiny = importlib.import_module(f"kubelora_trainer.models.{pkg}.tiny")
    fam = importlib.import_module(f"kubelora_trainer.models.{pkg}.family").FAMILY
    cls, cfg = {"flux": ("FluxTransformer2DModel", "TINY_TRANSFORMER"),
                "ltx-video": ("LTXVideoTransformer3DModel", "TINY_TRANSFORMER"),
                "hunyuan-video": ("HunyuanVideoTransformer3DModel", "TRANSFORMER"),
                "cosmos": ("CosmosTransformer3DModel", "TINY_TRANSFORMER"),
                "sdxl": ("UNet2DConditionModel", "TINY_UNET")}[family]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**getattr(tiny, cfg)).to(torch.bfloat16).requires_grad_(False), fam


def spec_for(family: str, **model):
    return parse_spec({"model": {"type": family, "diffusersPath": "/m", "checkpointPath": None, **model},
                       "dataset": {"uri": "/d"}, "adapter": {"rank": 4}, "output": {"uri": "/o"}})


def linear_weights(blocks, cls):
    return [m for bl in blocks for m in bl.modules() if type(m) is cls]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float8_storage_halves_the_block_weights_of_every_family(family):
    model, fam = tiny_denoiser(family)
    blocks = fam.blocks("unet" if family == "sdxl" else "transformer", model)
    before = sum(m.weight.numel() * m.weight.element_size() for m in linear_weights(blocks, nn.Linear))
    conv, summary = fp8.convert(model, blocks, compute_dtype=torch.bfloat16, device=CPU,
                                sensitive=RULES[family].fp8_sensitive)
    assert conv.fp8, summary
    assert linear_weights(blocks, nn.Linear) == [], f"{family}: linears left in model.dtype inside the blocks"
    f8 = linear_weights(blocks, fp8.Float8Linear)
    assert 2 * sum(m.weight8.numel() * m.weight8.element_size() for m in f8) == before
    # plus one fp32 scale per output row: 4 / in_features of the fp8 bytes (0.1% at real widths)
    assert all(m.scale.numel() == m.out_features and m.scale.dtype == torch.float32 for m in f8)


def test_a_flux_dev_shaped_transformer_needs_half_the_memory():
    """The real Flux.1-dev config (11.9B) on the meta device: bytes, not timings."""
    from pathlib import Path

    from diffusers import FluxTransformer2DModel

    from kubelora_trainer.models.flux.family import FAMILY
    cfg = FluxTransformer2DModel.load_config(Path(fp8.__file__).parent / "models/flux/configs/flux-dev/transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(cfg).to(torch.bfloat16).requires_grad_(False)
    size = lambda: sum(p.numel() * p.element_size() for p in model.parameters())  # noqa: E731
    before = size()
    fp8.convert(model, FAMILY.blocks("transformer", model), compute_dtype=torch.bfloat16,
                device=torch.device("meta"), sensitive=RULES["flux"].fp8_sensitive)
    assert 23.5e9 < before < 24e9 and size() < 0.51 * before


def flux_run(steps: int, **model):
    """A few LoRA steps of the tiny Flux through adapters.attach and the family's loss, on one
    fixed batch; the losses."""
    from diffusers import FluxTransformer2DModel

    from kubelora_trainer.models.flux.family import FAMILY
    from kubelora_trainer.models.flux.tiny import TINY_TRANSFORMER

    env = dist.DistEnv(0, 1, 0, CPU)
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m", "dtype": "bfloat16", **model},
                       "dataset": {"uri": "/d", "resolution": 64}, "adapter": {"rank": 8},
                       "training": {"learningRate": 1e-2}, "output": {"uri": "/o"}})
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "attention_head_dim": 16, "num_attention_heads": 4,
                                   "axes_dims_rope": (4, 6, 6)}).to(torch.bfloat16)
    comps = Components(trainable={"transformer": tr}, info={"guidance_embeds": True})
    ad = adapters.attach(comps, FAMILY, spec, env)
    opt = torch.optim.AdamW(ad.params, lr=spec.training.learningRate)
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "prompt_embeds": torch.randn(2, 8, 32, generator=g),
             "pooled": torch.randn(2, 32, generator=g)}
    losses = []
    for _ in range(steps):
        with ad.compute():
            loss = FAMILY.loss(comps, batch, spec.model, spec.training, torch.Generator().manual_seed(2))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, tr


def test_fp8_training_follows_bf16_training(capsys):
    steps = 30
    base, _ = flux_run(steps)
    f8, model = flux_run(steps, transformerDtype="float8")
    out = capsys.readouterr().out
    assert "run as fp8 GEMMs" in out
    assert any(isinstance(m, fp8.Float8Linear) and m.compute == "fp8" for m in model.modules())
    assert base[-1] < 0.85 * base[0]  # it learns (the comparison below means something)
    assert abs(f8[-1] - base[-1]) <= 0.02 * base[-1], (base, f8)
    # the stored transposed copy changes the layout the backward reads, not a single number
    f8t, _ = flux_run(steps, transformerDtype="float8", float8Compute="fp8_transposed")
    assert f8t == f8


def test_float8_compute_without_float8_storage_is_refused():
    with pytest.raises(SpecError, match="model.float8Compute: applies only with model.transformerDtype"):
        spec_for("flux", float8Compute="dequant")
    assert ignored_settings(spec_for("flux", transformerDtype="float8", float8Compute="dequant")) is None


def test_gpus_without_fp8_tensor_cores_fall_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))  # no GPU here: an A100's answer
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    mode, warning = adapters.float8_compute(None, torch.device("cuda", 0))
    assert mode == "dequant" and "A100" in warning and "model.float8Compute" in warning
    assert adapters.float8_compute(None, CPU) == ("fp8", None)
    assert adapters.float8_compute("dequant", CPU) == ("dequant", None)
    mode, warning = adapters.float8_compute("fp8_transposed", torch.device("cuda", 0))
    assert mode == "dequant" and "float8Compute fp8_transposed" in warning


def test_blocks_with_fp8_gemms_are_compiled_inside_their_checkpoint():
    """compile(checkpoint(block)) let inductor's partitioner keep the bf16 inputs of fp8 linears
    for backward on CUDA (HunyuanVideo fp8 with checkpointing held 27 GiB for backward instead of
    3.4 GiB; bench/gpu/fp8_ckpt.py, decisions.md 47), so blocks with fp8 GEMMs are compiled first
    and then wrapped; others keep torchtitan's order. The CPU compiles both correctly, so this
    checks the order and that a compiled, checkpointed fp8 block gives the eager gradient."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    def blocks(compute):
        torch.manual_seed(0)
        seq = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2))
        seq.requires_grad_(False)
        for b in seq:
            if compute:
                b[0] = fp8.Float8Linear(b[0], torch.bfloat16, compute)
        return seq

    assert dist.compile_inside_checkpoint(blocks("fp8")[0])
    assert not dist.compile_inside_checkpoint(blocks("dequant")[0])  # no fp8 GEMM: the usual order
    assert not dist.compile_inside_checkpoint(blocks(None)[0])
    x = torch.randn(2, 8, 32)
    grads = []
    for compile_blocks in (False, True):
        lists = [blocks("fp8")]
        model = nn.Sequential(*lists[0])
        ctx = dist.parallelize(model, lists, sharding="none", compute_dtype=torch.bfloat16,
                               recompute={(0, 0), (0, 1)}, compile_blocks=compile_blocks)
        wrapped = lists[0][0]
        assert isinstance(wrapped, CheckpointWrapper)
        # compiled inside: the wrapper runs eagerly around a compiled block
        assert (wrapped._compiled_call_impl is None) and ((wrapped._checkpoint_wrapped_module._compiled_call_impl
                                                            is not None) == compile_blocks)
        xi = x.clone().requires_grad_(True)
        with ctx():
            h = xi
            for b in lists[0]:
                h = b(h)
        h.float().square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0.02, atol=0.02)
    torch._dynamo.reset()


@pytest.mark.parametrize("model,offload,on_device", [({}, False, True), ({"transformerDtype": "float8"}, False, False),
                                                     ({}, True, False)], ids=["bf16", "float8", "offload"])
def test_a_float8_transformer_is_loaded_into_cpu_memory_and_quantized_onto_the_device(model, offload, on_device):
    """A float8 transformer is loaded in CPU memory and quantized onto the device one layer at a
    time (adapters.prepare): loaded on the GPU first, a 12B Flux needed its 24 GB of bf16 weights
    there beside the text encoders, so float8 did not let it fit a 24 GB card. The encoders go to
    the device either way. (No GPU here: the meta device stands in for it.)"""
    from kubelora_trainer import cache_phase
    asked = []

    class Family:
        def load(self, model_spec, paths, device, encoders=True):
            asked.append(device)
            return Components(trainable={"transformer": nn.Linear(4, 4).to(device)},
                              encoders={"vae": nn.Linear(4, 4).to(device)})
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m", "dtype": "bfloat16", **model},
                       "dataset": {"uri": "/d"}, "output": {"uri": "/o"},
                       "training": {"cpuOffload": offload, **({"sharding": "shard"} if offload else {})}})
    comps = cache_phase.load_family(Family(), spec, {}, torch.device("meta"), encoders=True)
    assert asked == [torch.device("meta") if on_device else torch.device("cpu")]
    assert comps.encoders["vae"].weight.device.type == "meta"
    assert comps.trainable["transformer"].weight.device.type == ("meta" if on_device else "cpu")
