"""How `kubelora import-config` reads the [model] keys diffusion-pipe's Flux reads (models/flux.py there)."""
from ...import_handlers import SHIFT, SIGMOID_SCALE, Handler, path, timestep_method, to

MODEL_KEYS: dict[str, Handler] = {
    "diffusers_path": path("diffusersPath"),
    "transformer_path": path("transformerPath"),
    "bypass_guidance_embedding": to("model", "bypassGuidanceEmbedding", bool),
    "flux_shift": to("model", "fluxShift", bool),
    "guidance": to("model", "guidance", float),
    "shift": SHIFT,
    "timestep_sample_method": timestep_method,
    "sigmoid_scale": SIGMOID_SCALE,
}
