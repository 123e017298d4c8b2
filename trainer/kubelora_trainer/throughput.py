"""Tokens per second and model FLOPs utilisation (MFU) of a training step, from what the loop
already knows: the cached latents' shapes, the denoiser's parameter count and the step rate. Pure.

Tokens are the denoiser's sequence positions of one sample: latent frames x height x width over
the family's patch (FamilyRules.token_patch; SDXL's UNet: latent pixels). FLOPs per token follow
the usual dense rule: 2N for the forward, 2N for the input gradients and, in a full fine-tune,
2N for the weight gradients (LoRA's own are negligible): 4N for LoRA, 6N for full. Attention is
not counted, so MFU understates at long sequences (bench/gpu/lora_step.py counts it exactly).
"""
from __future__ import annotations

from typing import Optional

# dense bf16 peak FLOP/s by device name (substring), for MFU
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
             "A10G": 70e12, "L4": 121e12}


def tokens_of(latent_shape: tuple[int, ...], patch: tuple[int, int, int]) -> int:
    """One sample's tokens from its latent shape [C, H, W] or [C, F, H, W] and (pt, ph, pw)."""
    pt, ph, pw = patch
    if len(latent_shape) == 3:
        _, h, w = latent_shape
        f = 1
    else:
        _, f, h, w = latent_shape
    return max(1, -(-f // pt)) * (h // ph) * (w // pw)


def flops_per_token(n_params: int, full: bool) -> float:
    return (6 if full else 4) * n_params


def peak_flops(device_name: str) -> Optional[float]:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def rates(samples_per_s: Optional[float], tokens_per_sample: float, n_params: int, full: bool,
          device_name: str, n_devices: int) -> tuple[Optional[float], Optional[float]]:
    """(tokens/s over all ranks, MFU over all devices, None where unknown, e.g. on CPU)."""
    if not samples_per_s:
        return None, None
    tps = samples_per_s * tokens_per_sample
    peak = peak_flops(device_name)
    mfu = tps * flops_per_token(n_params, full) / (peak * n_devices) if peak else None
    return tps, mfu
