"""Which kernel torch's scaled_dot_product_attention runs on NVIDIA GPUs: training.attentionBackend.

Attention is the largest part of a diffusion transformer's step at training resolutions (Flux at
1024², 4608 tokens: 175 of 421 ms of GPU time in the flash kernels). On the H100 cuDNN's kernels
took 92 ms for the same work and a compiled Flux fp8 step ran 1.11x faster than with flash in the
same run (docs/benchmarks.md, fifth run). cuDNN stays off where it was not measured or where it
failed: the eager Flux step hit an illegal memory access in cuDNN's attention backward (torch 2.11,
H100; decisions.md 6), so blocks that run eagerly with a backward (compile off; a full fine-tune,
whose trained attention outside the blocks, HunyuanVideo's token refiner, runs eagerly with a mask)
keep flash. Forward-only eager passes (samples, the evaluation) run whatever the training chose.
cuDNN's backward has known NaN bugs with explicit attention masks at some sequence lengths
(pytorch/pytorch#196678), which a non-finite loss then names.
"""
from __future__ import annotations

from typing import Optional

import torch


def choose(requested: str, device_type: str, capability: Optional[tuple[int, int]], compiled: bool,
           full: bool = False) -> tuple[str, str]:
    """(backend, why): 'cudnn', 'flash' (cuDNN's kernel off: torch picks flash attention, or its
    memory-efficient kernel where a mask is passed) or 'default' (not a CUDA GPU: torch's own CPU
    kernels, the setting does not apply). auto: cudnn for compiled blocks on Hopper (compute
    capability 9.x) training adapters, flash elsewhere. Pure."""
    if device_type != "cuda":
        return "default", f"device {device_type}: torch's own attention kernel"
    if requested != "auto":
        return requested, "training.attentionBackend"
    if not compiled:
        return "flash", "blocks run eagerly, where cuDNN's attention backward crashed on an H100 (torch 2.11)"
    if full:
        return "flash", ("a full fine-tune trains attention outside the compiled blocks, eagerly, where cuDNN's "
                         "attention backward crashed on an H100 (torch 2.11)")
    if capability is not None and capability[0] == 9:
        return "cudnn", "compiled blocks on a Hopper GPU, where a Flux step ran 1.11x faster than with flash"
    cc = f"{capability[0]}.{capability[1]}" if capability else "unknown"
    return "flash", f"compute capability {cc}: cuDNN attention is measured on Hopper (9.x) only"


def warning(requested: str, backend: str) -> Optional[str]:
    """The line to print when a backend was asked for where the setting does not apply. Pure."""
    if backend == "default" and requested != "auto":
        return (f"[model] warning: training.attentionBackend {requested} applies to NVIDIA GPUs only; "
                f"torch's own attention kernel runs here")
    return None


def apply(backend: str) -> None:
    """Turn cuDNN's attention on or off for this process (torch's global setting); 'default' leaves it."""
    if backend != "default":
        torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")


def nan_hint(device_type: str) -> str:
    """What to add to a non-finite loss's message when cuDNN's attention ran ('' otherwise)."""
    if device_type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        return ("; cuDNN's attention ran (training.attentionBackend), whose backward has known NaN bugs with "
                "attention masks: try training.attentionBackend: flash")
    return ""
