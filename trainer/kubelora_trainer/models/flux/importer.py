"""How `kubelora import-config` reads the [model] keys diffusion-pipe's Flux reads (models/flux.py there)."""
from ...import_handlers import SHIFT, SIGMOID_SCALE, Handler, flag, number, path, timestep_method, to, transformer_dtype

MODEL_KEYS: dict[str, Handler] = {
    "diffusers_path": path("diffusersPath"),
    "transformer_path": path("transformerPath"),
    "transformer_dtype": transformer_dtype,
    "bypass_guidance_embedding": to("model", "bypassGuidanceEmbedding", flag),
    "flux_shift": to("model", "fluxShift", flag),
    "guidance": to("model", "guidance", number),
    "shift": SHIFT,
    "timestep_sample_method": timestep_method,
    "sigmoid_scale": SIGMOID_SCALE,
}

# diffusion-pipe adapts every nn.Linear inside FluxTransformerBlock / FluxSingleTransformerBlock
# (models/base.py get_target_modules), the AdaLN modulation linears included
LORA_TARGETS_NOTE = ("diffusion-pipe also puts LoRA on each block's AdaLN modulation linear (norm1.linear and "
                     "norm1_context.linear in the double blocks, norm.linear in the single blocks); kubelora's default "
                     "adapter.targetModules leave them out (the attention and MLP linears are the same): list them in "
                     "adapter.targetModules to train them too")
