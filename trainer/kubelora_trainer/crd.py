"""Generate the LoRATrainingJob CRD from the spec models (never edit crds/ by hand):

    kubelora crd > crds/loratrainingjobs.kubelora.dev.yaml      (make crd)
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from .spec import (GROUP, KIND, MAX_NAME, NAME_BAD_CHARACTERS, NAME_PATTERN, NAME_TOO_LONG, PLURAL, SHORT_NAME, VERSION,
                   LoRATrainingJobSpec, RunPolicySpec)

_DROP = {"title"}


def _resolve(node: Any, defs: dict) -> Any:
    """Inline $refs and turn JSON-Schema idioms into a Kubernetes structural schema."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    node = dict(node)
    if "anyOf" in node:  # Optional[X] -> X + nullable
        all_options = node.pop("anyOf")
        options = [o for o in all_options if o.get("type") != "null"]
        nullable = len(options) < len(all_options)
        base = _resolve(options[0], defs) if len(options) == 1 else {"x-kubernetes-preserve-unknown-fields": True}
        node = {**base, **{k: v for k, v in node.items()}}
        if nullable:
            node["nullable"] = True
        if node.get("default", "") is None:
            node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("type") == "array" and "prefixItems" in node:  # fixed-length tuples
        items = node.pop("prefixItems")
        node["items"] = _resolve(items[0], defs)
        node["minItems"] = node["maxItems"] = len(items)
    if node.get("type") == "object" and "additionalProperties" in node and not node.get("properties"):
        ap = node["additionalProperties"]
        node["additionalProperties"] = _resolve(ap, defs) if isinstance(ap, dict) and ap else {"x-kubernetes-preserve-unknown-fields": True}
        if node["additionalProperties"] == {"x-kubernetes-preserve-unknown-fields": True}:
            node.pop("additionalProperties")
            node["x-kubernetes-preserve-unknown-fields"] = True
    elif node.get("type") == "object" and "properties" in node:
        node.pop("additionalProperties", None)
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    out = {}
    for k, v in node.items():
        if k in _DROP or k == "$defs":
            continue
        if k == "properties":
            out[k] = {pk: _resolve(pv, defs) for pk, pv in v.items()}
        elif isinstance(v, (dict, list)) and k not in ("enum", "default", "required"):
            out[k] = _resolve(v, defs)
        else:
            out[k] = v
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in out:  # optional sections default to {} so the API server fills their defaults
        required = set(out.get("required", []))
        for name, prop in out["properties"].items():
            # only where {} is valid: a section with required fields (spec.samples) stays absent
            if (name not in required and prop.get("type") == "object" and "properties" in prop
                    and not prop.get("required")):
                prop.setdefault("default", {})
    return out


def spec_schema() -> dict:
    raw = LoRATrainingJobSpec.model_json_schema(mode="validation")
    return _resolve(raw, raw.get("$defs", {}))


STATUS_SCHEMA = {
    "type": "object",
    "description": "Observed state, written by the operator.",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "phase": {"type": "string", "description": "Pending, Initializing, Training, Exporting, Succeeded, Failed or Suspended."},
        "reason": {"type": "string", "description": "Why the job is in its phase, one word (QueuedInKueue, "
                                                    "WaitingForPods, ImagePullBackOff, Training, Published, ...); "
                                                    "the same as the Ready condition's reason."},
        "message": {"type": "string", "description": "What the job is doing or waiting for, and for a stalled or "
                                                     "failed job the cause and what to change."},
        "observedGeneration": {"type": "integer", "format": "int64"},
        "restarts": {"type": "integer", "description": "Times the trainer Job was made again: after a pod of a "
                                                        "multi-node run failed (the whole gang restarts) or after it "
                                                        "was gone before the run finished."},
        "disruptionRestarts": {"type": "integer", "description": "Of the restarts, those after a disruption of one "
                                                                  "of the run's pods (its node lost, drained or "
                                                                  "preempted): not counted against "
                                                                  "runPolicy.backoffLimit."},
        "lastDisruption": {"type": "string", "description": "Why the newest restart after a disruption was not "
                                                            "counted: the pod marked DisruptionTarget, or the pod "
                                                            "and its node that was not Ready (or gone) when the "
                                                            "gang failed."},
        "waitRestarts": {"type": "integer", "description": "Of the restarts, those after the rendezvous of a "
                                                            "multi-node run timed out while a pod of its gang was "
                                                            "not scheduled or never started (no free GPUs, an image "
                                                            "that does not pull): not counted against "
                                                            "runPolicy.backoffLimit."},
        "evictions": {"type": "integer", "description": "Pods of the run its nodes' kubelets evicted for pressure "
                                                         "(memory, disk); the run fails at 3."},
        "evictedPods": {"type": "array", "items": {"type": "string"},
                        "description": "The newest evicted pods counted in evictions (each counted once)."},
        "gangFailure": {"type": "object", "description": "A gang failure being decided: job (the trainer Job's "
                        "uid), since (when its pods failed). Present while the operator waits, at most "
                        "KUBELORA_GANG_FAILURE_GRACE_SECONDS (60) after since, for a peer's Node to read lost "
                        "(then the gang restart is not counted against runPolicy.backoffLimit).",
                        "properties": {"job": {"type": "string"}, "since": {"type": "string", "format": "date-time"}}},
        "createPending": {"type": "boolean", "description": "The API server deferred the job's first children "
                          "(a full ResourceQuota, throttling); the operator makes them when it takes them."},
        "restartPending": {"type": "boolean", "description": "The Job was deleted for a gang restart and is made "
                                                              "again at the next sync."},
        "trainerImage": {"type": "string", "description": "The trainer image the run started with; a Job made "
                                                          "again (gang restart) keeps it across operator upgrades."},
        "stopJob": {"type": "string", "description": "The uid of a failed run's trainer Job still to stop "
                                                     "(suspend, or delete when queued in Kueue); cleared once it is."},
        "restartedJob": {"type": "string", "description": "The uid of the Job a pending gang restart replaces: "
                                                          "recorded before that Job is deleted, so an operator "
                                                          "stopped in between deletes it at its next sync instead "
                                                          "of counting the failure again."},
        "deadlineUsedSeconds": {"type": "number", "description": "Of runPolicy.activeDeadlineSeconds, the seconds "
                                                                 "the run's earlier Jobs ran (not while suspended); "
                                                                 "a Job made again gets what is left."},
        "jobStartTime": {"type": "string", "description": "The running trainer Job's own start (its status.startTime), "
                                                          "for deadlineUsedSeconds."},
        "childrenDeleted": {"type": "boolean", "description": "runPolicy.ttlSecondsAfterFinished deleted the Job, "
                                                              "Service and ConfigMap (and the job's NetworkPolicy "
                                                              "with the operator's networkPolicy.perJob)."},
        "storageErrorSince": {"type": "string", "description": "Since when output.uri could not be read (a lasting "
                                                               "error makes the job Stalled)."},
        "startTime": {"type": "string", "format": "date-time"},
        "completionTime": {"type": "string", "format": "date-time"},
        "progress": {"type": "object", "description": "step, totalSteps, epoch, loss, samplesPerSecond, eta; samples (files written) and sampleStep with spec.samples; evalLoss and evalStep (the last held-out evaluation) with spec.evaluation; gpuPeakGiB on GPUs.",
                     "x-kubernetes-preserve-unknown-fields": True},
        "artifacts": {"type": "array", "description": "Uploaded files: uri, format (report: report.html), sha256.",
                      "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        "conditions": {
            "type": "array", "description": "Standard conditions (Ready, Stalled, ...).",
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
            "items": {"type": "object", "required": ["type", "status"], "properties": {
                "type": {"type": "string"}, "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string"}, "message": {"type": "string"},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer", "format": "int64"}}},
        },
    },
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    # a stalled job (ImagePullBackOff, a missing Secret, an unreadable bucket) reads Pending or
    # Training in Phase: the reason tells it from a queued or progressing one
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.type"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.progress.evalLoss", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _opt(path: str) -> str:
    """CEL: an optional integer field, -1 when absent (null counts as absent)."""
    obj, _, fld = path.rpartition(".")
    return f"(has({obj}.{fld}) ? {path} : -1)"


def immutability_rule(spec_cls) -> str:
    """CEL: every section of the spec but runPolicy equal to its old value, taken from the spec's
    own fields (a section added later is covered without a change here). A section with no default
    (samples, evaluation: absent unless written) is compared with has() too. Pure."""
    parts = []
    for name, f in spec_cls.model_fields.items():
        if name == "runPolicy":
            continue
        if f.is_required() or f.default_factory is not None:  # always present once the server defaulted it
            parts.append(f"self.{name} == oldSelf.{name}")
        else:
            parts += [f"has(self.{name}) == has(oldSelf.{name})", f"(!has(self.{name}) || self.{name} == oldSelf.{name})"]
    return " && ".join(parts)


def cel_rules() -> dict[str, list[dict]]:
    """x-kubernetes-validations per schema node (the API server enforces them at apply time):
    immutability after creation, and the family data rules of families.py."""
    from .families import RULES
    from .spec import LoRATrainingJobSpec
    spec_rules = [{"rule": immutability_rule(LoRATrainingJobSpec),
                   "message": "the spec is immutable after creation except spec.runPolicy.suspend; create a new "
                              "LoRATrainingJob"}]
    w = "(has(self.dataset.width) ? self.dataset.width : self.dataset.resolution)"
    h = "(has(self.dataset.height) ? self.dataset.height : self.dataset.resolution)"
    for t, r in RULES.items():
        if r.sizes:
            sizes = ", ".join(f"[{a}, {b}]" for a, b in r.sizes)
            spec_rules.append({"rule": f"self.model.type != '{t}' || [{sizes}].exists(s, s[0] == {w} && s[1] == {h})",
                               "message": f"{t} supports only the sizes "
                                          f"{', '.join(f'{a}x{b}' for a, b in r.sizes)} (dataset.width x dataset.height)"})
        if r.frames:
            spec_rules.append({"rule": f"self.model.type != '{t}' || !has(self.dataset.frames) || self.dataset.frames in {list(r.frames)}",
                               "message": f"{t} supports only {' or '.join(map(str, r.frames))} frames (dataset.frames)"})
        if r.frame_rule:
            a, b = r.frame_rule
            spec_rules.append({"rule": f"self.model.type != '{t}' || !has(self.dataset.frames) || self.dataset.frames % {a} == {b}",
                               "message": f"{t} needs dataset.frames = {a}k+{b}"})
    run_policy_rules = [{
        # every field but suspend (all integers): a new field is covered without a line here; the
        # running Job's pod template could not follow an edit anyway
        "rule": " && ".join(f"{_opt('self.' + f)} == {_opt('oldSelf.' + f)}"
                            for f in RunPolicySpec.model_fields if f != "suspend"),
        "message": "only spec.runPolicy.suspend may change after creation",
    }]
    dataset_rules = [{"rule": "has(self.uri) != has(self.sources)",
                      "message": "set exactly one of dataset.uri (one folder) and dataset.sources (several)"}]
    return {"spec": spec_rules, "runPolicy": run_policy_rules, "dataset": dataset_rules}


# metadata.name's rules (spec.NAME_PATTERN, spec.MAX_NAME): enforced by the API server at apply
# time, and by `kubelora validate` (spec.check_name) before it.
NAME_RULES = [
    {"rule": f"self.metadata.name.size() <= {MAX_NAME}", "message": NAME_TOO_LONG},
    {"rule": f"self.metadata.name.matches('{NAME_PATTERN}')", "message": NAME_BAD_CHARACTERS},
]


def build_crd() -> dict:
    spec = spec_schema()
    spec["description"] = "Desired state of a LoRA training run. Immutable after creation except runPolicy.suspend."
    rules = cel_rules()
    spec["x-kubernetes-validations"] = rules["spec"]
    spec["properties"]["runPolicy"]["x-kubernetes-validations"] = rules["runPolicy"]
    spec["properties"]["dataset"]["x-kubernetes-validations"] = rules["dataset"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": [SHORT_NAME], "categories": ["kubelora", "ml"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "LoRATrainingJob trains a LoRA adapter for a diffusion model (SDXL, Flux, LTX-Video, HunyuanVideo, Cosmos).",
                    "required": ["spec"],
                    "x-kubernetes-validations": NAME_RULES,
                    "properties": {
                        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec, "status": STATUS_SCHEMA,
                    },
                }},
            }],
        },
    }


def render() -> str:
    header = "# Generated by `kubelora crd` from kubelora_trainer/spec.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
