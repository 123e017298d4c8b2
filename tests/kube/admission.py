"""Custom-resource admission as the real API server does it, in pure functions over plain dicts.

For every create/update of a custom resource the API server: prunes fields the structural schema
does not declare, drops nulls from non-nullable fields, applies `default`s, validates against the
OpenAPI v3.0 schema and evaluates the `x-kubernetes-validations` CEL rules (transition rules with
`oldSelf` only on update). Errors come back as field errors whose text matches the real server's:

    spec.adapter.rank: Invalid value: 0: spec.adapter.rank in body should be greater than or equal to 1

The emulator (tests/kube/emulator.py) calls `admit()`; tests call the pieces directly.
Validation ratcheting (Kubernetes >= 1.30) is on: a value unchanged from the old object is not
re-validated, so an update that leaves an invalid field alone is not refused because of it.
"""
from __future__ import annotations

import copy
import datetime
import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

# --------------------------------------------------------------------------------------------
# Field errors, formatted like k8s.io/apimachinery/pkg/util/validation/field.Error.


@dataclass(frozen=True)
class FieldError:
    field: str    # "spec.adapter.rank"
    reason: str   # a metav1.CauseType: FieldValueInvalid, FieldValueRequired, ...
    detail: str   # the error body: "Invalid value: 0: spec.adapter.rank in body should be ..."

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}" if self.field else self.detail

    def as_cause(self) -> dict:
        return {"reason": self.reason, "message": self.detail, "field": self.field}


def format_value(value: Any) -> str:
    """A bad value as Go's `%#v`-ish rendering in field errors shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True)


def _go_float(value: float) -> str:
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    return text.replace("e-0", "e-").replace("e+0", "e+") if "e" in text else text


def invalid(field: str, value: Any, detail: str) -> FieldError:
    return FieldError(field, "FieldValueInvalid", f"Invalid value: {format_value(value)}: {detail}")


def type_invalid(field: str, value: Any, detail: str) -> FieldError:
    return FieldError(field, "FieldValueTypeInvalid", f"Invalid value: {format_value(value)}: {detail}")


def required(field: str, detail: str = "") -> FieldError:
    return FieldError(field, "FieldValueRequired", "Required value" + (f": {detail}" if detail else ""))


def forbidden(field: str, detail: str) -> FieldError:
    return FieldError(field, "FieldValueForbidden", f"Forbidden: {detail}")


def duplicate(field: str, value: Any) -> FieldError:
    return FieldError(field, "FieldValueDuplicate", f"Duplicate value: {format_value(value)}")


def not_supported(field: str, value: Any, allowed: Iterable[Any]) -> FieldError:
    choices = ", ".join(format_value(v) for v in allowed)
    return FieldError(field, "FieldValueNotSupported",
                      f"Unsupported value: {format_value(value)}: supported values: {choices}")


def too_long(field: str, limit: int) -> FieldError:
    return FieldError(field, "FieldValueTooLong", f"Too long: may not be more than {limit} bytes")


def too_many(field: str, actual: int, limit: int) -> FieldError:
    return FieldError(field, "FieldValueTooMany", f"Too many: {actual}: must have at most {limit} items")


def invalid_status(kind: str, group: str, name: str, errors: list[FieldError]) -> dict:
    """The 422 `Status` the API server answers for an invalid object (apierrors.NewInvalid)."""
    qualified = f"{kind}.{group}" if group else kind
    joined = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
    return {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f'{qualified} "{name}" is invalid: {joined}',
        "reason": "Invalid",
        "details": {"name": name, "group": group, "kind": kind, "causes": [e.as_cause() for e in errors]},
        "code": 422,
    }


# --------------------------------------------------------------------------------------------
# ObjectMeta checks the API server makes for every kind (names, labels, owner references).

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*"
_DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
_LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"

_SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                  "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                  f"validation is '{_DNS1123_SUBDOMAIN}')")
_LABEL_1123_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                   "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                   f"validation is '{_DNS1123_LABEL}')")
_LABEL_1035_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                   "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                   f"regex used for validation is '{_DNS1035_LABEL}')")


def name_rule(group: str, plural: str) -> tuple[str, int, str]:
    """(regex, max length, message) for object names of a resource."""
    if (group, plural) == ("", "services"):
        return _DNS1035_LABEL, 63, _LABEL_1035_MSG
    if (group, plural) == ("", "namespaces"):
        return _DNS1123_LABEL, 63, _LABEL_1123_MSG
    if (group, plural) == ("batch", "jobs"):  # pods get a job-name label, so 63 at most
        return _DNS1123_SUBDOMAIN, 63, _SUBDOMAIN_MSG
    return _DNS1123_SUBDOMAIN, 253, _SUBDOMAIN_MSG


def validate_object_meta(obj: dict, group: str, plural: str) -> list[FieldError]:
    meta = obj.get("metadata") or {}
    errors: list[FieldError] = []
    name = meta.get("name") or ""
    pattern, limit, message = name_rule(group, plural)
    if len(name) > limit:
        errors.append(invalid("metadata.name", name, f"must be no more than {limit} characters"))
    elif not re.fullmatch(pattern, name):
        errors.append(invalid("metadata.name", name, message))
    for kind in ("labels", "annotations"):
        values = meta.get(kind) or {}
        if not isinstance(values, dict):
            errors.append(type_invalid(f"metadata.{kind}", _json_type(values), "must be a map of strings"))
            continue
        for key, value in values.items():
            prefix, _, short = key.rpartition("/")
            if (prefix and (len(prefix) > 253 or not re.fullmatch(_DNS1123_SUBDOMAIN, prefix))) \
                    or len(short) > 63 or not re.fullmatch(_QUALIFIED_NAME, short):
                errors.append(invalid(f"metadata.{kind}", key,
                                      "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
                                      "start and end with an alphanumeric character"))
            if not isinstance(value, str):
                errors.append(type_invalid(f"metadata.{kind}[{key}]", _json_type(value), "must be a string"))
            elif kind == "labels" and len(value) > 63:
                errors.append(invalid("metadata.labels", value, "must be no more than 63 characters"))
            elif kind == "labels" and not re.fullmatch(_LABEL_VALUE, value):
                errors.append(invalid("metadata.labels", value,
                                      "a valid label must be an empty string or consist of alphanumeric characters, "
                                      "'-', '_' or '.', and must start and end with an alphanumeric character"))
    refs = meta.get("ownerReferences") or []
    for i, ref in enumerate(refs):
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                errors.append(invalid(f"metadata.ownerReferences[{i}].{field}", ref.get(field, ""),
                                      f"{field} must not be empty"))
    controllers = [r.get("name") for r in refs if r.get("controller")]
    if len(controllers) > 1:
        errors.append(invalid("metadata.ownerReferences", refs,
                              f"Only one reference can have Controller set to true. Found \"true\" in "
                              f"references for {' and '.join(controllers)}"))
    return errors


# --------------------------------------------------------------------------------------------
# CRD helpers.


def crd_version(crd: dict, version: str) -> dict | None:
    for v in crd.get("spec", {}).get("versions", []):
        if v.get("name") == version:
            return v
    return None


def crd_schema(crd: dict, version: str) -> dict | None:
    v = crd_version(crd, version)
    if v is None:
        return None
    return (v.get("schema") or {}).get("openAPIV3Schema")


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _key(path: str, key: str) -> str:
    return f"{path}[{key}]"


def check_crd(crd: dict) -> list[FieldError]:
    """What the API server refuses in a CustomResourceDefinition itself (a useful subset)."""
    errors: list[FieldError] = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group") or ""
    plural = names.get("plural") or ""
    name = (crd.get("metadata") or {}).get("name", "")
    if not group:
        errors.append(required("spec.group"))
    if not plural:
        errors.append(required("spec.names.plural"))
    if not names.get("kind"):
        errors.append(required("spec.names.kind"))
    if plural and group and name != f"{plural}.{group}":
        errors.append(invalid("metadata.name", name, 'must be spec.names.plural+"."+spec.group'))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        errors.append(not_supported("spec.scope", spec.get("scope"), ["Cluster", "Namespaced"]))
    versions = spec.get("versions") or []
    if not versions:
        errors.append(required("spec.versions", "must have exactly one version marked as storage version"))
    elif sum(1 for v in versions if v.get("storage")) != 1:
        errors.append(invalid("spec.versions", versions and [v.get("name") for v in versions],
                              "must have exactly one version marked as storage version"))
    for i, v in enumerate(versions):
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        base = f"spec.versions[{i}].schema.openAPIV3Schema"
        if schema is None:
            errors.append(required(base, "schemas are required"))
            continue
        errors.extend(_check_schema_node(schema, base))
    return errors


def _check_schema_node(schema: dict, path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    structural_escape = schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
    if not schema.get("type") and not structural_escape and (schema.get("properties") or schema.get("items")):
        errors.append(required(_child(path, "type"), "must not be empty for specified object fields"))
    for i, rule in enumerate(schema.get("x-kubernetes-validations") or []):
        rule_path = f"{path}.x-kubernetes-validations[{i}].rule"
        try:
            _compile(rule["rule"])
        except Exception as e:  # noqa: BLE001 - the CEL library raises several types
            errors.append(invalid(rule_path, rule.get("rule"), f"compilation failed: {e}"))
    for name, sub in (schema.get("properties") or {}).items():
        errors.extend(_check_schema_node(sub, f"{path}.properties[{name}]"))
    if isinstance(schema.get("items"), dict):
        errors.extend(_check_schema_node(schema["items"], f"{path}.items"))
    if isinstance(schema.get("additionalProperties"), dict):
        errors.extend(_check_schema_node(schema["additionalProperties"], f"{path}.additionalProperties"))
    return errors


# --------------------------------------------------------------------------------------------
# Pruning and defaulting (structural schemas).

_ROOT_KEPT = ("apiVersion", "kind", "metadata")


def prune(obj: Any, schema: dict, *, root: bool = True) -> tuple[Any, list[str]]:
    """Drop fields the schema does not declare. Returns (pruned copy, paths of dropped fields)."""
    dropped: list[str] = []
    result = _prune(copy.deepcopy(obj), schema, "", dropped, root=root)
    return result, dropped


def _prune(value: Any, schema: dict, path: str, dropped: list[str], *, root: bool = False) -> Any:
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") or False
        embedded = schema.get("x-kubernetes-embedded-resource") or False
        for key in list(value):
            if (root or embedded) and key in _ROOT_KEPT:
                continue
            if key in props:
                value[key] = _prune(value[key], props[key], _child(path, key), dropped)
            elif isinstance(additional, dict):
                value[key] = _prune(value[key], additional, _child(path, key), dropped)
            elif additional is True or preserve:
                continue
            else:
                dropped.append(_child(path, key))
                del value[key]
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                value[i] = _prune(item, items, _index(path, i), dropped)
    return value


def apply_defaults(obj: Any, schema: dict) -> Any:
    """Apply `default`s like structural-schema defaulting; nulls of non-nullable fields are
    replaced by the default or dropped. Returns a new value."""
    return _default(copy.deepcopy(obj), schema, root=True)


def _default(value: Any, schema: dict, *, root: bool = False) -> Any:
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if root and key == "metadata":
                continue
            if key in value and value[key] is None and not sub.get("nullable"):
                if "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
                else:
                    del value[key]
            elif key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value and value[key] is not None:
                value[key] = _default(value[key], sub)
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for key in list(value):
                if key not in props and value[key] is not None:
                    value[key] = _default(value[key], additional)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                if item is not None:
                    value[i] = _default(item, items)
    return value


# --------------------------------------------------------------------------------------------
# OpenAPI v3.0 validation (kube-openapi's messages) and CEL rules.

_MISSING = object()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _is_type(value: Any, t: str) -> bool:
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _format_ok(value: str, fmt: str) -> bool:
    if fmt == "date-time":
        return bool(_DATE_TIME.match(value))
    if fmt == "date":
        if not _DATE.match(value):
            return False
        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            return False
    return True


def validate(obj: dict, schema: dict, old: dict | None = None) -> list[FieldError]:
    """Schema errors, then CEL rule errors, for a whole object (old: the stored object on update)."""
    schema_errors: list[FieldError] = []
    rule_errors: list[FieldError] = []
    _walk(obj, schema, "", old if old is not None else _MISSING, schema_errors, rule_errors, root=True)
    return schema_errors + rule_errors


def _walk(value: Any, schema: dict, path: str, old: Any, errs: list[FieldError],
          rule_errs: list[FieldError], *, root: bool = False) -> None:
    if old is not _MISSING and value == old and not root:
        return  # ratcheting: an unchanged value is not re-validated
    if not _check_node(value, schema, path, errs):
        return
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                errs.append(required(_child(path, name)))
        for key, sub_value in value.items():
            if root and key in _ROOT_KEPT:
                continue
            sub = props.get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is None:
                continue
            sub_old = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
            _walk(sub_value, sub, _child(path, key), sub_old, errs, rule_errs)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        old_by_key = _correlate_list(old, schema)
        for i, item in enumerate(value):
            item_old = old_by_key(item) if old_by_key else _MISSING
            _walk(item, items, _index(path, i), item_old, errs, rule_errs)
    if schema.get("x-kubernetes-validations"):
        _run_rules(value, schema, path, old, rule_errs)


def _correlate_list(old: Any, schema: dict):
    """Old items correlate with new ones only in map lists (by their keys) and sets (by value)."""
    if not isinstance(old, list):
        return None
    kind = schema.get("x-kubernetes-list-type")
    if kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        index = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, dict)}
        return lambda item: index.get(tuple(item.get(k) for k in keys), _MISSING) if isinstance(item, dict) else _MISSING
    if kind == "set":
        return lambda item: item if item in old else _MISSING
    return None


def _check_node(value: Any, schema: dict, path: str, errs: list[FieldError]) -> bool:
    """Checks of one node; False when its type is wrong (then nothing below it is checked)."""
    name = path or "body"
    t = schema.get("type")
    if value is None:
        if schema.get("nullable"):
            return False
        if t:
            errs.append(type_invalid(path, "null", f'{name} in body must be of type {t}: "null"'))
            return False
    if schema.get("x-kubernetes-int-or-string"):
        if not (_is_type(value, "integer") or isinstance(value, str)):
            errs.append(type_invalid(path, _json_type(value),
                                     f'{name} in body must be of type integer,string: "{_json_type(value)}"'))
            return False
    elif t and not _is_type(value, t):
        errs.append(type_invalid(path, _json_type(value), f'{name} in body must be of type {t}: "{_json_type(value)}"'))
        return False

    if "enum" in schema and value not in schema["enum"]:
        errs.append(not_supported(path, value, schema["enum"]))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(value, schema, path, name, errs)
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append(too_long(path, schema["maxLength"]))
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.append(invalid(path, value, f"{name} in body should be at least {schema['minLength']} chars long"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(invalid(path, value, f"{name} in body should match '{schema['pattern']}'"))
        if "format" in schema and not _format_ok(value, schema["format"]):
            errs.append(invalid(path, value, f'{name} in body must be of type {schema["format"]}: {json.dumps(value)}'))
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append(too_many(path, len(value), schema["maxItems"]))
        if "minItems" in schema and len(value) < schema["minItems"]:
            errs.append(invalid(path, value, f"{name} in body should have at least {schema['minItems']} items"))
        _check_list_uniqueness(value, schema, path, name, errs)
    if isinstance(value, dict):
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errs.append(too_many(path, len(value), schema["maxProperties"]))
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            errs.append(invalid(path, value, f"{name} in body should have at least {schema['minProperties']} properties"))
    for sub in schema.get("allOf") or []:
        _check_node(value, sub, path, errs)
    if schema.get("anyOf"):
        if not any(not _node_errors(value, sub, path) for sub in schema["anyOf"]):
            errs.append(invalid(path, value, f"{name} in body must match at least one schema in anyOf"))
    if schema.get("oneOf"):
        if sum(1 for sub in schema["oneOf"] if not _node_errors(value, sub, path)) != 1:
            errs.append(invalid(path, value, f"{name} in body must validate one and only one schema (oneOf)"))
    if isinstance(schema.get("not"), dict) and not _node_errors(value, schema["not"], path):
        errs.append(invalid(path, value, f"{name} in body should not match the schema in not"))
    return True


def _node_errors(value: Any, schema: dict, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    _check_node(value, schema, path, errs)
    if isinstance(value, dict):
        for name in schema.get("required") or []:
            if name not in value:
                errs.append(required(_child(path, name)))
    return errs


def _check_number(value: float, schema: dict, path: str, name: str, errs: list[FieldError]) -> None:
    if "minimum" in schema:
        m = schema["minimum"]
        if schema.get("exclusiveMinimum") is True:
            if not value > m:
                errs.append(invalid(path, value, f"{name} in body should be greater than {_go_float(float(m))}"))
        elif not value >= m:
            errs.append(invalid(path, value, f"{name} in body should be greater than or equal to {_go_float(float(m))}"))
    if "maximum" in schema:
        m = schema["maximum"]
        if schema.get("exclusiveMaximum") is True:
            if not value < m:
                errs.append(invalid(path, value, f"{name} in body should be less than {_go_float(float(m))}"))
        elif not value <= m:
            errs.append(invalid(path, value, f"{name} in body should be less than or equal to {_go_float(float(m))}"))
    if "multipleOf" in schema:
        m = schema["multipleOf"]
        q = value / m
        if not math.isclose(q, round(q), rel_tol=0, abs_tol=1e-9):
            errs.append(invalid(path, value, f"{name} in body should be a multiple of {_go_float(float(m))}"))


def _check_list_uniqueness(value: list, schema: dict, path: str, name: str, errs: list[FieldError]) -> None:
    kind = schema.get("x-kubernetes-list-type")
    if kind == "set" or schema.get("uniqueItems"):
        seen: list[Any] = []
        for i, item in enumerate(value):
            if item in seen:
                if kind == "set":
                    errs.append(duplicate(_index(path, i), item))
                else:
                    errs.append(invalid(path, value, f"{name} in body shouldn't contain duplicates"))
                    return
            seen.append(item)
    elif kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen_keys: set = set()
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            k = tuple(json.dumps(item.get(key), sort_keys=True) for key in keys)
            if k in seen_keys:
                dup = {key: item.get(key) for key in keys}
                errs.append(duplicate(_index(path, i), dup))
            seen_keys.add(k)


# --------------------------------------------------------------------------------------------
# CEL (x-kubernetes-validations), evaluated with the `cel` package (common-expression-language).


@functools.lru_cache(maxsize=1024)
def _compile(rule: str):
    import cel  # common-expression-language
    return cel.compile(rule)


@functools.lru_cache(maxsize=1)
def _functions() -> dict:
    from cel.stdlib import EXTENSIONS
    funcs: dict = {}
    for library in EXTENSIONS.values():
        funcs.update(library)
    funcs["isSorted"] = lambda xs: list(xs) == sorted(xs)
    return funcs


def is_transition_rule(rule: str) -> bool:
    return "oldSelf" in _compile(rule).variables()


def to_cel(value: Any, schema: dict) -> Any:
    """A JSON value as CEL sees it under its schema: `number` fields are doubles, `integer` ints."""
    if value is None:
        return None
    t = schema.get("type")
    if t == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if t == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            sub = props.get(k) or (additional if isinstance(additional, dict) else {})
            out[k] = to_cel(v, sub)
        return out
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [to_cel(v, items) for v in value]
    return value


def evaluate_rule(rule: str, self_value: Any, old_value: Any = _MISSING) -> Any:
    """Evaluate one CEL rule with `self` (and `oldSelf`) bound. Raises on evaluation errors."""
    import cel
    variables = {"self": self_value}
    if old_value is not _MISSING:
        variables["oldSelf"] = old_value
    return _compile(rule).execute(cel.Context(variables=variables, functions=_functions()))


def _scalar_type_name(value: Any, schema: dict) -> str:
    t = schema.get("type")
    if t:
        return t
    return _json_type(value)


def _run_rules(value: Any, schema: dict, path: str, old: Any, errs: list[FieldError]) -> None:
    self_value = to_cel(value, schema)
    old_value = to_cel(old, schema) if old is not _MISSING else _MISSING
    type_name = _scalar_type_name(value, schema)
    for rule in schema.get("x-kubernetes-validations") or []:
        text = rule["rule"]
        try:
            transition = is_transition_rule(text)
        except Exception:  # noqa: BLE001 - a rule that does not compile was refused with its CRD
            continue
        if transition and old is _MISSING:
            continue  # transition rules run only on update, where the old value correlates
        field = path
        if rule.get("fieldPath"):
            field = _child(path, rule["fieldPath"].lstrip("."))
        try:
            result = evaluate_rule(text, self_value, old_value if transition else _MISSING)
        except Exception as e:  # noqa: BLE001
            errs.append(invalid(field, type_name, f"{e} evaluating rule: {text}"))
            continue
        if result is True:
            continue
        message = rule.get("message") or f"failed rule: {text}"
        if rule.get("messageExpression"):
            try:
                rendered = evaluate_rule(rule["messageExpression"], self_value,
                                         old_value if transition else _MISSING)
                if isinstance(rendered, str) and rendered.strip():
                    message = rendered
            except Exception:  # noqa: BLE001 - the real server falls back to `message`
                pass
        reason = rule.get("reason") or "FieldValueInvalid"
        if reason == "FieldValueForbidden":
            errs.append(forbidden(field, message))
        elif reason == "FieldValueRequired":
            errs.append(required(field, message))
        elif reason == "FieldValueDuplicate":
            errs.append(FieldError(field, reason, f"Duplicate value: {message}"))
        else:
            errs.append(invalid(field, type_name, message))


# --------------------------------------------------------------------------------------------
# Everything together.


def admit(obj: dict, schema: dict, old: dict | None = None) -> tuple[dict, list[str], list[FieldError]]:
    """Prune, default and validate one custom resource the way the API server stores it.

    Returns (the object to store, paths of unknown fields that were dropped, field errors).
    """
    pruned, dropped = prune(obj, schema)
    defaulted = apply_defaults(pruned, schema)
    errors = validate(defaulted, schema, old=old)
    return defaulted, dropped, errors


QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
QUANTITY_MSG = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"


def validate_pod_resources(obj: dict, group: str, plural: str) -> list[FieldError]:
    """The API server parses every container resource quantity of a Job's pod template and checks
    its nodeSelector as labels (the built-in checks beyond ObjectMeta that the operator's children
    need here)."""
    if (group, plural) != ("batch", "jobs"):
        return []
    errors = []
    pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    for key, value in (pod.get("nodeSelector") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not re.fullmatch(_LABEL_VALUE, value):
            errors.append(invalid("spec.template.spec.nodeSelector", value,
                                  "a valid label must be an empty string or consist of alphanumeric characters, "
                                  "'-', '_' or '.', and must start and end with an alphanumeric character"))
    containers = pod.get("containers") or []
    for i, c in enumerate(containers):
        for kind in ("requests", "limits"):
            for key, value in ((c.get("resources") or {}).get(kind) or {}).items():
                if not QUANTITY.fullmatch(str(value)):
                    errors.append(invalid(f"spec.template.spec.containers[{i}].resources.{kind}[{key}]", value,
                                          QUANTITY_MSG))
    return errors
