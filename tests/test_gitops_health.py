"""The Argo CD health check (charts/kubelora/files/argocd-health.lua) run by a real Lua 5.1 (the
language of Argo CD's gopher-lua, via lupa) over LoRATrainingJobs whose status the operator's own
status code produced; and docs/gitops.md carries the same Lua. The docs' Flux `healthCheckExprs`
run by Google's CEL (cel-cpp, with optional types as Flux's cel-go environment has them) over the
same statuses, and kstatus's own reading of them."""
import json
import re
from pathlib import Path

import pytest

from kubelora_operator import status as st

REPO = Path(__file__).resolve().parents[1]
LUA = REPO / "charts" / "kubelora" / "files" / "argocd-health.lua"
NOW = "2026-01-01T00:00:00Z"


def health(obj: dict) -> tuple[str, str]:
    """(status, message) as Argo CD computes them: `obj` is the resource as JSON, the script returns
    a table with status and message."""
    from lupa import lua51
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
    hs = lua.execute(LUA.read_text())
    return hs["status"], hs["message"]


def ltj(status: dict | None, generation: int = 1) -> dict:
    obj = {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
           "metadata": {"name": "my-lora", "namespace": "ml", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


def _job(conds=(), active=0, ready=0, suspend=False, labels=None):
    return {"metadata": {"labels": labels or {}}, "spec": {"suspend": suspend},
            "status": {"active": active, "ready": ready,
                       "conditions": [{"type": t, "status": "True", **extra} for t, extra in conds]}}


def _pod(waiting=None, terminated=None):
    state = {"waiting": waiting} if waiting else {"terminated": terminated} if terminated else {"running": {}}
    return {"metadata": {"name": "my-lora-0-abc"},
            "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": state}]}}


def _pending(pod):
    return {**pod, "spec": {"nodeName": "gpu-a"}, "status": {**pod["status"], "phase": "Pending"}}


MANIFEST = {"artifacts": [{"uri": "s3://out/run/lora.safetensors", "format": "diffusers", "sha256": "ab", "size": 3}],
            "metrics": {"finalLoss": 0.25}}
QUEUE = {"kueue.x-k8s.io/queue-name": "gpus"}

# (what the operator observed, expected health, a part of the message); statuses from status.py
SAMPLES = [
    ("created", lambda: st.observe(None, [], None, None, False), "Progressing", "Pending"),
    ("queued", lambda: st.observe(_job(suspend=True, labels=QUEUE), [], None, None, False, "gpus"),
     "Progressing", "waiting for Kueue admission in queue 'gpus'"),
    ("initializing", lambda: st.observe(_job(active=1, ready=1), [_pod()], None, None, False),
     "Progressing", "Initializing"),
    ("training", lambda: st.observe(_job(active=1, ready=1), [_pod()],
                                    {"phase": "Training", "step": 5, "totalSteps": 40}, None, False),
     "Progressing", "step 5/40"),
    ("exporting", lambda: st.observe(_job([("Complete", {})]), [], None, None, False), "Progressing", "Exporting"),
    ("succeeded", lambda: st.observe(_job([("Complete", {})]), [], None, MANIFEST, False), "Healthy",
     "LoRA published to s3://out/run/lora.safetensors"),
    ("oom", lambda: st.observe(_job([("Failed", {"reason": "BackoffLimitExceeded"})]),
                               [_pod(terminated={"reason": "OOMKilled", "exitCode": 137})], None, None, False),
     "Degraded", "OOMKilled"),
    ("bad-image", lambda: st.observe(_job(active=1), [_pod(waiting={"reason": "ImagePullBackOff",
                                                                   "message": "Back-off pulling image"})],
                                     None, None, False), "Degraded", "Back-off pulling image"),
    # a registry's 429 passes at the next pull: not Degraded at first sight (Stalled only past the grace)
    ("registry-429", lambda: st.observe(_job(active=1), [_pending(_pod(waiting={"reason": "ErrImagePull",
                                                                       "message": "429 Too Many Requests"}))],
                                        None, None, False), "Progressing", "429 Too Many Requests"),
    ("suspended", lambda: st.observe(_job([("Suspended", {})], suspend=True), [], None, None, True),
     "Suspended", "Suspended"),
]


@pytest.mark.parametrize("name,observe,expected,message", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_health_of_each_status_the_operator_writes(name, observe, expected, message):
    status = st.status({}, observe(), 1, None, NOW)
    got, msg = health(ltj(status))
    assert got == expected, (name, status)
    assert message in msg


def test_an_invalid_spec_is_degraded_and_no_status_yet_is_progressing():
    assert health(ltj(st.invalid({}, "InvalidSpec", "spec.adapter.rank: ...", 1, NOW)))[0] == "Degraded"
    assert health(ltj(None)) == ("Progressing", "waiting for the kubelora operator")


def test_an_unobserved_generation_is_progressing_until_the_status_follows_it():
    done = st.status({}, st.observe(_job([("Complete", {})]), [], None, MANIFEST, False), 1, None, NOW)
    got, msg = health(ltj(done, generation=2))
    assert got == "Progressing" and "generation 2" in msg
    assert health(ltj({**done, **st.follow_generation(done, 2)}, generation=2))[0] == "Healthy"


def test_the_gitops_doc_carries_the_shipped_lua():
    doc = (REPO / "docs" / "gitops.md").read_text()
    block = re.search(r"resource\.customizations\.health\.kubelora\.dev_LoRATrainingJob: \|\n((?: {4}.*\n|\n)+)", doc)
    assert block, "docs/gitops.md has no argocd-cm health customization"
    embedded = "\n".join(line[4:] for line in block.group(1).splitlines()).strip()
    assert embedded == LUA.read_text().strip(), "docs/gitops.md is stale: paste charts/kubelora/files/argocd-health.lua"


def _flux_exprs() -> dict[str, str]:
    import yaml
    doc = (REPO / "docs" / "gitops.md").read_text()
    block = re.search(r"```yaml\n(  healthCheckExprs:\n(?:.*\n)+?)```", doc)
    assert block, "docs/gitops.md has no healthCheckExprs block"
    (check,) = yaml.safe_load(block.group(1))["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == ("kubelora.dev/v1alpha1", "LoRATrainingJob")
    return {k: check[k] for k in ("inProgress", "failed", "current") if k in check}


def flux_health(obj: dict, exprs: dict[str, str]) -> str:
    """Flux's reading with healthCheckExprs (fluxcd/pkg runtime/cel StatusEvaluator, RFC 0009): a
    status.observedGeneration other than metadata.generation is InProgress; then inProgress, failed,
    current in that order, the first true one wins; none true: InProgress. An expression that
    cannot be evaluated is an error: Flux reads the resource as Unknown and keeps waiting."""
    from cel_expr_python import cel
    from cel_expr_python.ext import ext_optional
    st_ = obj.get("status") or {}
    if "observedGeneration" in st_ and st_["observedGeneration"] != obj["metadata"]["generation"]:
        return "InProgress"
    env = cel.NewEnv(variables={k: cel.Type.DYN for k in ("apiVersion", "kind", "metadata", "spec", "status")},
                     extensions=[ext_optional.ExtOptional()])
    for key, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key not in exprs:
            continue
        value = env.compile(exprs[key]).eval(data=json.loads(json.dumps(obj)))
        if value.type() == cel.Type.ERROR:
            return "Unknown"
        assert value.type() == cel.Type.BOOL, (key, value.type().name())
        if value.value():
            return result
    return "InProgress"


def kstatus(obj: dict) -> str:
    """kstatus's generic rules (sigs.k8s.io/cli-utils pkg/kstatus/status Compute) for a custom
    resource: an unobserved generation is InProgress; Reconciling=True InProgress; Stalled=True
    Failed; then the Ready condition if there is one (True: Current, else InProgress); no status
    conditions at all: Current."""
    st_ = obj.get("status") or {}
    if st_.get("observedGeneration", obj["metadata"]["generation"]) != obj["metadata"]["generation"]:
        return "InProgress"
    conds = {c["type"]: c["status"] for c in st_.get("conditions") or []}
    if conds.get("Reconciling") == "True":
        return "InProgress"
    if conds.get("Stalled") == "True":
        return "Failed"
    if "Ready" in conds:
        return "Current" if conds["Ready"] == "True" else "InProgress"
    return "Current"


# what docs/gitops.md says each status reads as: with kstatus alone, and with its healthCheckExprs
GITOPS = {"created": ("InProgress", "InProgress"), "queued": ("InProgress", "InProgress"),
          "initializing": ("InProgress", "InProgress"), "training": ("InProgress", "InProgress"),
          "exporting": ("InProgress", "InProgress"), "succeeded": ("Current", "Current"),
          "oom": ("Failed", "Failed"), "bad-image": ("Failed", "Failed"),
          "registry-429": ("InProgress", "InProgress"), "suspended": ("InProgress", "InProgress")}


@pytest.mark.parametrize("name,observe", [(s[0], s[1]) for s in SAMPLES], ids=[s[0] for s in SAMPLES])
def test_kstatus_and_the_docs_flux_health_expressions_read_each_status_as_documented(name, observe):
    obj = ltj(st.status({}, observe(), 1, None, NOW))
    assert (kstatus(obj), flux_health(obj, _flux_exprs())) == GITOPS[name], obj["status"]


def test_flux_health_expressions_wait_for_a_job_with_no_status_and_fail_an_invalid_one():
    exprs = _flux_exprs()
    assert kstatus(ltj(None)) == "Current"  # kstatus's gap the expressions close
    assert flux_health(ltj(None), exprs) in ("InProgress", "Unknown")
    assert flux_health(ltj({"phase": ""}), exprs) == "InProgress"
    invalid = ltj(st.invalid({}, "InvalidSpec", "spec.adapter.rank: ...", 1, NOW))
    assert kstatus(invalid) == flux_health(invalid, exprs) == "Failed"
    done = st.status({}, st.observe(_job([("Complete", {})]), [], None, MANIFEST, False), 1, None, NOW)
    assert flux_health(ltj(done, generation=2), exprs) == "InProgress"
