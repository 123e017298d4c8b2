"""How `kubelora import-config` reads the [model] keys diffusion-pipe's HunyuanVideo reads
(models/hunyuan_video.py there). transformer_path (or any part) beside ckpt_path replaces that part
of the official layout, in diffusion-pipe and in kubelora."""
from ...import_handlers import SHIFT, SIGMOID_SCALE, Handler, nothing, path, timestep_method, transformer_dtype, when
from .targets import DIFFUSION_PIPE_TARGETS  # noqa: F401 - import_config sets it as adapter.targetModules

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
# (models/base.py get_target_modules), the modulation linears (ModulateDiT.linear) included: the
# import sets that. Its model is the original, with fused linears (img_attn_qkv, txt_attn_qkv, the
# single blocks' linear1 = q, k, v and the MLP input); diffusers' (kubelora's) has them apart, so each
# part gets its own rank-r LoRA: at one rank, more LoRA parameters there than diffusion-pipe's.
TARGETS_NOTE = ("adapter.targetModules set to the layers diffusion-pipe adapts: every linear of the transformer's "
                "blocks, each block's modulation linear included (img_mod.linear and txt_mod.linear in the double "
                "blocks, modulation.linear in the single blocks; norm1.linear, norm1_context.linear and norm.linear in "
                "diffusers naming); delete the field for kubelora's default, which leaves the modulation linears out. "
                "Not the same: diffusion-pipe's original model fuses q, k and v (img_attn_qkv, txt_attn_qkv) and the "
                "single blocks' q, k, v and MLP input (linear1) into one linear with one rank-r LoRA; kubelora adapts "
                "diffusers' separate linears, each with its own rank-r LoRA (up to 3x, 4x in linear1, the parameters "
                "there at the same rank; the exported file stacks them into the fused layers, at rank 3r or 4r)")
