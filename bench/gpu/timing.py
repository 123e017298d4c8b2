"""Milliseconds per call of fn after warm-up calls: CUDA events on a GPU, the wall clock on the CPU
(the TINY smoke tests). Shared by the GPU micro-benchmarks (fp8_linear.py, fp8_block.py)."""
import time

import torch


def timed(fn, n: int, warmup: int = 2, cuda: bool = True) -> float:
    for _ in range(warmup):
        fn()
    if not cuda:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e3
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); s.record()
    for _ in range(n):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n
