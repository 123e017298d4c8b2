"""How `kubelora import-config` reads the [model] keys diffusion-pipe's Cosmos reads (models/cosmos.py there)."""
from ...import_handlers import Handler, path

MODEL_KEYS: dict[str, Handler] = {
    "transformer_path": path("transformerPath"),
    "vae_path": path("vaePath"),
    "text_encoder_path": path("textEncoderPath"),
}
