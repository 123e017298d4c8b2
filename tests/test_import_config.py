"""`kubelora import-config`: every key diffusion-pipe reads (the list below was taken from its code:
train.py, utils/dataset.py, utils/saver.py, models/{base,flux,sdxl,ltx_video,hunyuan_video,cosmos}.py
at tdrussell/diffusion-pipe 8f83dbf) is handled in exactly one of three ways, none silently:
mapped (the manifest changes), noted (a note names the key), refused (an error names the file,
line and key); "default" marks a value at which kubelora already behaves as diffusion-pipe does.
Pure calls to the converter, plus the CLI for errors."""
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubelora_trainer.import_config import ConfigError, Source, convert, find_line, parse_map
from kubelora_trainer.import_dataset import read_dirs
from kubelora_trainer.import_rules import SECTIONS, area_side
from kubelora_trainer.spec import SpecError, parse_spec

REPO = Path(__file__).resolve().parents[1]
BASE_MAIN = {"output_dir": "/runs/out", "max_steps": 100,
             "model": {"type": "flux", "diffusers_path": "/models/flux", "dtype": "bfloat16"},
             "adapter": {"type": "lora", "rank": 16}, "optimizer": {"type": "adamw", "lr": 1e-4}}
BASE_DATASET = {"resolutions": [512], "directory": [{"path": "/data/style"}]}
SECTION_TABLES = {"main": "", "model": "model", "adapter": "adapter", "optimizer": "optimizer",
                  "monitoring": "monitoring", "dataset": "", "directory": "directory"}

# (section, key, value, handling); a key may appear with several values
KEYS = [
    ("main", "output_dir", "/elsewhere", "mapped"),
    ("main", "dataset", "dataset.toml", "section"),
    ("main", "eval_datasets", [{"name": "e", "config": "e.toml"}], "noted"),
    ("main", "epochs", 5, "noted"),
    ("main", "max_steps", 77, "mapped"),
    ("main", "micro_batch_size_per_gpu", 3, "mapped"),
    ("main", "micro_batch_size_per_gpu", [[512, 4], [1024, 1]], "refused"),
    ("main", "image_micro_batch_size_per_gpu", 2, "mapped"),            # flux: every bucket is an image bucket
    ("main", "image_micro_batch_size_per_gpu", 2, "noted", "ltx-video"),  # one size for images and videos
    ("main", "eval_micro_batch_size_per_gpu", 2, "noted"),
    ("main", "eval_micro_batch_size_per_gpu", [[512, 4]], "refused"),
    ("main", "eval_image_micro_batch_size_per_gpu", 2, "noted"),
    ("main", "eval_gradient_accumulation_steps", 2, "noted"),
    ("main", "eval_every_n_steps", 10, "noted"),
    ("main", "eval_every_n_epochs", 1, "noted"),
    ("main", "eval_every_n_examples", 100, "noted"),
    ("main", "eval_before_first_step", False, "noted"),
    ("main", "gradient_accumulation_steps", 4, "mapped"),
    ("main", "gradient_clipping", 0.5, "mapped"),
    ("main", "steps_per_print", 5, "noted"),
    ("main", "logging_steps", 5, "mapped"),
    ("main", "warmup_steps", 10, "mapped"),
    ("main", "lr_scheduler", "cosine", "mapped"),
    ("main", "lr_scheduler", "linear", "mapped"),
    ("main", "lr_scheduler", "constant", "default"),
    ("main", "lr_scheduler", "polynomial", "refused"),
    ("main", "force_constant_lr", 3e-5, "mapped"),
    ("main", "pipeline_stages", 2, "noted"),
    ("main", "partition_method", "manual", "noted"),
    ("main", "partition_split", [4], "noted"),
    ("main", "activation_checkpointing", True, "mapped"),
    ("main", "activation_checkpointing", "unsloth", "mapped"),
    ("main", "reentrant_activation_checkpointing", True, "noted"),
    ("main", "blocks_to_swap", 10, "noted"),
    ("main", "disable_block_swap_for_eval", True, "noted"),
    ("main", "compile", True, "mapped"),
    ("main", "save_every_n_epochs", 1, "noted"),
    ("main", "save_every_n_steps", 100, "noted"),
    ("main", "save_every_n_examples", 1000, "noted"),
    ("main", "checkpoint_every_n_epochs", 1, "noted"),
    ("main", "checkpoint_every_n_minutes", 120, "mapped"),
    ("main", "resume_from_checkpoint", True, "noted"),
    ("main", "save_dtype", "bfloat16", "mapped"),
    ("main", "caching_batch_size", 8, "noted"),
    ("main", "map_num_proc", 4, "noted"),
    ("main", "regenerate_cache", True, "noted"),
    ("main", "x_axis_examples", True, "noted"),
    ("main", "video_clip_mode", "single_beginning", "default"),
    ("main", "video_clip_mode", "single_middle", "noted"),     # flux: an image model
    ("main", "video_clip_mode", "single_middle", "mapped", "ltx-video"),
    ("main", "video_clip_mode", "multiple_overlapping", "mapped", "hunyuan-video"),
    ("main", "video_clip_mode", "every_frame", "refused"),
    ("main", "uncond_fraction", 0.1, "mapped"),
    ("main", "uncond_fraction", 0.0, "default"),
    ("main", "huber_delta", 0.5, "refused"),
    ("main", "smooth_l1_beta", 0.1, "refused"),
    ("main", "lora", {"dtype": "bfloat16"}, "noted"),
    ("main", "model", None, "section"),
    ("main", "adapter", None, "section"),
    ("main", "optimizer", None, "section"),
    ("main", "monitoring", None, "section"),
    ("model", "type", None, "section"),
    ("model", "dtype", "float32", "mapped"),
    ("model", "dtype", "float16", "noted"),
    ("model", "transformer_dtype", "float8", "mapped"),
    ("model", "transformer_dtype", "float8", "noted", "sdxl"),     # diffusion-pipe's sdxl.py never reads it
    ("model", "transformer_dtype", "float8", "noted", "cosmos"),
    ("model", "transformer_dtype", "float8_e5m2", "refused"),
    ("model", "transformer_dtype", "float16", "refused"),
    ("model", "diffusion_model_dtype", "bfloat16", "noted"),
    ("model", "guidance", 3.5, "mapped"),
    ("model", "guidance", 3.5, "refused", "hunyuan-video"),
    ("model", "guidance", 1.0, "default", "hunyuan-video"),
    ("model", "timestep_sample_method", "uniform", "mapped"),
    ("model", "timestep_sample_method", "uniform", "noted", "sdxl"),
    ("model", "sigmoid_scale", 1.5, "mapped"),
    ("model", "sigmoid_scale", 1.0, "default"),
    ("model", "shift", 3.0, "mapped"),
    ("model", "shift", 0, "noted"),
    ("model", "flux_shift", True, "mapped"),
    ("model", "cache_text_embeddings", False, "noted"),
    ("model", "diffusers_path", "/models/other", "mapped"),
    ("model", "transformer_path", "/models/t.safetensors", "mapped"),
    ("model", "checkpoint_path", "/models/sdxl.safetensors", "noted"),   # flux: diffusion-pipe reads it for sdxl only
    ("model", "checkpoint_path", "/models/other.safetensors", "mapped", "sdxl"),
    ("model", "ckpt_path", "/models/hv", "noted"),
    ("model", "ckpt_path", "/models/hv2", "mapped", "hunyuan-video"),
    ("model", "vae_path", "/models/vae.safetensors", "noted"),
    ("model", "vae_path", "/models/vae.safetensors", "mapped", "hunyuan-video"),
    ("model", "llm_path", "/models/llm", "noted"),
    ("model", "llm_path", "/models/llm", "mapped", "hunyuan-video"),
    ("model", "clip_path", "/models/clip", "noted"),
    ("model", "clip_path", "/models/clip", "mapped", "hunyuan-video"),
    ("model", "text_encoder_path", "/models/t5.safetensors", "noted"),
    ("model", "text_encoder_path", "/models/t5b.safetensors", "mapped", "cosmos"),
    ("model", "single_file_path", "/models/ltx.safetensors", "noted"),
    ("model", "single_file_path", "/models/ltx.safetensors", "refused", "ltx-video"),
    ("model", "bypass_guidance_embedding", True, "mapped"),
    ("model", "v_pred", True, "noted"),
    ("model", "v_pred", True, "mapped", "sdxl"),
    ("model", "min_snr_gamma", 5.0, "noted"),
    ("model", "min_snr_gamma", 5.0, "mapped", "sdxl"),
    ("model", "debiased_estimation_loss", False, "noted"),
    ("model", "debiased_estimation_loss", False, "refused", "sdxl"),
    ("model", "unet_lr", 1e-3, "noted"),            # flux: diffusion-pipe reads it for sdxl only
    ("model", "unet_lr", 1e-3, "mapped", "sdxl"),
    ("model", "text_encoder_1_lr", 1e-5, "noted"),
    ("model", "text_encoder_2_lr", 1e-5, "noted"),
    ("model", "first_frame_conditioning_p", 0.5, "noted"),
    ("model", "first_frame_conditioning_p", 0.5, "refused", "ltx-video"),
    ("model", "first_frame_conditioning_p", 0.0, "default", "ltx-video"),
    ("adapter", "type", "lokr", "refused"),
    ("adapter", "type", "lora", "default"),
    ("adapter", "rank", 8, "mapped"),
    ("adapter", "alpha", 32, "mapped"),
    ("adapter", "dtype", "bfloat16", "noted"),
    ("adapter", "dropout", 0.1, "mapped"),
    ("adapter", "decompose_factor", 4, "noted"),
    ("adapter", "rank_dropout", 0.1, "noted"),
    ("adapter", "exclude_modules", ["proj_out"], "refused"),
    ("adapter", "init_from_existing", "/loras/old", "mapped"),
    ("adapter", "fuse_adapters", [{"path": "/l.safetensors"}], "refused"),
    ("optimizer", "type", "adamw8bit", "noted"),
    ("optimizer", "type", "adamw_optimi", "mapped"),  # optimi.AdamW's own defaults: betas (0.9, 0.99), eps 1e-6
    ("optimizer", "type", "adamw", "default"),
    ("optimizer", "type", "Prodigy", "refused"),
    ("optimizer", "lr", 2e-5, "mapped"),
    ("optimizer", "betas", [0.8, 0.95], "mapped"),
    ("optimizer", "weight_decay", 0.1, "mapped"),
    ("optimizer", "eps", 1e-6, "mapped"),
    ("optimizer", "beta2_half_life", 100, "refused"),
    ("optimizer", "gradient_release", True, "noted"),
    ("optimizer", "amsgrad", True, "refused"),       # any other key goes to the optimizer in diffusion-pipe
    ("monitoring", "enable_wandb", True, "noted"),
    ("monitoring", "wandb_api_key", "secret", "noted"),
    ("monitoring", "wandb_tracker_name", "t", "noted"),
    ("monitoring", "wandb_run_name", "r", "noted"),
    ("dataset", "directory", None, "section"),
    ("dataset", "resolutions", [768], "mapped"),
    ("dataset", "resolutions", [[1024, 768]], "mapped"),
    ("dataset", "resolutions", [512, 768], "mapped"),
    ("dataset", "enable_ar_bucket", True, "mapped"),
    ("dataset", "min_ar", 0.25, "noted"),             # no effect without enable_ar_bucket = true
    ("dataset", "max_ar", 4.0, "noted"),
    ("dataset", "num_ar_buckets", 9, "noted"),
    ("dataset", "ar_buckets", [1.0, 1.5], "noted"),
    ("dataset", "frame_buckets", [1, 33], "noted"),  # flux is an image model
    ("dataset", "frame_buckets", [1, 33], "mapped", "ltx-video"),
    ("dataset", "size_buckets", [[512, 768, 1]], "mapped"),
    ("dataset", "num_repeats", 3, "mapped"),
    ("dataset", "shuffle_tags", True, "mapped"),
    ("dataset", "cache_shuffle_num", 2, "mapped"),
    ("dataset", "cache_shuffle_delimiter", ", ", "noted"),
    ("dataset", "caption_prefix", "ohwx ", "mapped"),
    ("dataset", "skip_empty_caption", False, "mapped"),
    ("dataset", "shuffle_metadata", False, "noted"),
    ("dataset", "online_captions", True, "noted"),
    ("dataset", "subsample_ratio", 0.5, "refused"),
    ("directory", "path", "/data/other", "mapped"),
    ("directory", "num_repeats", 2, "mapped"),
    ("directory", "num_repeats", 1.5, "refused"),
    ("directory", "mask_path", "/data/masks", "mapped"),
    ("directory", "default_mask_file", "/data/mask.png", "refused"),
    ("directory", "control_path", "/data/control", "refused"),
    ("directory", "resolutions", [256], "mapped"),
    ("directory", "enable_ar_bucket", True, "mapped"),
    ("directory", "min_ar", 0.25, "noted"),
    ("directory", "max_ar", 4.0, "noted"),
    ("directory", "num_ar_buckets", 9, "noted"),
    ("directory", "ar_buckets", [1.0], "noted"),
    ("directory", "frame_buckets", [1, 33], "noted"),
    ("directory", "size_buckets", [[512, 768, 1]], "mapped"),
    ("directory", "caption_prefix", "ohwx ", "mapped"),
    ("directory", "shuffle_tags", True, "mapped"),
    ("directory", "cache_shuffle_num", 2, "mapped"),
    ("directory", "cache_shuffle_delimiter", ", ", "noted"),
    ("directory", "skip_empty_caption", False, "mapped"),
    ("directory", "shuffle_metadata", False, "noted"),
    ("directory", "online_captions", True, "noted"),
]


MODELS = {"flux": BASE_MAIN["model"], "sdxl": {"type": "sdxl", "checkpoint_path": "/models/sdxl.safetensors"},
          "ltx-video": {"type": "ltx-video", "diffusers_path": "/models/ltx"},
          "hunyuan-video": {"type": "hunyuan-video", "ckpt_path": "/models/hv"},
          "cosmos": {"type": "cosmos", "transformer_path": "/m/c.pt", "vae_path": "/m/v", "text_encoder_path": "/m/t5"}}


def _base(model_type="flux"):
    main, ds = copy.deepcopy(BASE_MAIN), copy.deepcopy(BASE_DATASET)
    main["model"] = copy.deepcopy(MODELS[model_type])
    return main, ds


def _with(section, key, value, model_type="flux"):
    main, ds = _base(model_type)
    target = {"main": main, "dataset": ds, "directory": ds["directory"][0]}.get(section) or main.setdefault(section, {})
    target[key] = value
    return main, ds


def test_every_key_diffusion_pipe_reads_is_in_the_importer_tables_and_no_other():
    listed = {(k[0], k[1]) for k in KEYS} - {("optimizer", "amsgrad")}  # stands for "any other key"
    tables = {(s, k) for s, t in SECTIONS.items() for k in t}
    assert listed == tables, (sorted(listed - tables), sorted(tables - listed))


def test_a_key_only_diffusion_pipes_example_still_shows_is_called_obsolete_not_a_typo():
    main, ds = _with("main", "pseudo_huber_c", 0.5, "flux")
    manifest, notes = convert(main, ds)
    assert manifest == convert(*_base("flux"))[0]
    assert [n for n in notes if n.startswith("pseudo_huber_c: ")] == [
        "pseudo_huber_c: diffusion-pipe's examples/main_example.toml still lists it, but its code no longer reads it "
        "(its Huber loss is huber_delta now); ignored"]


def test_docs_list_every_key():
    doc = (REPO / "docs" / "import-config.md").read_text()
    missing = sorted({k[1] for k in KEYS if f"`{k[1]}`" not in doc})
    assert not missing, missing


ROWS = [(*k, "flux")[:5] for k in KEYS if k[3] != "section"]


@pytest.mark.parametrize("section,key,value,handling,model_type", ROWS,
                         ids=[f"{t}:{s}.{k}={v!r}" for s, k, v, h, t in ROWS])
def test_each_key_is_mapped_noted_or_refused(section, key, value, handling, model_type):
    base, base_notes = convert(*_base(model_type))
    main, ds = _with(section, key, value, model_type)
    if handling == "refused":
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: "):
            convert(main, ds)
        return
    manifest, notes = convert(main, ds)
    named = [n for n in notes if re.match(rf"(\[\w+\] |dataset |\[\[directory\]\] )?{re.escape(key)}: ", n)]
    if handling == "mapped":
        assert manifest != base, f"{key}={value!r} changed nothing"
    elif handling == "noted":
        assert named, (key, notes)
    else:  # default: kubelora already does what diffusion-pipe does at this value
        assert manifest == base and notes == base_notes, (manifest, notes)


def test_examples_keep_diffusion_pipe_meaning():
    main, ds = _with("main", "lr_scheduler", "cosine")
    main["warmup_steps"] = 5
    ds["caption_prefix"] = "ohwx, "
    ds["num_repeats"] = 4           # top level: the default for each directory
    ds["skip_empty_caption"] = False
    ds["resolutions"] = [[1024, 768]]
    spec = convert(main, ds)[0]["spec"]
    assert spec["training"]["lrScheduler"] == "cosine" and spec["training"]["warmupSteps"] == 5
    assert spec["dataset"]["captionPrefix"] == "ohwx, " and spec["dataset"]["repeats"] == 4
    assert spec["dataset"]["missingCaption"] == "empty"
    assert spec["dataset"]["resolution"] == 880 == area_side([1024, 768], "flux")   # sqrt(1024*768) = 886.8 -> 880
    assert area_side([1024, 768], "ltx-video") == 896                               # LTX rounds to 32
    assert spec["training"]["maxGradNorm"] == 1.0  # diffusion-pipe clips at 1.0 unless told
    # a directory's own keys override the top level
    ds["directory"][0]["num_repeats"] = 2
    assert convert(main, ds)[0]["spec"]["dataset"]["repeats"] == 2


@pytest.mark.parametrize("model_type", list(MODELS))
def test_no_adapter_table_means_a_full_fine_tune(model_type):
    main = copy.deepcopy(BASE_MAIN)
    main["model"] = {**MODELS[model_type], "dtype": "bfloat16"}
    del main["adapter"]
    ds = {"size_buckets": [[960, 960, 121]], "directory": [{"path": "/d"}]} if model_type == "cosmos" else BASE_DATASET
    if model_type == "sdxl":  # diffusion-pipe trains SDXL's text encoders too unless their rates are 0
        with pytest.raises(ConfigError, match=r"\[model\] text_encoder_1_lr: diffusion-pipe's SDXL full fine-tune "
                                              r"trains both text encoders too"):
            convert(main, ds)
        main["model"].update(text_encoder_1_lr=0, text_encoder_2_lr=0)
        with pytest.raises(ConfigError, match=r"force_constant_lr: it sets every parameter group's rate"):
            convert({**main, "force_constant_lr": 2e-5}, ds)
    manifest, notes = convert(main, ds)
    assert manifest["spec"]["adapter"] == {"type": "full"}
    what = "UNet" if model_type == "sdxl" else "transformer"
    assert any(f"adapter: no [adapter] table: a full fine-tune of the {what}" in n for n in notes), notes
    assert parse_spec(manifest).adapter.type == "full"  # a valid manifest


def test_sdxl_learning_rates():
    main = copy.deepcopy(BASE_MAIN)
    main["model"] = {"type": "sdxl", "checkpoint_path": "/m/sdxl.safetensors", "dtype": "bfloat16",
                     "unet_lr": 4e-5, "text_encoder_1_lr": 2e-5, "text_encoder_2_lr": 2e-5, "v_pred": True}
    spec = convert(main, BASE_DATASET)[0]["spec"]
    # diffusion-pipe forces zero-terminal SNR whenever v_pred is set
    assert spec["model"]["vPred"] is True and spec["model"]["zeroTerminalSnr"] is True
    # false or unset: diffusion-pipe trains epsilon; kubelora reads the checkpoint, and says so
    for model in ({**main["model"], "v_pred": False}, {k: v for k, v in main["model"].items() if k != "v_pred"}):
        off, notes = convert({**main, "model": model}, BASE_DATASET)
        assert "vPred" not in off["spec"]["model"] and "zeroTerminalSnr" not in off["spec"]["model"]
        assert any(n.startswith("[model] v_pred: ") and "diffusion-pipe then trains epsilon" in n for n in notes), notes
    t = spec["training"]
    assert (t["learningRate"], t["textEncoderLearningRate"]) == (4e-5, 2e-5)
    main["model"]["text_encoder_2_lr"] = 1e-5
    with pytest.raises(ConfigError, match="text_encoder_2_lr: kubelora trains both SDXL text encoders at one rate"):
        convert(main, BASE_DATASET)


def test_sdxl_text_encoder_rates_of_zero_train_the_unet_alone():
    """diffusion-pipe's usual UNet-only setting, text_encoder_1_lr = text_encoder_2_lr = 0: a valid
    manifest with training.textEncoderLearningRate 0 (no LoRA on the text encoders), said in a note;
    one rate 0 and the other not is refused naming the key; a full fine-tune drops the 0."""
    main = copy.deepcopy(BASE_MAIN)
    main["model"] = {"type": "sdxl", "checkpoint_path": "/m/sdxl.safetensors", "dtype": "bfloat16",
                     "unet_lr": 4e-5, "text_encoder_1_lr": 0, "text_encoder_2_lr": 0}
    manifest, notes = convert(main, BASE_DATASET)
    assert parse_spec(manifest).training.textEncoderLearningRate == 0
    assert any(n.startswith("[model] text_encoder_1_lr: 0 for both text encoders") for n in notes), notes
    del main["adapter"]
    assert parse_spec(convert(main, BASE_DATASET)[0]).training.textEncoderLearningRate is None
    main["adapter"] = {"type": "lora", "rank": 16}
    main["model"]["text_encoder_2_lr"] = 1e-5
    with pytest.raises(ConfigError, match=r"text_encoder_2_lr: .*give them the same value \(0 for both trains the UNet"):
        convert(main, BASE_DATASET)


def test_video_buckets_and_hunyuan_transformer_override():
    main = copy.deepcopy(BASE_MAIN)
    main["model"] = {"type": "hunyuan-video", "ckpt_path": "/m/hv", "transformer_path": "/m/hv-fp8.safetensors",
                     "dtype": "bfloat16"}
    ds = {**BASE_DATASET, "frame_buckets": [1, 33, 65]}
    manifest, notes = convert(main, ds)
    spec = parse_spec(manifest)
    assert spec.model.ckptPath == "/m/hv" and spec.model.transformerPath == "/m/hv-fp8.safetensors"
    assert spec.dataset.frameBuckets == [1, 33, 65] and spec.dataset.frames is None
    main["model"] = {"type": "cosmos", "transformer_path": "/m/c.pt", "vae_path": "/m/v", "text_encoder_path": "/m/t",
                     "dtype": "bfloat16"}
    ds = {"size_buckets": [[960, 960, 121], [1280, 704, 121]], "directory": [{"path": "/d"}]}
    manifest, notes = convert(main, ds)
    assert (manifest["spec"]["dataset"]["width"], manifest["spec"]["dataset"]["frames"]) == (960, 121)
    assert any("nearest of 2 buckets" in n for n in notes)


def test_paths_resolve_against_where_diffusion_pipe_runs_then_the_map():
    main, ds = _with("directory", "path", "data/style")
    main["model"]["diffusers_path"] = "../models/flux"
    m = convert(main, ds, cwd="/home/u/diffusion-pipe", path_map={"/home/u/models": "s3://models"})[0]["spec"]
    assert m["dataset"]["uri"] == "/home/u/diffusion-pipe/data/style"
    assert m["model"]["diffusersPath"] == "s3://models/flux"


def test_several_directories_become_sources_with_their_own_repeats_and_overrides():
    ds = copy.deepcopy(BASE_DATASET)
    ds.update(num_repeats=2, enable_ar_bucket=True, resolutions=[512])
    ds["directory"].append({"path": "/data/more", "num_repeats": 5, "resolutions": [256, 512], "shuffle_tags": True,
                            "cache_shuffle_delimiter": "|"})
    spec = parse_spec(convert(BASE_MAIN, ds)[0])
    d = spec.dataset
    assert d.uri is None and d.enableArBucket and d.resolutions is None   # the areas differ: set per source
    a, b = d.sources
    assert (a.uri, a.repeats, a.resolutions, a.shuffleTags) == (BASE_DATASET["directory"][0]["path"], 2, [512], None)
    assert (b.uri, b.repeats, b.resolutions, b.shuffleTags, b.tagDelimiter) == ("/data/more", 5, [256, 512], True, "|")
    ds["directory"][1]["enable_ar_bucket"] = False   # not a per-source setting in kubelora
    with pytest.raises(ConfigError, match=r"\[\[directory\]\] enable_ar_bucket: '/data/more' sets dataset.enableArBucket "
                                          "differently"):
        convert(BASE_MAIN, ds)


def test_frame_buckets_are_rounded_down_to_the_familys_rule_as_diffusion_pipe_aligns_them():
    """diffusion-pipe's align_frames rounds a bucket down to 4k+1 (HunyuanVideo) or 8k+1 (LTX-Video);
    the manifest gets those counts, valid, with a note naming the key."""
    for model_type, given, want, moved in (("hunyuan-video", [1, 32, 33, 34], [1, 29, 33], "32 frames train as 29"),
                                           ("ltx-video", [24, 33], [1, 17, 33], "24 frames train as 17")):
        main, ds = _with("dataset", "frame_buckets", given, model_type)
        manifest, notes = convert(main, ds)
        assert parse_spec(manifest).dataset.frameBuckets == want
        named = [n for n in notes if n.startswith("dataset frame_buckets: ")]
        assert len(named) == 1 and moved in named[0], notes
    main, ds = _with("directory", "frame_buckets", [1, 32], "hunyuan-video")
    ds["directory"].append({"path": "/data/more"})
    manifest, notes = convert(main, ds)
    assert parse_spec(manifest).dataset.sources[0].frameBuckets == [1, 29]
    assert any(n.startswith("[[directory]] frame_buckets: 32 frames train as 29") for n in notes), notes
    main, ds = _base("ltx-video")
    ds = {"size_buckets": [[512, 512, 40]], "directory": [{"path": "/d"}]}
    manifest, notes = convert(main, ds)
    assert parse_spec(manifest).dataset.frames == 33
    assert any(n.startswith("dataset size_buckets: 40 frames train as 33") for n in notes), notes


def test_adapter_alpha_is_mapped_saying_diffusion_pipe_would_refuse_it():
    main, ds = _with("adapter", "alpha", 32)
    manifest, notes = convert(main, ds)
    assert parse_spec(manifest).adapter.alpha == 32
    assert [n for n in notes if n.startswith("[adapter] alpha: ")] == [
        "[adapter] alpha: mapped to adapter.alpha 32; diffusion-pipe would not have run this config (it refuses alpha "
        "and trains with alpha = rank): remove the key from the manifest to train as it does"]


def test_init_from_existing_becomes_init_from_with_the_layers_the_file_holds():
    """diffusion-pipe's file holds its own targets (the modulation linears too): for Flux and
    HunyuanVideo, whose importer knows them as one targetModules value, that value is set; for
    the others the targets note says the run refuses the file until targetModules lists them."""
    from kubelora_trainer.models.flux.targets import DIFFUSION_PIPE_TARGETS
    main, ds = _with("adapter", "init_from_existing", "runs/old/epoch50")
    manifest, notes = convert(main, ds, cwd="/home/u", path_map={"/home/u/runs": "s3://loras"})
    spec = parse_spec(manifest)
    assert spec.adapter.initFrom == "s3://loras/old/epoch50" and spec.adapter.targetModules == [DIFFUSION_PIPE_TARGETS]
    assert any(n.startswith("[adapter] type: adapter.targetModules set to the layers diffusion-pipe")
               for n in notes), notes
    main, ds = _with("adapter", "init_from_existing", "/runs/old", model_type="cosmos")
    manifest, notes = convert(main, ds)
    assert "targetModules" not in manifest["spec"]["adapter"]
    assert any("with init_from_existing, a file holding those layers is refused at the run's start until "
               "adapter.targetModules lists them" in n for n in notes), notes
    main, ds = _with("adapter", "init_from_existing", "/runs/old", model_type="sdxl")   # targets: the UNet's only
    notes = convert(main, ds)[1]
    assert any("a file holding time_emb_proj LoRA is refused at the run's start until adapter.targetModules lists it, "
               "and one holding text_projection LoRA is refused" in n for n in notes), notes


def test_mask_path_becomes_mask_uri_of_its_directory():
    """One [[directory]]: dataset.maskUri; several: each source's own (a directory without one has none),
    and the same folder shared by all is written on each source (there is no dataset-wide form)."""
    ds = copy.deepcopy(BASE_DATASET)
    ds["directory"][0]["mask_path"] = "/data/masks"
    assert parse_spec(convert(BASE_MAIN, ds)[0]).dataset.maskUri == "/data/masks"
    ds["directory"].append({"path": "/data/more"})
    d = parse_spec(convert(BASE_MAIN, ds)[0]).dataset
    assert d.maskUri is None and [s.maskUri for s in d.sources] == ["/data/masks", None]
    ds["directory"][1]["mask_path"] = "/data/masks"
    d = parse_spec(convert(BASE_MAIN, ds)[0]).dataset
    assert d.maskUri is None and [s.maskUri for s in d.sources] == ["/data/masks", "/data/masks"]


def test_unknown_model_types_are_refused():
    main = copy.deepcopy(BASE_MAIN)
    main["model"]["type"] = "wan"
    with pytest.raises(ConfigError, match=r"\[model\] type: 'wan' \(a diffusion-pipe model kubelora does not train"):
        convert(main, BASE_DATASET)


def test_shift_and_sigmoid_scale_train_as_in_diffusion_pipe():
    """shift (a constant, over flux_shift when both are set) and sigmoid_scale become training
    settings the flow-matching families apply after drawing t, in diffusion-pipe's order."""
    import torch
    from types import SimpleNamespace
    from kubelora_trainer.objectives import flow_timesteps
    main, ds = _base("flux")
    main["model"].update(shift=3.0, flux_shift=True, sigmoid_scale=1.5)
    manifest, notes = convert(main, ds)
    spec = parse_spec(manifest)
    assert (spec.training.timestepShift, spec.training.sigmoidScale, spec.model.fluxShift) == (3.0, 1.5, False)
    assert any(n.startswith("[model] flux_shift: ignored: shift is set too") for n in notes), notes
    t = flow_timesteps(4, spec.training, torch.Generator().manual_seed(0), "cpu", quantile=0.5)
    assert torch.allclose(t, torch.full((4,), 0.75))  # sigmoid(0) = 0.5, shifted: 3 x 0.5 / (1 + 2 x 0.5)
    n = torch.randn(3, generator=torch.Generator().manual_seed(1))
    drawn = flow_timesteps(3, spec.training, torch.Generator().manual_seed(1), "cpu")
    want = torch.sigmoid(1.5 * n)
    assert torch.allclose(drawn, 3 * want / (1 + 2 * want))
    plain = SimpleNamespace(timestepSampling="logit_normal", sigmoidScale=1.0, timestepShift=None)
    assert torch.allclose(flow_timesteps(3, plain, torch.Generator().manual_seed(1), "cpu"), torch.sigmoid(n))
    manifest["spec"]["model"]["fluxShift"] = True
    with pytest.raises(SpecError, match="training.timestepShift: a constant shift, where model.fluxShift"):
        parse_spec(manifest)
    main["model"]["timestep_sample_method"] = "uniform"  # diffusion-pipe ignores sigmoid_scale then
    manifest, notes = convert(main, ds)
    assert "sigmoidScale" not in manifest["spec"]["training"]
    assert any(n.startswith("[model] sigmoid_scale: ignored") for n in notes), notes


def test_errors_name_file_line_and_key():
    text = "output_dir = '/o'\n\n[model]\ntype = 'flux'\nshift = -3.0\n"
    assert find_line(text, "model", "shift") == 5 and find_line(text, "", "output_dir") == 1
    main = {"output_dir": "/o", "max_steps": 1, "model": {"type": "flux", "diffusers_path": "/m", "shift": -3.0},
            "adapter": {"rank": 4}, "optimizer": {"lr": 1e-4}}
    with pytest.raises(ConfigError, match=r"^train.toml:5: \[model\] shift: .*a number >= 0"):
        convert(main, None, sources={"main": Source("train.toml", text), "dataset": Source("ds.toml")})


def _cli(tmp_path, main_text, ds_text=None, *args):
    (tmp_path / "train.toml").write_text(main_text)
    if ds_text is not None:
        (tmp_path / "dataset.toml").write_text(ds_text)
    return subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "import-config", str(tmp_path / "train.toml"),
                           "--cwd", str(tmp_path), *args], capture_output=True, text=True)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    ok = ("output_dir = '/o'\ndataset = 'dataset.toml'\nmax_steps = 10\n[model]\ntype = 'flux'\n"
          "diffusers_path = '/m'\ndtype = 'bfloat16'\n[adapter]\ntype = 'lora'\nrank = 4\n[optimizer]\ntype = 'adamw'\nlr = 1e-4\n")
    ds = "resolutions = [512]\n[[directory]]\npath = 'data'\ncontrol_path = 'control'\n"
    p = _cli(tmp_path, ok, ds)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith(f"error: {tmp_path / 'dataset.toml'}:4: [[directory]] control_path: edit"), p.stderr
    p = _cli(tmp_path, ok.replace("max_steps = 10", "max_steps = = 10"), ds)
    assert p.returncode == 2 and "not valid TOML" in p.stderr and "line 3" in p.stderr and "Traceback" not in p.stderr
    p = _cli(tmp_path, "output_dir = '/o'\n", None)
    assert p.returncode == 2 and "no [model] table" in p.stderr
    p = subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "import-config", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "cannot read the config" in p.stderr and "Traceback" not in p.stderr
    p = _cli(tmp_path, ok, ds.replace("control_path = 'control'\n", "mask_path = 'masks'\n"))
    assert p.returncode == 0, p.stderr
    assert f"uri: {tmp_path / 'data'}" in p.stdout and f"maskUri: {tmp_path / 'masks'}" in p.stdout


# a wrongly typed value: (section, key, value, what the message says is expected)
BAD_VALUES = [
    ("optimizer", "lr", "abc", "a number"),
    ("adapter", "rank", "sixteen", "a whole number"),
    ("optimizer", "betas", 0.9, "two numbers"),
    ("optimizer", "eps", [1e-8], "a number"),
    ("main", "micro_batch_size_per_gpu", "4", "a whole number"),
    ("main", "max_steps", "100", "a whole number"),
    ("main", "compile", "yes", "true or false"),
    ("model", "guidance", "3.5", "a number"),
    ("model", "unet_lr", "1e-4", "a number", "sdxl"),
    ("dataset", "resolutions", 512, "a list of sides or \\[width, height\\] areas"),
    ("dataset", "resolutions", [[512]], "a list of sides or \\[width, height\\] areas"),
    ("dataset", "frame_buckets", 33, "a list of frame counts"),
    ("dataset", "size_buckets", [[960, 960]], "a list of \\[width, height, frames\\] buckets"),
    ("dataset", "num_repeats", "5", "a number"),
    ("dataset", "ar_buckets", [[512, 0]], "a list of width/height ratios"),
    ("dataset", "shuffle_tags", "false", "true or false"),
    ("directory", "cache_shuffle_num", -1, "a whole number >= 0"),
    ("directory", "path", 5, "a string"),
]


@pytest.mark.parametrize("section,key,value,expected,model_type", [(*b, "flux")[:5] for b in BAD_VALUES],
                         ids=[f"{b[1]}={b[2]!r}" for b in BAD_VALUES])
def test_wrongly_typed_values_are_refused_naming_the_key_and_the_type(section, key, value, expected, model_type):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: {re.escape(repr(value))}: expected {expected}"):
        convert(*_with(section, key, value, model_type))


def test_cli_type_error_is_one_line_with_file_line_and_key(tmp_path):
    main = ("output_dir = '/o'\ndataset = 'dataset.toml'\nmax_steps = 10\n[model]\ntype = 'flux'\n"
            "diffusers_path = '/m'\n[adapter]\nrank = 4\n[optimizer]\ntype = 'adamw'\nlr = 1e-4\n")
    p = _cli(tmp_path, main, "resolutions = [[512]]\n[[directory]]\npath = 'data'\n")
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith(f"error: {tmp_path / 'dataset.toml'}:1: dataset resolutions: [[512]]: expected"), p.stderr


@pytest.mark.parametrize("optimizer,betas,eps", [("adamw", [0.9, 0.999], 1e-8), ("adamw_optimi", [0.9, 0.99], 1e-6),
                                                 ("stableadamw", [0.9, 0.99], 1e-6), ("adamw8bit", [0.9, 0.999], 1e-8)])
def test_optimizer_keys_left_out_take_that_optimizers_defaults(optimizer, betas, eps):
    main, ds = _with("optimizer", "type", optimizer)
    t = convert(main, ds)[0]["spec"]["training"]
    assert (t["betas"], t["epsilon"], t["weightDecay"]) == (betas, eps, 0.01)
    main["optimizer"].update(betas=[0.8, 0.9], eps=1e-7, weight_decay=0.0)   # given: as given
    t = convert(main, ds)[0]["spec"]["training"]
    assert (t["betas"], t["epsilon"], t["weightDecay"]) == ([0.8, 0.9], 1e-7, 0.0)
    del main["optimizer"]["type"]
    with pytest.raises(ConfigError, match=r"\[optimizer\] type: no optimizer type"):
        convert(main, ds)


@pytest.mark.parametrize("settings,expected", [
    ({"ar_buckets": [1.0, 1.5]}, (1.0, 1.5, 2)),
    ({"ar_buckets": [[512, 512], [448, 576]]}, (0.778, 1.0, 2)),
    ({"ar_buckets": [1.5]}, (1.0, 2.25, 1)),                          # kubelora's one bucket: sqrt(minAr * maxAr)
    ({"min_ar": 0.5, "max_ar": 2.0, "num_ar_buckets": 1}, (0.25, 1.0, 1)),  # diffusion-pipe's one bucket is min_ar
    ({"min_ar": 0.25, "max_ar": 4.0, "num_ar_buckets": 9}, (0.25, 4.0, 9)),
    ({"ar_buckets": [1.5, 2.0]}, "aspect ratios 1.5, 2; kubelora's buckets are spaced evenly in log space"),
    ({"min_ar": 1.2, "max_ar": 2.0}, "min_ar: diffusion-pipe trains the aspect ratios 1.2, "),
])
def test_aspect_ratio_buckets_are_the_ratios_diffusion_pipe_trains(settings, expected):
    from kubelora_trainer.buckets import aspect_ratios
    from kubelora_trainer.import_rules import geomspace, ratios_list
    main, ds = _base()
    ds.update(enable_ar_bucket=True, **settings)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            convert(main, ds)
        return
    manifest, notes = convert(main, ds)
    d = parse_spec(manifest).dataset
    assert (d.minAr, d.maxAr, d.numArBuckets) == pytest.approx(expected)
    trained = aspect_ratios(True, d.minAr, d.maxAr, d.numArBuckets)
    wanted = ratios_list(settings["ar_buckets"]) if "ar_buckets" in settings else \
        geomspace(settings["min_ar"], settings["max_ar"], settings["num_ar_buckets"])
    assert trained == pytest.approx(wanted, abs=1e-3)
    if "ar_buckets" in settings:   # the note states the real ratios
        shown = ", ".join(f"{r:g}" for r in wanted)
        assert any(n.startswith(f"dataset ar_buckets: diffusion-pipe trains the aspect ratios {shown}:") for n in notes)


def test_aspect_ratio_settings_without_enable_ar_bucket_are_noted_not_applied():
    main, ds = _base()
    ds.update(ar_buckets=[1.0, 1.5], min_ar=0.25)
    manifest, notes = convert(main, ds)
    d = parse_spec(manifest).dataset   # a valid manifest
    assert not d.enableArBucket and "minAr" not in manifest["spec"]["dataset"]
    assert "dataset ar_buckets: no effect: enable_ar_bucket is not true (diffusion-pipe ignores it too)" in notes


@pytest.mark.parametrize("top,directory", [
    ({"cache_shuffle_num": 8, "shuffle_tags": False}, {}),
    ({"shuffle_tags": False, "cache_shuffle_num": 8}, {}),
    ({"cache_shuffle_num": 8}, {"shuffle_tags": False}),
    ({"shuffle_tags": False}, {"cache_shuffle_num": 8}),
])
def test_cache_shuffle_num_shuffles_whatever_shuffle_tags_says_in_any_order(top, directory):
    main, ds = _base()
    ds.update(top)
    ds["directory"][0].update(directory)
    manifest, notes = convert(main, ds)
    d = parse_spec(manifest).dataset
    assert (d.shuffleTags, d.shuffleVariants) == (True, 8)
    assert any("shuffle_tags: false, but cache_shuffle_num = 8 shuffles the tags anyway" in n for n in notes), notes


def test_shuffle_tags_alone_caches_one_shuffled_caption_and_a_delimiter_alone_is_noted():
    main, ds = _with("dataset", "shuffle_tags", True)
    d = parse_spec(convert(main, ds)[0]).dataset
    assert (d.shuffleTags, d.shuffleVariants) == (True, 1)
    main, ds = _with("dataset", "cache_shuffle_delimiter", "|")
    manifest, notes = convert(main, ds)
    assert "tagDelimiter" not in manifest["spec"]["dataset"]
    assert "dataset cache_shuffle_delimiter: no effect: no tags are shuffled" in notes


@pytest.mark.parametrize("model_type,expected", [("flux", 4), ("sdxl", 4), ("ltx-video", 1), ("hunyuan-video", 1)])
def test_image_families_train_at_image_micro_batch_size(model_type, expected):
    """diffusion-pipe batches 1-frame buckets by image_micro_batch_size_per_gpu; an image family has no other."""
    main, ds = _with("main", "image_micro_batch_size_per_gpu", 4, model_type)
    main["micro_batch_size_per_gpu"] = 1
    manifest, notes = convert(main, ds)
    assert manifest["spec"]["training"]["microBatchSize"] == expected
    assert any(n.startswith("image_micro_batch_size_per_gpu: one micro batch size") for n in notes) == (expected == 1)


@pytest.mark.parametrize("model_type", ["sdxl", "cosmos"])
def test_transformer_dtype_is_ignored_where_diffusion_pipe_ignores_it(model_type):
    base = convert(*_base(model_type))[0]
    main, ds = _with("model", "transformer_dtype", "float8", model_type)
    if model_type == "cosmos":
        ds = {"size_buckets": [[960, 960, 121]], "directory": [{"path": "/d"}]}
        base = convert(main | {"model": MODELS["cosmos"]}, ds)[0]
    manifest, notes = convert(main, ds)
    assert manifest == base
    assert f"[model] transformer_dtype: diffusion-pipe reads it for flux, ltx-video, hunyuan-video only; ignored for " \
           f"{model_type}, as there" in notes


def test_checkpoint_every_n_minutes_and_resume_notes():
    main, ds = _with("main", "checkpoint_every_n_minutes", 120)
    main["resume_from_checkpoint"] = True
    manifest, notes = convert(main, ds)
    assert parse_spec(manifest).training.checkpointEveryMinutes == 120
    assert not [n for n in notes if "not supported yet" in n or "not written yet" in n], notes
    assert any(n.startswith("resume_from_checkpoint: kubelora resumes by itself") for n in notes)


def test_a_setting_that_differs_between_directories_points_at_the_differing_line():
    text = "resolutions = [512]\n[[directory]]\npath = '/a'\n[[directory]]\npath = '/b'\nmin_ar = 0.5\n" \
           "enable_ar_bucket = true\n"
    ds = {"resolutions": [512], "directory": [{"path": "/a"}, {"path": "/b", "min_ar": 0.5, "enable_ar_bucket": True}]}
    assert find_line(text, "directory", "path", 1) == 5 and find_line(text, "directory", "path") == 3
    with pytest.raises(ConfigError, match=r"^ds.toml:7: \[\[directory\]\] enable_ar_bucket: '/b' sets "
                                          r"dataset.enableArBucket differently"):
        convert(BASE_MAIN, ds, sources={"main": Source("t.toml"), "dataset": Source("ds.toml", text)})


def test_map_refuses_a_uri_the_manifest_cannot_hold_saying_why():
    assert parse_map(["/data=s3://data", "/m=/mnt/m"]) == {"/data": "s3://data", "/m": "/mnt/m"}
    with pytest.raises(ConfigError, match=r"'s3://d' is not a URI the manifest can hold: bucket name 'd' has 1 "
                                          r"character; S3 bucket names are 3 to 63"):
        parse_map(["/data=s3://d"])
    with pytest.raises(ConfigError, match="expected LOCAL=URI"):
        parse_map(["/data"])


@pytest.mark.parametrize("model_type,layers", [("flux", "norm1.linear and norm1_context.linear"),
                                                ("hunyuan-video", "img_mod.linear and txt_mod.linear"),
                                                ("cosmos", "adaLN_modulation.1 and adaLN_modulation.2"),
                                                ("sdxl", "resnet's time_emb_proj"), ("ltx-video", None)])
def test_lora_layers_diffusion_pipe_adapts_beyond_kubelora_defaults_are_noted(model_type, layers):
    notes = [n for n in convert(*_base(model_type))[1] if n.startswith("[adapter] type: ")]
    if layers:
        assert len(notes) == 1 and layers in notes[0] and "adapter.targetModules" in notes[0], notes
    else:
        assert not notes, notes


@pytest.mark.parametrize("model_type,blocks", [
    ("flux", ("FluxTransformerBlock", "FluxSingleTransformerBlock")),
    ("hunyuan-video", ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"))])
def test_the_import_sets_the_target_modules_that_train_what_diffusion_pipe_trains(model_type, blocks):
    """diffusion-pipe adapts every nn.Linear inside the transformer's block classes (models/base.py
    get_target_modules; for HunyuanVideo its MMDoubleStreamBlock / MMSingleStreamBlock, diffusers'
    two block classes here). The value the import writes adapts exactly those linears of the tiny
    model, the modulation linears included, and nothing outside them; the note says how to drop it."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from kubelora_trainer.lora import peft_targets
    manifest, notes = convert(*_base(model_type))
    note = next(n for n in notes if n.startswith("[adapter] type: "))
    assert "delete the field for kubelora's default" in note, note
    spec = parse_spec(manifest)
    if model_type == "flux":
        from diffusers import FluxTransformer2DModel as Model
        from kubelora_trainer.models.flux.tiny import TINY_TRANSFORMER as config
    else:
        from diffusers import HunyuanVideoTransformer3DModel as Model
        from kubelora_trainer.models.hunyuan_video.tiny import TRANSFORMER as config
    model = Model(**config)
    trained_by_diffusion_pipe = {n for name, block in model.named_modules() if type(block).__name__ in blocks
                                 for n, m in block.named_modules(prefix=name) if isinstance(m, torch.nn.Linear)}
    assert any(n.endswith("norm1.linear") for n in trained_by_diffusion_pipe)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=peft_targets(spec.adapter.targetModules)), model)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == trained_by_diffusion_pipe


def test_target_modules_suffixes_stay_suffixes_and_patterns_are_checked():
    from kubelora_trainer.lora import peft_targets
    assert peft_targets(["to_q", "attn.to_k"]) == ["to_q", "attn.to_k"]   # peft's own suffix matching
    both = peft_targets(["attn.to_q", r"blocks\.\d+\.proj_out"])
    assert re.fullmatch(both, "transformer_blocks.3.attn.to_q") and re.fullmatch(both, "blocks.1.proj_out")
    assert not re.fullmatch(both, "proj_out") and not re.fullmatch(both, "transformer_blocks.3.attn.to_qx")
    manifest = convert(*_base())[0]
    manifest["spec"]["adapter"]["targetModules"] = ["to_q", "blocks.(1"]
    with pytest.raises(SpecError, match=r"spec.adapter.targetModules: entry 1, 'blocks.\(1', is not a regular "
                                        r"expression \(missing \)"):
        parse_spec(manifest)
    # compiles alone, not inside the group lora.peft_targets wraps it in: refused here, not mid-run
    manifest["spec"]["adapter"]["targetModules"] = ["to_q", "(?i)blocks.*"]
    with pytest.raises(SpecError, match=r"entry 1, '\(\?i\)blocks.\*', is not a regular expression \(global flags"):
        parse_spec(manifest)


@pytest.mark.parametrize("order", ["bypass first", "guidance first"])
def test_flux_bypassed_guidance_embedding_drops_guidance_with_a_note(order):
    """diffusion-pipe ignores guidance when bypass_guidance_embedding is true; the spec refuses the
    pair, so the import leaves guidance out, whichever key comes first, and says so."""
    main, ds = _base("flux")
    pairs = [("bypass_guidance_embedding", True), ("guidance", 3.5)]
    main["model"].update(pairs if order == "bypass first" else pairs[::-1])
    manifest, notes = convert(main, ds)
    model = manifest["spec"]["model"]
    assert model["bypassGuidanceEmbedding"] is True and "guidance" not in model
    assert any(n.startswith("[model] guidance: ignored: bypass_guidance_embedding") for n in notes), notes
    main["model"]["bypass_guidance_embedding"] = False
    model = convert(main, ds)[0]["spec"]["model"]
    assert model["guidance"] == 3.5 and not model.get("bypassGuidanceEmbedding")


def test_the_manifest_name_is_one_the_crd_accepts(tmp_path):
    from kubelora_trainer.spec import MAX_NAME, check_name, name_from

    def _slug(stem):
        return name_from(stem, "imported")
    for stem, want in [("2024_flux.v2", "lora-2024-flux-v2"), ("My Style__LoRA", "my-style-lora"), ("___", "imported"),
                       ("flux", "flux")]:
        assert _slug(stem) == want
        check_name(_slug(stem))
    long = _slug("a" * 40 + "-" + "b" * 40)
    assert len(long) <= MAX_NAME and not long.endswith("-")
    check_name(long)
    with pytest.raises(SpecError):
        check_name("flux\n")   # the API server's pattern matches the whole name
    from kubelora_trainer.spec import manifest_name
    bare = tmp_path / "2024_style.v1.yaml"   # `kubelora run` names a bare spec's job the same way
    bare.write_text("model: {type: flux}\n")
    assert manifest_name(bare) == "lora-2024-style-v1"


def test_a_cosmos_text_encoder_file_becomes_its_folder_with_the_tokenizer_named():
    """diffusion-pipe loads the T5 weights from the file and ships the tokenizer; kubelora reads both
    from a folder (an S3 object key would stage the weights alone)."""
    main, ds = _with("model", "text_encoder_path", "/models/cosmos/oldt5_xxl_fp16.safetensors", "cosmos")
    manifest, notes = convert(main, ds)
    assert manifest["spec"]["model"]["textEncoderPath"] == "/models/cosmos/"
    assert any(n.startswith("[model] text_encoder_path: kubelora reads the T5 encoder and its tokenizer from a folder")
               and "spiece.model" in n for n in notes), notes
    main, ds = _with("model", "text_encoder_path", "/models/cosmos/t5", "cosmos")
    assert convert(main, ds)[0]["spec"]["model"]["textEncoderPath"] == "/models/cosmos/t5"


def test_a_config_without_a_dataset_is_refused_naming_the_key():
    main, _ = _base("flux")
    main.pop("dataset", None)
    with pytest.raises(ConfigError, match=r"dataset: the config names no dataset file .*--dataset FILE or --data-uri URI"):
        convert(main, None)
    assert convert(main, None, data_uri="s3://data/set")[0]["spec"]["dataset"]["uri"] == "s3://data/set"


def test_an_area_kubelora_rounds_is_said():
    """diffusion-pipe keeps sqrt(w*h) and rounds only the bucket sides; kubelora's areas are
    multiples of 16, so a value that moves says so (it was silent for a plain 500)."""
    from kubelora_trainer.import_handlers import Ctx
    from kubelora_trainer.import_rules import resolutions
    ctx = Ctx("flux")
    resolutions(ctx, "resolutions", [500, 512])
    assert ctx.dataset["resolutions"] == [496, 512]
    assert any("500 trains at the area 496x496" in n and "512" not in n.split("(")[0] for n in ctx.notes), ctx.notes
    quiet = Ctx("flux")
    resolutions(quiet, "resolutions", [512, 1024])
    assert quiet.notes == []


def _items(folder: Path, n: int, caption="a red thing", size=(64, 48)):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", size, (200, 10, 10)).save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(caption)


def _epochs(main, ds, cwd="/", path_map=None, **keys):
    """convert with the config's max_steps replaced by `keys` (epochs, ...), reading the folders."""
    main = {**{k: v for k, v in main.items() if k != "max_steps"}, **keys}
    return convert(main, ds, read_dirs=read_dirs, cwd=cwd, path_map=path_map)


def test_epochs_become_steps_counted_from_the_local_dataset_folders(tmp_path):
    """4 epochs x 8 items x 2 repeats / micro batch 2 = 32 steps; what a run would skip (no
    caption, an empty file, an extreme aspect ratio) is not counted; --steps overrides."""
    data = tmp_path / "data"
    _items(data, 8)
    (data / "nocap.png").write_bytes((data / "0.png").read_bytes())
    (data / "empty.png").write_bytes(b"")
    (data / "empty.txt").write_text("x")
    _items(tmp_path / "strip", 1, size=(640, 8))
    (data / "strip.png").write_bytes((tmp_path / "strip" / "0.png").read_bytes())
    (data / "strip.txt").write_text("a strip")
    main, ds = _base()
    ds["directory"] = [{"path": str(data), "num_repeats": 2}]
    manifest, notes = _epochs(main, ds, epochs=4, micro_batch_size_per_gpu=2)
    assert manifest["spec"]["training"]["steps"] == 32
    note = next(n for n in notes if n.startswith("epochs:"))
    assert note.startswith("epochs: training.steps 32 = 4 epochs x 8 steps (16 samples / global batch 2"), note
    assert f"{data}: 8 items x 1 resolution x 2 repeats" in note and "1 without a caption" in note, note
    assert "1 emptyFile" in note and "1 extremeAspectRatio" in note and "x 1 GPU (assumed" in note, note
    assert "--steps N overrides" in note
    manifest, notes = convert({**main, "epochs": 4}, ds, steps=7, read_dirs=read_dirs)
    assert manifest["spec"]["training"]["steps"] == 7 and not any(n.startswith("epochs: training.steps") for n in notes)


def test_max_steps_caps_the_epochs_as_in_diffusion_pipe(tmp_path):
    """diffusion-pipe's loop stops at the end of its epochs or at max_steps, whichever comes first:
    10 epochs x 2 items = 20 steps with max_steps 100 trains 20, with max_steps 5 trains 5; when
    the items cannot be counted max_steps is the count, with a note saying so."""
    _items(tmp_path / "d", 2)
    main, ds = _base()
    ds["directory"] = [{"path": str(tmp_path / "d")}]
    for cap, want, says in ((100, 20, "is more than the 10 epochs' 20 steps: the run stops after the epochs"),
                            (5, 5, "ends the run before the 10 epochs (20 steps) do")):
        manifest, notes = convert({**main, "epochs": 10, "max_steps": cap}, ds, read_dirs=read_dirs)
        assert manifest["spec"]["training"]["steps"] == want
        assert any(n.startswith(f"max_steps: {cap} {says}, as diffusion-pipe stops at whichever") for n in notes), notes
    ds["directory"] = [{"path": "s3://bucket/data"}]
    manifest, notes = convert({**main, "epochs": 10, "max_steps": 100}, ds, read_dirs=read_dirs)
    assert manifest["spec"]["training"]["steps"] == 100
    assert any(n.startswith("epochs: the items could not be counted") and "pass --steps" in n for n in notes), notes


def test_each_directory_counts_its_resolutions_caption_variants_and_repeats(tmp_path):
    """(3 items x 2 areas x 2 shuffled captions x 1) + (2 x 2 x 2 x 3) = 36 samples, 18 in each of
    the two size buckets (one per area); diffusion-pipe cuts each bucket to a multiple of the
    global batch (micro batch 1 x accumulation 4): 4 steps each, 8 an epoch, 16 for 2 epochs; the
    2 x 2 samples left over are never trained there (said)."""
    _items(tmp_path / "a", 3, caption="red, thing")
    _items(tmp_path / "b", 2, caption="blue, thing")
    main, ds = _base()
    ds.update(resolutions=[512, 768], cache_shuffle_num=2,
              directory=[{"path": "a"}, {"path": "b", "num_repeats": 3}])
    manifest, notes = _epochs(main, ds, cwd=str(tmp_path), path_map={str(tmp_path): "s3://bucket/set"}, epochs=2,
                              gradient_accumulation_steps=4)
    assert manifest["spec"]["training"]["steps"] == 16
    assert [s["uri"] for s in manifest["spec"]["dataset"]["sources"]] == ["s3://bucket/set/a", "s3://bucket/set/b"]
    note = next(n for n in notes if n.startswith("epochs:"))
    assert f"{tmp_path / 'a'}: 3 items x 2 caption variants x 2 resolutions x 1 repeat = 12" in note, note
    assert f"{tmp_path / 'b'}: 2 items x 2 caption variants x 2 resolutions x 3 repeats = 24" in note, note
    assert "so 4 of the samples are never trained there, the same ones each epoch" in note, note
    # 2.5 epochs are 2 in diffusion-pipe (it runs whole epochs)
    manifest, notes = _epochs(main, ds, cwd=str(tmp_path), path_map={str(tmp_path): "s3://bucket/set"}, epochs=2.5,
                              gradient_accumulation_steps=4)
    assert manifest["spec"]["training"]["steps"] == 16
    assert any("2.5 epochs are 2 in diffusion-pipe, which runs whole epochs" in n for n in notes), notes


@pytest.mark.parametrize("path,why", [
    ("s3://bucket/data", "the items could not be counted: [[directory]] path s3://bucket/data is a URI, not a folder "
                         "on this machine"),
    ("missing", "the items could not be counted: {tmp}/missing ([[directory]] path 'missing', resolved against --cwd) "
                "does not exist on this machine"),
    ("empty", "the items could not be counted: {tmp}/empty holds no item kubelora would train (without a caption: 1,"),
])
def test_epochs_that_cannot_be_counted_say_why(tmp_path, path, why):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.png").write_bytes(b"")
    main, ds = _base()
    ds["directory"] = [{"path": path}]
    with pytest.raises(ConfigError, match=re.escape(f"epochs (3); {why.format(tmp=tmp_path)}") + ".*pass --steps"):
        _epochs(main, ds, cwd=str(tmp_path), epochs=3)


def test_videos_are_counted_by_the_clips_a_run_takes_from_them(tmp_path):
    """Each video is decoded as a run probes it: one too short for every frame bucket and one that
    does not decode are skipped (a run skips them), not counted; with multiple_overlapping a
    20-frame video gives 3 clips of 9 frames, each a sample of diffusion-pipe's epoch."""
    from kubelora_trainer.models.ltx_video.tiny import moving_square
    from kubelora_trainer.synthetic import write_video
    data = tmp_path / "clips"
    _items(data, 1)
    write_video(data / "long.mp4", moving_square(20))
    write_video(data / "short.mp4", moving_square(5))
    (data / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    for stem in ("long", "short", "broken"):
        (data / f"{stem}.txt").write_text("a clip")
    main, ds = _base("hunyuan-video")
    ds.update(frame_buckets=[1, 9], directory=[{"path": str(data)}])
    for mode, samples in (("single_beginning", 2), ("multiple_overlapping", 4)):
        manifest, notes = _epochs({**main, "video_clip_mode": mode}, ds, epochs=2)
        assert manifest["spec"]["training"]["steps"] == 2 * samples, (mode, notes)
        note = next(n for n in notes if n.startswith("epochs:"))
        assert f"({samples} samples / global batch 1" in note and "1 corrupt, 1 tooShort" in note, note
    assert f"{data}: 2 items (4 clips) x 1 resolution x 1 repeat = 4 (not counted" in note, note


def test_kohya_repeat_folders_are_noted_with_the_sources_to_write(tmp_path):
    """img/10_mystyle (kohya: 10 repeats) trains at num_repeats in kubelora: the import says so
    from the path's name. Inside a [[directory]] folder it is not trained at all, as diffusion-pipe
    reads only the folder's own files (path.glob('*')): the import writes recursive: false and
    says how many files that leaves out; the scan counts them."""
    _items(tmp_path / "img" / "10_mystyle", 1)
    _items(tmp_path / "img" / "plain", 1)
    _items(tmp_path / "img", 1)
    main, ds = _base()
    ds["directory"] = [{"path": "img"}]
    manifest, notes = convert(main, ds, cwd=str(tmp_path), path_map={str(tmp_path): "s3://bucket/set"},
                              read_dirs=read_dirs)
    assert manifest["spec"]["dataset"]["recursive"] is False and not any("kohya" in n for n in notes), notes
    # a .tar shard in the folder: diffusion-pipe trains its members, kubelora does not (said)
    (tmp_path / "img" / "shard-0.tar").write_bytes(b"")
    _, notes = convert(main, ds, cwd=str(tmp_path), path_map={str(tmp_path): "s3://bucket/set"}, read_dirs=read_dirs)
    assert any(n.startswith("dataset: 1 .tar archive(s) in the [[directory]] folders are not trained") for n in notes), notes
    (tmp_path / "img" / "shard-0.tar").unlink()
    assert any(n.startswith("dataset: 2 media file(s) in subfolders of the [[directory]] folders are not trained")
               for n in notes), notes
    from kubelora_trainer.data import scan
    shallow, deep = scan(tmp_path / "img", recursive=False), scan(tmp_path / "img")
    assert (len(shallow.items), shallow.in_subfolders, shallow.summary()["inSubfolders"]) == (1, 2, 2)
    assert (len(deep.items), deep.in_subfolders) == (3, 0) and "inSubfolders" not in deep.summary()
    assert next(iter(deep.kohya)).endswith("10_mystyle")
    ds["directory"] = [{"path": "s3://bucket/img/5_other", "num_repeats": 2}]
    _, notes = convert(main, ds, read_dirs=read_dirs)
    assert any("s3://bucket/img/5_other (5)" in n and "repeats: 5" in n for n in notes), notes
    ds["directory"] = [{"path": "s3://bucket/img/5_other", "num_repeats": 5}]
    assert not any("kohya" in n for n in convert(main, ds, read_dirs=read_dirs)[1])  # already repeated so


def test_cli_counts_epochs_in_a_local_dataset(tmp_path):
    _items(tmp_path / "data", 8)
    # warmup_steps as diffusion-pipe's example has it, longer than the run: trimmed with a note, not refused
    main = ("output_dir = '/o'\ndataset = 'dataset.toml'\nepochs = 4\nmicro_batch_size_per_gpu = 2\n"
            "warmup_steps = 100\n[model]\n"
            "type = 'flux'\ndiffusers_path = '/m'\n[adapter]\nrank = 4\n[optimizer]\ntype = 'adamw'\nlr = 1e-4\n")
    p = _cli(tmp_path, main, "resolutions = [512]\n[[directory]]\npath = 'data'\nnum_repeats = 2\n")
    assert p.returncode == 0, p.stderr
    assert "steps: 32" in p.stdout and "note: epochs: training.steps 32 = 4 epochs x 8 steps (16 samples" in p.stderr
    # diffusion-pipe's run ends inside its warmup (LinearLR over 100 steps, uncapped): the same ramp
    assert "warmupSteps: 32" in p.stdout and "learningRate: 3.2e-05" in p.stdout, p.stdout
    assert ("warmup_steps: 100 is more than the 32 steps: diffusion-pipe's run ends inside its warmup, at 0.32 of the "
            "learning rate") in p.stderr, p.stderr


def test_eval_datasets_become_the_evaluation_section():
    """diffusion-pipe's eval_datasets (each eval dataset TOML's [[directory]] folders) and eval_* keys ->
    spec.evaluation; eval_every_n_examples as diffusion-pipe computes it, per GPU."""
    main = {**copy.deepcopy(BASE_MAIN), "micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "eval_datasets": [{"name": "held", "config": "eval.toml"}, "more.toml"],
            "eval_every_n_examples": 100, "eval_every_n_epochs": 2, "eval_before_first_step": False,
            "eval_micro_batch_size_per_gpu": 1, "eval_gradient_accumulation_steps": 4}
    tomls = [("eval.toml", {"resolutions": [512], "directory": [{"path": "held/a", "mask_path": "/m/a"},
                                                              {"path": "/data/b", "num_repeats": 3}]}),
             ("more.toml", None)]
    manifest, notes = convert(main, copy.deepcopy(BASE_DATASET), cwd="/home/u/dp", path_map={"/data": "s3://bkt"},
                              eval_tomls=tomls)
    ev = parse_spec(manifest).evaluation
    assert [(s.uri, s.maskUri) for s in ev.sources] == [("/home/u/dp/held/a", "/m/a"), ("s3://bkt/b", None)]
    assert (ev.everySteps, ev.everyEpochs, ev.beforeFirstStep, ev.microBatchSize) == (25, 2, False, 1)
    said = "\n".join(notes)
    assert "eval_every_n_examples: 100 examples: evaluation.everySteps 25 (= 100 // 4" in said
    assert "eval.toml: num_repeats, resolutions not read" in said and "more.toml not read" in said
    assert "eval_gradient_accumulation_steps: batching only" in said
    # without eval_datasets the eval keys say that nothing is evaluated
    manifest, notes = convert({**copy.deepcopy(BASE_MAIN), "eval_every_n_steps": 5}, copy.deepcopy(BASE_DATASET))
    assert "evaluation" not in manifest["spec"] and "eval_every_n_steps: no eval_datasets: no evaluation runs" in notes


def test_eval_every_n_epochs_counts_diffusion_pipe_epochs_with_shuffled_captions():
    """A diffusion-pipe epoch holds each of an item's cache_shuffle_num captions, a kubelora epoch
    one drawn per sample: eval_every_n_epochs 2 with 3 variants is every 6 kubelora epochs."""
    main = {**copy.deepcopy(BASE_MAIN), "eval_datasets": ["e.toml"], "eval_every_n_epochs": 2}
    tomls = [("e.toml", {"directory": [{"path": "/data/held"}]})]
    ds = {**copy.deepcopy(BASE_DATASET), "cache_shuffle_num": 3}
    manifest, notes = convert(main, ds, eval_tomls=tomls)
    assert manifest["spec"]["evaluation"]["everyEpochs"] == 6
    assert any(n.startswith("eval_every_n_epochs: 2: evaluation.everyEpochs 6: a diffusion-pipe epoch holds each of "
                            "the 3 shuffled captions") for n in notes), notes
    ds["directory"] = [{"path": "/data/a"}, {"path": "/data/b", "cache_shuffle_num": 2}]
    manifest, notes = convert(main, ds, eval_tomls=tomls)
    assert manifest["spec"]["evaluation"]["everyEpochs"] == 2
    assert any("(2/3 across the directories): evaluated more often; set evaluation.everySteps" in n for n in notes), notes
    manifest, notes = convert(main, copy.deepcopy(BASE_DATASET), eval_tomls=tomls)
    assert manifest["spec"]["evaluation"]["everyEpochs"] == 2 and not any("everyEpochs" in n for n in notes)


def test_eval_every_n_examples_divides_by_deepspeeds_micro_batch():
    """diffusion-pipe: eval_every_n_examples // (micro_batch_size_per_gpu x accumulation x GPUs),
    also for an image family that trains at image_micro_batch_size_per_gpu."""
    main = {**copy.deepcopy(BASE_MAIN), "eval_datasets": ["e.toml"], "eval_every_n_examples": 100,
            "micro_batch_size_per_gpu": 2, "image_micro_batch_size_per_gpu": 4}
    manifest, _ = convert(main, copy.deepcopy(BASE_DATASET), eval_tomls=[("e.toml", {"directory": [{"path": "/h"}]})])
    assert manifest["spec"]["training"]["microBatchSize"] == 4 and manifest["spec"]["evaluation"]["everySteps"] == 50


def test_cli_reads_the_eval_dataset_tomls(tmp_path):
    from kubelora_trainer.import_config import load_eval_tomls
    (tmp_path / "eval.toml").write_text("[[directory]]\npath = '/data/held'\n")
    got = load_eval_tomls({"eval_datasets": [{"name": "e", "config": "eval.toml"}, "gone.toml"]}, tmp_path)
    assert got == [("eval.toml", {"directory": [{"path": "/data/held"}]}), ("gone.toml", None)]


def test_settings_that_act_together_mean_what_they_do_in_diffusion_pipe():
    """Read against diffusion-pipe's train.py and utils/dataset.py: gradient_release steps the
    optimizer after each micro-batch with clipping forced off (an ordinary unclipped step with one
    micro-batch; another optimizer with accumulation: refused); size_buckets win over resolutions."""
    main, ds = copy.deepcopy(BASE_MAIN), copy.deepcopy(BASE_DATASET)
    main["optimizer"]["gradient_release"] = True
    manifest, notes = convert(main, ds)
    assert manifest["spec"]["training"]["maxGradNorm"] is None and parse_spec(manifest).training.maxGradNorm is None
    assert any(n.startswith("[optimizer] gradient_release: an ordinary step per micro-batch") for n in notes), notes
    main["gradient_accumulation_steps"] = 4
    with pytest.raises(ConfigError, match=r"gradient_release: with gradient_accumulation_steps = 4 diffusion-pipe makes 4 "
                                          r"optimizer updates per step"):
        convert(main, ds)
    main, ds = copy.deepcopy(BASE_MAIN), copy.deepcopy(BASE_DATASET)
    ds["size_buckets"] = [[512, 768, 1]]
    manifest, notes = convert(main, ds)
    d = manifest["spec"]["dataset"]
    assert (d["width"], d["height"]) == (512, 768) and "resolution" not in d and "resolutions" not in d, d
    assert any("resolutions: ignored: size_buckets set the sizes" in n for n in notes), notes


def test_init_from_existing_trains_exactly_the_files_layers_for_flux_and_sdxl(tmp_path):
    """diffusion-pipe's flux and sdxl build the LoRA from the init_from_existing file (diffusers'
    load_lora_weights; configure_adapter is skipped): its layers at its rank, the text encoders
    only where the file has them. Read here: adapter.targetModules is one exact pattern of the
    file's layers, adapter.rank the file's; an SDXL file without text-encoder layers trains the UNet
    alone. Not here: a note."""
    import torch
    from safetensors.torch import save_file
    from kubelora_trainer.import_rules import exact_pattern

    def lora(folder, component, modules, rank=4):
        folder.mkdir(parents=True)
        save_file({f"{component}.{m}.lora_{ab}.weight": torch.zeros((rank, 8) if ab == "A" else (8, rank))
                   for m in modules for ab in "AB"}, folder / "adapter.safetensors")
    flux_mods = ["transformer_blocks.0.attn.to_q", "transformer_blocks.10.attn.to_k", "single_transformer_blocks.1.proj_mlp"]
    lora(tmp_path / "old", "transformer", flux_mods)
    main, ds = _with("adapter", "init_from_existing", "old")
    manifest, notes = convert(main, ds, cwd=str(tmp_path), read_dirs=read_dirs)
    a = manifest["spec"]["adapter"]
    assert a["targetModules"] == [exact_pattern(flux_mods)] and a["rank"] == 4, a
    pattern = re.compile(a["targetModules"][0])
    assert all(pattern.fullmatch(m) for m in flux_mods)
    assert not any(pattern.fullmatch(m) for m in ("transformer_blocks.1.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                  "single_transformer_blocks.1.proj_mlp.x"))
    assert any(n.startswith("[adapter] init_from_existing: adapter.targetModules: the 3 transformer layers of "
                            "adapter.safetensors") for n in notes), notes
    assert any(n.startswith("[adapter] rank: 16 replaced by 4") for n in notes), notes
    assert parse_spec(manifest).adapter.targetModules == a["targetModules"]
    # an SDXL file of UNet layers only: the text encoders are not trained
    lora(tmp_path / "unet-only", "unet", ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"])
    main, ds = _with("adapter", "init_from_existing", "unet-only", model_type="sdxl")
    manifest, notes = convert(main, ds, cwd=str(tmp_path), read_dirs=read_dirs)
    assert manifest["spec"]["training"]["textEncoderLearningRate"] == 0, manifest["spec"]["training"]
    assert any("it has no text-encoder layers, so the text encoders are not trained" in n for n in notes), notes
    # its text-encoder rates do nothing there (no text-encoder LoRA is built): not refused for differing
    main["model"].update(text_encoder_1_lr=1e-5, text_encoder_2_lr=2e-5)
    manifest, _ = convert(main, ds, cwd=str(tmp_path), read_dirs=read_dirs)
    assert manifest["spec"]["training"]["textEncoderLearningRate"] == 0
    # not on this machine: a note, diffusion-pipe's default set
    main, ds = _with("adapter", "init_from_existing", "/elsewhere/old")
    manifest, notes = convert(main, ds, read_dirs=read_dirs)
    assert any(n.startswith("[adapter] init_from_existing: diffusion-pipe trains exactly the layers of /elsewhere/old")
               for n in notes), notes
