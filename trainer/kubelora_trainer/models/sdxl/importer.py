"""How `kubelora import-config` reads the [model] keys diffusion-pipe's SDXL reads (models/sdxl.py there)."""
from typing import Any

from ...import_handlers import Ctx, Handler, flag, kept, number, path, refused, to


EPSILON_NOTE = ("diffusion-pipe then trains epsilon prediction on the checkpoint's schedule; kubelora takes the "
                "objective from the checkpoint (its v_pred/ztsnr keys, or the diffusers scheduler's config), the same "
                "for an epsilon checkpoint (the run's log names the objective used)")


def v_pred(ctx: Ctx, key: str, value: Any) -> None:
    if not flag(value):
        ctx.note(key, "false: " + EPSILON_NOTE)
        return
    ctx.model["vPred"] = True
    ctx.model["zeroTerminalSnr"] = True  # diffusion-pipe rescales the schedule to zero terminal SNR with v_pred


# keys whose absence means something in diffusion-pipe that kubelora's default does not
ABSENT_NOTES = {"v_pred": "unset: " + EPSILON_NOTE}

MODEL_KEYS: dict[str, Handler] = {
    "checkpoint_path": path("checkpointPath"),
    "v_pred": v_pred,
    "min_snr_gamma": to("model", "minSnrGamma", number),
    "debiased_estimation_loss": refused("debiased estimation loss weighting is not supported (diffusion-pipe turns it "
                                        "on whenever the key is present, even = false): remove the key"),
    "unet_lr": kept(number),     # kubelora's two learning rates are set from these and [optimizer] lr
    "text_encoder_1_lr": kept(number),
    "text_encoder_2_lr": kept(number),
}

# diffusion-pipe adapts every nn.Linear inside the UNet's down, mid and up blocks and inside both
# text encoders (models/sdxl.py configure_adapter)
LORA_TARGETS_NOTE = ("diffusion-pipe also puts LoRA on each UNet resnet's time_emb_proj (down, mid and up blocks) and on "
                     "text_encoder_2's text_projection; kubelora's default adapter.targetModules leave them out (the "
                     "attention, projection and MLP linears of the transformer blocks and of both text encoders' layers "
                     "are the same): list time_emb_proj in adapter.targetModules to train it too (targetModules "
                     "applies to the UNet; text_encoder_2's text_projection cannot be targeted)")
# what init_from_existing then means for a file diffusion-pipe trained (import_config appends it)
INIT_FROM_NOTE = ("; with init_from_existing, a file holding time_emb_proj LoRA is refused at the run's start until "
                  "adapter.targetModules lists it, and one holding text_projection LoRA is refused (start from a file "
                  "without it)")
