"""Prometheus metrics of a training run, served over HTTP by each node's local rank 0.

    KUBELORA_METRICS_PORT            port (default 9400; 0 turns metrics off)
    KUBELORA_METRICS_ADDR            address to bind (default 0.0.0.0; `kubelora run` on a
                                     workstation sets 127.0.0.1 unless it is set: LOCAL_ADDR)
    KUBELORA_METRICS_LINGER_SECONDS  after the run ends, keep serving until the final values have
                                     been scraped once, at most this long (default 0)
    KUBELORA_JOB_NAME, KUBELORA_NAMESPACE   the `ltj` and `namespace` labels (the operator sets both)

Rank 0 carries the job-level series (phase, step, loss, ...); every serving process carries its
own node's series (bytes moved to and from storage, seconds waiting for data, GPU memory). The
LoRATrainingJob is labelled `ltj`, never `job`: Prometheus owns `job` (the scrape job) and would
rename ours to `exported_job`. Serving never breaks training: a port in use is a warning (a plain
note that this run serves no metrics where the port is the default one, not set: a second
`kubelora run` on one workstation).

Torch-free at import (the operator imports `serve` from here); GPU memory reads torch lazily.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
import re
import socket
import socketserver
import threading
import time
from typing import Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.exposition import make_wsgi_app

from . import __version__

PORT_ENV = "KUBELORA_METRICS_PORT"
ADDR_ENV = "KUBELORA_METRICS_ADDR"
LINGER_ENV = "KUBELORA_METRICS_LINGER_SECONDS"
NAMESPACE_ENV = "KUBELORA_NAMESPACE"
DEFAULT_PORT = 9400
LOCAL_ADDR = "127.0.0.1"  # `kubelora run` (cli.launch): a workstation's metrics are not served to its network
PHASES = ("Initializing", "StagingIn", "Caching", "Training", "Exporting", "Succeeded", "Failed", "Stopped")
BUSY = ("sampling", "evaluation", "checkpoint")  # kubelora_trainer_busy{what}
LABELS = ("ltj", "namespace")

disable_created_metrics()  # no *_created series beside each counter: they only double what is scraped


# ---------------------------------------------------------------- HTTP

class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _ThreadingServer6(_ThreadingServer):
    """For an IPv6 address (`::` on an IPv6-only cluster, where the kubelet and Prometheus reach the
    pod by its IPv6 address): wsgiref's server binds IPv4 only."""
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no access log on stderr
        pass


class _Served:
    """The response body; wsgiref closes it after the last byte is written."""

    def __init__(self, body, done: Callable[[], None]):
        self.body, self.done = body, done

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        self.done()


class Server:
    """prometheus_client's WSGI app in a thread, numbering its requests and remembering the
    newest one whose response has been sent in full."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
        app = make_wsgi_app(registry)
        self.started = 0     # requests begun
        self.answered = 0    # the number of the newest request answered in full
        self._cond = threading.Condition()

        def counting(environ, start_response):
            with self._cond:
                self.started += 1
                seq = self.started
            return _Served(app(environ, start_response), lambda: self._answered(seq))

        server_class = _ThreadingServer6 if ":" in addr else _ThreadingServer
        self.httpd = make_server(addr, port, counting, server_class=server_class, handler_class=_QuietHandler)
        self.port = self.httpd.server_address[1]
        # a short poll, so stop() returns at once: a failed rank must exit before torchrun, seeing
        # a peer gone, sends it SIGTERM
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       name="kubelora-metrics", daemon=True)
        self.thread.start()

    def _answered(self, seq: int) -> None:
        with self._cond:
            self.answered = max(self.answered, seq)
            self._cond.notify_all()

    def wait_for_a_new_scrape(self, timeout: float) -> bool:
        """Wait until a request begun from now on has been answered (True), or timeout (False):
        what the registry holds now has then reached the scraper."""
        deadline = time.monotonic() + timeout
        with self._cond:
            begun = self.started
            while self.answered <= begun:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0", log=print,
          who: str = "training", port_set: bool = True) -> Optional[Server]:
    """Serve registry on port (0: off); None, with a warning, when it cannot bind. port_set: the
    port was chosen (an environment setting); the default port taken is only a note."""
    if not port:
        return None
    try:
        return Server(registry, port, addr)
    except OSError as e:
        log(unserved_line(addr, port, e, who, port_set))
        return None


def unserved_line(addr: str, port: int, error: OSError, who: str = "training", port_set: bool = True) -> str:
    """The one line that says metrics are not served. The default port in use (most often by another
    local run) is said plainly, with the setting that serves them elsewhere; anything else (a port
    that was set, an address that cannot be bound) is a warning. Pure."""
    if not port_set and error.errno == errno.EADDRINUSE:
        return (f"[metrics] off for this run: {addr}:{port} is in use (another kubelora run?); "
                f"set {PORT_ENV} to another port to serve them")
    return f"[metrics] warning: cannot serve metrics on {addr}:{port} ({error}); {who} goes on without them"


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name registry can expose, labelled children or not (counters end in _total,
    histograms have _bucket, _sum and _count): what dashboards and alerts may name."""
    out = set()
    for metric in registry.collect():
        if metric.type == "counter":
            out.add(metric.name + "_total")
        elif metric.type == "histogram":
            out |= {metric.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            out.add(metric.name)
    return out


def snake(name: str) -> str:
    """A camelCase reason as a label value: captionNotUtf8 -> caption_not_utf8."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def port_from_env() -> int:
    raw = os.environ.get(PORT_ENV, "").strip()
    try:
        return int(raw) if raw else DEFAULT_PORT
    except ValueError:
        print(f"[metrics] warning: {PORT_ENV}={raw!r} is not a port; metrics are off", flush=True)
        return 0


# ---------------------------------------------------------------- the series

class TrainerMetrics:
    """The trainer's registry; every update method is cheap (no I/O, no device sync)."""

    def __init__(self, ltj: str, namespace: str = "", main: bool = True, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        self.main = main
        self.labels = (ltj, namespace)
        r, L = self.registry, LABELS

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, (*L, *extra), registry=r)

        def counter(name, doc, extra=()):
            return Counter(name, doc, (*L, *extra), registry=r)

        self._info = gauge("kubelora_trainer_info", "Constant 1; the run's model type, world size and kubelora version",
                           ("model_type", "world_size", "version"))
        self._phase = gauge("kubelora_trainer_phase", "1 for the run's current phase, 0 for the others", ("phase",))
        self._step = gauge("kubelora_trainer_step", "Last optimizer step finished")
        self._total = gauge("kubelora_trainer_total_steps", "training.steps of the run")
        self._epoch = gauge("kubelora_trainer_epoch", "Epoch (from 1) of the last step")
        self._loss = gauge("kubelora_trainer_loss", "Loss of the last step, mean over all ranks")
        self._eval = gauge("kubelora_trainer_eval_loss", "Held-out evaluation loss (spec.evaluation) of the last "
                           "evaluation: quantile=\"mean\" is their mean, the others each timestep quantile's",
                           ("quantile",))
        self._eval_step = gauge("kubelora_trainer_eval_step", "Step of the last evaluation (0: the base model)")
        self._eval_seconds = gauge("kubelora_trainer_eval_seconds", "Seconds the last evaluation took")
        self._lr = gauge("kubelora_trainer_learning_rate", "Learning rate the last step used (first parameter group)")
        self._grad = gauge("kubelora_trainer_grad_norm", "Total L2 norm of the adapters' gradients in the last step, before clipping")
        self._sps = gauge("kubelora_trainer_samples_per_second", "Training samples per second, over the last 50 steps")
        self._tps = gauge("kubelora_trainer_tokens_per_second",
                          "Denoiser tokens per second over all ranks (samples/s x tokens per sample)")
        self._mfu = gauge("kubelora_trainer_mfu_ratio", "Model FLOPs utilisation (dense 4N or 6N FLOPs per token, "
                                                       "attention not counted) over all GPUs' bf16 peak")
        self._samples = counter("kubelora_trainer_samples", "Training samples processed, over all ranks")
        self._eta = gauge("kubelora_trainer_eta_seconds", "Estimated seconds until the last step")
        self._last_step_time = gauge("kubelora_trainer_last_step_timestamp_seconds", "Unix time the last step finished")
        self._busy = gauge("kubelora_trainer_busy", "1 while the trainer is between steps in this work "
                                                    "(sampling, evaluation, checkpoint)", ("what",))
        self._resumed = gauge("kubelora_trainer_resumed_from_step", "Checkpoint step this run resumed from (0: started fresh)")
        self._restarts = gauge("kubelora_trainer_restarts", "torchrun restarts of this process group (TORCHELASTIC_RESTART_COUNT)")
        self._ckpt_step = gauge("kubelora_trainer_last_checkpoint_step", "Step of the newest checkpoint this run wrote")
        self._ckpt_time = gauge("kubelora_trainer_last_checkpoint_timestamp_seconds",
                                "Unix time of the newest checkpoint this run wrote (age: time() - this)")
        self._usable = gauge("kubelora_trainer_dataset_usable_items", "Dataset items trained on")
        self._skipped = gauge("kubelora_trainer_dataset_skipped_items", "Dataset items skipped, by reason", ("reason",))
        # one series per bucket of the run (at most the spec's buckets: resolutions x aspect ratios x frame buckets)
        self._bucket = gauge("kubelora_trainer_bucket_samples", "Samples (item, clip) per bucket, WxHxF", ("bucket",))
        self._bucket_cropped = gauge("kubelora_trainer_bucket_cropped_samples",
                                     "Samples of the bucket that lost part of their picture to the crop", ("bucket",))
        self._bucket_crop = gauge("kubelora_trainer_bucket_mean_crop_ratio",
                                  "Mean share of the picture cropped away in the bucket (0..1)", ("bucket",))
        self._bucket_dropped = gauge("kubelora_trainer_bucket_dropped_items",
                                     "Items without a bucket, by why (too_short, no_video_bucket)", ("reason",))
        # this node's own series
        self._wait = counter("kubelora_trainer_data_wait_seconds", "Seconds the training loop waited for its batches")
        self._down = counter("kubelora_trainer_storage_downloaded_bytes", "Bytes downloaded from storage by this node")
        self._up = counter("kubelora_trainer_storage_uploaded_bytes", "Bytes uploaded to storage by this node")
        self._gpu = gauge("kubelora_trainer_gpu_memory_bytes", "GPU memory of this node's local rank 0 (torch's allocator)",
                          ("kind",))
        # the counters exist (at 0) from the start, so rate() and increase() see them begin
        for c in (self._wait, self._down, self._up):
            c.labels(*self.labels)
        if main:
            self._samples.labels(*self.labels)
            self._restarts.labels(*self.labels).set(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
            self._resumed.labels(*self.labels).set(0)
            self.busy(None)

    # -- job-level (rank 0)
    def start(self, model_type: str, world: int, total_steps: int) -> None:
        if self.main:
            self._info.labels(*self.labels, model_type, str(world), __version__).set(1)
            self._total.labels(*self.labels).set(total_steps)
            self.phase("Initializing")

    def phase(self, name: str) -> None:
        if self.main:
            for p in PHASES:
                self._phase.labels(*self.labels, p).set(1 if p == name else 0)
            if name == "Training":  # no step yet counts from here (a hang before the first step alerts)
                self._last_step_time.labels(*self.labels).set(time.time())

    def busy(self, what: Optional[str]) -> None:
        """Between steps, in `what` (sampling, evaluation, checkpoint: minutes on a large model), or
        back to steps (None): KubeloraTrainingNoProgress leaves those pauses out."""
        if self.main:
            for w in BUSY:
                self._busy.labels(*self.labels, w).set(1 if w == what else 0)

    def dataset(self, usable: int, skipped: dict[str, int]) -> None:
        if self.main:
            self._usable.labels(*self.labels).set(usable)
            for reason, n in skipped.items():
                self._skipped.labels(*self.labels, reason).set(n)

    def buckets(self, summary: dict) -> None:
        """The bucket summary (buckets.summary); a layout made again replaces the previous one."""
        if not self.main:
            return
        for g in (self._bucket, self._bucket_cropped, self._bucket_crop, self._bucket_dropped):
            g.clear()
        for name, b in summary["buckets"].items():
            self._bucket.labels(*self.labels, name).set(b["samples"])
            self._bucket_cropped.labels(*self.labels, name).set(b["cropped"])
            self._bucket_crop.labels(*self.labels, name).set(b["meanCrop"])
        for why, n in summary["dropped"].items():
            self._bucket_dropped.labels(*self.labels, snake(why)).set(n)

    def resumed(self, step: int) -> None:
        if self.main:
            self._resumed.labels(*self.labels).set(step)

    def step(self, step: int, epoch: int, loss: float, lr: float, grad_norm: Optional[float], samples: int,
             samples_per_second: Optional[float], eta_seconds: Optional[float], data_wait: float) -> None:
        """Once per optimizer step, on every rank (non-main ranks only add their data wait)."""
        self._wait.labels(*self.labels).inc(data_wait)
        if not self.main:
            return
        lab = self.labels
        self._step.labels(*lab).set(step)
        self._epoch.labels(*lab).set(epoch)
        self._loss.labels(*lab).set(loss)
        self._lr.labels(*lab).set(lr)
        if grad_norm is not None:
            self._grad.labels(*lab).set(grad_norm)
        self._samples.labels(*lab).inc(samples)
        if samples_per_second is not None:
            self._sps.labels(*lab).set(samples_per_second)
        if eta_seconds is not None:
            self._eta.labels(*lab).set(max(0.0, eta_seconds))
        self._last_step_time.labels(*lab).set(time.time())

    def throughput(self, tokens_per_second: Optional[float], mfu: Optional[float]) -> None:
        if not self.main:
            return
        if tokens_per_second is not None:
            self._tps.labels(*self.labels).set(tokens_per_second)
        if mfu is not None:
            self._mfu.labels(*self.labels).set(mfu)

    def eval_loss(self, rec: dict) -> None:
        """An evaluation's record (evaluation.summarize): the mean and each quantile's loss."""
        if not self.main:
            return
        self._eval.labels(*self.labels, "mean").set(rec["loss"])
        for q, v in rec["quantiles"].items():
            self._eval.labels(*self.labels, q).set(v)
        self._eval_step.labels(*self.labels).set(rec["step"])
        self._eval_seconds.labels(*self.labels).set(rec["seconds"])

    def loss_not_finite(self) -> None:
        if self.main:
            self._loss.labels(*self.labels).set(float("nan"))

    def checkpoint(self, step: int) -> None:
        if self.main:
            self._ckpt_step.labels(*self.labels).set(step)
            self._ckpt_time.labels(*self.labels).set(time.time())

    # -- this node
    def transferred(self, direction: str, nbytes: int) -> None:
        (self._down if direction == "download" else self._up).labels(*self.labels).inc(nbytes)

    def gpu_memory(self, device) -> None:
        if getattr(device, "type", None) != "cuda":
            return
        import torch
        for kind, value in (("allocated", torch.cuda.memory_allocated(device)),
                            ("reserved", torch.cuda.memory_reserved(device)),
                            ("peak_allocated", torch.cuda.max_memory_allocated(device))):
            self._gpu.labels(*self.labels, kind).set(value)

    def memory_plan(self, predicted_peak: int) -> None:
        """The memory plan's predicted peak (training.gradientCheckpointing unset), beside the
        allocator's measured one: kind="plan_predicted_peak"."""
        self._gpu.labels(*self.labels, "plan_predicted_peak").set(predicted_peak)

    def names(self) -> set[str]:
        return sample_names(self.registry)


def _noop(*_args, **_kwargs) -> None:
    return None


class Off:
    """A process that serves no metrics: every update does nothing. `enabled` says whether metrics
    are on for the run (then every rank computes the per-step values, e.g. the grad norm, whose
    computation can be a collective)."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    def __getattr__(self, name):
        return _noop


class Run:
    """A serving process: its metrics (TrainerMetrics' methods) and server."""

    enabled = True

    def __init__(self, metrics: TrainerMetrics, server: Optional[Server]):
        self.metrics, self.server = metrics, server

    def __getattr__(self, name):
        return getattr(self.metrics, name)

    def finish(self, linger: Optional[float] = None, hold: bool = True) -> None:
        """The run ended (the phase is final): serve until the end state has been scraped once, at
        most $KUBELORA_METRICS_LINGER_SECONDS, then stop serving."""
        from . import storage
        if self.metrics.transferred in storage.transfer_listeners:
            storage.transfer_listeners.remove(self.metrics.transferred)
        if self.server is None:
            return
        linger = float(os.environ.get(LINGER_ENV, "0") or 0) if linger is None else linger
        if linger > 0 and not hold:
            self.server.wait_for_a_new_scrape(linger)  # stopped by a signal: a second one still ends it
        elif linger > 0:
            # a failed run's other ranks exit at once and torchrun then SIGTERMs this one: it goes on
            # serving (the Failed phase, a NaN loss) until scraped; torchrun's SIGKILL comes only
            # after its shutdown timeout, the pod's grace period less a margin (launch.py)
            import signal
            try:
                previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            except ValueError:  # not the main thread
                previous = None
            try:
                self.server.wait_for_a_new_scrape(linger)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
        self.server.stop()


@contextmanager
def busy_in(m, what: str):
    """m.busy(what) for the block (m: a Run or an Off)."""
    m.busy(what)
    try:
        yield
    finally:
        m.busy(None)


def start(rank: int, local_rank: int, ltj: str, log=print):
    """The metrics of this process: served by each node's local rank 0 (rank 0 with the job-level
    series), off everywhere when the port is 0. Returns a Run or an Off (both with
    TrainerMetrics' update methods, `enabled` and `finish()`)."""
    port = port_from_env()
    if not port or local_rank != 0:
        return Off(enabled=bool(port))
    from . import storage
    m = TrainerMetrics(ltj, os.environ.get(NAMESPACE_ENV, ""), main=rank == 0)
    addr = os.environ.get(ADDR_ENV, "0.0.0.0")
    server = serve(m.registry, port, addr, log=log, port_set=bool(os.environ.get(PORT_ENV, "").strip()))
    storage.transfer_listeners.append(m.transferred)
    if server is not None:
        log(f"[metrics] serving on {addr}:{server.port}/metrics")
    return Run(m, server)
