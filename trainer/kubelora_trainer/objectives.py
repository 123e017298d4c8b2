"""Flow-matching pieces shared by the rectified-flow families (Flux, LTX, HunyuanVideo), and the
masked squared error every family's loss uses (masks.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


EVAL_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # diffusion-pipe's TIMESTEP_QUANTILES_FOR_EVAL


def normal_icdf(n: int, quantile: float, device) -> torch.Tensor:
    """[n] copies of the standard normal's inverse CDF at quantile (in float64, then float32)."""
    return torch.special.ndtri(torch.full((n,), float(quantile), dtype=torch.float64)).float().to(device)


def noise_for(x0: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The standard normal noise added to x0 (float32, on x0's device): given (the held-out
    evaluation's, drawn per sample: evaluation.sample_noise), else drawn from generator."""
    if noise is not None:
        return noise.to(x0.device, torch.float32)
    return torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)


def quantile_timestep(quantile: float, num_train_timesteps: int) -> int:
    """A DDPM family's (SDXL's) discrete timestep at quantile of its uniform training draw:
    int(q * num_train_timesteps), as diffusion-pipe. Pure."""
    return min(int(quantile * num_train_timesteps), num_train_timesteps - 1)


def sample_timesteps(n: int, method: str, generator: torch.Generator, device,
                     quantile: float | None = None, sigmoid_scale: float = 1.0) -> torch.Tensor:
    """t in (0, 1): logit-normal (sigmoid of sigmoid_scale x a standard normal) or uniform. With
    quantile (the held-out evaluation, evaluation.py): the distribution's inverse CDF at it for
    every sample, drawing nothing from the generator (diffusion-pipe's timestep_quantile)."""
    if quantile is not None:
        if method == "logit_normal":
            return torch.sigmoid(sigmoid_scale * normal_icdf(n, quantile, device))
        if method == "uniform":
            return torch.full((n,), float(quantile), device=device)
        raise ValueError(f"unknown timestep sampling method {method!r}")
    if method == "logit_normal":
        t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator, device=generator.device))
    elif method == "uniform":
        t = torch.rand(n, generator=generator, device=generator.device)
    else:
        raise ValueError(f"unknown timestep sampling method {method!r}")
    return t.to(device)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """A constant shift towards noise, shift t / (1 + (shift - 1) t) (diffusion-pipe's `shift`;
    time_shift at mu = log(shift))."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_timesteps(n: int, training_spec, generator: torch.Generator, device,
                   quantile: float | None = None) -> torch.Tensor:
    """A flow-matching family's t: training.timestepSampling scaled by training.sigmoidScale, then
    shifted by training.timestepShift when set, in diffusion-pipe's order."""
    t = sample_timesteps(n, training_spec.timestepSampling, generator, device, quantile, training_spec.sigmoidScale)
    return shift_timesteps(t, training_spec.timestepShift) if training_spec.timestepShift else t


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


def mask_weights(mask: torch.Tensor, shape) -> torch.Tensor:
    """Per-element loss weights for latents of `shape` ([B, C, h, w], or [B, C, F, h, w] for video)
    from a latent-grid mask [B, h, w]: the same weight for every channel and frame. Pure."""
    b, h, w = mask.shape
    return mask.view(b, *([1] * (len(shape) - 3)), h, w).expand(tuple(shape))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 per_sample: bool = False) -> torch.Tensor:
    """Mean squared error in float32; with weight (pred's layout, e.g. mask_weights packed as the
    family packs latents) each element's squared error is multiplied by it and the mean is still
    over all elements, as diffusion-pipe's loss_fn: a weight of 0 gives that element no gradient,
    and a mostly masked item weighs less. per_sample: one mean per batch element [B]."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weight is not None:
        err = err * weight.to(err.device, torch.float32)
    return err.mean(dim=tuple(range(1, err.dim()))) if per_sample else err.mean()
