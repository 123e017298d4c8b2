"""One LoRA training step of a Flux.1-dev-shaped transformer (11.9B, random weights) through
kubelora's own trainer code: lora.inject (peft, fp32 LoRA), dist.parallelize (FSDP2 with bf16
compute / fp32 reduce, optional checkpointing and regional compile) and the Flux family's loss
(packing, flux shift, guidance). 1024x1024 (4096 image + 512 text tokens), batch 1, rank 32 on
the attention and MLP linears of every block, AdamW, gradient clipping.

    python bench/gpu/flux_step.py compile_nogc        # modes: {eager|compile}_{gc|nogc}
    TINY=1 python bench/gpu/flux_step.py eager_gc     # CPU smoke test of this script

Prints one line: RESULT {json}. Run beside ../shared/bench (stock stack) on the same card:
see bench/gpu/run.sh.
"""
import json
import os
import sys
import time

import torch

MODE = sys.argv[1] if len(sys.argv) > 1 else "compile_nogc"
TINY = os.environ.get("TINY") == "1"
if TINY:
    os.environ["KUBELORA_FORCE_CPU"] = "1"


def main():
    from kubelora_trainer import adapters, dist
    from kubelora_trainer.models.base import Components
    from kubelora_trainer.models.flux.family import FAMILY
    from kubelora_trainer.spec import parse_spec
    from diffusers import FluxTransformer2DModel

    env = dist.init()
    dev = env.device
    cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
               axes_dims_rope=(16, 56, 56))
    lat_hw, txt = 128, 512
    if TINY:
        cfg.update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
        lat_hw, txt = 16, 8
    spec = parse_spec({
        "model": {"type": "flux", "diffusersPath": "/bench/none", "dtype": "bfloat16", "fluxShift": True},
        "dataset": {"uri": "/bench/none", "resolution": 1024},
        "adapter": {"rank": 32, "alpha": 32},
        "training": {"gradientCheckpointing": MODE.endswith("_gc"), "compile": MODE.startswith("compile"),
                     "learningRate": 1e-4},
        "output": {"uri": "/bench/none"},
    })
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        tr = FluxTransformer2DModel(**cfg)
    torch.set_default_dtype(torch.float32)
    init_s = time.perf_counter() - t0
    nparams = sum(p.numel() for p in tr.parameters())
    comps = Components(trainable={"transformer": tr}, info={"guidance_embeds": True})
    ad = adapters.attach(comps, FAMILY, spec, env)
    compute, params, n_lora = ad.compute, ad.params, ad.n_trainable
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(1)
    batch = {"latents": torch.randn(1, 16, lat_hw, lat_hw, device=dev, generator=g).to(torch.bfloat16),
             "prompt_embeds": torch.randn(1, txt, cfg["joint_attention_dim"], device=dev, generator=g).to(torch.bfloat16),
             "pooled": torch.randn(1, cfg["pooled_projection_dim"], device=dev, generator=g).to(torch.bfloat16)}

    def step():
        with compute():
            loss = FAMILY.loss(comps, batch, spec.model, spec.training, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter(); step(); sync(); first_s = time.perf_counter() - t0
    step(); sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(2 if TINY else 6):
        t0 = time.perf_counter(); loss = step(); sync(); ts.append(time.perf_counter() - t0)
    ts.sort()
    res = dict(params_b=round(nparams / 1e9, 3), lora_m=round(n_lora / 1e6, 2), init_s=round(init_s, 1),
               first_step_s=round(first_s, 1), step_s_median=round(ts[len(ts) // 2], 4), step_s_min=round(ts[0], 4),
               loss=loss, peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None)
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    dist.close()
    return res


if __name__ == "__main__":
    tag = "_fsdp" if os.environ.get("KUBELORA_FSDP_SINGLE") == "1" else ""
    tag += "_cudnn" if os.environ.get("KUBELORA_CUDNN_SDPA") == "1" else ""
    out = {"mode": f"kubelora_{MODE}{tag}", "torch": torch.__version__}
    try:
        out.update(main())
    except Exception as e:  # report, do not hide
        import traceback
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    print("RESULT " + json.dumps(out), flush=True)
