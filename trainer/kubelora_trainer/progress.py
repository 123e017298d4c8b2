"""Progress a person can follow (step, loss, samples/s, ETA) and a machine can read (JSON file)."""
from __future__ import annotations

import json
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

PROGRESS_FILE_ENV = "KUBELORA_PROGRESS_FILE"
PROGRESS_INTERVAL_ENV = "KUBELORA_PROGRESS_INTERVAL"
PROGRESS_KEY = "status/progress.json"   # under spec.output.uri; the operator reads it

# Which run wrote an output: the operator sets it to the LoRATrainingJob's uid, the same for every
# attempt of that job (a preemption, a crash, a gang restart) and new for a job made again under
# the same name. Checkpoints (RUN_KEY in their fingerprint file), manifest.json and progress.json
# record it, so an attempt always resumes its own run's checkpoints and keeps its own finished
# result whatever output.onExisting says (overwrite and fail are about another run's output), and
# the operator never reports another run's progress. Unset (kubelora run, torchx): every start is a
# new run.
RUN_ID_ENV = "KUBELORA_RUN_ID"
RUN_KEY = "runId"


def run_id(environ=None) -> Optional[str]:
    """This run's identity (RUN_ID_ENV), or None."""
    return (os.environ if environ is None else environ).get(RUN_ID_ENV) or None


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
    tokensPerSecond: Optional[float] = None  # denoiser tokens (throughput.py), over all ranks
    mfu: Optional[float] = None              # model FLOPs utilisation on GPUs with a known peak
    eta: Optional[str] = None
    resumedFrom: Optional[int] = None   # the checkpoint step this run continued from
    gpuPeakGiB: Optional[float] = None  # the GPU memory peak so far (torch's allocator, rank 0)
    samples: Optional[int] = None       # sample files written so far (spec.samples)
    sampleStep: Optional[int] = None    # the last step that sampled
    evalLoss: Optional[float] = None    # the last held-out evaluation loss (spec.evaluation)
    evalStep: Optional[int] = None      # the step it was evaluated after (0: the base model)


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
             f"{p.samplesPerSecond:.2f} samples/s" if p.samplesPerSecond else "- samples/s"]
    if p.tokensPerSecond:
        parts.append(f"{p.tokensPerSecond:,.0f} tokens/s")
    if p.mfu is not None:
        parts.append(f"MFU {100 * p.mfu:.1f}%")
    if p.gpuPeakGiB is not None:
        parts.append(f"peak {p.gpuPeakGiB:.1f} GiB")
    parts.append(f"eta {p.eta or '?'}")
    return "[train] " + " | ".join(parts)


_PUBLISHERS: "weakref.WeakSet[Publisher]" = weakref.WeakSet()


def flush_all(timeout: float = 30.0) -> None:
    """Every Publisher's last progress sent before the process ends (its upload thread is a daemon)."""
    for publisher in list(_PUBLISHERS):
        publisher.flush(timeout)


class Publisher:
    """Rank 0's progress, best effort: to a local file ($KUBELORA_PROGRESS_FILE) on every call,
    and to <output>/status/progress.json (where the operator reads it) when the phase changes or
    every $KUBELORA_PROGRESS_INTERVAL seconds (default 30). The upload runs in a thread of its own,
    the newest progress only, so a slow or hanging store never holds the step loop (and with it
    every other rank in its next collective); wait=True (the run's last word) waits for it. A
    failed upload is logged, never fatal."""

    def __init__(self, output_uri: Optional[str] = None, settings=None):
        self.output_uri, self.settings = output_uri, settings
        self.interval = float(os.environ.get(PROGRESS_INTERVAL_ENV, "30"))
        self.last_phase, self.last_upload, self.warned = None, 0.0, False
        self._lock = threading.Lock()
        self._pending: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        _PUBLISHERS.add(self)

    def __call__(self, p: Progress, force: bool = False, wait: bool = False) -> None:
        """force: sent now, whatever the interval; wait: and this call returns once it is stored
        (the run's last word: the process may end right after)."""
        data = json.dumps({**asdict(p), **({RUN_KEY: run} if (run := run_id()) else {})})
        path = os.environ.get(PROGRESS_FILE_ENV)
        if path:
            tmp = Path(f"{path}.tmp")
            tmp.write_text(data)
            os.replace(tmp, path)
        due = force or p.phase != self.last_phase or time.monotonic() - self.last_upload >= self.interval
        if self.output_uri and due:
            self.last_phase, self.last_upload = p.phase, time.monotonic()
            self._submit(data, wait=wait)

    def _submit(self, data: str, wait: bool) -> None:
        with self._lock:
            self._pending = data  # a newer progress replaces one not sent yet
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="kubelora-progress", daemon=True)
                self._thread.start()
            thread = self._thread
        if wait:
            thread.join()

    def flush(self, timeout: float) -> None:
        """Wait up to timeout seconds for the upload under way or pending (the run ends)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _drain(self) -> None:
        while True:
            with self._lock:
                data, self._pending = self._pending, None
                if data is None:
                    self._thread = None  # in the same hold as the look: a newer one starts its own thread
                    return
            try:
                self._upload(data)
            except BaseException:  # what _upload does not catch: the next call starts a thread
                with self._lock:
                    self._thread = None
                raise

    def _upload(self, data: str) -> None:
        import tempfile
        from . import storage
        f = None
        try:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                f.write(data)
            dest = storage.parse_uri(self.output_uri).child(PROGRESS_KEY)
            storage.upload(f.name, str(dest), self.settings or storage.S3Settings(), content_type="application/json")
        except Exception as e:  # noqa: BLE001 - progress is advisory
            if not self.warned:
                print(f"[progress] could not publish progress to {self.output_uri}: {e}", flush=True)
                self.warned = True
        finally:
            if f is not None:
                os.unlink(f.name)
