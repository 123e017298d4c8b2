"""Samples during training (spec.samples) and the run's report.html.

The family's diffusers pipeline runs around the very denoiser being trained (its LoRA layers
active, no copy of any weight), with prompt embeddings computed once while the text encoders were
loaded (SDXL, whose text encoders train too: token ids, embedded through the trained encoders at
each sample step) and the VAE kept for decoding (family.sampling_kit / family.sample). The prompts
are split over ranks (sample_plan.assign; under FSDP2 so that every rank runs the same forwards).
With spec.samples unset, setup() returns None: no embeddings, no VAE kept, no pipeline built.

Files: output.uri/samples/step-N/prompt-I.png (images) or .mp4 plus an animated .webp preview
(videos); report.html beside the LoRA, refreshed at every sample step (uploaded in the background:
the other ranks train on meanwhile) and at the end.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import dist, metrics, report, storage
from .families import RULES
from .sample_plan import assign, due, is_video, preview_path, resolve, sample_path
from .spec import dump_spec

REPORT_NAME = "report.html"


class Newest:
    """Runs jobs one at a time, in order, in a background thread, keeping only the newest job not
    started yet: a job submitted while another runs replaces the one waiting (a report uploaded
    mid-run is superseded by the next one, and an older one must never land after a newer one)."""

    def __init__(self, name: str):
        self.name = name
        self._cond = threading.Condition()
        self._next = None
        self._running = False

    def submit(self, job) -> None:
        with self._cond:
            self._next = job
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, daemon=True, name=self.name).start()

    def wait(self, drop: bool = True) -> None:
        """Until no job runs; drop: the job waiting is not run (a newer one follows)."""
        with self._cond:
            if drop:
                self._next = None
            self._cond.wait_for(lambda: not self._running)

    def _work(self) -> None:
        while True:
            with self._cond:
                job, self._next = self._next, None
                if job is None:
                    self._running = False
                    self._cond.notify_all()
                    return
            try:
                job()
            except Exception as e:  # noqa: BLE001 - a job reports its own failures; this is a bug's last word
                print(f"[samples] warning: {self.name}: {type(e).__name__}: {e}", flush=True)


def report_said(output_uri: str) -> str:
    """Where a run's report.html is and how to open it, for the [done] line. Pure."""
    loc = storage.parse_uri(output_uri)
    where = loc.child(REPORT_NAME)
    if not loc.is_s3:
        return f"report {where} (open it in a browser)"
    return f"report {where} (`kubelora report {output_uri.rstrip('/')}` fetches it with the samples to open)"


def to_uint8(x) -> np.ndarray:
    """Pipeline output in [0, 1] -> uint8 (as diffusers' numpy_to_pil rounds)."""
    return (np.asarray(x, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)


def write_sample(arr: np.ndarray, path: Path, fps: Optional[float]) -> list[Path]:
    """A PNG for an image [H, W, 3]; an H.264 MP4 and an animated WebP preview for a clip [F, H, W, 3]."""
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 3:
        Image.fromarray(arr).save(path)
        return [path]
    from .synthetic import write_video
    write_video(path, list(arr), fps=int(round(fps or 24)), codec="libx264")
    preview = path.with_suffix(".webp")
    frames = [Image.fromarray(f) for f in arr]
    frames[0].save(preview, save_all=True, append_images=frames[1:], duration=int(1000 / (fps or 24)), loop=0,
                   lossless=True)
    return [path, preview]


@dataclass
class Sampler:
    spec: object
    family: object
    kit: dict
    prompts: list[dict]
    job: str
    settings: storage.S3Settings
    stats: dict
    local: Path
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)
    restored: Optional[list[dict]] = None   # earlier attempts' records (the checkpoint's loop state)
    _client: object = None
    _first: bool = True
    _reports: Newest = field(default_factory=lambda: Newest("report-upload"))

    def _upload(self, path: Path, key: str) -> dict:
        out = storage.parse_uri(self.spec.output.uri)
        if out.is_s3 and self._client is None:
            self._client = storage.make_client(self.settings)
        ctype = {".png": "image/png", ".mp4": "video/mp4", ".webp": "image/webp", ".html": "text/html"}.get(path.suffix)
        return storage.upload(path, str(out.child(key)), self.settings, self._client,
                              content_type=ctype or "application/octet-stream")

    def _write(self, step: int, prompt: dict, out) -> dict:
        video = is_video(self.spec.model.type)
        key = sample_path(step, prompt["index"], video)
        files = write_sample(to_uint8(out), self.local / key, RULES[self.spec.model.type].fps)
        rec = {"step": step, "prompt": prompt["index"], "file": key, **self._upload(files[0], key),
               "settings": {k: prompt[k] for k in SETTINGS if k in prompt}}  # what it was made with
        if video:
            self._upload(files[1], preview_path(key))
            rec["preview"] = preview_path(key)
        return rec

    def listed(self, before: int) -> None:
        """Once, on the first call: the records of the sample steps before `before`, as written (a
        resumed run's, also one resumed after its last step to export again, which samples nothing):
        the checkpoint's own records where it kept them (the samples made, with the settings they
        were made with, whatever spec.samples says now), else those the spec would have made."""
        if self._first:
            self._first = False
            if self.restored is not None:
                self.records += [r for r in self.restored if r.get("step", before) < before]
                return
            video = is_video(self.spec.model.type)
            self.records += [{"step": s, "prompt": p["index"], "file": sample_path(s, p["index"], video),
                              **({"preview": preview_path(sample_path(s, p["index"], video))} if video else {})}
                             for s in range(before) if due(s, self.spec.samples, self.spec.training.steps)
                             for p in self.prompts]

    def maybe(self, step: int, tr, prog=None) -> None:
        """Sample if `step` is a sample step (0: before the first). Every rank calls it, at every
        step from the first it trains (a resumed run lists the earlier steps' samples as written)."""
        self.listed(step)
        if not due(step, self.spec.samples, self.spec.training.steps):
            return
        with metrics.busy_in(tr.metrics, "sampling"):
            self._sample(step, tr, prog)

    def _sample(self, step: int, tr, prog) -> None:
        t0 = time.perf_counter()
        env = tr.env
        sharded = tr.adapters.sync.sharding == "shard"
        mine = assign(self.prompts, env.world, env.rank, sharded)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if env.device.type == "cuda" else None
        modules = list(tr.comps.trainable.values())
        for m in modules:
            m.eval()  # no LoRA dropout
        err, recs, outs = None, [], []

        def forwards() -> None:
            # eagerly under torch.compile: the compiled blocks never see sampling's shapes or no_grad, so
            # they neither recompile for it nor mark a dimension dynamic for training's next step
            with tr.adapters.compute(), torch.compiler.set_stance("force_eager"):
                for i, keep in mine:
                    p = self.prompts[i]
                    out = self.family.sample(self.kit, tr.comps, p, torch.Generator().manual_seed(p["seed"]))
                    if keep:
                        outs.append((p, out))
        try:
            err = dist.caught(forwards, dist.weights_sharded(env.world, tr.adapters), f"sampling at step {step}")
        finally:
            for m in modules:
                m.train()
            torch.set_rng_state(rng)  # sampling draws nothing the training would have drawn
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng)
        # written after every forward: under FSDP2 each forward is a collective, so a rank whose write
        # failed mid-loop would leave its peers waiting in the next one
        try:
            recs = [self._write(step, p, out) for p, out in outs] if err is None else []
        except storage.StorageError as e:
            err = e
        except Exception as e:  # noqa: BLE001 - agreed on below
            err = RuntimeError(f"sampling at step {step}: writing the samples: {type(e).__name__}: {e}")
        dist.fail_together(err, f"sampling at step {step}")
        if env.world > 1:
            recs = [r for part in dist.all_gather(recs) for r in part]
        self.records += sorted(recs, key=lambda r: r["prompt"])
        self.seconds += time.perf_counter() - t0
        if env.is_main:
            print(f"[samples] step {step}: {len(recs)} sample(s) in {time.perf_counter() - t0:.1f} s "
                  f"(sampling so far {self.seconds:.1f} s)", flush=True)
            self.report_soon(step, tr.state.losses, tr.state.evals)
            if prog is not None and tr.publish is not None:
                prog.samples, prog.sampleStep = len(self.records), step
                tr.publish(prog, force=True)

    def report_soon(self, step: int, losses: list[float], evals: Optional[list[dict]] = None) -> None:
        """Rank 0, mid-run: report.html as it stands now, uploaded in the background, so rank 0
        trains on at once instead of keeping every rank waiting at the next collective while the
        store is slow (each request is retried for minutes). Best effort: a failure is a warning,
        and the next sample step, and the end, write it again."""
        html = self._render("Training", step, losses, [], evals)

        def upload() -> None:
            try:
                write_and_upload(html, self.local, self._upload)
            except (storage.StorageError, OSError) as e:
                print(f"[samples] warning: report.html not updated at step {step}: {e}", flush=True)
        self._reports.submit(upload)

    def publish_report(self, status: str, step: int, losses: list[float], artifacts: list[dict],
                       evals: Optional[list[dict]] = None) -> dict:
        """Rank 0: write and upload report.html now, after any mid-run upload still under way (the
        waiting one is dropped: this one is newer); returns {uri, sha256, size}."""
        self._reports.wait(drop=True)
        return write_and_upload(self._render(status, step, losses, artifacts, evals), self.local, self._upload)

    def _render(self, status: str, step: int, losses: list[float], artifacts: list[dict],
                evals: Optional[list[dict]]) -> str:
        return render_report(self.spec, self.job, status, step, losses, self.prompts, self.records, self.stats,
                             artifacts, {"sampling seconds": f"{self.seconds:.1f}"}, evals)

    def summary(self) -> dict:
        return {"count": len(self.records), "seconds": round(self.seconds, 2), "prompts": self.prompts,
                "files": self.records}


# a sample's settings, kept in its record (report.sample_grid labels it with them)
SETTINGS = ("prompt", "negativePrompt", "seed", "width", "height", "frames", "guidance", "steps")


def guidance_unused(samples, guidance_embeds: Optional[bool]) -> Optional[str]:
    """The warning when samples set a guidance that a Flux transformer without a guidance
    embedding (guidance_embeds false: FLUX.1-schnell) cannot take; None otherwise. Pure."""
    places = [("samples", samples)] + [(f"samples.prompts[{i}]", p) for i, p in enumerate(samples.prompts)]
    set_guidance = [w + ".guidance" for w, p in places if p.guidance is not None]
    if not set_guidance or guidance_embeds is not False:
        return None
    return (f"[samples] warning: {', '.join(set_guidance)}: this transformer has no guidance embedding "
            "(guidance_embeds false, e.g. FLUX.1-schnell), so its samples take no guidance; the setting changes "
            "nothing: remove it")


def setup(spec, family, comps, job: str, settings, stats: dict, local: Path) -> Optional[Sampler]:
    """Before the encoders are freed: the sample prompts' embeddings and what decoding needs.
    None when spec.samples is unset (nothing is computed or kept)."""
    if spec.samples is None:
        return None
    if warning := guidance_unused(spec.samples, comps.info.get("guidance_embeds")):
        print(warning, flush=True)
    prompts = resolve(spec)
    return Sampler(spec, family, family.sampling_kit(comps, prompts), prompts, job, settings, stats, local)


def learning_rates(spec, n: int) -> list[float]:
    """The learning rate of steps 1..n (the denoiser's group), as the schedule gives it."""
    from .train import lr_lambda
    t = spec.training
    return [t.learningRate * lr_lambda(s, t.warmupSteps, t.steps, t.lrScheduler) for s in range(n)]


def render_report(spec, job, status, step, losses, prompts, records, stats, artifacts, timings,
                  evals: Optional[list[dict]] = None) -> str:
    return report.render(job=job, model_type=spec.model.type, status=status, step=step,
                         total_steps=spec.training.steps, losses=list(losses),
                         learning_rates=learning_rates(spec, len(losses)), prompts=prompts, samples=list(records),
                         dataset=stats, spec=dump_spec(spec), artifacts=artifacts, timings=timings, evals=evals)


def write_and_upload(html: str, local: Path, upload) -> dict:
    """report.html written under local and uploaded (upload(path, name)); {uri, sha256, size}."""
    path = local / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return upload(path, REPORT_NAME)


def final_report(spec, job, settings, sampler: Optional[Sampler], losses, stats, artifacts, local: Path,
                 evals: Optional[list[dict]] = None, earlier: Optional[list[dict]] = None) -> dict:
    """Rank 0, after the LoRA files are uploaded and before manifest.json: the finished report,
    and what manifest.json lists about samples and the report. earlier: the samples earlier
    attempts made (the checkpoint's records), shown when spec.samples has been removed since."""
    if sampler is not None:
        rep = sampler.publish_report("Succeeded", spec.training.steps, losses, artifacts, evals)
        return {"report": rep, "samples": sampler.summary()}
    out = storage.parse_uri(spec.output.uri)
    client = storage.make_client(settings) if out.is_s3 else None

    def up(path, key):
        return storage.upload(path, str(out.child(key)), settings, client, content_type="text/html")
    rep = write_and_upload(render_report(spec, job, "Succeeded", spec.training.steps, losses, [], list(earlier or []),
                                         stats, artifacts, None, evals), local, up)
    return {"report": rep}
