"""One LoRA training step through kubelora's own trainer code, on a Flux.1-dev-shaped (11.9B) or a
HunyuanVideo-shaped (12.8B) transformer with random weights: lora.inject (peft, fp32 LoRA),
optional float8 storage and fp8 GEMMs (fp8.py), dist.parallelize (bf16 autocast, optional
activation checkpointing and regional compile) and the family's own loss.

  flux:    1024x1024 (4096 image + 512 text tokens), batch 1
  hunyuan: 33 frames at 512x512 (9216 video + 256 text tokens), batch 1
  rank 32 on the attention and MLP linears of every block, AdamW, gradient clipping.

    python bench/gpu/lora_step.py flux compile_nogc_fp8   # modes: {eager|compile}_{gc|nogc}[_fp8|_fp8t|_fp8dq][_off]
        (_off: training.cpuOffload, the weights in CPU memory, each block copied to the GPU per use)
    TINY=1 python bench/gpu/lora_step.py hunyuan eager_gc_fp8   # CPU smoke test of this script
    PROFILE=1 python bench/gpu/lora_step.py flux compile_nogc_fp8t   # also $OUT/profile_<model>_<mode>.txt
    HY_CAPTIONS=varied python bench/gpu/lora_step.py hunyuan compile_gc   # captions of varying length
        (two samples a micro-batch, padded to 256, different lengths each step: the attention gets a
        mask, as in training with micro-batches above 1); default: one sample, 256 caption tokens
    ATTN=flash python bench/gpu/lora_step.py flux compile_nogc   # training.attentionBackend (default auto)
    BUDGET_GIB=30 python bench/gpu/lora_step.py hunyuan compile_auto_fp8   # training.memoryBudgetGiB
    ASYNC=1 python bench/gpu/lora_step.py flux compile_nogc_fp8   # also async_s_per_step: steps queued back
        to back with one wait (the CPU running ahead), beside s_per_step's wait for every step's loss
    SYNCS=1 python bench/gpu/lora_step.py flux compile_nogc_fp8   # also host_syncs: where a step waits

Prints one line: RESULT {json} with case, s_per_step (median), peak_gib, mfu, gpu, torch.
mfu = model FLOPs of the step (forward GEMMs and attention counted once by torch's FlopCounterMode
on an eager forward; backward = input gradients of the frozen GEMMs (x1) and attention (x2))
/ step time / the card's dense bf16 peak (989 TFLOP/s for H100 and H200), also for fp8 runs.
Run beside ../shared/bench (stock stack) on the same card: see bench/gpu/run.sh.
"""
import contextlib
import itertools
import json
import os
import sys
import time

import torch

MODEL = sys.argv[1] if len(sys.argv) > 1 else "flux"
MODE = sys.argv[2] if len(sys.argv) > 2 else "compile_nogc"
TINY = os.environ.get("TINY") == "1"
OFFLOAD = "_off" in MODE   # training.cpuOffload
VARIED = os.environ.get("HY_CAPTIONS") == "varied"
ATTN = os.environ.get("ATTN", "auto")  # training.attentionBackend: auto (cuDNN compiled on Hopper), flash, cudnn
BUDGET = os.environ.get("BUDGET_GIB")  # training.memoryBudgetGiB for the _auto modes (the memory plan's budget)
ASYNC = os.environ.get("ASYNC") == "1"  # also time steps queued back to back (no wait for each step's loss)
SYNCS = os.environ.get("SYNCS") == "1"  # list the host syncs of one step (bench/gpu/syncs.py)
if TINY:
    os.environ["KUBELORA_FORCE_CPU"] = "1"


def build(dev):
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel
    if MODEL == "flux":
        cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
        shape, txt = (16, 128, 128), 512
        if TINY:
            cfg.update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
            shape, txt = (16, 16, 16), 8
        cls, family, spec_model = FluxTransformer2DModel, "flux", {"diffusersPath": "/bench/none", "fluxShift": True}
    else:
        cfg = {}
        shape, txt = (16, 9, 64, 64), 256
        if TINY:
            cfg = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=2,
                       num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))
            shape, txt = (16, 3, 8, 8), 8
        cls, family, spec_model = HunyuanVideoTransformer3DModel, "hunyuan-video", {"ckptPath": "/bench/none"}
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cpu" if OFFLOAD else dev):  # offloaded: FSDP2 moves one block at a time
        tr = cls(**cfg)
    torch.set_default_dtype(torch.float32)
    g = torch.Generator(device=dev).manual_seed(1)
    bf = torch.bfloat16
    if MODEL == "flux":
        batch = {"latents": torch.randn(1, *shape, device=dev, generator=g).to(bf),
                 "prompt_embeds": torch.randn(1, txt, tr.config.joint_attention_dim, device=dev, generator=g).to(bf),
                 "pooled": torch.randn(1, tr.config.pooled_projection_dim, device=dev, generator=g).to(bf)}
    else:  # varied captions: two samples a micro-batch, so the shorter caption's padding keeps a mask
        b = 2 if VARIED else 1
        batch = {"latents": torch.randn(b, *shape, device=dev, generator=g).to(bf),
                 "prompt_embeds": torch.randn(b, txt, tr.config.text_embed_dim, device=dev, generator=g).to(bf),
                 "prompt_mask": torch.ones(b, txt, device=dev, dtype=torch.bool),
                 "pooled": torch.randn(b, tr.config.pooled_projection_dim, device=dev, generator=g).to(bf)}
    return tr, family, spec_model, batch, g


@contextlib.contextmanager
def saved_by_shape():
    """What a forward keeps for its backward (parameters aside), tallied by dtype and shape:
    {"bfloat16[1, 4608, 3072]": (count, bytes)}."""
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            k = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            n, b = saved.get(k, (0, 0))
            saved[k] = (n + 1, b + t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def top_saved(saved: dict, gib) -> list:
    return [[k, n, gib(b)] for k, (n, b) in sorted(saved.items(), key=lambda kv: -kv[1][1])[:8]]


def step_flops(fam, comps, batch, spec, g) -> float:
    """FLOPs of one LoRA step: an eager forward counted by FlopCounterMode, attention x3 and the
    rest x2 (the frozen GEMMs' backward computes input gradients only)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.autocast(batch["latents"].device.type, dtype=torch.bfloat16), counter:
        fam.loss(comps, batch, spec.model, spec.training, g)
    ops = counter.get_flop_counts().get("Global", {})
    attn = sum(v for k, v in ops.items() if "attention" in str(k))
    return 3 * attn + 2 * (sum(ops.values()) - attn)


def main():
    from kubelora_trainer import adapters, dist
    from kubelora_trainer.models import get_family
    from kubelora_trainer.models.base import Components
    from kubelora_trainer.spec import parse_spec

    env = dist.init()
    dev = env.device
    t0 = time.perf_counter()
    tr, family, spec_model, batch, g = build(dev)
    init_s = time.perf_counter() - t0
    fam = get_family(family)
    fp8 = "_fp8" in MODE
    spec = parse_spec({
        "model": {"type": family, "dtype": "bfloat16", **spec_model,
                  **({"transformerDtype": "float8",
                      "float8Compute": {"_fp8dq": "dequant", "_fp8t": "fp8_transposed"}.get(MODE.replace("_off", "")[MODE.index("_fp8"):], "fp8")}
                     if fp8 else {})},
        "dataset": {"uri": "/bench/none", "resolution": 1024 if family == "flux" else 512},
        "adapter": {"rank": 32, "alpha": 32},
        # _auto: gradientCheckpointing unset, the trainer's memory plan decides (its prediction is reported)
        "training": {"gradientCheckpointing": True if "_gc" in MODE else None if "_auto" in MODE else False, "compile": MODE.startswith("compile"), "cpuOffload": OFFLOAD,
                     "learningRate": 1e-4, "attentionBackend": ATTN,
                     **({"memoryBudgetGiB": float(BUDGET)} if BUDGET and "_auto" in MODE else {})},
        "output": {"uri": "/bench/out"},
    })
    nparams = sum(p.numel() for p in tr.parameters())
    comps = Components(trainable={"transformer": tr}, info={"guidance_embeds": True})
    flops = 0.0 if OFFLOAD else step_flops(fam, comps, batch, spec, g)  # offloaded: the model is not on the device
    ad = adapters.attach(comps, fam, spec, env, probe=lambda: batch)
    compute, params, n_lora = ad.compute, ad.params, ad.n_trainable
    from kubelora_trainer.train import optimizer
    opt = optimizer(ad.groups, spec.training)  # the trainer's (fused AdamW)

    text_len = batch["prompt_mask"].shape[1] if "prompt_mask" in batch else 0
    lengths = itertools.cycle([max(1, int(f * text_len)) for f in (0.8, 0.55, 1.0, 0.35, 0.7)])

    def step():
        if VARIED and "prompt_mask" in batch:  # the two captions of different lengths, changing each step
            n, n2 = next(lengths), next(lengths)
            pos = torch.arange(batch["prompt_mask"].shape[1], device=dev)
            batch["prompt_mask"] = torch.stack([pos < n, pos < n2])
        with compute():
            loss = fam.loss(comps, batch, spec.model, spec.training, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter(); step(); sync(); first_s = time.perf_counter() - t0
    step(); sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ts = []
    n = 2 if TINY else 5
    for _ in range(n):  # each step waited for, as the trainer does today (its loss read on the host)
        t0 = time.perf_counter(); loss = float(step()); sync(); ts.append(time.perf_counter() - t0)
    ts.sort()
    s = ts[len(ts) // 2]
    if ASYNC:  # n steps queued back to back, one wait at the end: a step with the CPU running ahead
        t0 = time.perf_counter()
        losses = [step() for _ in range(n)]
        float(losses[-1]); sync(); async_s = (time.perf_counter() - t0) / n
    if SYNCS:  # where a step makes the host wait (bench/gpu/syncs.py), by call site
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from syncs import found
        with found() as host_syncs:
            step()
        sync()
    peak_bytes = torch.cuda.max_memory_allocated() if cuda else None
    mem = {}
    if cuda:  # where the peak comes from: weights, what the forward keeps for backward, the backward
        gib = lambda b: round(b / 2**30, 2)  # noqa: E731
        mem["weights_gib"] = gib(sum(p.numel() * p.element_size() for p in tr.parameters()))
        torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        with compute(), saved_by_shape() as saved:
            loss_t = fam.loss(comps, batch, spec.model, spec.training, g)
        torch.cuda.synchronize()
        mem["saved_top"] = top_saved(saved, gib)
        mem["saved_for_backward_gib"] = gib(torch.cuda.memory_allocated() - base)
        mem["forward_peak_gib"] = gib(torch.cuda.max_memory_allocated() - base)
        loss_t.backward()
        torch.cuda.synchronize()
        mem["backward_peak_gib"] = gib(torch.cuda.max_memory_allocated() - base)
        opt.zero_grad(set_to_none=True)
    else:  # the same tally on CPU, so the smoke test runs this code before a GPU run depends on it
        with compute(), saved_by_shape() as saved:
            fam.loss(comps, batch, spec.model, spec.training, g).backward()
        opt.zero_grad(set_to_none=True)
        mem["saved_top"] = top_saved(saved, lambda b: round(b / 2**30, 6))
    if os.environ.get("PROFILE") == "1":  # where a step's GPU time goes, top kernels, to $OUT (CPU: TINY smoke)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter(); step(); sync(); wall = time.perf_counter() - t0
        out_dir = os.environ.get("OUT", "/tmp")
        ka = prof.key_averages()
        with open(os.path.join(out_dir, f"profile_{MODEL}_{MODE}.txt"), "w") as f:
            f.write(ka.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=45))
            f.write("\n" + ka.table(sort_by="self_cpu_time_total", row_limit=25))
        # the step's timeline, for bench/gpu/idle.py (where the GPU waits, and on which CPU op)
        import gzip
        import shutil
        trace = os.path.join(out_dir, f"trace_{MODEL}_{MODE}.json")
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from idle import load, summary
        idle = summary(load(trace + ".gz"))
        mem["idle_top"] = dict(list(idle["idle_by_cpu_op"].items())[:5])
        # the GPU's busy time against the profiled step's wall time: what launches and syncs leave idle
        # (kernels only, as the table's "Self CUDA time total": CPU rows also carry their kernels' time)
        from torch.autograd import DeviceType
        busy = sum(e.self_device_time_total for e in ka
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
        mem["profiled_step_s"], mem["gpu_busy_s"] = round(wall, 4), round(busy, 4)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    from kubelora_trainer.throughput import peak_flops
    peak = peak_flops(gpu)
    res = dict(s_per_step=round(s, 4), step_s_min=round(ts[0], 4),
               peak_gib=round(peak_bytes / 2**30, 2) if cuda else None,
               mfu=round(flops / s / peak, 3) if peak and flops else None, tflop_per_step=round(flops / 1e12, 2),
               gpu=gpu, params_b=round(nparams / 1e9, 3), lora_m=round(n_lora / 1e6, 2), init_s=round(init_s, 1),
               first_step_s=round(first_s, 1), loss=loss,
               attention="cudnn" if cuda and torch.backends.cuda.cudnn_sdp_enabled() else "flash" if cuda else "cpu",
               memory_budget_gib=spec.training.memoryBudgetGiB, **mem)
    if ASYNC:
        res["async_s_per_step"] = round(async_s, 4)
    if SYNCS:
        res["host_syncs"] = host_syncs[:12]
    if ad.memory:  # _auto: the plan's prediction beside the measured peak
        res["memory_plan"] = {k: v for k, v in ad.memory.items() if k not in ("text", "predictedPeakBytes")}
    # 2x8 GPUs at 400 Gb/s each, LoRA gradients in fp32, replicated base (scaling.py; bench/projection.py)
    from kubelora_trainer.scaling import project
    res["proj_2x8_replicate_eff"] = round(project(s, n_lora * 4, 0, "replicate").efficiency_serial, 4)
    dist.close()
    return res


if __name__ == "__main__":
    tag = ("_fsdp" if os.environ.get("KUBELORA_FSDP_SINGLE") == "1" else "") + ("_varied" if VARIED else "") + \
        ("" if ATTN == "auto" else f"_{ATTN}")
    out = {"case": f"kubelora_{MODEL}_{MODE}{tag}", "torch": torch.__version__}
    try:
        out.update(main())
    except Exception as e:  # report, do not hide
        import traceback
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    print("RESULT " + json.dumps(out), flush=True)
