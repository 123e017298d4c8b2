"""Why activation checkpointing does not take effect around fp8 linears under torch.compile on CUDA
(docs/benchmarks.md, third and fourth GPU runs): a stack of toy blocks (frozen base linear + fp32
LoRA, GELU, frozen base linear + LoRA), each checkpoint_wrapper'd then compiled as dist.parallelize
does, bf16 autocast. Prints one JSON line per variant: bytes the forward leaves for the backward
(memory_allocated on CUDA, saved-tensor bytes on CPU), dynamo's graph breaks, and the max
difference of the input gradient against the eager bf16 reference.

    python bench/gpu/fp8_ckpt.py            # all variants; SMALL=1 for a quick CPU check
"""
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "trainer"))
from kubelora_trainer import fp8  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper  # noqa: E402

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = os.environ.get("SMALL") == "1" or dev.type == "cpu"
T, D, H, NB = (256, 256, 1024, 3) if SMALL else (8192, 3072, 12288, 6)


class Lora(nn.Module):
    def __init__(self, base, r=16):
        super().__init__()
        self.base = base
        self.a = nn.Linear(base.in_features, r, bias=False)
        self.b = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.b.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = Lora(nn.Linear(D, H))
        self.down = Lora(nn.Linear(H, D))

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


@torch.library.custom_op("kubelora_diag::fp8_mm", mutates_args=())
def fp8_mm(x2: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x8, xs = fp8.quantize_rows(x2)
    return fp8._mm(x8, xs, w8.t(), scale.reshape(1, -1), torch.bfloat16)


@fp8_mm.register_fake
def _(x2, w8, scale):
    return x2.new_empty(x2.shape[0], w8.shape[0], dtype=torch.bfloat16)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _backward(ctx, grad):
    w8, scale = ctx.saved_tensors
    g8, gs = fp8.quantize_rows(grad.float() * scale.reshape(1, -1))
    ones = torch.ones(1, w8.shape[1], device=grad.device, dtype=torch.float32)
    return fp8._mm(g8, gs, w8.t().contiguous().t(), ones, torch.bfloat16), None, None


fp8_mm.register_autograd(_backward, setup_context=_setup)


class OpLinear(fp8.Float8Linear):
    """The same fp8 GEMMs as one opaque custom op (dynamo and inductor do not trace into it)."""
    def forward(self, x):
        y = fp8_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight8, self.scale) + self.bias
        return y.reshape(*x.shape[:-1], -1)


def build(kind):
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block() for _ in range(NB))
    for blk in blocks:
        for lo in (blk.up, blk.down):
            lo.base.weight.requires_grad_(False)
            lo.base.bias.requires_grad_(False)
            lo.base.to(torch.bfloat16)
            if kind.startswith("fp8"):
                compute = "dequant" if kind == "fp8dq" else "fp8"
                lo.base = (OpLinear if kind == "fp8op" else fp8.Float8Linear)(lo.base, torch.bfloat16, compute)
    return blocks.to(dev)


def run(kind, gc, comp):
    """comp "1": compile(checkpoint(block)) as dist.parallelize does; "2": checkpoint(compile(block))"""
    blocks = build(kind)
    wrapped = []
    for blk in blocks:
        if comp == "2":
            blk.compile()
        if gc:
            blk = checkpoint_wrapper(blk)
        if comp == "1":
            blk.compile()
        wrapped.append(blk)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    x = torch.randn(1, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def fwd():
        h = x
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            for blk in wrapped:
                h = blk(h)
        return h

    for _ in range(2):  # warm-up (compiles)
        fwd().float().square().mean().backward()
    import time
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync(); t0 = time.perf_counter()
    for _ in range(3):
        fwd().float().square().mean().backward()
    sync(); step_ms = (time.perf_counter() - t0) / 3 * 1000
    x.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fwd()
    held = (torch.cuda.memory_allocated() - base) if dev.type == "cuda" else saved[0]
    out.float().square().mean().backward()
    breaks = {k: v for k, v in counters["graph_break"].items()}
    return dict(variant=f"{kind}_{'gc' if gc else 'nogc'}_{['eager', 'compile', 'compile_inside'][int(comp)]}", device=str(dev),
                torch=torch.__version__, held_mib=round(held / 2**20, 1), step_ms=round(step_ms, 2), hook_saved_mib=round(saved[0] / 2**20, 1),
                graph_breaks=[k[:160] for k in breaks][:5], n_graph_breaks=sum(breaks.values()),
                grad=x.grad.float().cpu())


def main():
    ref = None
    variants = os.environ.get("VARIANTS", "bf16:0:0 bf16:1:1 fp8:1:1 fp8:1:2 fp8dq:0:1 fp8dq:1:1").split()
    for v in variants:
        kind, gc, comp = v.split(":")
        try:
            r = run(kind, gc == "1", comp)
        except Exception as e:  # report and go on: one line per variant
            print(json.dumps(dict(variant=v, error=f"{type(e).__name__}: {str(e)[:300]}")), flush=True)
            continue
        g = r.pop("grad")
        ref = g if ref is None else ref
        r["grad_rel_err"] = round(float((g - ref).norm() / ref.norm()), 4)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
