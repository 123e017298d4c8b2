"""SDXL module names: diffusers <-> original (SGM, as in sd_xl_base_1.0.safetensors, ComfyUI and
Kohya sd-scripts) and the Kohya LoRA key spelling. Pure string functions, no torch.

SDXL's UNet has layers_per_block = 2, so each resolution level takes three SGM input blocks
(two res/attention pairs and a downsampler) and three output blocks:

    down_blocks.i.{resnets|attentions}.j    <-> input_blocks.{3i+j+1}.{0|1}
    down_blocks.i.downsamplers.0.conv       <-> input_blocks.{3i+3}.0.op
    mid_block.resnets.j / attentions.0      <-> middle_block.{2j} / middle_block.1
    up_blocks.i.{resnets|attentions}.j      <-> output_blocks.{3i+j}.{0|1}
    up_blocks.i.upsamplers.0.conv           <-> output_blocks.{3i+2}.2.conv   (SDXL up blocks with an
                                                 upsampler all have attentions, so it sits third)
"""
from __future__ import annotations

import re

LAYERS_PER_BLOCK = 2
_STEP = LAYERS_PER_BLOCK + 1

_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_RESNET_INV = {v: k for k, v in _RESNET.items()}


def _map_rest(rest: str, table: dict[str, str]) -> str:
    """Rename the leading part of a resnet-relative path (".conv1.weight" -> ".in_layers.2.weight")."""
    if not rest:
        return rest
    for a, b in sorted(table.items(), key=lambda kv: -len(kv[0])):
        if rest == "." + a or rest.startswith("." + a + "."):
            return "." + b + rest[len(a) + 1:]
    raise KeyError(rest)


def sgm_unet_name(name: str) -> str:
    """diffusers UNet module or parameter path -> SGM path (without the model.diffusion_model. prefix)."""
    for a, b in _TOP.items():
        if name == a or name.startswith(a + "."):
            return b + name[len(a):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        idx = _STEP * i + j + 1
        return (f"input_blocks.{idx}.0{_map_rest(rest, _RESNET)}" if kind == "resnets"
                else f"input_blocks.{idx}.1{rest}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?", name):
        return f"input_blocks.{_STEP * (int(m[1]) + 1)}.0.op{m[2] or ''}"
    if m := re.fullmatch(r"mid_block\.attentions\.0(\..+)?", name):
        return f"middle_block.1{m[1] or ''}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)(\..+)?", name):
        return f"middle_block.{2 * int(m[1])}{_map_rest(m[2] or '', _RESNET)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        idx = _STEP * i + j
        return (f"output_blocks.{idx}.0{_map_rest(rest, _RESNET)}" if kind == "resnets"
                else f"output_blocks.{idx}.1{rest}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)?", name):
        return f"output_blocks.{_STEP * int(m[1]) + LAYERS_PER_BLOCK}.2.conv{m[2] or ''}"
    raise KeyError(f"no SGM name for the diffusers UNet path {name!r}")


def diffusers_unet_name(name: str) -> str:
    """Inverse of sgm_unet_name."""
    for a, b in _TOP_INV.items():
        if name == a or name.startswith(a + "."):
            return b + name[len(a):]
    if m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op(\..+)?", name):
        return f"down_blocks.{int(m[1]) // _STEP - 1}.downsamplers.0.conv{m[2] or ''}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])(\..+)?", name):
        i, j = divmod(int(m[1]) - 1, _STEP)
        if m[2] == "0":
            return f"down_blocks.{i}.resnets.{j}{_map_rest(m[3] or '', _RESNET_INV)}"
        return f"down_blocks.{i}.attentions.{j}{m[3] or ''}"
    if m := re.fullmatch(r"middle_block\.1(\..+)?", name):
        return f"mid_block.attentions.0{m[1] or ''}"
    if m := re.fullmatch(r"middle_block\.([02])(\..+)?", name):
        return f"mid_block.resnets.{int(m[1]) // 2}{_map_rest(m[2] or '', _RESNET_INV)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.2\.conv(\..+)?", name):
        return f"up_blocks.{int(m[1]) // _STEP}.upsamplers.0.conv{m[2] or ''}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([01])(\..+)?", name):
        i, j = divmod(int(m[1]), _STEP)
        if m[2] == "0":
            return f"up_blocks.{i}.resnets.{j}{_map_rest(m[3] or '', _RESNET_INV)}"
        return f"up_blocks.{i}.attentions.{j}{m[3] or ''}"
    raise KeyError(f"no diffusers name for the SGM UNet path {name!r}")


# ---------------------------------------------------------------- Kohya spelling

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

# Words that contain "_" in the original names; Kohya writes every "." as "_", so these are put
# back together when a key is read.
_COMPOUNDS = ("input_blocks", "output_blocks", "middle_block", "transformer_blocks", "to_q", "to_k", "to_v",
              "to_out", "proj_in", "proj_out", "in_layers", "out_layers", "emb_layers", "skip_connection",
              "time_embed", "label_emb", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
              "final_layer_norm", "layer_norm1", "layer_norm2", "text_projection",
              # diffusers' UNet names, which diffusion-pipe's SDXL files carry in Kohya spelling
              # (diffusers' convert_state_dict_to_kohya: lora_unet_down_blocks_1_attentions_0_...)
              "down_blocks", "up_blocks", "mid_block", "time_emb_proj", "conv_shortcut", "time_embedding",
              "add_embedding", "linear_1", "linear_2", "conv_in", "conv_out", "conv_norm_out")
_DIFFUSERS_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.", "add_embedding.", "conv_in",
                         "conv_out", "conv_norm_out")


def te_canonical(name: str) -> str:
    """CLIP text-model paths as the original checkpoints and Kohya name them: with text_model.
    (recent transformers flatten CLIPTextModel and drop it)."""
    return name if name.startswith("text_model.") or name.startswith("text_projection") else "text_model." + name


def kohya_name(component: str, module: str) -> str:
    """LoRA module name in Kohya sd-scripts' SDXL spelling (lora_unet_input_blocks_4_1_...)."""
    path = sgm_unet_name(module) if component == "unet" else te_canonical(module)
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def from_kohya_name(key: str) -> tuple[str, str]:
    """(component, module path: diffusers for the UNet, canonical text_model.… for text encoders)."""
    for component, prefix in KOHYA_PREFIX.items():
        if key.startswith(prefix):
            path = key[len(prefix):].replace("_", ".")
            for c in _COMPOUNDS:
                path = path.replace(c.replace("_", "."), c)
            if component != "unet":  # a file written from flattened CLIP modules lacks text_model.
                return component, te_canonical(path)
            if path.startswith(_DIFFUSERS_UNET_ROOTS):
                return component, path  # already diffusers' names
            return component, diffusers_unet_name(path)
    raise KeyError(f"{key!r} is not a Kohya SDXL LoRA key (lora_unet_, lora_te1_ or lora_te2_)")
