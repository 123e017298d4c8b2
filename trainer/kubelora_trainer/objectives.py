"""Flow-matching pieces shared by the rectified-flow families (Flux, LTX, HunyuanVideo)."""
from __future__ import annotations

import math

import torch


def sample_timesteps(n: int, method: str, generator: torch.Generator, device) -> torch.Tensor:
    """t in (0, 1): logit-normal (sigmoid of a standard normal) or uniform."""
    if method == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
    elif method == "uniform":
        t = torch.rand(n, generator=generator, device=generator.device)
    else:
        raise ValueError(f"unknown timestep sampling method {method!r}")
    return t.to(device)


def resolution_shift_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096,
                        base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift: linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """Shift t towards noise: exp(mu) / (exp(mu) + 1/t - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input x_t = (1 - t) x0 + t noise and the velocity target noise - x0."""
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - tb) * x0 + tb * noise, noise - x0
