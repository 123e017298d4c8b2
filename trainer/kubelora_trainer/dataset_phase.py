"""The dataset phase of a run, between stage-in and training: every item checked and probed
(split over ranks, skips agreed on), laid out in buckets, keyed for the latent cache, the missing
entries encoded and exchanged between nodes. train._run calls these in order; the pure planning
they rely on lives in buckets.py, cache.py and data.py."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Optional

from . import cache, cache_remote, disk, dist, masks, media_later, metrics
from . import buckets as bk
from .cache import cache_key
from .disk import cache_root
from .data import (SKIP_REASONS, DatasetError, ScanReport, Skip, check_item, check_usable, decode_skip, is_environmental, kohya_note, load_unit,
                   skipped_text)
from .dist import log
from .families import (RULES, all_source_specs, areas_of, frame_buckets_of,  # noqa: F401 (re-exported)
                       source_repeats, source_specs)


def sample_entries(report: ScanReport, units: list[bk.Unit]) -> list[tuple[int, int]]:
    """Every (unit, caption variant) a batch may draw; variant -1 is the empty caption (dropout)."""
    entries = [(n, v) for n, u in enumerate(units) for v in range(len(report.items[u.item].variants))]
    return entries + [(n, -1) for n, u in enumerate(units) if report.items[u.item].dropout > 0]


def largest_batch(report: ScanReport, units: list[bk.Unit], entries: list[tuple[int, int]], key_of: dict,
                  root: Path, micro: int) -> dict:
    """A micro-batch of the largest sample a step sees, for the memory plan's measured forward:
    the largest bucket, and in it the longest caption (families that trim text padding per batch
    run longer sequences for it)."""
    def size(s: tuple[int, int]) -> tuple[int, int]:
        unit, variant = s
        caption = report.items[units[unit].item].variants[variant] if variant >= 0 else ""
        return math.prod(units[unit].bucket), len(caption)
    return cache.stack([cache.load_entry(root, key_of[max(entries, key=size)])] * micro)


def entry_keys(report: ScanReport, units: list[bk.Unit], entries, digests: list[str], inputs: dict) -> list[str]:
    """The cache key of each entry (pure but for nothing: the digests are the media content). A
    family whose dropout entry is encoded apart from an empty caption (FamilyRules.dropout_text)
    keys it apart too."""
    apart = RULES[inputs["model"]["type"]].dropout_text
    out = []
    for u, v in entries:
        unit, it = units[u], report.items[units[u].item]
        out.append(cache_key(inputs, "" if v < 0 else it.variants[v], bytes.fromhex(digests[unit.item]), unit,
                             dropout=apart and v < 0))
    return out


def gather_present(keys: list[str], env) -> list[list[bool]]:
    """Which entries each rank finds in its node's cache folder (bit-packed on the wire)."""
    import numpy as np
    mine = np.packbits(np.array(cache.present(cache_root(), keys), dtype=bool))
    parts = dist.all_gather(mine) if env.world > 1 else [mine]
    return [np.unpackbits(p, count=len(keys)).astype(bool).tolist() for p in parts]


def units_to_encode(items, units, entries, todo: list[int], env,
                    later: media_later.Later = media_later.NONE) -> tuple[dict[int, list[int]], list[int]]:
    """({unit: its entries in todo}, the units this rank encodes: those of the items it probed
    whose media it fetched (a source listed from a bucket, media_later), and a balanced share of
    the others (cache.split_units)). Pure but for nothing."""
    per_unit: dict[int, list[int]] = {}
    for i in todo:
        per_unit.setdefault(entries[i][0], []).append(i)
    owners = [items[u.item].seq if later.listed_media(items[u.item].image) else -1 for u in units]
    return per_unit, cache.split_units(sorted(per_unit), env.world, env.rank, owners)


def media_room_to_encode(items, units, entries, todo: list[int], env, later: media_later.Later) -> None:
    """Before encoding: room for the media this rank fetches to encode (items keyed and probed from
    dataset.cacheUri's memo were not fetched when probed; a new resolution or model needs them
    all), checked with the other ranks of its volume (check_media_room). Every rank calls it."""
    _, mine = units_to_encode(items, units, entries, todo, env, later)
    check_media_room(env, later.to_fetch(items[units[u].item].image for u in mine))


def encode_missing(spec, family, comps, items, digests, units, entries, keys, todo: list[int],
                   env, later: media_later.Later = media_later.NONE) -> list[tuple[int, Skip]]:
    """Encode the entries no rank has, split over ranks by unit (each unit's media is decoded
    once for all its caption variants; a unit goes to the rank that probed its item, which has
    fetched its media) and write them to this node's cache. Returns the items
    whose media could not be decoded, with the reason: skipped and counted, like unreadable
    files found while probing (and remembered with their probe, so a later run skips them
    without decoding)."""
    root = cache_root()
    r = RULES[spec.model.type]
    per_unit, mine = units_to_encode(items, units, entries, todo, env, later)
    if later:  # those keyed and probed from dataset.cacheUri's memo, not fetched when probed
        later.fetch([items[units[u].item].image for u in mine], _fetch_log(env), dist.heartbeat)
    progress = cache.EncodeProgress(len(todo), sum(len(per_unit[u]) for u in mine), env, lambda msg: log(env, msg))
    bad = []
    try:
        for u in mine:
            unit, it = units[u], items[units[u].item]
            w, h, frames = unit.bucket
            if it.image in later.vanished:  # deleted from the bucket since it was listed: never its stale copy
                bad.append((unit.item, Skip(it.name, "vanished", SKIP_REASONS["vanished"], lasting=False)))
                progress.add(len(per_unit[u]))
                continue
            try:
                x = load_unit(it.image, w, h, frames, unit.start, fps=r.fps if r.video else None, clip=r.video).unsqueeze(0)
            except Exception as e:  # noqa: BLE001 - any decoder failure means skip and count
                skip = decode_skip(it, e)
                bad.append((unit.item, skip))
                if skip.lasting:  # remembered: later runs skip these bytes without decoding them
                    cache.write_probe(root, digests[unit.item], r.fps if r.video else None, skip)
                progress.add(len(per_unit[u]))
                continue
            captions = ["" if entries[i][1] < 0 else it.variants[entries[i][1]] for i in per_unit[u]]
            kw = {"dropout": [entries[i][1] < 0 for i in per_unit[u]]} if r.dropout_text else {}
            mask = None
            # one call for all of the unit's caption variants: the VAE encodes its pixels once
            for i, sample in zip(per_unit[u], family.encode(comps, x, captions, **kw)):
                out = {k: t.detach().cpu() for k, t in sample.items()}
                if it.mask is not None:  # [h, w] on the latent grid (masks.py)
                    if mask is None:
                        mask = masks.latent_mask(it.mask, w, h, tuple(out["latents"].shape[-2:]))
                    out["mask"] = mask
                cache.save_entry(root, keys[i], out)
            progress.add(len(captions))
    finally:
        progress.finish()
    if env.rank == 0:
        progress.wait()
    return bad


def _fetch_log(env):
    """Where a rank's media fetch says how far it is: rank 0's lines stand for all (each rank
    says its total once, in probe_items)."""
    return print if env.is_main else (lambda msg: None)


def exchange(keys: list[str], env) -> int:
    """After encoding: every node's folder receives the entries it lacks from a node that has them
    (cache.exchange_rounds: rounds of at most $KUBELORA_CACHE_EXCHANGE_MB), between the nodes'
    writers only (local rank 0 of each, in a process group of their own): a node's ranks share its
    folder, so the others have nothing to send or receive and wait at the end (dist.fail_together,
    which the writers' heartbeats keep open); broadcasting to every rank moved each payload to
    every process of every node. Each sender's share of a round is broadcast from it, so a writer
    holds one sender's payload at a time (an all-gather would pad every part to the largest and
    hold nodes x that). Returns how many entries this rank wrote (atomically)."""
    if env.world == 1:
        return 0
    writers = [r for r, local in enumerate(dist.all_gather(env.local_rank)) if local == 0]
    group = dist.subgroup(writers) if len(writers) > 1 else None  # every rank takes part in making it
    received, err = 0, None
    if group is not None and env.local_rank == 0:
        received, err = _exchange_between(keys, writers, group, env.rank)
    dist.fail_together(err, "the cache exchange")  # also: every node's writer is done before any rank reads
    return received


def _exchange_between(keys: list[str], writers: list[int], group, rank: int) -> tuple[int, Optional[BaseException]]:
    """exchange's part on a node's writer: (entries written, the first error). A writer that
    failed still takes part in every collective of the group, so no other writer waits for it."""
    import numpy as np
    root = cache_root()
    mine = np.array([p.stat().st_size if p.is_file() else 0 for p in (cache.entry_path(root, k) for k in keys)],
                    dtype=np.int64)  # 0: absent (a saved entry is never empty)
    sizes = [part.tolist() for part in dist.all_gather(mine, group)]
    haves = [[n > 0 for n in part] for part in sizes]
    have = haves[writers.index(rank)]
    chunk = int(float(os.environ.get(cache.EXCHANGE_MB_ENV, "256")) * 2 ** 20)
    received, err = 0, None
    for rnd in cache.exchange_rounds(haves, sizes, chunk):
        for sender in sorted({s for _, s in rnd}):
            payload = None
            if writers[sender] == rank:
                try:
                    payload = {i: cache.entry_path(root, keys[i]).read_bytes() for i, s in rnd if s == sender}
                except OSError as e:  # still takes part in every collective; fails with the others below
                    err, payload = err or RuntimeError(f"cache exchange: reading an entry: {e}"), {}
            for i, data in dist.broadcast(payload, src=writers[sender], group=group).items():
                if not have[i]:
                    if err is None:
                        try:
                            cache.write_bytes_atomic(cache.entry_path(root, keys[i]), data)
                            received += 1
                        except disk.NoRoom as e:  # a full cache volume: every rank stops with this reason
                            err = disk.NoRoom(f"cache exchange: {e}")
                        except OSError as e:
                            err = RuntimeError(f"cache exchange: writing an entry to {root}: {e}")
                    have[i] = True
        dist.heartbeat()  # the node's other ranks wait at fail_together
    return received, err


def bucket_configs(spec) -> list[bk.BucketConfig]:
    d, r = spec.dataset, RULES[spec.model.type]
    fixed = (d.width, d.height) if d.width is not None else None
    ars = tuple(bk.aspect_ratios(d.enableArBucket, d.minAr, d.maxAr, d.numArBuckets))
    return [bk.BucketConfig(ars=ars, sides=tuple(areas_of(d, s)), frame_buckets=tuple(frame_buckets_of(spec.model.type, d, s)),
                            multiple=r.size_multiple, fixed=fixed, clip_mode=d.videoClipMode) for s in all_source_specs(spec)]


def probe_items(report: ScanReport, env, spec, remote: Optional[cache_remote.Remote] = None,
                later: media_later.Later = media_later.NONE) -> tuple[list[tuple[int, int, int, bool]], list[str]]:
    """Check every item once, split over ranks (data.check_item: not empty, decodes, within the
    pixel limits, its mask decodes and has its size), and hash its content (media and mask). The
    answer for a content hash is kept in the cache (cache.read_probe), so a later run decodes
    nothing; images are checked from their header (a file corrupt past it is found when it is
    encoded, and skipped then). Bad ones, and items of an extreme aspect ratio for their source's
    buckets (screen_ratios), leave report.items for report.skipped with their reason (the same on
    every rank); every skip so far is logged by source URI (the first ten). Returns the probes and
    digests of the remaining items, in order. With dataset.cacheUri (remote), the probes of this
    rank's items that its node lacks are downloaded first when listed there (remote.probes_pulled),
    and their names are kept for the push after encoding (remote.probes). A rank fetches the media
    of its share that stage-in left for later (media_later) first, but those whose digest the
    cacheUri memo knows and whose probe it finds; rank 0 pushes the memo with what this run learnt.
    Each item keeps its index here (Item.seq), so the same rank encodes it."""
    r = RULES[spec.model.type]
    fps = r.fps if r.video else None
    root = cache_root()
    items = report.items = [dataclasses.replace(it, seq=i) for i, it in enumerate(report.items)]

    share = range(env.rank, len(items), env.world)
    known = {i: later.digest_of(items[i].image) for i in share}  # from dataset.cacheUri's memo
    if later.sources:
        check_media_room(env, later.to_fetch(items[i].image for i in share if known[i] is None))

    def checking_the_dataset():  # this rank's share; run through dist.agree, so no rank waits for a failed one
        found, bad, hashed, media = [], [], [], {}
        fetched = later.fetch([items[i].image for i in share if known[i] is None], _fetch_log(env), dist.heartbeat)
        for i in share:
            it = items[i]
            if it.image in later.vanished:  # not remembered: it may be back, with other bytes
                bad.append((i, Skip(it.name, "vanished", SKIP_REASONS["vanished"], lasting=False)))
                continue
            try:
                media[i] = known[i] or cache.media_digest(it.image, memo_root=root)
                hashed.append((i, item_digest(it, media[i])))
            except OSError as e:  # the media file, or its mask (named by the error's filename)
                reason = "maskUnreadable" if it.mask is not None and e.filename == str(it.mask) else "corrupt"
                bad.append((i, Skip(it.name, reason, f"{type(e).__name__}: {e}"[:300], lasting=not is_environmental(e))))
        if remote is not None:  # items of equal content share one probe
            remote.probes = list(dict.fromkeys(probe_name(root, d, fps) for _, d in hashed))
            remote.probes_pulled = remote.pull([n for n in remote.probes if n in remote.listing and not (root / n).is_file()],
                                               root)
        probes = {i: cache.read_probe(root, d, fps) for i, d in hashed}  # each read once
        # keyed from the memo, but no probe to be had: the media are checked here after all
        fetched += later.fetch([items[i].image for i, _ in hashed if probes[i] is None], _fetch_log(env),
                               dist.heartbeat)
        if fetched:
            print(f"[data] rank {env.rank}: fetched {fetched} media file(s) of its share", flush=True)
        for i, digest in hashed:
            it = items[i]
            if it.image in later.vanished:  # keyed from the memo; deleted when it was to be checked
                bad.append((i, Skip(it.name, "vanished", SKIP_REASONS["vanished"], lasting=False)))
                continue
            got = probes[i]
            if got is None:
                meta, skip = check_item(it, fps, decode=False)
                if skip is None or skip.lasting:
                    cache.write_probe(root, digest, fps, meta if skip is None else skip)
            else:
                meta, skip = (None, dataclasses.replace(got, uri=it.name)) if isinstance(got, Skip) else (got, None)
            if skip is None:
                found.append((i, (meta, digest)))
            else:
                bad.append((i, skip))
        # for dataset.cacheUri's memo, the media digests that are not the item's (masked or skipped items)
        plain = {i for i, _ in found if items[i].mask is None}
        return found, bad, ({i: d for i, d in media.items() if i not in plain} if sharing else {})
    sharing = remote is not None and bool(later.sources)
    found, bad, media = dist.agree(checking_the_dataset)
    gathered = dist.all_gather((found, bad, media)) if env.world > 1 else [(found, bad, media)]
    found_all = dict(m for part, _, _ in gathered for m in part)
    skips = dict(b for _, part, _ in gathered for b in part)
    if sharing and env.is_main:  # best effort: a warning at worst
        digests = {i: d for i, (_, d) in found_all.items() if items[i].mask is None}
        digests.update((i, d) for _, _, part in gathered for i, d in part.items())
        push_memos(remote, later, {items[i].image: d for i, d in digests.items()}, env)
    kept = settle(report, {i: m for i, (m, _) in found_all.items()}, skips, bucket_configs(spec))
    for k in report.skipped[:10]:
        log(env, f"[data] skipped {k}")
    if len(report.skipped) > 10:
        log(env, f"[data] ... and {len(report.skipped) - 10} more skipped ({skipped_text(report)})")
    for k in report.held.skipped[:10] if report.held is not None else ():
        log(env, f"[data] skipped (evaluation) {k}")
    return [found_all[i][0] for i in kept], [found_all[i][1] for i in kept]


def check_media_room(env, need: int) -> None:
    """Before any rank fetches its share of the media (need: this rank's bytes): every cache
    volume has room for what the ranks writing into it fetch (disk.shares_by_volume: a node's
    ranks, or the nodes sharing a cache claim), within resources.cacheSize; else every rank stops
    with disk.NoRoom (bad input), which names the bytes, the room and the fix. Stage-in counted
    the other inputs."""
    root = cache_root()
    vol = disk.volume_id(root)
    parts = dist.all_gather((vol, need)) if env.world > 1 else [(vol, need)]
    first, total = disk.shares_by_volume(parts)[vol]
    ranks = sum(1 for v, _ in parts if v == vol)
    who = f"the media its {ranks} ranks read" if ranks > 1 else "the media this rank reads"
    err = None
    if env.rank == first and total:  # one rank per volume (the limit's walk of the folder is not free)
        try:
            disk.check_room(total, root, disk.cache_limit_left(), f"dataset: {who}")
            print(f"[data] {disk.size_text(total)} of media to fetch into {root} ({who}; {disk.usage(root)})",
                  flush=True)
        except disk.NoRoom as e:
            err = e
        except OSError as e:
            err = disk.no_room(e, "dataset") or RuntimeError(f"dataset: checking the room in {root}: {e}")
    dist.fail_together(err, "the media's room check")


def probe_name(root: Path, digest: str, fps) -> str:
    """A probe's file name relative to the cache folder (and to dataset.cacheUri)."""
    return cache.probe_path(root, digest, fps).relative_to(root).as_posix()


def push_memos(remote: cache_remote.Remote, later: media_later.Later, digests: dict, env) -> None:
    """Rank 0: each source's digest memo, where this run learnt digests its copy under
    dataset.cacheUri lacks, written to the cache folder and pushed (media_later)."""
    root = cache_root()
    known = later.memos({})  # what the pulled memo knew of the listed objects
    for key, memo in later.memos(digests).items():
        uri = later.sources[key].uri
        name = media_later.memo_name(uri)
        if not memo or (name in remote.listing and memo == known[key]):  # nothing learnt
            continue
        try:
            media_later.write_memo(root / name, uri, memo)
        except (OSError, disk.NoRoom) as e:
            log(env, f"[cache] warning: the media digests of {uri} were not written ({e}); not shared")
            continue
        moved = remote.push([name], root)
        if moved.failed:
            (root / name).unlink(missing_ok=True)  # pushed again next run
            log(env, f"[cache] warning: the media digests of {uri} were not pushed to {remote.uri} ({moved.error})")


def item_digest(item, media: Optional[str] = None) -> str:
    """What an item's cache entries and probe are keyed by: its media's content hash (media, when
    known), combined with its mask's for a masked item (a changed mask is checked and encoded again)."""
    digest = media or cache.media_digest(item.image, memo_root=cache_root())
    if item.mask is None:
        return digest
    return hashlib.sha256(masks.media_key(bytes.fromhex(digest), item.mask.read_bytes())).hexdigest()


def settle(report: ScanReport, metas: dict[int, tuple], skips: dict[int, Skip], configs: list[bk.BucketConfig]) -> list:
    """With every item of report.items probed (metas) or skipped (skips), by index: the items of an
    extreme aspect ratio skipped too (screen_ratios), the skipped ones moved from report.items to
    report.skipped. Returns the indices (into the items before) of the remaining ones, in order. Pure."""
    skips = {**skips, **screen_ratios(report.items, metas, configs)}
    gone = drop_items(report, skips)
    return [i for i in sorted(metas) if i not in gone]


def drop_items(report: ScanReport, skips: dict[int, Skip]) -> set[int]:
    """Move the items skips names (by index into report.items) to report.skipped, in order; the
    same on every rank (skips are gathered). Returns the dropped indices. Pure."""
    for i in sorted(skips):   # an evaluation item's skip is counted with the evaluation's (report.held)
        (report.held.skipped if report.is_held(report.items[i]) else report.skipped).append(skips[i])
    report.items = [it for i, it in enumerate(report.items) if i not in skips]
    return set(skips)


def screen_ratios(items, metas: dict[int, tuple], configs: list[bk.BucketConfig]) -> dict[int, Skip]:
    """Items whose aspect ratio is more than bk.MAX_AR_BEYOND times beyond every bucket ratio of
    their source, as skips. Pure."""
    out = {}
    for i, (w, h, _, _) in metas.items():
        cfg = configs[items[i].source]
        beyond = bk.ratio_beyond(w, h, cfg)
        if beyond > bk.MAX_AR_BEYOND:
            ars = [cfg.fixed[0] / cfg.fixed[1]] if cfg.fixed else list(cfg.ars)
            out[i] = Skip(items[i].name, "extremeAspectRatio",
                          f"{w}x{h} is {beyond:.1f}x beyond the bucket ratios {min(ars):.3g}..{max(ars):.3g} (width/height); "
                          f"less than {100 / bk.MAX_AR_BEYOND:.0f}% of it would be kept")
    return out


def layout_data(spec, report: ScanReport, metas, env, m) -> tuple[bk.Assignment, dict]:
    """Bucket the probed items, log and count what was kept and skipped, and fail when nothing
    is usable. Returns the assignment and the dataset stats (with the bucket summary)."""
    r = RULES[spec.model.type]
    configs = bucket_configs(spec)
    assignment = bk.assign(metas, configs, [it.source for it in report.items])
    for i, why in assignment.dropped[:10]:
        log(env, "[data] skipped " + drop_reason(report.items[i], metas[i], why, configs[report.items[i].source], r.fps or 0))
    n_train = len(source_specs(spec))
    train, held_out = split_assignment(assignment, [it.source for it in report.items], n_train)
    used = {u.item for u in train.units}
    names = [str(it.image.name) for it in report.items]
    n_train_items = sum(1 for it in report.items if it.source < n_train)
    bucket_stats = bk.summary(train, n_train_items, names)
    n_dropped = n_train_items - len(used)
    stats = {**report.summary(), "usable": len(used)}
    if spec.evaluation is not None:
        stats["evaluation"] = eval_stats(held_out, len(report.items) - n_train_items, names, report.held)
        ev = stats["evaluation"]
        log(env, f"[data] evaluation: {ev['usable']} held-out items in {len(ev['buckets']['buckets'])} bucket(s) "
                 f"({ev['buckets']['samples']} samples), never trained on"
                 + (f"; {ev['items'] - ev['usable']} without a bucket" if ev["items"] > ev["usable"] else ""))
    log(env, f"[data] {stats['usable']} usable items; skipped: {stats['missingCaption'] - stats['emptyCaptionUsed']} "
             f"without caption, {stats['unreadable']} unreadable"
             + (f" ({skipped_text(report)})" if report.skipped else "")
             + (f", {n_dropped} without a bucket" if n_dropped else "")
             + f"; {stats['emptyCaptionUsed']} trained with an empty caption")
    if report.masked_sources:
        log(env, f"[data] {stats['masked']} items with a loss mask, {stats['unmasked']} without"
                 + (f" (trained unmasked; warning: no mask for {', '.join(report.unmasked[:5])}"
                    + (" ..." if len(report.unmasked) > 5 else "") + ")" if report.unmasked else ""))
    if report.ignored:
        what = ", ".join(f"{k}: {n}" for k, n in sorted(report.ignored.items()))
        log(env, f"[data] ignored {sum(report.ignored.values())} file(s) that are not "
                 f"{'images or videos' if r.video else 'images'} or captions ({what})"
                 + (f"; {spec.model.type} trains images only" if "video" in report.ignored and not r.video else ""))
    if report.in_subfolders:
        log(env, f"[data] left out {report.in_subfolders} media file(s) in subfolders of the sources "
                 "(dataset.recursive: false reads each folder's own files only)")
    if report.missing_caption and (report.beside or report.unread_captions):
        from .data import caption_hint
        log(env, "[data] warning:" + caption_hint(report))
    if report.nested_maps:
        from .data import nested_maps_warning
        log(env, "[data] warning: " + nested_maps_warning(report))
    for n, line in enumerate(kohya_note(report.kohya, source_repeats(spec))):
        log(env, "[data] " + ("warning: " if n == 0 else "") + line)
    for msg in bk.format_summary(bucket_stats):
        log(env, msg)
    m.buckets(bucket_stats)
    m.dataset(stats["usable"], {"missing_caption": stats["missingCaption"] - stats["emptyCaptionUsed"],
                                **{metrics.snake(k): n for k, n in report.by_reason().items()},
                                **({"no_bucket": n_dropped} if n_dropped else {})})
    if not used:
        report.items = []
    check_usable(report, ", ".join(spec.dataset.uris),
                 dropped=f", without a frame bucket: {n_dropped}" if n_dropped else "")
    if spec.evaluation is not None and not stats["evaluation"]["usable"]:
        raise DatasetError(f"evaluation.sources ({', '.join(s.uri for s in spec.evaluation.sources)}): no usable "
                           f"held-out items ({stats['evaluation']['items']} found with a caption, none of them "
                           "usable: see the [data] lines above); add images with same-stem caption files, or remove "
                           "the evaluation section")
    stats["buckets"] = bucket_stats
    return assignment, stats


def held_out_copies(report: ScanReport, digests: list[str], n_train: int) -> list[str]:
    """The names of evaluation items whose content (media and mask digest) is also a training
    item's: the same file copied into both folders, so the held-out loss is not held out. Pure."""
    trained = {d for it, d in zip(report.items, digests) if it.source < n_train}
    return [str(it.name) for it, d in zip(report.items, digests) if it.source >= n_train and d in trained]


def held_out_copies_line(names: list[str]) -> Optional[str]:
    """The warning for held_out_copies (None when there are none). Pure."""
    if not names:
        return None
    return (f"[data] warning: {len(names)} evaluation item(s) have the same content as a training item "
            f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}): they are trained on, so the evaluation "
            "loss is not held out for them; remove them from one of the folders")


def split_assignment(assignment: bk.Assignment, sources: list[int], n_train: int
                     ) -> tuple[bk.Assignment, bk.Assignment]:
    """(the training sources' units and drops, evaluation.sources'), by each item's source. Pure."""
    parts = (bk.Assignment(), bk.Assignment())
    for u in assignment.units:
        parts[u.source >= n_train].units.append(u)
    for i, why in assignment.dropped:
        parts[sources[i] >= n_train].dropped.append((i, why))
    return parts


def eval_stats(held_out: bk.Assignment, n_items: int, names: list[str], held: Optional[ScanReport]) -> dict:
    """manifest.json's dataset.evaluation: the held-out items found (with a caption, readable),
    those with a bucket (usable), what was skipped (as the training data's counts) and their
    buckets. Pure."""
    held = held or ScanReport()
    out = {"items": n_items, "usable": len({u.item for u in held_out.units}),
           "missingCaption": held.missing_caption, "emptyCaptionUsed": held.empty_caption_used,
           "unreadable": len(held.skipped)}
    if held.skipped:
        out["skipped"] = held.by_reason()
    return {**out, "buckets": bk.summary(held_out, n_items, names)}


def drop_reason(item, meta, why: str, cfg: bk.BucketConfig, fps) -> str:
    longest = [b for b in cfg.frame_buckets if b > 1]
    if why == "tooShort":
        return (f"{item.image.name}: video is too short: {meta[2]} frames at the model's {fps:g} fps; the shortest "
                f"video frame bucket is {min(longest)} (dataset.frameBuckets)")
    return (f"{item.image.name}: a video, but the only frame bucket is 1 (images): set dataset.frames or "
            f"dataset.frameBuckets to train videos")
