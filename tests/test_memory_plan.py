"""training.gradientCheckpointing unset: the memory plan. Pure planning on made-up profiles; the
measured profile of the tiny Flux against the saved tensors of real steps counted independently;
the trainer wrapping exactly the planned blocks with the same gradients; and one run through the
real trainer. A CPU has no memory limit, so the budget is set by training.memoryBudgetGiB (what a
user sets to keep part of a GPU for something else) or $KUBELORA_MEMORY_BUDGET_GIB; a GPU's own
memory is not tested here."""
import json

import pytest
import torch

from kubelora_trainer import adapters, dist, memory_plan
from kubelora_trainer.memory_plan import BlockCost, Profile
from kubelora_trainer.models.base import Components
from kubelora_trainer.spec import parse_spec

CPU = torch.device("cpu")
ENV = dist.DistEnv(0, 1, 0, CPU)


def _profile(n=4, keep=10, saved=100):
    return Profile(tuple(BlockCost(f"b{i}", keep, saved + i) for i in range(n)), fixed=5)


def test_the_plan_recomputes_the_fewest_blocks_that_fit():
    p = _profile()  # saves 100..103, keeps 10; margin 2 x 103
    roomy = memory_plan.plan(p, static=1000, budget=10**6)
    assert roomy.recomputed == frozenset() and roomy.fits
    assert roomy.peak == 1000 + 206 + 5 + (100 + 101 + 102 + 103)
    every = 1000 + 206 + 5 + 40
    # room for two blocks' extra (90 + 91) but not a third (92): the cheapest two are kept
    two = memory_plan.plan(p, static=1000, budget=every + 90 + 91 + 50)
    assert two.recomputed == {"b2", "b3"} and two.fits and two.peak == every + 181
    tight = memory_plan.plan(p, static=1000, budget=every)
    assert tight.recomputed == {"b0", "b1", "b2", "b3"} and tight.fits
    over = memory_plan.plan(p, static=1000, budget=every - 1)
    assert over.recomputed == {"b0", "b1", "b2", "b3"} and not over.fits


def test_static_memory_follows_the_sharding():
    kw = dict(frozen=1000, trainable=10, world=4, largest_block=50)
    assert memory_plan.static_bytes(sharding="none", **kw) == 1000 + 40
    assert memory_plan.static_bytes(sharding="replicate", **kw) == 1000 + 40 + 10  # the flattened all-reduce
    assert memory_plan.static_bytes(sharding="shard", **kw) == 1040 // 4 + 100
    assert memory_plan.static_bytes(sharding="shard", offload=True, **kw) == 100


def test_the_budget_is_the_gpu_less_headroom_or_the_variable(monkeypatch):
    monkeypatch.delenv(memory_plan.BUDGET_ENV, raising=False)
    assert memory_plan.budget_bytes(None) is None
    assert memory_plan.budget_bytes(80 * 2**30) == int(80 * 2**30 * 0.92) - 2**30
    monkeypatch.setenv(memory_plan.BUDGET_ENV, "0.5")
    assert memory_plan.budget_bytes(None) == 2**29


def test_sharding_asked_of_one_process_is_noted():
    from kubelora_trainer import dist
    assert dist.choose_sharding("shard", 1, 10, 100) == "none"
    assert dist.sharding_note("shard", 1) == ("[model] note: training.sharding shard applies to several processes; "
                                              "this run has one, which holds the whole model")
    assert dist.sharding_note("replicate", 1) is not None
    assert dist.sharding_note("auto", 1) is None and dist.sharding_note("shard", 2) is None
    assert dist.sharding_note("shard", 1, offload=True) is None   # cpuOffload shards one process too


def test_ranks_agree_on_the_union_and_on_sharding():
    a = adapters.Layout("replicate", {"transformer": {(0, 1)}}, {"fits": True})
    b = adapters.Layout("shard", {"transformer": {(0, 2)}, "text_encoder": {(0, 0)}})
    got = adapters.agreed([a, b])
    assert got.sharding == "shard"
    assert got.recompute == {"transformer": {(0, 1), (0, 2)}, "text_encoder": {(0, 0)}}
    assert adapters.agreed([a, a]).sharding == "replicate"


def _flux(**training):
    from diffusers import FluxTransformer2DModel

    from kubelora_trainer.models.flux.tiny import TINY_TRANSFORMER
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 4})
    comps = Components(trainable={"transformer": tr}, info={"guidance_embeds": True})
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m", "dtype": "float32"},
                       "dataset": {"uri": "/d", "resolution": 64}, "adapter": {"rank": 4},
                       "training": training, "output": {"uri": "/o"}})
    return comps, spec


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"latents": torch.randn(1, 4, 16, 16, generator=g), "prompt_embeds": torch.randn(1, 8, 32, generator=g),
            "pooled": torch.randn(1, 32, generator=g)}


def _step(**training):
    """One step of the tiny Flux as attach lays it out: the bytes its forward saves (each storage
    once, parameters left out, counted here independently of memory_plan), the gradients, and
    the blocks wrapped for recomputation."""
    from kubelora_trainer.models.flux.family import FAMILY
    comps, spec = _flux(**training)
    ad = adapters.attach(comps, FAMILY, spec, ENV, probe=_batch)
    params = {p.untyped_storage().data_ptr() for p in comps.denoiser.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = (s.nbytes(), t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ad.compute():
        loss = FAMILY.loss(comps, _batch(), spec.model, spec.training, torch.Generator().manual_seed(2))
    loss.backward()
    wrapped = sorted(n for n, m in comps.denoiser.named_modules() if type(m).__name__ == "CheckpointWrapper")
    return sum(n for n, _ in seen.values()), torch.cat([p.grad.flatten() for p in ad.params]), wrapped, ad


@pytest.fixture(scope="module")
def profile():
    from kubelora_trainer.models.flux.family import FAMILY
    comps, spec = _flux()
    adapters.prepare(comps, FAMILY, spec, ENV)
    names = adapters.block_names(comps, FAMILY)
    blocks = {n: FAMILY.blocks(c, comps.trainable[c])[j][i] for n, (c, j, i) in names.items()}
    params = [p for p in comps.denoiser.parameters()]
    return memory_plan.measure(lambda: adapters._probe_forward(comps, FAMILY, spec, ENV, _batch()), blocks, params)


def test_the_measured_profile_is_what_real_steps_save(profile):
    assert [b.name for b in profile.blocks] == [f"transformer.0.{i}" for i in range(2)] + \
        [f"transformer.1.{i}" for i in range(4)]
    assert all(0 < b.keep < b.saved for b in profile.blocks)
    none, _, _, _ = _step(gradientCheckpointing=False)
    assert abs(profile.activations(set()) - none) <= 0.01 * none, (profile.activations(set()), none)
    # every other block recomputed: the step saves less by exactly what those blocks save (their
    # inputs are then held by the checkpoint, not saved, so the hooks here do not see them)
    half, _, _, _ = _step(gradientCheckpointing=True, gradientCheckpointingEvery=2)
    recomputed = {"transformer.0.0", "transformer.1.0", "transformer.1.2"}
    predicted = sum(b.saved for b in profile.blocks if b.name in recomputed)
    assert abs(predicted - (none - half)) <= 0.01 * predicted, (predicted, none - half)


def test_unset_checkpointing_wraps_exactly_the_planned_blocks_and_changes_no_gradient(profile, monkeypatch):
    names = {b.name for b in profile.blocks}
    _, g0, wrapped0, _ = _step(gradientCheckpointing=False)
    assert wrapped0 == []
    monkeypatch.setenv(memory_plan.BUDGET_ENV, "1000")
    _, g_roomy, wrapped_roomy, roomy = _step()  # training.gradientCheckpointing unset, memory to spare
    assert wrapped_roomy == [] and roomy.memory["recomputedBlocks"] == 0
    torch.testing.assert_close(g_roomy, g0)
    # a budget with room for the two cheapest blocks' activations and not a third
    extras = sorted(b.saved - b.keep for b in profile.blocks)
    every = roomy.memory["predictedPeakBytes"] - sum(extras)
    monkeypatch.setenv(memory_plan.BUDGET_ENV, str((every + extras[0] + extras[1] + 1) / 2**30))
    _, g, wrapped, ad = _step()  # training.gradientCheckpointing unset
    assert len(wrapped) == len(names) - 2, wrapped
    assert ad.memory["recomputedBlocks"] == len(names) - 2 and ad.memory["fits"]
    torch.testing.assert_close(g, g0)


def test_a_run_with_too_little_memory_recomputes_every_block_and_says_so(tmp_path, tiny_flux_dir, monkeypatch,
                                                                         capsys):
    from conftest import one_rank_env, write_overfit_data
    from kubelora_trainer import train
    one_rank_env(monkeypatch)
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    monkeypatch.delenv(memory_plan.BUDGET_ENV, raising=False)
    data = write_overfit_data(tmp_path / "data")
    # training.memoryBudgetGiB: on a CPU (no device memory known) the plan runs with the budget asked
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
                       "dataset": {"uri": str(data), "resolution": 32}, "training": {"steps": 2, "memoryBudgetGiB": 1e-6},
                       "output": {"uri": str(tmp_path / "out")}})
    assert train.run(spec, "tight") == 0, capsys.readouterr().err[-3000:]
    log = capsys.readouterr().out
    assert "[memory] training.gradientCheckpointing unset: the forward keeps" in log
    assert "every block recomputed" in log and "[memory] warning: even with every block recomputed" in log
    assert "[model] training.compile unset: blocks run eagerly (device cpu)" in log
    plan = json.loads((tmp_path / "out" / "manifest.json").read_text())["metrics"]["memoryPlan"]
    assert plan["recomputedBlocks"] == plan["blocks"] > 0 and plan["fits"] is False


def test_a_gpu_out_of_memory_names_the_settings_that_lower_a_step_and_is_not_retried():
    from kubelora_trainer import train
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    spec = parse_spec({"model": {"type": "hunyuan-video", "ckptPath": "/m"}, "dataset": {"uri": "/d"},
                       "training": {"microBatchSize": 2}, "output": {"uri": "/o"}})
    msg = train.out_of_memory(err, spec)
    assert msg.startswith("the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    for fix in ("training.gradientCheckpointing: true", "memory plan", "training.memoryBudgetGiB below",
                "model.transformerDtype: float8",
                "training.cpuOffload: true", "training.microBatchSize below 2", "frame count"):
        assert fix in msg, fix
    lean = parse_spec({"model": {"type": "flux", "diffusersPath": "/m", "transformerDtype": "float8"},
                       "dataset": {"uri": "/d"}, "training": {"gradientCheckpointing": True, "cpuOffload": True},
                       "output": {"uri": "/o"}})
    msg = train.out_of_memory(err, lean)
    assert "gradientCheckpointing" not in msg and "transformerDtype" not in msg and "cpuOffload" not in msg
    assert msg.endswith("Lower what a step needs: a smaller dataset.resolution (another run: output.uri or "
                        "output.onExisting: overwrite)")
    # settings the spec refuses beside ones already there are advised with their removal
    planned = parse_spec({"model": {"type": "flux", "diffusersPath": "/m"},
                          "dataset": {"sources": [{"uri": "/d", "resolutions": [256]}, {"uri": "/e"}],
                                      "resolutions": [512]},
                          "training": {"memoryBudgetGiB": 20},
                          "samples": {"prompts": [{"prompt": "x"}], "atEnd": True}, "output": {"uri": "/o"}})
    msg = train.out_of_memory(err, planned)
    assert "training.gradientCheckpointing: true (every block recomputed, overriding the memory plan's choice in " \
           "the log's [memory] line) (in place of training.memoryBudgetGiB)" in msg
    assert "training.cpuOffload: true (without training.memoryBudgetGiB and spec.samples, which it excludes)" in msg
    assert "a smaller dataset.resolutions (and the sources' own resolutions)" in msg



def test_running_out_of_memory_while_sampling_or_evaluating_is_bad_input_with_their_settings():
    """dist.caught keeps the error's type (it was a RuntimeError: exit 1, so the Job retried, trained
    again from the last checkpoint and ran out at the same sample step until backoffLimit was spent);
    the advice names the samples' or the evaluation's settings, not the training step's."""
    from kubelora_trainer import dist, exits, train

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    err = dist.caught(oom, False, "sampling at step 200")
    assert isinstance(err, torch.OutOfMemoryError) and exits.code_of(err) == exits.BAD_INPUT  # peers too
    assert exits.code_of(dist.caught(lambda: 1 / 0, False, "sampling at step 200")) == exits.FAILED
    spec = parse_spec({"model": {"type": "ltx-video", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                       "samples": {"prompts": [{"prompt": "x"}]}, "output": {"uri": "/o"}})
    msg = train.out_of_memory(err, spec)
    assert msg.startswith("the GPU ran out of memory (sampling at step 200: CUDA out of memory."), msg
    assert "spec.samples width/height or frames" in msg and "gradientCheckpointing" not in msg, msg
    msg = train.out_of_memory(dist.caught(oom, False, "evaluation at step 50"), spec)
    assert "evaluation.microBatchSize" in msg and "spec.samples" not in msg, msg


def test_an_out_of_memory_run_exits_2_with_the_message_once(monkeypatch, capsys):
    """train.run's handling, with the GPU's error raised where a step would raise it (no GPU here)."""
    from conftest import one_rank_env
    from kubelora_trainer import exits, train
    one_rank_env(monkeypatch)
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    monkeypatch.delenv(exits.EXIT_DIR_ENV, raising=False)

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "_run", oom)
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                       "output": {"uri": "/o"}})
    assert train.run(spec, "oom") == exits.BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("the GPU ran out of memory") == 1 and err.strip().splitlines()[-1].startswith("[error] "), err


def test_the_measured_batch_is_the_largest_bucket_with_its_longest_caption(tmp_path):
    from types import SimpleNamespace

    from kubelora_trainer import buckets as bk
    from kubelora_trainer import cache
    from kubelora_trainer.dataset_phase import largest_batch
    items = [SimpleNamespace(variants=("a cat",)), SimpleNamespace(variants=("a dog", "a dog on a long red sofa"))]
    units = [bk.Unit(0, (64, 64, 1), 0, 0.0), bk.Unit(1, (64, 96, 1), 0, 0.0), bk.Unit(0, (32, 32, 1), 0, 0.0)]
    entries = [(0, 0), (1, 0), (1, 1), (1, -1), (2, 0)]
    key_of = {e: f"k{i}" for i, e in enumerate(entries)}
    for i, e in enumerate(entries):
        cache.save_entry(tmp_path, key_of[e], {"latents": torch.full((1,), float(i))})
    batch = largest_batch(SimpleNamespace(items=items), units, entries, key_of, tmp_path, micro=3)
    assert batch["latents"].tolist() == [[2.0]] * 3   # (1, 1): 64x96, the longer caption, stacked 3 times


def test_the_predicted_peak_is_exported_beside_the_measured_one_and_the_progress_line_shows_the_peak():
    from prometheus_client import generate_latest

    from kubelora_trainer.metrics import TrainerMetrics
    from kubelora_trainer.progress import Progress, line
    m = TrainerMetrics("job", "team")
    m.memory_plan(5 * 2**30)
    text = generate_latest(m.registry).decode()
    assert 'kubelora_trainer_gpu_memory_bytes{kind="plan_predicted_peak",ltj="job",namespace="team"} 5.36870912e+09' \
        in text, text
    p = Progress(phase="Training", step=3, totalSteps=10, gpuPeakGiB=41.25)
    assert line(p, 1e-4).endswith("| peak 41.2 GiB | eta ?"), line(p, 1e-4)


def test_auto_sharding_replicates_whenever_the_plan_fits_and_shards_when_only_that_comes_closer(monkeypatch):
    """training.sharding auto with checkpointing unset, on 2 ranks (layout runs no collective):
    replicated when the measured plan fits, sharded when nothing fits and sharding needs less."""
    from kubelora_trainer.models.flux.family import FAMILY
    two = dist.DistEnv(0, 2, 0, CPU)
    for budget, want in (("1000", "replicate"), ("0.000001", "shard")):
        monkeypatch.setenv(memory_plan.BUDGET_ENV, budget)
        comps, spec = _flux()
        ad = adapters.prepare(comps, FAMILY, spec, two)
        lay = adapters.layout(ad, comps, FAMILY, spec, two, probe=_batch)
        assert lay.sharding == want and lay.memory["fits"] == (want == "replicate"), (budget, lay)


def test_compile_unset_is_on_for_ampere_and_newer_gpus_that_can_compile():
    """training.compile unset: compiled on CUDA GPUs of compute capability 8.0+, eager on CPU, older
    GPUs, with cpuOffload and where Triton could not build its launcher; a set value always wins,
    and the reason names what decided."""
    from kubelora_trainer.compiling import choose_compile, compiler_problem
    assert choose_compile(None, "cuda", (9, 0)) == (True, "a CUDA GPU of compute capability 9.0")
    assert choose_compile(None, "cuda", (8, 0))[0]
    assert not choose_compile(None, "cuda", (7, 5))[0]
    assert choose_compile(None, "cpu", None) == (False, "device cpu")
    assert choose_compile(None, "cuda", (9, 0), offload=True) == (False, "training.cpuOffload")
    assert choose_compile(False, "cuda", (9, 0)) == (False, "training.compile")
    assert choose_compile(True, "cpu", None) == (True, "training.compile")
    no_cc = compiler_problem("cuda", which=lambda _: None, env={})
    assert "no C compiler" in no_cc
    assert choose_compile(None, "cuda", (9, 0), problem=no_cc) == (False, f"cannot compile here: {no_cc}")
    # a compiler but no Python.h (an image without python3-dev), and what this machine has
    assert "python3-dev" in compiler_problem("cuda", which=lambda n: f"/usr/bin/{n}", include_dir="/nonexistent", env={})
    assert compiler_problem("cuda", which=lambda n: f"/usr/bin/{n}", env={}) is None  # this venv's headers
    assert "no C++ compiler" in compiler_problem("cpu", which=lambda _: None, env={})
    assert compiler_problem("cpu", which=lambda n: n if n == "g++" else None, env={"CXX": "g++"}) is None
    assert "no C++ compiler" in compiler_problem("cpu", which=lambda _: None, env={"CXX": "g++"})  # $CXX not there
    assert "$CC (/opt/cc) is not found" in compiler_problem("cuda", which=lambda n: None if n == "/opt/cc" else n,
                                                            env={"CC": "/opt/cc"})


def test_compile_true_where_nothing_can_compile_stops_with_the_fix(monkeypatch):
    """compile: true on a machine without the compiler torch.compile needs is refused before the
    first step (exit 2: bad input, not retried), naming the field and the fix."""
    from kubelora_trainer import compiling, exits
    from kubelora_trainer.spec import SpecError
    monkeypatch.setattr(compiling, "compiler_problem", lambda device_type: "inductor finds no C++ compiler")
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                       "training": {"compile": True}, "output": {"uri": "/o"}})
    env = dist.DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(SpecError, match=r"training.compile: inductor finds no C\+\+ compiler; .*training.compile: false") as e:
        adapters.parallelize(adapters.Adapters(), Components(trainable={}), None, spec, env,
                             adapters.Layout("none", {}))
    assert exits.code_of(e.value) == exits.BAD_INPUT


def test_compile_chosen_not_asked_for_falls_back_to_eager_where_a_block_cannot_compile(monkeypatch):
    """Unset and chosen (a GPU), a compile failure of a block runs it eagerly (dynamo's
    suppress_errors); compile: true keeps failures loud."""
    import torch._dynamo
    from kubelora_trainer import compiling
    monkeypatch.setattr(compiling, "compiler_problem", lambda device_type: None)
    monkeypatch.setattr(compiling, "choose_compile", lambda *a, **k: (True, "a CUDA GPU of compute capability 9.0"))
    env = dist.DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    for asked, fallback in ((True, False), (None, True)):
        # torch's own patch (pytest's monkeypatch undo deletes a config key of torch's config modules)
        with torch._dynamo.config.patch(suppress_errors=False):
            spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                               "training": {"compile": asked}, "output": {"uri": "/o"}})
            adapters.parallelize(adapters.Adapters(), Components(trainable={}), None, spec, env,
                                 adapters.Layout("none", {}))
            assert torch._dynamo.config.suppress_errors is fallback
    assert torch._dynamo.config.suppress_errors is False


def test_a_gpu_that_cannot_compile_runs_eagerly_with_one_warning_naming_the_fix(monkeypatch, capsys):
    """compile unset on an Ampere+ GPU whose image lacks a C compiler: eager, one warning line with
    the fix (the GPU itself is stood in for: its capability; no block runs here)."""
    import torch._dynamo
    from kubelora_trainer import compiling
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(compiling, "compiler_problem", lambda device_type: "Triton finds no C compiler (gcc or clang, or $CC)")
    env = dist.DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cuda"))
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"}, "output": {"uri": "/o"}})
    with torch._dynamo.config.patch(suppress_errors=False):
        adapters.parallelize(adapters.Adapters(), Components(trainable={}), None, spec, env, adapters.Layout("none", {}))
        assert torch._dynamo.config.suppress_errors is False
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "training.compile" in ln]
    assert lines == ["[model] warning: training.compile unset: blocks run eagerly, though this GPU steps about 1.8x "
                     "faster compiled; Triton finds no C compiler (gcc or clang, or $CC): install it in the trainer "
                     "image (gcc and python3-dev on Debian/Ubuntu)"], lines
    assert torch._dynamo.config.suppress_errors is False


def test_memory_budget_lowers_the_plans_budget_never_raises_it(monkeypatch):
    """training.memoryBudgetGiB: the plan's budget when below the GPU's default (92% less 1 GiB),
    the default when above it; on a CPU the asked budget (a plan runs); refused where no plan runs;
    not a change that refuses a resume."""
    from kubelora_trainer import checkpoint
    from kubelora_trainer.spec import SpecError
    monkeypatch.delenv(memory_plan.BUDGET_ENV, raising=False)
    gpu = 80 * 2**30
    default = int(gpu * 0.92) - 2**30
    assert memory_plan.budget_bytes(gpu, 30) == 30 * 2**30
    assert memory_plan.budget_bytes(gpu, 500) == default
    assert memory_plan.budget_bytes(None, 2.5) == int(2.5 * 2**30)
    assert memory_plan.budget_bytes(gpu, None) == default
    for asked in (30, 30.1, 20.3, 0.7, 72.6):  # not lowered: no warning (rounding to bytes included)
        assert memory_plan.budget_warning(asked, memory_plan.budget_bytes(gpu, asked)) is None
    assert "memoryBudgetGiB 500 is more than" in memory_plan.budget_warning(500, memory_plan.budget_bytes(gpu, 500))
    assert memory_plan.budget_warning(500, 2**30, forced=True) == (  # the variable set it outright: said so
        "[memory] warning: $KUBELORA_MEMORY_BUDGET_GIB (1 GiB) replaces training.memoryBudgetGiB 500")
    assert memory_plan.budget_warning(None, 2**30, forced=True) is None

    def spec(**training):
        return parse_spec({"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
                           "training": training, "output": {"uri": "/o"}})
    assert spec(memoryBudgetGiB=30).training.memoryBudgetGiB == 30
    for bad in ({"gradientCheckpointing": True}, {"gradientCheckpointing": False}, {"cpuOffload": True}):
        with pytest.raises(SpecError, match="training.memoryBudgetGiB"):
            spec(memoryBudgetGiB=30, **bad)
    with pytest.raises(SpecError, match="memoryBudgetGiB"):
        spec(memoryBudgetGiB=0)
    assert checkpoint.changed_fields(checkpoint.fingerprint(spec()), checkpoint.fingerprint(spec(memoryBudgetGiB=20))) == []


def test_compiled_blocks_are_planned_at_the_measured_share_of_their_eager_saves():
    p = _profile()  # saves 100..103, keeps 10
    c = memory_plan.compiled(p, share=0.5)
    assert [(b.keep, b.saved) for b in c.blocks] == [(10, 50), (10, 50), (10, 51), (10, 51)] and c.fixed == 5
    assert memory_plan.compiled(p, share=0.05).blocks[0].saved == 10  # never below what a recomputed block keeps
    # the sixth GPU run (docs/benchmarks.md): per kept block, GiB saved eager (counted by measure(), the plan's
    # prediction) and compiled (counted in the step); the share must cover every one of them
    measured = {"flux fp8, none recomputed": (0.568, 0.482), "flux fp8, 39 of 57 recomputed": (0.567, 0.455),
                "hunyuan fp8, 53 of 60 recomputed": (1.40, 0.988), "hunyuan bf16, 30 of 60 (fourth run)": (1.37, 0.986)}
    for case, (eager, compiled) in measured.items():
        assert memory_plan.COMPILED_SAVES * eager >= compiled, case


def test_the_plan_counts_compiled_blocks_at_their_share(monkeypatch):
    """The same tiny Flux and budget, training.compile true against false: the compiled plan predicts
    the blocks' saves at COMPILED_SAVES and so recomputes fewer blocks (the layout only: nothing is
    compiled here)."""
    from kubelora_trainer import compiling
    from kubelora_trainer.models.flux.family import FAMILY
    monkeypatch.setattr(compiling, "compiler_problem", lambda *a, **k: None)  # layout decides; nothing compiles
    monkeypatch.delenv(memory_plan.BUDGET_ENV, raising=False)
    got = {}
    for compile_ in (False, True):
        comps, spec = _flux(compile=compile_, memoryBudgetGiB=1000)
        ad = adapters.prepare(comps, FAMILY, spec, ENV)
        names = adapters.block_names(comps, FAMILY)
        blocks = {n: FAMILY.blocks(c, comps.trainable[c])[j][i] for n, (c, j, i) in names.items()}
        params = [p for p in comps.denoiser.parameters()]
        eager = memory_plan.measure(lambda: adapters._probe_forward(comps, FAMILY, spec, ENV, _batch()), blocks, params)
        got[compile_] = (adapters.layout(ad, comps, FAMILY, spec, ENV, probe=_batch).memory, eager)
    (plain, eager), (comp, _) = got[False], got[True]
    shrink = sum(b.saved - int(b.saved * memory_plan.COMPILED_SAVES) for b in eager.blocks)
    margin = 2 * max(b.saved for b in eager.blocks)
    margin_c = 2 * max(int(b.saved * memory_plan.COMPILED_SAVES) for b in eager.blocks)
    assert plain["recomputedBlocks"] == comp["recomputedBlocks"] == 0
    assert plain["predictedPeakBytes"] - comp["predictedPeakBytes"] == shrink + margin - margin_c
    assert "compiled blocks: 88% of the eager saves" in comp["text"] and "compiled" not in plain["text"]
