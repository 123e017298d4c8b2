"""Which of HunyuanVideo's transformer linears LoRA adapts (diffusers names; peft matches a string
with re.fullmatch). Torch-free: the importer reads it too."""

# Attention and MLP linears of both block kinds (peft matches with re.fullmatch). In the
# original layout: img/txt_attn_qkv, img/txt_attn_proj, img/txt_mlp.fc1/fc2, linear1, linear2.
DEFAULT_TARGETS = (
    r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))"
)

# Each block's modulation linear (original img_mod.linear and txt_mod.linear in the double blocks,
# modulation.linear in the single ones): diffusion-pipe adapts them too (every nn.Linear inside
# MMDoubleStreamBlock / MMSingleStreamBlock).
MODULATION_TARGETS = r"(transformer_blocks\.\d+\.norm1(_context)?|single_transformer_blocks\.\d+\.norm)\.linear"

# What diffusion-pipe's HunyuanVideo LoRA adapts, as an adapter.targetModules entry.
DIFFUSION_PIPE_TARGETS = f"(?:{DEFAULT_TARGETS})|(?:{MODULATION_TARGETS})"
