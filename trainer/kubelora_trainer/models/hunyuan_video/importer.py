"""How `kubelora import-config` reads the [model] keys diffusion-pipe's HunyuanVideo reads
(models/hunyuan_video.py there). transformer_path (or any part) beside ckpt_path replaces that part
of the official layout, in diffusion-pipe and in kubelora."""
from ...import_handlers import SHIFT, SIGMOID_SCALE, Handler, nothing, path, timestep_method, when

MODEL_KEYS: dict[str, Handler] = {
    "ckpt_path": path("ckptPath"),
    "transformer_path": path("transformerPath"),
    "vae_path": path("vaePath"),
    "llm_path": path("llmPath"),
    "clip_path": path("clipPath"),
    "guidance": when(1.0, nothing, "kubelora trains HunyuanVideo with the embedded guidance 1.0; remove the key"),
    "shift": SHIFT,
    "timestep_sample_method": timestep_method,
    "sigmoid_scale": SIGMOID_SCALE,
}
