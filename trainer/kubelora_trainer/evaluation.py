"""The held-out evaluation loss (spec.evaluation; diffusion-pipe's eval_datasets): every held-out
item's loss with the timestep fixed at the inverse CDF of the family's training distribution at
each quantile (family.loss(..., quantile=q)), under no_grad, LoRA dropout off, each sample's noise
from a generator seeded by its cache key and the quantile (so evaluations compare across steps, and
a sample's loss does not depend on the batch it is in), the training's RNG untouched and the
compiled blocks not run (torch.compile's stance force_eager: they see only training's shapes).

The batches are planned once, the same whatever the number of ranks (each from one source and
one bucket, at most evaluation.microBatchSize samples); they are dealt to ranks round-robin, every
rank running the same number of forwards (FSDP2 gathers weights in each forward: a rank short of a
batch repeats one, not counted). The sums and counts are all-reduced in float64, so the result does
not depend on the world size nor the batching beyond summation order and kernels' batch-size
rounding. Planning and scheduling are pure; `Evaluator.run` is the one runner."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import buckets as bk


@dataclass(frozen=True)
class EvalBatch:
    source: int                 # index into evaluation.sources
    units: tuple[int, ...]      # unit indices (into the layout's units)


def plan_batches(units: list[bk.Unit], n_train: int, micro: int) -> list[EvalBatch]:
    """The evaluation units (source >= n_train) in batches of at most micro, each from one source
    and one bucket, in a fixed order (source, bucket, unit). Pure; independent of the world size."""
    groups: dict[tuple[int, tuple], list[int]] = {}
    for n, u in enumerate(units):
        if u.source >= n_train:
            groups.setdefault((u.source - n_train, u.bucket), []).append(n)
    return [EvalBatch(src, tuple(ns[i:i + micro])) for (src, _), ns in sorted(groups.items())
            for i in range(0, len(ns), micro)]


def rank_share(n_batches: int, world: int, rank: int) -> list[tuple[int, bool]]:
    """(batch index, counted) for each forward this rank runs: batches rank, rank + world, ...;
    every rank runs ceil(n_batches / world) (at least one), a rank short of one repeating a batch
    whose loss is not counted. Pure."""
    per_rank = max(1, -(-n_batches // world))
    mine = list(range(rank, n_batches, world))
    filler = mine[0] if mine else 0
    return [(b, True) for b in mine] + [(filler, False)] * (per_rank - len(mine))


def noise_seed(seed: int, key: str, quantile: float) -> int:
    """One sample's noise generator seed at one quantile, from the run's seed, the sample's cache
    key (its content, caption and bucket) and the quantile: the same at every evaluation of a run,
    on any number of ranks, whatever evaluation.microBatchSize or the order of the sources. Pure."""
    return int.from_bytes(hashlib.sha256(f"kubelora-eval:{seed}:{key}:{quantile!r}".encode()).digest()[:7], "big")


def sample_noise(shape: tuple, keys: list[str], seed: int, quantile: float, device) -> torch.Tensor:
    """The noise of a batch of len(keys) samples of one shape ([B, ...]): each sample's from its own
    generator (noise_seed), so a sample's loss does not depend on the batch it is in. Drawn on the
    CPU and moved to device: the same on any device (a CUDA generator's draws depend on the GPU's
    SM count above a few hundred thousand elements: a 1024² Flux latent, so evaluations after a
    resume on another GPU model were made with other noise)."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(
        noise_seed(seed, k, quantile))) for k in keys]).to(device)


def fingerprint(spec, keys: Optional[list[str]] = None) -> str:
    """What an evaluation's numbers depend on besides the weights: the held-out sources, the
    quantiles and the noise's seed, and with keys the items' cache keys (their content and
    encoding: files changed under the same URIs between attempts are another evaluation). Records
    of another fingerprint (changed across a resume) are not compared for the best evaluation. Pure."""
    ev = spec.evaluation
    what = {"sources": [s.model_dump(mode="json") for s in ev.sources], "quantiles": sorted(ev.quantiles),
            "seed": spec.training.seed, "noise": "per-sample, drawn on the CPU"}
    if keys is not None:
        what["items"] = hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def due(step: int, ev, total_steps: int, samples_per_step: int, epoch_size: int) -> bool:
    """Whether to evaluate after `step` (0: before the first step): evaluation.beforeFirstStep at
    0, every evaluation.everySteps, at the step that completes every evaluation.everyEpochs-th
    epoch (an epoch: epoch_size samples over all ranks), and always at the last step. Pure."""
    if ev is None:
        return False
    if step == 0:
        return ev.beforeFirstStep
    if step == total_steps or (ev.everySteps and step % ev.everySteps == 0):
        return True
    if ev.everyEpochs and epoch_size > 0:
        before, after = (step - 1) * samples_per_step // epoch_size, step * samples_per_step // epoch_size
        return any(e % ev.everyEpochs == 0 for e in range(before + 1, after + 1))
    return False


def to_run(step: int, ev, total_steps: int, samples_per_step: int, epoch_size: int, *, stopping: bool = False,
           done: frozenset = frozenset()) -> bool:
    """Whether to evaluate after `step` now: due (`due`), not while stopping (a SIGTERM: the
    checkpoint is written first and the evaluation runs on the resume, its step start - 1), and
    not evaluated already (done: the steps of the loop state's records). Pure."""
    return not stopping and step not in done and due(step, ev, total_steps, samples_per_step, epoch_size)


def oversize_warning(units: list[bk.Unit], batches: list[EvalBatch], n_train: int, train_micro: int) -> Optional[str]:
    """The warning when the largest evaluation batch holds more latent elements than the largest
    training micro-batch, the one the memory plan measures (None otherwise). An evaluation forward
    keeps nothing for a backward, so it needs less memory than a training step of its size; a
    larger batch is not measured. Pure."""
    trained = [math.prod(u.bucket) for u in units if u.source < n_train]
    if not trained or not batches:
        return None
    def size(b: EvalBatch) -> int:
        return len(b.units) * math.prod(units[b.units[0]].bucket)
    b = max(batches, key=size)
    if size(b) <= max(trained) * train_micro:
        return None
    bucket = "x".join(map(str, units[b.units[0]].bucket))
    return (f"[eval] warning: an evaluation batch ({len(b.units)} samples of {bucket}) "
            f"is larger than the largest training micro-batch ({train_micro} samples of {max(trained)} latent elements), "
            "the one the memory plan measures; it runs without gradients, so it needs less than a training step of its "
            "size, but if it runs out of memory lower evaluation.microBatchSize")


def summarize(sums: torch.Tensor, quantiles: list[float]) -> dict:
    """The evaluation's record from the all-reduced [sources, quantiles, (loss sum, count)]: the
    mean over every item per quantile, their mean (the evaluation loss) and each source's. Pure."""
    total = sums.sum(dim=0)   # [quantiles, 2]
    count = int(total[0, 1].item())
    per_q = [float(total[i, 0] / total[i, 1]) if total[i, 1] > 0 else math.nan for i in range(len(quantiles))]
    by_source = []
    for s in range(sums.shape[0]):
        qs = [float(sums[s, i, 0] / sums[s, i, 1]) for i in range(len(quantiles)) if sums[s, i, 1] > 0]
        by_source.append(sum(qs) / len(qs) if qs else None)
    return {"loss": sum(per_q) / len(per_q), "quantiles": {f"{q:g}": v for q, v in zip(quantiles, per_q)},
            "samples": count, "sources": by_source}


def format_line(step: int, rec: dict) -> str:
    qs = ", ".join(f"q{q} {v:.4f}" for q, v in rec["quantiles"].items())
    return (f"[eval] step {step}: loss {rec['loss']:.4f} ({qs}) over {rec['samples']} samples "
            f"in {rec['seconds']:.1f} s")


def published(rec: dict) -> tuple[Optional[float], Optional[str]]:
    """progress.json's evalLoss for an evaluation's record, and the warning to log when its loss is
    not finite (published as None: JSON has no NaN, and the API server would refuse the status
    patch the operator copies it into). Pure."""
    loss = rec["loss"]
    if math.isfinite(loss):
        return loss, None
    bad = [q for q, v in rec["quantiles"].items() if not math.isfinite(v)]
    return None, (f"[eval] warning: the evaluation loss is not finite ({loss} at step {rec['step']}; at quantile(s) "
                  f"{', '.join(bad) or 'none alone'}): the model's predictions on the held-out items overflow; "
                  "progress.json shows no evaluation loss until a finite one")


@dataclass
class Evaluator:
    """The evaluation of one run: its batches (of cache keys), planned once (build_trainer)."""
    spec: object
    batches: list[EvalBatch]
    keys: list[list[str]]          # each batch's cache keys
    n_sources: int
    seconds: float = 0.0           # spent evaluating so far (left out of the training rates)
    fingerprint: str = ""          # fingerprint(spec), in every record

    def load(self, b: int) -> dict:
        """Batch b from the cache (one batch in host memory at a time)."""
        from . import cache
        from .disk import cache_root
        return cache.stack([cache.load_entry(cache_root(), k) for k in self.keys[b]])

    def run(self, step: int, tr) -> Optional[dict]:
        """Evaluate after `step` (every rank calls it; forwards are collectives under FSDP2); the
        record (rank 0 logs it), also appended to tr.state.evals.

        Each batch is loaded before its forwards (one in host memory at a time) and every rank agrees
        it loaded (dist.fail_together: a failure stops every rank together; every rank runs as many
        batches). With the weights sharded (FSDP2, several ranks)
        the forwards then run as training's do, an error ending the run (a rank that left them
        would leave its peers waiting in a weight all-gather); replicated or alone, an error is
        agreed on after them. The forwards run eagerly under torch.compile
        (set_stance("force_eager")): the compiled blocks never see the evaluation's shapes or
        no_grad, so they do not recompile (nor mark a dimension dynamic) for it."""
        from . import dist
        t0 = time.perf_counter()
        ev, env = self.spec.evaluation, tr.env
        quantiles = list(ev.quantiles)
        seed = self.spec.training.seed
        sums = torch.zeros(self.n_sources, len(quantiles), 2, dtype=torch.float64, device=env.device)
        share = rank_share(len(self.batches), env.world, env.rank)   # the same length on every rank
        sharded = dist.weights_sharded(env.world, tr.adapters)
        err = None

        def forward(b: int, counted: bool, batch: dict) -> None:
            batch = {k: v.to(env.device) for k, v in batch.items()}
            n = len(self.keys[b])
            for qi, q in enumerate(quantiles):
                noise = sample_noise(tuple(batch["latents"].shape), self.keys[b], seed, q, env.device)
                loss = tr.family.loss(tr.comps, batch, self.spec.model, self.spec.training, None,
                                      quantile=q, noise=noise)
                if counted:
                    sums[self.batches[b].source, qi, 0] += loss.detach().double() * n
                    sums[self.batches[b].source, qi, 1] += n

        def forwards() -> None:
            nonlocal err
            for b, counted in share:
                # each batch loaded, and agreed on by every rank, before its forwards
                loaded, load_err = None, None
                try:
                    loaded = self.load(b)
                except Exception as e:  # noqa: BLE001 - agreed on now, so no rank waits for a failed one
                    load_err = RuntimeError(f"evaluation at step {step}: loading its cache entries: "
                                            f"{type(e).__name__}: {e}")
                dist.fail_together(load_err, f"loading the evaluation of step {step}")
                if err is None:  # after an error (not sharded: agreed on below) the rest is skipped
                    err = dist.caught(lambda: forward(b, counted, loaded), sharded, f"evaluation at step {step}")

        modules = list(tr.modules.modules())
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()   # no LoRA dropout
        cuda = [env.device.index or 0] if env.device.type == "cuda" else []
        try:
            # the training draws nothing less or more: its generator is not used, the global RNG restored
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), tr.adapters.compute(), \
                    torch.compiler.set_stance("force_eager"):
                forwards()
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        dist.fail_together(err, f"evaluation at step {step}")
        if env.world > 1:
            torch.distributed.all_reduce(sums)
        rec = {"step": step, **summarize(sums.cpu(), quantiles), "fingerprint": self.fingerprint}
        spent = time.perf_counter() - t0
        self.seconds += spent
        rec["seconds"] = round(spent, 3)
        tr.state.evals.append(rec)
        return rec


def make(spec, layout, n_train: int) -> Optional[Evaluator]:
    """The run's Evaluator (None without spec.evaluation): layout's evaluation units batched, each
    sample its unit's one caption variant."""
    if spec.evaluation is None:
        return None
    micro = spec.evaluation.microBatchSize or spec.training.microBatchSize
    units = layout.assignment.units
    batches = plan_batches(units, n_train, micro)
    key_of = dict(zip(layout.entries, layout.keys))
    keys = [[key_of[(u, 0)] for u in b.units] for b in batches]
    return Evaluator(spec, batches, keys, n_sources=len(spec.evaluation.sources),
                     fingerprint=fingerprint(spec, [k for b in keys for k in b]))
