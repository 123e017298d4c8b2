"""Tokens/s and MFU from the step rate: pure arithmetic, checked against hand counts."""
import pytest

from kubelora_trainer.families import RULES
from kubelora_trainer.throughput import flops_per_token, peak_flops, rates, tokens_of


def test_tokens_follow_each_familys_patch():
    assert tokens_of((16, 128, 128), RULES["flux"].token_patch) == 4096            # 1024² Flux: 64x64 tokens
    assert tokens_of((16, 9, 64, 64), RULES["hunyuan-video"].token_patch) == 9216  # 33 frames at 512²
    assert tokens_of((4, 128, 128), RULES["sdxl"].token_patch) == 16384            # latent pixels
    assert tokens_of((128, 5, 16, 16), RULES["ltx-video"].token_patch) == 1280


def test_mfu_is_model_flops_over_the_devices_peak():
    tps, mfu = rates(2.5, 4096, 11_900_000_000, False, "NVIDIA H100 80GB HBM3", 1)
    assert tps == 2.5 * 4096
    assert mfu == pytest.approx(tps * 4 * 11.9e9 / 989e12)
    assert flops_per_token(10, full=True) == 60 and flops_per_token(10, full=False) == 40
    _, mfu8 = rates(20.0, 4096, 11_900_000_000, True, "NVIDIA H100 80GB HBM3", 8)
    assert mfu8 == pytest.approx(20 * 4096 * 6 * 11.9e9 / (8 * 989e12))


def test_unknown_devices_and_no_rate_give_no_mfu():
    assert rates(3.0, 100, 10**9, False, "cpu", 2) == (300.0, None)
    assert rates(None, 100, 10**9, False, "NVIDIA H100", 1) == (None, None)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
