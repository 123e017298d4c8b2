"""spec.samples end to end: a tiny Flux (2 replicated ranks: prompts split over them) and a tiny
LTX-Video (2 ranks sharded with FSDP2: prompts split over them too, every rank running the same
forwards) train from S3 (SeaweedFS) to S3 with 2 prompts sampled every 5 of 10 steps. The sample files are in the bucket under their names,
the LoRA changed them, the exported LoRA loaded into the diffusers pipeline reproduces the last
in-training sample, and report.html, fetched with `kubelora report`, renders in headless chromium
with its loss curve and every sample image. Plus the pure parts (spec rules, plan, report) and a
count showing sampling off builds and keeps nothing."""
from __future__ import annotations

import gc
import json
import os
import re
import weakref
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from browser import render_report
from conftest import run_trainer
from kubelora_trainer import report, sample_plan, samples
from kubelora_trainer.spec import SpecError, parse_spec

PROMPTS = [{"prompt": "a blue square on a white background"}, {"prompt": "a red square", "seed": 3}]
STEPS = 10
SAMPLE_STEPS = [0, 5, 10]


# ---------------------------------------------------------------- pure parts

def _spec(model, samples_spec, dataset=None):
    return parse_spec({"model": model, "dataset": {"uri": "s3://data/x", **(dataset or {})},
                       "output": {"uri": "s3://out/x"}, "training": {"steps": STEPS}, "samples": samples_spec})


FLUX = {"type": "flux", "diffusersPath": "s3://models/flux"}
LTX = {"type": "ltx-video", "diffusersPath": "s3://models/ltx"}


@pytest.mark.parametrize("model,samples_spec,expect", [
    (FLUX, {"prompts": [{"prompt": "x", "negativePrompt": "y"}]}, "samples.prompts[0].negativePrompt: flux samples"),
    (FLUX, {"prompts": [{"prompt": "x"}], "frames": 9}, "samples.frames: flux is an image model"),
    (LTX, {"prompts": [{"prompt": "x"}, {"prompt": "y", "frames": 8}]},
     "samples.prompts[1].frames: ltx-video needs 8k+1 frames"),
    (LTX, {"prompts": [{"prompt": "x", "width": 48, "height": 32}]},
     "samples.prompts[0]: ltx-video samples need width and height divisible by 32; got 48x32"),
    (FLUX, {"prompts": [{"prompt": "x", "width": 64}]}, "samples.prompts[0].width and samples.prompts[0].height go together"),
    (FLUX, {"prompts": [{"prompt": "x"}], "atStart": False, "atEnd": False}, "samples: no step would sample"),
    (FLUX, {"prompts": [{"prompt": "x"}], "everySteps": STEPS + 1, "atStart": False, "atEnd": False},
     f"samples.everySteps: {STEPS + 1} is more than training.steps ({STEPS})"),
    ({**FLUX, "bypassGuidanceEmbedding": True}, {"prompts": [{"prompt": "x", "guidance": 3.5}]},
     "samples.prompts[0].guidance: model.bypassGuidanceEmbedding leaves the guidance embedding out"),
    # classifier-free guidance runs only above 1: a negative prompt (its own or samples') would do nothing
    (LTX, {"prompts": [{"prompt": "x"}, {"prompt": "y", "guidance": 1.0, "negativePrompt": "blur"}]},
     "samples.prompts[1].negativePrompt: its guidance is 1 or less"),
    (LTX, {"prompts": [{"prompt": "x"}], "guidance": 1.0, "negativePrompt": "blur"},
     "samples.negativePrompt: no prompt that takes it samples with guidance above 1"),
])
def test_spec_refuses_what_a_family_cannot_sample(model, samples_spec, expect):
    with pytest.raises(SpecError) as e:
        _spec(model, samples_spec)
    assert expect in str(e.value)


def test_resolved_prompts_schedule_and_rank_split():
    spec = _spec(LTX, {"prompts": [{"prompt": "a", "frames": 17, "guidance": 1.0}, {"prompt": "b", "seed": 7}],
                       "everySteps": 4, "steps": 8, "negativePrompt": "blur", "seed": 2},
                 dataset={"resolution": 64, "frames": 9})
    a, b = sample_plan.resolve(spec)
    assert a == {"index": 0, "prompt": "a", "negativePrompt": "blur", "seed": 2, "width": 64, "height": 64,
                 "frames": 17, "guidance": 1.0, "steps": 8}
    assert (b["seed"], b["frames"], b["guidance"]) == (7, 9, 3.0)   # the dataset's frames, LTX's guidance
    unset = _spec(LTX, {"prompts": [{"prompt": "a"}, {"prompt": "b", "negativePrompt": ""}]})
    # unset: the family's default (cosmos: its pipeline's long one); "": an empty one, as written
    assert [p["negativePrompt"] for p in sample_plan.resolve(unset)] == [None, ""]
    assert sample_plan.sample_steps(spec.samples, STEPS) == [0, 4, 8, 10]
    flux = _spec(FLUX, {"prompts": [{"prompt": "a"}], "atStart": False, "atEnd": False, "everySteps": 5})
    assert sample_plan.sample_steps(flux.samples, STEPS) == [5, 10]
    assert sample_plan.resolve(flux)[0]["frames"] == 1 and sample_plan.resolve(flux)[0]["guidance"] == 3.5
    assert sorted(sample_plan.sampling_families()) == sorted(sample_plan.RULES)   # every family samples


def test_prompts_split_over_ranks_and_sharded_ranks_run_alike_forwards():
    """Replicated: round-robin. Sharded (FSDP2): every rank runs the same sequence of forward
    groups (steps, classifier-free guidance on/off), padding a group's last round with a discarded
    repeat; together the ranks keep every prompt exactly once."""
    ps = [{"index": i, "steps": s, "guidance": g} for i, (s, g) in enumerate([(4, 3.0), (4, 3.0), (4, 3.0), (8, 3.0),
                                                                            (4, 1.0)])]
    assert sample_plan.assign(ps, 2, 1, sharded=False) == [(1, True), (3, True)]
    assert sample_plan.assign(ps, 1, 0, sharded=True) == [(i, True) for i in range(5)]
    for world in (2, 3, 4, 7):
        plans = [sample_plan.assign(ps, world, r, sharded=True) for r in range(world)]
        groups = [[sample_plan.forward_group(ps[i]) for i, _ in plan] for plan in plans]
        assert all(g == groups[0] for g in groups), (world, plans)
        assert sorted(i for plan in plans for i, keep in plan if keep) == list(range(5))
    assert sample_plan.assign(ps, 2, 0, sharded=True) == [(0, True), (2, True), (3, True), (4, True)]
    assert sample_plan.assign(ps, 2, 1, sharded=True) == [(1, True), (0, False), (3, False), (4, False)]
    assert sample_plan.sample_path(5, 1, video=True) == "samples/step-5/prompt-1.mp4"
    assert sample_plan.preview_path("samples/step-5/prompt-1.mp4") == "samples/step-5/prompt-1.webp"


def test_report_is_self_contained_and_escapes():
    prompts = [{"index": 0, "prompt": "<b>x</b>", "seed": 0, "width": 32, "height": 32, "frames": 1, "guidance": 3.5,
                "steps": 4}]
    html = report.render(job="j", model_type="flux", status="Training", step=2, total_steps=4, losses=[1.0, 0.5],
                         learning_rates=[1e-4, 1e-4], prompts=prompts,
                         samples=[{"step": 0, "prompt": 0, "file": "samples/step-0/prompt-0.png"}],
                         dataset={"usable": 1}, spec={"a": "<s>"}, artifacts=[])
    assert 'id="loss-curve"' in html and "<polyline" in html
    assert '<img src="samples/step-0/prompt-0.png"' in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html and "&lt;s&gt;" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html
    pts, (x0, x1, y0, y1) = report.polyline([(1, 1.0), (2, 0.5)], 100, 100, 10)
    assert pts == "10.0,10.0 90.0,90.0" and (x0, x1, y0, y1) == (1, 2, 0.5, 1.0)
    buckets = {"items": 8, "samples": 9, "cropped": 1, "meanCrop": 0.05, "dropped": {"too_short": 1},
               "buckets": {"32x32x1": {"samples": 9, "cropped": 1, "meanCrop": 0.05, "maxCrop": 0.25}},
               "droppedItems": ["clip.mp4: too_short"]}
    html = report.render(job="j", model_type="flux", status="Succeeded", step=4, total_steps=4, losses=[1.0],
                         learning_rates=[1e-4], prompts=[], samples=[], dataset={"usable": 8, "buckets": buckets},
                         spec={}, artifacts=[])
    assert "<td>32x32x1</td><td>9</td><td>1</td><td>5.0%</td><td>25.0%</td>" in html  # a table, not a dict
    assert "<li>clip.mp4: too_short</li>" in html and "{&#x27;items" not in html and "{'items" not in html


def test_a_long_runs_report_draws_bounded_curves():
    """A 3-day run's 260k steps: the curves are window means, the page stays small (it drew every
    step: 5.9 MB, rendered again at every sample step)."""
    n = 260_000
    html = report.render(job="j", model_type="flux", status="Training", step=n, total_steps=n,
                         losses=[1.0 + (i % 2) for i in range(n)], learning_rates=[1e-4] * n, prompts=[], samples=[],
                         dataset={"usable": 1}, spec={}, artifacts=[])
    assert len(html) < 400_000, len(html)
    curve = re.search(r'id="loss-curve".*?<polyline[^>]*points="([^"]+)"', html, re.S)[1].split()
    assert len(curve) <= report.CURVE_POINTS
    assert report.downsample([1.0] * 7, 3) == [[3, 1.0], [6, 1.0], [7, 1.0]]  # the last window ends at step 7


def test_the_done_line_says_where_the_report_is_and_how_to_open_it():
    assert samples.report_said("/runs/a") == "report /runs/a/report.html (open it in a browser)"
    assert samples.report_said("file:///runs/a/") == "report /runs/a/report.html (open it in a browser)"
    assert samples.report_said("s3://b/out/run1/") == ("report s3://b/out/run1/report.html (`kubelora report "
                                                       "s3://b/out/run1` fetches it with the samples to open)")


def test_sampling_off_builds_and_keeps_nothing(tiny_flux_dir):
    """Counted: with spec.samples unset no embedding is computed, no pipeline is built and the
    encoders (the VAE too) are freed with the cache's; with it set, the text encoders still go and
    only the VAE stays."""
    from diffusers import FluxPipeline
    from kubelora_trainer.models import get_family
    fam = get_family("flux")
    spec_off = parse_spec({"model": {**FLUX, "dtype": "float32"}, "dataset": {"uri": "s3://data/x", "resolution": 32},
                           "output": {"uri": "s3://out/x"}})
    spec_on = spec_off.model_copy(update={"samples": _spec(FLUX, {"prompts": PROMPTS}).samples})
    built = []
    real_init = FluxPipeline.__init__

    def counting_init(self, *a, **k):
        built.append(1)
        real_init(self, *a, **k)
    for spec, kept in ((spec_off, False), (spec_on, True)):
        comps = fam.load(spec.model, {"diffusersPath": str(tiny_flux_dir)}, torch.device("cpu"))
        pipe = comps.encoders["pipe"]
        refs = {n: weakref.ref(getattr(pipe, n)) for n in ("text_encoder", "text_encoder_2", "vae")}
        built.clear()
        with mock.patch.object(FluxPipeline, "__init__", counting_init), \
                mock.patch.object(fam, "sampling_kit", wraps=fam.sampling_kit) as kit:
            sampler = samples.setup(spec, fam, comps, "j", None, {}, Path("/nonexistent"))
        assert (sampler is not None) == kept and kit.call_count == int(kept) and built == []
        del pipe
        comps.encoders.clear()
        gc.collect()
        assert refs["text_encoder"]() is None and refs["text_encoder_2"]() is None
        assert (refs["vae"]() is not None) == kept
        del sampler, comps
        gc.collect()


def test_operator_lists_the_report_and_tells_each_sample_step():
    from kubelora_operator import status as st
    job = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    manifest = {"artifacts": [{"uri": "s3://b/o/lora.safetensors", "format": "diffusers", "sha256": "a", "size": 1}],
                "report": {"uri": "s3://b/o/report.html", "sha256": "r", "size": 2}}
    obs = st.observe(job, [], None, manifest, False)
    assert obs.artifacts[-1] == {"uri": "s3://b/o/report.html", "format": "report", "sha256": "r", "size": 2}
    assert obs.message.startswith("LoRA published to s3://b/o/lora.safetensors")
    prog = st.progress_summary({"step": 5, "totalSteps": 10, "samples": 4, "sampleStep": 5})
    assert (prog["samples"], prog["sampleStep"]) == (4, 5)
    assert st.sample_event({"sampleStep": 0}, prog, "s3://b/o/") == \
        "samples of step 5 written (4 so far); report: s3://b/o/report.html"
    assert st.sample_event(prog, prog, "s3://b/o") is None and st.sample_event(None, {"step": 3}, "s3://b/o") is None


# ---------------------------------------------------------------- training runs

def _job(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": path.stem}, "spec": spec}))
    return path


@pytest.fixture(scope="module")
def s3env(s3_endpoint, tmp_path_factory):
    from kubelora_trainer.local_s3 import ACCESS_KEY, SECRET_KEY
    from kubelora_trainer.storage import S3Settings, make_client
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": "us-east-1"}
    with mock.patch.dict(os.environ, env):
        client = make_client(S3Settings())
    return env, client


def _train(s3env, tmp: Path, bucket: str, model_dir: Path, data: Path, spec: dict, nproc: int) -> dict:
    from kubelora_trainer.storage import download, ensure_bucket, upload_tree
    env, client = s3env
    ensure_bucket(client, bucket)
    upload_tree(model_dir, f"s3://{bucket}/model", client=client)
    upload_tree(data, f"s3://{bucket}/data", client=client)
    spec = {**spec, "output": {**spec.get("output", {}), "uri": f"s3://{bucket}/out"},
            "samples": {"prompts": PROMPTS, "everySteps": 5, "steps": 4}}
    spec["model"]["diffusersPath"] = f"s3://{bucket}/model"
    spec["dataset"]["uri"] = f"s3://{bucket}/data"
    proc = run_trainer(_job(tmp / f"{bucket}.yaml", spec), {**env, "KUBELORA_CACHE_DIR": str(tmp / "cache")}, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])}
    out = download(f"s3://{bucket}/out", tmp / "result", client=client, log=lambda m: None)
    return {"bucket": bucket, "keys": keys, "out": out, "log": proc.stdout,
            "manifest": json.loads((out / "manifest.json").read_text()),
            "progress": json.loads((out / "status" / "progress.json").read_text())}


@pytest.fixture(scope="module")
def flux_run(s3env, tmp_path_factory, tiny_flux_dir):
    tmp = tmp_path_factory.mktemp("flux-samples")
    data = tmp / "data"
    data.mkdir()
    im = Image.new("RGB", (32, 32), (245, 245, 245))
    im.paste((40, 60, 220), (6, 6, 26, 26))
    im.save(data / "a.png")
    (data / "a.txt").write_text(PROMPTS[0]["prompt"])
    spec = {"model": {"type": "flux", "dtype": "float32"}, "dataset": {"resolution": 32},
            "adapter": {"rank": 8, "alpha": 16},
            "training": {"steps": STEPS, "learningRate": 1e-2, "microBatchSize": 1, "logEvery": 5, "seed": 1}}
    return {**_train(s3env, tmp, "samples-flux", tiny_flux_dir, data, spec, nproc=2), "model": tiny_flux_dir}


@pytest.fixture(scope="module")
def ltx_run(s3env, tmp_path_factory):
    from kubelora_trainer.models.ltx_video.tiny import build_tiny_ltx_video, moving_square
    from kubelora_trainer.synthetic import write_video
    tmp = tmp_path_factory.mktemp("ltx-samples")
    model = build_tiny_ltx_video(tmp / "model")
    data = tmp / "data"
    write_video(data / "slide.mp4", moving_square(9))
    (data / "slide.txt").write_text(PROMPTS[0]["prompt"])
    spec = {"model": {"type": "ltx-video", "dtype": "float32"}, "dataset": {"resolution": 32, "frames": 9},
            "adapter": {"rank": 8, "alpha": 16},
            "training": {"steps": STEPS, "learningRate": 1e-2, "microBatchSize": 1, "logEvery": 5, "seed": 1,
                         "timestepSampling": "uniform", "sharding": "shard"},
            "output": {"formats": ["comfyui", "diffusers"]}}
    return {**_train(s3env, tmp, "samples-ltx", model, data, spec, nproc=2), "model": model}


def _expected_keys(video: bool) -> set[str]:
    names = {sample_plan.sample_path(s, i, video) for s in SAMPLE_STEPS for i in range(len(PROMPTS))}
    return {f"out/{n}" for n in names} | ({f"out/{sample_plan.preview_path(n)}" for n in names} if video else set())


def _read_video(path: Path) -> np.ndarray:
    import av
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


def _check_run(run, video: bool):
    keys, m = run["keys"], run["manifest"]
    assert {k for k in keys if k.startswith("out/samples/")} == _expected_keys(video)
    files = m["samples"]["files"]
    assert m["samples"]["count"] == len(files) == len(SAMPLE_STEPS) * len(PROMPTS)
    for f in files:
        assert keys[f"out/{f['file']}"] == f["size"] > 0 and f["uri"] == f"s3://{run['bucket']}/out/{f['file']}"
    assert m["report"]["uri"] == f"s3://{run['bucket']}/out/report.html" and keys["out/report.html"] == m["report"]["size"]
    assert 0 < m["metrics"]["samplingSeconds"] < m["metrics"]["wallSeconds"]
    assert m["metrics"]["trainingSeconds"] == pytest.approx(m["metrics"]["wallSeconds"] - m["metrics"]["samplingSeconds"], abs=0.02)
    assert run["progress"]["samples"] == 6 and run["progress"]["sampleStep"] == STEPS
    assert run["log"].count("[samples] step") == len(SAMPLE_STEPS)


def _differs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_flux_samples_in_the_bucket_change_and_match_diffusers(flux_run):
    assert "[model] replicate" in flux_run["log"]  # the prompts were split over the 2 ranks
    _check_run(flux_run, video=False)
    out = flux_run["out"]
    for i, p in enumerate(PROMPTS):
        first = np.asarray(Image.open(out / f"samples/step-0/prompt-{i}.png"))
        last = np.asarray(Image.open(out / f"samples/step-{STEPS}/prompt-{i}.png"))
        assert first.shape == (32, 32, 3) and _differs(first, last) > 2.0, "the LoRA should change the samples"
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(flux_run["model"])
    pipe.set_progress_bar_config(disable=True)
    base = pipe(PROMPTS[1]["prompt"], height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert _differs(samples.to_uint8(base), np.asarray(Image.open(out / "samples/step-0/prompt-1.png"))) < 0.5
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    for i, p in enumerate(PROMPTS):
        got = pipe(p["prompt"], height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                   generator=torch.Generator().manual_seed(p.get("seed", 0)), output_type="np").images[0]
        ours = np.asarray(Image.open(out / f"samples/step-{STEPS}/prompt-{i}.png"))
        diff = np.abs(samples.to_uint8(got).astype(np.int16) - ours)
        assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


def test_ltx_samples_in_the_bucket_change_and_match_diffusers(ltx_run, tmp_path):
    assert "weights sharded across ranks with FSDP2" in ltx_run["log"]  # each rank sampled and wrote one prompt
    _check_run(ltx_run, video=True)
    out = ltx_run["out"]
    for i in range(len(PROMPTS)):
        first, last = _read_video(out / f"samples/step-0/prompt-{i}.mp4"), _read_video(out / f"samples/step-{STEPS}/prompt-{i}.mp4")
        assert first.shape == (9, 32, 32, 3) and _differs(first, last) > 2.0, "the LoRA should change the samples"
    from diffusers import LTXPipeline
    pipe = LTXPipeline.from_pretrained(ltx_run["model"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    def t5(text):  # as the original LTX pipeline (and kubelora): 256 padded T5 tokens, T5 run with their mask
        t = pipe.tokenizer([text], padding="max_length", max_length=256, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return pipe.text_encoder(t.input_ids, attention_mask=t.attention_mask)[0], t.attention_mask.bool()
    for i, p in enumerate(PROMPTS):
        (e, m), (ne, nm) = t5(p["prompt"]), t5("")
        got = pipe(prompt_embeds=e, prompt_attention_mask=m, negative_prompt_embeds=ne, negative_prompt_attention_mask=nm,
                   height=32, width=32, num_frames=9, frame_rate=25, num_inference_steps=4,
                   guidance_scale=3.0, generator=torch.Generator().manual_seed(p.get("seed", 0)), output_type="np").frames[0]
        # against the lossless WebP preview's frames: H.264 turns a float difference of one LSB
        # (CPU kernels may sum in another order in another process) into codec noise of dozens
        preview = Image.open(out / f"samples/step-{STEPS}/prompt-{i}.webp")
        assert preview.n_frames == 9 and preview.size == (32, 32)
        frames = []
        for k in range(preview.n_frames):
            preview.seek(k)
            frames.append(np.asarray(preview.convert("RGB"), dtype=np.int16))
        diff = np.abs(np.stack(frames) - samples.to_uint8(got).astype(np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize("which", ["flux_run", "ltx_run"])
def test_report_fetched_with_the_cli_renders_in_chromium(which, request, s3, tmp_path, capsys):
    run = request.getfixturevalue(which)
    from kubelora_trainer.cli import main
    assert main(["report", f"s3://{run['bucket']}/out", "--out", str(tmp_path / "rep")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == (tmp_path / "rep" / "report.html").resolve()
    facts = render_report(path, tmp_path / "shot.png")
    assert facts["errors"] == []
    assert facts["lossPoints"] == STEPS and facts["lossBox"] > 100
    srcs = sorted(i["src"] for i in facts["images"])
    video = which == "ltx_run"
    want = sorted(sample_plan.preview_path(sample_plan.sample_path(s, i, video)) for s in SAMPLE_STEPS
                  for i in range(len(PROMPTS)))
    assert srcs == want
    assert all(i["w"] == 32 and i["h"] == 32 for i in facts["images"]), facts["images"]
    shot = Image.open(tmp_path / "shot.png")
    assert shot.width > 300 and shot.height > 600
    html = path.read_text()
    assert "lora.safetensors" in html and run["manifest"]["artifacts"][0]["sha256"] in html


def test_samples_default_to_the_largest_training_area_and_clip():
    from kubelora_trainer.sample_plan import default_frames, default_size
    from kubelora_trainer.spec import parse_spec
    base = {"model": {"type": "ltx-video", "diffusersPath": "/m"}, "output": {"uri": "/o"}}
    areas = parse_spec({**base, "dataset": {"uri": "/d", "resolutions": [256, 512], "frameBuckets": [9, 33]}})
    assert default_size(areas.dataset) == (512, 512) and default_frames("ltx-video", areas.dataset) == 33
    fixed = parse_spec({**base, "dataset": {"uri": "/d", "width": 640, "height": 384, "frames": 17}})
    assert default_size(fixed.dataset) == (640, 384) and default_frames("ltx-video", fixed.dataset) == 17


def test_the_report_command_takes_a_relative_local_path(tmp_path, monkeypatch, capsys):
    from kubelora_trainer.cli import main
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.html").write_text("<html></html>")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "out", "--out", "rep"]) == 0   # as `validate` and `run` take relative paths
    assert Path(capsys.readouterr().out.strip()) == (tmp_path / "rep" / "report.html").resolve()
    assert main(["report", "out"]) == 0                  # no --out: the local report where it is, not a copy
    assert Path(capsys.readouterr().out.strip()) == (tmp_path / "out" / "report.html").resolve()
    assert not (tmp_path / "kubelora-report-out").exists()
    assert main(["report", "missing"]) == 2                # nothing there: an error, and no empty folder left
    assert "no report" in capsys.readouterr().err and not (tmp_path / "kubelora-report-missing").exists()
    (tmp_path / "file").write_text("")  # a folder that cannot be made: one error line, no traceback
    assert main(["report", "out", "--out", "file/rep"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot write the report to file/rep: ")
    assert main(["crd", "--out", "file/crd.yaml"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot write file/crd.yaml: ")


def test_samples_due_when_stopping_wait_for_the_resume():
    """SIGTERM's grace is short and sampling every prompt of a large model can outlast it: the
    checkpoint comes first, the loop state keeps the step, and the resumed run samples it."""
    import torch
    from kubelora_trainer import buckets as bk
    from kubelora_trainer.train import LoopState, samples_deferred
    flux = {"type": "flux", "diffusersPath": "s3://models/flux"}
    spec = _spec(flux, {"prompts": [{"prompt": "x"}], "everySteps": 5})
    assert samples_deferred(10, spec, stopping=True)
    assert not samples_deferred(10, spec, stopping=False) and not samples_deferred(11, spec, stopping=True)
    assert not samples_deferred(10, _spec(flux, None), stopping=True)     # no samples asked for
    space = bk.SampleSpace(((32, 32, 1),), (1,), (1,), (0.0,))
    a = LoopState(torch.Generator(), bk.BucketSampler(space, 1, 1, 1, 0), sample_pending=10)
    b = LoopState(torch.Generator(), bk.BucketSampler(space, 1, 1, 1, 0))
    assert b.load(a.to_dict(10, 1)) and b.sample_pending == 10


def test_a_guidance_a_flux_transformer_without_its_embedding_cannot_take_is_warned():
    """FLUX.1-schnell (guidance_embeds false): FluxPipeline feeds its samples no guidance."""
    from kubelora_trainer.samples import guidance_unused
    spec = _spec(FLUX, {"prompts": [{"prompt": "a"}, {"prompt": "b", "guidance": 4.0}]})
    warning = guidance_unused(spec.samples, False)
    assert warning.startswith("[samples] warning: samples.prompts[1].guidance: this transformer has no guidance")
    assert guidance_unused(spec.samples, True) is None and guidance_unused(spec.samples, None) is None
    assert guidance_unused(_spec(FLUX, {"prompts": [{"prompt": "a"}]}).samples, False) is None  # the default: said nothing



def test_a_resume_lists_the_samples_made_with_the_settings_they_were_made_with():
    """spec.samples may change across a resume (it is not fingerprinted; the out-of-memory advice
    asks for smaller samples): the earlier samples come from the checkpoint's records, each labelled
    with its own settings, not re-derived from the new spec (old images under the new prompt, links
    to samples never made, the earlier last step dropped when training.steps grew)."""
    import torch
    from kubelora_trainer import buckets as bk
    from kubelora_trainer import report
    from kubelora_trainer.checkpoint import loop_for_world
    from kubelora_trainer.samples import Sampler
    from kubelora_trainer.train import LoopState
    old = {"prompt": "a red square", "negativePrompt": None, "seed": 1, "width": 64, "height": 64, "frames": 1,
           "guidance": 3.5, "steps": 8}
    made = [{"step": s, "prompt": 0, "file": f"samples/step-{s}/prompt-0.png", "settings": old} for s in (0, 500)]
    space = bk.SampleSpace(((32, 32, 1),), (1,), (1,), (0.0,))
    state = LoopState(torch.Generator(), bk.BucketSampler(space, 1, 1, 1, 0))
    saved = state.to_dict(500, 1, samples=made)
    assert saved["samples"] == made and loop_for_world(None, saved, 2)["samples"] == made   # also on another layout
    resumed = LoopState(torch.Generator(), bk.BucketSampler(space, 1, 1, 1, 0))
    resumed.load(saved)
    assert resumed.samples == made
    new = {**old, "index": 0, "prompt": "a blue circle", "width": 32, "height": 32}
    sampler = Sampler(None, None, {}, [new], "j", None, {}, None, restored=resumed.samples)
    sampler.listed(501)                 # training.steps raised to 1000: step 500's sample is still listed
    assert sampler.records == made
    later = {"step": 1000, "prompt": 0, "file": "samples/step-1000/prompt-0.png",
             "settings": {k: new[k] for k in old}}
    grid = report.sample_grid([new], sampler.records + [later])
    rows = re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", grid)[1:]
    assert [r[0].split("<br>")[0] for r in rows] == ["a red square", "a blue circle"]
    assert "64x64" in rows[0][0] and "step-500/prompt-0.png" in rows[0][1] and "step-1000" not in rows[0][1]
    assert "32x32" in rows[1][0] and "step-1000/prompt-0.png" in rows[1][1] and "step-0/" not in rows[1][1]


def test_jobs_in_the_background_run_in_order_and_only_the_newest_waiting_one_runs():
    """samples.Newest (the mid-run report's upload): one job at a time, in order; a job submitted
    while another runs replaces the one waiting; wait(drop=True) drops the waiting one and returns
    once the running one is done."""
    import threading
    gate, started, ran = threading.Event(), threading.Event(), []

    def job(n, block=False):
        def run():
            if block:
                started.set()
                assert gate.wait(60)
            ran.append(n)
        return run
    q = samples.Newest("test")
    q.submit(job(1, block=True))
    assert started.wait(60)   # under way: what comes now waits
    q.submit(job(2))
    q.submit(job(3))   # replaces 2
    gate.set()
    q.wait(drop=False)
    assert ran == [1, 3]
    gate.clear()
    started.clear()
    q.submit(job(4, block=True))
    assert started.wait(60)
    q.submit(job(5))
    threading.Timer(0.2, gate.set).start()
    q.wait(drop=True)  # 5 never runs
    assert ran == [1, 3, 4]
    q.submit(lambda: 1 / 0)  # a bug in a job: a warning, the worker goes on
    q.submit(job(6))
    q.wait(drop=False)
    assert ran[-1] == 6


def test_a_slow_store_does_not_hold_rank_0_at_a_sample_step_and_the_final_report_lands_last(tmp_path, capsys):
    """The mid-run report is uploaded in the background (the store is slow: rank 0 trains on
    instead of keeping every rank waiting in the next collective); its failure is a warning; the
    final report waits for the upload under way and is the one that stays."""
    import threading
    import time
    from types import SimpleNamespace
    from kubelora_trainer import storage
    spec = _spec(FLUX, {"prompts": [{"prompt": "a"}]})
    sampler = samples.Sampler(spec, None, {}, [{"index": 0, "seed": 1, "prompt": "a"}], "job", None, {}, tmp_path / "local")
    store, gate, calls = tmp_path / "store", threading.Event(), []
    store.mkdir()

    def upload(path, key):  # a store that answers once the gate opens, and fails the second mid-run upload
        calls.append(SimpleNamespace(status=re.search(r"Training|Succeeded", path.read_text()).group(0)))
        if len(calls) == 1:
            assert gate.wait(60)
        if len(calls) == 2:
            raise storage.StorageError("uploading s3://b/report.html: SlowDown", transient=True)
        (store / key).write_text(path.read_text())
        return {"uri": str(store / key)}
    sampler._upload = upload
    def under_way(n):
        deadline = time.monotonic() + 60
        while len(calls) < n:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    sampler.report_soon(1, [0.5])              # returns at once, although the store does not answer
    under_way(1)
    sampler.report_soon(2, [0.5, 0.4])         # waits; replaced by the next
    sampler.report_soon(3, [0.5, 0.4, 0.3])
    assert len(calls) == 1 and not (store / samples.REPORT_NAME).exists()
    gate.set()
    sampler._reports.wait(drop=False)
    assert [c.status for c in calls] == ["Training", "Training"]
    assert "report.html not updated at step 3: uploading s3://b/report.html: SlowDown" in capsys.readouterr().out
    gate.clear()
    sampler.report_soon(4, [0.5] * 4)          # under way (blocked) when the run ends
    under_way(3)
    threading.Timer(0.3, gate.set).start()
    sampler.publish_report("Succeeded", 4, [0.5] * 4, [])
    assert [c.status for c in calls] == ["Training", "Training", "Training", "Succeeded"]
    assert "Succeeded" in (store / samples.REPORT_NAME).read_text()
