"""Selective activation checkpointing by block (training.gradientCheckpointingEvery): what a forward
keeps for its backward, counted by saved-tensor hooks on the tiny Flux through the trainer's own
adapters.attach, falls from no checkpointing to every other block to every block; the gradients
are the same in all three (recomputation changes memory, not math)."""
import pytest
import torch

from kubelora_trainer import adapters, dist
from kubelora_trainer.models.base import Components
from kubelora_trainer.spec import SpecError, parse_spec

CPU = torch.device("cpu")


def _spec(**training):
    return parse_spec({"model": {"type": "flux", "diffusersPath": "/m", "dtype": "float32"},
                       "dataset": {"uri": "/d", "resolution": 64}, "adapter": {"rank": 4},
                       "training": training, "output": {"uri": "/o"}})


def _saved_and_grads(**training):
    from diffusers import FluxTransformer2DModel

    from kubelora_trainer.models.flux.family import FAMILY
    from kubelora_trainer.models.flux.tiny import TINY_TRANSFORMER
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 4})
    comps = Components(trainable={"transformer": tr}, info={"guidance_embeds": True})
    spec = _spec(**training)
    ad = adapters.attach(comps, FAMILY, spec, dist.DistEnv(0, 1, 0, CPU))
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(1, 4, 8, 8, generator=g), "prompt_embeds": torch.randn(1, 8, 32, generator=g),
             "pooled": torch.randn(1, 32, generator=g)}
    saved = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ad.compute():
        loss = FAMILY.loss(comps, batch, spec.model, spec.training, torch.Generator().manual_seed(2))
    loss.backward()
    return saved[0], torch.cat([p.grad.flatten() for p in ad.params])


def test_checkpointing_every_other_block_keeps_less_than_none_and_more_than_all():
    none, g0 = _saved_and_grads()
    half, g2 = _saved_and_grads(gradientCheckpointing=True, gradientCheckpointingEvery=2)
    full, g1 = _saved_and_grads(gradientCheckpointing=True)
    assert full < half < none, (full, half, none)
    torch.testing.assert_close(g2, g0)
    torch.testing.assert_close(g1, g0)


def test_the_interval_without_checkpointing_is_refused():
    with pytest.raises(SpecError, match="training.gradientCheckpointingEvery picks which blocks"):
        _spec(gradientCheckpointingEvery=2)
