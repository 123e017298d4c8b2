"""Export: the LoRA file(s) in each requested format, the peft checkpoint, manifest.json; upload
them with manifest.json last, so its presence means everything it lists is complete."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, lora, safetensors_file, storage
from .families import RULES, areas_of
from .progress import RUN_KEY, run_id
from .spec import dump_spec


# where the trained denoiser's weights come from, most specific first: a transformerPath replaces
# the one of a diffusersPath or ckptPath folder (a fine-tune trained on top of the base)
DENOISER_FIELDS = ("transformerPath", "checkpointPath", "diffusersPath", "ckptPath")


def base_model(model_spec) -> str:
    """The weights the LoRA was trained on (kubelora.base_model, manifest.json's model.base). Pure."""
    return next((getattr(model_spec, f) for f in DENOISER_FIELDS if getattr(model_spec, f)), "")


def file_names(name: str, formats: list[str]) -> dict[str, str]:
    """The first (default) format is <name>.safetensors; others <name>.<format>.safetensors."""
    return {fmt: f"{name}.safetensors" if i == 0 else f"{name}.{fmt}.safetensors" for i, fmt in enumerate(formats)}


# formats whose files carry the real alpha (.alpha tensors / adapter_config.json); the others
# fold alpha/rank into lora_B, so loaders apply them at scale 1
ALPHA_FORMATS = ("kohya", "peft")
# kohya-ecosystem names of the base models (ss_base_model_version)
SS_BASE_MODEL = {"sdxl": "sdxl_base_v1-0", "flux": "flux1", "ltx-video": "ltx_video", "hunyuan-video": "hunyuan_video",
                 "cosmos": "cosmos"}


def metadata(spec, job_name: str, fmt: str) -> dict[str, str]:
    alpha = spec.adapter.alpha or spec.adapter.rank
    return file_metadata({
        "kubelora.version": __version__,
        "kubelora.model_type": spec.model.type,
        "kubelora.base_model": base_model(spec.model),
        "kubelora.rank": str(spec.adapter.rank),
        "kubelora.alpha": f"{alpha:g}",
        "kubelora.steps": str(spec.training.steps),
        "kubelora.resolution": trained_sizes(spec.dataset),
        "kubelora.job": job_name,
    }, fmt, folded=fmt not in ALPHA_FORMATS)


def trained_sizes(dataset) -> str:
    """'WxH' of a fixed size, else every trained area (of the dataset and its sources) as its
    square, smallest first: '512x512,1024x1024'. Pure."""
    if dataset.width is not None:
        return f"{dataset.width}x{dataset.height}"
    areas = sorted({a for src in (dataset.sources or [None]) for a in areas_of(dataset, src)})
    return ",".join(f"{a}x{a}" for a in areas)


# what a converted file keeps of its source's metadata: the rest (ss_*, diffusers'
# lora_adapter_metadata, ...) describes the source's layout and alpha, not the new file's
def kept_metadata(key: str) -> bool:
    return key.startswith("kubelora.") or key == "format"


def file_metadata(meta: dict[str, str], fmt: str, folded: bool) -> dict[str, str]:
    """A LoRA file's metadata, true to the file (of meta only kubelora.* and format are kept): its
    format; kubelora.alpha is the alpha it was trained with and kubelora.scale_folded says
    whether lora_B already carries alpha/rank (then a loader applies it at scale 1). Kohya files
    also get the ss_* keys kohya-ecosystem tools show, with ss_network_alpha as the file's .alpha
    tensors give it."""
    out = {k: v for k, v in meta.items() if kept_metadata(k)}
    out.update({"format": "pt", "kubelora.lora_format": fmt, "kubelora.scale_folded": str(folded).lower()})
    if fmt == "kohya" and "kubelora.rank" in out:
        rank = out["kubelora.rank"]
        alpha = rank if folded else out.get("kubelora.alpha", rank)
        res = out.get("kubelora.resolution", "").split(",")[-1]  # kohya's one size: the largest area
        out.update({"ss_network_module": "networks.lora_flux" if out.get("kubelora.model_type") == "flux"
                    else "networks.lora",
                    "ss_network_dim": rank, "ss_network_alpha": alpha,
                    "ss_base_model_version": SS_BASE_MODEL.get(out.get("kubelora.model_type", ""), ""),
                    "ss_steps": out.get("kubelora.steps", ""),
                    "ss_resolution": f"({res.replace('x', ', ')})" if res else "",
                    "ss_training_comment": f"trained with kubelora {out.get('kubelora.version', '')}".strip()})
    return out


def check_exportable(family, spec, tensors) -> None:
    """Export tensors (the freshly injected LoRA, adapters.gather) to every output format, so
    that a target set a format cannot carry fails before training, not after it. Raises
    lora.AdapterError naming adapter.targetModules and output.formats."""
    for fmt in spec.output.formats or [RULES[spec.model.type].formats[0]]:
        try:
            family.export(tensors, 1.0, fmt)
        except (ValueError, KeyError) as e:
            raise lora.AdapterError(
                f"adapter.targetModules and output.formats: the {fmt} file cannot hold the LoRA these targets "
                f"give: {e.args[0] if e.args else e}") from None


def cast(tensors: dict, dtype: str) -> dict:
    """The floating tensors of a LoRA file in output.dtype (float32 as trained: unchanged). Scalars
    (the .alpha values) stay as they are: bfloat16 holds integers only to 256 exactly, and a fused
    layer's alpha (scale x 3 or 4 ranks, e.g. 381) would load about 0.3% off. Pure."""
    import torch
    to = getattr(torch, dtype)
    return {k: v.to(to) if v.is_floating_point() and v.dtype != to and v.dim() else v for k, v in tensors.items()}


def export_and_upload(spec, job_name, family, configs, gathered, metrics, stats, settings, out_dir: Path,
                      extra=None) -> dict:
    """Rank 0 only. Returns the primary artifact {uri, sha256, size, format, file}. extra(artifacts),
    when given, runs after the LoRA files are uploaded and before manifest.json; its dict joins the
    manifest (report.html and the samples)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = spec.output.formats or [RULES[spec.model.type].formats[0]]
    # the peft checkpoint first: whatever a format's export does, the trained adapter is on disk
    # (and `kubelora convert --from peft` can write the formats from it)
    ckpt_dir = out_dir / "checkpoints" / f"step-{spec.training.steps}"
    for component, cfg in configs.items():
        lora.save_checkpoint(gathered[component], cfg, ckpt_dir / component, metadata(spec, job_name, "peft"))
    files, gaps = {}, {}
    for fmt, fname in file_names(spec.output.name, formats).items():
        files[fmt] = out_dir / fname
        safetensors_file.save(cast(family.export(gathered, spec.adapter.scale, fmt), spec.output.dtype), str(files[fmt]),
                              metadata=metadata(spec, job_name, fmt))
        gaps[fmt] = family.export_gaps(gathered, fmt)
        for gap in gaps[fmt]:
            print(f"[export] warning: {fname}: {gap}", flush=True)

    out = storage.parse_uri(spec.output.uri)
    client = storage.make_client(settings) if out.is_s3 else None
    for f in sorted(p for p in ckpt_dir.rglob("*") if p.is_file()):
        storage.upload(f, str(out.child(f"checkpoints/step-{spec.training.steps}/{f.relative_to(ckpt_dir)}")), settings, client)
    artifacts = []
    for fmt, f in files.items():
        artifacts.append({**storage.upload(f, str(out.child(f.name)), settings, client), "format": fmt, "file": f.name,
                          **({"gaps": gaps[fmt]} if gaps[fmt] else {})})
    adapter = {"rank": spec.adapter.rank, "alpha": spec.adapter.alpha or spec.adapter.rank,
               "targetModules": {c: cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
                                 for c, cfg in configs.items()}}
    publish_manifest(spec, job_name, adapter, artifacts, stats, metrics, settings, client, out_dir, extra)
    return artifacts[0]


def publish_manifest(spec, job_name, adapter: dict, artifacts: list[dict], stats, metrics, settings, client,
                     out_dir: Path, extra=None) -> None:
    """manifest.json, uploaded last: its presence means every artifact it lists is complete.
    extra(artifacts), when given, runs first; its dict joins the manifest (report.html, samples)."""
    out = storage.parse_uri(spec.output.uri)
    manifest = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAArtifactManifest",
        "job": job_name,
        **({RUN_KEY: run} if (run := run_id()) else {}),  # which run wrote it
        "createdAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trainerVersion": __version__,
        "model": {"type": spec.model.type, "base": base_model(spec.model)},
        "adapter": {"type": spec.adapter.type, **adapter},
        "artifacts": artifacts,
        "dataset": {k: v for k, v in stats.items() if k != "buckets"},
        "buckets": stats.get("buckets"),
        "metrics": metrics,
        "spec": dump_spec(spec),
        **(extra(artifacts) if extra else {}),
    }
    mf = out_dir / "manifest.json"
    mf.write_text(json.dumps(manifest, indent=2))
    storage.upload(mf, str(out.child("manifest.json")), settings, client, content_type="application/json")
    print(f"[{'upload' if out.is_s3 else 'output'}] {', '.join(a['uri'] for a in artifacts)} and manifest.json",
          flush=True)
