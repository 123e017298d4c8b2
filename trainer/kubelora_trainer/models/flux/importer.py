"""How `kubelora import-config` reads the [model] keys diffusion-pipe's Flux reads (models/flux.py there)."""
from typing import Any

from ...import_handlers import SHIFT, SIGMOID_SCALE, Ctx, Handler, flag, number, path, timestep_method, to, transformer_dtype
from .targets import DIFFUSION_PIPE_TARGETS  # noqa: F401 - import_config sets it as adapter.targetModules

# diffusion-pipe's Flux feeds no guidance embedding when bypassing it, so its guidance goes unused
# there; kubelora's spec refuses the pair, so the importer drops guidance (in either key order)
GUIDANCE_BYPASSED = ("ignored: bypass_guidance_embedding = true feeds no guidance embedding (diffusion-pipe ignores "
                     "guidance then too); model.guidance is left out")


def bypass_guidance(ctx: Ctx, key: str, value: Any) -> None:
    ctx.model["bypassGuidanceEmbedding"] = flag(value)
    if ctx.model["bypassGuidanceEmbedding"] and ctx.model.pop("guidance", None) is not None:
        ctx.note("guidance", GUIDANCE_BYPASSED)


def guidance(ctx: Ctx, key: str, value: Any) -> None:
    value = number(value)
    if ctx.model.get("bypassGuidanceEmbedding"):
        ctx.note(key, GUIDANCE_BYPASSED)
    else:
        ctx.model["guidance"] = value


MODEL_KEYS: dict[str, Handler] = {
    "diffusers_path": path("diffusersPath"),
    "transformer_path": path("transformerPath"),
    "transformer_dtype": transformer_dtype,
    "bypass_guidance_embedding": bypass_guidance,
    "flux_shift": to("model", "fluxShift", flag),
    "guidance": guidance,
    "shift": SHIFT,
    "timestep_sample_method": timestep_method,
    "sigmoid_scale": SIGMOID_SCALE,
}

# diffusion-pipe adapts every nn.Linear inside FluxTransformerBlock / FluxSingleTransformerBlock
# (models/base.py get_target_modules), the AdaLN modulation linears included: the import sets that
TARGETS_NOTE = ("adapter.targetModules set to the layers diffusion-pipe adapts: every linear of the transformer's "
                "blocks, each block's AdaLN modulation linear included (norm1.linear and norm1_context.linear in the "
                "double blocks, norm.linear in the single blocks); delete the field for kubelora's default, which "
                "leaves the modulation linears out")
