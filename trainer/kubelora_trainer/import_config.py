"""diffusion-pipe config (main TOML with its [model], [adapter], [optimizer] tables, plus the
dataset TOML it names) -> a LoRATrainingJob manifest.

    kubelora import-config train.toml [--dataset dataset.toml] [--name NAME] [--data-uri s3://...]
        [--output-uri s3://...] [--steps N] [--map /data=s3://bucket] [--cwd DIR] > job.yaml

Every key is mapped with diffusion-pipe's meaning, noted, or refused (import_rules.py has the
tables; docs/import-config.md lists them). Relative paths resolve as diffusion-pipe resolves
them: against the directory it was started from (--cwd, default the current one), not the
TOML's folder. `convert` is pure (dicts in, manifest and notes out) but for the dataset folders
it is given a reader for (import_dataset.read_dirs, which the CLI passes): when they are on this
machine, `epochs` without --steps or max_steps become training.steps counted from their items, and
folders named like kohya's `<repeats>_<name>` are noted. `load` reads the files and turns TOML and
key errors into `ConfigError`s that name the file, line and key.
"""
from __future__ import annotations

import copy
import posixpath
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

from .data import kohya_note, kohya_number
from .import_dataset import Uncountable, epoch_steps
from .import_handlers import Ctx, Refused, label
from .spec import name_from, parse_spec, uri_problem
from .import_rules import (MODEL_TYPES, OTHER_MODEL_TYPES, apply, batch_size, evaluation, exact_pattern, family_module,
                           finish_dataset, optimizer_defaults)


class ConfigError(ValueError):
    pass


@dataclass
class Source:
    """A TOML file's name and text, for error locations."""
    name: str
    text: str = ""

    def where(self, section: str, key: str, index: Optional[int] = None) -> str:
        line = find_line(self.text, section, key, index)
        return f"{self.name}:{line}" if line else self.name


def find_line(text: str, section: str, key: str, index: Optional[int] = None) -> Optional[int]:
    """1-based line of `key = ...` inside table `section` ("" for the top level, "directory" for
    the index-th [[directory]] (0-based; any one when None)), or None."""
    current, n = "", -1
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        m = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?(\s*#.*)?", line)
        if m:
            current = m[1]
            n += current == "directory"
            continue
        if current == section and (index is None or n == index) and re.match(rf"{re.escape(key)}\s*=", line):
            return i
    return None


def convert(main: dict[str, Any], dataset: Optional[dict[str, Any]] = None, *, name: str = "imported",
            data_uri: Optional[str] = None, output_uri: Optional[str] = None, steps: Optional[int] = None,
            path_map: Optional[dict[str, str]] = None, cwd: str = "/",
            sources: Optional[dict[str, Source]] = None, read_dirs: Optional[Callable] = None,
            eval_tomls: Optional[list[tuple[str, Optional[dict]]]] = None) -> tuple[dict, list[str]]:
    """Returns (manifest, notes); raises ConfigError naming the file, line and key. path_map
    rewrites local path prefixes (e.g. {'/data/models': 's3://models'}) so a workstation config
    points at the bucket the cluster reads. read_dirs (import_dataset.read_dirs) reads the
    [[directory]] folders where they are on this machine; without it they are not looked at.
    eval_tomls: eval_datasets' TOMLs as (config path, parsed or None), from load_eval_tomls."""
    sources = sources or {"main": Source("the config"), "dataset": Source("the dataset config")}
    try:
        return _convert(main, dataset, name, data_uri, output_uri, steps, path_map or {}, cwd, read_dirs, eval_tomls)
    except Refused as e:
        src = sources["dataset" if e.section in ("dataset", "directory") else "main"]
        table = "" if e.section == "dataset" else e.section
        raise ConfigError(f"{src.where(table, e.key, e.index)}: {label(e.section)}{e.key}: {e}") from None


def _convert(main, dataset, name, data_uri, output_uri, steps, path_map, cwd, read_dirs,
             eval_tomls=None) -> tuple[dict, list[str]]:
    def resolve(p: str) -> str:
        """A path as diffusion-pipe opens it (relative to where it runs)."""
        if not re.match(r"^[a-z0-9]+://", p) and not p.startswith("/"):
            p = posixpath.normpath(str(PurePosixPath(cwd) / p))
        return p

    def local(p: str) -> str:
        """A path as diffusion-pipe opens it, then --map applied."""
        p = resolve(p)
        for prefix, remote in sorted(path_map.items(), key=lambda kv: -len(kv[0])):
            if p == prefix or p.startswith(prefix.rstrip("/") + "/"):
                return remote.rstrip("/") + "/" + p[len(prefix):].lstrip("/")
        return p

    for section in ("model", "adapter", "optimizer", "monitoring"):
        if section in main and not isinstance(main[section], dict):
            raise Refused("", section, f"expected a [{section}] table")
    if "model" not in main:
        raise Refused("", "model", "no [model] table; a diffusion-pipe config needs one (type = 'flux', ...)")
    model = dict(main.get("model") or {})
    raw_type = str(model.get("type", ""))
    if raw_type not in MODEL_TYPES:
        other = " (a diffusion-pipe model kubelora does not train yet)" if raw_type in OTHER_MODEL_TYPES else ""
        raise Refused("model", "type", f"{raw_type!r}{other}: kubelora trains {', '.join(MODEL_TYPES)}")
    ctx = Ctx(model_type=MODEL_TYPES[raw_type])
    ctx.model["type"] = ctx.model_type
    ctx.extra.update(map_path=local, dtype=model.get("dtype"))
    apply(ctx, "main", main)
    apply(ctx, "model", model)
    for key, note in getattr(family_module(ctx.model_type), "ABSENT_NOTES", {}).items():
        if key not in model:  # what diffusion-pipe does without the key, where kubelora's default differs
            ctx.section = "model"
            ctx.note(key, note)
    if ctx.training.get("timestepShift") and ctx.model.pop("fluxShift", None):
        ctx.section = "model"
        ctx.note("flux_shift", "ignored: shift is set too, and diffusion-pipe then shifts by the constant")
    if ctx.training.get("timestepSampling") == "uniform" and ctx.training.pop("sigmoidScale", None):
        ctx.section = "model"
        ctx.note("sigmoid_scale", "ignored: it scales the logit-normal draw, and timestep_sample_method is uniform "
                                  "(diffusion-pipe ignores it too)")
    full = "adapter" not in main  # diffusion-pipe's full fine-tune
    if full:
        ctx.adapter["type"] = "full"
        ctx.section = ""
        ctx.note("adapter", "no [adapter] table: a full fine-tune of the "
                            f"{'UNet' if ctx.model_type == 'sdxl' else 'transformer'} (adapter.type full)")
        if ctx.output.pop("dtype", None):
            ctx.note("save_dtype", "a full fine-tune's files are written in model.dtype")
    else:
        apply(ctx, "adapter", main["adapter"])
        importer = family_module(ctx.model_type)
        same = getattr(importer, "DIFFUSION_PIPE_TARGETS", None)
        if same and "targetModules" not in ctx.adapter:
            # train what diffusion-pipe trains (and, with init_from_existing, the layers its file holds)
            ctx.adapter["targetModules"] = [same]
            ctx.note("type", importer.TARGETS_NOTE)
        elif note := getattr(importer, "LORA_TARGETS_NOTE", None):
            if "initFrom" in ctx.adapter:
                note += getattr(importer, "INIT_FROM_NOTE", "; with init_from_existing, a file holding those layers is "
                                "refused at the run's start until adapter.targetModules lists them")
            ctx.note("type", note)
    apply(ctx, "optimizer", main.get("optimizer") or {})
    optimizer_defaults(ctx)
    apply(ctx, "monitoring", main.get("monitoring") or {})
    batch_size(ctx)
    if not full and "init_from_existing" in ctx.extra:  # before the rates: a file may leave the text encoders out
        init_targets(ctx, resolve(ctx.extra["init_from_existing"]), may_read=read_dirs is not None)
    _learning_rates(ctx)
    if full and ctx.model_type == "sdxl":
        te = [ctx.extra.get(k, ctx.extra.get("lr")) for k in ("text_encoder_1_lr", "text_encoder_2_lr")]
        if float(ctx.extra.get("force_constant_lr") or 0):
            raise Refused("", "force_constant_lr", "it sets every parameter group's rate, and diffusion-pipe's SDXL "
                                                   "full fine-tune trains both text encoders too; kubelora's trains "
                                                   "the UNet only: remove it to import a fine-tune of the UNet")
        if any(v is None or float(v) != 0 for v in te):
            raise Refused("model", "text_encoder_1_lr", "diffusion-pipe's SDXL full fine-tune trains both text "
                                                        "encoders too (text_encoder_1_lr and text_encoder_2_lr "
                                                        "default to [optimizer] lr); kubelora's trains the UNet only: "
                                                        "set both to 0 to import it as a fine-tune of the UNet")
        ctx.training.pop("textEncoderLearningRate", None)  # 0: the UNet alone, as kubelora's full fine-tune
    if ctx.extra.get("gradient_release"):
        gradient_release(ctx, main)
    ds_uri = _dataset(ctx, dataset, local)
    dirs = [(str(d["path"]), resolve(str(d["path"])), resolve(str(d["mask_path"])) if d.get("mask_path") else None)
            for d in (dataset or {}).get("directory") or []]

    if "gradient_clipping" not in main and not ctx.extra.get("gradient_release"):
        ctx.training["maxGradNorm"] = 1.0  # diffusion-pipe's default
    out_uri = output_uri or (local(ctx.extra["output_dir"]) if ctx.extra.get("output_dir") else None)
    if not out_uri:
        raise Refused("", "output_dir", "the config has no output_dir; add it or pass --output-uri")
    if data_uri and "sources" in ctx.dataset:
        raise Refused("directory", "path", "--data-uri names one folder but the dataset has several [[directory]] "
                                           "entries: use --map LOCAL=URI for their paths")
    if "sources" not in ctx.dataset and not (data_uri or ds_uri):
        raise Refused("", "dataset", "the config names no dataset file (diffusion-pipe needs one): add "
                                     "dataset = 'dataset.toml', or pass --dataset FILE or --data-uri URI")
    data = ctx.dataset if "sources" in ctx.dataset else {"uri": data_uri or ds_uri, **ctx.dataset}
    data["recursive"] = False  # diffusion-pipe reads each [[directory]]'s own files (path.glob('*'))
    spec = {"model": ctx.model, "dataset": data, "adapter": ctx.adapter,
            "training": ctx.training, "output": {"uri": out_uri, **ctx.output}}
    if ev := evaluation(ctx, eval_tomls, local):
        spec["evaluation"] = ev
    manifest = {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                "metadata": {"name": name_from(name, "imported")}, "spec": spec}
    _steps(ctx, main, manifest, steps, dirs, read_dirs)
    return manifest, list(dict.fromkeys(ctx.notes))  # a top-level dataset key's note once, not per directory


def _steps(ctx: Ctx, main: dict, manifest: dict, steps: Optional[int], dirs, read_dirs) -> None:
    """training.steps: --steps, else diffusion-pipe's epochs counted in the dataset folders (when
    read_dirs can read them all) capped by max_steps (diffusion-pipe stops at whichever comes
    first), else max_steps; and a note on folders named like kohya's `<repeats>_<name>`, from the
    folders' contents when read, else from the paths' names."""
    max_steps = ctx.extra.get("max_steps")
    count = steps is None and "epochs" in main
    reports, spec = None, None
    if read_dirs and dirs:
        draft = copy.deepcopy(manifest)
        # the step count is not known yet: enough steps that the draft's warmup fits (the real
        # count trims an overlong warmup later, with a note)
        training = draft["spec"]["training"]
        training["steps"] = max(steps or max_steps or 1, training.get("warmupSteps") or 0, 1)
        spec = parse_spec(draft)  # an invalid manifest stops here, as it would after the import
        reports = read_dirs(spec, dirs, probe=count)
    ds = manifest["spec"]["dataset"]
    srcs = ds.get("sources") or [{"uri": ds["uri"], "repeats": ds.get("repeats", 1)}]
    if isinstance(reports, list):
        folders = {f: v for r in reports for f, v in r.kohya.items()}
    else:  # not read: the paths' own names
        folders = {s["uri"]: (n, i) for i, s in enumerate(srcs[:len(dirs)]) if (n := kohya_number(s["uri"])) is not None}
    if lines := kohya_note(folders, [s.get("repeats", 1) for s in srcs]):
        ctx.notes.append("dataset: " + "\n".join(lines))
    if isinstance(reports, list) and (below := sum(r.in_subfolders for r in reports)):
        ctx.notes.append(f"dataset: {below} media file(s) in subfolders of the [[directory]] folders are not trained, "
                         "as diffusion-pipe reads only each folder's own files (dataset.recursive: false); list a "
                         "subfolder as its own source to train it, or set recursive: true to train them all")
    if isinstance(reports, list) and (tars := sum(r.ignored.get(".tar", 0) for r in reports)):
        ctx.notes.append(f"dataset: {tars} .tar archive(s) in the [[directory]] folders are not trained: diffusion-pipe "
                         "trains their members, kubelora reads plain files only; unpack them into the folder")
    why, counted = None, None
    if count:
        if isinstance(reports, list):
            try:
                counted, note = epoch_steps(spec, reports, dirs, float(main["epochs"]))
                ctx.notes.append(note)
            except Uncountable as e:
                why = str(e)
        else:
            why = (reports if isinstance(reports, str) else "the dataset folders were not read" if dirs else
                   "the config names no [[directory]] folder to count the items of")
    if steps is None:
        epochs = main.get("epochs", "?")
        if counted is not None:
            steps = min(counted, max_steps or counted)
            if max_steps:
                ctx.notes.append((
                    f"max_steps: {max_steps} ends the run before the {epochs} epochs ({counted} steps) do"
                    if max_steps < counted else
                    f"max_steps: {max_steps} is more than the {epochs} epochs' {counted} steps: the run stops after "
                    "the epochs") + ", as diffusion-pipe stops at whichever comes first")
        elif max_steps:
            steps = max_steps
            if "epochs" in main:
                ctx.notes.append(f"epochs: the items could not be counted ({why}), so training.steps is max_steps "
                                 f"= {max_steps}; diffusion-pipe stops after {epochs} epochs when they end sooner: "
                                 "pass --steps to match them")
        else:
            because = f"; the items could not be counted: {why}" if why else ""
            raise Refused("", "epochs", f"kubelora trains for a number of steps; diffusion-pipe counts epochs "
                                        f"({epochs}){because}: pass --steps (a diffusion-pipe epoch "
                                        "is every item x resolution x caption variant x num_repeats, so steps = "
                                        "epochs x that / (micro batch x accumulation x GPUs)) or set max_steps")
    elif max_steps and max_steps != steps:
        ctx.notes.append(f"max_steps: {max_steps} replaced by --steps {steps}")
    if "epochs" in main and not count:
        ctx.notes.append(f"epochs: kubelora trains training.steps = {steps} steps, however many epochs that is "
                         f"(diffusion-pipe stops after {main['epochs']} epochs)")
    ctx.training["steps"] = steps
    warmup = ctx.training.get("warmupSteps", 0)
    if warmup > steps:  # diffusion-pipe's run ends inside its warmup, at lr x steps / warmup_steps
        part = steps / warmup
        ctx.training["warmupSteps"] = steps
        for rate in ("learningRate", "textEncoderLearningRate"):
            if ctx.training.get(rate):
                ctx.training[rate] = float(f"{ctx.training[rate] * part:.6g}")
        ctx.notes.append(f"warmup_steps: {warmup} is more than the {steps} steps: diffusion-pipe's run ends inside "
                         f"its warmup, at {part:.3g} of the learning rate; the same ramp is warmupSteps {steps} up to "
                         f"learningRate {ctx.training['learningRate']:.3g}")


def parse_map(items: list[str]) -> dict[str, str]:
    """--map LOCAL=URI values -> {local prefix: URI}; a URI the manifest could not hold is a
    ConfigError saying why (an S3 bucket name's rules, most often its 3-character minimum)."""
    path_map = {}
    for m in items:
        local, sep, remote = m.partition("=")
        if not sep:
            raise ConfigError(f"--map {m!r}: expected LOCAL=URI, e.g. /data/models=s3://models")
        why = uri_problem(remote.rstrip("/") + "/x")
        if why:
            raise ConfigError(f"--map {m!r}: {remote!r} is not a URI the manifest can hold: {why}, "
                              "e.g. /data/models=s3://models")
        path_map[local] = remote
    return path_map


INIT_BUILDS_THE_LORA = {"flux": "transformer", "sdxl": "unet"}  # their denoiser's component


def init_targets(ctx: Ctx, path: str, may_read: bool) -> None:
    """init_from_existing for flux and sdxl: diffusion-pipe then builds the LoRA from the file
    (diffusers' load_lora_weights; models/flux.py, sdxl.py skip configure_adapter), so it trains
    exactly the file's layers at the file's rank, text encoders only where the file has them.
    Read where it is on this machine: adapter.targetModules is the file's layers (one exact
    pattern), adapter.rank the file's, and an SDXL file without text-encoder layers trains the UNet
    alone. Otherwise a note says what to set."""
    from pathlib import Path
    from .lora_init import InitError, read
    component = INIT_BUILDS_THE_LORA.get(ctx.model_type)
    if component is None:
        return
    ctx.section = "adapter"
    if not may_read or re.match(r"^[a-z0-9]+://", path) or not Path(path).exists():
        ctx.note("init_from_existing", f"diffusion-pipe trains exactly the layers of {path} (at its rank); it is "
                                       "not on this machine, so adapter.targetModules is diffusion-pipe's default "
                                       "set: the file's missing layers start from zero; list the file's layers there "
                                       "to train as diffusion-pipe does")
        return
    try:
        init = read(Path(path), ctx.model_type)
    except InitError as e:
        raise Refused("adapter", "init_from_existing", str(e).removeprefix("adapter.initFrom: ")) from None
    mods = init.lora.get(component) or {}
    if not mods:
        raise Refused("adapter", "init_from_existing", f"{init.path} holds no {component} LoRA layers")
    ctx.adapter["targetModules"] = [exact_pattern(sorted(mods))]
    ranks = {a.shape[0] for a, _ in mods.values()}
    if len(ranks) == 1 and (rank := ranks.pop()) != ctx.adapter.get("rank", 16):
        ctx.note("rank", f"{ctx.adapter.get('rank', 16)} replaced by {rank}, the rank of {init.path.name}: "
                         "diffusion-pipe builds the LoRA from the file")
        ctx.adapter["rank"] = rank
    said = f"adapter.targetModules: the {len(mods)} {component} layers of {init.path.name}, as diffusion-pipe builds the " \
           "LoRA from the file (one exact pattern)"
    if ctx.model_type == "sdxl":
        if any(init.lora.get(c) for c in ("text_encoder", "text_encoder_2")):
            said += "; its text-encoder layers train kubelora's default text-encoder targets"
        else:
            ctx.extra["init_without_text_encoders"] = True  # _learning_rates: 0, whatever their rates say
            said += "; it has no text-encoder layers, so the text encoders are not trained (textEncoderLearningRate 0)"
    ctx.note("init_from_existing", said)


def gradient_release(ctx: Ctx, main: dict) -> None:
    """[optimizer] gradient_release: diffusion-pipe steps the optimizer after each micro-batch's
    backward, with no clipping (train.py forces gradient_clipping 0). With one micro-batch per step
    that is an ordinary step, unclipped; with accumulation it is another optimizer altogether
    (gradient_accumulation_steps updates per step, betas raised to 1/gas): refused."""
    gas = ctx.training.get("gradientAccumulationSteps", 1)
    if gas > 1:
        raise Refused("optimizer", "gradient_release", f"with gradient_accumulation_steps = {gas} diffusion-pipe "
                                                       f"makes {gas} optimizer updates per step (betas raised to "
                                                       f"1/{gas}); kubelora accumulates: remove gradient_release, or "
                                                       f"set gradient_accumulation_steps = 1 and {gas} times the steps")
    ctx.training["maxGradNorm"] = None
    ctx.section = "optimizer"
    ctx.note("gradient_release", "an ordinary step per micro-batch (a memory optimisation in diffusion-pipe), "
                                 "without gradient clipping, as diffusion-pipe disables it (training.maxGradNorm null)")


def _learning_rates(ctx: Ctx) -> None:
    """[optimizer] lr, SDXL's unet_lr / text_encoder_*_lr, force_constant_lr -> kubelora's two rates."""
    lr = ctx.extra.get("lr")
    if "force_constant_lr" in ctx.extra:
        ctx.training.update(learningRate=ctx.extra["force_constant_lr"], lrScheduler="constant", warmupSteps=0)
        if ctx.extra.get("init_without_text_encoders"):
            ctx.training["textEncoderLearningRate"] = 0
        return
    unet = ctx.extra.get("unet_lr", lr)
    te = {ctx.extra.get(k, lr) for k in ("text_encoder_1_lr", "text_encoder_2_lr")}
    if unet is None:
        raise Refused("optimizer", "lr", "no learning rate: set [optimizer] lr")
    ctx.training["learningRate"] = float(unet)
    if ctx.extra.get("init_without_text_encoders"):  # diffusion-pipe builds no text-encoder LoRA: their rates do nothing
        ctx.training["textEncoderLearningRate"] = 0
        return
    if ctx.model_type == "sdxl":
        if len(te) > 1:
            frozen = " (0 for both trains the UNet alone)" if 0 in te else ""
            raise Refused("model", "text_encoder_2_lr", "kubelora trains both SDXL text encoders at one rate "
                                                        f"(training.textEncoderLearningRate): give them the same value"
                                                        f"{frozen}")
        (te_lr,) = te
        if te_lr is not None and float(te_lr) != float(unet):
            ctx.training["textEncoderLearningRate"] = float(te_lr)
        if te_lr is not None and float(te_lr) == 0:
            ctx.section = "model"
            ctx.note("text_encoder_1_lr", "0 for both text encoders: training.textEncoderLearningRate 0, no LoRA on "
                                          "them (the UNet alone is trained), as diffusion-pipe trains it")


SOURCE_FIELDS = {"repeats", "resolutions", "frameBuckets", "missingCaption", "captionPrefix", "shuffleTags",
                 "shuffleVariants", "tagDelimiter", "maskUri"}
PER_SOURCE = ("repeats", "maskUri")  # written on each source even when all share it (no dataset-wide form)


def _dataset(ctx: Ctx, dataset: Optional[dict[str, Any]], local) -> Optional[str]:
    """Dataset TOML -> dataset fields. One [[directory]]: its keys override the top level and it
    becomes dataset.uri; several: each becomes one of dataset.sources with its own repeats, areas,
    frame buckets and caption options (what diffusion-pipe lets a directory override)."""
    if dataset is None:
        return None
    dirs = dataset.get("directory") or []
    if not isinstance(dirs, list) or not all(isinstance(d, dict) for d in dirs):
        raise Refused("dataset", "directory", "expected [[directory]] tables, each with a path")
    apply(ctx, "dataset", dataset)
    if not dirs:
        finish_dataset(ctx)
        return None
    top, top_origin = dict(ctx.dataset), dict(ctx.origin)
    per_dir, origins = [], []
    for i, d in enumerate(dirs):
        ctx.dataset, ctx.origin, ctx.directory = dict(top), dict(top_origin), i
        if "path" not in d:
            raise Refused("directory", "path", "the [[directory]] has no path", i)
        apply(ctx, "directory", d)
        finish_dataset(ctx)
        per_dir.append(ctx.dataset)
        origins.append(ctx.origin)
    if len(dirs) == 1:
        ctx.dataset = per_dir[0]
        return local(str(dirs[0]["path"]))
    for ds in per_dir:  # one area per directory is written resolution; as a source override it is resolutions
        if "resolution" in ds:
            ds["resolutions"] = [ds.pop("resolution")]
    shared = {k: v for k, v in per_dir[0].items() if all(ds.get(k) == v for ds in per_dir)}
    fields = {k for ds in per_dir for k in ds}
    for k in sorted(fields - set(shared) - SOURCE_FIELDS):
        # blame the directory that sets it itself (the others take the top level's, or the default)
        i = next((i for i, o in enumerate(origins) if o.get(k, ("",))[0] == "directory"), 0)
        section, index, key = origins[i].get(k, ("directory", i, "path"))
        raise Refused(section, key, f"{dirs[i]['path']!r} sets dataset.{k} differently from the other directories; "
                                    "kubelora sets it once per job: give every directory the same", index)
    sources = []
    for ds, d in zip(per_dir, dirs):
        src = {"uri": local(str(d["path"])), **{k: v for k, v in ds.items() if k in SOURCE_FIELDS and k not in shared}}
        src.update({k: shared[k] for k in PER_SOURCE if k in shared})
        sources.append(src)
    for k in PER_SOURCE:
        shared.pop(k, None)
    if "resolutions" in shared and len(shared["resolutions"]) == 1:
        shared["resolution"] = shared.pop("resolutions")[0]
    ctx.dataset = {**shared, "sources": sources}
    return None


def load(config: Path, dataset: Optional[Path] = None, cwd: Optional[Path] = None
         ) -> tuple[dict, Optional[dict], dict[str, Source]]:
    """Read the main TOML and its dataset TOML (the `dataset` key, resolved against cwd as
    diffusion-pipe does, unless given). Raises ConfigError with the file and line."""
    cwd = cwd or Path.cwd()
    main, main_src = _read(config, "config")
    sources = {"main": main_src}
    if "model" not in main:
        raise ConfigError(f"{config}: no [model] table; a diffusion-pipe config needs one (type = 'flux', ...)")
    if dataset is None and main.get("dataset"):
        dataset = Path(main["dataset"]) if Path(main["dataset"]).is_absolute() else cwd / main["dataset"]
        if not dataset.is_file():
            raise ConfigError(f"{main_src.where('', 'dataset')}: dataset: {dataset} not found (diffusion-pipe opens "
                              "it relative to the directory it runs in): pass --cwd DIR or --dataset FILE")
    ds = None
    if dataset is not None:
        ds, sources["dataset"] = _read(dataset, "dataset config")
    else:
        sources["dataset"] = Source("the dataset config")
    return main, ds, sources


def load_eval_tomls(main: dict, cwd: Optional[Path] = None) -> list[tuple[str, Optional[dict]]]:
    """eval_datasets' TOMLs, each (its config path, parsed; None where it is not on this machine),
    resolved against cwd as diffusion-pipe opens them. Raises ConfigError for one that is there
    but not valid TOML."""
    cwd = cwd or Path.cwd()
    out = []
    entries = main.get("eval_datasets")
    for e in entries if isinstance(entries, list) else []:
        path = e if isinstance(e, str) else e.get("config") if isinstance(e, dict) else None
        if not isinstance(path, str):
            continue   # refused with its line by the eval_datasets handler
        p = Path(path) if Path(path).is_absolute() else cwd / path
        out.append((path, _read(p, "eval dataset config")[0] if p.is_file() else None))
    return out


def _read(path: Path, what: str) -> tuple[dict, Source]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        return tomllib.loads(text), Source(str(path), text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
