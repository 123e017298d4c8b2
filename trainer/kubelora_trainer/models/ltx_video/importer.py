"""How `kubelora import-config` reads the [model] keys diffusion-pipe's LTX-Video reads (models/ltx_video.py there)."""
from ...import_handlers import SIGMOID_SCALE, Handler, nothing, path, refused, timestep_method, transformer_dtype, when

MODEL_KEYS: dict[str, Handler] = {
    "diffusers_path": path("diffusersPath"),
    "transformer_dtype": transformer_dtype,
    "single_file_path": refused("LTX-Video single-file checkpoints are not read yet: point diffusers_path at a "
                                "complete diffusers folder of the same LTX-Video version and remove single_file_path"),
    "first_frame_conditioning_p": when(0, nothing, "first-frame (image-to-video) conditioning is not supported yet: "
                                                   "remove the key"),
    "timestep_sample_method": timestep_method,
    "sigmoid_scale": SIGMOID_SCALE,
}
