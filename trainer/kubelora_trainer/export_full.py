"""Export of a full fine-tune (adapter.type full): the denoiser as a diffusers folder (config.json
and sharded safetensors with their index, loadable with from_pretrained) and, where the family
has one (family.export_full; family.full_file says what it holds and what loads it), its native
single file: the denoiser alone under the original release's names (Flux: BFL layout, SDXL: the
model.diffusion_model.* UNet, LTX-Video: model.diffusion_model.* transformer, HunyuanVideo:
Tencent's fused layout, Cosmos: NVIDIA's net.* layout). Uploaded with manifest.json last."""
from __future__ import annotations

from pathlib import Path

from . import safetensors_file, storage
from .export import base_model, publish_manifest

SHARD = "5GB"


def write_diffusers_folder(module, state_dict: dict, folder: Path) -> list[Path]:
    """config.json + diffusion_pytorch_model(-0000i-of-0000n).safetensors (+ index when sharded)."""
    from huggingface_hub import save_torch_state_dict

    import shutil
    shutil.rmtree(folder, ignore_errors=True)  # no shard of an earlier run on a kept cache volume
    folder.mkdir(parents=True)
    module.save_config(folder)
    save_torch_state_dict(state_dict, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=SHARD, metadata={"format": "pt"})
    return sorted(p for p in folder.iterdir() if p.is_file())


def file_metadata(spec, job_name: str) -> dict[str, str]:
    from . import __version__
    return {"format": "pt", "kubelora.version": __version__, "kubelora.model_type": spec.model.type,
            "kubelora.base_model": base_model(spec.model), "kubelora.steps": str(spec.training.steps),
            "kubelora.job": job_name, "kubelora.adapter_type": "full"}


def export_and_upload(spec, job_name, family, comps, state_dict: dict, metrics, stats, settings, out_dir: Path,
                      extra=None) -> dict:
    """Rank 0 only. Returns the primary artifact {uri, sha256, size, format, file}: the single file
    where the family has one, else the folder's config.json. extra: as export.export_and_upload's."""
    component = next(iter(comps.trainable))
    folder_files = write_diffusers_folder(comps.denoiser, state_dict, out_dir / component)
    single = None
    native = getattr(family, "export_full", None)
    if native is not None:
        single = out_dir / f"{spec.output.name}.safetensors"
        extra_meta = getattr(family, "full_metadata", lambda comps: {})(comps)  # what loaders read (LTX: config)
        safetensors_file.save({k: v.contiguous() for k, v in native(state_dict).items()}, single,
                              metadata={**file_metadata(spec, job_name), **extra_meta})
        print(f"[export] {single.name}: {family.full_file}", flush=True)
    else:
        print(f"[export] note: {spec.model.type} has no native single-file export yet; the diffusers folder "
              f"{component}/ is the result", flush=True)

    out = storage.parse_uri(spec.output.uri)
    client = storage.make_client(settings) if out.is_s3 else None
    artifacts = []
    if single is not None:
        artifacts.append({**storage.upload(single, str(out.child(single.name)), settings, client),
                          "format": "original", "file": single.name, "holds": family.full_file})
    for f in folder_files:
        name = f"{component}/{f.name}"
        artifacts.append({**storage.upload(f, str(out.child(name)), settings, client), "format": "diffusers",
                          "file": name})
    publish_manifest(spec, job_name, {"component": component}, artifacts, stats, metrics, settings, client, out_dir,
                     extra)
    return artifacts[0]
