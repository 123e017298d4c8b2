"""An emulated Kubernetes API server for tests: kmock 0.8's `KubernetesEmulator`, made to behave
like the real API server for kopf, kubectl and the official `kubernetes` client.

What the subclass adds or fixes over kmock as shipped:

- metadata the server owns: a monotonic `resourceVersion`, `uid`, `creationTimestamp`,
  `generation` (bumped on spec changes only), `generateName`, `kind`/`apiVersion`;
- `PUT` (replace), the `/status` subresource (PATCH and PUT change only `.status`, and main-endpoint
  writes leave `.status` alone when the resource has the subresource), merge / JSON / strategic
  (approximated) / apply (approximated) patches, a failed JSON-patch `test` answers 422,
  `resourceVersion` preconditions answer 409, no-op updates emit nothing;
- list responses with `kind: FooList`, `apiVersion`, `metadata.resourceVersion`, `limit`/`continue`;
- watches that honour `?resourceVersion=` (replay only newer events; 410 when too old),
  `sendInitialEvents`, `timeoutSeconds`, label and field selectors (objects that stop or start
  matching arrive as DELETED / ADDED, as from the real watch cache);
- `GET /api/v1/namespaces` and namespace objects; namespaced writes need an existing, non-terminating
  namespace; deleting a namespace deletes what is in it;
- label selectors (`a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`) on list, watch and
  deletecollection; field selectors on dotted paths (`metadata.name=x`);
- finalizers (deletionTimestamp, removal when the last finalizer goes, no new finalizers on a
  deleting object) and garbage collection through `metadata.ownerReferences` with Background,
  Foreground (`foregroundDeletion` finalizer) and Orphan propagation, cascading;
- CustomResourceDefinitions: creating one serves the resource (discovery included), and every write
  of that kind is pruned, defaulted and validated against the CRD's schema and CEL rules
  (see admission.py), with the real server's 422 `Invalid` Status;
- object names, labels and ownerReferences checked for every kind as the real server does
  (e.g. Service names are DNS-1035 labels, Job names at most 63 characters, label values);
- `meta.k8s.io/v1` Table responses, also on watch (`kubectl get [-w]` shows printer columns);
- ResourceQuota object counts (`count/services`, `count/jobs.batch`, ...) refuse a create past the
  limit with the quota admission's 403 `exceeded quota` message.

Not emulated: pods never run, no controllers (a Job gets no status unless a test writes it), no
defaulting or validation of built-in kinds beyond metadata, no OpenAPI (`kubectl apply
--validate=false`; `kubectl explain` fails), no protobuf bodies (kubectl's imperative generators such
as `kubectl create configmap x --from-literal` send protobuf and get 415: use manifests), no
authentication/RBAC, no server-side-apply field ownership (apply patches merge), no conversion
between CRD versions, CRD deletion drops its objects without waiting for their finalizers, and a
dependent whose owner never existed is not collected.

`KubeServer` runs the emulator on 127.0.0.1:<free port> in a background thread (see fixtures.py).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import datetime
import functools
import json
import logging
import random
import re
import string
import threading
import uuid
import warnings
from typing import Any, AsyncIterator, Callable

import aiohttp.web
import attrs
import jsonpatch
import yaml
from kmock import KubernetesEmulator, ResourceInfo, ResourcesArray, Server, resource
from kmock._internal import apps, enums, rendering

from . import admission

NAMESPACES = resource("", "v1", "namespaces")
CRDS = resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
JOBS = resource("batch", "v1", "jobs")
QUOTAS = resource("", "v1", "resourcequotas")
PODS = resource("", "v1", "pods")
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
ALL_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}


def query_bool(value) -> bool:
    """A boolean query parameter as the API server reads it (Go's strconv.ParseBool): the
    kubernetes Python client up to 36 sends watch=True, later ones watch=true."""
    return value in ("1", "t", "T", "TRUE", "true", "True")
LOG_LIMIT = 20000  # watch events kept for ?resourceVersion= replays; older ones answer 410 Gone


class ApiError(Exception):
    """An HTTP error answered as a Kubernetes `Status` object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details, "code": self.code}


def _now(after_seconds: float = 0) -> str:
    at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=after_seconds)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _group_version(res: resource) -> str:
    return f"{res.group}/{res.version}" if res.group else str(res.version)


def _qualified(res: resource) -> str:
    return f"{res.plural}.{res.group}" if res.group else str(res.plural)


# --------------------------------------------------------------------------------------------
# Request paths.

@attrs.frozen
class ApiPath:
    group: str | None = None
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    watch: bool = False  # the deprecated /watch/ path prefix


def parse_api_path(path: str) -> ApiPath:
    """Split /api/v1/namespaces/ns/configmaps/name/status and friends (kmock's parser crashes on
    /api/v1/namespaces and mistakes /api/v1/namespaces/x/status for a namespace)."""
    parts = [p for p in path.strip("/").split("/")]
    if len(parts) >= 2 and parts[0] == "apis":
        group, version, rest = parts[1], (parts[2] if len(parts) > 2 else None), parts[3:]
    elif len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    else:
        return ApiPath()
    watch = False
    if rest[:1] == ["watch"]:
        watch, rest = True, rest[1:]
    namespace = None
    if rest[:1] == ["namespaces"] and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    return ApiPath(group=group, version=version, plural=rest[0] if rest else None,
                   namespace=namespace, name=rest[1] if len(rest) > 1 else None,
                   subresource="/".join(rest[2:]) or None, watch=watch)


# --------------------------------------------------------------------------------------------
# Selectors.

_SEL_SET = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_SEL_EQ = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|=|!=)\s*([A-Za-z0-9_.-]*)\s*$")
_SEL_EXISTS = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*$")


def parse_label_selector(text: str | None) -> list[tuple[str, str, tuple[str, ...]]]:
    """`a=b,c!=d,e in (f,g),h notin (i),j,!k` → requirements; raises ValueError when malformed."""
    reqs: list[tuple[str, str, tuple[str, ...]]] = []
    if not text:
        return reqs
    terms, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    for term in terms:
        if not term.strip():
            continue
        if m := _SEL_SET.match(term):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append((m.group(1), m.group(2), values))
        elif m := _SEL_EQ.match(term):
            reqs.append((m.group(1), "!=" if m.group(2) == "!=" else "=", (m.group(3),)))
        elif m := _SEL_EXISTS.match(term):
            reqs.append((m.group(2), "!" if m.group(1) else "exists", ()))
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")
    return reqs


def match_labels(reqs: list[tuple[str, str, tuple[str, ...]]], labels: dict | None) -> bool:
    labels = labels or {}
    for key, op, values in reqs:
        present, value = key in labels, labels.get(key)
        if op == "=":
            ok = present and value == values[0]
        elif op == "!=":
            ok = not present or value != values[0]
        elif op == "in":
            ok = present and value in values
        elif op == "notin":
            ok = not present or value not in values
        else:
            ok = present if op == "exists" else not present
        if not ok:
            return False
    return True


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    reqs: list[tuple[str, str, str]] = []
    for term in (text or "").split(","):
        if not term.strip():
            continue
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if not m:
            raise ValueError(f"invalid selector: {term!r}")
        reqs.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return reqs


def match_fields(reqs: list[tuple[str, str, str]], obj: dict) -> bool:
    for path, op, expected in reqs:
        value: Any = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        text = "" if value is None else (json.dumps(value) if isinstance(value, bool) else str(value))
        if (text == expected) != (op == "="):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Patches.

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _named(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(i, dict) and "name" in i for i in items)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """An approximation of strategic merge patch: a merge patch whose lists of named objects
    (containers, env, volumes, ports...) merge by `name`, with the `$patch`/`$deleteFromPrimitiveList`
    directives; other lists are replaced."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
        elif key.startswith("$"):
            continue
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and value.get("$patch") == "delete":
            result.pop(key, None)
        elif _named(value) and _named(result.get(key)):
            merged = {item["name"]: item for item in result[key]}
            order = [item["name"] for item in result[key]]
            for item in value:
                if item.get("$patch") == "delete":
                    merged.pop(item["name"], None)
                    continue
                if item["name"] not in merged:
                    order.append(item["name"])
                merged[item["name"]] = strategic_merge_patch(merged.get(item["name"]), item)
            result[key] = [merged[n] for n in order if n in merged]
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------------------------
# Tables (what `kubectl get` prints).

def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def json_path(obj: Any, path: str) -> list[Any]:
    """The simple JSONPath of printer columns: `.a.b`, `.a[0]`, `.a[*].b`, `.a[?(@.k=="v")].b`."""
    tokens = re.findall(r"\[\?\(@\.([\w.-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]|\[(\*|\d+)\]|\.?([^.\[\]]+)", path)
    values = [obj]
    for filter_key, filter_value, index, name in tokens:
        nxt: list[Any] = []
        for v in values:
            if name:
                if isinstance(v, dict) and name in v:
                    nxt.append(v[name])
            elif index == "*":
                nxt.extend(v if isinstance(v, list) else [])
            elif index:
                if isinstance(v, list) and int(index) < len(v):
                    nxt.append(v[int(index)])
            elif filter_key:
                for item in v if isinstance(v, list) else []:
                    if isinstance(item, dict) and str(item.get(filter_key)) == filter_value:
                        nxt.append(item)
        values = nxt
    return values


def _cell(value: Any, col_type: str) -> Any:
    if value is None:
        return None
    if col_type == "date":
        try:
            ts = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return "<invalid>"
        return human_duration((datetime.datetime.now(datetime.timezone.utc) - ts).total_seconds())
    if col_type == "integer":
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if col_type == "number":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if col_type == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (dict, list)) else admission.format_value(value)


def _partial(obj: dict) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


# --------------------------------------------------------------------------------------------
# The emulator.

@attrs.define(kw_only=True, eq=False)
class _Watch:
    res: resource
    namespace: str | None
    name: str | None
    labels: list
    fields: list
    queue: asyncio.Queue = attrs.field(factory=asyncio.Queue)

    def matches(self, res: resource, obj: dict | None) -> bool:
        if obj is None or res != self.res:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        return match_labels(self.labels, meta.get("labels")) and match_fields(self.fields, obj)

    def translate(self, res: resource, event: dict, old: dict | None) -> dict | None:
        """The event as this watcher sees it: selector changes turn MODIFIED into ADDED/DELETED."""
        now = self.matches(res, event["object"])
        if event["type"] != "MODIFIED":
            return event if now else None
        before = self.matches(res, old)
        if now and before:
            return event
        if now:
            return {"type": "ADDED", "object": event["object"]}
        if before:
            return {"type": "DELETED", "object": event["object"]}
        return None


@functools.lru_cache(maxsize=1)
def _bundled_resources() -> dict:
    """The built-in resources of a recent k3s, as kmock bundles them."""
    bundled = ResourcesArray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kmock uses importlib.resources.read_binary
        bundled.load_bundled()
    return {res: bundled[res] for res in bundled}


@attrs.define(kw_only=True)
class KubeEmulator(KubernetesEmulator):
    """kmock's KubernetesEmulator with the behaviour of a real API server (see the module doc).

    State lives in kmock's `objects` (with history); `resources` is the discovery data (the
    built-in resources bundled with kmock plus those that CRDs add). Mutate it only from the
    server's event loop (`KubeServer.call`), or through the HTTP API.
    """

    auto_namespaces: bool = False  # create a missing namespace on first use instead of 404

    _rv: int = attrs.field(default=0, init=False)
    _log: list = attrs.field(factory=list, init=False)   # (rv, resource, event, old object)
    _log_floor: int = attrs.field(default=0, init=False)
    _watches: set = attrs.field(factory=set, init=False)
    _crds: dict = attrs.field(factory=dict, init=False)  # (group, plural) -> CRD object

    def __attrs_post_init__(self) -> None:
        # Skip KubernetesEmulator's own action handlers: one fallback serves every object request.
        # Discovery (/api, /apis, /apis/g/v, /version) stays with kmock's scaffold.
        super(KubernetesEmulator, self).__attrs_post_init__()
        self.fallback[self._is_object_request] << self._serve_objects
        self.reset()

    # -- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to a fresh cluster: built-in resources only, the default namespaces, no objects.
        resourceVersions keep increasing across resets."""
        self._objects.clear()
        self._resources.clear()
        for res, info in _bundled_resources().items():
            self._resources[res] = copy.deepcopy(info)
        self._crds.clear()
        self._log.clear()
        self._log_floor = self._rv
        for w in list(self._watches):
            w.queue.put_nowait(None)  # end open watches
        self._watches.clear()
        self._requests.clear()
        for ns in DEFAULT_NAMESPACES:
            self._create_namespace(ns)

    def live(self, res: Any, namespace: str | None, name: str) -> dict | None:
        """The current object, or None."""
        key = (resource(res), namespace, name)
        if key in self._objects and not self._objects[key].deleted:
            return self._objects[key].raw
        return None

    def live_objects(self, res: Any = None, namespace: str | None = None) -> list[tuple[tuple, dict]]:
        want = resource(res) if res is not None else None
        out = []
        for key, obj in list(self._objects.items()):
            if obj.deleted or (want is not None and key[0] != want):
                continue
            if namespace is not None and key[1] != namespace:
                continue
            out.append((key, obj.raw))
        return out

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, res: resource, kind: str, obj: dict, old: dict | None = None) -> None:
        event = {"type": kind, "object": copy.deepcopy(obj)}
        rv = int(obj["metadata"]["resourceVersion"])
        self._log.append((rv, res, event, old))
        if len(self._log) > LOG_LIMIT:
            dropped = self._log[: len(self._log) - LOG_LIMIT]
            del self._log[: len(dropped)]
            self._log_floor = dropped[-1][0]
        for w in list(self._watches):
            if (seen := w.translate(res, event, old)) is not None:
                w.queue.put_nowait(seen)

    def _store(self, res: resource, obj: dict, kind: str, old: dict | None = None) -> dict:
        """Give obj a new resourceVersion, store it as the latest version and tell the watchers."""
        obj["metadata"]["resourceVersion"] = self._next_rv()
        key = (res, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in self._objects:
            self._objects[key].history.append(copy.deepcopy(obj))
        else:
            self._objects[key] = copy.deepcopy(obj)
        self._emit(res, kind, obj, old)
        return obj

    def _info(self, res: resource) -> ResourceInfo:
        if res not in self._resources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return self._resources[res]

    def _is_object_request(self, request: rendering.Request) -> bool:
        return request.resource is not None and request.resource.plural is not None

    # -- HTTP ------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # RawHandler.__call__ with our own request parsing (see parse_api_path).
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await self._parse_request(raw_request, id=len(self._requests))
            self._requests.append(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as e:
                raw_response = e.args[0]
                raise e.__cause__ or e
        except Exception as e:  # noqa: BLE001 - every failure becomes a Status response
            if self._errors:
                self._errors[-1].append(e)  # server-side crashes, for tests to assert on
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle (it mutates state for every request, kmock-style):
        # user reactions first, then our fallback serves the API.
        return await apps.RawHandler._handle(self, request)

    async def _parse_request(self, raw: aiohttp.web.BaseRequest, *, id: int) -> rendering.Request:
        body = await raw.read()
        text = body.decode("utf-8", "replace")
        data = None
        if body:
            try:
                data = json.loads(text)
            except ValueError:
                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError:
                    data = None
        p = parse_api_path(raw.path)
        res = None if p.group is None else resource(group=p.group, version=p.version, plural=p.plural)
        method = enums.method(raw.method)
        params = dict(raw.query)
        if p.watch:
            params["watch"] = "true"
        action = None
        if res is not None and p.plural is not None:
            if method == enums.method.GET and query_bool(params.get("watch")):
                action = enums.action.WATCH
            elif method == enums.method.GET:
                action = enums.action.FETCH if p.name else enums.action.LIST
            elif method == enums.method.POST:
                action = enums.action.CREATE
            elif method in (enums.method.PATCH, enums.method.PUT):
                action = enums.action.UPDATE
            elif method == enums.method.DELETE and p.name:
                action = enums.action.DELETE
        return rendering.Request(
            id=id, raw_request=raw, url=raw.url, method=raw.method, params=params,
            headers=dict(raw.headers), cookies=dict(raw.cookies), data=data, body=body, text=text,
            action=action, resource=res, namespace=p.namespace, name=p.name, subresource=p.subresource)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiError):
            return aiohttp.web.json_response(exc.status(), status=exc.code)
        return await super()._render_error(exc)

    @staticmethod
    def _respond(payload: Any, status: int = 200, warnings: list[str] = ()) -> rendering.Response:
        # kmock copies a returned Response's status and headers onto the (shared) reaction:
        # always set every header we use, so that nothing leaks from one response to the next.
        warning = ", ".join('299 - ' + json.dumps(w) for w in warnings) or None
        return rendering.Response(status=status, payload=payload,
                                  headers={"Content-Type": "application/json", "Warning": warning})

    async def _serve_version(self, request: rendering.Request) -> dict:
        # kmock's: groupVersion "/v1" for the core group, and subresources that repeat their
        # parent's short names (kubectl then warns that "ltj" also matches loratrainingjobs/status).
        res = request.resource
        found = [r for r in self._resources if r.group == res.group and r.version == res.version]
        if not found:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        entries = []
        for r in sorted(found, key=lambda r: r.plural):
            info = self._resources[r]
            entries.append({"name": r.plural, "singularName": info.singular or r.plural.rstrip("s"),
                            "namespaced": bool(info.namespaced), "kind": info.kind,
                            "verbs": sorted(info.verbs), "shortNames": sorted(info.shortnames),
                            "categories": sorted(info.categories)})
            for sub in sorted(info.subresources):
                entries.append({"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": bool(info.namespaced),
                                "kind": info.kind, "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": _group_version(res),
                "resources": entries}

    async def _serve_objects(self, request: rendering.Request) -> rendering.Response:
        try:
            return self._dispatch(request)
        except ApiError as e:
            return self._respond(e.status(), e.code)

    def _dispatch(self, request: rendering.Request) -> rendering.Response:
        res: resource = request.resource
        if request.body and "protobuf" in request.headers.get("Content-Type", ""):
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json, application/yaml")
        info = self._info(res)
        method, params, name, sub = request.method, request.params, request.name, request.subresource
        ns = request.namespace
        if sub not in (None, "status") and not (res == NAMESPACES and sub == "finalize"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub and sub not in info.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if ns is not None and not info.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        table = "as=Table" in request.headers.get("Accept", "")
        if method == enums.method.GET:
            if query_bool(params.get("watch")):
                return self._respond(self._watch(res, info, ns, name, params, table))
            if name is None:
                return self._respond(self._list(res, info, ns, params, table))
            obj = self._get(res, info, ns, name)
            return self._respond(self._table(res, [obj], params) if table else obj)
        if method == enums.method.POST and name is None:
            obj, warnings = self._create(res, info, ns, request.data, params)
            return self._respond(obj, 201, warnings)
        if method == enums.method.PUT and name is not None:
            obj, warnings = self._replace(res, info, ns, name, sub, request.data, params)
            return self._respond(obj, 200, warnings)
        if method == enums.method.PATCH and name is not None:
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            obj, warnings, created = self._patch(res, info, ns, name, sub, ctype, request.data, params)
            return self._respond(obj, 201 if created else 200, warnings)
        if method == enums.method.DELETE:
            options = request.data if isinstance(request.data, dict) else {}
            if name is None:
                return self._respond(self._delete_collection(res, info, ns, params, options))
            return self._respond(self._delete(res, info, ns, name, params, options))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    # -- reads -----------------------------------------------------------------------------

    def _not_found(self, res: resource, name: str) -> ApiError:
        return ApiError(404, "NotFound", f'{_qualified(res)} "{name}" not found',
                        {"name": name, "group": res.group, "kind": res.plural})

    def _get(self, res: resource, info: ResourceInfo, ns: str | None, name: str) -> dict:
        obj = self.live(res, ns if info.namespaced else None, name)
        if obj is None:
            raise self._not_found(res, name)
        return obj

    def _selected(self, res: resource, info: ResourceInfo, ns: str | None, params: dict) -> list[dict]:
        try:
            labels = parse_label_selector(params.get("labelSelector"))
            fields = parse_field_selector(params.get("fieldSelector"))
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e))
        objs = [obj for _, obj in self.live_objects(res, ns if info.namespaced else None)]
        objs = [o for o in objs if match_labels(labels, o["metadata"].get("labels")) and match_fields(fields, o)]
        return sorted(objs, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))

    def _list(self, res: resource, info: ResourceInfo, ns: str | None, params: dict, table: bool) -> dict:
        objs = self._selected(res, info, ns, params)
        meta: dict = {"resourceVersion": str(self._rv)}
        start = 0
        if params.get("continue"):
            try:
                start = int(base64.urlsafe_b64decode(params["continue"].encode()).decode())
            except ValueError:
                raise ApiError(400, "BadRequest", "continue key is not valid")
        limit = int(params.get("limit") or 0)
        page = objs[start:start + limit] if limit else objs[start:]
        if limit and start + limit < len(objs):
            meta["continue"] = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
            meta["remainingItemCount"] = len(objs) - start - limit
        if table:
            out = self._table(res, page, params)
            out["metadata"] = meta
            return out
        return {"kind": f"{info.kind}List", "apiVersion": _group_version(res), "metadata": meta, "items": page}

    def _table(self, res: resource, objs: list[dict], params: dict) -> dict:
        crd = self._crds.get((res.group, res.plural))
        version = admission.crd_version(crd, res.version) if crd else None
        columns = (version or {}).get("additionalPrinterColumns") or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                        "description": "Name must be unique within a namespace."}]
        definitions += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                         "description": c.get("description", ""), "priority": c.get("priority", 0)}
                        for c in columns]
        rows = []
        for obj in objs:
            cells = [obj["metadata"]["name"]]
            for c in columns:
                found = json_path(obj, c["jsonPath"])
                cells.append(_cell(found[0], c["type"]) if found else None)
            row_object = obj if params.get("includeObject") == "Object" else _partial(obj)
            if params.get("includeObject") == "None":
                row_object = None
            rows.append({"cells": cells, "object": row_object})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(self._rv)},
                "columnDefinitions": definitions, "rows": rows}

    def _watch(self, res: resource, info: ResourceInfo, ns: str | None, name: str | None,
               params: dict, table: bool = False) -> AsyncIterator[Any]:
        try:
            labels = parse_label_selector(params.get("labelSelector"))
            fields = parse_field_selector(params.get("fieldSelector"))
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e))
        since = params.get("resourceVersion") or None
        if since is not None and not since.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resource version: {since}")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        initial = query_bool(params.get("sendInitialEvents"))
        bookmarks = query_bool(params.get("allowWatchBookmarks"))
        stream = self._watch_stream(_Watch(res=res, namespace=ns if info.namespaced else None, name=name,
                                           labels=labels, fields=fields),
                                    since, timeout, initial, bookmarks)
        return self._as_tables(res, stream, params) if table else stream

    async def _as_tables(self, res: resource, stream: AsyncIterator[Any], params: dict) -> AsyncIterator[Any]:
        """`kubectl get -w`: each event's object as a one-row Table."""
        async for event in stream:
            if isinstance(event, dict) and event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                event = {"type": event["type"], "object": self._table(res, [event["object"]], params)}
            yield event

    async def _watch_stream(self, watch: _Watch, since: str | None, timeout: float | None,
                            initial: bool, bookmarks: bool) -> AsyncIterator[Any]:
        # Snapshot and subscribe in one synchronous step: no event is lost or seen twice.
        backlog: list[dict] = []
        expired = False
        if since is None or since == "0" or initial:
            current = [o for _, o in self.live_objects(watch.res) if watch.matches(watch.res, o)]
            current.sort(key=lambda o: int(o["metadata"]["resourceVersion"]))
            backlog = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in current]
            if initial and bookmarks:
                backlog.append({"type": "BOOKMARK", "object": {
                    "kind": "", "apiVersion": "", "metadata": {
                        "resourceVersion": str(self._rv),
                        "annotations": {"k8s.io/initial-events-end": "true"}}}})
        elif int(since) < self._log_floor:
            expired = True
        else:
            for rv, res, event, old in self._log:
                if rv > int(since) and (seen := watch.translate(res, event, old)) is not None:
                    backlog.append(seen)
        if not expired:
            self._watches.add(watch)
        try:
            yield b""  # send the headers now: clients wait for them before reading events
            if expired:
                yield {"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since} ({self._log_floor})"}}
                return
            for event in backlog:
                yield event
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    event = await asyncio.wait_for(watch.queue.get(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    return
                if event is None:  # reset() closes watches
                    return
                yield event
        finally:
            self._watches.discard(watch)

    # -- writes ----------------------------------------------------------------------------

    def _namespace_for_write(self, info: ResourceInfo, url_ns: str | None, meta: dict) -> str | None:
        if not info.namespaced:
            meta.pop("namespace", None)
            return None
        body_ns = meta.get("namespace")
        if body_ns and url_ns and body_ns != url_ns:
            raise ApiError(400, "BadRequest",
                           "the namespace of the provided object does not match the namespace sent on the request")
        ns = url_ns or body_ns
        if not ns:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace = self.live(NAMESPACES, None, ns)
        if namespace is None:
            if not self.auto_namespaces:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                               {"name": ns, "kind": "namespaces"})
            self._create_namespace(ns)
        elif namespace["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden",
                           f"unable to create new content in namespace {ns} because it is being terminated")
        meta["namespace"] = ns
        return ns

    def _create_namespace(self, name: str) -> dict:
        obj = {"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                            "labels": {"kubernetes.io/metadata.name": name}},
               "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
        return self._store(NAMESPACES, obj, "ADDED")

    def _create(self, res: resource, info: ResourceInfo, url_ns: str | None, body: Any,
                params: dict) -> tuple[dict, list[str]]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        if not meta.get("name"):
            raise self._invalid(res, info, "", [admission.required("metadata.name", "name or generateName is required")])
        ns = self._namespace_for_write(info, url_ns, meta)
        if self.live(res, ns, meta["name"]) is not None:
            raise ApiError(409, "AlreadyExists", f'{_qualified(res)} "{meta["name"]}" already exists',
                           {"name": meta["name"], "group": res.group, "kind": res.plural})
        self._check_quota(res, ns, meta["name"])
        obj["apiVersion"], obj["kind"] = _group_version(res), info.kind
        if "status" in info.subresources:
            obj.pop("status", None)  # the status of a new object is the server's (and controllers')
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "managedFields", "resourceVersion"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        obj, warnings = self._admit(res, info, obj, None, params)
        self._server_side_fields(res, obj)
        if params.get("dryRun"):
            return obj, warnings
        self._store(res, obj, "ADDED")
        self._after_write(res, obj)
        return obj, warnings

    def _check_quota(self, res: resource, ns: str | None, name: str) -> None:
        """ResourceQuota object counts (`count/<resource>[.<group>]`): a create past a namespace's
        limit is refused with the real quota admission's 403 and message. Compute resources
        (cpu, nvidia.com/gpu, ...) are not emulated: pods never run here."""
        if ns is None:
            return
        key = f"count/{res.plural}" + (f".{res.group}" if res.group else "")
        for _, quota in self.live_objects(QUOTAS, ns):
            hard = ((quota.get("spec") or {}).get("hard") or {}).get(key)
            if hard is None:
                continue
            used = len(self.live_objects(res, ns))
            if used + 1 > int(hard):
                qname = quota["metadata"]["name"]
                raise ApiError(403, "Forbidden", f'{res.plural} "{name}" is forbidden: exceeded quota: {qname}, '
                               f"requested: {key}=1, used: {key}={used}, limited: {key}={hard}",
                               {"name": name, "group": res.group, "kind": res.plural})

    def _replace(self, res: resource, info: ResourceInfo, ns: str | None, name: str, sub: str | None,
                 body: Any, params: dict) -> tuple[dict, list[str]]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise ApiError(400, "BadRequest",
                           f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        if info.namespaced and meta.get("namespace") and meta["namespace"] != ns:
            raise ApiError(400, "BadRequest",
                           "the namespace of the provided object does not match the namespace sent on the request")
        return self._update(res, info, ns, name, sub, body, meta.get("resourceVersion"), params)

    def _patch(self, res: resource, info: ResourceInfo, ns: str | None, name: str, sub: str | None,
               ctype: str, patch: Any, params: dict) -> tuple[dict, list[str], bool]:
        ns = ns if info.namespaced else None
        old = self.live(res, ns, name)
        if ctype == "application/apply-patch+yaml" and old is None:
            body = copy.deepcopy(patch) if isinstance(patch, dict) else {}
            body.setdefault("metadata", {})["name"] = name
            obj, warnings = self._create(res, info, ns, body, params)
            return obj, warnings, True
        if old is None:
            raise self._not_found(res, name)
        precondition = None
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
            try:
                patched = jsonpatch.apply_patch(copy.deepcopy(old), patch)
            except jsonpatch.JsonPatchTestFailed as e:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}")
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, IndexError, TypeError) as e:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}")
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                       "application/apply-patch+yaml"):
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
            merge = strategic_merge_patch if ctype == "application/strategic-merge-patch+json" else merge_patch
            patched = merge(old, patch)
            precondition = (patch.get("metadata") or {}).get("resourceVersion")
        else:
            raise ApiError(415, "UnsupportedMediaType", 'the body of the request was in an unknown format - '
                           'accepted media types include: application/json-patch+json, application/merge-patch+json, '
                           'application/apply-patch+yaml')
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patched object is not an object")
        obj, warnings = self._update(res, info, ns, name, sub, patched, precondition, params)
        return obj, warnings, False

    def _update(self, res: resource, info: ResourceInfo, ns: str | None, name: str, sub: str | None,
                body: dict, precondition: str | None, params: dict) -> tuple[dict, list[str]]:
        ns = ns if info.namespaced else None
        old = self.live(res, ns, name)
        if old is None:
            raise self._not_found(res, name)
        old_meta = old["metadata"]
        if precondition is not None and str(precondition) != old_meta["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {_qualified(res)} "{name}": '
                           f'the object has been modified; please apply your changes to the latest version and try again',
                           {"name": name, "group": res.group, "kind": res.plural})
        if sub == "status":
            new = copy.deepcopy(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(body)
            new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
            meta = new.setdefault("metadata", {})
            for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                          "deletionGracePeriodSeconds", "generation", "resourceVersion"):
                if field in old_meta:
                    meta[field] = old_meta[field]
                else:
                    meta.pop(field, None)
            meta.pop("managedFields", None)
            meta.pop("selfLink", None)
            if "status" in info.subresources:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if old_meta.get("deletionTimestamp") and added:
                raise self._invalid(res, info, name, [admission.forbidden(
                    "metadata.finalizers",
                    f"no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)}")])
        new, warnings = self._admit(res, info, new, old, params)
        self._server_side_fields(res, new)
        status_is_sub = "status" in info.subresources
        ignored = ("metadata", "status") if status_is_sub else ("metadata",)
        if {k: v for k, v in new.items() if k not in ignored} != {k: v for k, v in old.items() if k not in ignored}:
            new["metadata"]["generation"] = int(old_meta.get("generation") or 0) + 1
        if new == old or params.get("dryRun"):
            return (old if new == old else new), warnings  # a no-op: no new resourceVersion, no event
        self._store(res, new, "MODIFIED", old)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(res, new)
            return new, warnings
        self._after_write(res, new)
        return new, warnings

    def _invalid(self, res: resource, info: ResourceInfo, name: str, errors: list) -> ApiError:
        status = admission.invalid_status(info.kind or "", res.group or "", name, errors)
        return ApiError(422, "Invalid", status["message"], status["details"])

    def _admit(self, res: resource, info: ResourceInfo, obj: dict, old: dict | None,
               params: dict) -> tuple[dict, list[str]]:
        """ObjectMeta checks; schema pruning, defaulting, validation and CEL rules for custom
        resources; CRD checks."""
        name = obj["metadata"].get("name", "")
        errors = (admission.validate_object_meta(obj, res.group or "", res.plural or "")
                  + admission.validate_pod_resources(obj, res.group or "", res.plural or ""))
        if errors:
            raise self._invalid(res, info, name, errors)
        if res == CRDS:
            errors = admission.check_crd(obj)
            if errors:
                raise self._invalid(res, info, name, errors)
            return obj, []
        crd = self._crds.get((res.group, res.plural))
        schema = admission.crd_schema(crd, res.version) if crd else None
        if schema is None:
            return obj, []
        admitted, dropped, errors = admission.admit(obj, schema, old)
        if dropped and params.get("fieldValidation") == "Strict":
            raise ApiError(400, "BadRequest", "strict decoding error: " + ", ".join(
                f'unknown field "{path}"' for path in dropped))
        if errors:
            raise self._invalid(res, info, name, errors)
        warnings = [f'unknown field "{path}"' for path in dropped] if params.get("fieldValidation") != "Ignore" else []
        return admitted, warnings

    def _server_side_fields(self, res: resource, obj: dict) -> None:
        """What the server itself writes: CRD conditions, namespace phase."""
        if res == CRDS:
            names = obj.get("spec", {}).get("names", {})
            status = obj.setdefault("status", {})
            status["acceptedNames"] = copy.deepcopy(names)
            status["storedVersions"] = [v["name"] for v in obj["spec"].get("versions", []) if v.get("storage")]
            if not status.get("conditions"):
                now = _now()
                status["conditions"] = [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now}]
        elif res == NAMESPACES:
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            terminating = obj["metadata"].get("deletionTimestamp")
            obj["status"] = {"phase": "Terminating" if terminating else "Active"}

    def _after_write(self, res: resource, obj: dict) -> None:
        if res == CRDS:
            self._register_crd(obj)

    # -- CRDs ------------------------------------------------------------------------------

    def _crd_resources(self, crd: dict) -> list[resource]:
        spec = crd["spec"]
        return [resource(spec["group"], v["name"], spec["names"]["plural"]) for v in spec.get("versions", [])]

    def _register_crd(self, crd: dict) -> None:
        spec = crd["spec"]
        names = spec["names"]
        old = self._crds.get((spec["group"], names["plural"]))
        if old is not None:
            for res in self._crd_resources(old):
                if res in self._resources:
                    del self._resources[res]
        self._crds[(spec["group"], names["plural"])] = copy.deepcopy(crd)
        for v in spec.get("versions", []):
            if not v.get("served", True):
                continue
            subresources = set((v.get("subresources") or {}).keys())
            self._resources[resource(spec["group"], v["name"], names["plural"])] = ResourceInfo(
                kind=names["kind"], singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec.get("scope") == "Namespaced", verbs=ALL_VERBS,
                shortnames=set(names.get("shortNames") or []), categories=set(names.get("categories") or []),
                subresources=subresources)

    def _unregister_crd(self, crd: dict) -> None:
        spec = crd["spec"]
        self._crds.pop((spec["group"], spec["names"]["plural"]), None)
        for res in self._crd_resources(crd):
            for _, obj in self.live_objects(res):
                obj = copy.deepcopy(obj)
                obj["metadata"]["resourceVersion"] = self._next_rv()
                self._emit(res, "DELETED", obj)
            for key in [k for k in self._objects if k[0] == res]:
                del self._objects[key]
            if res in self._resources:
                del self._resources[res]

    # -- deletion and garbage collection ----------------------------------------------------

    def _delete(self, res: resource, info: ResourceInfo, ns: str | None, name: str, params: dict,
                options: dict) -> dict:
        ns = ns if info.namespaced else None
        obj = self.live(res, ns, name)
        if obj is None:
            raise self._not_found(res, name)
        pre = options.get("preconditions") or {}
        meta = obj["metadata"]
        if pre.get("uid") and pre["uid"] != meta.get("uid"):
            raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {pre['uid']}, "
                                            f"UID in object meta: {meta.get('uid')}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta.get("resourceVersion"):
            raise ApiError(409, "Conflict", f"Precondition failed: ResourceVersion in precondition: "
                                            f"{pre['resourceVersion']}, ResourceVersion in object meta: {meta.get('resourceVersion')}")
        if options.get("dryRun") or params.get("dryRun"):
            return obj
        policy = options.get("propagationPolicy") or params.get("propagationPolicy")
        if policy is None and (options.get("orphanDependents") is True or query_bool(params.get("orphanDependents"))):
            policy = "Orphan"
        if policy is None:
            policy = "Orphan" if res == JOBS else "Background"  # batch/v1 Jobs orphan their pods by default
        return self.delete_object(res, ns, name, policy)

    def _delete_collection(self, res: resource, info: ResourceInfo, ns: str | None, params: dict,
                           options: dict) -> dict:
        objs = self._selected(res, info, ns, params)
        policy = options.get("propagationPolicy") or params.get("propagationPolicy") or "Background"
        items = [self.delete_object(res, o["metadata"].get("namespace"), o["metadata"]["name"], policy) for o in objs]
        return {"kind": f"{self._resources[res].kind}List", "apiVersion": _group_version(res),
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def delete_object(self, res: resource, ns: str | None, name: str, policy: str = "Background") -> dict:
        """Delete as the API server and its garbage collector do; returns the last state."""
        obj = self.live(res, ns, name)
        if obj is None:
            raise self._not_found(res, name)
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj  # already being deleted
        uid = meta.get("uid")
        if policy == "Orphan":
            self._orphan(uid)
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and self._dependents(uid) and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        if res == NAMESPACES:
            return self._delete_namespace(obj)
        if not finalizers:
            return self._remove(res, obj)
        old = copy.deepcopy(obj)
        # a pod's deletionTimestamp is when it will be killed: now + its grace period (the kubelet
        # sends SIGTERM at once); other objects go as soon as their finalizers do
        grace = int((obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30)) if res == PODS else 0
        meta.update(deletionTimestamp=_now(grace), deletionGracePeriodSeconds=grace, finalizers=finalizers,
                    generation=int(meta.get("generation") or 0) + 1)
        self._store(res, obj, "MODIFIED", old)
        if "foregroundDeletion" in finalizers:
            for (dres, dns, dname), _ in self._dependents(uid):
                if self.live(dres, dns, dname) is not None:
                    self.delete_object(dres, dns, dname, "Background")
            self._release_foreground()
        return self.live(res, ns, name) or obj

    def _remove(self, res: resource, obj: dict) -> dict:
        """The object is gone for good: DELETED event, then what depends on it goes too."""
        meta = obj["metadata"]
        key = (res, meta.get("namespace"), meta["name"])
        gone = copy.deepcopy(self._objects[key].raw)
        self._objects[key].delete()
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(res, "DELETED", gone)
        if res == CRDS:
            self._unregister_crd(gone)
        self._collect_garbage(meta.get("uid"))
        if meta.get("namespace"):
            self._finish_namespace(meta["namespace"])
        return gone

    def _uid_alive(self, uid: str) -> bool:
        return any(o["metadata"].get("uid") == uid for _, o in self.live_objects())

    def _dependents(self, uid: str | None) -> list[tuple[tuple, dict]]:
        return [(key, o) for key, o in self.live_objects()
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]

    def _orphan(self, uid: str | None) -> None:
        for (res, _, _), dep in self._dependents(uid):
            old = copy.deepcopy(dep)
            dep = copy.deepcopy(dep)
            refs = [r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if refs:
                dep["metadata"]["ownerReferences"] = refs
            else:
                dep["metadata"].pop("ownerReferences")
            self._store(res, dep, "MODIFIED", old)

    def _collect_garbage(self, uid: str | None) -> None:
        if uid is None:
            return
        for (res, ns, name), dep in self._dependents(uid):
            dep = self.live(res, ns, name)
            if dep is None:
                continue
            others = [r for r in dep["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
            if any(self._uid_alive(r.get("uid")) for r in others):
                old, dep = copy.deepcopy(dep), copy.deepcopy(dep)
                dep["metadata"]["ownerReferences"] = others
                self._store(res, dep, "MODIFIED", old)
            else:
                self.delete_object(res, ns, name, "Background")
        self._release_foreground()

    def _release_foreground(self) -> None:
        """Owners in foreground deletion lose their `foregroundDeletion` finalizer once no
        dependents remain (and are removed when it was the last one)."""
        for (res, ns, name), _ in self.live_objects():
            owner = self.live(res, ns, name)  # nested removals may have changed it meanwhile
            finalizers = (owner or {}).get("metadata", {}).get("finalizers") or []
            if "foregroundDeletion" not in finalizers or self._dependents(owner["metadata"].get("uid")):
                continue
            old, new = copy.deepcopy(owner), copy.deepcopy(owner)
            new["metadata"]["finalizers"] = [f for f in finalizers if f != "foregroundDeletion"]
            self._store(res, new, "MODIFIED", old)
            if not new["metadata"]["finalizers"]:
                self._remove(res, new)

    def _delete_namespace(self, ns_obj: dict) -> dict:
        old = copy.deepcopy(ns_obj)
        ns_obj["metadata"]["deletionTimestamp"] = _now()
        ns_obj["status"] = {"phase": "Terminating"}
        self._store(NAMESPACES, ns_obj, "MODIFIED", old)
        name = ns_obj["metadata"]["name"]
        for (res, ns, oname), _ in self.live_objects(namespace=name):
            if self.live(res, ns, oname) is not None:
                self.delete_object(res, ns, oname, "Background")
        self._finish_namespace(name)
        return self.live(NAMESPACES, None, name) or ns_obj

    def _finish_namespace(self, name: str) -> None:
        ns_obj = self.live(NAMESPACES, None, name)
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        if not self.live_objects(namespace=name):
            self._remove(NAMESPACES, ns_obj)


# --------------------------------------------------------------------------------------------
# Serving it from a background thread.

class KubeServer:
    """The emulator served on 127.0.0.1:<free port> from a daemon thread's event loop.

        server = KubeServer().start()
        server.url                 # http://127.0.0.1:PORT
        server.get("v1/configmaps", "default", "x")       # a copy of the live object, or None
        server.call(lambda emulator: ...)                  # run code in the server's loop
        server.stop()
    """

    def __init__(self, host: str = "127.0.0.1", **emulator_kwargs: Any):
        self.host = host
        self.emulator_kwargs = emulator_kwargs
        self.emulator: KubeEmulator | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> "KubeServer":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per request otherwise
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("the Kubernetes emulator did not start")
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._started.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        async with KubeEmulator(**self.emulator_kwargs) as emulator, Server(emulator, host=self.host) as server:
            self.emulator, self.port = emulator, server.port
            self._started.set()
            await self._stopping.wait()
            for watch in list(emulator._watches):
                watch.queue.put_nowait(None)

    def stop(self, timeout: float = 10) -> None:
        if self.loop is not None and self._stopping is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def call(self, fn: Callable[[KubeEmulator], Any], timeout: float = 30) -> Any:
        """Run fn(emulator) in the server's event loop (thread-safe access to its state)."""
        assert self.loop is not None and self.emulator is not None
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(self.emulator))
            except BaseException as e:  # noqa: BLE001
                future.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def reset(self) -> None:
        self.call(lambda em: em.reset())

    def get(self, res: Any, namespace: str | None, name: str) -> dict | None:
        """A deep copy of the live object (res: 'v1/configmaps', 'kubelora.dev/v1alpha1/loratrainingjobs')."""
        return self.call(lambda em: copy.deepcopy(em.live(res, namespace, name)))

    def list(self, res: Any, namespace: str | None = None) -> list[dict]:
        return self.call(lambda em: [copy.deepcopy(o) for _, o in em.live_objects(res, namespace)])

    def history(self, res: Any, namespace: str | None, name: str) -> list[dict | None]:
        """Every stored version of an object (None marks a deletion), oldest first."""
        def versions(em: KubeEmulator) -> list:
            key = (resource(res), namespace, name)
            if key not in em.objects:
                return []
            return [None if v is None else copy.deepcopy(v.raw) for v in em.objects[key].history]
        return self.call(versions)
