"""HunyuanVideo. Torch-free: the rules the spec checks (family.py, keys.py, tiny.py, configs/ hold
the rest)."""
from ..rules import FamilyRules, SamplingRules

RULES = FamilyRules(sources=(("ckptPath",), ("transformerPath", "vaePath", "llmPath", "clipPath")),
                    video=True, frame_rule=(4, 1), default_frames=1, fps=24, formats=("original", "diffusers"),
                    # guidance: the embedded (distilled) guidance, as HunyuanVideoPipeline's guidance_scale
                    sampling=SamplingRules(guidance=6.0, steps=30),
                    cache_format=1,  # 1: one-frame items and the empty caption with the image prompt template
                    released_blocks=(("transformer_blocks", 20), ("single_transformer_blocks", 40),
                                     ("context_embedder.token_refiner.refiner_blocks", 2)))
