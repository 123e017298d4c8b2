"""Which of Flux's transformer linears LoRA adapts (peft matches a string with re.fullmatch).
Torch-free: the importer reads it too."""

# Attention and MLP linears of both block kinds.
DEFAULT_TARGETS = (
    r".*(transformer_blocks|single_transformer_blocks)\.\d+\."
    r"(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)"
)

# Each block's AdaLN modulation linear (norm1 and norm1_context in the double blocks, norm in the
# single ones): diffusion-pipe adapts them too (every nn.Linear inside its block classes).
MODULATION_TARGETS = r"(transformer_blocks\.\d+\.norm1(_context)?|single_transformer_blocks\.\d+\.norm)\.linear"

# What diffusion-pipe's Flux LoRA adapts, as an adapter.targetModules entry.
DIFFUSION_PIPE_TARGETS = f"(?:{DEFAULT_TARGETS})|(?:{MODULATION_TARGETS})"
