"""training.cpuOffload through the real trainer (in-process, tiny Flux): the model is loaded into CPU
memory, the encoders moved to the device, FSDP2 holds the weights with its CPUOffloadPolicy (one
process), and the run trains, checkpoints and exports. Here the device is the CPU as well, so this
shows the wiring end to end, not the copies to a GPU (not yet run on one). The step's math against
the plain path: tests/test_dist_numerics.py."""
import json

import pytest

from kubelora_trainer.spec import SpecError, parse_spec


def test_a_cpu_offloaded_run_trains_and_exports(tmp_path, tiny_flux_dir, monkeypatch, capsys):
    from conftest import one_rank_env, write_overfit_data
    from kubelora_trainer import train
    one_rank_env(monkeypatch)
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    data = write_overfit_data(tmp_path / "data")
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
                       "dataset": {"uri": str(data), "resolution": 32},
                       "training": {"steps": 3, "cpuOffload": True, "checkpointEverySteps": 2},
                       "output": {"uri": str(tmp_path / "out")}})
    assert train.run(spec, "offload") == 0, capsys.readouterr().err[-3000:]
    log = capsys.readouterr().out
    assert "[model] cpuOffload:" in log and "kept in CPU memory (FSDP2 CPUOffloadPolicy)" in log
    assert "[model] warning: training.cpuOffload on a CPU run saves no memory" in log  # said, still run
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["artifacts"] and (tmp_path / "out" / m["artifacts"][0]["file"]).stat().st_size > 0
    assert any((tmp_path / "out" / "checkpoints").iterdir())


@pytest.mark.parametrize("training,extra,message", [
    ({"cpuOffload": True, "sharding": "replicate"}, {}, "training.cpuOffload keeps the weights in CPU memory through FSDP2"),
    ({"cpuOffload": True}, {"samples": {"prompts": [{"prompt": "a cat"}]}}, "spec.samples with training.cpuOffload"),
])
def test_what_cpu_offload_cannot_do_is_refused(training, extra, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                    "training": training, "output": {"uri": "/o"}, **extra})
