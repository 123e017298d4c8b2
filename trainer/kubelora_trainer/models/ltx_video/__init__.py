"""LTX-Video. Torch-free: the rules the spec checks (family.py, tiny.py hold the rest)."""
from ..rules import FamilyRules, SamplingRules

RULES = FamilyRules(sources=(("diffusersPath",),), video=True, frame_rule=(8, 1), default_frames=1, fps=25,
                    size_multiple=32, token_patch=(1, 1, 1), formats=("comfyui", "diffusers"),
                    options=("causalTemporalPositioning",),
                    sampling=SamplingRules(guidance=3.0, steps=30, negative_prompt=True),
                    cache_format=2)  # 1: T5 text kept to 256 tokens (was 128); 2: T5 run with the caption mask
