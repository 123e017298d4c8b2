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
import re
from typing import Any, Optional

from .import_handlers import (BadValue, Ctx, Handler, Refused, flag, keep, kept, listed, noted, nothing, number,
                              positive, refused, text, to, whole)
from .buckets import aspect_ratios
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
    ctx.extra["force_constant_lr"] = number(value)
    ctx.note(key, f"learning rate {value} for every parameter, constant, no warmup (overrides lr_scheduler, "
                  "warmup_steps and per-part learning rates, as in diffusion-pipe)")


def micro_batch(ctx: Ctx, key: str, value: Any) -> None:
    """micro_batch_size_per_gpu and image_micro_batch_size_per_gpu (read by batch_size)."""
    if isinstance(value, list):
        ctx.refuse(key, "per-resolution batch sizes are not supported (one size per job); set one integer")
    ctx.extra[key] = whole(value)


def eval_datasets(ctx: Ctx, key: str, value: Any) -> None:
    """[{name, config}] or [config path]: read by evaluation() (the TOMLs, when the CLI read them)."""
    if not isinstance(value, list) or not all(isinstance(v, str) or (isinstance(v, dict) and "config" in v)
                                              for v in value):
        ctx.refuse(key, "expected a list of {name = '...', config = 'eval.toml'} (or of TOML paths)")
    ctx.extra[key] = value


def eval_setting(ctx: Ctx, key: str, value: Any) -> None:
    """The eval_* keys, checked here and mapped by evaluation() (they need eval_datasets and the
    batch size)."""
    if key in ("eval_micro_batch_size_per_gpu", "eval_image_micro_batch_size_per_gpu") and isinstance(value, list):
        ctx.refuse(key, "per-resolution batch sizes are not supported (one size per job); set one integer")
    ctx.extra[key] = flag(value) if key == "eval_before_first_step" else whole(value)


def caption_variants(dataset: dict) -> set[int]:
    """The numbers of shuffled captions the sources of an imported dataset cache per item (1
    without shuffleTags): a diffusion-pipe epoch holds each, a kubelora epoch one per sample."""
    out = set()
    for src in dataset.get("sources") or [{}]:
        if src.get("shuffleTags", dataset.get("shuffleTags", False)):
            out.add(src.get("shuffleVariants", dataset.get("shuffleVariants", 4)))
        else:
            out.add(1)
    return out


def evaluation(ctx: Ctx, eval_tomls: Optional[list[tuple[str, Optional[dict]]]], local) -> Optional[dict]:
    """spec.evaluation from eval_datasets (diffusion-pipe's evaluation, train.py): each eval dataset
    TOML's [[directory]] folders become evaluation.sources (eval_tomls: (config path, its parsed
    TOML or None when it was not read)); eval_every_n_steps -> everySteps, eval_every_n_epochs ->
    everyEpochs, eval_every_n_examples -> everySteps = n // the batch of one GPU (diffusion-pipe:
    // the global batch), eval_before_first_step -> beforeFirstStep, the eval micro batch size ->
    microBatchSize."""
    ctx.section = ""
    x = ctx.extra
    keys = [k for k in ("eval_every_n_steps", "eval_every_n_epochs", "eval_every_n_examples", "eval_before_first_step",
                        "eval_micro_batch_size_per_gpu", "eval_image_micro_batch_size_per_gpu",
                        "eval_gradient_accumulation_steps") if k in x]
    if not x.get("eval_datasets"):
        for k in keys:
            ctx.note(k, "no eval_datasets: no evaluation runs")
        return None
    sources, unread = [], []
    for path, doc in eval_tomls or [(e if isinstance(e, str) else e["config"], None) for e in x["eval_datasets"]]:
        if doc is None:
            unread.append(path)
            continue
        dirs = doc.get("directory") or []
        if not isinstance(dirs, list) or not dirs or not all(isinstance(d, dict) and "path" in d for d in dirs):
            ctx.refuse("eval_datasets", f"{path}: expected [[directory]] tables, each with a path")
        for d in dirs:
            sources.append({"uri": local(str(d["path"])),
                            **({"maskUri": local(str(d["mask_path"]))} if d.get("mask_path") else {})})
        other = sorted({k for k in doc if k != "directory"} | {k for d in dirs for k in d if k not in ("path", "mask_path")})
        if other:
            ctx.note("eval_datasets", f"{path}: {', '.join(other)} not read: kubelora evaluates its held-out folders "
                                      "with the training dataset's sizes, buckets and caption settings")
    if unread:
        ctx.note("eval_datasets", f"{', '.join(unread)} not read (import-config reads them when given the config "
                                  "file): add its [[directory]] folders as evaluation.sources[].uri by hand")
    if not sources:
        return None
    ev: dict = {"sources": sources}
    # diffusion-pipe divides by DeepSpeed's micro batch, micro_batch_size_per_gpu (also for an image
    # family trained at image_micro_batch_size_per_gpu)
    per_gpu = x.get("micro_batch_size_per_gpu", 1) * ctx.training.get("gradientAccumulationSteps", 1)
    if "eval_every_n_steps" in x:
        ev["everySteps"] = x["eval_every_n_steps"]
    if "eval_every_n_examples" in x:
        n = x["eval_every_n_examples"]
        ev["everySteps"] = max(1, n // per_gpu)
        ctx.note("eval_every_n_examples", f"{n} examples: evaluation.everySteps {ev['everySteps']} (= {n} // "
                                          f"{per_gpu}, micro_batch_size_per_gpu x accumulation; with several GPUs "
                                          "divide it by their number, as diffusion-pipe divides by the global batch)")
    if "eval_every_n_epochs" in x:
        n, variants = x["eval_every_n_epochs"], caption_variants(ctx.dataset)
        ev["everyEpochs"] = n
        if len(variants) == 1 and (v := next(iter(variants))) > 1:
            ev["everyEpochs"] = n * v
            ctx.note("eval_every_n_epochs", f"{n}: evaluation.everyEpochs {n * v}: a diffusion-pipe epoch holds each "
                                            f"of the {v} shuffled captions (cache_shuffle_num) of every item, a "
                                            "kubelora epoch one of them, drawn per sample")
        elif len(variants) > 1:
            ctx.note("eval_every_n_epochs", f"{n}: evaluation.everyEpochs {n} counts kubelora epochs, which hold one "
                                            "of an item's shuffled captions where a diffusion-pipe epoch holds each "
                                            f"({'/'.join(map(str, sorted(variants)))} across the directories): "
                                            "evaluated more often; set evaluation.everySteps to match")
    if "eval_before_first_step" in x:
        ev["beforeFirstStep"] = x["eval_before_first_step"]
    size = x.get("eval_micro_batch_size_per_gpu")
    image = x.get("eval_image_micro_batch_size_per_gpu", size)
    if ctx.model_type not in VIDEO_TYPES:
        size = image
    elif image is not None and image != size:
        ctx.note("eval_image_micro_batch_size_per_gpu", f"one evaluation micro batch size per job: images are "
                                                        f"evaluated {size} at a time like videos")
    if size is not None:
        ev["microBatchSize"] = size
    if "eval_gradient_accumulation_steps" in x:
        ctx.note("eval_gradient_accumulation_steps", "batching only (the evaluation loss is the mean over every "
                                                     "held-out item either way): not needed")
    if "everySteps" not in ev and "everyEpochs" not in ev:
        ctx.note("eval_datasets", "no eval_every_n_steps, eval_every_n_examples or eval_every_n_epochs: evaluated "
                                  "before the first step (unless eval_before_first_step = false) and after the last")
    return ev


def batch_size(ctx: Ctx) -> None:
    """training.microBatchSize: diffusion-pipe batches a 1-frame bucket by image_micro_batch_size_per_gpu
    (default micro_batch_size_per_gpu) and a video bucket by micro_batch_size_per_gpu; an image
    family has only 1-frame buckets."""
    size = ctx.extra.get("micro_batch_size_per_gpu", 1)
    image = ctx.extra.get("image_micro_batch_size_per_gpu", size)
    ctx.section = ""
    if ctx.model_type not in VIDEO_TYPES:
        size = image
    elif image != size:
        ctx.note("image_micro_batch_size_per_gpu", f"one micro batch size per job in kubelora: images train "
                                                   f"{size} at a time like videos (diffusion-pipe: {image})")
    ctx.training["microBatchSize"] = size


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
    if value == "multiple_overlapping":
        ctx.note(key, "diffusion-pipe's current code no longer implements it (its branch is commented out and the "
                      "run stops with NotImplementedError); kubelora trains what that branch did: several clips spread "
                      "evenly over each video, overlapping a little, none of it cut off")


def uncond_fraction(ctx: Ctx, key: str, value: Any) -> None:
    if number(value):
        ctx.dataset["captionDropout"] = number(value)


def loss_change(ctx: Ctx, key: str, value: Any) -> None:
    if ctx.model_type in ("flux", "hunyuan-video"):
        ctx.refuse(key, "kubelora trains with the mean squared error; a Huber / smooth-L1 loss is not supported: "
                        "remove the key")
    ctx.note(key, f"diffusion-pipe ignores it for {ctx.model_type} too (its own loss)")


def save_dtype(ctx: Ctx, key: str, value: Any) -> None:
    if value not in ("float32", "bfloat16", "float16"):
        ctx.refuse(key, f"{value!r}: use float32, bfloat16 or float16")
    ctx.output["dtype"] = value


MAIN: dict[str, Handler] = {
    "output_dir": kept(text), "dataset": kept(text), "epochs": kept(number), "max_steps": kept(whole),
    "model": keep, "adapter": keep, "optimizer": keep, "monitoring": keep,
    "eval_datasets": eval_datasets,
    "micro_batch_size_per_gpu": micro_batch,
    "image_micro_batch_size_per_gpu": micro_batch,
    "eval_micro_batch_size_per_gpu": eval_setting,
    "eval_image_micro_batch_size_per_gpu": eval_setting,
    "eval_gradient_accumulation_steps": eval_setting,
    "eval_every_n_steps": eval_setting,
    "eval_every_n_epochs": eval_setting,
    "eval_every_n_examples": eval_setting,
    "eval_before_first_step": eval_setting,
    "gradient_accumulation_steps": to("training", "gradientAccumulationSteps", whole),
    "gradient_clipping": to("training", "maxGradNorm", lambda v: number(v) or None),
    "steps_per_print": noted("progress is printed every training.logEvery steps"),
    "logging_steps": to("training", "logEvery", whole),
    "warmup_steps": to("training", "warmupSteps", whole),
    "lr_scheduler": lr_scheduler,
    "force_constant_lr": force_constant_lr,
    "pipeline_stages": noted("kubelora shards with FSDP2 over all GPUs instead of pipeline stages, and every GPU "
                             "is data parallel: the global batch is micro batch x accumulation x all GPUs (diffusion-"
                             "pipe's: x GPUs / pipeline_stages), so the same GPU count trains larger batches"),
    "partition_method": noted("kubelora shards with FSDP2 over all GPUs instead of pipeline stages"),
    "partition_split": noted("kubelora shards with FSDP2 over all GPUs instead of pipeline stages"),
    "activation_checkpointing": activation_checkpointing,
    "reentrant_activation_checkpointing": noted("kubelora's checkpointing is non-reentrant; the math is the same"),
    "blocks_to_swap": noted("no partial block swapping: FSDP2 shards the model over GPUs, and training.cpuOffload: true "
                            "keeps every block in CPU memory (not N of them); set it if one GPU is short of memory"),
    "disable_block_swap_for_eval": noted("no block swapping (the evaluation runs like a training forward)"),
    "compile": to("training", "compile", flag),
    "save_every_n_epochs": noted("the LoRA is written at the end of the run"),
    "save_every_n_steps": noted("the LoRA is written at the end of the run"),
    "save_every_n_examples": noted("the LoRA is written at the end of the run"),
    "checkpoint_every_n_epochs": noted("kubelora counts steps, not epochs: training-state checkpoints are written "
                                       "every training.checkpointEveryMinutes (default 30) or checkpointEverySteps"),
    "checkpoint_every_n_minutes": to("training", "checkpointEveryMinutes", positive),
    "resume_from_checkpoint": noted("kubelora resumes by itself: running the manifest again continues from the "
                                    "newest checkpoint under output.uri/checkpoints/"),
    "save_dtype": save_dtype,
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


# keys every family reads; each family's own keys are in models/<family>/importer.py
MODEL_COMMON: dict[str, Handler] = {
    "type": nothing,  # read before the table
    "dtype": model_dtype,
    "diffusion_model_dtype": noted("only read by diffusion-pipe's ComfyUI-based models"),
    "cache_text_embeddings": noted("text embeddings are cached where the family allows (not for SDXL, whose text "
                                   "encoders are trained)"),
}


def family_module(model_type: str):
    """models/<family>/importer.py: MODEL_KEYS, and LORA_TARGETS_NOTE where diffusion-pipe adapts other layers."""
    return importlib.import_module(f"{__package__}.models.{FAMILIES[model_type]}.importer")


def family_keys(model_type: str) -> dict[str, Handler]:
    return family_module(model_type).MODEL_KEYS


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


def adapter_alpha(ctx: Ctx, key: str, value: Any) -> None:
    """diffusion-pipe refuses any alpha (train.py: it forces alpha = rank); kubelora can train the one
    given, so it is mapped, saying that this config would not have run there."""
    ctx.adapter["alpha"] = number(value)
    ctx.note(key, f"mapped to adapter.alpha {value:g}; diffusion-pipe would not have run this config (it refuses "
                  "alpha and trains with alpha = rank): remove the key from the manifest to train as it does")


def init_from_existing(ctx: Ctx, key: str, value: Any) -> None:
    """diffusion-pipe loads the one .safetensors of that folder into the LoRA before training
    (models/base.py load_adapter_weights); adapter.initFrom takes the folder (or a file) the same way."""
    ctx.adapter["initFrom"] = ctx.extra["map_path"](text(value))
    ctx.extra["init_from_existing"] = text(value)


def exact_pattern(names: list[str]) -> str:
    """One regular expression matching exactly these module names (an adapter.targetModules entry
    matches the whole name), kept short by sharing prefixes (a trie): the hundreds of layers of a
    LoRA file in a few kilobytes. Pure."""
    trie: dict = {}
    for n in sorted(set(names)):
        node = trie
        for ch in n:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        end = "" in node
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch != ""]
        if not branches:
            return ""
        if len(branches) == 1 and not end:
            return branches[0]
        body = "(?:" + "|".join(branches) + ")"
        return body + "?" if end else body
    return "^" + emit(trie) + "$"


ADAPTER: dict[str, Handler] = {
    "type": adapter_type,
    "rank": to("adapter", "rank", whole),
    "alpha": adapter_alpha,
    "dtype": noted("LoRA master weights are float32 (computed in model.dtype)"),
    "dropout": to("adapter", "dropout", number),
    "decompose_factor": noted("a LoKr setting; no effect on LoRA"),
    "rank_dropout": noted("a LoKr setting; no effect on LoRA"),
    "exclude_modules": refused("excluding modules is not supported; list the modules to adapt in "
                               "adapter.targetModules of the manifest instead, and remove the key"),
    "init_from_existing": init_from_existing,
    "fuse_adapters": refused("fusing LoRAs into the base before training is not supported: merge them into the "
                             "base checkpoint first, and remove the key"),
}


# ---------------------------------------------------------------- [optimizer]

# diffusion-pipe passes the [optimizer] keys to the optimizer class, so a key left out takes that
# class's default: torch.optim.AdamW and bitsandbytes' AdamW8bit betas (0.9, 0.999), eps 1e-8;
# optimi's AdamW and StableAdamW betas (0.9, 0.99), eps 1e-6; weight decay 0.01 in all four
TORCH_ADAMW = {"betas": [0.9, 0.999], "epsilon": 1e-8, "weightDecay": 0.01}
OPTIMI_ADAMW = {"betas": [0.9, 0.99], "epsilon": 1e-6, "weightDecay": 0.01}
ADAMW_LIKE = {  # type -> (its class's defaults, what changes in kubelora)
    "adamw": (TORCH_ADAMW, None),
    "adamw_optimi": (OPTIMI_ADAMW, None),
    "adamw8bit": (TORCH_ADAMW, "8-bit optimizer states become float32 states (more memory, the same updates within "
                               "rounding)"),
    "adamw8bitkahan": (TORCH_ADAMW, "8-bit states with Kahan summation become float32 AdamW states"),
    "stableadamw": (OPTIMI_ADAMW, "becomes AdamW without StableAdamW's per-tensor update clipping"),
    "offload": (TORCH_ADAMW, "optimizer states stay on the GPU (sharded by FSDP2)"),  # torchao offloading torch AdamW
}


def optimizer_type(ctx: Ctx, key: str, value: Any) -> None:
    name = str(value)
    if name.lower() not in ADAMW_LIKE:
        ctx.refuse(key, f"{name!r}: kubelora trains with AdamW, and {name}'s lr means something else; use "
                        "type = 'adamw' with an AdamW learning rate")
    defaults, change = ADAMW_LIKE[name.lower()]
    ctx.extra["optimizer_defaults"] = defaults
    if change:
        ctx.note(key, f"{name}: {change}")


def betas(ctx: Ctx, key: str, value: Any) -> None:
    ctx.training["betas"] = listed(value, number, "two numbers, e.g. [0.9, 0.99]", length=2)


def optimizer_defaults(ctx: Ctx) -> None:
    """The optimizer class's own defaults for the betas, eps and weight_decay the TOML leaves out."""
    if "optimizer_defaults" not in ctx.extra:
        raise Refused("optimizer", "type", "no optimizer type (diffusion-pipe needs one): set type = 'adamw_optimi' "
                                           "or 'adamw'")
    for name, default in ctx.extra["optimizer_defaults"].items():
        ctx.training.setdefault(name, default)


OPTIMIZER: dict[str, Handler] = {
    "type": optimizer_type,
    "lr": kept(number),
    "betas": betas,
    "weight_decay": to("training", "weightDecay", number),
    "eps": to("training", "epsilon", number),
    "beta2_half_life": refused("betas[1] from a half-life in samples is not computed: set betas = [b1, b2] with "
                               "b2 = 0.5 ** (global batch size / half-life), and remove the key"),
    "gradient_release": kept(flag),
}


# ---------------------------------------------------------------- [monitoring]

MONITORING: dict[str, Handler] = {
    "enable_wandb": noted("no Weights & Biases: progress goes to the log, the job's status and manifest.json"),
    "wandb_api_key": noted("not copied: secrets never go into a manifest"),
    "wandb_tracker_name": noted("no Weights & Biases"),
    "wandb_run_name": noted("no Weights & Biases"),
}


# ---------------------------------------------------------------- dataset (top level and [[directory]])

RESOLUTIONS = "a list of sides or [width, height] areas, e.g. [512] or [[1024, 768]]"
AR_BUCKETS = "a list of width/height ratios or [width, height] pairs, e.g. [1.0, 1.5] or [[512, 512], [448, 576]]"
SIZE_BUCKETS = "a list of [width, height, frames] buckets, e.g. [[960, 960, 121]]"
AR_DIGITS = 3  # diffusion-pipe rounds bucket ratios to 3 decimals (ROUND_DECIMAL_DIGITS)


def count(v: Any) -> int:
    n = whole(v)
    if n < 1:
        raise BadValue("a whole number >= 1")
    return n


def area_side(value: Any, model_type: str) -> int:
    """diffusion-pipe's resolution entry as kubelora's square side: an entry is a side whose
    square is the area; a [w, h] pair means the area w*h (not a rectangle); rounded to the
    family's multiple as diffusion-pipe rounds bucket sides."""
    w, h = listed(value, positive, RESOLUTIONS, length=2) if isinstance(value, list) else (positive(value),) * 2
    m = RULES[model_type].size_multiple  # diffusion-pipe's pixels_round_to_multiple: 32 for LTX, else 16
    return max(m, int(round(math.sqrt(w * h) / m)) * m)


def resolutions(ctx: Ctx, key: str, value: Any) -> None:
    sides = sorted(set(listed(value, lambda v: area_side(v, ctx.model_type), RESOLUTIONS)))
    if ctx.model_type == "cosmos":
        ctx.note(key, "cosmos trains at its size_buckets")
        return
    ctx.dataset.pop("resolution", None), ctx.dataset.pop("resolutions", None)
    if len(sides) == 1:
        ctx.dataset["resolution"] = sides[0]
    else:
        ctx.dataset["resolutions"] = sides
    pairs = [v for v in value if isinstance(v, list)]
    if pairs:
        ctx.note(key, f"{pairs[0]} is an area in diffusion-pipe, not a rectangle: trained as the area "
                      f"{sides[-1]}x{sides[-1]} (square unless aspect-ratio buckets are on)")
    m = RULES[ctx.model_type].size_multiple
    moved = [(v, area_side(v, ctx.model_type)) for v in value
             if abs(math.sqrt(math.prod(v) if isinstance(v, list) else v * v) - area_side(v, ctx.model_type)) > 1e-9]
    if moved:
        ctx.note(key, ", ".join(f"{v} trains at the area {s}x{s}" for v, s in moved)
                 + f" (kubelora's areas are multiples of {m}; diffusion-pipe keeps the exact area and rounds only "
                   "the bucket sides, so a bucket may differ by one multiple per side)")


def ar_setting(field: str, check) -> Handler:
    """enable_ar_bucket, min_ar, max_ar, num_ar_buckets, ar_buckets: the values, read together by
    ar_bucket_fields once the directory's keys are all read."""
    def handler(ctx: Ctx, key: str, value: Any) -> None:
        value = check(value)
        if ctx.model_type == "cosmos":
            ctx.note(key, "cosmos trains at its size_buckets")
            return
        ctx.dataset[field] = value
    return handler


def ratio(v: Any) -> float:
    if isinstance(v, list):
        w, h = listed(v, positive, AR_BUCKETS, length=2)
        return w / h
    return positive(v)


def ratios_list(value: Any) -> list[float]:
    ratios = listed(value, ratio, AR_BUCKETS)
    if not ratios:
        raise BadValue(AR_BUCKETS)
    return sorted({round(r, AR_DIGITS) for r in ratios})


def geomspace(lo: float, hi: float, n: int) -> list[float]:
    """diffusion-pipe's ratios from min_ar, max_ar, num_ar_buckets (np.geomspace: one bucket is min_ar)."""
    return sorted({round(lo * (hi / lo) ** (i / max(n - 1, 1)), AR_DIGITS) for i in range(n)})


def ar_fields(ratios: list[float]) -> Optional[dict[str, Any]]:
    """kubelora's minAr/maxAr/numArBuckets whose buckets (buckets.aspect_ratios: evenly spaced in log
    space, minAr <= 1 <= maxAr; one bucket is their geometric mean) are these ratios, or None."""
    if len(ratios) == 1:
        r = ratios[0]
        lo, hi = (r * r, 1.0) if r < 1 else (1.0, r * r)
    else:
        lo, hi = ratios[0], ratios[-1]
    got = aspect_ratios(True, lo, hi, len(ratios))
    if not (lo <= 1 <= hi and len(got) == len(ratios) and all(abs(a - b) < 6e-4 for a, b in zip(got, ratios))):
        return None
    return {"minAr": lo, "maxAr": hi, "numArBuckets": len(ratios)}


def ar_bucket_fields(ctx: Ctx) -> None:
    """The aspect-ratio buckets diffusion-pipe trains (utils/dataset.py: size_buckets win, then
    enable_ar_bucket decides, then ar_buckets over min_ar/max_ar/num_ar_buckets) as kubelora's fields."""
    ds = ctx.dataset
    given = ds.pop("arBuckets", None)
    settings = [f for f in ("minAr", "maxAr", "numArBuckets") if f in ds] + (["arBuckets"] if given else [])
    if "width" in ds or not ds.get("enableArBucket"):
        why = "size_buckets set the sizes" if "width" in ds else "enable_ar_bucket is not true"
        for f in settings + (["enableArBucket"] if ds.get("enableArBucket") else []):
            ds.pop(f, None)
            ctx.note_field(f, f"no effect: {why} (diffusion-pipe ignores it too)")
        return
    current = {"minAr": ds.get("minAr", 0.5), "maxAr": ds.get("maxAr", 2.0), "numArBuckets": ds.get("numArBuckets", 7)}
    ratios = given or geomspace(*current.values())
    fields = ar_fields(ratios)
    shown = ", ".join(f"{r:g}" for r in ratios)
    culprit = "arBuckets" if given else ("minAr" if current["minAr"] > 1 else "maxAr")
    if fields is None:
        ctx.refuse_field(culprit, f"diffusion-pipe trains the aspect ratios {shown}; kubelora's buckets are spaced "
                                  "evenly in log space from dataset.minAr <= 1 to maxAr >= 1, which cannot give these: "
                                  "use ratios of such a range (e.g. min_ar = 0.5, max_ar = 2.0, num_ar_buckets = 7)")
    if not given and all(math.isclose(fields[f], current[f]) for f in fields):
        return
    if given:
        ctx.origin.update({f: ctx.origin["arBuckets"] for f in fields})
    ds.update(fields)
    ctx.note_field("arBuckets" if given else "numArBuckets",
                   f"diffusion-pipe trains the aspect ratios {shown}: kubelora's dataset.minAr {fields['minAr']:g}, "
                   f"maxAr {fields['maxAr']:g}, numArBuckets {fields['numArBuckets']} give the same")


def aligned_frames(model_type: str, frames: int) -> int:
    """diffusion-pipe's align_frames (models/base.py): a bucket's frame count rounded down to the
    family's a*k + b (4k+1 for HunyuanVideo, 8k+1 for LTX-Video), which its clips then have."""
    rule = RULES[model_type].frame_rule
    if rule is None:
        return frames
    a, b = rule
    return max(b, (frames - b) // a * a + b)


def note_aligned(ctx: Ctx, key: str, frames: list[int]) -> None:
    moved = [(f, aligned_frames(ctx.model_type, f)) for f in frames if aligned_frames(ctx.model_type, f) != f]
    if moved:
        a, b = RULES[ctx.model_type].frame_rule
        ctx.note(key, ", ".join(f"{f} frames train as {g}" for f, g in moved)
                 + f" ({ctx.model_type} clips are {a}k+{b} frames; diffusion-pipe rounds a bucket down to that too, "
                   "though it places only videos of at least the unrounded length in it)")


def frame_buckets(ctx: Ctx, key: str, value: Any) -> None:
    frames = listed(value, count, "a list of frame counts, e.g. [1, 33]")
    if ctx.model_type not in VIDEO_TYPES:
        ctx.note(key, "an image model: frames are 1")
        return
    if ctx.model_type == "cosmos":
        ctx.note(key, "cosmos takes its frame count from size_buckets")
        return
    ctx.dataset.pop("frames", None)
    note_aligned(ctx, key, frames)
    ctx.dataset["frameBuckets"] = sorted({aligned_frames(ctx.model_type, f) for f in frames} | {1})


def size_buckets(ctx: Ctx, key: str, value: Any) -> None:
    buckets = listed(value, lambda b: listed(b, count, SIZE_BUCKETS, length=3), SIZE_BUCKETS)
    if not buckets:
        raise BadValue(SIZE_BUCKETS)
    w, h, f = buckets[0]
    ctx.dataset.update(width=w, height=h)
    sizes_from_buckets(ctx)
    if ctx.model_type in VIDEO_TYPES:
        note_aligned(ctx, key, [f])
        ctx.dataset["frames"] = aligned_frames(ctx.model_type, f)
    if len(value) > 1:
        ctx.note(key, f"one size per job for now: every item is resized to cover {w}x{h} and centre-cropped"
                      + (f", {f} frames" if ctx.model_type in VIDEO_TYPES else "")
                      + f" (diffusion-pipe puts each item in the nearest of {len(value)} buckets)")


def repeats(ctx: Ctx, key: str, value: Any) -> None:
    n = number(value)
    if not n.is_integer() or n < 1:
        ctx.refuse(key, f"{value}: repeats are whole numbers >= 1 in kubelora")
    ctx.dataset["repeats"] = int(n)


def cache_shuffle_num(v: Any) -> int:
    n = whole(v)
    if n < 0:
        raise BadValue("a whole number >= 0")
    return n


def shuffle_fields(ctx: Ctx) -> None:
    """diffusion-pipe (utils/dataset.py) caches cache_shuffle_num shuffled captions whenever it is
    above 0, whatever shuffle_tags says; shuffle_tags with cache_shuffle_num 0 (or unset) caches one."""
    ds = ctx.dataset
    n, tags = ds.pop("shuffleVariants", 0), ds.pop("shuffleTags", None)
    if tags is False and n:
        ctx.note_field("shuffleTags", f"false, but cache_shuffle_num = {n} shuffles the tags anyway, as in "
                                      "diffusion-pipe")
    n = n or int(bool(tags))
    if n:
        ds.update(shuffleTags=True, shuffleVariants=n)
    elif ds.pop("tagDelimiter", None) is not None:
        ctx.note_field("tagDelimiter", "no effect: no tags are shuffled")


def finish_dataset(ctx: Ctx) -> None:
    """Keys that act together, read once a directory's keys (over the top level's) are all in."""
    shuffle_fields(ctx)
    ar_bucket_fields(ctx)
    sizes_from_buckets(ctx)


def sizes_from_buckets(ctx: Ctx) -> None:
    """size_buckets set the sizes: resolutions (read before or after them) are dropped, said once,
    as diffusion-pipe ignores them then (utils/dataset.py)."""
    if "width" in ctx.dataset and {ctx.dataset.pop(k, None) for k in ("resolution", "resolutions")} != {None}:
        ctx.note_field("resolutions", "ignored: size_buckets set the sizes (diffusion-pipe ignores resolutions then too)")


def skip_empty_caption(ctx: Ctx, key: str, value: Any) -> None:
    ctx.dataset["missingCaption"] = "skip" if flag(value) else "empty"


def mask_path(ctx: Ctx, key: str, value: Any) -> None:
    """The directory's masks folder -> its maskUri (the same stem, the red channel weighing the loss)."""
    ctx.dataset["maskUri"] = ctx.extra["map_path"](text(value))


DATASET: dict[str, Handler] = {
    "directory": keep,
    "resolutions": resolutions,
    "enable_ar_bucket": ar_setting("enableArBucket", flag),
    "min_ar": ar_setting("minAr", positive),
    "max_ar": ar_setting("maxAr", positive),
    "num_ar_buckets": ar_setting("numArBuckets", count),
    "ar_buckets": ar_setting("arBuckets", ratios_list),
    "frame_buckets": frame_buckets,
    "size_buckets": size_buckets,
    "num_repeats": repeats,
    "shuffle_tags": to("dataset", "shuffleTags", flag),  # shuffle_fields reads the three together
    "cache_shuffle_num": to("dataset", "shuffleVariants", cache_shuffle_num),
    "cache_shuffle_delimiter": to("dataset", "tagDelimiter", text),
    "caption_prefix": to("dataset", "captionPrefix", text),
    "skip_empty_caption": skip_empty_caption,
    "shuffle_metadata": noted("only the order of caching; no effect on the result"),
    "online_captions": noted("captions are read when caching; no effect on the result"),
    "subsample_ratio": refused("training on a subset is not supported: remove the key or subset the folder"),
}

DIRECTORY: dict[str, Handler] = {
    **{k: v for k, v in DATASET.items() if k not in ("directory", "subsample_ratio")},
    "path": kept(text),
    "mask_path": mask_path,
    "default_mask_file": refused("a mask for items without their own (diffusion-pipe: for testing) is not supported; "
                                 "items without a mask in mask_path train unmasked: remove the key"),
    "control_path": refused("edit (control image) datasets such as Flux Kontext's are not supported yet; training "
                            "without them would make a text-to-image LoRA: remove control_path only if that is wanted"),
}

# keys diffusion-pipe's own example configs still show but its code no longer reads
OBSOLETE = {"pseudo_huber_c": "diffusion-pipe's examples/main_example.toml still lists it, but its code no longer "
                              "reads it (its Huber loss is huber_delta now); ignored"}

SECTIONS: dict[str, dict[str, Handler]] = {
    "main": MAIN, "model": {k: h for t in FAMILIES for k, h in model_table(t).items()}, "adapter": ADAPTER, "optimizer": OPTIMIZER, "monitoring": MONITORING,
    "dataset": DATASET, "directory": DIRECTORY,
}


def apply(ctx: Ctx, section: str, table: dict[str, Any]) -> None:
    """Run every key of one TOML table through its section's handlers; a key no handler knows
    is refused (diffusion-pipe passes unknown [optimizer] keys to the optimizer) or noted. A value
    of the wrong type or shape is refused naming the key; ctx.origin records which key set each
    dataset field."""
    handlers = model_table(ctx.model_type) if section == "model" else SECTIONS[section]
    ctx.section = "" if section == "main" else section
    for key, value in table.items():
        h = handlers.get(key)
        if h is None:
            if section == "optimizer":
                ctx.refuse(key, "diffusion-pipe passes this to the optimizer; kubelora's AdamW takes lr, betas, "
                                "weight_decay and eps: remove the key")
            ctx.note(key, OBSOLETE.get(key, "not a key diffusion-pipe reads here (a typo?); ignored"))
            continue
        before = dict(ctx.dataset)
        try:
            h(ctx, key, value)
        except Refused:
            raise
        except BadValue as e:
            ctx.refuse(key, f"{value!r}: expected {e}")
        except (TypeError, ValueError, ArithmeticError, LookupError):
            ctx.refuse(key, f"{value!r}: not a value of the type diffusion-pipe takes here (docs/import-config.md)")
        ctx.origin.update({f: (ctx.section, ctx.directory, key) for f, v in ctx.dataset.items()
                           if f not in before or before[f] is not v})
