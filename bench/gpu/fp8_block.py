"""Where fp8 wins or loses inside a compiled block, not per GEMM: a stack of Flux-single-block-shaped
MLP blocks (layer norm + modulation, a 3072->3072 projection and a 3072->12288->3072 MLP beside it,
residual; 4608 tokens), every linear frozen, each block compiled on its own (as dist.parallelize's
regional compile), forward + input gradient timed with CUDA events. One JSON line per variant:

  bf16        nn.Linear in bf16 (the stock stack's GEMMs)
  fp8         fp8.Float8Linear compute fp8 without fast accumulation (the backward transposes weight8)
  fp8_fast    the same with the forward GEMM's fast accumulation (fp8.FORWARD_FAST_ACCUM, the default)
  fp8t        compute fp8_transposed (the backward's layout stored)
  fp8_bwdbf16 forward fp8, the input gradient in bf16 on the dequantized weight (no transpose, no
              quantization of the gradient); an experiment here, not a product mode
  fp8_noquant forward and backward GEMMs in fp8 on inputs quantized with a constant scale (no
              amax reduction): the floor a fused or delayed quantization could reach; numerics off
  fp8_fused   fp8_fast with the two linears that read the same input (proj and fc1, as a Flux single
              block's q/k/v and MLP projections) stored as one: one GEMM and one quantization of the
              input instead of two, one input-gradient GEMM; what fusing a block's base GEMMs would gain

    python bench/gpu/fp8_block.py            (TINY=1: CPU smoke test, tiny shapes)
"""
import json
import os
import sys

import torch
from torch import nn

from kubelora_trainer import fp8
from timing import timed as _timed  # bench/gpu/timing.py (the script's folder is on sys.path)

TINY = os.environ.get("TINY") == "1"
DEV = "cpu" if TINY else "cuda"
M, D, H, N_BLOCKS = (64, 64, 256, 2) if TINY else (4608, 3072, 12288, 6)
BF = torch.bfloat16


class _Bf16Backward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale):
        x2 = x.reshape(-1, x.shape[-1])
        x8, xs = fp8.quantize_rows(x2)
        y = fp8._mm(x8, xs, w8.t(), scale.reshape(1, -1), BF)
        ctx.save_for_backward(w8, scale)
        ctx.shape = x.shape
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        w8, scale = ctx.saved_tensors
        dx = g.reshape(-1, g.shape[-1]).to(BF) @ fp8.dequantize(w8, scale.reshape(-1, 1), BF)
        return dx.reshape(ctx.shape), None, None


def _quant_const(t):
    return (t.float() * 0.05).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3)


class _NoQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, w8t, scale):
        x2 = x.reshape(-1, x.shape[-1])
        ones = torch.full((x2.shape[0], 1), 20.0, device=x.device)
        y = fp8._mm(_quant_const(x2), ones, w8.t(), scale.reshape(1, -1), BF)
        ctx.save_for_backward(w8t)
        ctx.shape = x.shape
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        (w8t,) = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        ones_a = torch.full((g2.shape[0], 1), 20.0, device=g.device)
        ones_b = torch.ones(1, w8t.shape[0], device=g.device)
        return fp8._mm(_quant_const(g2), ones_a, w8t.t(), ones_b, BF).reshape(ctx.shape), None, None, None


class Experimental(nn.Module):
    def __init__(self, lin: nn.Linear, kind: str):
        super().__init__()
        w8, s = fp8.quantize_rows(lin.weight.detach())
        self.w8, self.scale, self.kind = w8, s.reshape(-1), kind
        self.w8t = w8.t().contiguous() if kind == "fp8_noquant" else None

    def forward(self, x):
        if self.kind == "fp8_bwdbf16":
            return _Bf16Backward.apply(x, self.w8, self.scale)
        return _NoQuant.apply(x, self.w8, self.w8t, self.scale)


R = 4 if TINY else 32  # the LoRA variants' rank


def lora_weights() -> dict:
    """The LoRA variants' A and B for proj, fc1 and fc2 (B not zero, so that the path counts)."""
    g = torch.Generator().manual_seed(1)
    return {name: (torch.randn(R, i, generator=g) / i ** 0.5, torch.randn(o, R, generator=g) * 0.05)
            for name, (i, o) in {"proj": (D, D), "fc1": (D, H), "fc2": (H, D)}.items()}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lora = None  # "plain" or "fusedA": the LoRA variants written out
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.shift = nn.Parameter(torch.randn(D) * 0.1, requires_grad=False)
        self.scale = nn.Parameter(torch.randn(D) * 0.1, requires_grad=False)
        self.proj = nn.Linear(D, D)
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, D)

    def add_lora(self, how: str):
        """LoRA's A and B (fp32, trainable) for proj, fc1 and fc2, used as `how` says."""
        self.lora = how
        for name, (a, b) in lora_weights().items():
            setattr(self, f"{name}_A", nn.Parameter(a))
            setattr(self, f"{name}_B", nn.Parameter(b))

    def forward(self, x):
        h = self.norm(x) * (1 + self.scale) + self.shift
        if self.lora:
            lin = nn.functional.linear
            if self.lora == "fusedA":  # both A's on h in one GEMM
                a_p, a_f = lin(h, torch.cat([self.proj_A, self.fc1_A])).split([R, R], dim=-1)
            else:
                a_p, a_f = lin(h, self.proj_A), lin(h, self.fc1_A)
            p = self.proj(h) + lin(a_p, self.proj_B)
            f = nn.functional.gelu(self.fc1(h) + lin(a_f, self.fc1_B), approximate="tanh")
            return x + p + self.fc2(f) + lin(lin(f, self.fc2_A), self.fc2_B)
        if hasattr(self, "proj_fc1"):  # fp8_fused: both linears on h as one GEMM
            p, f = self.proj_fc1(h).split([D, H], dim=-1)
            return x + p + self.fc2(nn.functional.gelu(f, approximate="tanh"))
        return x + self.proj(h) + self.fc2(nn.functional.gelu(self.fc1(h), approximate="tanh"))


def fused_linear(a: nn.Linear, b: nn.Linear) -> nn.Linear:
    """One linear computing a's outputs then b's, on the same input."""
    out = nn.Linear(a.in_features, a.out_features + b.out_features).to(a.weight.device, a.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([a.weight, b.weight]))
        out.bias.copy_(torch.cat([a.bias, b.bias]))
    return out.requires_grad_(False)


def build(kind: str) -> nn.ModuleList:
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS)).to(DEV, BF).requires_grad_(False)
    if kind == "fp8_fused":
        for b in blocks:
            b.proj_fc1 = fp8.Float8Linear(fused_linear(b.proj, b.fc1), BF, "fp8")
            b.fc2 = fp8.Float8Linear(b.fc2, BF, "fp8")
            del b.proj, b.fc1
    elif kind == "fp8_lora":  # as the trainer: peft's layers, then their bases stored in fp8
        from peft import LoraConfig

        from kubelora_trainer import lora
        lora.inject(blocks, LoraConfig(r=R, lora_alpha=R, target_modules=["proj", "fc1", "fc2"]), seed=0)
        for b in blocks:
            for name in ("proj", "fc1", "fc2"):
                layer = getattr(b, name)
                layer.base_layer = fp8.Float8Linear(layer.base_layer, BF, "fp8")
                a, w = lora_weights()[name]  # the written-out variants' values
                with torch.no_grad():
                    layer.lora_A["default"].weight.copy_(a)
                    layer.lora_B["default"].weight.copy_(w)
    elif kind != "bf16":
        for b in blocks:
            if kind.startswith("fp8_lora_"):
                b.add_lora(kind.removeprefix("fp8_lora_"))
            for name in ("proj", "fc1", "fc2"):
                lin = getattr(b, name)
                if kind in ("fp8", "fp8_fast", "fp8t") or kind.startswith("fp8_lora_"):
                    new = fp8.Float8Linear(lin, BF, "fp8_transposed" if kind == "fp8t" else "fp8")
                else:
                    new = Experimental(lin, kind)
                setattr(b, name, new)
    return blocks


def timed(fn, n):
    return _timed(fn, n, warmup=3, cuda=not TINY)


def run(kind: str) -> dict:
    torch._dynamo.reset()
    fp8.FORWARD_FAST_ACCUM = kind in ("fp8_fast", "fp8_fused") or kind.startswith("fp8_lora")
    blocks = build(kind).to(DEV)
    fns = [torch.compile(b) for b in blocks]
    params = [p for p in blocks.parameters() if p.requires_grad]  # the LoRA variants' weights
    torch.manual_seed(1)  # the same input for every variant (peft's injection reseeds torch's RNG)
    x = torch.randn(1, M, D, device=DEV, dtype=BF, requires_grad=True)
    g = torch.randn(1, M, D, device=DEV, dtype=BF)

    def step():
        with torch.autocast(DEV, dtype=BF):  # as the trainer's compute(): LoRA's fp32 weights used in bf16
            h = x
            for f in fns:
                h = f(h)
        h.backward(g)
        x.grad = None
        for p in params:
            p.grad = None

    if not TINY:
        torch.cuda.reset_peak_memory_stats()
    ms = timed(step, 2 if TINY else 20)
    with torch.no_grad(), torch.autocast(DEV, dtype=BF):  # agreement is read from the outputs' norms
        h = x
        for f in fns:
            h = f(h)
    row = {"case": f"block_{kind}", "ms_per_fwdbwd": round(ms, 3), "blocks": N_BLOCKS, "tokens": M,
           "out_norm": round(float(h.float().norm()), 4), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if not TINY else "cpu"}
    if not TINY:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


if __name__ == "__main__":
    kinds = sys.argv[1:] or ["bf16", "fp8", "fp8_fast", "fp8t", "fp8_bwdbf16", "fp8_noquant", "fp8_fused",
                             "fp8_lora", "fp8_lora_plain", "fp8_lora_fusedA"]
    for k in kinds:
        try:
            print(json.dumps(run(k)), flush=True)
        except Exception as e:  # noqa: BLE001 - report, do not hide
            print(json.dumps({"case": f"block_{k}", "error": f"{type(e).__name__}: {e}"[:400]}), flush=True)
