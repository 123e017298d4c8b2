"""`kubelora`: the user's command line.

    kubelora run examples/demo-flux.yaml [--nproc 2]   train on this machine with torchrun
    kubelora validate job.yaml                         check a manifest without running it
    kubelora crd                                       print the generated CRD
    kubelora import-config train.toml --steps 2000     diffusion-pipe config -> manifest
    kubelora convert in.safetensors out.safetensors [--model-type sdxl] --from kohya --to diffusers
    kubelora report s3://bucket/out/run1 [--out DIR]   a job's report.html and samples, to open locally
    kubelora demo                                      tiny Flux + a local S3 server + run (make demo)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .command import cluster_only_note  # pure, no torch

DEMO_WORKDIR = ".demo"  # `kubelora demo` builds the tiny model and data there (demo.py)


def _validate(path: str):
    from .models import UnsupportedModel, check_supported
    from .spec import SpecError, load_spec
    try:
        spec = load_spec(path)
        check_supported(spec.model.type)
    except (SpecError, UnsupportedModel, OSError) as e:
        msg = str(e)
        print(f"error: {msg if msg.startswith(str(path)) else f'{path}: {msg}'}", file=sys.stderr)
        return None
    return spec


def check_storage(spec) -> int:
    """Read access to every input and write access to the output (and dataset.cacheUri), one line
    each. Exit code as the trainer's (exits.py): 2 if any check failed for a reason that will not
    pass by itself (missing bucket or key, access denied), 1 if only transient ones failed (5xx,
    timeouts: try again)."""
    from .storage import S3Settings, StorageError, check_readable, check_writable
    settings = S3Settings.from_spec(spec.storage)
    inputs = spec.input_fields()
    failures: list[bool] = []   # transient or not, per failed check

    def failed(field: str, e: StorageError) -> None:
        failures.append(e.transient)
        print(f"error: {field}: {e}" + (" (transient: try again)" if e.transient else ""), file=sys.stderr)
    evals = spec.evaluation.uri_fields() if spec.evaluation else {}
    staged, media = 0, 0  # bytes stage-in fetches into the node's cache; media bytes, which the ranks fetch
    for field, uri in {**inputs, **spec.dataset.uri_fields(), **evals}.items():
        unsafe = [] if field.startswith(("dataset.", "evaluation.")) else None  # data: skipped at stage-in, as here
        sizes: dict[str, int] = {}
        try:
            count, size = check_readable(uri, settings, unsafe=unsafe, sizes=sizes)
            print(f"ok: {field} {uri}: {count} object(s) readable ({size / 2**30:.2f} GiB)", file=sys.stderr)
            if uri.startswith("s3://"):  # a local folder is read where it is
                later = media_bytes(sizes) if unsafe is not None and not field.endswith(".maskUri") else 0
                staged, media = staged + size - later, media + later
        except StorageError as e:
            failed(field, e)
        if unsafe:
            print(f"warning: {field}: {len(unsafe)} object(s) will be skipped (unsafeKey: their keys cannot be files "
                  f"under the staged folder): {', '.join(unsafe[:5])}", file=sys.stderr)
    outputs = {"output.uri": spec.output.uri, **({"dataset.cacheUri": spec.dataset.cacheUri} if spec.dataset.cacheUri else {})}
    for field, uri in outputs.items():
        try:
            check_writable(uri, settings, create=False)
            print(f"ok: {field} {uri}: writable", file=sys.stderr)
        except StorageError as e:
            failed(field, e)
    problem = cache_size_problem(spec, staged + -(-media // max(1, spec.resources.nodes)))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        failures.append(False)
    if not failures:
        return 0
    return 1 if all(failures) else 2


def media_bytes(sizes: dict[str, int]) -> int:
    """The bytes of a dataset folder's images and videos ({name: bytes}), which the ranks that read
    them fetch, each node its share (media_later), not stage-in. Pure."""
    from .data import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    return sum(n for rel, n in sizes.items() if Path(rel).suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)


def cache_size_problem(spec, staged: int) -> str | None:
    """What stage-in would refuse in a cluster: the s3:// inputs larger than resources.cacheSize
    (the pod's cache, where they are fetched; the latent cache needs room there too). Pure."""
    from .spec import quantity
    r = spec.resources
    if not r.cacheSize or r.cacheVolumeClaim or staged <= quantity(r.cacheSize):
        return None
    return (f"resources.cacheSize ({r.cacheSize}) is smaller than the inputs a node fetches into it "
            f"({staged / 2**30:.2f} GiB: the model, the captions and about 1/{r.nodes} of the media, before any "
            f"latent is cached): the trainer would refuse them; a larger resources.cacheSize, or a "
            f"resources.cacheVolumeClaim")


def default_nproc(spec) -> int:
    """One process per GPU; on a machine without GPUs, or with resources.gpusPerNode 0 (the CPU),
    one (or --nproc)."""
    if spec.resources.gpusPerNode == 0:
        return 1
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 1


def world_note(spec, nproc: int) -> str | None:
    """A note when this machine runs another number of processes than the spec's resources ask of
    a cluster (nodes x gpusPerNode): the samples per optimizer step differ. Pure."""
    r, t = spec.resources, spec.training
    cluster = r.nodes * max(1, r.gpusPerNode)
    if cluster == nproc:
        return None
    per = t.microBatchSize * t.gradientAccumulationSteps
    return (f"[kubelora] note: resources ask a cluster for {cluster} process(es) ({r.nodes} node(s) x "
            f"{max(1, r.gpusPerNode)}); this machine runs {nproc}, so a step trains {per * nproc} samples, not "
            f"{per * cluster} (--nproc sets the count)")


def local_env(environ: dict, nproc: int) -> dict:
    """The environment of a `kubelora run` on this machine: what is set stays; threads split over
    the processes, unbuffered output, and metrics bound to 127.0.0.1 (a workstation's, not its
    network's; the operator's pods keep 0.0.0.0 for Prometheus). Pure."""
    from .metrics import ADDR_ENV, LOCAL_ADDR
    env = dict(environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault(ADDR_ENV, LOCAL_ADDR)
    return env


def trial_manifest(doc: dict, name: str, steps: int) -> dict:
    """`kubelora run --steps N`: the manifest (or bare spec) as a short trial: N steps, a warmup no
    longer than that, written to <output.uri>/trial-<N> (trained again each time) so the real
    output stays untouched; the latent cache is shared, so the real run reuses what the trial
    encoded. Always a whole manifest with the original metadata.name. Pure."""
    import copy
    doc = copy.deepcopy(doc)
    spec = doc["spec"] if isinstance(doc.get("spec"), dict) else doc
    training = spec.setdefault("training", {})
    training["steps"] = steps
    if (training.get("warmupSteps") or 0) > steps:
        training["warmupSteps"] = steps
    output = spec.setdefault("output", {})
    output["uri"] = f"{str(output.get('uri', '')).rstrip('/')}/trial-{steps}"
    output["onExisting"] = "overwrite"
    return {"apiVersion": doc.get("apiVersion", "kubelora.dev/v1alpha1"), "kind": doc.get("kind", "LoRATrainingJob"),
            "metadata": {**(doc.get("metadata") or {}), "name": name}, "spec": spec}


def launch(manifest: str, nproc: int | None = None, extra_env: dict | None = None, steps: int | None = None) -> int:
    """Run the trainer under torchrun on this machine; its output (rank 0 logs progress) streams
    through. steps: a short trial (trial_manifest). Returns the exit status."""
    import tempfile
    spec = _validate(manifest)
    if spec is None:
        return 2
    trial_dir = None
    if steps is not None:
        import yaml
        from .spec import manifest_name
        trial_dir = tempfile.mkdtemp(prefix="kubelora-trial-")
        trial = trial_manifest(yaml.safe_load(Path(manifest).read_text()), manifest_name(manifest), steps)
        path = Path(trial_dir) / Path(manifest).name
        path.write_text(yaml.safe_dump(trial, sort_keys=False))
        print(f"[kubelora] a {steps}-step trial of {manifest}, written to {trial['spec']['output']['uri']}", flush=True)
        manifest, spec = str(path), _validate(str(path))
        if spec is None:
            return 2
    n = nproc or default_nproc(spec)
    env = local_env({**os.environ, **(extra_env or {})}, n)
    if spec.resources.gpusPerNode == 0:  # "0 trains on CPU", here as in the cluster
        env.setdefault("KUBELORA_FORCE_CPU", "1")
    for note in (None if nproc else world_note(spec, n), cluster_only_note(spec)):  # --nproc: chosen
        if note:
            print(note, flush=True)
    from .launch import run as run_torchrun
    print(f"[kubelora] {spec.model.type} LoRA from {manifest} on {n} local process(es)", flush=True)
    try:
        return run_torchrun(["--standalone", f"--nproc-per-node={n}", "-m", "kubelora_trainer", "run", "--spec",
                             str(manifest)], env=env)
    finally:
        if trial_dir:
            import shutil
            shutil.rmtree(trial_dir, ignore_errors=True)


def import_config(args) -> int:
    import yaml
    from .import_config import ConfigError, convert as to_manifest, load, load_eval_tomls, parse_map
    from .import_dataset import read_dirs
    from .spec import SpecError, parse_spec
    cfg = Path(args.config)
    try:
        cwd = Path(args.cwd).resolve() if args.cwd else Path.cwd()
        main_cfg, dataset, sources = load(cfg, Path(args.dataset) if args.dataset else None, cwd)
        path_map = parse_map(args.map)
        manifest, notes = to_manifest(main_cfg, dataset, name=args.name or cfg.stem, data_uri=args.data_uri,
                                      output_uri=args.output_uri, steps=args.steps, path_map=path_map,
                                      cwd=str(cwd), sources=sources, read_dirs=read_dirs,
                                      eval_tomls=load_eval_tomls(main_cfg, cwd))
        parse_spec(manifest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SpecError as e:
        print(f"error: {cfg}: the imported manifest is not valid: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
    return 0


def convert(args) -> int:
    from . import safetensors_file
    from .export import ALPHA_FORMATS, file_metadata
    from .families import RULES
    from .lora_family import FamilyChoiceError, choose, readers
    from .lora_files import LoraFileError, from_parsed, load_file, read_peft
    from .models import UnsupportedModel, check_supported, get_family
    named = args.model_type
    try:
        if named is not None:
            check_supported(named)
    except UnsupportedModel as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    known = sorted({f for r in RULES.values() for f in r.formats})
    formats = RULES[named].formats if named else known
    for f, readable in ((args.src, (*formats, "peft")), (args.dst, formats)):
        if f not in readable:
            where = f"for {named}" if named else "for any model type"
            print(f"error: format {f!r} is not available {where} (available: {', '.join(readable)})", file=sys.stderr)
            return 2
    replacing = Path(args.output).exists()
    model_type, notes, hint = named, [], ""
    try:
        if args.src == "peft":
            lora, scale, meta = read_peft(Path(args.input))
        else:
            tensors, meta = load_file(Path(args.input), args.src)
        written_by = meta.get("kubelora.model_type")
        if written_by and named and written_by != named:
            raise LoraFileError(f"its metadata says kubelora trained it for {written_by} (kubelora.model_type)")
        model_type = named or written_by
        parsed = None
        if args.src == "peft" and model_type is None:
            raise LoraFileError("the checkpoint has no kubelora.model_type metadata: give --model-type")
        if args.src != "peft" and not written_by:   # a file from elsewhere: which families read it
            fits, why = readers(tensors, args.src)
            if model_type is None and not fits:
                raise LoraFileError("no model type reads it (" + "; ".join(f"{t}: {w}" for t, w in why.items()) + ")")
            model_type, notes = choose({t: [m for mods in p[0].values() for m in mods] for t, p in fits.items()},
                                       named)
            parsed = fits.get(model_type)
            if model_type not in fits and fits:
                hint = f" (it reads as a {' or '.join(fits)} LoRA: --model-type {next(iter(fits))})"
        check_supported(model_type)
        family = get_family(model_type)
        if args.dst not in RULES[model_type].formats:
            by = "its kubelora.model_type" if written_by else "by its module names"
            raise FamilyChoiceError(f"it is a {model_type} LoRA ({by}), and format {args.dst!r} is not available "
                                    f"for {model_type} (available: {', '.join(RULES[model_type].formats)})")
        if args.src != "peft":
            lora, scale, meta = from_parsed(parsed or family.parse(tensors, args.src), meta, args.src)
        tensors = family.export(lora, scale, args.dst)
        gaps = family.export_gaps(lora, args.dst)
        n_out = sum(len(v) for v in family.parse(dict(tensors), args.dst)[0].values())   # what the file holds
    except (FamilyChoiceError, UnsupportedModel) as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 2
    except (LoraFileError, ValueError, KeyError, OSError) as e:
        what = f"a {model_type} LoRA" if model_type else "a LoRA"
        print(f"error: {args.input} is not {what} in {args.src} format: {e}{hint}", file=sys.stderr)
        return 2
    for n in notes:   # "note: ..." / "warning: ...": the file named after the label
        print(n.replace(": ", f": {args.input}: ", 1), file=sys.stderr)
    # the written lora_B carries alpha/rank unless the written format keeps the real alpha and the
    # source's scale was the real alpha (kohya/peft .alpha, diffusers' lora_adapter_metadata)
    src_folded = meta.get("kubelora.scale_folded", str(args.src not in ALPHA_FORMATS).lower()) == "true"
    folded = args.dst not in ALPHA_FORMATS or src_folded
    meta.setdefault("kubelora.model_type", model_type)
    from safetensors import SafetensorError
    try:
        safetensors_file.save(tensors, args.output, metadata=file_metadata(meta, args.dst, folded))
    except (OSError, SafetensorError) as e:  # safetensors raises its own error for an unwritable path
        print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
        return 2
    for gap in gaps:
        print(f"warning: {args.output}: {gap}", file=sys.stderr)
    n_in = sum(len(v) for v in lora.values())
    msg = f"wrote {args.output}{' (replacing the file that was there)' if replacing else ''}: {n_out} LoRA modules, {args.src} -> {args.dst}"
    print(msg if n_out == n_in else f"{msg} ({n_in - n_out} of the {n_in} read not written: see the warnings)")
    return 0


def fetch_report(uri: str, out: Path, settings=None) -> Path:
    """report.html and samples/ of a job's output (finished or running) into out; returns the
    local report.html. Credentials as for training (AWS_* environment or the mounted Secret)."""
    import shutil
    from .samples import REPORT_NAME
    from .storage import S3Settings, StorageError, download, list_keys, make_client, parse_uri
    uri = uri.rstrip("/")
    loc = parse_uri(uri)
    if not loc.is_s3:
        src = Path(loc.key)
        if not (src / REPORT_NAME).is_file():
            raise StorageError(f"{src / REPORT_NAME}: no report (has the job uploaded one yet?)")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / REPORT_NAME, out / REPORT_NAME)
        if (src / "samples").is_dir():
            shutil.copytree(src / "samples", out / "samples", dirs_exist_ok=True)
        return out / REPORT_NAME
    settings = settings or S3Settings()
    client = make_client(settings)
    quiet = lambda m: None  # noqa: E731
    made = not out.exists()
    try:
        download(f"{uri}/{REPORT_NAME}", out, settings, client, log=quiet)
    except StorageError as e:
        if made and out.is_dir() and not any(out.iterdir()):  # a failed fetch leaves no empty folder behind
            out.rmdir()
        raise StorageError(f"{uri}/{REPORT_NAME}: no report ({e}); has the job uploaded one yet?",
                           transient=e.transient) from None
    # a job without spec.samples has none; a sample's key that cannot be a file under out/samples
    # (a doubled '/', '..') stops the fetch naming it: nothing is written outside out
    if any(k and not k.endswith("/") for k in list_keys(f"{uri}/samples", settings, client)):  # not a folder marker
        download(f"{uri}/samples", out / "samples", settings, client, log=quiet)
    return out / REPORT_NAME


def report_cmd(args) -> int:
    from .storage import StorageError
    uri = args.uri if args.uri.startswith(("s3://", "file://", "/")) else str(Path(args.uri).resolve())  # a relative path
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "job"
    if args.out is None and not uri.startswith("s3://"):  # a local output: its report is already on this machine
        from .samples import REPORT_NAME
        local = Path(uri.removeprefix("file://")) / REPORT_NAME
        if local.is_file():
            print(local.resolve())
            return 0
    out = Path(args.out or f"kubelora-report-{name}")
    try:
        path = fetch_report(uri, out)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if e.transient else 2
    except OSError as e:  # the local folder (--out) cannot be written
        print(f"error: cannot write the report to {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(path.resolve())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kubelora", description="Train diffusion-model LoRAs, locally or on Kubernetes.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train a LoRATrainingJob manifest on this machine (torchrun)")
    r.add_argument("manifest")
    r.add_argument("--nproc", type=int, default=None, help="processes (default: number of GPUs, or 1 on CPU)")
    r.add_argument("--steps", type=int, default=None, metavar="N",
                   help="a short trial: N training steps written to <output.uri>/trial-N (trained again each time), "
                        "the real output untouched; the cache it fills is the real run's")
    v = sub.add_parser("validate", help="check a manifest and print the resolved spec")
    v.add_argument("manifest")
    v.add_argument("--check-storage", action="store_true",
                   help="also read every input (model paths, dataset) and write to output.uri, with this "
                        "machine's credentials (AWS_* or the mounted Secret files)")
    c = sub.add_parser("crd", help="print the CRD generated from the spec models")
    c.add_argument("--out", help="write to this file instead of stdout")
    ic = sub.add_parser("import-config", help="turn a diffusion-pipe TOML config into a LoRATrainingJob manifest")
    ic.add_argument("config", help="diffusion-pipe main TOML ([model], [adapter], [optimizer] tables)")
    ic.add_argument("--dataset", help="its dataset TOML (default: the 'dataset' path in the config)")
    ic.add_argument("--name", help="metadata.name (default: the config file stem)")
    ic.add_argument("--data-uri", help="dataset URI to use instead of the TOML's local directory path")
    ic.add_argument("--output-uri", help="output URI to use instead of output_dir")
    ic.add_argument("--steps", type=int, help="training steps (default: max_steps, else epochs counted as steps from "
                                              "the items in the dataset folders when they are on this machine)")
    ic.add_argument("--map", action="append", default=[], metavar="LOCAL=URI",
                    help="rewrite a local path prefix, e.g. /data/models=s3://models (repeatable)")
    ic.add_argument("--cwd", help="the directory diffusion-pipe runs in: relative paths in the configs resolve "
                                  "against it, as diffusion-pipe resolves them (default: the current directory)")
    cv = sub.add_parser("convert", help="convert a LoRA file between formats")
    cv.add_argument("input")
    cv.add_argument("output")
    cv.add_argument("--model-type", help="model family of the LoRA (flux, sdxl, ...); default: the file's "
                                         "kubelora.model_type metadata, else the one family its module names fit "
                                         "(refused when several fit: Flux.1's and HunyuanVideo's diffusers names "
                                         "coincide)")
    cv.add_argument("--from", dest="src", required=True,
                    help="format of the input file; 'peft' reads kubelora's checkpoint folder (checkpoints/step-N)")
    cv.add_argument("--to", dest="dst", required=True, help="format to write: one of the family's output.formats "
                                                            "(diffusers, kohya, comfyui, original)")
    rp = sub.add_parser("report", help="download a job's report.html and samples, and print the path to open")
    rp.add_argument("uri", metavar="JOB_OUTPUT_URI", help="the job's output.uri (s3://bucket/key or a local path)")
    rp.add_argument("--out", help="local folder to copy it to (default: ./kubelora-report-<last part of the URI>; a "
                                  "local output's report is printed where it is, not copied)")
    d = sub.add_parser("demo", help="train a tiny Flux LoRA on 2 processes from a local S3 server (SeaweedFS)")
    d.add_argument("--workdir", default=DEMO_WORKDIR, help="where the tiny model, the data, the server's files and the "
                                                      "downloaded output go (default: .demo)")
    d.add_argument("--nproc", type=int, default=2, help="training processes (default: 2, as two GPUs would run)")
    args = p.parse_args(argv)

    if getattr(args, "nproc", None) is not None and args.nproc < 1:  # `run` and `demo`
        print(f"error: --nproc must be at least 1 (got {args.nproc})", file=sys.stderr)
        return 2
    if args.cmd == "run":
        if args.steps is not None and args.steps < 1:
            print("error: --steps must be at least 1", file=sys.stderr)
            return 2
        return launch(args.manifest, args.nproc, steps=args.steps)
    if args.cmd == "validate":
        spec = _validate(args.manifest)
        if spec is None:
            return 2
        import yaml
        from .spec import dump_spec
        print(yaml.safe_dump(dump_spec(spec), sort_keys=False))
        # stdout stays the resolved spec (to pipe); the verdict goes to stderr, last
        print(f"[valid] {args.manifest}: {spec.model.type} {spec.adapter.type}, {spec.training.steps} steps, "
              f"output {spec.output.uri}" + ("; checking storage" if args.check_storage else ""), file=sys.stderr)
        return check_storage(spec) if args.check_storage else 0
    if args.cmd == "crd":
        from .crd import render
        text = render()
        if args.out:
            try:
                Path(args.out).write_text(text)
            except OSError as e:
                print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
                return 1
        else:
            sys.stdout.write(text)
        return 0
    if args.cmd == "import-config":
        return import_config(args)
    if args.cmd == "convert":
        return convert(args)
    if args.cmd == "report":
        return report_cmd(args)
    if args.cmd == "demo":
        from .demo import demo
        return demo(Path(args.workdir), args.nproc)
    return 2


if __name__ == "__main__":
    sys.exit(main())
