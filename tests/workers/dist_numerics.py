"""Run under torchrun by tests/test_dist_numerics.py: one tiny Flux transformer (bf16 base),
LoRA attached by the trainer's own adapters.attach, one AdamW step on a fixed batch, then a
forward pass without and one with LoRA dropout. Rank 0 writes {"out": [...], "dropout_outs": [[...] per rank],
"step_bytes": bytes this rank sent in collectives during the step, "grad_bytes": the trainable
gradients' bytes} as JSON to argv[1]. argv[2]: training.sharding (replicate or shard); argv[3]
"float8": the base stored in float8 with fp8 GEMMs (model.transformerDtype float8); "offload":
training.cpuOffload (FSDP2's CPUOffloadPolicy).

    torchrun --nproc-per-node 2 tests/workers/dist_numerics.py out.json shard
"""
import json
import os
import sys

import torch


def tiny_transformer():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4)).to(torch.bfloat16)


def inputs():
    from diffusers import FluxPipeline
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 64, 16, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(2, 12, 32, generator=g).bfloat16(),
                pooled_projections=torch.randn(2, 32, generator=g).bfloat16(), timestep=torch.tensor([0.3, 0.77]),
                img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
                txt_ids=torch.zeros(12, 3), return_dict=False)


def attach(env, dropout: float, sharding: str, float8: bool = False, offload: bool = False):
    from kubelora_trainer import adapters
    from kubelora_trainer.models.base import Components
    from kubelora_trainer.models.flux.family import FAMILY
    from kubelora_trainer.spec import parse_spec
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m", "dtype": "bfloat16",
                                 **({"transformerDtype": "float8"} if float8 else {})},
                       "dataset": {"uri": "/d", "resolution": 32}, "adapter": {"rank": 4, "dropout": dropout},
                       "training": {"steps": 1, "seed": 3, "sharding": sharding, "cpuOffload": offload},
                       "output": {"uri": "/o"}})
    comps = Components(trainable={"transformer": tiny_transformer()})
    return comps.denoiser, adapters.attach(comps, FAMILY, spec, env)


def count_collective_bytes():
    """Wrap torch.distributed's tensor collectives (FSDP2 calls them through the module too) to
    count the bytes this rank sends: the input tensor of each call."""
    import torch.distributed as tdist
    sent = [0, 0]   # bytes, all-gather calls

    def wrap(name, arg):
        real = getattr(tdist, name)

        def counted(*args, **kwargs):
            t = args[arg] if len(args) > arg else None
            if isinstance(t, torch.Tensor):
                sent[0] += t.numel() * t.element_size()
            sent[1] += "all_gather" in name
            return real(*args, **kwargs)
        setattr(tdist, name, counted)
    for name, arg in (("all_reduce", 0), ("all_gather_into_tensor", 1), ("reduce_scatter_tensor", 1),
                      ("all_gather_single", 1), ("reduce_scatter_single", 1),  # FSDP2's, torch >= 2.12
                      ("broadcast", 0), ("all_to_all_single", 1)):
        if hasattr(tdist, name):
            wrap(name, arg)
    return sent


def main(out_path: str, sharding: str, float8: bool = False, offload: bool = False) -> None:
    from kubelora_trainer import dist
    env = dist.init()
    model, ad = attach(env, dropout=0.5, sharding=sharding, float8=float8, offload=offload)
    model.eval()  # dropout off for the step and the parity output
    opt = torch.optim.AdamW(ad.groups, lr=1e-2)
    sent = count_collective_bytes()
    with ad.compute():
        loss = model(**inputs())[0].float().square().mean()
    ad.sync.before_backward(last=True)
    loss.backward()
    ad.sync.after_backward()
    opt.step()
    step_bytes, step_gathers = sent
    from kubelora_trainer.models.flux.family import FAMILY
    blocks = sum(len(b) for b in FAMILY.blocks("transformer", model))
    grad_bytes = sum(p.numel() * 4 for p in ad.params)  # fp32 LoRA, whole (unsharded) sizes
    with torch.no_grad(), ad.compute():
        out = model(**inputs())[0].float()
    model.train()  # dropout on: each rank must draw its own masks
    with torch.no_grad(), ad.compute():
        drop_out = model(**inputs())[0].float()
    gathered = dist.all_gather(drop_out.flatten()[:256].tolist())
    synced = None
    if sharding == "replicate":  # parameters only one rank, or no rank, got a gradient for
        ps = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
        if env.rank == 0:
            ps[0].grad = torch.full((3,), 2.0)
        ps[2].grad = torch.full((3,), float(env.rank + 1))
        dist.GradSync("replicate", [], ps).after_backward()
        synced = dist.all_gather([None if p.grad is None else p.grad.tolist() for p in ps])
    if env.is_main:
        with open(out_path, "w") as f:
            json.dump({"out": out.flatten().tolist(), "dropout_outs": gathered, "step_bytes": step_bytes,
                       "grad_bytes": grad_bytes, "step_gathers": step_gathers, "blocks": blocks,
                       "synced": synced}, f)
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "auto", float8="float8" in sys.argv[3:],
         offload="offload" in sys.argv[3:])
    sys.stdout.flush()
    os._exit(0)  # as the trainer does: gloo teardown at interpreter exit can abort a finished rank
