"""Attach LoRA to every trainable component of a family and apply the shared parallelism:
the one place where peft, checkpointing, compile, FSDP2 and optimizer groups meet."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import attention, compiling, dist, export, lora, memory_plan
from .models.base import Components, LoraTensors
from .spec import SpecError


@dataclass
class Adapters:
    configs: dict = field(default_factory=dict)        # component -> peft LoraConfig
    groups: list[dict] = field(default_factory=list)   # optimizer param groups (one per component)
    compute: Callable = None                           # context for forward passes
    n_trainable: int = 0
    sync: dist.GradSync = None                         # gradient exchange between ranks
    memory: Optional[dict] = None                      # the memory plan, when training.gradientCheckpointing is unset
    attention: str = "default"                         # the attention kernel chosen (attention.choose)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]


def learning_rate(component: str, training) -> float:
    if component.startswith("text_encoder") and training.textEncoderLearningRate is not None:
        return training.textEncoderLearningRate
    return training.learningRate


def attach(comps: Components, family, spec, env: dist.DistEnv, probe: Optional[Callable[[], dict]] = None) -> Adapters:
    """prepare, layout and parallelize in one call, for one process (train.run agrees on the
    layout between ranks first). probe: the largest micro-batch, for the memory plan."""
    out = prepare(comps, family, spec, env)
    parallelize(out, comps, family, spec, env, layout(out, comps, family, spec, env, probe))
    return out


def prepare(comps: Components, family, spec, env: dist.DistEnv, init=None) -> Adapters:
    """LoRA injected (or every weight made trainable) and started from init (adapter.initFrom,
    lora_init.read) when given, the frozen base stored in float8 where asked, and the trainable
    components moved to the device (not when offloaded)."""
    targets = dict(family.lora_targets())
    denoiser = next(iter(comps.trainable))
    if spec.adapter.targetModules:
        targets[denoiser] = lora.peft_targets(spec.adapter.targetModules)
    out = Adapters()
    full = spec.adapter.type == "full"
    for name, module in comps.trainable.items():
        if full:  # the denoiser only; a family's text encoders stay frozen
            module.requires_grad_(False)
            if name == denoiser:
                out.n_trainable += train_all(module)
        elif name != denoiser and learning_rate(name, spec.training) == 0:
            module.requires_grad_(False)  # textEncoderLearningRate 0: no LoRA there, the encoder stays frozen
        else:
            cfg = lora.lora_config(spec.adapter, targets[name])
            out.n_trainable += lora.inject(module, cfg, spec.training.seed)
            out.configs[name] = cfg
            if name == denoiser and spec.adapter.targetModules:
                missed = lora.unmatched(spec.adapter.targetModules, lora.adapted(module))
                if missed:
                    i, entry = missed[0]
                    more = f" (and {len(missed) - 1} more entries)" if len(missed) > 1 else ""
                    raise lora.AdapterError(f"adapter.targetModules[{i}] ({entry!r}) matches no linear layer of the "
                                            f"{name}{more}: remove or fix it (a suffix such as attn.to_q, or a regular "
                                            "expression matching whole module names)")
                outside = outside_blocks(lora.adapted(module), family, name, module)
                if outside and env.is_main:  # a suffix matches any module ending so: said, not only counted
                    print(f"[model] adapter.targetModules also adapts {len(outside)} module(s) of the {name} outside "
                          f"its repeated blocks: {', '.join(outside[:8])}{' ...' if len(outside) > 8 else ''} (a "
                          "regular expression naming the blocks' modules keeps to them)", flush=True)
    if init is not None:
        from . import lora_init
        loaded, missing = lora_init.apply(init, comps.trainable, spec.adapter.rank, spec.adapter.scale)
        if env.is_main:
            print(lora_init.summary(init, loaded, missing), flush=True)
    if not full:  # a target set an output format cannot carry fails now, not after training
        export.check_exportable(family, spec, gather(comps))  # not sharded yet: no collective
    for name, module in comps.trainable.items():
        offload = spec.training.cpuOffload
        if name == denoiser and spec.model.transformerDtype == "float8":
            _store_float8(module, family, name, spec, env, torch.device("cpu") if offload else env.device)
        if not offload:  # offloaded: FSDP2 brings one block at a time to the device (dist.parallelize)
            module.to(env.device)
    return out


def outside_blocks(adapted: list[str], family, name: str, module) -> list[str]:
    """Of adapted module paths, those not inside one of the family's repeated blocks of this
    component (embedders, the final layer, a top-level projection). Pure but for the walk."""
    ids = {id(b) for blocks in family.blocks(name, module) for b in blocks}
    inside = [n for n, m in module.named_modules() if id(m) in ids]
    return [a for a in adapted if not any(a == b or a.startswith(b + ".") for b in inside)]


@dataclass(frozen=True)
class Layout:
    sharding: str
    recompute: dict = field(default_factory=dict)   # component -> {(list index, block index)}
    memory: Optional[dict] = None                   # the memory plan, for the log and the run's summary


def block_names(comps: Components, family) -> dict[str, tuple[str, int, int]]:
    """'component.list.block' -> (component, list index, block index), for every repeated block."""
    return {f"{name}.{j}.{i}": (name, j, i) for name, module in comps.trainable.items()
            for j, blocks in enumerate(family.blocks(name, module)) for i in range(len(blocks))}


def layout(ad: Adapters, comps: Components, family, spec, env: dist.DistEnv,
           probe: Optional[Callable[[], dict]] = None) -> Layout:
    """How this rank would hold the model: the sharding, and which blocks to recompute (explicit,
    or planned from a measured forward of probe() when training.gradientCheckpointing is unset and
    a memory budget is known). No collectives: train.run agrees between ranks (agreed)."""
    t = spec.training
    total = device_memory(env.device)
    sharding = dist.choose_sharding(t.sharding, env.world, held_bytes(comps, spec), total, offload=t.cpuOffload)
    note = dist.sharding_note(t.sharding, env.world, t.cpuOffload)
    if note and env.is_main:
        print(note, flush=True)
    if t.cpuOffload and env.device.type == "cpu" and env.is_main:
        print("[model] warning: training.cpuOffload on a CPU run saves no memory (the weights are in CPU memory "
              "already) and recomputes every block unless training.gradientCheckpointing says otherwise: remove it",
              flush=True)
    names = block_names(comps, family)
    if t.gradientCheckpointing is not None or probe is None or t.cpuOffload:
        # offloaded (unset): every block, as the model is never whole on the device to measure it
        on = t.gradientCheckpointing or (t.gradientCheckpointing is None and t.cpuOffload)
        every = t.gradientCheckpointingEvery
        picked = {n for n, (_, _, i) in names.items() if on and i % every == 0}
        return Layout(sharding, _by_component(picked, names))
    budget = memory_plan.budget_bytes(total, t.memoryBudgetGiB)
    warn = memory_plan.budget_warning(t.memoryBudgetGiB, budget, forced=bool(os.environ.get(memory_plan.BUDGET_ENV)))
    if env.is_main and warn:
        print(warn, flush=True)
    if budget is None:  # a CPU: no limit known, nothing recomputed
        return Layout(sharding, {})
    modules = {n: family.blocks(c, comps.trainable[c])[j][i] for n, (c, j, i) in names.items()}
    params = [p for m in comps.trainable.values() for p in m.parameters()]
    for m in comps.trainable.values():
        m.train()  # as in training: dropout saves its masks
    profile = memory_plan.measure(lambda: _probe_forward(comps, family, spec, env, probe()), modules, params)
    compiled_blocks = _compile_choice(t, env)[0]
    if compiled_blocks:  # compiled blocks save less than the eager forward just measured
        profile = memory_plan.compiled(profile)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    largest = max((sum(p.numel() * p.element_size() for p in m.parameters()) for m in modules.values()), default=0)

    def static(sh: str) -> int:
        return memory_plan.static_bytes(frozen=frozen, trainable=trainable, sharding=sh, world=env.world,
                                        largest_block=largest, offload=t.cpuOffload)

    plan = memory_plan.plan(profile, static(sharding), budget)
    if t.sharding == "auto" and env.world > 1:
        # measured, not the half-a-GPU rule: replicate (no weight traffic) whenever it fits, else
        # shard when that fits or comes closer
        replicated = memory_plan.plan(profile, static("replicate"), budget)
        sharded = memory_plan.plan(profile, static("shard"), budget)
        sharding, plan = (("replicate", replicated) if replicated.fits or replicated.peak <= sharded.peak
                          else ("shard", sharded))
    memory = {"recomputedBlocks": len(plan.recomputed), "blocks": len(names), "fits": plan.fits,
              "predictedPeakGiB": round(plan.peak / memory_plan.GiB, 2), "predictedPeakBytes": plan.peak,
              "budgetGiB": round(plan.budget / memory_plan.GiB, 2),
              "text": memory_plan.describe(plan, profile, static(sharding), compiled_blocks)}
    return Layout(sharding, _by_component(set(plan.recomputed), names), memory)


def agreed(layouts: list[Layout]) -> Layout:
    """One layout for every rank from each rank's own: sharded if any rank must shard, and every
    block any rank recomputes recomputed on all (FSDP2's collectives must line up). Pure."""
    sharding = "shard" if any(x.sharding == "shard" for x in layouts) else layouts[0].sharding
    recompute: dict[str, set] = {}
    for x in layouts:
        for c, pairs in x.recompute.items():
            recompute.setdefault(c, set()).update(pairs)
    return Layout(sharding, recompute, layouts[0].memory)


def _by_component(picked: set[str], names: dict[str, tuple[str, int, int]]) -> dict[str, set]:
    out: dict[str, set] = {}
    for n in picked:
        c, j, i = names[n]
        out.setdefault(c, set()).add((j, i))
    return out


def _probe_forward(comps: Components, family, spec, env: dist.DistEnv, batch: dict) -> None:
    """One training forward of batch, as the loop runs it (autocast, the family's loss)."""
    batch = {k: v.to(env.device) for k, v in batch.items()}
    gen = torch.Generator(device=env.device).manual_seed(0)
    with dist.compute_context(env.device.type, getattr(torch, spec.model.dtype))():
        family.loss(comps, batch, spec.model, spec.training, gen)


def _compile_choice(t, env: dist.DistEnv) -> tuple[bool, str, Optional[tuple[int, int]], Optional[str]]:
    """(compile the blocks, why, the GPU's compute capability, what this machine lacks to compile):
    training.compile as compiling.choose_compile decides it here; compile: true where nothing can
    compile stops with the fix."""
    cap = torch.cuda.get_device_capability(env.device) if env.device.type == "cuda" else None
    problem = compiling.compiler_problem(env.device.type) if t.compile is not False else None
    if t.compile and problem:
        raise SpecError(f"training.compile: {problem}; install it in the trainer image (gcc and python3-dev on "
                       f"Debian/Ubuntu; kubelora's image has them) or set training.compile: false")
    compile_blocks, why = compiling.choose_compile(t.compile, env.device.type, cap, t.cpuOffload, problem)
    return compile_blocks, why, cap, problem


def parallelize(out: Adapters, comps: Components, family, spec, env: dist.DistEnv, lay: Layout) -> Adapters:
    """Checkpointing, compile and FSDP2 as the layout says; optimizer groups; gradient exchange."""
    t = spec.training
    out.memory = lay.memory
    if env.is_main and lay.memory:
        print(f"[memory] training.gradientCheckpointing unset: {lay.memory['text']}", flush=True)
        if not lay.memory["fits"]:
            print("[memory] warning: even with every block recomputed the predicted peak exceeds the budget; "
                  "set training.cpuOffload: true, or lower training.microBatchSize or the dataset's resolution "
                  "or frames", flush=True)
    if env.is_main and t.cpuOffload:
        print(f"[model] cpuOffload: {held_bytes(comps, spec) / 2**30:.2f} GiB of weights kept in CPU memory (FSDP2 CPUOffloadPolicy), "
              f"each block copied to {env.device.type} for its forward and backward", flush=True)
    elif env.is_main and env.world > 1:
        print(f"[model] {lay.sharding}: " + ("a full copy of the model on every rank; only the adapters' gradients "
              "travel" if lay.sharding == "replicate" else "weights sharded across ranks with FSDP2"), flush=True)
    compile_blocks, why, cap, problem = _compile_choice(t, env)
    if compile_blocks and t.compile is None:
        # chosen, not asked for: a block dynamo or inductor cannot compile (a family or a sampling
        # path not yet run compiled on a GPU) runs eagerly with dynamo's warning instead of failing
        torch._dynamo.config.suppress_errors = True
    if env.is_main and t.compile is None:
        if problem and cap is not None and cap >= (8, 0):  # would have compiled: a warning, with the fix
            print(f"[model] warning: training.compile unset: blocks run eagerly, though this GPU steps about 1.8x "
                  f"faster compiled; {problem}: install it in the trainer image (gcc and python3-dev on "
                  f"Debian/Ubuntu)", flush=True)
        else:
            print(f"[model] training.compile unset: blocks {'compiled' if compile_blocks else 'run eagerly'} ({why}"
                  f"{'; a block that fails to compile runs eagerly' if compile_blocks else ''})", flush=True)
    backend, why = attention.choose(t.attentionBackend, env.device.type, cap, compile_blocks,
                                    full=spec.adapter.type == "full")
    attention.apply(backend)
    out.attention = backend
    warn = attention.warning(t.attentionBackend, backend)
    if env.is_main and (warn or backend != "default"):
        print(warn or f"[model] attention: {'cuDNN' if backend == 'cudnn' else 'flash (cuDNN off)'} ({why})", flush=True)
    for name, module in comps.trainable.items():
        out.compute = dist.parallelize(
            module, family.blocks(name, module), sharding=lay.sharding, compute_dtype=getattr(torch, spec.model.dtype),
            recompute=lay.recompute.get(name, set()), compile_blocks=compile_blocks, offload=t.cpuOffload,
            device_type=env.device.type)
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            out.groups.append({"params": params, "lr": learning_rate(name, t), "name": name})
    out.sync = dist.GradSync(lay.sharding, list(comps.trainable.values()), out.params)
    narrow = lora.narrowest(comps.trainable.values())
    if narrow and spec.adapter.rank > narrow[1] and env.is_main:
        print(f"[model] warning: adapter.rank {spec.adapter.rank} exceeds the width of the narrowest adapted layer "
              f"({narrow[0]}: {narrow[1]}); its update cannot use more than {narrow[1]} dimensions there, so a "
              f"lower rank gives the same result with fewer parameters", flush=True)
    # lora.inject seeded every rank alike (same init); dropout masks must differ per rank (and the
    # memory probe's forward drew from the same generator)
    torch.manual_seed(lora.rank_seed(spec.training.seed, env.rank))
    return out


def train_all(module) -> int:
    """A full fine-tune: every weight trainable, held in fp32 (the master weights; forward passes
    run under autocast in model.dtype). Returns the number of trainable parameters."""
    module.requires_grad_(True)
    for p in module.parameters():
        p.data = p.data.float()
    return sum(p.numel() for p in module.parameters())


def held_bytes(comps: Components, spec) -> int:
    """What the trained components hold: their weights, and for a full fine-tune also the fp32
    gradients and two AdamW moments (4x the weights)."""
    return weight_bytes(comps.trainable.values()) * (4 if spec.adapter.type == "full" else 1)


def weight_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def device_memory(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def float8_compute(requested: str | None, device: torch.device) -> tuple[str, str | None]:
    """The float8 compute mode to use on this device, and a warning when the request cannot be met."""
    want = requested or "fp8"
    if want != "dequant" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return "dequant", (f"model.float8Compute {want}: {name} has no fp8 tensor cores (Ada/Hopper and newer do); "
                           f"the float8 weights multiply in model.dtype instead (memory savings only)")
    return want, None


def _store_float8(module, family, name: str, spec, env: dist.DistEnv, device: torch.device) -> None:
    from . import fp8
    from .families import RULES

    compute, warning = float8_compute(spec.model.float8Compute, env.device)
    _, summary = fp8.convert(module, family.blocks(name, module), compute_dtype=getattr(torch, spec.model.dtype),
                             device=device, sensitive=RULES[family.name].fp8_sensitive, compute=compute,
                             gemm_device=env.device)
    if env.is_main:
        if warning:
            print(f"[model] warning: {warning}", flush=True)
        print(f"[model] {name}: {summary}", flush=True)


def gather_full(comps: Components, dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    """The denoiser's whole state dict as full tensors on CPU in dtype, keyed as the unwrapped
    diffusers model's, on the rank that keeps it (keep; {} elsewhere). A collective under FSDP2:
    every rank calls it, one tensor at a time, and only the keeping rank holds the copy."""
    out = {}
    for name, t in comps.denoiser.state_dict().items():
        sharded = hasattr(t, "full_tensor")
        if not keep and not sharded:
            continue  # a replicated weight: nothing to take part in
        full = t.full_tensor() if sharded else t
        if keep:
            key = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            # copy=True: an fp32 weight already on CPU would otherwise be returned as itself, and a
            # weight split from a fused one at load (HunyuanVideo's qkv) is a view of the fused
            # storage, which safetensors refuses to write
            out[key] = full.detach().to("cpu", dtype if full.is_floating_point() else full.dtype, copy=True).contiguous()
    return out


def gather(comps: Components) -> LoraTensors:
    """Full LoRA tensors of every component (a collective: all ranks call it)."""
    return {name: lora.gather(module) for name, module in comps.trainable.items()}
