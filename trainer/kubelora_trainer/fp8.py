"""Frozen base linears stored once in float8 (e4m3) and run as fp8 GEMMs: model.transformerDtype float8.

Why not torchao's Float8Linear: its training path computes the frozen weight's gradient anyway and
re-quantizes the frozen weight at every step, so it gains nothing for LoRA; its inference configs
have no backward. Here a frozen linear keeps only

  - ``weight8``: the weight quantized once at load, per output row (scale = row amax / 448), and
  - ``scale``:   those row scales (fp32),

and ``Float8Matmul`` computes the forward as an fp8 GEMM (the input quantized per row at each
call) and the backward as the input gradient only: no weight gradient, nothing of the input saved.
The input gradient is an fp8 GEMM too (the gradient, with the weight's row scales folded in,
quantized per row; the weight used as stored, transposed). ``compute="dequant"`` instead runs both
GEMMs in the compute dtype on the dequantized weight (memory savings only, as diffusion-pipe's
transformer_dtype float8 does; for GPUs without fp8 GEMMs).

The same code runs on CPU (torch._scaled_mm has a CPU kernel), so the tests check its numerics
against the bf16 path. Which linears: every one inside the family's repeated blocks is stored in
fp8; the family's sensitive ones (modulation, norm projections: FamilyRules.fp8_sensitive)
multiply in model.dtype on the dequantized weight; embedders and final layers sit outside the
blocks and stay in model.dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
COMPUTES = ("fp8", "fp8_transposed", "dequant")
# the forward GEMM with Hopper's fast accumulation (fp8 partial sums less often promoted to fp32),
# as torchao's float8 training does for its output GEMM; the input gradient keeps full accumulation.
# 5% faster on six compiled Flux-shaped blocks on an H100 (bench/gpu/fp8_block.py, docs/benchmarks.md)
FORWARD_FAST_ACCUM = True


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / s).to(e4m3) and s, with one scale per row: s = row amax / 448 (1 for an all-zero row)."""
    t = t.float()
    amax = t.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize(t8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (t8.float() * scale).to(dtype)


def _mm(a8, a_scale, b8_t, b_scale_row, out_dtype, fast_accum=False):
    """a [M, K] (row-major) @ b_t [K, N] (column-major), per-row scales of a [M, 1] and of b's N
    columns [1, N]; the result in out_dtype (CUDA's row-wise kernel writes bf16 only)."""
    kernel_dtype = torch.bfloat16 if a8.is_cuda else out_dtype
    # the kernel needs a row-major; inductor may otherwise lay a fused quantization out transposed
    # ("mat_a must be row_major": compiled tiny HunyuanVideo on CPU, tests/test_bench_smoke.py)
    a8 = a8.contiguous()
    y = torch._scaled_mm(a8, b8_t, scale_a=a_scale, scale_b=b_scale_row, out_dtype=kernel_dtype,
                         use_fast_accum=fast_accum and a8.is_cuda)
    return y if kernel_dtype == out_dtype else y.to(out_dtype)


class Float8Matmul(torch.autograd.Function):
    """y = x @ (scale * weight8).T + bias, for a frozen weight: only x gets a gradient.
    compute "fp8": both GEMMs in fp8 (the backward transposes weight8 for the kernel);
    "fp8_transposed": likewise with weight8_t, a stored [K, N] copy, so nothing is transposed;
    "dequant": both GEMMs in out_dtype on the dequantized weight."""

    @staticmethod
    def forward(ctx, x, weight8, weight8_t, scale, bias, out_dtype, compute):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if compute != "dequant":
            x8, xs = quantize_rows(x2)
            y = _mm(x8, xs, weight8.t(), scale.reshape(1, -1), out_dtype, FORWARD_FAST_ACCUM)
        else:
            y = x2.to(out_dtype) @ dequantize(weight8, scale.reshape(-1, 1), out_dtype).t()
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(weight8, weight8_t, scale)
        ctx.meta = (shape, x.dtype, out_dtype, compute)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight8, weight8_t, scale = ctx.saved_tensors
        shape, x_dtype, out_dtype, compute = ctx.meta
        g = grad.reshape(-1, grad.shape[-1])
        if compute != "dequant":
            # dx = g @ (diag(s) W8) = (g * s) @ W8: fold the row scales into g, quantize g per row
            g8, gs = quantize_rows(g.float() * scale.reshape(1, -1))
            ones = torch.ones(1, weight8.shape[1], device=g.device, dtype=torch.float32)
            # _scaled_mm wants its second operand column-major: W8 [N, K] as the transpose of a
            # row-major [K, N] copy (stored, or made here: one byte per weight, transient)
            w_t = weight8_t if weight8_t is not None else weight8.t().contiguous()
            dx = _mm(g8, gs, w_t.t(), ones, out_dtype)
        else:
            dx = g.to(out_dtype) @ dequantize(weight8, scale.reshape(-1, 1), out_dtype)
        return dx.reshape(*shape[:-1], dx.shape[-1]).to(x_dtype), None, None, None, None, None, None


class Float8Linear(nn.Module):
    """A frozen nn.Linear with its weight in e4m3 (one scale per output row). Drop-in for the
    linears peft wraps as base_layer (in_features/out_features/weight kept for peft's checks)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, compute: str = "fp8"):
        super().__init__()
        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, s = quantize_rows(linear.weight.detach())
        self.weight8 = nn.Parameter(w8, requires_grad=False)
        # the backward's layout, stored: as many bytes again, no transpose per step
        self.weight8_t = (nn.Parameter(w8.t().contiguous(), requires_grad=False) if compute == "fp8_transposed"
                          else None)
        self.scale = nn.Parameter(s.reshape(-1), requires_grad=False)
        self.bias = (None if linear.bias is None
                     else nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False))
        self.compute_dtype, self.compute = compute_dtype, compute

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that reads it: merges, exports); not used in training."""
        return dequantize(self.weight8, self.scale.reshape(-1, 1), self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.compute_dtype
        with torch.autocast(dev, enabled=False):
            return Float8Matmul.apply(x, self.weight8, self.weight8_t, self.scale, self.bias, out_dtype,
                                      self.compute)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise, compute={self.compute}"


@dataclass
class Conversion:
    fp8: list[str] = field(default_factory=list)         # fp8 GEMMs
    sensitive: list[str] = field(default_factory=list)   # stored in fp8, multiplied in model.dtype (by name)
    unaligned: list[str] = field(default_factory=list)   # likewise: dims not multiples of 16 (fp8 GEMMs need them)
    dequant: list[str] = field(default_factory=list)     # likewise: model.float8Compute dequant

    def summary(self, stored_bytes_before: int, stored_bytes_after: int) -> str:
        n = len(self.fp8) + len(self.sensitive) + len(self.unaligned) + len(self.dequant)
        if self.dequant:
            return (f"{n} linears stored in float8 ({stored_bytes_before / 2**30:.2f} -> {stored_bytes_after / 2**30:.2f} "
                    f"GiB of weights in the blocks), multiplied in the compute dtype (float8Compute dequant)")
        return (f"{n} linears stored in float8 ({stored_bytes_before / 2**30:.2f} -> {stored_bytes_after / 2**30:.2f} GiB "
                f"of weights in the blocks); {len(self.fp8)} run as fp8 GEMMs, {len(self.sensitive)} sensitive "
                f"(modulation, norms) and {len(self.unaligned)} with dims not multiples of 16 multiply in the compute dtype")


def compute_mode(path: str, linear: nn.Linear, sensitive: tuple[str, ...], want: str, need_alignment: bool) -> tuple[str, str]:
    """(compute, reason): 'fp8' where wanted and allowed, else 'dequant' with the reason
    ('sensitive' by name, 'unaligned', or 'dequant' when fp8 GEMMs are not wanted)."""
    if want == "dequant":
        return "dequant", "dequant"
    if sensitive and re.search("|".join(re.escape(k) for k in sensitive), path.lower()):
        return "dequant", "sensitive"
    if need_alignment and (linear.in_features % 16 or linear.out_features % 16):
        return "dequant", "unaligned"
    return want, "fp8"


def weight_bytes(modules) -> int:
    """Bytes of the weights (and scales, biases) of the linears among modules."""
    return sum(p.numel() * p.element_size() for m in modules if isinstance(m, (nn.Linear, Float8Linear))
               for p in m.parameters(recurse=False))


def convert(model: nn.Module, block_lists: list[nn.ModuleList], *, compute_dtype: torch.dtype,
            device: torch.device, sensitive: tuple[str, ...], compute: str = "fp8",
            gemm_device: torch.device | None = None) -> tuple[Conversion, str]:
    """Store every frozen nn.Linear inside the blocks (peft's base_layer included) as Float8Linear,
    quantized on `device` one layer at a time (so the full-precision model never has to fit there).
    gemm_device: where the GEMMs will run, when not `device` (training.cpuOffload stores on the CPU).
    Sensitive layers (by name) keep their weights in fp8 but multiply in compute_dtype. Call after
    LoRA injection and before parallelize(). Returns what was done and a one-line summary."""
    need_alignment = (gemm_device or device).type == "cuda"  # where the GEMMs run (offloaded: not where stored)
    out = Conversion()
    names = {id(m): n for n, m in model.named_modules()}
    before = after = 0
    for blocks in block_lists:
        for block in blocks:
            prefix = names.get(id(block), "")
            for path, parent in list(block.named_modules()):
                for child_name, child in list(parent.named_children()):
                    if type(child) is not nn.Linear or child.weight.requires_grad:
                        continue
                    full = ".".join(p for p in (prefix, path, child_name) if p)
                    mode, reason = compute_mode(full, child, sensitive, compute, need_alignment)
                    before += weight_bytes([child])
                    child.to(device)
                    new = Float8Linear(child, compute_dtype, mode)
                    setattr(parent, child_name, new)
                    after += weight_bytes([new])
                    getattr(out, reason).append(full)
    return out, out.summary(before, after)
