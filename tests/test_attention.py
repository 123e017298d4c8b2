"""training.attentionBackend: which attention kernel runs on NVIDIA GPUs (attention.py). The kernels
themselves need a GPU (measured in bench/gpu, docs/benchmarks.md fifth run); here the choice, the
switch of torch's global setting, the spec field and the non-finite loss's hint."""
import pytest
import torch

from kubelora_trainer import attention, checkpoint
from kubelora_trainer.spec import SpecError, parse_spec


@pytest.mark.parametrize("requested,device,cap,compiled,want", [
    ("auto", "cuda", (9, 0), True, "cudnn"),      # measured: H100, compiled
    ("auto", "cuda", (9, 0), False, "flash"),     # eager: the crash in cuDNN's backward
    ("auto", "cuda", (8, 0), True, "flash"),      # not measured off Hopper
    ("auto", "cuda", (10, 0), True, "flash"),
    ("flash", "cuda", (9, 0), True, "flash"),
    ("cudnn", "cuda", (8, 6), False, "cudnn"),    # asked for: as asked
    ("cudnn", "cpu", None, False, "default"),     # no CUDA: torch's CPU kernels either way
    ("auto", "cpu", None, True, "default"),
])
def test_choose(requested, device, cap, compiled, want):
    backend, why = attention.choose(requested, device, cap, compiled)
    assert backend == want and why


def test_apply_switches_torchs_setting_and_the_nan_hint_follows_it():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        attention.apply("cudnn")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert "training.attentionBackend: flash" in attention.nan_hint("cuda")
        assert attention.nan_hint("cpu") == ""
        attention.apply("default")  # leaves it
        assert torch.backends.cuda.cudnn_sdp_enabled()
        attention.apply("flash")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert attention.nan_hint("cuda") == ""
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _spec(**training):
    return parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt/flux"}, "dataset": {"uri": "s3://bkt/d"},
                       "adapter": {"rank": 4}, "training": training, "output": {"uri": "s3://bkt/o"}})


def test_spec_field_default_values_and_refusal():
    assert _spec().training.attentionBackend == "auto"
    assert _spec(attentionBackend="cudnn").training.attentionBackend == "cudnn"
    with pytest.raises(SpecError, match="attentionBackend"):
        _spec(attentionBackend="fa3")


def test_changing_the_backend_does_not_refuse_a_resume():
    old, new = checkpoint.fingerprint(_spec()), checkpoint.fingerprint(_spec(attentionBackend="flash"))
    assert checkpoint.changed_fields(old, new) == []
