"""training.attentionBackend: which attention kernel runs on NVIDIA GPUs (attention.py). The kernels
themselves need a GPU (measured in bench/gpu, docs/benchmarks.md fifth run); here the choice, the
switch of torch's global setting, the spec field and the non-finite loss's hint."""
import pytest
import torch

from kubelora_trainer import attention, checkpoint
from kubelora_trainer.spec import SpecError, parse_spec


@pytest.mark.parametrize("requested,device,cap,compiled,full,want", [
    ("auto", "cuda", (9, 0), True, False, "cudnn"),     # measured: H100, compiled, LoRA
    ("auto", "cuda", (9, 0), False, False, "flash"),    # eager: the crash in cuDNN's backward
    ("auto", "cuda", (9, 0), True, True, "flash"),      # full fine-tune: trained attention runs eagerly
    ("auto", "cuda", (8, 0), True, False, "flash"),     # not measured off Hopper
    ("auto", "cuda", (10, 0), True, False, "flash"),
    ("flash", "cuda", (9, 0), True, False, "flash"),
    ("cudnn", "cuda", (8, 6), False, True, "cudnn"),    # asked for: as asked
    ("cudnn", "cpu", None, False, False, "default"),    # no CUDA: torch's CPU kernels either way
    ("auto", "cpu", None, True, False, "default"),
])
def test_choose(requested, device, cap, compiled, full, want):
    backend, why = attention.choose(requested, device, cap, compiled, full=full)
    assert backend == want and why
    warned = attention.warning(requested, backend)
    assert (warned is not None) == (backend == "default" and requested != "auto")


def test_parallelize_applies_the_choice_and_says_it(monkeypatch, capsys):
    """adapters.parallelize on a stood-in Hopper GPU (its capability; no block runs): compile unset
    turns cuDNN's attention on and says why, compile off turns it off; on the CPU a set value is
    warned about and torch's setting left alone."""
    import torch._dynamo
    from kubelora_trainer import adapters, compiling, dist
    from kubelora_trainer.models.base import Components
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(compiling, "compiler_problem", lambda device_type: None)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    gpu = dist.DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cuda"))
    cpu = dist.DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    try:
        with torch._dynamo.config.patch(suppress_errors=False):
            for compile_, env, want in ((None, gpu, True), (False, gpu, False), (None, cpu, False)):
                spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                                   "training": {"compile": compile_, "attentionBackend": "cudnn" if env is cpu else "auto"},
                                   "output": {"uri": "/o"}})
                out = adapters.parallelize(adapters.Adapters(), Components(trainable={}), None, spec, env,
                                           adapters.Layout("none", {}))
                assert torch.backends.cuda.cudnn_sdp_enabled() is want
                # recorded for manifest.json's metrics (a GPU only)
                assert out.attention == ("default" if env is cpu else "cudnn" if want else "flash")
        lines = [ln for ln in capsys.readouterr().out.splitlines() if "attention" in ln]
        assert lines == ["[model] attention: cuDNN (compiled blocks on a Hopper GPU, where a Flux step ran 1.11x "
                         "faster than with flash)",
                         "[model] attention: flash (cuDNN off) (blocks run eagerly, where cuDNN's attention backward "
                         "crashed on an H100 (torch 2.11))",
                         "[model] warning: training.attentionBackend cudnn applies to NVIDIA GPUs only; torch's own "
                         "attention kernel runs here"], lines
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


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


def test_a_kept_text_mask_keeps_every_key_length_off_cudnns_nan_case():
    """trim_text_padding: where captions of different lengths keep a mask, one or two more padding
    positions are kept where a masked attention's key length (video + text for HunyuanVideo's
    blocks, the text alone for its token refiner and LTX-Video's cross-attention) would be 64 mod
    128 (cuDNN's backward returns NaN there, pytorch/pytorch#196678), past the padded length too
    (zeros, masked out); otherwise, and for a batch whose trimmed mask is all true, trimmed exactly."""
    from kubelora_trainer.models.base import trim_text_padding

    def kept(lengths, offsets, total=256):
        mask = torch.stack([torch.arange(total) < n for n in lengths])
        emb, m, full = trim_text_padding(torch.ones(len(lengths), total, 4), mask, key_offsets=offsets)
        assert emb.shape[1] == m.shape[1] and full is bool(m.all())  # read once, with the length
        assert m[:, :total].equal(mask[:, :m.shape[1]]) and not m[:, total:].any() and not emb[:, total:].any()
        return m.shape[1]

    assert kept([100, 40], (9216, 0)) == 100      # 9316 and 100: clean as they are
    assert kept([64, 40], (9216, 0)) == 65        # 9280 = 64 mod 128, and 64: one more
    assert kept([63, 40], (9216 + 1, 0)) == 65    # 9280 at 63, then 64 alone at 64: two more
    assert kept([64], (9216, 0)) == 64            # one caption: exact, its mask is all true and dropped
    assert kept([64, 64], (0,)) == 64
    assert kept([256, 3], (9216 + 64,)) == 257    # past the padded length: 9536 = 64 mod 128
    for n in range(1, 257):
        k = kept([n, 1], (9216 + 64, 0))
        assert k - n <= 2 and (9280 + k) % 128 != 64 and k % 128 != 64
