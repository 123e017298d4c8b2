"""The held-out evaluation loss (spec.evaluation; diffusion-pipe's eval_datasets): every held-out
item's loss with the timestep fixed at the inverse CDF of the family's training distribution at
each quantile (family.loss(..., quantile=q)), under no_grad, LoRA dropout off, the noise from
generators seeded the same at every evaluation (so evaluations compare across steps), the
training's RNG untouched (a run trains bit-identically with and without evaluation).

The batches are planned once, the same whatever the number of ranks (each from one source and
one bucket, at most evaluation.microBatchSize samples), each with its own noise seed; they are
dealt to ranks round-robin, every rank running the same number of forwards (FSDP2 gathers weights
in each forward: a rank short of a batch repeats one, not counted). The sums and counts are
all-reduced in float64, so the result does not depend on the world size beyond summation order.
Planning and scheduling are pure; `Evaluator.run` is the one runner."""
from __future__ import annotations

import hashlib
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


def noise_seed(seed: int, batch: int, quantile_index: int) -> int:
    """The noise generator's seed for one batch at one quantile: the same at every evaluation of a
    run and on any number of ranks. Pure."""
    return int.from_bytes(hashlib.sha256(f"kubelora-eval:{seed}:{batch}:{quantile_index}".encode()).digest()[:7], "big")


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
            "items": count, "sources": by_source}


def format_line(step: int, rec: dict) -> str:
    qs = ", ".join(f"q{q} {v:.4f}" for q, v in rec["quantiles"].items())
    return (f"[eval] step {step}: loss {rec['loss']:.4f} ({qs}) over {rec['items']} items "
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

    def run(self, step: int, tr) -> Optional[dict]:
        """Evaluate after `step` (every rank calls it; forwards are collectives under FSDP2); the
        record (rank 0 logs it), also appended to tr.state.evals."""
        from . import cache, dist
        from .disk import cache_root
        t0 = time.perf_counter()
        ev, env = self.spec.evaluation, tr.env
        quantiles = list(ev.quantiles)
        sums = torch.zeros(self.n_sources, len(quantiles), 2, dtype=torch.float64, device=env.device)
        modules = list(tr.modules.modules())
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()   # no LoRA dropout
        cuda = [env.device.index or 0] if env.device.type == "cuda" else []
        err = None
        try:
            # the training draws nothing less or more: its generator is not used, the global RNG restored
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), tr.adapters.compute():
                for b, counted in rank_share(len(self.batches), env.world, env.rank):
                    batch = {k: v.to(env.device) for k, v in
                             cache.stack([cache.load_entry(cache_root(), k) for k in self.keys[b]]).items()}
                    n = len(self.keys[b])
                    for qi, q in enumerate(quantiles):
                        gen = torch.Generator(device=env.device).manual_seed(noise_seed(self.spec.training.seed, b, qi))
                        loss = tr.family.loss(tr.comps, batch, self.spec.model, self.spec.training, gen, quantile=q)
                        if counted:
                            sums[self.batches[b].source, qi, 0] += loss.detach().double() * n
                            sums[self.batches[b].source, qi, 1] += n
        except Exception as e:  # noqa: BLE001 - agreed on below, so no rank waits for a failed one
            err = RuntimeError(f"evaluation at step {step}: {type(e).__name__}: {e}")
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        dist.fail_together(err, f"evaluation at step {step}")
        if env.world > 1:
            torch.distributed.all_reduce(sums)
        rec = {"step": step, **summarize(sums.cpu(), quantiles)}
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
    return Evaluator(spec, batches, [[key_of[(u, 0)] for u in b.units] for b in batches],
                     n_sources=len(spec.evaluation.sources))
