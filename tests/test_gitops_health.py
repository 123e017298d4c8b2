"""The Argo CD health check (charts/kubelora/files/argocd-health.lua) run by a real Lua 5.1 (the
language of Argo CD's gopher-lua, via lupa) over LoRATrainingJobs whose status the operator's own
status code produced; and docs/gitops.md carries the same Lua."""
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
