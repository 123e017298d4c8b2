"""Pure pieces of the training loop's bookkeeping: schedule, progress rates, loss history."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubelora_trainer.progress import Meter, Progress, Publisher, format_eta
from kubelora_trainer.report import downsample
from kubelora_trainer.train import fused, lr_lambda, optimizer

REPO = Path(__file__).resolve().parents[1]


def test_lr_schedule_warmup_then_constant_or_cosine():
    assert [lr_lambda(s, 4, 20, "constant") for s in (0, 1, 3, 4, 19)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = [lr_lambda(s, 0, 10, "cosine") for s in range(11)]
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and cos[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cos, cos[1:]))


def test_the_optimizer_is_fused_adamw_with_the_specs_settings():
    """One fused launch per step; the same update as the multi-tensor AdamW with training's lr,
    betas, epsilon and weight decay (a setting dropped on the way would move the weights apart)."""
    import torch
    from types import SimpleNamespace
    t = SimpleNamespace(learningRate=3e-2, betas=(0.8, 0.95), epsilon=1e-4, weightDecay=0.3)
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fast = optimizer([{"params": a}], t)
    ref = torch.optim.AdamW(b, lr=3e-2, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.3, foreach=True)
    assert fast.param_groups[0]["fused"] is True
    for _ in range(3):
        for pa, pb in zip(a, b):
            pa.grad = pb.grad = torch.linspace(-1, 1, pa.numel()).reshape(pa.shape) * (1 + pa.detach().sum().abs())
        fast.step()
        ref.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # a checkpoint of the multi-tensor optimizer, restored: torch takes its options (fused None);
    # fused() puts the fused kernel back, and the run goes on as the multi-tensor one does
    resumed = optimizer([{"params": a}], t)
    resumed.load_state_dict(ref.state_dict())
    assert resumed.param_groups[0]["fused"] is None
    fused(resumed)
    assert resumed.param_groups[0]["fused"] is True and resumed.param_groups[0]["foreach"] is None
    assert all(st["step"].dtype == torch.float32 and st["step"].item() == 3 for st in resumed.state.values())
    for opt in (resumed, ref):
        opt.step()
    for pa, pb in zip(a, b):  # a fourth step: the kernels' rounding apart, not the update
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_eta_and_rates():
    assert (format_eta(None), format_eta(-1), format_eta(65), format_eta(3725)) == ("?", "?", "1:05", "1:02:05")
    m = Meter(total_steps=10, samples_per_step=4)
    assert m.update(1, now=0.0) == (None, None)
    sps, eta = m.update(3, now=1.0)  # 2 steps in 1 s
    assert sps == pytest.approx(8.0) and eta == pytest.approx(3.5)


def test_loss_history_is_bounded_and_averaged():
    assert downsample([1.0, 3.0, 5.0], 10) == [[1, 1.0], [2, 3.0], [3, 5.0]]
    h = downsample([float(i) for i in range(1000)], 200)
    assert len(h) == 200 and h[0] == [5, 2.0] and h[-1][0] == 1000


def test_progress_file_for_a_local_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELORA_PROGRESS_FILE", str(tmp_path / "p.json"))
    Publisher()(Progress(phase="Training", step=3, totalSteps=9, loss=0.5))
    assert json.loads((tmp_path / "p.json").read_text())["step"] == 3
    assert "runId" not in json.loads((tmp_path / "p.json").read_text())   # kubelora run: no identity
    monkeypatch.setenv("KUBELORA_RUN_ID", "uid-1")                          # the operator's pods: the job's uid
    Publisher()(Progress(phase="Training", step=4, totalSteps=9))
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["runId"] == "uid-1"
    # the operator reports only its own run's progress (a job made again under the same name reads
    # its predecessor's file until its own trainer writes one)
    from kubelora_operator.status import own_progress
    assert own_progress(written, "uid-1") is written and own_progress(written, "uid-2") is None
    assert own_progress({"phase": "Training"}, "uid-2") == {"phase": "Training"} and own_progress(None, "u") is None


def test_validate_prints_the_resolved_spec():
    p = subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "validate", str(REPO / "examples" / "sdxl.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "textEncoderLearningRate" in p.stdout and "missingCaption: skip" in p.stdout  # defaults filled in
    assert p.stderr.strip().splitlines()[-1].startswith(f"[valid] {REPO / 'examples' / 'sdxl.yaml'}: sdxl lora, ")


def test_epochs_count_samples_over_all_ranks():
    from kubelora_trainer.train import epoch_of
    # 10 items x 2 repeats = 20 samples an epoch; 8 samples a step (e.g. 4 ranks x 2)
    assert [epoch_of(step * 8, 20) for step in (1, 2, 3, 5, 6)] == [1, 1, 2, 2, 3]
    assert epoch_of(0, 20) == 1 and epoch_of(5, 0) == 5


def test_linear_schedule_reaches_zero_at_the_last_step():
    lin = [lr_lambda(s, 2, 12, "linear") for s in (0, 1, 2, 7, 12)]
    assert lin == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_a_progress_upload_that_fails_leaves_the_next_one_its_own_thread(tmp_path, monkeypatch, capsys):
    """/tmp full for a moment (the temporary file cannot be made): said once, and the next progress
    is still published (the upload thread died with the error and no thread was started again)."""
    import errno
    import tempfile
    real = tempfile.NamedTemporaryFile
    full = [True]

    def made(*a, **kw):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", made)
    publish = Publisher(str(tmp_path / "out"))
    publish(Progress(phase="Training", step=1, totalSteps=9), force=True, wait=True)
    assert "[progress] could not publish progress to" in capsys.readouterr().out
    full[0] = False
    publish(Progress(phase="Succeeded", step=9, totalSteps=9), force=True, wait=True)
    assert json.loads((tmp_path / "out" / "status" / "progress.json").read_text())["phase"] == "Succeeded"
