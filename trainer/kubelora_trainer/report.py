"""report.html: one self-contained page a person opens in a browser (no script, no CDN): the
loss and learning-rate curves as inline SVG, the samples as a grid of prompts by step (relative
links to the sample files beside it), the dataset summary, the resolved spec and the artifacts
with their sha256. Pure: data in, HTML string out."""
from __future__ import annotations

import json
import math
from html import escape
from typing import Optional

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
.grid img{display:block;max-width:256px;image-rendering:pixelated;min-width:96px}
.grid td{text-align:center}.muted{color:#777}pre{background:#f6f6f6;padding:1rem;overflow:auto}
svg{background:#fafafa;border:1px solid #ddd}
"""


def polyline(points: list[tuple[float, float]], width: int = 640, height: int = 220, pad: int = 36) -> tuple[str, tuple]:
    """SVG polyline points (x right, y up) scaled into the box; returns (points attribute, (xmin, xmax, ymin, ymax))."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 2 * pad) / ((x1 - x0) or 1)
    sy = (height - 2 * pad) / ((y1 - y0) or 1)
    pts = " ".join(f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}" for x, y in points)
    return pts, (x0, x1, y0, y1)


def curve_svg(points: list[tuple[float, float]], label: str, css_id: str, color: str = "#1f6feb",
              second: Optional[tuple[list[tuple[float, float]], str, str]] = None) -> str:
    """A line chart with its axes' ranges written at the corners; an empty note without points.
    second: (points, label, color) of another series drawn on the same axes, its points marked
    (the held-out evaluation loss beside the training loss)."""
    if not points:
        return f'<p class="muted" id="{css_id}">no {escape(label)} yet</p>'
    w, h = 640, 220
    other = [p for p in (second[0] if second else []) if math.isfinite(p[1])]   # NaN and inf left out
    pts, (x0, x1, y0, y1) = polyline(points + other, w, h)
    mine = " ".join(pts.split()[:len(points)])
    extra = ""
    if other:
        opts = pts.split()[len(points):]
        extra = (f'<text x="{w // 2}" y="16" font-size="12" fill="{second[2]}">{escape(second[1])}</text>'
                 f'<polyline class="second" fill="none" stroke="{second[2]}" stroke-width="1.5" points="{" ".join(opts)}"/>'
                 + "".join(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" fill="{second[2]}"/>'
                           for p in opts))
    return (f'<svg id="{css_id}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="{escape(label)}">'
            f'<text x="8" y="16" font-size="12">{escape(label)}</text>'
            f'<text x="8" y="40" font-size="10">{y1:.4g}</text><text x="8" y="{h - 40}" font-size="10">{y0:.4g}</text>'
            f'<text x="36" y="{h - 8}" font-size="10">step {x0:g}</text>'
            f'<text x="{w - 90}" y="{h - 8}" font-size="10">step {x1:g}</text>'
            f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{mine}"/>{extra}</svg>')


def sample_grid(prompts: list[dict], samples: list[dict]) -> str:
    """Rows: prompts; columns: sample steps. Each cell an <img> (a video's preview links to its mp4).
    A sample is labelled with the settings it was made with (its record's, samples.SETTINGS): one
    made before spec.samples changed across a resume gets a row of its own, not the new prompt's."""
    if not samples:
        return '<p class="muted">no samples (spec.samples unset, or none made yet)</p>'
    steps = sorted({s["step"] for s in samples})
    head = "".join(f"<th>step {st}</th>" for st in steps)
    current = {p["index"]: p for p in prompts}

    def label(p: dict) -> tuple:
        return tuple(p.get(k) for k in ("prompt", "seed", "width", "height", "frames", "guidance", "steps"))
    rows: dict[tuple, tuple[dict, dict]] = {}
    for p in prompts:
        rows[(p["index"], label(p))] = (p, {})
    for s in samples:
        p = s.get("settings") or current.get(s["prompt"]) or {"prompt": f"prompt {s['prompt']} (no longer listed)"}
        rows.setdefault((s["prompt"], label(p)), (p, {}))[1][s["step"]] = s
    out = []
    # by prompt, then by when each setting was first sampled (a prompt not sampled yet last)
    for (_, _), (p, by_step) in sorted(rows.items(), key=lambda kv: (kv[0][0], min(kv[1][1], default=math.inf))):
        cells = []
        for st in steps:
            s = by_step.get(st)
            if s is None:
                cells.append('<td class="muted">-</td>')
                continue
            img = f'<img src="{escape(s.get("preview") or s["file"])}" alt="step {st}: {escape(str(p["prompt"]))}">'
            cells.append(f'<td><a href="{escape(s["file"])}">{img}</a></td>')
        what = escape(str(p["prompt"]))
        if p.get("seed") is not None:
            what += (f'<br><span class="muted">seed {p["seed"]}, {p["width"]}x{p["height"]}'
                     f'{", " + str(p["frames"]) + " frames" if (p.get("frames") or 1) > 1 else ""}, '
                     f'guidance {p["guidance"]:g}, {p["steps"]} steps</span>')
        out.append(f"<tr><th>{what}</th>{''.join(cells)}</tr>")
    return f'<table class="grid"><tr><th>prompt</th>{head}</tr>{"".join(out)}</table>'


def table(rows: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in rows.items()) + "</table>"


def dataset_tables(dataset: dict) -> str:
    """The dataset's counts, then its buckets (buckets.summary) as a table of their own: one row
    per bucket with its samples and how much of them the crop cut away."""
    b = dataset.get("buckets") if isinstance(dataset.get("buckets"), dict) else None
    counts = {k: v for k, v in dataset.items() if k not in ("buckets", "evaluation")}
    held = dataset.get("evaluation")
    if isinstance(held, dict):   # evaluation.sources: counted apart, never trained on
        hb = held.get("buckets") or {}
        counts["evaluation (held out)"] = (f"{held.get('usable')} usable items of {held.get('items')}, "
                                           f"{hb.get('samples')} samples in {len(hb.get('buckets') or {})} bucket(s)")
    if b is None:
        return table(counts)
    counts.update({f"buckets: {k}": v for k, v in b.items() if k not in ("buckets", "droppedItems") and v != {}})
    rows = "".join(f"<tr><td>{escape(name)}</td><td>{x.get('samples', '')}</td><td>{x.get('cropped', '')}</td>"
                   f"<td>{100 * x.get('meanCrop', 0):.1f}%</td><td>{100 * x.get('maxCrop', 0):.1f}%</td></tr>"
                   for name, x in (b.get("buckets") or {}).items())
    dropped = "".join(f"<li>{escape(str(d))}</li>" for d in b.get("droppedItems") or [])
    return (table(counts) + "<table><tr><th>bucket (WxHxF)</th><th>samples</th><th>cropped</th><th>mean crop</th>"
            f"<th>max crop</th></tr>{rows}</table>" + (f"<p>dropped:</p><ul>{dropped}</ul>" if dropped else ""))


def artifacts_table(artifacts: list[dict]) -> str:
    if not artifacts:
        return '<p class="muted">none yet (the run is still training)</p>'
    rows = "".join(f'<tr><td><a href="{escape(a["file"])}">{escape(a["file"])}</a></td><td>{escape(a.get("format", ""))}</td>'
                   f'<td>{a.get("size", "")}</td><td><code>{escape(a.get("sha256", ""))}</code></td></tr>' for a in artifacts)
    return f"<table><tr><th>file</th><th>format</th><th>bytes</th><th>sha256</th></tr>{rows}</table>"


CURVE_POINTS = 2000  # per curve: a 3-day run's 260k steps drew 5.9 MB of points at every sample step


def downsample(values: list[float], n: int) -> list[list[float]]:
    """At most n [step, mean] points (values[i] belongs to step i + 1), each the mean over its
    window of steps, placed at the window's last step. Pure."""
    w = max(1, -(-len(values) // n))
    return [[i + len(values[i:i + w]), sum(values[i:i + w]) / len(values[i:i + w])] for i in range(0, len(values), w)]


def render(*, job: str, model_type: str, status: str, step: int, total_steps: int, losses: list[float],
           learning_rates: list[float], prompts: list[dict], samples: list[dict], dataset: dict, spec: dict,
           artifacts: list[dict], timings: Optional[dict] = None, evals: Optional[list[dict]] = None) -> str:
    """The page. losses[i] and learning_rates[i] belong to step i + 1; samples: {step, prompt
    (index), file, preview?} with paths relative to the report; evals: the held-out evaluations'
    records ({step, loss, ...}: evaluation.py), drawn beside the training loss."""
    loss_pts = [(x, v) for x, v in downsample(losses, CURVE_POINTS)]
    # one series: the newest evaluation's setup (its fingerprint); records of another setup (changed
    # across a resume) are of another scale, and joined to it they would draw a jump that is not there
    current = (evals or [{}])[-1].get("fingerprint")
    drawn = [r for r in evals or [] if r.get("fingerprint") == current]
    eval_pts = [(float(r["step"]), r["loss"]) for r in drawn]
    eval_label = "held-out evaluation loss" + (f" ({len(evals) - len(drawn)} earlier, of other evaluation settings, "
                                               f"not drawn)" if evals and len(drawn) < len(evals) else "")
    lr_pts = [(x, v) for x, v in downsample(learning_rates, CURVE_POINTS)]
    summary = {"job": job, "model": model_type, "status": status, "step": f"{step}/{total_steps}",
               **({"last loss": f"{losses[-1]:.4f}"} if losses else {}),
               **({"last evaluation loss": f"{evals[-1]['loss']:.4f} (step {evals[-1]['step']})"} if evals else {}),
               **(timings or {})}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kubelora report: {escape(job)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>kubelora report: {escape(job)}</h1>
{table(summary)}
<h2>Loss</h2>
{curve_svg(loss_pts, "training loss", "loss-curve",
           second=(eval_pts, eval_label, "#cf222e") if eval_pts else None)}
<h2>Learning rate</h2>
{curve_svg(lr_pts, "learning rate", "lr-curve", color="#d29922")}
<h2>Samples</h2>
{sample_grid(prompts, samples)}
<h2>Dataset</h2>
{dataset_tables(dataset)}
<h2>Artifacts</h2>
{artifacts_table(artifacts)}
<h2>Resolved spec</h2>
<pre>{escape(json.dumps(spec, indent=2))}</pre>
</body></html>
"""
