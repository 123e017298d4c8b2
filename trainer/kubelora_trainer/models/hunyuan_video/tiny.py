"""A tiny random-weight HunyuanVideo, written offline in the two layouts users have:

  comfyui   the ComfyUI files: a transformer .safetensors in the original HunyuanVideo key
            layout (bf16, or fp8 e4m3fn like the community fp8 files), a VAE .safetensors, an LLM
            folder (Llama + tokenizer, standing in for llava-llama-3-8b-text-encoder-tokenizer)
            and a CLIP-L folder. Spec: transformerPath, vaePath, llmPath, clipPath.
  official  Tencent's release folder: hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt
            ({"module": state dict}), hunyuan-video-t2v-720p/vae/{pytorch_model.pt,config.json},
            text_encoder/ and text_encoder_2/. Spec: ckptPath.

Everything HunyuanVideo fixes but its tensors do not show is kept as released (RoPE axes
16/56/56, so 128-wide heads; VAE group norm 32 and 8x spatial / 4x temporal compression): the
trainer reads these files with the shipped full-size configs, as it reads the real ones. Both
layouts of one seed hold the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=128, num_layers=1,
                   num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                   guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32)
VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16)
LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def llama_tokenizer():
    """A byte-level BPE tokenizer with Llama-3's special tokens (BOS prepended, right padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("{", "}"), ("Ġ", "a"), ("e", "d"), ("i", "n"), ("Ġ", "s"), ("Ġ", "t"), ("r", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(LLAMA_SPECIALS))
    bos = LLAMA_SPECIALS[0]
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tk.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token="<|eot_id|>",
                                  pad_token="<|end_of_text|>", padding_side="right", model_max_length=4096)
    return tok


def _text_encoders(seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM

    from ...synthetic import tiny_clip_tokenizer

    torch.manual_seed(seed + 1)
    tok = llama_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=TRANSFORMER["text_embed_dim"], intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    clip_tok, clip_vocab = tiny_clip_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=TRANSFORMER["pooled_projection_dim"], intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1))
    return (llm, tok), (clip, clip_tok)


def tiny_weights(seed: int = 0):
    """(original-layout transformer state dict, VAE state dict) of the tiny model, float32."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    from .keys import to_original

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(**TRANSFORMER)
    vae = AutoencoderKLHunyuanVideo(**VAE)
    return to_original(transformer.state_dict()), vae.state_dict()


def _cast(sd: dict, dtype: str) -> dict:
    import torch
    return {k: v.to(getattr(torch, dtype)).contiguous() for k, v in sd.items()}


def build_tiny_hunyuan_video(out: Path, layout: str = "comfyui", transformer_dtype: str = "bfloat16",
                             seed: int = 0) -> dict[str, Path]:
    """Write the tiny model to out in `layout`; returns the spec path fields -> local paths."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    transformer_sd, vae_sd = tiny_weights(seed)
    (llm, tok), (clip, clip_tok) = _text_encoders(seed)
    if layout == "comfyui":
        paths = {"transformerPath": out / "diffusion_models" / f"hunyuan_video_tiny_{transformer_dtype}.safetensors",
                 "vaePath": out / "vae" / "hunyuan_video_vae_tiny.safetensors",
                 "llmPath": out / "llava-llama-3-tiny-text-encoder-tokenizer",
                 "clipPath": out / "clip-vit-large-patch14-tiny"}
        for f in ("transformerPath", "vaePath"):
            paths[f].parent.mkdir(parents=True, exist_ok=True)
        save_file(_cast(transformer_sd, transformer_dtype), str(paths["transformerPath"]))
        save_file(_cast(vae_sd, "bfloat16"), str(paths["vaePath"]))
        llm_dir, clip_dir = paths["llmPath"], paths["clipPath"]
    elif layout == "official":
        root = out / "hunyuan-video-t2v-720p"
        (root / "transformers").mkdir(parents=True, exist_ok=True)
        (root / "vae").mkdir(parents=True, exist_ok=True)
        torch.save({"module": _cast(transformer_sd, transformer_dtype)}, root / "transformers" / "mp_rank_00_model_states.pt")
        torch.save(_cast(vae_sd, "bfloat16"), root / "vae" / "pytorch_model.pt")
        (root / "vae" / "config.json").write_text(json.dumps({
            "_class_name": "AutoencoderKLCausal3D", "latent_channels": VAE["latent_channels"],
            "block_out_channels": list(VAE["block_out_channels"]), "layers_per_block": VAE["layers_per_block"],
            "time_compression_ratio": 4, "scaling_factor": 0.476986}, indent=1))
        paths = {"ckptPath": out}
        llm_dir, clip_dir = out / "text_encoder", out / "text_encoder_2"
    else:
        raise ValueError(f"layout {layout!r}: comfyui or official")
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    clip.save_pretrained(clip_dir)
    clip_tok.save_pretrained(clip_dir)
    return paths


def write_flux_bfl_like(path: Path) -> Path:
    """A small file with the key layout of a Flux BFL transformer (the wrong family), for tests."""
    import torch
    from safetensors.torch import save_file

    keys = ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
            "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight",
            "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight", "final_layer.linear.weight"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(4, 4) for k in keys}, str(path))
    return path


def sliding_square(n: int, size: int = 48, color=(220, 40, 40)):
    """n RGB frames (uint8 arrays) of a square sliding right on white."""
    import numpy as np

    frames = []
    for i in range(n):
        f = np.full((size, size, 3), 245, dtype=np.uint8)
        x = 4 + i * 3
        f[12:36, x:x + 20] = color
        frames.append(f)
    return frames
