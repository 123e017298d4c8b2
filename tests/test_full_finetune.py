"""adapter.type full: every transformer weight trained, sharded over 2 torchrun ranks with FSDP2
(gloo), exported as a diffusers folder that from_pretrained loads and as the BFL single file the
Flux family's own loader reads back to the same weights."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_trainer
from kubelora_trainer.spec import SpecError, parse_spec


def job(tmp_path: Path, tiny_flux_dir: Path, data: Path, **training) -> Path:
    spec = {"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
            "dataset": {"uri": str(data), "resolution": 32},
            "adapter": {"type": "full"},
            "training": {"steps": 3, "learningRate": 1e-3, "microBatchSize": 2, "logEvery": 1, "seed": 1,
                         "sharding": "shard", **training},
            "output": {"uri": str(tmp_path / "out"), "name": "flux-ft"}}
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": "full"}, "spec": spec}))
    return path


def test_a_full_fine_tune_on_two_ranks_exports_a_diffusers_folder_and_the_bfl_file(tmp_path, tiny_flux_dir,
                                                                                  overfit_data):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from kubelora_trainer.models.flux.keys import from_bfl

    proc = run_trainer(job(tmp_path, tiny_flux_dir, overfit_data), {"KUBELORA_CACHE_DIR": str(tmp_path / "cache")},
                       nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[model] full fine-tune of transformer" in proc.stdout and "weights sharded across ranks" in proc.stdout
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    assert m["adapter"] == {"type": "full", "component": "transformer"}
    files = {a["file"]: a for a in m["artifacts"]}
    assert {"flux-ft.safetensors", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"} <= set(files)
    assert files["flux-ft.safetensors"]["format"] == "original"
    assert files["flux-ft.safetensors"]["holds"].startswith("the transformer in the BFL layout")
    assert "[export] flux-ft.safetensors: the transformer in the BFL layout" in proc.stdout

    base = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    tuned = FluxTransformer2DModel.from_pretrained(out / "transformer")
    b, t = base.state_dict(), tuned.state_dict()
    assert set(b) == set(t)
    changed = [k for k in b if not torch.equal(b[k], t[k])]
    assert len(changed) > 0.9 * len(b), f"only {len(changed)} of {len(b)} tensors were trained"
    # the single file is the same weights in the BFL layout
    back = from_bfl(load_file(str(out / "flux-ft.safetensors")), tuned.config.num_attention_heads *
                    tuned.config.attention_head_dim)
    assert set(back) == set(t)
    for k in t:
        torch.testing.assert_close(back[k], t[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("adapter,other,message", [
    ({"type": "full", "rank": 8}, {}, "adapter.rank: applies to adapter.type lora only"),
    ({"type": "full"}, {"model": {"transformerDtype": "float8"}}, "model.transformerDtype: float8 stores frozen"),
    ({"type": "full"}, {"output": {"formats": ["kohya"]}}, "output.formats: LoRA file formats"),
])
def test_lora_settings_are_refused_for_a_full_fine_tune(adapter, other, message):
    spec = {"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"}, "adapter": adapter,
            "output": {"uri": "/o"}}
    for k, v in other.items():
        spec[k] = {**spec[k], **v}
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)
    clean = {"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"}, "adapter": {"type": "full"},
             "output": {"uri": "/o"}}
    assert parse_spec(clean).adapter.type == "full"


def test_a_full_fine_tune_survives_the_api_servers_defaults():
    """The API server (and the operator's ConfigMap, dump_spec) fill every default in, rank and
    dropout included: a full fine-tune must still parse."""
    from kubelora_trainer.spec import dump_spec
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                       "adapter": {"type": "full"}, "output": {"uri": "/o"}})
    again = parse_spec(dump_spec(spec))
    assert again.adapter.type == "full" and again.adapter.rank == 16


def test_only_recognised_bad_input_fails_a_job_for_good():
    from kubelora_trainer import exits
    from kubelora_trainer.data import DatasetError
    from kubelora_trainer.storage import StorageError
    assert exits.code_of(DatasetError("no images")) == exits.BAD_INPUT
    assert exits.code_of(SpecError("x")) == exits.BAD_INPUT
    transient = StorageError("503")
    transient.transient = True
    assert exits.code_of(transient) == exits.FAILED
    assert exits.code_of(RuntimeError("CUDA out of memory while sampling")) == exits.FAILED  # retried

