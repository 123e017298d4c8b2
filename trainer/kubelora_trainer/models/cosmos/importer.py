"""How `kubelora import-config` reads the [model] keys diffusion-pipe's Cosmos reads (models/cosmos.py there)."""
import re
from typing import Any

from ...import_handlers import Ctx, Handler, path

WEIGHTS_FILE = re.compile(r"\.(safetensors|pt|pth|bin|ckpt)$")


def text_encoder(ctx: Ctx, key: str, value: Any) -> None:
    """diffusion-pipe loads the T5 encoder from this file and the tokenizer from a copy it ships;
    kubelora reads both from a folder (model.textEncoderPath): the file's own folder."""
    path("textEncoderPath")(ctx, key, value)
    mapped = ctx.model["textEncoderPath"]
    if WEIGHTS_FILE.search(str(value)):
        ctx.model["textEncoderPath"] = mapped.rsplit("/", 1)[0] + "/"
        ctx.note(key, f"kubelora reads the T5 encoder and its tokenizer from a folder: textEncoderPath is "
                      f"{ctx.model['textEncoderPath']}; put the google-t5/t5-11b tokenizer files (spiece.model or "
                      "tokenizer.json) beside the encoder there (diffusion-pipe ships them itself)")


MODEL_KEYS: dict[str, Handler] = {
    "transformer_path": path("transformerPath"),
    "vae_path": path("vaePath"),
    "text_encoder_path": text_encoder,
}

# diffusion-pipe adapts every nn.Linear inside GeneralDITTransformerBlock (models/base.py
# get_target_modules), the AdaLN modulation linears included
LORA_TARGETS_NOTE = ("diffusion-pipe also puts LoRA on each block's AdaLN modulation linears (adaLN_modulation.1 and "
                     "adaLN_modulation.2 of each sub-block in the original naming; norm1/norm2/norm3.linear_1 and "
                     ".linear_2 in diffusers'); kubelora's default adapter.targetModules leave them out (the attention "
                     "and MLP linears are the same): list them in adapter.targetModules to train them too")
