"""The cache phase of a run, between the dataset's layout and training: which latent/text entries
some rank already has, what dataset.cacheUri can give, the model loaded (with its encoders only
when something must be encoded or sampled), the rest encoded (items that turn out corrupt dropped
on every rank and the layout made again), every entry shared between nodes, and what the
cacheUri prefix lacked pushed to it. train._run calls `prepare`; the steps live in
dataset_phase.py, cache.py and cache_remote.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import cache, cache_remote, dist, media_later
from .cache import cache_inputs, model_fingerprint
from .data import ScanReport
from .dataset_phase import (drop_items, encode_missing, entry_keys, exchange, gather_present, held_out_copies,
                            held_out_copies_line, layout_data, media_room_to_encode, probe_name, sample_entries)
from .disk import cache_root, cache_root_said
from .dist import log
from .families import RULES, source_specs
from .quiet import quiet_progress_bars


@dataclass
class Layout:
    """The dataset as trained: the scanned items, their probes and content digests, their buckets,
    and every (unit, caption variant) a batch may draw with its cache key."""
    report: ScanReport
    metas: list
    digests: list
    assignment: object = None
    stats: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)
    inputs: Optional[dict] = None  # what else goes into a cache key (cache.cache_inputs); set by `key`
    keys: list = field(default_factory=list)

    def make(self, spec, env, m) -> "Layout":
        self.assignment, self.stats = layout_data(spec, self.report, self.metas, env, m)
        copies = held_out_copies_line(held_out_copies(self.report, self.digests, len(source_specs(spec))))
        if copies:
            log(env, copies)
        self.entries = sample_entries(self.report, self.assignment.units)
        if self.inputs is not None:
            self.key(self.inputs)
        return self

    def key(self, inputs: dict) -> None:
        self.inputs = inputs
        self.keys = entry_keys(self.report, self.assignment.units, self.entries, self.digests, inputs)

    def drop(self, bad: dict, spec, env, m) -> None:
        """Items found corrupt past their header: dropped on every rank alike, the layout made again."""
        gone = drop_items(self.report, bad)
        for i in sorted(bad)[:10]:
            log(env, f"[data] skipped {bad[i]}")
        self.metas = [x for i, x in enumerate(self.metas) if i not in gone]
        self.digests = [x for i, x in enumerate(self.digests) if i not in gone]
        self.make(spec, env, m)


@dataclass
class Ready:
    comps: object       # the family's Components, encoders loaded when `encoders` (cleared after samples.setup)
    layout: Layout
    cache_stats: dict   # for manifest.json: entries, encoded, cached, copiedBetweenNodes (+ cacheUri transfers)


def load_family(family, spec, paths: dict, device: torch.device, encoders: bool):
    """family.load on the device; with training.cpuOffload or a float8 transformer into CPU memory,
    then the encoders (VAE, text encoders) moved to the device: the trained model is never whole on
    the device in full precision (offloaded, FSDP2 moves it there one block at a time,
    dist.parallelize; float8, adapters.prepare quantizes it there one layer at a time — a 12B Flux
    loaded on the GPU first needed its 24 GB of bf16 weights there, beside the text encoders)."""
    if not spec.training.cpuOffload and spec.model.transformerDtype != "float8":
        return family.load(spec.model, paths, device, encoders=encoders)
    comps = family.load(spec.model, paths, torch.device("cpu"), encoders=encoders)
    for part in comps.encoders.values():
        if isinstance(part, torch.nn.Module) or hasattr(part, "components"):  # a module or a diffusers pipeline
            part.to(device)
    return comps


def prepare(spec, family, paths: dict, layout: Layout, remote: Optional[cache_remote.Remote], env, m,
            later: media_later.Later = media_later.NONE) -> Ready:
    log(env, "[phase] cache")
    m.phase("Caching")
    quiet_progress_bars()
    # hashed once, by rank 0 (remembered in its node's cache folder), for every rank alike; the others
    # wait at dist.agree's phase barrier (not a collective's timeout: a first hash of large encoders
    # takes minutes), and an error there reaches every rank
    def hashing_the_encoders():
        return model_fingerprint(paths, cache_root()) if env.is_main else None
    files = dist.agree(hashing_the_encoders)
    layout.key(cache_inputs(spec, dist.broadcast(files) if env.world > 1 else files))
    distinct = list(dict.fromkeys(layout.keys))  # shuffled captions may repeat: one entry for equal samples
    missing = [distinct[i] for i in cache.missing_everywhere(gather_present(distinct, env))]
    pulled, moved = set(), {}
    if remote is not None:  # dataset.cacheUri: what no rank has but the prefix does is downloaded, not encoded
        moved["probes pulled"] = cache_remote.gathered(remote.probes_pulled, env)
        pulled, moved["pulled"] = cache_remote.pull_entries(remote, missing, cache_root(), env)
        log(env, cache_remote.transfer_line("pulled", cache_remote.Moved.total([moved["probes pulled"], moved["pulled"]]),
                                            remote.uri))
    todo = cache.first_entries(layout.keys, set(missing) - pulled)
    if todo and later.sources:  # the same on every rank
        media_room_to_encode(layout.report.items, layout.assignment.units, layout.entries, todo, env, later)
    # spec.samples needs the VAE (decoding) and the prompts' embeddings: encoders load with it on
    encoders = bool(todo) or spec.samples is not None
    log(env, f"[cache] {len(distinct)} entries: {len(distinct) - len(missing)} cached, "
             + (f"{len(pulled)} pulled from dataset.cacheUri, " if remote is not None else "")
             + f"{len(todo)} to encode; "
             + ("loading the VAE and text encoders" if encoders else "the VAE and text encoders are not loaded")
             + f"; cache folder {cache_root_said()}")
    # a failure on one rank (a bad file, a missing weight) stops every rank with its reason
    comps = dist.agree(load_family, family, spec, paths, env.device, encoders)
    todo_keys = {layout.keys[i] for i in todo}
    rewritten = _encode(spec, family, comps, layout, todo, remote, env, m, later) if todo else []
    later.release()  # every fetch of the dataset phase is done

    distinct = list(dict.fromkeys(layout.keys))
    received = exchange(distinct, env)
    got = sum(dist.all_gather(received)) if env.world > 1 else 0
    encoded = len(todo_keys & set(distinct))
    n_pulled = len(pulled & set(distinct))
    cache_stats = {"entries": len(distinct), "encoded": encoded, "cached": len(distinct) - encoded - n_pulled,
                   "copiedBetweenNodes": got}
    if remote is not None:  # what the prefix lacks, shared under dataset.cacheUri (every rank has every entry now)
        moved["pushed"] = cache_remote.push(remote, cache_remote.push_share(distinct, remote.listing, env.world, env.rank),
                                            cache_root(), env)
        moved["probes pushed"] = cache_remote.push(remote, remote.probes, cache_root(), env, force=tuple(rewritten))
        log(env, cache_remote.transfer_line("pushed", cache_remote.Moved.total([moved["pushed"], moved["probes pushed"]]),
                                            remote.uri))
        cache_stats.update(cache_remote.stats(moved))
    log(env, f"[cache] {len(distinct)} entries ready on every rank: {encoded} encoded, "
             f"{cache_stats['cached']} were cached"
             + (f", {n_pulled} pulled from dataset.cacheUri" if remote is not None else "")
             + (f"; {got} copied between nodes" if got else ""))
    return Ready(comps, layout, cache_stats)


def _encode(spec, family, comps, layout: Layout, todo: list[int], remote, env, m, later) -> list[str]:
    """Each rank encodes its share of `todo`; items corrupt past their header are dropped on every
    rank. Returns the probe names rewritten as lasting skips (pushed to dataset.cacheUri)."""
    mine = dist.agree(encode_missing, spec, family, comps, layout.report.items, layout.digests,
                      layout.assignment.units, layout.entries, layout.keys, todo, env, later)
    bad = dict(b for part in dist.all_gather(mine) for b in part)
    rewritten = []
    if remote is not None:  # probes rewritten as skips are pushed by the rank that found them
        r = RULES[spec.model.type]
        fps = r.fps if r.video else None
        gone_probes = {probe_name(cache_root(), layout.digests[i], fps) for i in bad}
        remote.probes = [n for n in remote.probes if n not in gone_probes]
        rewritten = [probe_name(cache_root(), layout.digests[i], fps) for i, skip in mine if skip.lasting]
    if bad:
        layout.drop(bad, spec, env, m)
    return rewritten
