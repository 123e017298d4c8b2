"""spec.samples for SDXL, HunyuanVideo and Cosmos: one short trainer run of each tiny model (one
process, local folders), sampling before the first step and after the last. The samples have the
requested size and frame count, the LoRA changed them, and the exported LoRA file loaded into
the family's diffusers pipeline reproduces the last in-training sample for the same seed (the
first one, without it). SDXL also trains its text encoders: its samples go through the trained
encoders, which the LoRA file carries too. test_samples.py covers the rest (S3, ranks, report)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_trainer
from kubelora_trainer import samples
from kubelora_trainer.families import COSMOS_ANY_SIZE_ENV, RULES
from kubelora_trainer.models.cosmos import GUARDRAIL_ENV
from kubelora_trainer.spec import SpecError, parse_spec

STEPS = 6
SAMPLE_STEPS = 3
PROMPT = "a blue square on a white background"
SEED = 5


def _square(d: Path, caption: str = PROMPT) -> Path:
    d.mkdir(parents=True)
    im = Image.new("RGB", (32, 32), (245, 245, 245))
    im.paste((40, 60, 220), (6, 6, 26, 26))
    im.save(d / "square.png")
    (d / "square.txt").write_text(caption)
    return d


def _train(tmp: Path, model: dict, dataset: dict, samples_spec: dict, env: dict | None = None,
           output: dict | None = None, training: dict | None = None, nproc: int = 1) -> dict:
    spec = {"model": {**model, "dtype": "float32"}, "dataset": {"uri": str(tmp / "data"), **dataset},
            "adapter": {"rank": 8, "alpha": 16},
            "training": {"steps": STEPS, "learningRate": 2e-2, "microBatchSize": 1, "logEvery": 3, "seed": 1,
                         **({"timestepSampling": "uniform"} if RULES[model["type"]].flow_matching else {}),
                         **(training or {})},
            "output": {"uri": str(tmp / "out"), **(output or {})},
            "samples": {"prompts": [{"prompt": PROMPT, "seed": SEED}], "steps": SAMPLE_STEPS, **samples_spec}}
    n = len(spec["samples"]["prompts"])
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                   "metadata": {"name": tmp.name}, "spec": spec}))
    proc = run_trainer(job, {"KUBELORA_CACHE_DIR": str(tmp / "cache"), **(env or {})}, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(f["step"], f["file"]) for f in manifest["samples"]["files"]] == \
        [(s, f"samples/step-{s}/prompt-{i}.{'png' if model['type'] == 'sdxl' else 'mp4'}")
         for s in (0, STEPS) for i in range(n)]
    assert proc.stdout.count("[samples] step") == 2 and (out / "report.html").is_file()
    return {"out": out, "log": proc.stdout}


def _read_video(path: Path) -> np.ndarray:
    import av
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


def _mean_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


# ---------------------------------------------------------------- SDXL

@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    from kubelora_trainer.models.sdxl.tiny import build_tiny_sdxl
    tmp = tmp_path_factory.mktemp("sdxl-samples")
    model = build_tiny_sdxl(tmp / "model")
    _square(tmp / "data")
    run = _train(tmp, {"type": "sdxl", "diffusersPath": str(model)}, {"resolution": 32},
                 {"prompts": SDXL_PROMPTS}, training={"sharding": "shard"}, nproc=2)
    return {**run, "model": model}


# the second with a negative prompt: encoded in the same text-encoder forward as its prompt
SDXL_PROMPTS = [{"prompt": PROMPT, "seed": SEED}, {"prompt": "a red square", "negativePrompt": "blurry", "seed": 3}]


def test_sdxl_samples_change_and_match_diffusers_with_the_kohya_file(sdxl_run):
    """2 ranks with FSDP2 (the UNet and both text encoders sharded): each rank samples one prompt."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    assert "weights sharded across ranks with FSDP2" in sdxl_run["log"]
    out = sdxl_run["out"]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_run["model"], add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def make(p):  # the family's defaults: guidance 5 (classifier-free; no negative prompt: zeros)
        return samples.to_uint8(pipe(p["prompt"], negative_prompt=p.get("negativePrompt"), height=32, width=32,
                                     num_inference_steps=SAMPLE_STEPS, guidance_scale=5.0,
                                     generator=torch.Generator().manual_seed(p["seed"]), output_type="np").images[0])
    first, last = {}, {}
    for i, p in enumerate(SDXL_PROMPTS):
        first[i], last[i] = (np.asarray(Image.open(out / f"samples/step-{s}/prompt-{i}.png")) for s in (0, STEPS))
        assert first[i].shape == last[i].shape == (32, 32, 3) and _mean_diff(first[i], last[i]) > 2.0, \
            "the LoRA should change the samples"
        assert _mean_diff(make(p), first[i]) < 0.5
    # the UNet's LoRA alone: the text encoders' trained LoRA shows in the in-training sample
    unet_only = {k: v for k, v in load_file(str(out / "lora.safetensors")).items() if k.startswith("lora_unet_")}
    pipe.load_lora_weights(unet_only, adapter_name="unet_only")
    assert _mean_diff(make(SDXL_PROMPTS[0]), last[0]) > 1.0, "samples should go through the text encoders being trained"
    pipe.delete_adapters("unet_only")
    pipe.load_lora_weights(str(out / "lora.safetensors"))   # the default kohya file: UNet and both text encoders
    for i, p in enumerate(SDXL_PROMPTS):
        diff = np.abs(make(p).astype(np.int16) - last[i])
        assert diff.max() <= 2 and diff.mean() < 0.1, (i, diff.max(), diff.mean())


def test_sdxl_sampling_scheduler_follows_the_trained_objective():
    from diffusers import EulerDiscreteScheduler
    from kubelora_trainer.models.sdxl.family import sampling_scheduler
    from kubelora_trainer.models.sdxl.tiny import SDXL_SCHEDULER
    eps = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    assert sampling_scheduler(eps, v_pred=False, ztsnr=False) is eps
    v = sampling_scheduler(eps, v_pred=True, ztsnr=True)
    assert (v.config.prediction_type, v.config.rescale_betas_zero_snr, v.config.timestep_spacing) == \
        ("v_prediction", True, "trailing")


# ---------------------------------------------------------------- HunyuanVideo

@pytest.fixture(scope="module")
def hunyuan_run(tmp_path_factory):
    from kubelora_trainer.models.hunyuan_video.tiny import build_tiny_hunyuan_video, sliding_square
    from kubelora_trainer.synthetic import write_video
    tmp = tmp_path_factory.mktemp("hv-samples")
    paths = {k: str(v) for k, v in build_tiny_hunyuan_video(tmp / "model").items()}
    write_video(tmp / "data" / "slide.mp4", sliding_square(5))
    (tmp / "data" / "slide.txt").write_text(PROMPT)
    run = _train(tmp, {"type": "hunyuan-video", **paths}, {"resolution": 32, "frames": 5}, {},
                 output={"formats": ["original", "diffusers"]})
    return {**run, "paths": paths}


def test_hunyuan_video_samples_change_and_match_diffusers(hunyuan_run, tmp_path):
    from diffusers import HunyuanVideoPipeline
    from kubelora_trainer.models.hunyuan_video.family import FAMILY, MAX_TOKENS
    out = hunyuan_run["out"]
    first, last = (_read_video(out / f"samples/step-{s}/prompt-0.mp4") for s in (0, STEPS))
    assert first.shape == last.shape == (5, 32, 32, 3) and _mean_diff(first, last) > 2.0
    spec = parse_spec({"model": {"type": "hunyuan-video", "dtype": "float32", **hunyuan_run["paths"]},
                       "dataset": {"uri": "/d"}, "output": {"uri": "/o"}})
    comps = FAMILY.load(spec.model, hunyuan_run["paths"], torch.device("cpu"))
    pipe = comps.encoders["pipe"]
    pipe = HunyuanVideoPipeline(**{**pipe.components, "transformer": comps.trainable["transformer"]})
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out / "lora.diffusers.safetensors"))
    got = pipe(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=SAMPLE_STEPS, guidance_scale=6.0,
               prompt_template=comps.info["template"], max_sequence_length=MAX_TOKENS,
               generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    ref = samples.write_sample(samples.to_uint8(got), tmp_path / "ref.mp4", 24)[0]   # the same encoder, then both decoded
    diff = np.abs(_read_video(ref) - last)
    assert diff.mean() < 0.5 and diff.max() <= 24, (diff.max(), diff.mean())


# ---------------------------------------------------------------- Cosmos

@pytest.fixture(scope="module")
def cosmos_run(tmp_path_factory):
    from kubelora_trainer.models.cosmos.tiny import build_tiny_cosmos
    tmp = tmp_path_factory.mktemp("cosmos-samples")
    paths = build_tiny_cosmos(tmp / "model")
    _square(tmp / "data")
    run = _train(tmp, {"type": "cosmos", **paths}, {"width": 32, "height": 32, "frames": 1},
                 {"negativePrompt": "blurry"}, env={COSMOS_ANY_SIZE_ENV: "1", GUARDRAIL_ENV: "stand-in"}, output={"formats": ["comfyui", "diffusers"]})
    return {**run, "paths": paths}


def test_cosmos_samples_change_and_match_diffusers(cosmos_run, tmp_path):
    from kubelora_trainer.models.cosmos.family import FAMILY, TRAIN_FPS, NoGuardrail, sampling_pipeline
    out = cosmos_run["out"]
    first, last = (_read_video(out / f"samples/step-{s}/prompt-0.mp4") for s in (0, STEPS))
    assert first.shape == last.shape == (1, 32, 32, 3) and _mean_diff(first, last) > 2.0
    spec = parse_spec({"model": {"type": "cosmos", "dtype": "float32", **cosmos_run["paths"]},
                       "dataset": {"uri": "/d", "width": 1280, "height": 704}, "output": {"uri": "/o"}})
    comps = FAMILY.load(spec.model, cosmos_run["paths"], torch.device("cpu"))
    from diffusers import CosmosTextToWorldPipeline
    base = sampling_pipeline(comps.trainable["transformer"], comps.encoders["vae"], NoGuardrail())
    pipe = CosmosTextToWorldPipeline(**{**base.components, "text_encoder": comps.encoders["text_encoder"],
                                        "tokenizer": comps.encoders["tokenizer"]})
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.load_lora_adapter(str(out / "lora.diffusers.safetensors"), prefix="transformer")
    got = pipe(PROMPT, negative_prompt="blurry", height=32, width=32, num_frames=1, num_inference_steps=SAMPLE_STEPS,
               guidance_scale=7.0, fps=TRAIN_FPS, generator=torch.Generator().manual_seed(SEED),
               output_type="np").frames[0]
    ref = samples.write_sample(samples.to_uint8(got), tmp_path / "ref.mp4", 24)[0]
    diff = np.abs(_read_video(ref) - last)
    assert diff.mean() < 0.5 and diff.max() <= 24, (diff.max(), diff.mean())


# ---------------------------------------------------------------- spec rules

def test_spec_rules_of_the_three_families(monkeypatch):
    monkeypatch.delenv(COSMOS_ANY_SIZE_ENV, raising=False)
    cosmos = {"type": "cosmos", "transformerPath": "/t.pt", "vaePath": "/v.safetensors", "textEncoderPath": "/te"}
    hv = {"type": "hunyuan-video", "ckptPath": "/hv"}

    def spec(model, samples_spec, dataset=None):
        return parse_spec({"model": model, "dataset": {"uri": "/d", **(dataset or {})}, "output": {"uri": "/o"},
                           "samples": samples_spec})
    for model, s, dataset, expect in [
        (cosmos, {"prompts": [{"prompt": "x", "width": 512, "height": 512}]}, {"width": 960, "height": 960, "frames": 1},
         "samples.prompts[0]: cosmos samples only at its sizes (960x960, 960x704"),
        (cosmos, {"prompts": [{"prompt": "x"}], "frames": 9}, {"width": 960, "height": 960, "frames": 1},
         "samples.frames: cosmos supports only 1 or 121 frames (got 9)"),
        (hv, {"prompts": [{"prompt": "x", "negativePrompt": "y"}]}, None,
         "samples.prompts[0].negativePrompt: hunyuan-video samples without classifier-free guidance"),
        (hv, {"prompts": [{"prompt": "x"}], "frames": 6}, None, "samples.frames: hunyuan-video needs 4k+1 frames"),
    ]:
        with pytest.raises(SpecError) as e:
            spec(model, s, dataset)
        assert expect in str(e.value)
    from kubelora_trainer import sample_plan
    c = sample_plan.resolve(spec(cosmos, {"prompts": [{"prompt": "x"}]}, {"width": 1280, "height": 704, "frames": 121}))[0]
    assert (c["width"], c["height"], c["frames"], c["guidance"], c["steps"]) == (1280, 704, 121, 7.0, 36)
    s = sample_plan.resolve(spec({"type": "sdxl", "diffusersPath": "/m"}, {"prompts": [{"prompt": "x"}]},
                                 {"resolution": 1024}))[0]
    assert (s["width"], s["frames"], s["guidance"], s["steps"]) == (1024, 1, 5.0, 25)


def test_cosmos_samples_refused_without_nvidias_guardrail(monkeypatch):
    """The guardrail (cosmos_guardrail and its models) is not installed here, which is exactly the case
    a job must refuse: no Cosmos sample is made through a pass-through checker outside tests."""
    from kubelora_trainer.exits import BAD_INPUT, code_of
    from kubelora_trainer.models.base import ModelError
    from kubelora_trainer.models.cosmos.family import guardrail
    monkeypatch.delenv(GUARDRAIL_ENV, raising=False)
    with pytest.raises(ModelError, match="spec.samples: Cosmos samples go through NVIDIA's safety guardrail") as e:
        guardrail()
    assert code_of(e.value) == BAD_INPUT
    monkeypatch.setenv(GUARDRAIL_ENV, "stand-in")
    assert type(guardrail()).__name__ == "NoGuardrail"


def test_cosmos_prompts_go_through_the_guardrails_text_check(monkeypatch):
    """The pipeline is given embeddings, so it never sees the prompt's text: the kit checks it."""
    from kubelora_trainer.models.base import ModelError
    from kubelora_trainer.models.cosmos import family as cosmos

    class Refusing(cosmos.NoGuardrail):
        def check_text_safety(self, prompt):
            return "forbidden" not in prompt
    monkeypatch.setattr(cosmos, "guardrail", Refusing)
    prompts = [{"index": 0, "prompt": "a red circle", "guidance": 7.0, "negativePrompt": None},
               {"index": 1, "prompt": "something forbidden", "guidance": 7.0, "negativePrompt": None}]
    with pytest.raises(ModelError, match=r"spec.samples.prompts\[1\]: NVIDIA's guardrail refuses this prompt"):
        cosmos.FAMILY.sampling_kit(None, prompts)  # refused before any encoder is touched
