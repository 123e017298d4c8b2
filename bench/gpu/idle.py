"""Where a profiled step leaves the GPU idle, from the Chrome trace bench/gpu/lora_step.py writes
with PROFILE=1 ($OUT/trace_<model>_<mode>.json.gz): the gaps between GPU kernels (and copies), each
with the CPU ops that were running meanwhile, and the idle time summed by CPU op name. Runs on any
machine (it reads a file), so the GPU's time goes to measuring only.

    python bench/gpu/idle.py trace_flux_compile_nogc_fp8.json.gz [min_gap_us]
"""
from __future__ import annotations

import gzip
import json
import sys

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATS = ("cpu_op", "user_annotation", "python_function")


def busy_spans(events: list[dict]) -> list[tuple[float, float]]:
    """The GPU's busy intervals [start, end] in µs, overlapping kernels merged. Pure."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in GPU_CATS)
    merged: list[tuple[float, float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def gaps(events: list[dict], min_us: float = 20.0) -> list[dict]:
    """Idle intervals between the first and the last GPU activity, at least min_us long, each with
    the innermost CPU ops that overlap it the longest (their names and µs of overlap). Pure."""
    spans = busy_spans(events)
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in CPU_CATS]
    out = []
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start - end < min_us:
            continue
        overlap: dict[str, float] = {}
        for e in cpu:
            a, b = max(e["ts"], end), min(e["ts"] + e.get("dur", 0), start)
            if b > a:
                overlap[e["name"]] = overlap.get(e["name"], 0.0) + (b - a)
        top = sorted(overlap.items(), key=lambda kv: -kv[1])[:5]
        out.append({"at_us": round(end, 1), "idle_us": round(start - end, 1),
                    "cpu": [[n, round(us, 1)] for n, us in top]})
    return out


def summary(events: list[dict], min_us: float = 20.0) -> dict:
    """Busy and idle µs over the traced GPU window, the ten longest gaps, and the idle time by the
    CPU op overlapping each gap the longest. Pure."""
    spans = busy_spans(events)
    if not spans:
        return {"busy_us": 0.0, "idle_us": 0.0, "gaps": [], "idle_by_cpu_op": {}}
    busy = sum(b - a for a, b in spans)
    found = gaps(events, min_us)
    by_op: dict[str, float] = {}
    for g in found:
        name = g["cpu"][0][0] if g["cpu"] else "(no CPU op traced)"
        by_op[name] = by_op.get(name, 0.0) + g["idle_us"]
    return {"window_us": round(spans[-1][1] - spans[0][0], 1), "busy_us": round(busy, 1),
            "idle_us": round(spans[-1][1] - spans[0][0] - busy, 1), "gaps_over_min": len(found),
            "gaps": sorted(found, key=lambda g: -g["idle_us"])[:10],
            "idle_by_cpu_op": dict(sorted(((k, round(v, 1)) for k, v in by_op.items()), key=lambda kv: -kv[1])[:15])}


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        doc = json.load(f)
    return doc["traceEvents"] if isinstance(doc, dict) else doc


if __name__ == "__main__":
    print(json.dumps(summary(load(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 20.0), indent=1))
