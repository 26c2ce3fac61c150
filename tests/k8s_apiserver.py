"""A Kubernetes API server stand-in on 127.0.0.1: THE ONE STAND-IN of the test suite.

No real API server can run on this machine (no cluster, no etcd, no kubelet), so the
Kubernetes runtime's client flow is tested against this small HTTP server. It speaks the
real paths, status codes and Status objects for what the runtime uses:

- /api/v1/namespaces/{ns}/{pods,secrets,configmaps,persistentvolumeclaims,services}[/{name}],
  /apis/batch/v1/namespaces/{ns}/jobs[/{name}],
  /apis/apps/v1/namespaces/{ns}/deployments[/{name}] (stored as given, no controller),
  /apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies[/{name}];
- list with labelSelector (=, !=, exists, !exists) and limit/continue pages, get,
  delete (propagationPolicy), pods/{name}/log (follow streams until the Pod finishes);
- server-side apply (PATCH application/apply-patch+yaml, fieldManager, force) with
  managedFields per manager, 409 conflicts naming the other manager, no resourceVersion
  bump on a no-op apply, 422 for changes to immutable Pod/Job specs; merge patches
  (application/merge-patch+json) as Update operations of another manager;
- 401 without the bearer token, 403 Forbidden for (verb, resource) pairs a test denies,
  404 for missing objects and (on writes) missing namespaces;
- a tiny job controller: a new Job gets one Pod from its template.

Not here: exec/attach websockets, watches, scheduling, the garbage collector (only a
deleted Job's dependents go with it, as the job controller's Pods do). Pods stay in the
phase a test sets with `set_pod`. Tests count requests through `requests` to check API
calls per operation, and read the field manager of each write in `writes`.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

KINDS = {"pods": ("v1", "Pod"), "secrets": ("v1", "Secret"), "configmaps": ("v1", "ConfigMap"),
         "persistentvolumeclaims": ("v1", "PersistentVolumeClaim"),
         "jobs": ("batch/v1", "Job"), "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy"),
         "services": ("v1", "Service"), "deployments": ("apps/v1", "Deployment")}
_ROUTE = re.compile(r"^/(?:api/v1|apis/batch/v1|apis/apps/v1|apis/networking\.k8s\.io/v1)/"
                    r"namespaces/"
                    r"(?P<ns>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>log))?)?$")
_MISSING = object()
Path_ = tuple[str, ...]


def _leaves(obj: dict[str, Any], prefix: Path_ = ()) -> dict[Path_, Any]:
    """Field paths set by an object; lists are atomic (a simplification of real SSA)."""
    out: dict[Path_, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _get(obj: Any, p: Path_) -> Any:
    for k in p:
        if not isinstance(obj, dict) or k not in obj:
            return _MISSING
        obj = obj[k]
    return obj


def _set(obj: dict[str, Any], p: Path_, v: Any) -> None:
    for k in p[:-1]:
        obj = obj.setdefault(k, {})
    obj[p[-1]] = copy.deepcopy(v)


def _drop(obj: dict[str, Any], p: Path_) -> None:
    parent = _get(obj, p[:-1]) if len(p) > 1 else obj
    if isinstance(parent, dict):
        parent.pop(p[-1], None)


def _overlap(a: Path_, b: Path_) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _fields_v1(paths: set[Path_]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in sorted(paths):
        node = out
        for k in p:
            node = node.setdefault(f"f:{k}", {})
    return out


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.rstrip("=")) != v.lstrip("="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "message": message, "reason": reason,
                       "details": details, "code": code}


class FakeApiServer:
    """State and behaviour; `start()` serves it on 127.0.0.1 until `stop()`."""

    def __init__(self, token: str = "test-token", namespaces: tuple[str, ...] = ("default",)
                 ) -> None:
        self.token = token
        self.namespaces = set(namespaces)
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource) pairs to refuse
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.managers: dict[tuple[str, str, str], dict[str, tuple[str, set[Path_]]]] = {}
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []
        # (method, path, content type, fieldManager query parameter or "") of each write
        self.writes: list[tuple[str, str, str, str]] = []
        self.lock = threading.RLock()
        self.rv = 0
        self._http: ThreadingHTTPServer | None = None

    # -- lifecycle and test hooks -------------------------------------------------------

    def start(self) -> str:
        server = self

        class Handler(_Handler):
            api = server
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()

    @property
    def url(self) -> str:
        assert self._http
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str = "default", context: str = "fake",
                   token: str | None = None) -> Path:
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": context,
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "tester", "user": {"token": token or self.token}}],
               "contexts": [{"name": context, "context": {"cluster": "fake", "user": "tester",
                                                          "namespace": namespace}}]}
        path.write_text(yaml.safe_dump(doc))
        return path

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get((plural, ns, name))
            return self._out((plural, ns, name)) if obj else None

    def items(self, plural: str, ns: str) -> list[dict[str, Any]]:
        with self.lock:
            return [self._out(k) for k in sorted(self.objects) if k[:2] == (plural, ns)]

    def set_pod(self, ns: str, name: str, phase: str, exit_code: int | None = None,
                reason: str = "", waiting: str = "") -> None:
        state: dict[str, Any] = {"running": {}}
        if exit_code is not None:
            state = {"terminated": {"exitCode": exit_code, "reason": reason or "Completed"}}
        elif waiting:
            state = {"waiting": {"reason": waiting}}
        with self.lock:
            pod = self.objects[("pods", ns, name)]
            pod["status"] = {"phase": phase, "containerStatuses": [
                {"name": "agent", "state": state, "ready": phase == "Running",
                 "restartCount": 0, "image": "x", "imageID": "", "started": True}]}

    def set_job(self, ns: str, name: str, condition: str, reason: str = "") -> None:
        with self.lock:
            self.objects[("jobs", ns, name)]["status"] = {"conditions": [
                {"type": condition, "status": "True", "reason": reason}]}

    def append_log(self, ns: str, pod: str, text: str) -> None:
        with self.lock:
            self.logs[(ns, pod)] = self.logs.get((ns, pod), "") + text

    # -- behaviour ----------------------------------------------------------------------

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _out(self, key: tuple[str, str, str]) -> dict[str, Any]:
        obj = copy.deepcopy(self.objects[key])
        obj["metadata"]["managedFields"] = [
            {"manager": m, "operation": op, "apiVersion": obj["apiVersion"],
             "fieldsType": "FieldsV1", "fieldsV1": _fields_v1(paths)}
            for m, (op, paths) in sorted(self.managers.get(key, {}).items())]
        return obj

    def _new(self, key: tuple[str, str, str], obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        meta.update({"uid": str(uuid.uuid4()), "resourceVersion": self._bump(),
                     "generation": 1, "creationTimestamp": (
                         dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
                         + dt.timedelta(seconds=self.rv)).strftime("%Y-%m-%dT%H:%M:%SZ")})
        if key[0] == "pods":
            obj["status"] = {"phase": "Pending"}
        elif key[0] == "jobs":
            obj["status"] = {}
        self.objects[key] = obj
        if key[0] == "jobs":  # the job controller
            tmpl = obj["spec"]["template"]
            name = f"{meta['name']}-{uuid.uuid4().hex[:5]}"
            labels = {**tmpl["metadata"].get("labels", {}), "job-name": meta["name"],
                      "batch.kubernetes.io/job-name": meta["name"]}
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": key[1], "labels": labels,
                                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                                     "name": meta["name"], "uid": meta["uid"],
                                                     "controller": True}]},
                   "spec": copy.deepcopy(tmpl["spec"])}
            self._new(("pods", key[1], name), pod)
            self.managers[("pods", key[1], name)] = {
                "kube-controller-manager": ("Update", set(_leaves(pod)))}

    def apply(self, key: tuple[str, str, str], config: dict[str, Any], manager: str,
              force: bool) -> tuple[int, dict[str, Any]]:
        plural, ns, name = key
        if (config.get("apiVersion"), config.get("kind")) != KINDS[plural] or \
                config.get("metadata", {}).get("name") != name:
            raise ApiError(400, "BadRequest", "the object does not match the request path")
        owned = {p: v for p, v in _leaves(config).items()
                 if p not in (("apiVersion",), ("kind",), ("metadata", "name"),
                              ("metadata", "namespace"))}
        if key not in self.objects:
            if ns not in self.namespaces:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', name=ns,
                               kind="namespaces")
            self._new(key, copy.deepcopy(config))
            self.managers[key] = {manager: ("Apply", set(owned))}
            return 201, self._out(key)
        old = self.objects[key]
        mgrs = self.managers.setdefault(key, {})
        conflicts = sorted({(m, p) for p, v in owned.items() for m, (_, paths) in mgrs.items()
                            if m != manager and _get(old, p) != v
                            and any(_overlap(p, q) for q in paths)})
        if conflicts and not force:
            causes = [{"type": "FieldManagerConflict", "field": "." + ".".join(p),
                       "message": f'conflict with "{m}" using {old["apiVersion"]}'}
                      for m, p in conflicts]
            raise ApiError(409, "Conflict", f"Apply failed with {len(causes)} conflict(s): "
                           + "; ".join(f'{c["message"]}: {c["field"]}' for c in causes),
                           name=name, kind=plural, causes=causes)
        new = copy.deepcopy(old)
        previous = mgrs.get(manager, ("Apply", set()))[1]
        others = {q for m, (_, paths) in mgrs.items() if m != manager for q in paths}
        for p in previous - set(owned):
            if not any(_overlap(p, q) for q in others):
                _drop(new, p)
        for p, v in owned.items():
            _set(new, p, v)
        self._immutable(plural, name, old, new)
        new_mgrs = {m: (op, {q for q in paths if _get(new, q) == _get(old, q)
                             or not any(_overlap(q, p) for p in owned)})
                    for m, (op, paths) in mgrs.items() if m != manager}
        new_mgrs[manager] = ("Apply", set(owned))
        if new != old or new_mgrs != mgrs:
            new["metadata"]["resourceVersion"] = self._bump()
            self.objects[key], self.managers[key] = new, new_mgrs
        return 200, self._out(key)

    def _immutable(self, plural: str, name: str, old: dict[str, Any],
                   new: dict[str, Any]) -> None:
        if plural == "pods" and old["spec"] != new["spec"]:
            raise ApiError(422, "Invalid", f'Pod "{name}" is invalid: spec: Forbidden: pod '
                           "updates may not change fields other than `spec.containers[*]."
                           "image`, `spec.activeDeadlineSeconds` or `spec.tolerations`",
                           name=name, kind="Pod")
        if plural == "jobs" and old["spec"]["template"] != new["spec"]["template"]:
            raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template: '
                           "Invalid value: field is immutable", name=name, kind="jobs")

    def update(self, key: tuple[str, str, str], patch: dict[str, Any], manager: str
               ) -> dict[str, Any]:
        if key not in self.objects:
            raise ApiError(404, "NotFound", f'{key[0]} "{key[2]}" not found', name=key[2],
                           kind=key[0])
        old = self.objects[key]
        new = _merge_patch(old, patch)
        changed = {p for p, v in _leaves(new).items() if _get(old, p) != v}
        mgrs = self.managers.setdefault(key, {})
        for m, (op, paths) in list(mgrs.items()):
            mgrs[m] = (op, {q for q in paths if not any(_overlap(q, p) for p in changed)})
        op, mine = mgrs.get(manager, ("Update", set()))
        mgrs[manager] = (op, mine | changed)
        new["metadata"]["resourceVersion"] = self._bump()
        self.objects[key] = new
        return self._out(key)

    def delete(self, key: tuple[str, str, str], propagation: str) -> dict[str, Any]:
        if key not in self.objects:
            raise ApiError(404, "NotFound", f'{key[0]} "{key[2]}" not found', name=key[2],
                           kind=key[0])
        obj = self.objects.pop(key)
        self.managers.pop(key, None)
        if key[0] == "jobs" and propagation != "Orphan":
            uid = obj["metadata"]["uid"]
            for k, o in list(self.objects.items()):
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", [])):
                    self.objects.pop(k)
        return {"kind": "Status", "apiVersion": "v1", "status": "Success",
                "details": {"name": key[2], "kind": key[0], "uid": obj["metadata"]["uid"]}}


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        api, url = self.api, urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with api.lock:
            api.requests.append((method, url.path))
            if method == "PATCH":
                api.writes.append((method, url.path, self.headers.get("Content-Type", ""),
                                   query.get("fieldManager", "")))
        try:
            if self.headers.get("Authorization") != f"Bearer {api.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            m = _ROUTE.match(url.path)
            if not m or m["plural"] not in KINDS:
                raise ApiError(404, "NotFound", "the server could not find the requested "
                                                "resource")
            ns, plural, name, sub = m["ns"], m["plural"], m["name"], m["sub"]
            verb = {"GET": "get" if name else "list", "PATCH": "patch",
                    "DELETE": "delete"}[method]
            resource = f"{plural}/{sub}" if sub else plural
            if (verb, resource) in api.forbidden:
                group = KINDS[plural][0].rpartition("/")[0]
                raise ApiError(403, "Forbidden", f'{resource} "{name or ""}" is forbidden: '
                               f'User "system:serviceaccount:ci:engine" cannot {verb} '
                               f'resource "{resource}" in API group "{group}" in the '
                               f'namespace "{ns}"', name=name or "", kind=plural)
            if sub == "log":
                return self._log(ns, name, query)
            with api.lock:
                code, out = self._route(method, ns, plural, name, query, body)
            self._send(code, out)
        except ApiError as e:
            self._send(e.status["code"], e.status)

    def _route(self, method: str, ns: str, plural: str, name: str | None,
               query: dict[str, str], body: bytes) -> tuple[int, Any]:
        api, key = self.api, (plural, ns, name or "")
        if method == "GET" and not name:
            sel = query.get("labelSelector", "")
            items = [o for o in api.items(plural, ns)
                     if _matches(o["metadata"].get("labels") or {}, sel)]
            start = int(query.get("continue") or 0)
            end = start + int(query["limit"]) if query.get("limit") else len(items)
            meta = {"resourceVersion": str(api.rv)}
            if end < len(items):
                meta["continue"] = str(end)
            return 200, {"kind": KINDS[plural][1] + "List", "apiVersion": KINDS[plural][0],
                         "metadata": meta, "items": items[start:end]}
        if method == "GET":
            obj = api.get(plural, ns, key[2])
            if obj is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found', name=name,
                               kind=plural)
            return 200, obj
        if method == "DELETE":
            return 200, api.delete(key, query.get("propagationPolicy", "Background"))
        ctype = self.headers.get("Content-Type", "")
        if ctype == "application/apply-patch+yaml":
            if not query.get("fieldManager"):
                raise ApiError(400, "BadRequest", "fieldManager is required for apply "
                                                  "requests")
            return api.apply(key, yaml.safe_load(body), query["fieldManager"],
                             query.get("force") == "true")
        if ctype == "application/merge-patch+json":
            return 200, api.update(key, json.loads(body), query.get("fieldManager", "unknown"))
        raise ApiError(415, "UnsupportedMediaType", f"the media type {ctype!r} is not "
                                                    "supported")

    def _log(self, ns: str, pod: str | None, query: dict[str, str]) -> None:
        api = self.api
        obj = api.get("pods", ns, pod or "")
        if obj is None:
            raise ApiError(404, "NotFound", f'pods "{pod}" not found', name=pod, kind="pods")
        if obj["status"].get("phase") == "Pending":
            raise ApiError(400, "BadRequest", f'container "{query.get("container")}" in pod '
                           f'"{pod}" is waiting to start: PodInitializing')
        if query.get("follow") != "true":
            return self._send(200, api.logs.get((ns, pod or ""), "").encode(), "text/plain")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Connection", "close")
        self.end_headers()
        sent, deadline = 0, time.monotonic() + 20
        while time.monotonic() < deadline:
            with api.lock:
                text = api.logs.get((ns, pod or ""), "")
                cur = api.objects.get(("pods", ns, pod or ""))
                done = cur is None or cur["status"].get("phase") in ("Succeeded", "Failed")
            self.wfile.write(text[sent:].encode())
            self.wfile.flush()
            sent = len(text)
            if done:
                break
            time.sleep(0.05)
        self.close_connection = True
