"""Stable Diffusion XL and its fine-tunes. Torch-free: the rules the spec checks (family.py,
keys.py, tiny.py, configs/ hold the rest)."""
from ..rules import FamilyRules, SamplingRules

RULES = FamilyRules(sources=(("diffusersPath",), ("checkpointPath",)), options=("vPred", "zeroTerminalSnr", "minSnrGamma"),
                    token_patch=(1, 1, 1), formats=("kohya", "diffusers"), trains_text_encoders=True,
                    flow_matching=False,
                    sampling=SamplingRules(guidance=5.0, steps=25, negative_prompt=True),
                    cache_format=1)  # 1: caption ids as [n, 77] windows of 75 tokens (were cut at 77)
