"""HunyuanVideo. Torch-free: the rules the spec checks (family.py, keys.py, tiny.py, configs/ hold
the rest)."""
from ..rules import FamilyRules, SamplingRules

RULES = FamilyRules(sources=(("ckptPath",), ("transformerPath", "vaePath", "llmPath", "clipPath")),
                    video=True, frame_rule=(4, 1), default_frames=1, fps=24, formats=("original", "diffusers"),
                    # guidance: the embedded (distilled) guidance, as HunyuanVideoPipeline's guidance_scale
                    sampling=SamplingRules(guidance=6.0, steps=30),
                    # 1: one-frame items and the empty caption with the image prompt template; 2: the image
                    # template for one-frame items and caption dropout only (a clip's empty caption: the video
                    # one), and the VAE tiled as diffusion-pipe
                    cache_format=2, dropout_text=True,
                    released_blocks=(("transformer_blocks", 20), ("single_transformer_blocks", 40),
                                     ("context_embedder.token_refiner.refiner_blocks", 2)))
