"""The typed spec: valid manifests, errors that name the field, the generated CRD."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubelora_trainer.crd import build_crd, render
from kubelora_trainer.spec import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "loratrainingjobs.kubelora.dev.yaml"

BASE = {
    "model": {"type": "flux", "diffusersPath": "s3://models/flux-dev"},
    "dataset": {"uri": "s3://data/shapes"},
    "output": {"uri": "s3://out/run1"},
}


def with_(path: str, value):
    d = yaml.safe_load(yaml.safe_dump(BASE))
    cur = d
    *parents, last = path.split(".")
    for p in parents:
        cur = cur.setdefault(p, {})
    if value is ...:
        cur.pop(last)
    else:
        cur[last] = value
    return d


def test_examples_validate():
    for f in sorted((REPO / "examples").glob("*.yaml")):
        spec = load_spec(f)
        assert spec.model.type


def test_defaults_are_filled():
    s = parse_spec(BASE)
    assert (s.adapter.rank, s.training.timestepSampling, s.resources.nodes, s.runPolicy.backoffLimit) == (16, "logit_normal", 1, 3)
    assert s.adapter.scale == 1.0


@pytest.mark.parametrize("path,value,expect", [
    ("model.type", "sd3", "spec.model.type: got 'sd3'; accepted values: 'flux', 'sdxl', 'ltx-video', 'hunyuan-video' or 'cosmos'"),
    ("adapter.rank", 0, "spec.adapter.rank: Input should be greater than or equal to 1"),
    ("training.learningRate", -1e-4, "spec.training.learningRate: Input should be greater than 0"),
    ("dataset.uri", "gs://bucket/data", "spec.dataset.uri: got 'gs://bucket/data'; expected an s3://bucket/key URI or an absolute local path"),
    ("output.uri", "s3://b/o", "spec.output.uri: got 's3://b/o'; bucket name 'b' has 1 character; S3 bucket names "
                               "are 3 to 63 characters: lowercase letters, digits, dots and hyphens, starting and "
                               "ending with a letter or digit"),
    ("output.uri", "s3://My_Bucket/o", "spec.output.uri: got 's3://My_Bucket/o'; bucket name 'My_Bucket' has "
                                       "uppercase letters and holds '_'; S3 bucket names are 3 to 63"),
    ("dataset.uri", "s3://-data/x", "spec.dataset.uri: got 's3://-data/x'; bucket name '-data' starts or ends with '-'"),
    ("dataset", ..., "spec.dataset: required field is missing"),
    ("resources.gpusPerNode", 64, "spec.resources.gpusPerNode: Input should be less than or equal to 16"),
    ("resources.nodes", 0, "spec.resources.nodes: Input should be greater than or equal to 1"),
    ("model.transformer_path", "s3://models/f.safetensors", "spec.model.transformer_path: unknown field; did you mean 'transformerPath'?"),
    ("dataset.resolution", 500, "spec.dataset.resolution: Input should be a multiple of 16"),
    ("training.lrScheduler", "step", "spec.training.lrScheduler: got 'step'; accepted values: 'constant', 'linear' or 'cosine'"),
    ("storage.accessKey", "AKIA...", "spec.storage.accessKey: unknown field"),
    ("resources.podAnnotations", {"karpenter.sh/do not disrupt": "true"},
     "spec.resources.podAnnotations: 'karpenter.sh/do not disrupt' is not an annotation key"),
])
def test_invalid_fields_are_named(path, value, expect):
    with pytest.raises(SpecError) as e:
        parse_spec(with_(path, value))
    assert expect in str(e.value)


def test_cross_field_rules():
    with pytest.raises(SpecError, match="training.warmupSteps \\(50\\) exceeds training.steps \\(10\\)"):
        parse_spec(with_("training", {"steps": 10, "warmupSteps": 50}))
    with pytest.raises(SpecError, match=r"model.fluxShift does not apply to model.type sdxl \(its options: model.vPred, model.zeroTerminalSnr, model.minSnrGamma\)"):
        parse_spec(with_("model", {"type": "sdxl", "diffusersPath": "s3://models/sdxl", "fluxShift": True}))
    with pytest.raises(SpecError, match="model.type flux needs model.diffusersPath"):
        parse_spec(with_("model.diffusersPath", ...))


HY_FILES = {"transformerPath": "s3://models/hy/t.safetensors", "vaePath": "s3://models/hy/vae.safetensors",
            "llmPath": "s3://models/hy/llm", "clipPath": "s3://models/hy/clip"}
COSMOS_FILES = {"transformerPath": "s3://models/cosmos/t.pt", "vaePath": "s3://models/cosmos/vae.pt",
                "textEncoderPath": "s3://models/cosmos/t5/"}


@pytest.mark.parametrize("model,dataset,expect", [
    ({"type": "cosmos", **COSMOS_FILES}, {"resolution": 512},
     "dataset: cosmos supports only the sizes 960x960, 960x704, 704x960, 1280x704, 704x1280 (width x height); got 512x512"),
    ({"type": "cosmos", **COSMOS_FILES}, {"width": 1280, "height": 704, "frames": 33},
     "dataset.frames: cosmos supports only 1 or 121 frames (got 33)"),
    ({"type": "ltx-video", "diffusersPath": "s3://models/ltx"}, {"frames": 24},
     "dataset.frames: ltx-video needs 8k+1 frames (e.g. 17 or 25); got 24"),
    ({"type": "hunyuan-video", "ckptPath": "s3://models/hy"}, {"frames": 32},
     "dataset.frames: hunyuan-video needs 4k+1 frames (e.g. 29 or 33); got 32"),
    ({"type": "hunyuan-video", **{k: v for k, v in HY_FILES.items() if k != "llmPath"}}, {},
     "model.type hunyuan-video needs model.ckptPath or model.transformerPath+model.vaePath+model.llmPath+model.clipPath (missing: model.llmPath)"),
    ({"type": "hunyuan-video", "ckptPath": "s3://models/hy", **HY_FILES}, {},
     "set only one of model.ckptPath or model.transformerPath+model.vaePath+model.llmPath+model.clipPath"),
    ({"type": "cosmos", "diffusersPath": "s3://models/cosmos"}, {},
     "model.diffusersPath does not apply to model.type cosmos (it takes model.transformerPath+model.vaePath+model.textEncoderPath)"),
    ({"type": "flux", "diffusersPath": "s3://models/flux"}, {"frames": 5},
     "dataset.frames: flux is an image model; frames must be 1 or unset (got 5)"),
    ({"type": "flux", "diffusersPath": "s3://models/flux"}, {"width": 512},
     "dataset.width and dataset.height go together"),
])
def test_family_rules(model, dataset, expect):
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "model": model, "dataset": {"uri": "s3://data/x", **dataset}})
    assert expect in str(e.value)


def test_family_rules_accept_valid_video_specs():
    parse_spec({**BASE, "model": {"type": "cosmos", **COSMOS_FILES},
                "dataset": {"uri": "s3://data/x", "width": 1280, "height": 704, "frames": 121}})
    parse_spec({**BASE, "model": {"type": "hunyuan-video", **HY_FILES}, "dataset": {"uri": "s3://data/x", "frames": 33}})
    parse_spec({**BASE, "model": {"type": "ltx-video", "diffusersPath": "s3://models/ltx"},
                "dataset": {"uri": "s3://data/x", "frames": 25}})


def test_whole_manifest_and_wrong_kind(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                 "metadata": {"name": "x"}, "spec": BASE}))
    assert load_spec(f).output.uri == "s3://out/run1"
    f.write_text(yaml.safe_dump({"apiVersion": "batch/v1", "kind": "Job", "spec": {}}))
    with pytest.raises(SpecError, match="kind: expected LoRATrainingJob, got 'Job'"):
        load_spec(f)


def test_committed_crd_matches_generated():
    assert CRD_FILE.read_text() == render(), "crds/ is stale: run `make crd`"


def test_crd_shape():
    crd = build_crd()
    v = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["ltj"]
    assert [c["name"] for c in v["additionalPrinterColumns"]] == ["Phase", "Reason", "Model", "Nodes", "Progress", "Loss",
                                                                  "Eval-Loss", "Age"]
    assert [c["name"] for c in v["additionalPrinterColumns"] if c.get("priority")] == ["Eval-Loss"]  # -o wide
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def walk(node, path):
        if node.get("type") in ("object", "array", "string", "integer", "number", "boolean") and path.count(".") >= 1:
            assert node.get("description"), f"{path} has no description (kubectl explain would be empty)"
        for k, child in node.get("properties", {}).items():
            walk(child, f"{path}.{k}")
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
    walk(spec, "spec")
    assert spec["properties"]["adapter"]["default"] == {}
    assert spec["properties"]["model"]["properties"]["type"]["enum"] == ["flux", "sdxl", "ltx-video", "hunyuan-video", "cosmos"]


def test_crd_schema_accepts_examples_and_rejects_bad(tmp_path):
    import jsonschema  # OpenAPI v3.0 schemas use draft-4 style exclusiveMinimum
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for f in sorted((REPO / "examples").glob("*.yaml")):
        jsonschema.Draft4Validator(schema).validate(yaml.safe_load(f.read_text())["spec"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(with_("adapter.rank", 0))


def test_spec_imports_without_torch():
    code = "import sys, kubelora_trainer.spec, kubelora_trainer.crd, kubelora_trainer.models; " \
           "assert 'torch' not in sys.modules, 'spec pulled in torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float16_is_refused_with_the_reason():
    from kubelora_trainer.spec import SpecError, parse_spec
    with pytest.raises(SpecError, match=r"spec.model.dtype: got 'float16'.*loss scaling.*use bfloat16"):
        parse_spec({"model": {"type": "flux", "diffusersPath": "/m", "dtype": "float16"},
                    "dataset": {"uri": "/d"}, "output": {"uri": "/o"}})


@pytest.mark.parametrize("over,message", [
    ({"training": {"textEncoderLearningRate": 1e-5}},
     "training.textEncoderLearningRate: model.type flux trains no text encoder (only sdxl does); remove it"),
    ({"resources": {"gpusPerNode": 8, "limits": {"nvidia.com/gpu": "4"}}},
     "resources.limits['nvidia.com/gpu'] is set from resources.gpusPerNode (8)"),
    ({"resources": {"gpusPerNode": 0, "gpuResource": "nvidia.com/mig-3g.40gb"}},
     "resources.gpuResource (nvidia.com/mig-3g.40gb): with gpusPerNode 0 no GPU is requested"),
    ({"output": {"uri": "s3://bkt/data/out"}}, "output.uri (s3://bkt/data/out) is inside dataset.uri (s3://bkt/data)"),
    ({"dataset": {"uri": "s3://bkt/data", "cacheUri": "s3://bkt/data/cache"}},
     "dataset.cacheUri (s3://bkt/data/cache) and dataset.uri (s3://bkt/data) overlap"),
    ({"dataset": {"sources": [{"uri": "s3://bkt/c/imgs"}], "cacheUri": "s3://bkt/c"}},
     "dataset.cacheUri (s3://bkt/c) and dataset.sources[0].uri (s3://bkt/c/imgs) overlap"),
    ({"dataset": {"uri": "s3://bkt/data", "cacheOnly": True}, "samples": {"prompts": [{"prompt": "a cat"}]}},
     "dataset.cacheOnly builds the cache and trains nothing, so spec.samples would never be made"),
    ({"model": {"type": "sdxl", "diffusersPath": "s3://bkt/sdxl"}, "training": {"timestepSampling": "uniform"}},
     "training.timestepSampling: applies to the flow-matching families (flux, ltx-video, hunyuan-video); "
     "model.type sdxl draws its noise levels its own way"),
    ({"dataset": {"uri": "s3://bkt/data", "width": 512, "height": 768, "resolutions": [512, 1024]}},
     "dataset.resolutions: dataset.width/height fix the one training size, so resolutions would be ignored"),
    ({"dataset": {"uri": "s3://bkt/data", "width": 512, "height": 768, "resolution": 1024}},
     "dataset.resolution: dataset.width/height fix the one training size"),
    ({"dataset": {"sources": [{"uri": "s3://bkt/a", "shuffleTags": True}, {"uri": "s3://bkt/b", "keepTags": 2}]}},
     "dataset.sources[1].keepTags applies only with shuffleTags: true (on the source or the dataset)"),
])
def test_settings_that_would_be_ignored_or_overwritten_are_refused(over, message):
    from kubelora_trainer.spec import SpecError, parse_spec
    base = {"model": {"type": "flux", "diffusersPath": "s3://bkt/flux"}, "dataset": {"uri": "s3://bkt/data"},
            "output": {"uri": "s3://bkt/out"}}
    parse_spec(base)
    parse_spec({**base, "dataset": {"uri": "s3://bkt/data", "cacheUri": "s3://bkt/cache"}})
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec({**base, **over})


def test_a_top_level_typo_is_named_not_reported_as_missing_fields():
    from kubelora_trainer.spec import SpecError, parse_spec
    with pytest.raises(SpecError, match=r"^sepc: unknown top-level field; did you mean 'spec'\?$"):
        parse_spec({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob", "metadata": {"name": "x"},
                    "sepc": {"model": {"type": "flux"}}})


def test_validate_is_as_strict_as_the_api_server(tmp_path):
    """The API server refuses "1000" for an integer and "true" for a boolean; kubectl reads 1e-4
    as a number. `kubelora validate` (the check for GitOps repos) does the same."""
    from kubelora_trainer.spec import load_spec
    job = tmp_path / "job.yaml"
    base = "model: {type: flux, diffusersPath: s3://bkt/flux}\ndataset: {uri: s3://bkt/data}\noutput: {uri: s3://bkt/out}\n"
    job.write_text(base + "training: {learningRate: 1e-4, steps: 1000, compile: true}\n")
    t = load_spec(job).training
    assert (t.learningRate, t.steps, t.compile) == (1e-4, 1000, True)
    job.write_text(base + 'training: {steps: "1000"}\n')
    with pytest.raises(SpecError, match=r"spec.training.steps: Input should be a valid integer"):
        load_spec(job)
    job.write_text(base + 'training: {compile: "true"}\n')
    with pytest.raises(SpecError, match=r"spec.training.compile: Input should be a valid boolean"):
        load_spec(job)


def test_validate_applies_the_crds_name_and_version_rules_and_reads_a_spec_alone(tmp_path):
    """What `kubectl apply` would refuse, `kubelora validate` refuses first: metadata.name as the
    CRD's rules have it (the Service <name>-workers is a DNS-1035 label) and the served version.
    A document with only `spec:` (the README's workstation example) is a spec."""
    from kubelora_trainer.spec import MAX_NAME, check_name

    def manifest(**over):
        return {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob", "metadata": {"name": "ok-2"},
                "spec": BASE, **over}
    parse_spec(manifest())
    for bad in ("My_Job", "2024-flux-v2", "dotted.name", "trailing-", "x" * (MAX_NAME + 1)):
        with pytest.raises(SpecError, match="metadata.name must"):
            parse_spec(manifest(metadata={"name": bad}))
    check_name("a" * MAX_NAME)
    with pytest.raises(SpecError, match=re.escape("apiVersion: expected kubelora.dev/v1alpha1, got 'kubelora.dev/v1'")):
        parse_spec(manifest(apiVersion="kubelora.dev/v1"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert blocks, "the README shows a manifest"
    for block in blocks:
        parse_spec(yaml.safe_load(block))
    assert parse_spec({"spec": BASE}).output.uri == BASE["output"]["uri"]
    with pytest.raises(SpecError, match="spec.spec: unknown field"):
        parse_spec({"spec": BASE, "model": BASE["model"]})  # a spec's own field beside `spec:` is not a wrapper


def test_the_demo_manifest_with_its_samples_validates(tmp_path):
    """`make demo` runs the example with two sample prompts added (not part of CI's run: checked here)."""
    from kubelora_trainer.demo import MANIFEST, with_samples
    spec = load_spec(with_samples(MANIFEST, tmp_path))
    assert len(spec.samples.prompts) == 2 and spec.samples.everySteps == 20
    assert load_spec(MANIFEST).samples is None   # the example stays the operator tests' plain base
    from kubelora_trainer.demo import local_job
    local = load_spec(local_job(with_samples(MANIFEST, tmp_path), tmp_path))   # printed for a run without S3
    assert [local.model.diffusersPath, local.dataset.uri, local.output.uri] == [
        str(tmp_path / "tiny-flux"), str(tmp_path / "dataset"), str(tmp_path / "local-output")]


def test_the_operations_guide_puts_the_demo_in_a_bucket_of_ones_own(tmp_path):
    """docs/operations.md's lines for the demo on a cluster: they sync the folders `make demo` writes
    to the keys the example reads, and the manifest they make validates with the bucket, the
    endpoint and the Secret."""
    from kubelora_trainer import demo
    text = (REPO / "docs" / "operations.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "aws s3 sync" in b)
    syncs = dict(re.findall(r"aws s3 sync (\S+)\s+(\S+)", block))
    assert syncs == {f"{demo.WORKDIR}/{demo.MODEL_DIR}": f"s3://$BUCKET/{demo.MODEL_KEY}",
                     f"{demo.WORKDIR}/{demo.DATA_DIR}": f"s3://$BUCKET/{demo.DATA_KEY}"}
    make = block[block.index("sed "):block.index("kubectl apply")]
    make = make.replace("examples/demo-flux.yaml", str(demo.MANIFEST))
    subprocess.run(["bash", "-euc", f"BUCKET=my-bucket\n{make}"], cwd=tmp_path, check=True)
    spec = load_spec(tmp_path / "demo.yaml")
    assert (spec.model.diffusersPath, spec.dataset.uri, spec.output.uri) == (
        f"s3://my-bucket/{demo.MODEL_KEY}", f"s3://my-bucket/{demo.DATA_KEY}", "s3://my-bucket/outputs/demo-flux")
    assert spec.storage.credentialsSecret == "ml-s3-credentials" and spec.storage.endpoint == "https://minio.example.com"


@pytest.mark.parametrize("field,value,own", [
    ("captionPrefix", "sks, ", "a photo of "),
    ("captionExtension", ".caption", ".txt"),
    ("missingCaption", "empty", "skip"),
    ("captionDropout", 0.1, 0.0),
    ("recursive", False, True),
    ("resolutions", [512, 768], [256]),
])
def test_a_dataset_value_every_source_overrides_is_refused_and_one_a_source_reads_is_kept(field, value, own):
    """dataset.<field> is each source's default: where every source (training, and evaluation but
    for captionDropout, which evaluation never applies) sets its own, the dataset's value reaches
    none, and the user's trigger word or areas would go unused without a word."""
    data = {"sources": [{"uri": "s3://data/a", field: own}, {"uri": "s3://data/b", field: own}], field: value}
    with pytest.raises(SpecError, match=rf"dataset\.{field}: every source sets its own {field}, so the dataset's"):
        parse_spec({**BASE, "dataset": data})
    # a check added since older operators admitted such jobs: not refused again on their sync
    assert getattr(parse_spec({**BASE, "dataset": data}, admitted=True).dataset, field) == value
    data["sources"][1].pop(field)   # source b takes it
    assert getattr(parse_spec({**BASE, "dataset": data}).dataset, field) == value
    # an evaluation source that leaves it unset reads it too (captionDropout: never applied there)
    data["sources"][1][field] = own
    evaluation = {"sources": [{"uri": "s3://data/held"}], "everySteps": 10}
    if field == "captionDropout":
        with pytest.raises(SpecError, match="every source sets its own captionDropout"):
            parse_spec({**BASE, "dataset": data, "evaluation": evaluation})
    else:
        assert getattr(parse_spec({**BASE, "dataset": data, "evaluation": evaluation}).dataset, field) == value


def test_a_misspelt_toleration_is_refused_not_dropped_on_the_way_to_the_job():
    """resources.tolerations were free dicts: `operater: Exists` reached the Job, whose API server
    dropped the unknown field with a warning the operator never showed, and the pods stayed Pending
    on the taint. Typed as core/v1 Toleration, with the API server's rules."""
    ok = parse_spec(with_("resources.tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                     "effect": "NoSchedule"}, {"operator": "Exists"},
                                                    # as Helm and `kubectl get -o yaml` write them: "" is unset
                                                    {"key": "", "operator": "Exists", "effect": ""},
                                                    {"key": "pool", "operator": "", "value": "a100"}]))
    assert [t.model_dump(exclude_none=True) for t in ok.resources.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, {"operator": "Exists"},
        {"key": "", "operator": "Exists", "effect": ""}, {"key": "pool", "operator": "", "value": "a100"}]
    for bad, said in (({"key": "gpu", "operater": "Exists"}, "operater: unknown field; did you mean 'operator'"),
                      ({"key": "gpu", "operator": "exists"}, "operator"),
                      ({"key": "gpu", "effect": "NoSchedul"}, "effect"),
                      ({"value": "x"}, "a toleration without a key needs operator: Exists"),
                      ({"key": "gpu", "operator": "Exists", "value": "x"}, "operator Exists takes no value"),
                      ({"key": "gpu", "tolerationSeconds": 30}, "tolerationSeconds applies to effect NoExecute"),
                      ({"key": "gpu", "value": "a b"}, "value")):
        with pytest.raises(SpecError, match=re.escape(said)):
            parse_spec(with_("resources.tolerations", [bad]))
    # a job an older operator admitted with such a field (its pods never had it: the API server dropped it)
    # is still followed: the sync parses it as its pods got it
    old = parse_spec(with_("resources.tolerations", [{"key": "gpu", "operater": "Exists", "effect": "NoSchedule"}]),
                     admitted=True)
    assert [t.model_dump(exclude_none=True) for t in old.resources.tolerations] == [{"key": "gpu", "effect": "NoSchedule"}]
    # the CRD types it too: kubectl apply refuses an unknown field there
    items = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "resources"]["properties"]["tolerations"]["items"]
    assert set(items["properties"]) == {"key", "operator", "value", "effect", "tolerationSeconds"}
    assert "x-kubernetes-preserve-unknown-fields" not in items


def test_pod_resources_are_checked_as_the_api_server_would_before_the_job_is_made():
    """A request that is no quantity, or above its limit, was refused only when the operator made
    the Job (ChildRefused), after a GitOps tool had applied the job; now at apply / validate."""
    def resources(r):
        return parse_spec(with_("resources", r)).resources
    assert resources({"requests": {"memory": "64Gi", "cpu": "500m"}, "limits": {"memory": "64Gi"}}).requests["cpu"] == "500m"
    with pytest.raises(SpecError, match=re.escape("spec.resources.requests.memory: got '64 GB'; not a Kubernetes "
                                                  "quantity (e.g. 8, 500m, 64Gi")):
        resources({"requests": {"memory": "64 GB"}})
    with pytest.raises(SpecError, match=re.escape("resources.requests['memory'] (64Gi) exceeds "
                                                  "resources.limits['memory'] (32Gi)")):
        resources({"requests": {"memory": "64Gi"}, "limits": {"memory": "32Gi"}})
    with pytest.raises(SpecError, match="priorityClassName"):
        resources({"priorityClassName": "High_Priority"})
    with pytest.raises(SpecError, match="not a Kubernetes quantity"):
        resources({"requests": {"cpu": "-1"}})   # the API server refuses negative resources
    # the pods request cacheSize of ephemeral storage themselves: above its limit the Job would be refused
    with pytest.raises(SpecError, match=re.escape("resources.cacheSize (the pods' ephemeral-storage request) (200Gi) "
                                                  "exceeds resources.limits['ephemeral-storage'] (100Gi)")):
        resources({"cacheSize": "200Gi", "limits": {"ephemeral-storage": "100Gi"}})
    # the CRD carries the same pattern: kubectl apply refuses it
    props = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "resources"]["properties"]
    assert "pattern" in props["requests"]["additionalProperties"] and "pattern" in props["priorityClassName"]
