"""The interface every model family implements. The family module holds what is specific to the
model and nothing else: parallelism, precision, the loop and I/O live in shared code."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class Components:
    """What a family loaded: the trainable network plus the frozen encoders (freed after caching)."""
    transformer: nn.Module
    encoders: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class ModelFamily(Protocol):
    name: str
    default_format: str

    def load(self, model_spec, paths: dict[str, str], device: torch.device) -> Components:
        """Build the components from the staged local paths (keys: the spec's path fields)."""

    def default_target_modules(self) -> str | list[str]:
        """peft target_modules used when adapter.targetModules is not set."""

    def blocks(self, transformer: nn.Module) -> list[nn.ModuleList]:
        """The lists of repeated blocks: shared code wraps, compiles and shards each block."""

    @torch.no_grad()
    def encode(self, comps: Components, images: torch.Tensor, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per-sample cached tensors (latents, text embeddings) for images in [-1, 1]."""

    def loss(self, comps: Components, batch: dict[str, torch.Tensor], model_spec, training_spec,
             generator: torch.Generator) -> torch.Tensor:
        """Training loss for one micro-batch of cached samples (stacked on the device)."""

    def export(self, lora: dict[str, torch.Tensor], scale: float, fmt: str) -> dict[str, torch.Tensor]:
        """Turn gathered peft LoRA tensors (module path -> lora_A/lora_B) into the file's keys."""
