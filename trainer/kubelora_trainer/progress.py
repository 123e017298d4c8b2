"""Progress a person can follow (step, loss, samples/s, ETA) and a machine can read (JSON file)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

PROGRESS_FILE_ENV = "KUBELORA_PROGRESS_FILE"


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Progress:
    phase: str
    step: int = 0
    totalSteps: int = 0
    epoch: int = 0
    loss: Optional[float] = None
    samplesPerSecond: Optional[float] = None
    eta: Optional[str] = None


class Meter:
    """Rates from a moving window of steps (the first step pays warm-up costs and is excluded)."""

    def __init__(self, total_steps: int, samples_per_step: int):
        self.total, self.per_step = total_steps, samples_per_step
        self.times: list[tuple[int, float]] = []

    def update(self, step: int, now: Optional[float] = None) -> tuple[Optional[float], Optional[float]]:
        self.times.append((step, time.perf_counter() if now is None else now))
        self.times = self.times[-50:]
        if len(self.times) < 2:
            return None, None
        (s0, t0), (s1, t1) = self.times[0], self.times[-1]
        sec_per_step = (t1 - t0) / max(s1 - s0, 1)
        return self.per_step / sec_per_step if sec_per_step > 0 else None, sec_per_step * (self.total - step)


def line(p: Progress, lr: float) -> str:
    parts = [f"step {p.step}/{p.totalSteps}", f"epoch {p.epoch}",
             f"loss {p.loss:.4f}" if p.loss is not None else "loss ?", f"lr {lr:.2e}",
             f"{p.samplesPerSecond:.2f} samples/s" if p.samplesPerSecond else "- samples/s", f"eta {p.eta or '?'}"]
    return "[train] " + " | ".join(parts)


def publish(p: Progress) -> None:
    """Write the latest progress atomically where the pod's status reporter can read it."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(asdict(p)))
    os.replace(tmp, path)
