"""What `kubelora import-config` does with each key of a diffusion-pipe config: one table per
TOML section, every key handled in exactly one of three ways, with diffusion-pipe's meaning
(read from its code, not its key names):

- mapped: the manifest gets a field with the same meaning (maybe with a note on a difference);
- noted: nothing to set (it changes how a run is carried out, not what is trained), or what
  changes is said in a note;
- refused: kubelora cannot train what the key asks for; the import stops (rc 2) naming the key
  and what to do.

Handlers take (ctx, key, value) and write into ctx; `docs/import-config.md` lists every key.
Pure: no I/O.
"""
from __future__ import annotations

import importlib
import math
from typing import Any

from .import_handlers import Ctx, Handler, keep, noted, nothing, refused, to
from .families import RULES
from .models import FAMILIES

MODEL_TYPES = {t: t for t in FAMILIES}  # diffusion-pipe's type names are kubelora's
OTHER_MODEL_TYPES = ("lumina_2", "wan", "chroma", "hidream", "sd3", "cosmos_predict2", "anima", "omnigen2",
                     "qwen_image", "hunyuan_image", "auraflow", "z_image", "hunyuan_video_15", "flux2", "ernie_image",
                     "ltx2", "ideogram4", "krea2", "minimax_h3")
VIDEO_TYPES = tuple(t for t, r in RULES.items() if r.video)


# ---------------------------------------------------------------- main (top level)

def lr_scheduler(ctx: Ctx, key: str, value: Any) -> None:
    if value not in ("constant", "linear", "cosine"):
        ctx.refuse(key, f"{value!r} is not a diffusion-pipe schedule; use constant, linear or cosine")
    if value != "constant":
        ctx.training["lrScheduler"] = value
        ctx.note(key, f"{value}: kubelora decays to 0 at training.steps (diffusion-pipe: over epochs after the warmup"
                      + (", to 1e-6)" if value == "cosine" else ")"))


def force_constant_lr(ctx: Ctx, key: str, value: Any) -> None:
    ctx.extra["force_constant_lr"] = float(value)
    ctx.note(key, f"learning rate {value} for every parameter, constant, no warmup (overrides lr_scheduler, "
                  "warmup_steps and per-part learning rates, as in diffusion-pipe)")


def micro_batch(ctx: Ctx, key: str, value: Any) -> None:
    if not isinstance(value, int):
        ctx.refuse(key, "per-resolution batch sizes are not supported (one size per job); set one integer")
    ctx.training["microBatchSize"] = value


def image_micro_batch(ctx: Ctx, key: str, value: Any) -> None:
    ctx.extra[key] = value
    ctx.note(key, "one micro batch size for images and videos: training.microBatchSize")


def activation_checkpointing(ctx: Ctx, key: str, value: Any) -> None:
    if value not in (True, False, "unsloth"):
        ctx.refuse(key, f"{value!r}: use true, false or 'unsloth'")
    ctx.training["gradientCheckpointing"] = bool(value)
    if value == "unsloth":
        ctx.note(key, "'unsloth' (activations offloaded to CPU) becomes plain activation checkpointing")


def video_clip_mode(ctx: Ctx, key: str, value: Any) -> None:
    if value not in ("single_beginning", "single_middle", "multiple_overlapping"):
        ctx.refuse(key, f"{value!r}: use single_beginning, single_middle or multiple_overlapping")
    if value == "single_beginning":
        return
    if ctx.model_type not in VIDEO_TYPES:
        ctx.note(key, "an image model: no clips to take")
        return
    ctx.dataset["videoClipMode"] = value


def uncond_fraction(ctx: Ctx, key: str, value: Any) -> None:
    if value:
        ctx.dataset["captionDropout"] = float(value)


def loss_change(ctx: Ctx, key: str, value: Any) -> None:
    if ctx.model_type in ("flux", "hunyuan-video"):
        ctx.refuse(key, "kubelora trains with the mean squared error; a Huber / smooth-L1 loss is not supported: "
                        "remove the key")
    ctx.note(key, f"diffusion-pipe ignores it for {ctx.model_type} too (its own loss)")


MAIN: dict[str, Handler] = {
    "output_dir": keep, "dataset": keep, "epochs": keep, "max_steps": keep,
    "model": keep, "adapter": keep, "optimizer": keep, "monitoring": keep,
    "eval_datasets": noted("evaluation datasets are not run: kubelora reports the training loss"),
    "micro_batch_size_per_gpu": micro_batch,
    "image_micro_batch_size_per_gpu": image_micro_batch,
    "eval_micro_batch_size_per_gpu": noted("no evaluation runs"),
    "eval_image_micro_batch_size_per_gpu": noted("no evaluation runs"),
    "eval_gradient_accumulation_steps": noted("no evaluation runs"),
    "eval_every_n_steps": noted("no evaluation runs"),
    "eval_every_n_epochs": noted("no evaluation runs"),
    "eval_every_n_examples": noted("no evaluation runs"),
    "eval_before_first_step": noted("no evaluation runs"),
    "gradient_accumulation_steps": to("training", "gradientAccumulationSteps", int),
    "gradient_clipping": to("training", "maxGradNorm", lambda v: float(v) if v else None),
    "steps_per_print": noted("progress is printed every training.logEvery steps"),
    "logging_steps": to("training", "logEvery", int),
    "warmup_steps": to("training", "warmupSteps", int),
    "lr_scheduler": lr_scheduler,
    "force_constant_lr": force_constant_lr,
    "pipeline_stages": noted("kubelora shards with FSDP2 over all GPUs instead of pipeline stages"),
    "partition_method": noted("kubelora shards with FSDP2 over all GPUs instead of pipeline stages"),
    "partition_split": noted("kubelora shards with FSDP2 over all GPUs instead of pipeline stages"),
    "activation_checkpointing": activation_checkpointing,
    "reentrant_activation_checkpointing": noted("kubelora's checkpointing is non-reentrant; the math is the same"),
    "blocks_to_swap": noted("no partial block swapping: FSDP2 shards the model over GPUs, and training.cpuOffload: true "
                            "keeps every block in CPU memory (not N of them); set it if one GPU is short of memory"),
    "disable_block_swap_for_eval": noted("no block swapping and no evaluation runs"),
    "compile": to("training", "compile", bool),
    "save_every_n_epochs": noted("the LoRA is written at the end of the run"),
    "save_every_n_steps": noted("the LoRA is written at the end of the run"),
    "save_every_n_examples": noted("the LoRA is written at the end of the run"),
    "checkpoint_every_n_epochs": noted("training-state checkpoints are not written yet"),
    "checkpoint_every_n_minutes": noted("training-state checkpoints are not written yet"),
    "resume_from_checkpoint": noted("resuming is not supported yet"),
    "save_dtype": noted("kubelora writes LoRA tensors in float32"),
    "caching_batch_size": noted("latents are cached one item at a time on every rank; no effect on the result"),
    "map_num_proc": noted("no effect on the result"),
    "regenerate_cache": noted("kubelora's cache keys cover every input, so a stale cache is never reused"),
    "x_axis_examples": noted("no TensorBoard: progress and loss go to the log, status and manifest.json"),
    "video_clip_mode": video_clip_mode,
    "uncond_fraction": uncond_fraction,
    "huber_delta": loss_change,
    "smooth_l1_beta": loss_change,
    "lora": noted("legacy table; LoRA master weights are float32"),
}


# ---------------------------------------------------------------- [model]

def model_dtype(ctx: Ctx, key: str, value: Any) -> None:
    if value == "float16":
        ctx.note(key, "float16 becomes bfloat16 (kubelora does not scale the loss, which float16 training needs)")
        value = "bfloat16"
    if value not in ("bfloat16", "float32"):
        ctx.refuse(key, f"{value!r}: use bfloat16 or float32")
    ctx.model["dtype"] = value


def transformer_dtype(ctx: Ctx, key: str, value: Any) -> None:
    if value in ("float8", "float8_e4m3fn"):
        # diffusion-pipe casts the weights to e4m3 and autocast upcasts them at each use: fp8
        # storage, bf16 GEMMs; kubelora's float8Compute dequant is that (with a scale per row)
        ctx.model.update(transformerDtype="float8", float8Compute="dequant")
        ctx.note(key, "float8 weights that multiply in model.dtype, as diffusion-pipe does (kubelora keeps a scale "
                      "per row); model.float8Compute: fp8 also runs the GEMMs in fp8, faster on Ada/Hopper GPUs")
    elif str(value).startswith("float8"):
        ctx.refuse(key, f"{value!r}: kubelora stores float8 weights as e4m3 (float8 / float8_e4m3fn)")
    elif value != ctx.extra.get("dtype"):
        ctx.refuse(key, f"{value!r}: the base weights are kept in model.dtype; remove the key or set it to dtype")


# keys every family reads; each family's own keys are in models/<family>/importer.py
MODEL_COMMON: dict[str, Handler] = {
    "type": nothing,  # read before the table
    "dtype": model_dtype,
    "transformer_dtype": transformer_dtype,
    "diffusion_model_dtype": noted("only read by diffusion-pipe's ComfyUI-based models"),
    "cache_text_embeddings": noted("text embeddings are cached where the family allows (not for SDXL, whose text "
                                   "encoders are trained)"),
}


def family_keys(model_type: str) -> dict[str, Handler]:
    return importlib.import_module(f"{__package__}.models.{FAMILIES[model_type]}.importer").MODEL_KEYS


def model_table(model_type: str) -> dict[str, Handler]:
    """The [model] handlers for one family: the common keys, the family's own, and a note for a key
    diffusion-pipe reads only for other families (it ignores it for this one too)."""
    table: dict[str, Handler] = {}
    for other in FAMILIES:
        for key in family_keys(other):
            readers = ", ".join(t for t in FAMILIES if key in family_keys(t))
            table[key] = noted(f"diffusion-pipe reads it for {readers} only; ignored for {model_type}, as there")
    return {**table, **MODEL_COMMON, **family_keys(model_type)}


# ---------------------------------------------------------------- [adapter]

def adapter_type(ctx: Ctx, key: str, value: Any) -> None:
    if value != "lora":
        ctx.refuse(key, f"{value!r}: kubelora trains LoRA adapters (type = 'lora'), or every weight when the "
                        f"config has no [adapter] table (a full fine-tune)")


ADAPTER: dict[str, Handler] = {
    "type": adapter_type,
    "rank": to("adapter", "rank", int),
    "alpha": to("adapter", "alpha", float),
    "dtype": noted("LoRA master weights are float32 (computed in model.dtype)"),
    "dropout": to("adapter", "dropout", float),
    "decompose_factor": noted("a LoKr setting; no effect on LoRA"),
    "rank_dropout": noted("a LoKr setting; no effect on LoRA"),
    "exclude_modules": refused("excluding modules is not supported; list the modules to adapt in "
                               "adapter.targetModules of the manifest instead, and remove the key"),
    "init_from_existing": refused("starting from an existing LoRA is not supported yet: remove the key"),
    "fuse_adapters": refused("fusing LoRAs into the base before training is not supported: merge them into the "
                             "base checkpoint first, and remove the key"),
}


# ---------------------------------------------------------------- [optimizer]

ADAMW_LIKE = {"adamw": None, "adamw_optimi": None, "adamw8bit": "8-bit optimizer states become float32 states "
              "(more memory, the same updates within rounding)",
              "adamw8bitkahan": "8-bit states with Kahan summation become float32 AdamW states",
              "stableadamw": "becomes AdamW without StableAdamW's per-tensor update clipping",
              "offload": "optimizer states stay on the GPU (sharded by FSDP2)"}


def optimizer_type(ctx: Ctx, key: str, value: Any) -> None:
    name = str(value)
    if name.lower() not in ADAMW_LIKE:
        ctx.refuse(key, f"{name!r}: kubelora trains with AdamW, and {name}'s lr means something else; use "
                        "type = 'adamw' with an AdamW learning rate")
    if ADAMW_LIKE[name.lower()]:
        ctx.note(key, f"{name}: {ADAMW_LIKE[name.lower()]}")


def betas(ctx: Ctx, key: str, value: Any) -> None:
    ctx.training["betas"] = [float(b) for b in value]


OPTIMIZER: dict[str, Handler] = {
    "type": optimizer_type,
    "lr": keep,
    "betas": betas,
    "weight_decay": to("training", "weightDecay", float),
    "eps": to("training", "epsilon", float),
    "beta2_half_life": refused("betas[1] from a half-life in samples is not computed: set betas = [b1, b2] with "
                               "b2 = 0.5 ** (global batch size / half-life), and remove the key"),
    "gradient_release": noted("gradients are reduced and applied after each step (gradient release is a memory "
                              "optimisation; note that it disables gradient clipping in diffusion-pipe)"),
}


# ---------------------------------------------------------------- [monitoring]

MONITORING: dict[str, Handler] = {
    "enable_wandb": noted("no Weights & Biases: progress goes to the log, the job's status and manifest.json"),
    "wandb_api_key": noted("not copied: secrets never go into a manifest"),
    "wandb_tracker_name": noted("no Weights & Biases"),
    "wandb_run_name": noted("no Weights & Biases"),
}


# ---------------------------------------------------------------- dataset (top level and [[directory]])

def area_side(value: Any, model_type: str) -> int:
    """diffusion-pipe's resolution entry as kubelora's square side: an entry is a side whose
    square is the area; a [w, h] pair means the area w*h (not a rectangle); rounded to the
    family's multiple as diffusion-pipe rounds bucket sides."""
    side = math.sqrt(value[0] * value[1]) if isinstance(value, (list, tuple)) else float(value)
    m = RULES[model_type].size_multiple  # diffusion-pipe's pixels_round_to_multiple: 32 for LTX, else 16
    return max(m, int(round(side / m)) * m)


def resolutions(ctx: Ctx, key: str, value: Any) -> None:
    if ctx.model_type == "cosmos":
        ctx.note(key, "cosmos trains at its size_buckets")
        return
    sides = sorted(set(area_side(v, ctx.model_type) for v in value))
    ctx.dataset.pop("resolution", None), ctx.dataset.pop("resolutions", None)
    if len(sides) == 1:
        ctx.dataset["resolution"] = sides[0]
    else:
        ctx.dataset["resolutions"] = sides
    pairs = [v for v in value if isinstance(v, (list, tuple))]
    if pairs:
        ctx.note(key, f"{pairs[0]} is an area in diffusion-pipe, not a rectangle: trained as the area "
                      f"{sides[-1]}x{sides[-1]} (square unless aspect-ratio buckets are on)")


def ar_bucket(ctx: Ctx, key: str, value: Any) -> None:
    if ctx.model_type == "cosmos":
        ctx.note(key, "cosmos trains at its size_buckets")
        return
    ctx.dataset["enableArBucket"] = bool(value)


def ar_setting(field: str, cast) -> Handler:
    def handler(ctx: Ctx, key: str, value: Any) -> None:
        if ctx.model_type == "cosmos":
            ctx.note(key, "cosmos trains at its size_buckets")
            return
        ctx.dataset[field] = cast(value)
    return handler


def ar_buckets(ctx: Ctx, key: str, value: Any) -> None:
    if ctx.model_type == "cosmos":
        ctx.note(key, "cosmos trains at its size_buckets")
        return
    ars = sorted(v[0] / v[1] if isinstance(v, (list, tuple)) else float(v) for v in value)
    ctx.dataset.update(enableArBucket=True, minAr=min(ars[0], 1.0), maxAr=max(ars[-1], 1.0), numArBuckets=len(ars))
    ctx.note(key, f"kubelora spaces its ratios evenly in log space: {len(ars)} buckets from {ars[0]:.3g} to "
                  f"{ars[-1]:.3g} (dataset.minAr/maxAr/numArBuckets) rather than exactly these")


def frame_buckets(ctx: Ctx, key: str, value: Any) -> None:
    if ctx.model_type not in VIDEO_TYPES:
        ctx.note(key, "an image model: frames are 1")
        return
    if ctx.model_type == "cosmos":
        ctx.note(key, "cosmos takes its frame count from size_buckets")
        return
    ctx.dataset.pop("frames", None)
    ctx.dataset["frameBuckets"] = sorted({int(f) for f in value} | {1})


def size_buckets(ctx: Ctx, key: str, value: Any) -> None:
    w, h, f = (int(x) for x in value[0])
    ctx.dataset.pop("resolution", None)
    ctx.dataset.update(width=w, height=h)
    if ctx.model_type in VIDEO_TYPES:
        ctx.dataset["frames"] = f
    if len(value) > 1:
        ctx.note(key, f"one size per job for now: every item is resized to cover {w}x{h} and centre-cropped"
                      + (f", {f} frames" if ctx.model_type in VIDEO_TYPES else "")
                      + f" (diffusion-pipe puts each item in the nearest of {len(value)} buckets)")


def repeats(ctx: Ctx, key: str, value: Any) -> None:
    if float(value) != int(value) or value < 1:
        ctx.refuse(key, f"{value}: repeats are whole numbers >= 1 in kubelora")
    ctx.dataset["repeats"] = int(value)


def shuffle_tags(ctx: Ctx, key: str, value: Any) -> None:
    ctx.dataset["shuffleTags"] = bool(value)
    if value and "shuffleVariants" not in ctx.dataset:
        ctx.dataset["shuffleVariants"] = 1  # diffusion-pipe: shuffle_tags alone caches one shuffled caption


def cache_shuffle_num(ctx: Ctx, key: str, value: Any) -> None:
    if value:
        ctx.dataset.update(shuffleTags=True, shuffleVariants=int(value))


def shuffle_delimiter(ctx: Ctx, key: str, value: Any) -> None:
    ctx.dataset["tagDelimiter"] = str(value)  # dropped with a note when nothing is shuffled (import_config)


def skip_empty_caption(ctx: Ctx, key: str, value: Any) -> None:
    ctx.dataset["missingCaption"] = "skip" if value else "empty"


def mask_path(ctx: Ctx, key: str, value: Any) -> None:
    """The directory's masks folder -> its maskUri (the same stem, the red channel weighing the loss)."""
    ctx.dataset["maskUri"] = ctx.extra["map_path"](str(value))


DATASET: dict[str, Handler] = {
    "directory": keep,
    "resolutions": resolutions,
    "enable_ar_bucket": ar_bucket,
    "min_ar": ar_setting("minAr", float),
    "max_ar": ar_setting("maxAr", float),
    "num_ar_buckets": ar_setting("numArBuckets", int),
    "ar_buckets": ar_buckets,
    "frame_buckets": frame_buckets,
    "size_buckets": size_buckets,
    "num_repeats": repeats,
    "shuffle_tags": shuffle_tags,
    "cache_shuffle_num": cache_shuffle_num,
    "cache_shuffle_delimiter": shuffle_delimiter,
    "caption_prefix": to("dataset", "captionPrefix", str),
    "skip_empty_caption": skip_empty_caption,
    "shuffle_metadata": noted("only the order of caching; no effect on the result"),
    "online_captions": noted("captions are read when caching; no effect on the result"),
    "subsample_ratio": refused("training on a subset is not supported: remove the key or subset the folder"),
}

DIRECTORY: dict[str, Handler] = {
    **{k: v for k, v in DATASET.items() if k not in ("directory", "subsample_ratio")},
    "path": keep,
    "mask_path": mask_path,
    "default_mask_file": refused("a mask for items without their own (diffusion-pipe: for testing) is not supported; "
                                 "items without a mask in mask_path train unmasked: remove the key"),
    "control_path": refused("edit (control image) datasets such as Flux Kontext's are not supported yet; training "
                            "without them would make a text-to-image LoRA: remove control_path only if that is wanted"),
}

SECTIONS: dict[str, dict[str, Handler]] = {
    "main": MAIN, "model": {k: h for t in FAMILIES for k, h in model_table(t).items()}, "adapter": ADAPTER, "optimizer": OPTIMIZER, "monitoring": MONITORING,
    "dataset": DATASET, "directory": DIRECTORY,
}


def apply(ctx: Ctx, section: str, table: dict[str, Any]) -> None:
    """Run every key of one TOML table through its section's handlers; a key no handler knows
    is refused (diffusion-pipe passes unknown [optimizer] keys to the optimizer) or noted."""
    handlers = model_table(ctx.model_type) if section == "model" else SECTIONS[section]
    ctx.section = "" if section == "main" else section
    for key, value in table.items():
        h = handlers.get(key)
        if h is None:
            if section == "optimizer":
                ctx.refuse(key, "diffusion-pipe passes this to the optimizer; kubelora's AdamW takes lr, betas, "
                                "weight_decay and eps: remove the key")
            ctx.note(key, "not a key diffusion-pipe reads here (a typo?); ignored")
            continue
        h(ctx, key, value)
