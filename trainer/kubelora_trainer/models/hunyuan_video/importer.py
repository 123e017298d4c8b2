"""How `kubelora import-config` reads the [model] keys diffusion-pipe's HunyuanVideo reads
(models/hunyuan_video.py there). transformer_path (or any part) beside ckpt_path replaces that part
of the official layout, in diffusion-pipe and in kubelora."""
from ...import_handlers import SHIFT, SIGMOID_SCALE, Handler, nothing, path, timestep_method, transformer_dtype, when
from .targets import DIFFUSION_PIPE_TARGETS

MODEL_KEYS: dict[str, Handler] = {
    "ckpt_path": path("ckptPath"),
    "transformer_path": path("transformerPath"),
    "transformer_dtype": transformer_dtype,
    "vae_path": path("vaePath"),
    "llm_path": path("llmPath"),
    "clip_path": path("clipPath"),
    "guidance": when(1.0, nothing, "kubelora trains HunyuanVideo with the embedded guidance 1.0; remove the key"),
    "shift": SHIFT,
    "timestep_sample_method": timestep_method,
    "sigmoid_scale": SIGMOID_SCALE,
}

# diffusion-pipe adapts every nn.Linear inside MMDoubleStreamBlock / MMSingleStreamBlock
# (models/base.py get_target_modules), the modulation linears (ModulateDiT.linear) included
LORA_TARGETS_NOTE = ("diffusion-pipe also puts LoRA on each block's modulation linear (img_mod.linear and "
                     "txt_mod.linear in the double blocks, modulation.linear in the single blocks; norm1.linear, "
                     "norm1_context.linear and norm.linear in diffusers naming); kubelora's default "
                     "adapter.targetModules leave them out (the attention and MLP linears are the same); to train "
                     "what diffusion-pipe trains, set adapter.targetModules: "
                     f"['{DIFFUSION_PIPE_TARGETS}']")
