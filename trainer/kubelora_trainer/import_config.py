"""diffusion-pipe config (main TOML with its [model], [adapter], [optimizer] tables, plus the
dataset TOML it names) -> a LoRATrainingJob manifest. Pure: dicts in, (manifest, notes) out.

    kubelora import-config train.toml [--dataset dataset.toml] [--name NAME] [--data-uri s3://...]
        [--output-uri s3://...] [--steps N] > job.yaml

Every key is either mapped (docs/import-config.md has the table) or named in a note, so nothing
is dropped silently.
"""
from __future__ import annotations

import re
from typing import Any, Optional

MODEL_TYPES = {"flux": "flux", "sdxl": "sdxl", "ltx-video": "ltx-video", "ltx_video": "ltx-video",
               "hunyuan-video": "hunyuan-video", "hunyuan_video": "hunyuan-video", "cosmos": "cosmos"}
MODEL_KEYS = {"diffusers_path": "diffusersPath", "transformer_path": "transformerPath", "ckpt_path": "ckptPath",
              "checkpoint_path": "checkpointPath", "vae_path": "vaePath", "llm_path": "llmPath", "clip_path": "clipPath",
              "text_encoder_path": "textEncoderPath", "flux_shift": "fluxShift",
              "bypass_guidance_embedding": "bypassGuidanceEmbedding", "v_pred": "vPred", "min_snr_gamma": "minSnrGamma",
              "dtype": "dtype"}
TOP_KEYS = {"micro_batch_size_per_gpu": "microBatchSize", "gradient_accumulation_steps": "gradientAccumulationSteps",
            "gradient_clipping": "maxGradNorm", "warmup_steps": "warmupSteps",
            "activation_checkpointing": "gradientCheckpointing"}
OPTIMIZER_KEYS = {"lr": "learningRate", "betas": "betas", "weight_decay": "weightDecay", "eps": "epsilon"}
IGNORED_TOP = {"output_dir", "dataset", "epochs", "pipeline_stages", "save_every_n_epochs", "save_every_n_steps",
               "checkpoint_every_n_minutes", "eval_every_n_epochs", "eval_before_first_step", "eval_micro_batch_size_per_gpu",
               "eval_gradient_accumulation_steps", "save_dtype", "caching_batch_size", "steps_per_print",
               "video_clip_mode", "partition_method", "max_steps", "lr_scheduler", "blocks_to_swap",
               "model", "adapter", "optimizer", "monitoring", "compile"}


def _uri(path: Optional[str], override: Optional[str]) -> Optional[str]:
    return override or path


def convert(main: dict[str, Any], dataset: Optional[dict[str, Any]] = None, *, name: str = "imported",
            data_uri: Optional[str] = None, output_uri: Optional[str] = None, steps: Optional[int] = None,
            path_map: Optional[dict[str, str]] = None) -> tuple[dict, list[str]]:
    """Returns (manifest, notes). path_map rewrites local path prefixes (e.g. {'/data/models':
    's3://models'}) so a workstation config points at the bucket the cluster reads."""
    notes: list[str] = []
    path_map = path_map or {}

    def mapped(p: str) -> str:
        for local, remote in sorted(path_map.items(), key=lambda kv: -len(kv[0])):
            if p.startswith(local):
                return remote.rstrip("/") + "/" + p[len(local):].lstrip("/")
        return p

    m = dict(main.get("model") or {})
    mtype = MODEL_TYPES.get(str(m.pop("type", "")).lower())
    if mtype is None:
        raise ValueError(f"[model] type {main.get('model', {}).get('type')!r} is not one kubelora trains "
                         f"(accepted: {', '.join(sorted(set(MODEL_TYPES.values())))})")
    model: dict[str, Any] = {"type": mtype}
    training: dict[str, Any] = {}
    for k, v in m.items():
        if k in MODEL_KEYS:
            model[MODEL_KEYS[k]] = mapped(v) if k.endswith("_path") else v
        elif k == "timestep_sample_method":
            training["timestepSampling"] = v
        elif k == "transformer_dtype" and v == "float8":
            notes.append("[model] transformer_dtype = 'float8': fp8 base weights are not supported yet; trained in model.dtype")
        elif k == "guidance":
            model["guidance"] = v
        else:
            notes.append(f"[model] {k} is not mapped")
    if model.get("dtype") not in (None, "bfloat16", "float32"):
        notes.append(f"[model] dtype {model['dtype']!r} replaced by bfloat16")
        model["dtype"] = "bfloat16"

    adapter: dict[str, Any] = {}
    for k, v in (main.get("adapter") or {}).items():
        if k == "rank":
            adapter["rank"] = v
        elif k == "alpha":
            adapter["alpha"] = v
        elif k == "dropout":
            adapter["dropout"] = v
        elif k in ("type", "dtype"):
            if k == "type" and v != "lora":
                raise ValueError(f"[adapter] type {v!r}: kubelora trains lora adapters")
            if k == "dtype" and v != "float32":
                notes.append(f"[adapter] dtype {v!r}: kubelora keeps LoRA master weights in float32")
        elif k == "init_from_existing":
            notes.append("[adapter] init_from_existing is not supported yet")
        else:
            notes.append(f"[adapter] {k} is not mapped")

    for k, v in (main.get("optimizer") or {}).items():
        if k in OPTIMIZER_KEYS:
            training[OPTIMIZER_KEYS[k]] = v
        elif k == "type":
            if not re.fullmatch(r"adamw.*", str(v).lower()):
                notes.append(f"[optimizer] type {v!r}: kubelora uses AdamW")
        else:
            notes.append(f"[optimizer] {k} is not mapped")
    for k, v in main.items():
        if k in TOP_KEYS:
            training[TOP_KEYS[k]] = v
        elif k not in IGNORED_TOP:
            notes.append(f"{k} is not mapped")

    ds: dict[str, Any] = {}
    dirs = list((dataset or {}).get("directory") or [])
    if dataset is not None:
        res = dataset.get("resolutions") or [512]
        r0 = res[0]
        if isinstance(r0, (list, tuple)):
            ds["width"], ds["height"] = int(r0[0]), int(r0[1])
        else:
            ds["resolution"] = int(r0)
        if len(res) > 1:
            notes.append(f"dataset resolutions {res}: one resolution per job for now; using {r0}")
        if dataset.get("enable_ar_bucket"):
            notes.append("dataset enable_ar_bucket: aspect-ratio bucketing comes later; images are centre-cropped")
        frames = dataset.get("frame_buckets")
        if frames and mtype in ("ltx-video", "hunyuan-video", "cosmos"):
            ds["frames"] = int(max(frames))
            if len(frames) > 1:
                notes.append(f"dataset frame_buckets {frames}: one clip length per job for now; using {max(frames)}")
        if mtype == "cosmos" and dataset.get("size_buckets"):
            w, h, f = dataset["size_buckets"][0]
            ds.update(width=int(w), height=int(h), frames=int(f))
            ds.pop("resolution", None)
        if dirs:
            ds["repeats"] = int(dirs[0].get("num_repeats", 1))
            if len(dirs) > 1:
                notes.append(f"dataset has {len(dirs)} [[directory]] entries: several sources come later; using the first")
    ds["uri"] = _uri(mapped(dirs[0]["path"]) if dirs else None, data_uri)
    if not ds["uri"]:
        raise ValueError("no dataset path: pass the dataset TOML (with a [[directory]] path) or --data-uri")

    out_uri = _uri(mapped(main["output_dir"]) if main.get("output_dir") else None, output_uri)
    if not out_uri:
        raise ValueError("no output: the config has no output_dir; pass --output-uri")
    if steps is None:
        if main.get("max_steps"):
            steps = int(main["max_steps"])
        else:
            raise ValueError(f"kubelora trains for a number of steps; diffusion-pipe counts epochs "
                             f"({main.get('epochs', '?')}): pass --steps (steps = epochs x items x repeats / "
                             "(micro batch x accumulation x GPUs))")
    training["steps"] = steps
    if "warmupSteps" in training:
        training["warmupSteps"] = min(training["warmupSteps"], steps)
    if isinstance(training.get("betas"), list):
        training["betas"] = [float(b) for b in training["betas"]]

    spec = {"model": model, "dataset": ds, "adapter": adapter, "training": training, "output": {"uri": out_uri}}
    manifest = {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                "metadata": {"name": re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "imported"}, "spec": spec}
    return manifest, notes
