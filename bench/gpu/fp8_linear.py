"""Where the time of one frozen linear goes: bf16 nn.Linear vs fp8.Float8Linear (fp8 and dequant),
forward + input gradient, eager and compiled, on Flux-shaped GEMMs (4608 tokens), plus the parts
(activation quantization, the fp8 GEMM alone, the weight transpose). JSON lines on stdout.

    python bench/gpu/fp8_linear.py        (TINY=1 for a CPU smoke test)
"""
import json
import os

import torch

from kubelora_trainer import fp8
from timing import timed as _timed  # bench/gpu/timing.py (the script's folder is on sys.path)

TINY = os.environ.get("TINY") == "1"
dev = "cpu" if TINY else "cuda"
SHAPES = [(64, 64, 128)] if TINY else [(4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 3072)]


def timed(fn, n=3 if TINY else 20):
    return _timed(fn, n, warmup=2, cuda=not TINY)


for m, k, n in SHAPES:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    mods = {"bf16": lin, "fp8": fp8.Float8Linear(lin, torch.bfloat16, "fp8"),
            "dequant": fp8.Float8Linear(lin, torch.bfloat16, "dequant")}
    row = {"shape": [m, k, n]}
    for name, mod in mods.items():
        def fb(mod=mod):
            y = mod(x)
            y.backward(g)
        def fwd(mod=mod):
            with torch.no_grad():
                mod(x)
        row[f"{name}_fwd_ms"] = round(timed(fwd), 3)
        row[f"{name}_fwdbwd_ms"] = round(timed(fb), 3)
        try:
            c = torch.compile(mod)
            def cfb(c=c):
                c(x).backward(g)
            row[f"{name}_compiled_fwdbwd_ms"] = round(timed(cfb), 3)
        except Exception as e:  # noqa: BLE001
            row[f"{name}_compiled_error"] = str(e)[:200]
    f = mods["fp8"]
    x8, xs = fp8.quantize_rows(x.detach())
    row["quantize_x_ms"] = round(timed(lambda: fp8.quantize_rows(x.detach())), 3)
    row["scaled_mm_ms"] = round(timed(lambda: fp8._mm(x8, xs, f.weight8.t(), f.scale.reshape(1, -1), torch.bfloat16)), 3)
    row["transpose_w8_ms"] = round(timed(lambda: f.weight8.t().contiguous()), 3)
    row["bf16_mm_ms"] = round(timed(lambda: x.detach() @ lin.weight.t()), 3)
    print(json.dumps(row), flush=True)
