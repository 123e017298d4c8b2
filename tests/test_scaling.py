"""The multi-node projection (scaling.py): the bytes each GPU sends follow the collectives' rules,
and the issue's goal (>= 90% step efficiency on 2x8 GPUs at 400 Gb/s for a LoRA on a replicated
base) holds for the Flux.1-dev shape measured on the H100 (bench/results)."""
import pytest

from kubelora_trainer.scaling import link_bytes_per_s, project


def test_replicate_sends_twice_the_gradients_share_once_per_optimizer_step():
    p = project(0.4, grad_bytes=1e9, weight_bytes=24e9, sharding="replicate", nodes=2, gpus_per_node=8)
    assert p.world == 16
    assert p.bytes_per_gpu == pytest.approx(2 * 15 / 16 * 1e9)       # ring all-reduce; the weights never travel
    assert p.comm_s == pytest.approx(p.bytes_per_gpu / (400e9 / 8 * 0.8))
    assert p.efficiency_serial == p.efficiency_overlapped == pytest.approx(0.4 / (0.4 + p.comm_s))
    acc = project(0.4, 1e9, 24e9, "replicate", micro_steps=4)          # accumulation: one all-reduce per 4 micro-batches
    assert acc.bytes_per_gpu == p.bytes_per_gpu and acc.efficiency_serial > p.efficiency_serial


def test_shard_gathers_the_weights_twice_per_micro_batch():
    p = project(0.4, grad_bytes=1e9, weight_bytes=24e9, sharding="shard")
    assert p.bytes_per_gpu == pytest.approx(15 / 16 * (2 * 24e9 + 1e9))
    assert p.efficiency_overlapped == pytest.approx(min(1.0, 0.4 / p.comm_s))
    assert p.efficiency_serial < p.efficiency_overlapped < 1.0
    assert project(0.4, 1e9, 24e9, "shard", nodes=1, gpus_per_node=1).efficiency_serial == 1.0
    with pytest.raises(ValueError):
        project(0.4, 1e9, 24e9, "ddp")


def test_flux_lora_on_2x8_h100_meets_the_90_percent_goal_when_replicated():
    # measured: kubelora Flux.1-dev shape, bf16, 0.396 s/step, 130.74M LoRA parameters (fp32 gradients),
    # 11.9B frozen parameters in bf16 (bench/results/2026-11-26-h100.jsonl)
    grads, weights = 130.74e6 * 4, 11.901e9 * 2
    rep = project(0.396, grads, weights, "replicate")
    assert rep.efficiency_serial >= 0.90, rep
    shard = project(0.396, grads, weights, "shard")
    assert shard.efficiency_overlapped < 0.5   # why auto sharding replicates a base that fits
    assert link_bytes_per_s(400, 1.0) == 50e9
