"""The interface every model family implements. The family module holds what is specific to the
model and nothing else: parallelism, precision, the loop and I/O live in shared code.

Component names are the diffusers pipeline attribute names ("transformer", "unet",
"text_encoder", "text_encoder_2"); the first trainable component is the denoiser.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

# {component: {module path: (lora_A weight, lora_B weight)}}, full tensors on CPU
LoraTensors = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]


class ModelError(ValueError):
    """Model files that are not what model.type expects (wrong family, missing component); the
    message names the spec field and what was expected. The trainer reports it without a traceback."""


@dataclass
class Components:
    """What a family loaded: the modules that get LoRA (the denoiser first; text encoders too
    when a family trains them) and the frozen encoders used while caching, freed afterwards."""
    trainable: dict[str, nn.Module]
    encoders: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> nn.Module:
        return next(iter(self.trainable.values()))


class ModelFamily(Protocol):
    name: str  # formats, path fields, options and data rules: families.RULES[name]

    def load(self, model_spec, paths: dict[str, str], device: torch.device, encoders: bool = True) -> Components:
        """Build the components from the staged local paths (keys: the spec's path fields).
        encoders=False (every cached tensor is already on disk, no samples): the VAE and the
        frozen text encoders are not constructed, comps.encoders is empty and comps.info holds
        only what loss() reads; text encoders that are trained (SDXL) are still built."""

    def lora_targets(self) -> dict[str, str | list[str]]:
        """Default peft target_modules per trainable component (adapter.targetModules overrides
        the denoiser's)."""

    def blocks(self, component: str, module: nn.Module) -> list[nn.ModuleList]:
        """The lists of repeated blocks of one component: shared code wraps, compiles and
        shards each block."""

    @torch.no_grad()
    def encode(self, comps: Components, images: torch.Tensor, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per-sample cached tensors (latents, text embeddings or token ids) for images in [-1, 1]:
        one per caption. images holds one image per caption, or a single one that every caption
        shares (a unit's caption variants: the VAE encodes it once). A family whose
        FamilyRules.dropout_text is set also takes dropout=[bool per caption]: which captions are
        the caption-dropout entry (""), which it conditions apart from an item's empty caption."""

    def loss(self, comps: Components, batch: dict[str, torch.Tensor], model_spec, training_spec,
             generator: torch.Generator, quantile: float | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss for one micro-batch of cached samples (stacked on the device). With
        quantile (the held-out evaluation, evaluation.py): every sample's timestep (noise level) is
        the inverse CDF of the family's training distribution at it, drawn from nothing; with noise
        (latents-shaped: the evaluation's, drawn per sample) nothing is drawn from the generator
        (objectives.noise_for)."""

    def export(self, lora: LoraTensors, scale: float, fmt: str) -> dict[str, torch.Tensor]:
        """The LoRA file's tensors in the given format (one of families.RULES[name].formats)."""

    def export_gaps(self, lora: LoraTensors, fmt: str) -> list[str]:
        """Sentences naming the trained modules a format's file cannot carry, or a loader of it
        skips (printed at export and kept in manifest.json); [] when the file carries everything."""

    def parse(self, tensors: dict[str, torch.Tensor], fmt: str) -> tuple[LoraTensors, float]:
        """Inverse of export: a LoRA file's tensors in format fmt back to (LoraTensors, scale);
        `kubelora convert` is parse + export."""


# cuDNN's attention backward returns NaN query gradients for masked keys of this length mod 128
# (pytorch/pytorch#196678; clean at every other remainder tested there)
CUDNN_BAD_KEYS = (64, 128)


def trim_text_padding(embeds: torch.Tensor, mask: torch.Tensor,
                      key_offsets: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The caption embeddings [B, L, D] and mask [B, L] without the trailing positions that are
    padding in every caption of the batch (at least one position is kept), and whether the kept
    mask is all true. Exact for a transformer that masks padded text keys out and gives text
    tokens no positional embedding (padded text queries, where text attends too, only produce
    padded text outputs). Shorter sequences, and an all-true mask that can be dropped so SDPA may
    use flash attention.

    Where a mask stays (captions of different lengths in one batch), one or two more padding
    positions are kept where needed (past L too: zeros, masked out) so that no masked attention's
    key length, offset + text for each of key_offsets (e.g. the video tokens the text is joined
    to, and 0 for attention over the text alone), is 64 mod 128: cuDNN's backward returns NaN
    there (CUDNN_BAD_KEYS).

    The mask is read on the host once (the length to keep and whether it is all true: one sync
    per forward; each sync keeps the CPU from queueing the GPU's next kernels ahead)."""
    m = mask.bool()
    length = m.shape[1]
    pos = torch.arange(1, length + 1, device=m.device)
    last_used = (m.any(dim=0) * pos).max()                       # 0: no caption token at all
    first_gap = torch.where(m.all(dim=0), length + 1, pos).min()  # 1-based; length + 1: none padded
    last_used, first_gap = torch.stack([last_used, first_gap]).tolist()
    n = max(int(last_used), 1)
    full = first_gap > n
    if not full:
        bad, mod = CUDNN_BAD_KEYS
        while any((o + n) % mod == bad for o in key_offsets):
            n += 1
    if n > length:
        more = n - length
        return (torch.nn.functional.pad(embeds, (0, 0, 0, more)), torch.nn.functional.pad(mask, (0, more)), full)
    return ((embeds, mask) if n == length else (embeds[:, :n], mask[:, :n])) + (full,)


def refuse_unknown_modules(modules, known, family: str) -> None:
    """Raise ValueError naming a few of the modules that known(module) says the family's
    transformer does not have: a LoRA file of another model type parses under the same prefix."""
    unknown = sorted(m for m in modules if not known(m))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ValueError(f"{len(unknown)} of its {len(modules)} LoRA modules are not modules of the {family} "
                         f"transformer: {', '.join(unknown[:3])}{more}; is it a LoRA of another model type?")
