"""Cosmos 1.0 text-to-world. Torch-free: the rules the spec checks (family.py, keys.py, tiny.py,
configs/ hold the rest). Cosmos 1.0 trains only at its released sizes and frame counts."""
from ..rules import FamilyRules, SamplingRules

SIZES = ((960, 960), (960, 704), (704, 960), (1280, 704), (704, 1280))
FRAMES = (1, 121)
# Test-only: tiny Cosmos models cannot train at 960 px on a CPU, and the trainer under test runs in
# torchrun subprocesses (nothing to monkeypatch), so tests set this to lift the fixed-size rule.
ANY_SIZE_ENV = "KUBELORA_COSMOS_ALLOW_ANY_SIZE"
# Test-only, likewise: NVIDIA's safety guardrail (cosmos_guardrail and its models) cannot run here, so
# tests set this to "stand-in" to sample through a pass-through checker. Never set it in a job: the
# NVIDIA Open Model License ends the rights of whoever bypasses the model's guardrail.
GUARDRAIL_ENV = "KUBELORA_COSMOS_GUARDRAIL"

RULES = FamilyRules(sources=(("transformerPath", "vaePath", "textEncoderPath"),), video=True, flow_matching=False,
                    folder_paths=("textEncoderPath",),  # the T5 weights and the t5-11b tokenizer
                    sizes=SIZES, frames=FRAMES, default_frames=121, fps=24, formats=("comfyui", "diffusers"),
                    sampling=SamplingRules(guidance=7.0, steps=36, negative_prompt=True),
                    released_blocks=(("transformer_blocks", 36),))   # 14B; 7B: 28
