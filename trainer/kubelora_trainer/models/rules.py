"""FamilyRules: what one model family accepts (path fields, options, data shapes, LoRA formats).
Torch-free data: each family's package (models/<family>/__init__.py) holds its RULES."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SamplingRules:
    """How a family samples during training (spec.samples): its defaults and what it accepts."""
    guidance: float                    # default guidance (Flux: the guidance embedding; else classifier-free)
    steps: int = 20                    # default denoising steps
    negative_prompt: bool = False      # whether samples.negativePrompt has an effect


@dataclass(frozen=True)
class FamilyRules:
    sources: tuple[tuple[str, ...], ...]        # accepted sets of path fields (one must be complete)
    optional_paths: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    video: bool = False
    frame_rule: Optional[tuple[int, int]] = None  # frames = k*a + b
    sizes: Optional[tuple[tuple[int, int], ...]] = None
    frames: Optional[tuple[int, ...]] = None
    default_frames: int = 1
    fps: Optional[float] = None                    # training frame rate: videos are resampled to it
    size_multiple: int = 16                        # width and height must be multiples of this
    formats: tuple[str, ...] = ()                  # LoRA file formats; the first is the default
    trains_text_encoders: bool = False             # LoRA on the text encoders too (training.textEncoderLearningRate)
    flow_matching: bool = True                     # rectified flow: training.timestepSampling applies
    folder_paths: tuple[str, ...] = ()             # path fields that name a folder (files beside the weights)
    sampling: Optional[SamplingRules] = None       # spec.samples; None: not yet available for the family
    # linears inside the blocks that, under transformerDtype float8, are stored in fp8 but multiply
    # in model.dtype (substrings of their lower-cased module paths): modulation and norm
    # projections, whose inputs fp8 rounding hurts most and whose GEMMs are tiny (one row per sample)
    fp8_sensitive: tuple[str, ...] = ("norm", "adaln", "time_emb", "modulation")
    # latent (frames, height, width) per denoiser token, for tokens/s and MFU (throughput.py)
    token_patch: tuple[int, int, int] = (1, 2, 2)
    # what this family's encode() writes, in the cache key when nonzero (cache.cache_inputs): bump it
    # when that changes for the same inputs, so old entries of this family are not reused (and
    # other families' entries still are)
    cache_format: int = 0
    # encode() conditions the caption-dropout entry apart from an item whose caption is empty
    # (HunyuanVideo: the image template, as diffusion-pipe's uncond embedding): dataset_phase passes
    # it encode(..., dropout=[...]) and keys the dropout entries apart
    dropout_text: bool = False
    # (diffusers block list, how many its largest released model has), from the shipped configs: a
    # LoRA module on a block past these is not this family's, which tells apart families whose
    # diffusers module names coincide (Flux.1 and HunyuanVideo) when a file has no kubelora metadata
    released_blocks: tuple[tuple[str, int], ...] = ()

    @property
    def paths(self) -> set[str]:
        return {f for src in self.sources for f in src} | set(self.optional_paths)
