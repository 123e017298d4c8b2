"""The held-out evaluation loss (spec.evaluation, evaluation.py): quantile timesteps per family
against closed forms, the batch plan and its split over ranks, the schedule, the spec's refusals,
and the runner against a hand computation through family.loss on a tiny real Flux."""
import math
import re
import statistics
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from kubelora_trainer import buckets as bk
from kubelora_trainer import dist, metrics
from kubelora_trainer import evaluation as ev
from kubelora_trainer.objectives import quantile_timestep, sample_timesteps, time_shift


# ---------------------------------------------------------------- timesteps at quantiles (pure)

@pytest.mark.parametrize("q", [0.1, 0.25, 0.5, 0.9])
def test_quantile_timesteps_are_the_inverse_cdf_and_draw_nothing(q):
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    t = sample_timesteps(3, "logit_normal", g, "cpu", quantile=q)
    z = statistics.NormalDist().inv_cdf(q)
    assert t.shape == (3,) and t.tolist() == pytest.approx([1 / (1 + math.exp(-z))] * 3, abs=1e-6)
    # diffusion-pipe's: torch.distributions' icdf, then the sigmoid
    assert float(t[0]) == pytest.approx(float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q)).sigmoid()),
                                        abs=1e-6)
    assert sample_timesteps(2, "uniform", g, "cpu", quantile=q).tolist() == pytest.approx([q, q])
    assert torch.equal(g.get_state(), before)      # the generator is left for the noise alone
    # the median of the logit-normal is 1/2; flux's shift moves it towards noise, as in training
    assert sample_timesteps(1, "logit_normal", g, "cpu", quantile=0.5).item() == pytest.approx(0.5)
    assert time_shift(1.0, torch.tensor([0.5])).item() == pytest.approx(math.e / (math.e + 1))


def test_sdxl_quantile_timestep_is_diffusion_pipes_int_of_q_times_n():
    assert [quantile_timestep(q, 1000) for q in ev_quantiles()] == [100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert quantile_timestep(0.9999, 1000) == 999 and quantile_timestep(0.29, 100) == int(0.29 * 100)


def ev_quantiles():
    from kubelora_trainer.spec import DEFAULT_EVAL_QUANTILES
    return DEFAULT_EVAL_QUANTILES


def _timestep_seen(name, tmp_path, q):
    """The timestep (noise level) the family's denoiser gets for a batch at quantile q, by a hook
    on the real tiny model."""
    from test_masks import _tiny
    from kubelora_trainer.models import get_family
    from kubelora_trainer.spec import TrainingSpec
    fam = get_family(name)
    model_spec, paths = _tiny(name, tmp_path)
    comps = fam.load(model_spec, paths, torch.device("cpu"))
    video = name in ("ltx-video", "hunyuan-video", "cosmos")
    x = torch.rand(1, 3, *((9,) if video else ()), 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        enc = {k: v.unsqueeze(0) for k, v in fam.encode(comps, x, ["a red circle"])[0].items()}
    denoiser = comps.trainable["unet" if name == "sdxl" else "transformer"]
    seen = []
    denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("timestep", args[1] if len(args) > 1 else None)),
        with_kwargs=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        a = fam.loss(comps, enc, model_spec, TrainingSpec(steps=1), g, quantile=q)
        b = fam.loss(comps, enc, model_spec, TrainingSpec(steps=1), torch.Generator().manual_seed(1), quantile=q)
    assert torch.isfinite(a) and torch.equal(a, b)     # fixed timestep, same seed: the same loss
    # the evaluation's noise given (drawn per sample), nothing drawn from a generator: the same loss
    noise = torch.randn(enc["latents"].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c = fam.loss(comps, enc, model_spec, TrainingSpec(steps=1), None, quantile=q, noise=noise)
    assert torch.equal(a, c)
    return seen[0], enc["latents"].shape


@pytest.mark.parametrize("name", ["flux", "sdxl", "ltx-video", "hunyuan-video", "cosmos"])
def test_every_family_evaluates_at_its_training_distributions_quantile(name, tmp_path):
    q = 0.3
    t, shape = _timestep_seen(name, tmp_path, q)
    sig = 1 / (1 + math.exp(-statistics.NormalDist().inv_cdf(q)))
    if name == "flux":   # logit-normal, then the resolution shift (fluxShift off here: none)
        assert t.float().tolist() == pytest.approx([sig], abs=1e-5)
    elif name in ("ltx-video", "hunyuan-video"):   # timestep in 0..1000
        assert t.float().tolist() == pytest.approx([sig * 1000], rel=1e-5)
    elif name == "sdxl":
        assert t.tolist() == [300]
    else:   # cosmos: sigma = exp(icdf(q)) of its log-normal; the model gets c_noise = log(sigma) / 4
        assert t.float().tolist() == pytest.approx([statistics.NormalDist().inv_cdf(q) / 4], abs=1e-5)


# ---------------------------------------------------------------- plan, share, schedule (pure)

def _units():
    a, b = (32, 32, 1), (48, 16, 1)
    # sources 0, 1 train; 2, 3 are evaluation.sources[0], [1]
    return [bk.Unit(0, a, 0, 0.0, 0), bk.Unit(1, a, 0, 0.0, 2), bk.Unit(2, b, 0, 0.0, 2), bk.Unit(3, a, 0, 0.0, 2),
            bk.Unit(4, a, 0, 0.0, 3), bk.Unit(5, a, 0, 0.0, 1), bk.Unit(6, a, 0, 0.0, 2)]


def test_batches_come_from_one_source_and_bucket_whatever_the_world_size():
    plan = ev.plan_batches(_units(), n_train=2, micro=2)
    assert plan == [ev.EvalBatch(0, (1, 3)), ev.EvalBatch(0, (6,)), ev.EvalBatch(0, (2,)), ev.EvalBatch(1, (4,))]
    assert all(u >= 1 and _units()[u].source >= 2 for b in plan for u in b.units)   # never a training unit


@pytest.mark.parametrize("n,world", [(4, 1), (4, 2), (4, 3), (1, 4), (7, 3)])
def test_every_batch_counted_once_and_every_rank_runs_as_many_forwards(n, world):
    shares = [ev.rank_share(n, world, r) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == max(1, -(-n // world))
    counted = sorted(b for s in shares for b, c in s if c)
    assert counted == list(range(n))
    assert all(0 <= b < n for s in shares for b, _ in s)    # padding repeats a real batch, uncounted


def test_noise_seeds_differ_by_sample_and_quantile_and_not_by_run():
    seeds = {ev.noise_seed(1, f"key{k}", q) for k in range(5) for q in (0.1, 0.2, 0.3)}
    assert len(seeds) == 15 and ev.noise_seed(1, "k", 0.3) == ev.noise_seed(1, "k", 0.3) != ev.noise_seed(2, "k", 0.3)
    assert all(0 <= s < 2 ** 63 for s in seeds)
    # a sample's noise is its own, whatever batch it is in
    both = ev.sample_noise((2, 3, 4), ["a", "b"], 1, 0.5, "cpu")
    assert torch.equal(both[1], ev.sample_noise((1, 3, 4), ["b"], 1, 0.5, "cpu")[0]) and not torch.equal(both[0], both[1])


def test_the_fingerprint_changes_with_the_sources_quantiles_and_seed_only():
    a = _spec()
    assert ev.fingerprint(a) == ev.fingerprint(_spec(everySteps=3, microBatchSize=2))
    assert ev.fingerprint(a) == ev.fingerprint(_spec(quantiles=list(reversed(a.evaluation.quantiles))))
    assert ev.fingerprint(a) != ev.fingerprint(_spec(quantiles=[0.5]))
    assert ev.fingerprint(a) != ev.fingerprint(_spec(sources=[{"uri": "s3://bkt/e2"}]))
    # the items themselves (their cache keys): files changed under the same URIs are another evaluation
    assert ev.fingerprint(a, ["k1", "k2"]) == ev.fingerprint(a, ["k2", "k1", "k1"])
    assert ev.fingerprint(a, ["k1", "k2"]) != ev.fingerprint(a, ["k1", "k3"]) != ev.fingerprint(a)


def test_the_schedule():
    spec = SimpleNamespace(beforeFirstStep=True, everySteps=4, everyEpochs=None)
    assert [s for s in range(0, 11) if ev.due(s, spec, 10, 2, 5)] == [0, 4, 8, 10]
    spec = SimpleNamespace(beforeFirstStep=False, everySteps=None, everyEpochs=2)
    # 2 samples per step, 5 per epoch: epochs end at steps 3 (6 samples), 5 (10), 8 (16), 10 (20)
    assert [s for s in range(0, 11) if ev.due(s, spec, 10, 2, 5)] == [5, 10]
    assert not ev.due(0, None, 10, 2, 5)


def test_summary_is_the_mean_over_items_per_quantile_then_over_quantiles():
    sums = torch.tensor([[[3.0, 2], [1.0, 2]], [[6.0, 2], [0.0, 0]]], dtype=torch.float64)
    rec = ev.summarize(sums, [0.1, 0.9])
    assert rec["quantiles"] == {"0.1": 9 / 4, "0.9": 0.5} and rec["loss"] == pytest.approx((9 / 4 + 0.5) / 2)
    assert rec["samples"] == 4 and rec["sources"] == [pytest.approx((1.5 + 0.5) / 2), 3.0]
    line = ev.format_line(5, {**rec, "seconds": 1.25})
    assert line == "[eval] step 5: loss 1.3750 (q0.1 2.2500, q0.9 0.5000) over 4 samples in 1.2 s"


def test_a_non_finite_evaluation_loss_is_published_as_none_with_a_warning():
    assert ev.published({"step": 3, "loss": 1.25, "quantiles": {"0.5": 1.25}}) == (1.25, None)
    loss, warning = ev.published({"step": 3, "loss": math.nan, "quantiles": {"0.1": 1.0, "0.9": math.inf}})
    assert loss is None and warning.startswith("[eval] warning: the evaluation loss is not finite (nan at step 3; "
                                               "at quantile(s) 0.9)")


def test_evaluation_units_are_never_sampled_nor_change_the_training_order():
    units = _units()
    with_eval = bk.SampleSpace(tuple(u.bucket for u in units), tuple(0 if u.source >= 2 else 2 for u in units),
                               (1,) * len(units), (0.1,) * len(units))
    train = [u for u in units if u.source < 2]
    alone = bk.SampleSpace(tuple(u.bucket for u in train), (2, 2), (1, 1), (0.1, 0.1))
    for epoch in range(3):
        got, _ = bk.plan_epoch(with_eval, 7, epoch, 2, [])
        ref, _ = bk.plan_epoch(alone, 7, epoch, 2, [])
        remap = {0: 0, 5: 1}
        assert [[(remap[u], v) for u, v in b] for b in got] == ref


# ---------------------------------------------------------------- the spec

def _spec(**evaluation):
    from kubelora_trainer.spec import parse_spec
    return parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt/m"}, "dataset": {"uri": "s3://bkt/d"},
                       "output": {"uri": "s3://bkt/o"}, "evaluation": {"sources": [{"uri": "s3://bkt/e"}], **evaluation}})


@pytest.mark.parametrize("evaluation,message", [
    ({"quantiles": [0.0, 0.5]}, "spec.evaluation.quantiles: each quantile is in (0, 1)"),
    ({"quantiles": [0.5, 0.5]}, "a quantile is listed twice"),
    ({"everySteps": 0}, "spec.evaluation.everySteps"),
    ({"sources": [{"uri": "s3://bkt/e", "captionDropout": 0.1}]}, "evaluation.sources[0].captionDropout: evaluation items"),
    ({"sources": [{"uri": "s3://bkt/e", "frameBuckets": [9]}]}, "evaluation.sources[0].frameBuckets: flux is an image model"),
    ({"sources": [{"uri": "s3://bkt"}]}, "output.uri (s3://bkt/o) is inside evaluation.sources[0].uri"),
])
def test_the_spec_refuses_what_cannot_apply_naming_the_field(evaluation, message):
    from kubelora_trainer.spec import SpecError
    with pytest.raises(SpecError) as e:
        _spec(**evaluation)
    assert message in str(e.value)


@pytest.mark.parametrize("dataset,evaluation,field", [
    ({"uri": "s3://bkt/d"}, "s3://bkt/d/", "dataset.uri"),                       # the same folder
    ({"uri": "s3://bkt/d"}, "s3://bkt/d/held", "dataset.uri"),                   # inside: the scan is recursive
    ({"uri": "s3://bkt/d/train"}, "s3://bkt/d", "dataset.uri"),                  # holding the training folder
    ({"sources": [{"uri": "s3://bkt/a"}, {"uri": "s3://bkt/b"}]}, "s3://bkt/b/x", "dataset.sources[1].uri"),
    ({"uri": "/data/d"}, "/data/d/./held/", "dataset.uri"),                      # local paths, normalized
    ({"uri": "file:///data/d"}, "/data/x/../d", "dataset.uri"),
])
def test_an_evaluation_folder_overlapping_a_training_folder_is_refused(dataset, evaluation, field):
    from kubelora_trainer.spec import SpecError, parse_spec
    with pytest.raises(SpecError) as e:
        parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt/m"}, "dataset": dataset,
                    "output": {"uri": "s3://bkt/o"}, "evaluation": {"sources": [{"uri": evaluation}]}})
    assert f"evaluation.sources[0].uri ({evaluation}) and {field}" in str(e.value)
    assert "held-out items would be trained on, or trained ones evaluated" in str(e.value)


def test_evaluation_folders_beside_the_training_data_are_accepted():
    from kubelora_trainer.spec import SpecError, parse_spec, uris_overlap
    for d, e in [("s3://bkt/d", "s3://bkt/d2"), ("s3://bkt/d", "s3://bkt2/d"), ("/data/d", "/data/dd/held")]:
        assert not uris_overlap(d, e)
        parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt/m"}, "dataset": {"uri": d},
                    "output": {"uri": "s3://bkt/o"}, "evaluation": {"sources": [{"uri": e}]}})
    # read without subfolders (dataset.recursive: false, as import-config writes it for diffusion-pipe's
    # layout of an eval folder inside the training one), one folder inside the other is apart
    for d, e in [("s3://bkt/d", "s3://bkt/d/held"), ("s3://bkt/d/train", "s3://bkt/d")]:
        parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt/m"}, "dataset": {"uri": d, "recursive": False},
                    "output": {"uri": "s3://bkt/o"}, "evaluation": {"sources": [{"uri": e}]}})
    with pytest.raises(SpecError, match="that reads its subfolders"):  # this evaluation source reads them
        parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt/m"},
                    "dataset": {"uri": "s3://bkt/d/train", "recursive": False}, "output": {"uri": "s3://bkt/o"},
                    "evaluation": {"sources": [{"uri": "s3://bkt/d", "recursive": True}]}})


def test_an_evaluation_item_copied_from_the_training_data_is_warned_about():
    from pathlib import Path
    from kubelora_trainer.data import Item, ScanReport
    from kubelora_trainer.dataset_phase import held_out_copies, held_out_copies_line
    report = ScanReport()
    report.items = [Item(Path("a.png"), "a", source=0, uri="s3://b/d/a.png"), Item(Path("b.png"), "b", source=1, uri="s3://b/d2/b.png"),
                    Item(Path("c.png"), "c", source=2, uri="s3://b/e/c.png"), Item(Path("d.png"), "d", source=2, uri="s3://b/e/d.png"),
                    Item(Path("e.png"), "e", source=2, uri="s3://b/e/e.png")]
    digests = ["aa", "bb", "bb", "cc", "aa"]          # c is b's content, e is a's; d is its own
    names = held_out_copies(report, digests, n_train=2)
    assert names == ["s3://b/e/c.png", "s3://b/e/e.png"]
    assert held_out_copies_line(names) == ("[data] warning: 2 evaluation item(s) have the same content as a training item "
                                           "(s3://b/e/c.png, s3://b/e/e.png): they are trained on, so the evaluation loss "
                                           "is not held out for them; remove them from one of the folders")
    assert held_out_copies(report, digests, n_train=3) == [] and held_out_copies_line([]) is None


def test_stage_keys_and_fields_of_evaluation_sources():
    from kubelora_trainer.train import source_key, spec_field, stage_uris
    spec = _spec()
    assert stage_uris(spec)["evaluation.0"] == "s3://bkt/e" and stage_uris(spec)["dataset.0"] == "s3://bkt/d"
    assert spec_field(spec, "evaluation.0") == "evaluation.sources[0].uri"
    assert spec_field(spec, "evaluation.0.mask") == "evaluation.sources[0].maskUri"
    assert source_key(spec, 0) == "dataset.0" and source_key(spec, 1) == "evaluation.0"
    assert spec.evaluation.quantiles == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    from kubelora_trainer import checkpoint
    assert "evaluation" not in checkpoint.fingerprint(spec)   # adding an evaluation does not block a resume


# ---------------------------------------------------------------- the runner, against family.loss by hand

def _tiny_run(tmp_path, monkeypatch, tiny_flux_dir, n=3):
    """A tiny real Flux with LoRA (dropout on), n cached held-out entries k0..k{n-1} and a trainer
    stand-in for Evaluator.run."""
    from kubelora_trainer import cache
    from kubelora_trainer.dist import DistEnv
    from kubelora_trainer.models import get_family
    from kubelora_trainer.spec import ModelSpec, TrainingSpec
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    fam = get_family("flux")
    model_spec = ModelSpec(type="flux", diffusersPath="/x", dtype="float32", fluxShift=True)
    comps = fam.load(model_spec, {"diffusersPath": str(tiny_flux_dir)}, torch.device("cpu"))
    # LoRA with dropout on: in eval mode it must be off (else two runs would differ)
    from peft import LoraConfig, inject_adapter_in_model
    tr_model = comps.trainable["transformer"]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.5, target_modules=["to_q", "to_k"],
                                       init_lora_weights=False), tr_model)
    tr_model.train()
    imgs = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        for i in range(n):
            enc = fam.encode(comps, imgs[i:i + 1], [f"caption {i}"])[0]
            cache.save_entry(tmp_path / "cache", f"k{i}", {k: v.detach() for k, v in enc.items()})
    tr = SimpleNamespace(env=DistEnv(0, 1, 0, torch.device("cpu")), modules=torch.nn.ModuleDict(comps.trainable),
                         adapters=SimpleNamespace(compute=nullcontext), family=fam, comps=comps,
                         state=SimpleNamespace(evals=[]))
    training = TrainingSpec(steps=5, seed=7)
    return tr, model_spec, training


def test_the_runner_is_family_loss_at_fixed_timesteps_with_the_rng_untouched(tmp_path, monkeypatch, tiny_flux_dir):
    from kubelora_trainer import cache
    tr, model_spec, training = _tiny_run(tmp_path, monkeypatch, tiny_flux_dir)
    fam, comps, tr_model = tr.family, tr.comps, tr.comps.trainable["transformer"]
    quantiles = [0.2, 0.7]
    spec = SimpleNamespace(model=model_spec, training=training, evaluation=SimpleNamespace(quantiles=quantiles))
    batches = [ev.EvalBatch(0, (0, 1)), ev.EvalBatch(1, (2,))]
    evaluator = ev.Evaluator(spec, batches, [["k0", "k1"], ["k2"]], n_sources=2, fingerprint="f1")
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    rec = evaluator.run(0, tr)
    assert torch.equal(torch.get_rng_state(), rng)             # the training's RNG is untouched
    assert tr_model.training and all(m.training for m in tr_model.modules())   # back in train mode
    assert tr.state.evals == [rec] and rec["samples"] == 3 and rec["step"] == 0 and rec["fingerprint"] == "f1"
    # by hand: each batch at each quantile, each sample's noise from its own seeded generator,
    # weighted by the batch's size
    tr_model.eval()
    per_q = []
    with torch.no_grad():
        for q in quantiles:
            total = 0.0
            for ks in [["k0", "k1"], ["k2"]]:
                batch = cache.stack([cache.load_entry(tmp_path / "cache", k) for k in ks])
                noise = torch.stack([torch.randn(batch["latents"].shape[1:], generator=torch.Generator().manual_seed(
                    ev.noise_seed(7, k, q))) for k in ks])
                loss = fam.loss(comps, batch, model_spec, training, None, quantile=q, noise=noise)
                total += float(loss) * len(ks)
            per_q.append(total / 3)
    assert [rec["quantiles"]["0.2"], rec["quantiles"]["0.7"]] == pytest.approx(per_q, rel=1e-9, abs=1e-12)
    assert rec["loss"] == pytest.approx(sum(per_q) / 2, rel=1e-9)
    tr_model.train()
    again = evaluator.run(3, tr)                                # the same weights: the same numbers at any step
    assert again["quantiles"] == rec["quantiles"] and rec["sources"][0] != rec["sources"][1]
    # the batching does not change the numbers: one sample a forward, the sources' order reversed
    alone = ev.Evaluator(spec, [ev.EvalBatch(1, (2,)), ev.EvalBatch(0, (0,)), ev.EvalBatch(0, (1,))],
                         [["k2"], ["k0"], ["k1"]], n_sources=2).run(4, tr)
    assert alone["loss"] == pytest.approx(rec["loss"], abs=1e-6) and alone["sources"] == pytest.approx(rec["sources"], abs=1e-6)
    assert alone["quantiles"] == pytest.approx(rec["quantiles"], abs=1e-6)


def test_a_cache_entry_that_cannot_be_loaded_fails_before_its_forward_one_batch_in_memory_at_a_time(
        tmp_path, monkeypatch, tiny_flux_dir):
    tr, model_spec, training = _tiny_run(tmp_path, monkeypatch, tiny_flux_dir, n=1)
    spec = SimpleNamespace(model=model_spec, training=training, evaluation=SimpleNamespace(quantiles=[0.5]))
    calls, loaded = [], []
    tr.family = SimpleNamespace(loss=lambda *a, **k: calls.append(list(loaded)) or torch.zeros(()))
    evaluator = ev.Evaluator(spec, [ev.EvalBatch(0, (0,)), ev.EvalBatch(0, (1,))], [["k0"], ["gone"]], n_sources=1)
    load = evaluator.load
    evaluator.load = lambda b: loaded.append(b) or load(b)
    with pytest.raises(RuntimeError, match="evaluation at step 2: loading its cache entries"):
        evaluator.run(2, tr)
    # batch 0's forward ran with batch 0 alone loaded; batch 1 failed to load before any forward of it
    assert calls == [[0]] and loaded == [0, 1] and tr.comps.trainable["transformer"].training


def test_the_forwards_are_left_uncaught_only_when_peers_gather_weights_in_them():
    from kubelora_trainer.dist import GradSync
    shard, rep = SimpleNamespace(sync=GradSync("shard", [], [])), SimpleNamespace(sync=GradSync("replicate", [], []))
    assert dist.weights_sharded(2, shard) and not dist.weights_sharded(1, shard) and not dist.weights_sharded(2, rep)
    assert not dist.weights_sharded(2, SimpleNamespace(compute=nullcontext))

    def boom():
        raise ValueError("bad shape")
    # the evaluation's and the samples' forwards: an error returned to agree on, or raised when sharded
    err = dist.caught(boom, False, "evaluation at step 3")
    assert isinstance(err, RuntimeError) and str(err) == "evaluation at step 3: ValueError: bad shape"
    assert dist.caught(lambda: None, False, "x") is None and dist.caught(lambda: None, True, "x") is None
    with pytest.raises(ValueError, match="bad shape"):
        dist.caught(boom, True, "evaluation at step 3")


class _Block(torch.nn.Module):
    """A module dynamo traces (torch.nn's own Linear alone it does not)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).relu()


def _compiled_block() -> tuple[torch.nn.Module, list[bool]]:
    """A compiled block and the graphs its backend gets: for each, whether it has symbolic shapes."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(any(isinstance(d, torch.SymInt) for n in gm.graph.nodes if n.op == "placeholder"
                          for v in [n.meta.get("example_value")] if isinstance(v, torch.Tensor) for d in v.shape))
        return gm.forward
    block = _Block()
    block.compile(backend=backend)
    torch._dynamo.reset()
    return block, graphs


def test_the_evaluation_runs_compiled_blocks_eagerly_so_training_compiles_static_shapes(tmp_path, monkeypatch,
                                                                                     tiny_flux_dir):
    """Under torch.compile, an evaluation of other shapes without grad before the first step made
    dynamo mark dimensions dynamic: the first training graph compiled with symbolic shapes."""
    tr, model_spec, training = _tiny_run(tmp_path, monkeypatch, tiny_flux_dir, n=1)
    block, graphs = _compiled_block()

    def loss(comps, batch, model_spec, training_spec, generator, quantile=None, noise=None):
        return block(noise.reshape(noise.shape[0], -1, 8)[:, :3]).mean()   # 3 tokens: not training's 2
    tr.family = SimpleNamespace(loss=loss)
    spec = SimpleNamespace(model=model_spec, training=training, evaluation=SimpleNamespace(quantiles=[0.5]))
    ev.Evaluator(spec, [ev.EvalBatch(0, (0,))], [["k0"]], n_sources=1).run(0, tr)
    assert graphs == []                                  # nothing compiled for the evaluation
    block(torch.randn(2, 2, 8, requires_grad=True)).sum().backward()   # the first training step
    block(torch.randn(2, 2, 8, requires_grad=True)).sum().backward()
    assert graphs == [False]                             # one graph, static shapes


def test_the_evaluation_history_is_checkpointed_and_summarized():
    from kubelora_trainer.train import LoopState, eval_summary
    space = bk.SampleSpace(((32, 32, 1),), (1,), (1,), (0.0,))
    recs = [{"step": 0, "loss": 1.5}, {"step": 2, "loss": 1.2}, {"step": 4, "loss": 1.3}]
    a = LoopState(torch.Generator(), bk.BucketSampler(space, 1, 1, 1, 0), losses=[1.0], evals=list(recs))
    b = LoopState(torch.Generator(), bk.BucketSampler(space, 1, 1, 1, 0))
    assert b.load(a.to_dict(4, 1)) and b.evals == recs
    c = LoopState(torch.Generator(), bk.BucketSampler(space, 1, 1, 1, 0))
    assert not c.load({"losses": [1.0], "evals": recs}) and c.evals == recs   # another number of ranks
    assert eval_summary(recs) == {"evalLoss": 1.3, "bestEvalLoss": 1.2, "bestEvalStep": 2, "baseEvalLoss": 1.5,
                                  "evalHistory": recs}
    assert eval_summary([]) == {}


def test_the_best_evaluation_is_a_trained_step_of_the_current_evaluation():
    from kubelora_trainer.train import eval_summary
    # the base model (step 0, no checkpoint) is never the best: it is reported apart
    recs = [{"step": 0, "loss": 0.9}, {"step": 2, "loss": 1.2}, {"step": 4, "loss": float("nan")}]
    got = eval_summary(recs)
    assert (got["bestEvalLoss"], got["bestEvalStep"], got["baseEvalLoss"]) == (1.2, 2, 0.9) and math.isnan(got["evalLoss"])
    assert "bestEvalStep" not in eval_summary([{"step": 0, "loss": 0.9}])
    # the evaluation changed across a resume (other sources or quantiles): only the current one's records compare
    recs = [{"step": 0, "loss": 2.0, "fingerprint": "a"}, {"step": 2, "loss": 0.5, "fingerprint": "a"},
            {"step": 4, "loss": 1.5, "fingerprint": "b"}, {"step": 6, "loss": 1.4, "fingerprint": "b"}]
    got = eval_summary(recs, "b")
    assert (got["bestEvalLoss"], got["bestEvalStep"], got["evalLoss"]) == (1.4, 6, 1.4) and "baseEvalLoss" not in got
    assert eval_summary(recs, "a")["bestEvalStep"] == 2 and eval_summary(recs, "a")["baseEvalLoss"] == 2.0


def test_a_due_evaluation_waits_for_the_resume_when_stopping():
    spec = SimpleNamespace(beforeFirstStep=True, everySteps=4, everyEpochs=None)
    assert ev.to_run(4, spec, 10, 2, 5) and ev.to_run(0, spec, 10, 2, 5)
    assert not ev.to_run(4, spec, 10, 2, 5, stopping=True)        # SIGTERM: the checkpoint first
    # the resume from step 4 runs it (start - 1 = 4), once: a record of step 4 means it ran
    assert ev.to_run(4, spec, 10, 2, 5, done=frozenset({0}))
    assert not ev.to_run(4, spec, 10, 2, 5, done=frozenset({0, 4}))
    assert not ev.to_run(5, spec, 10, 2, 5, done=frozenset({0}))  # resumed from a step with none due
    assert not ev.to_run(10, spec, 10, 2, 5, stopping=True) and ev.to_run(10, spec, 10, 2, 5)


def test_an_evaluation_batch_larger_than_the_measured_training_batch_is_warned_about():
    units = _units()     # training units of 32x32x1; evaluation units of 32x32x1 and 48x16x1
    assert ev.oversize_warning(units, ev.plan_batches(units, 2, 2), 2, train_micro=2) is None
    assert ev.oversize_warning(units, ev.plan_batches(units, 2, 1), 2, train_micro=1) is None   # ties compare
    line = ev.oversize_warning(units, ev.plan_batches(units, 2, 3), 2, train_micro=2)
    assert line.startswith("[eval] warning: an evaluation batch (3 samples of 32x32x1) is larger than the largest "
                           "training micro-batch (2 samples of 1024 latent elements)")
    assert "lower evaluation.microBatchSize" in line


def test_report_draws_the_evaluation_beside_the_training_loss():
    from kubelora_trainer import report
    evals = [{"step": 0, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": float("inf")},
             {"step": 4, "loss": float("nan")}]
    html = report.render(job="j", model_type="flux", status="Succeeded", step=4, total_steps=4,
                         losses=[1.5, 1.4, 1.3, 1.2], learning_rates=[1e-4] * 4, prompts=[], samples=[],
                         dataset={"usable": 4, "evaluation": {"items": 3, "usable": 2,
                                                              "buckets": {"samples": 2, "buckets": {"32x32x1": {}}}}},
                         spec={}, artifacts=[], evals=evals)
    second = re.search(r'<polyline class="second"[^>]* points="([^"]*)"', html)[1].split()
    assert len(second) == 2 and html.count("<circle") == 2          # the inf and NaN left out
    assert float(second[0].split(",")[1]) < float(second[1].split(",")[1])   # 2.0 drawn above 1.0 (y grows down)
    assert "held-out evaluation loss" in html and "last evaluation loss</th><td>nan (step 4)" in html
    assert "2 usable items of 3, 2 samples in 1 bucket(s)" in html
    assert 'class="second"' not in report.render(job="j", model_type="flux", status="Training", step=1, total_steps=4,
                                                  losses=[1.0], learning_rates=[1e-4], prompts=[], samples=[],
                                                  dataset={}, spec={}, artifacts=[])
    # evaluations of another setup (changed across a resume: another scale) are not joined to the line
    mixed = [{"step": 0, "loss": 2.0, "fingerprint": "a"}, {"step": 2, "loss": 1.9, "fingerprint": "a"},
             {"step": 3, "loss": 0.4, "fingerprint": "b"}, {"step": 4, "loss": 0.3, "fingerprint": "b"}]
    html = report.render(job="j", model_type="flux", status="Training", step=4, total_steps=8,
                         losses=[1.5, 1.4, 1.3, 1.2], learning_rates=[1e-4] * 4, prompts=[], samples=[],
                         dataset={}, spec={}, artifacts=[], evals=mixed)
    second = re.search(r'<polyline class="second"[^>]* points="([^"]*)"', html)[1].split()
    assert len(second) == 2 and "2 earlier, of other evaluation settings, not drawn" in html


def test_samples_run_compiled_blocks_eagerly_too(tmp_path):
    """Sampling (spec.samples, step 0 included) runs no-grad forwards of other shapes as the
    evaluation does: eagerly, so the compiled blocks compile training's shapes, static."""
    import yaml
    from kubelora_trainer import samples
    from kubelora_trainer.dist import DistEnv
    from kubelora_trainer.spec import parse_spec
    block, graphs = _compiled_block()
    m = yaml.safe_load(open("examples/demo-flux.yaml"))["spec"]
    m["output"] = {"uri": str(tmp_path / "out")}
    m["samples"] = {"prompts": [{"prompt": "a red square"}], "atStart": True}
    spec = parse_spec(m)
    family = SimpleNamespace(sample=lambda kit, comps, p, gen: block(torch.randn(1, 5, 8)).detach()[0, :4, :3]
                             .reshape(2, 2, 3).sigmoid())
    sampler = samples.Sampler(spec, family, {}, [{"index": 0, "seed": 1, "prompt": "a red square"}], "job", None, {},
                              tmp_path / "local")
    sampler.report_soon = lambda *a, **k: None  # no report: this test is about the compiled blocks
    tr = SimpleNamespace(env=DistEnv(0, 1, 0, torch.device("cpu")),
                         adapters=SimpleNamespace(compute=nullcontext, sync=SimpleNamespace(sharding="none")),
                         comps=SimpleNamespace(trainable={"transformer": block}), state=SimpleNamespace(losses=[], evals=[]),
                         publish=None, metrics=metrics.Off())
    sampler.maybe(0, tr)
    assert len(sampler.records) == 1 and graphs == []        # sampled, nothing compiled for it
    block(torch.randn(2, 3, 8, requires_grad=True)).sum().backward()
    block(torch.randn(2, 3, 8, requires_grad=True)).sum().backward()
    assert graphs == [False]
