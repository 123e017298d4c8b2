"""Export: the LoRA file(s) in each requested format, the peft checkpoint, manifest.json; upload
them with manifest.json last, so its presence means everything it lists is complete."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, lora, storage
from .families import PATH_FIELDS, RULES
from .spec import dump_spec


def base_model(model_spec) -> str:
    return next((getattr(model_spec, f) for f in PATH_FIELDS if getattr(model_spec, f)), "")


def file_names(name: str, formats: list[str]) -> dict[str, str]:
    """The first (default) format is <name>.safetensors; others <name>.<format>.safetensors."""
    return {fmt: f"{name}.safetensors" if i == 0 else f"{name}.{fmt}.safetensors" for i, fmt in enumerate(formats)}


def metadata(spec, job_name: str, fmt: str) -> dict[str, str]:
    alpha = spec.adapter.alpha or spec.adapter.rank
    return {
        "format": "pt",
        "kubelora.version": __version__,
        "kubelora.model_type": spec.model.type,
        "kubelora.base_model": base_model(spec.model),
        "kubelora.lora_format": fmt,
        "kubelora.rank": str(spec.adapter.rank),
        "kubelora.alpha": f"{alpha:g}",
        "kubelora.steps": str(spec.training.steps),
        "kubelora.job": job_name,
    }


def export_and_upload(spec, job_name, family, configs, gathered, metrics, stats, settings, out_dir: Path) -> dict:
    """Rank 0 only. Returns the primary artifact {uri, sha256, size, format, file}."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    formats = spec.output.formats or [RULES[spec.model.type].formats[0]]
    files = {}
    for fmt, fname in file_names(spec.output.name, formats).items():
        files[fmt] = out_dir / fname
        save_file(family.export(gathered, spec.adapter.scale, fmt), str(files[fmt]), metadata=metadata(spec, job_name, fmt))
    ckpt_dir = out_dir / "checkpoints" / f"step-{spec.training.steps}"
    for component, cfg in configs.items():
        lora.save_checkpoint(gathered[component], cfg, ckpt_dir / component, metadata(spec, job_name, "peft"))

    out = storage.parse_uri(spec.output.uri)
    client = storage.make_client(settings) if out.is_s3 else None
    for f in sorted(p for p in ckpt_dir.rglob("*") if p.is_file()):
        storage.upload(f, str(out.child(f"checkpoints/step-{spec.training.steps}/{f.relative_to(ckpt_dir)}")), settings, client)
    artifacts = []
    for fmt, f in files.items():
        artifacts.append({**storage.upload(f, str(out.child(f.name)), settings, client), "format": fmt, "file": f.name})
    manifest = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAArtifactManifest",
        "job": job_name,
        "createdAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trainerVersion": __version__,
        "model": {"type": spec.model.type, "base": base_model(spec.model)},
        "adapter": {"rank": spec.adapter.rank, "alpha": spec.adapter.alpha or spec.adapter.rank,
                    "targetModules": {c: cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
                                      for c, cfg in configs.items()}},
        "artifacts": artifacts,
        "dataset": stats,
        "metrics": metrics,
        "spec": dump_spec(spec),
    }
    mf = out_dir / "manifest.json"
    mf.write_text(json.dumps(manifest, indent=2))
    storage.upload(mf, str(out.child("manifest.json")), settings, client, content_type="application/json")
    print(f"[upload] {', '.join(a['uri'] for a in artifacts)} and manifest.json", flush=True)
    return artifacts[0]
