"""Which kernel torch's scaled_dot_product_attention runs on NVIDIA GPUs: training.attentionBackend.

Attention is the largest part of a diffusion transformer's step at training resolutions (Flux at
1024², 4608 tokens: 175 of 421 ms of GPU time with the flash kernel; HunyuanVideo at 33 x 512²,
9472 tokens, more). On the H100, cuDNN's attention ran the backward in half the time of the flash
kernel and the HunyuanVideo step 1.34x faster (docs/benchmarks.md, fifth run), compiled. It stays
off where it was not measured or where it failed: the eager Flux step hit an illegal memory access
in cuDNN's attention backward (torch 2.11, H100; decisions.md 6), and cuDNN's backward has known
NaN bugs with explicit attention masks at some sequence lengths (pytorch/pytorch#196678), which a
non-finite loss then names.
"""
from __future__ import annotations

from typing import Optional

import torch

BACKENDS = ("auto", "flash", "cudnn")


def choose(requested: str, device_type: str, capability: Optional[tuple[int, int]], compiled: bool) -> tuple[str, str]:
    """(backend, why): 'cudnn', 'flash' (cuDNN's kernel off: torch picks flash attention, or its
    memory-efficient kernel where a mask is passed) or 'default' (not a CUDA GPU: torch's own CPU
    kernels, the setting does not apply). auto: cudnn for compiled blocks on Hopper (compute
    capability 9.x), flash elsewhere. Pure."""
    if device_type != "cuda":
        return "default", f"device {device_type}: torch's own attention kernel"
    if requested != "auto":
        return requested, "training.attentionBackend"
    if not compiled:
        return "flash", "blocks run eagerly, where cuDNN's attention backward crashed on an H100 (torch 2.11)"
    if capability is not None and capability[0] == 9:
        return "cudnn", "compiled blocks on a Hopper GPU, where it measured 1.34x faster a HunyuanVideo step"
    cc = f"{capability[0]}.{capability[1]}" if capability else "unknown"
    return "flash", f"compute capability {cc}: cuDNN attention is measured on Hopper (9.x) only"


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
