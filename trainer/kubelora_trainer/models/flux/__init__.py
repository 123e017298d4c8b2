"""Flux.1 (dev, schnell and their fine-tunes). Torch-free: the rules the spec checks; the family
itself is in family.py, its key maps in keys.py, its LoRA file layouts in formats.py, the tiny
debug flavour in tiny.py and the shipped configs under configs/."""
from ..rules import FamilyRules, SamplingRules

RULES = FamilyRules(sources=(("diffusersPath",),), optional_paths=("transformerPath",),
                    options=("fluxShift", "bypassGuidanceEmbedding", "guidance"),
                    formats=("diffusers", "kohya", "comfyui"),
                    sampling=SamplingRules(guidance=3.5, steps=20),
                    released_blocks=(("transformer_blocks", 19), ("single_transformer_blocks", 38)))
