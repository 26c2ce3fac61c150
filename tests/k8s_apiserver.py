"""A Kubernetes API server stand-in on 127.0.0.1: THE ONE STAND-IN of the test suite.

No real API server can run on this machine (no cluster, no etcd, no kubelet), so the
Kubernetes runtime's client flow is tested against this small HTTP server. It speaks the
real paths, status codes and Status objects for what the runtime uses:

- /api/v1/namespaces/{ns}/{pods,secrets,configmaps,persistentvolumeclaims,services}[/{name}],
  /apis/batch/v1/namespaces/{ns}/jobs[/{name}],
  /apis/apps/v1/namespaces/{ns}/deployments[/{name}] (stored as given, no controller),
  /apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies[/{name}];
- list with labelSelector (=, !=, exists, !exists) and limit/continue pages, get,
  delete (propagationPolicy, a uid precondition), pods/{name}/log (follow streams until
  the Pod finishes);
- server-side apply (PATCH application/apply-patch+yaml, fieldManager, force) with
  managedFields per manager, 409 conflicts naming the other manager, no resourceVersion
  bump on a no-op apply, 422 for changes to immutable Pod/Job specs; merge patches
  (application/merge-patch+json) as Update operations of another manager;
- 401 without the bearer token, 403 Forbidden for (verb, resource) pairs a test denies,
  404 for missing objects and (on writes) missing namespaces;
- a tiny job controller: a new Job gets one Pod from its template;
- watches: list responses carry metadata.resourceVersion, and `GET <list path>?watch=1&
  resourceVersion=RV[&timeoutSeconds=N][&allowWatchBookmarks=true][&labelSelector=S]`
  streams newline-delimited events (ADDED, MODIFIED, DELETED as seen through the selector,
  BOOKMARK every `bookmark_every` seconds and before a timeout ends the stream) for the
  changes after RV, chunked; the last `history` changes are kept, and an RV older than
  them gets an ERROR event with Status 410 Expired. Test hooks: `compact()` forgets the
  history, `drop_watches()` cuts every open watch mid-stream, `inject(raw)` writes raw
  bytes into the open ones; `watches` records (path, resourceVersion) of each watch;
  `watch_stall` holds new watches unanswered (no headers; `stalled` counts them) until
  it is cleared, then closes them; `endless_lists` gives every list page a continue
  token to itself.

- pods/{name}/exec (GET or POST; `create` on pods/exec for RBAC): the websocket exec
  protocol v5.channel.k8s.io / v4.channel.k8s.io (channels 0 stdin, 1 stdout, 2 stderr,
  3 the exit Status, 4 resize, v5's 255 close) over RFC 6455 frames written here; the
  command runs in the pod's `PodSandbox`, a local process tree in its own mount and PID
  namespaces with the pod's directory at /run/engine (`pod_dir`, `run_container`; needs
  root for unshare); `execs` records (ns, pod, argv, protocol, options, exit code).

Not here: SPDY exec, attach/port-forward, scheduling, a garbage collector of its own (a
deleted object's dependents go with it at once, unless orphaned). Pods stay in the
phase a test sets with `set_pod`. Tests count requests through `requests` to check API
calls per operation, and read the field manager of each write in `writes`.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import datetime as dt
import fcntl
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
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
                    r"(?P<ns>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>log|exec))?)?$")
_MISSING = object()
Path_ = tuple[str, ...]
Key = tuple[str, str, str]  # (plural, namespace, name)
# one change, as a watch replays it: (rv, ADDED|MODIFIED|DELETED, key, the object after it
# (for DELETED: as it was, with the deletion's rv), its labels before it (None: new))
_Change = tuple[int, str, Key, dict[str, Any], dict[str, str] | None]


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


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def _seen(change: str, selector: str, obj: dict[str, Any], before: dict[str, str] | None
          ) -> str:
    """A change as a watch with `selector` sees it: an object entering the selection is
    ADDED, one leaving it DELETED; "" when the watch sees nothing."""
    now = _matches(obj["metadata"].get("labels") or {}, selector)
    was = before is not None and _matches(before, selector)
    if change == "DELETED":
        return "DELETED" if now else ""
    if change == "ADDED" or not was:
        return "ADDED" if now else ""
    return "MODIFIED" if now else "DELETED"


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "message": message, "reason": reason,
                       "details": details, "code": code}


class FakeApiServer:
    """State and behaviour; `start()` serves it on 127.0.0.1 until `stop()`."""

    def __init__(self, token: str = "test-token", namespaces: tuple[str, ...] = ("default",),
                 history: int = 1000) -> None:
        self.token = token
        self.namespaces = set(namespaces)
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource) pairs to refuse
        self.over_quota: set[str] = set()  # plurals whose creation a ResourceQuota refuses
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.managers: dict[tuple[str, str, str], dict[str, tuple[str, set[Path_]]]] = {}
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []
        # (method, path, content type, fieldManager query parameter or "") of each write
        self.writes: list[tuple[str, str, str, str]] = []
        self.lock = threading.RLock()
        self.rv = 0
        # watches: the last `history` changes (rv, type, key, object, labels before), the
        # newest rv no longer in it, raw bytes a test injects, and a cut counter
        self.history: collections.deque[_Change] = collections.deque(maxlen=history)
        self.compacted = 0
        self.changed = threading.Condition(self.lock)
        self.raw: list[bytes] = []
        self.cuts = 0
        self.stopping = False
        self.bookmark_every = 5.0  # seconds between BOOKMARK events (real servers: ~60)
        self.watches: list[tuple[str, str]] = []  # (path, resourceVersion) of each watch
        self.watch_stall = False  # while set, a new watch is held unanswered (no headers)
        self.stalled = 0  # watches held so
        self.endless_lists = False  # every list page has a continue token (to itself)
        self.execs: list[list[Any]] = []  # see serve_exec
        self.exec_protocols = EXEC_PROTOCOLS  # (v4 only: a server before Kubernetes 1.30)
        self.exec_stall = 0.0  # seconds an exec's upgrade is held unanswered (a stuck server)
        # a hostile exec, after the upgrade: "fragments" (one stdout message that never
        # ends), "huge" (a frame header announcing 1 GiB, then a byte now and then),
        # "trickle" (a 4 KiB frame, a byte now and then), "status:<text>" (that exit Status)
        self.exec_hostile = ""
        # requests without credentials allowed (--anonymous-auth): kubectl sends no token
        # over plain http, as this server speaks
        self.anonymous = False
        self.sandboxes: dict[tuple[str, str], PodSandbox] = {}  # (ns, pod): its processes
        self._pods_root: Path | None = None
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
        with self.lock:
            self.stopping = True  # open watches end
            self.changed.notify_all()
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        with self.lock:
            boxes, self.sandboxes = list(self.sandboxes.values()), {}
        for box in boxes:
            box.stop()
        if self._pods_root:
            shutil.rmtree(self._pods_root, ignore_errors=True)

    def sandbox(self, ns: str, pod: str) -> PodSandbox:
        """The pod's sandbox (started on first use), its environment the container's."""
        with self.lock:
            if (ns, pod) not in self.sandboxes:
                spec = self.objects[("pods", ns, pod)]["spec"]
                env = {e["name"]: str(e["value"]) for e in spec["containers"][0].get("env", [])
                       if "value" in e}
                self._pods_root = self._pods_root or Path(tempfile.mkdtemp(prefix="k8s-pods-"))
                box = PodSandbox(self._pods_root / f"{ns}.{pod}", env)
                self.sandboxes[(ns, pod)] = box
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                for m in spec["containers"][0].get("volumeMounts", []):  # ConfigMaps in
                    cm = volumes.get(m["name"], {}).get("configMap")      # /run/engine
                    if cm and m["mountPath"].startswith("/run/engine/"):
                        data = (self.objects.get(("configmaps", ns, cm["name"])) or {}
                                ).get("data") or {}
                        box.project(m["mountPath"], data, cm.get("defaultMode", 0o644))
            return self.sandboxes[(ns, pod)]

    def pod_dir(self, ns: str, pod: str) -> Path:
        """The host directory that the pod sees at /run/engine."""
        return self.sandbox(ns, pod).engine

    def run_container(self, ns: str, pod: str, argv: list[str],
                      env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start the container's main process (e.g. the Pod's wrapper) in the pod."""
        return self.sandbox(ns, pod).run(argv, env)

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
            pod["metadata"]["resourceVersion"] = self._bump()
            self._record("MODIFIED", ("pods", ns, name), pod["metadata"].get("labels") or {})

    def set_job(self, ns: str, name: str, condition: str, reason: str = "") -> None:
        with self.lock:
            job = self.objects[("jobs", ns, name)]
            job["status"] = {"conditions": [
                {"type": condition, "status": "True", "reason": reason}]}
            job["metadata"]["resourceVersion"] = self._bump()
            self._record("MODIFIED", ("jobs", ns, name), job["metadata"].get("labels") or {})

    def append_log(self, ns: str, pod: str, text: str) -> None:
        with self.lock:
            self.logs[(ns, pod)] = self.logs.get((ns, pod), "") + text

    def compact(self) -> None:
        """Forget the watch history (as etcd's compaction does): a watch from an older
        resourceVersion gets 410 Expired."""
        with self.lock:
            self.history.clear()
            self.compacted = self.rv

    def drop_watches(self) -> None:
        """Cut every open watch mid-stream (no final chunk), as a broken connection does."""
        with self.lock:
            self.cuts += 1
            self.changed.notify_all()

    def inject(self, raw: bytes) -> None:
        """Write `raw` as it is into every open watch stream (a hostile or broken server)."""
        with self.lock:
            self.raw.append(raw)
            self.changed.notify_all()

    # -- behaviour ----------------------------------------------------------------------

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _record(self, kind: str, key: Key, before: dict[str, str] | None,
                obj: dict[str, Any] | None = None) -> None:
        """Keep one change for watches (the object as stored now, or `obj` when it is
        gone); the oldest change drops out of a full history."""
        with self.lock:
            snap = self._out(key) if obj is None else copy.deepcopy(obj)
            if len(self.history) == self.history.maxlen and self.history:
                self.compacted = self.history[0][0]
            self.history.append((int(snap["metadata"]["resourceVersion"]), kind, key, snap,
                                 None if before is None else dict(before)))
            self.changed.notify_all()

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
        self._record("ADDED", key, None)
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
            self._record("MODIFIED", key, old["metadata"].get("labels") or {})
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
        self._record("MODIFIED", key, old["metadata"].get("labels") or {})
        return self._out(key)

    def _gone(self, key: Key, obj: dict[str, Any]) -> None:
        """A DELETED change: the object as it was, at the deletion's resourceVersion."""
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._bump()
        self._record("DELETED", key, gone["metadata"].get("labels") or {}, gone)

    def delete(self, key: tuple[str, str, str], propagation: str,
               uid: str | None = None) -> dict[str, Any]:
        if key not in self.objects:
            raise ApiError(404, "NotFound", f'{key[0]} "{key[2]}" not found', name=key[2],
                           kind=key[0])
        if uid is not None and self.objects[key]["metadata"]["uid"] != uid:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {key[0]} '
                           f'"{key[2]}": Precondition failed: UID in precondition: {uid}, '
                           f'UID in object meta: {self.objects[key]["metadata"]["uid"]}',
                           name=key[2], kind=key[0])
        obj = self.objects.pop(key)
        self.managers.pop(key, None)
        self._gone(key, obj)
        if propagation != "Orphan":  # the garbage collector, at once
            uid = obj["metadata"]["uid"]
            for k, o in list(self.objects.items()):
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", [])):
                    self._gone(k, self.objects.pop(k))
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

    def do_POST(self) -> None:  # pods/exec only
        self._handle("POST")

    def handle_one_request(self) -> None:
        """http.server's, with Go's 1 MiB limit for the request line (exec's argv is in
        its URL) in place of 64 KiB."""
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, f"Unsupported method ({self.command!r})")
                return
            method()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True

    def _handle(self, method: str) -> None:
        api, url = self.api, urlsplit(self.path)
        if api.stopping:  # stopped: a kept-alive connection is closed, not answered
            self.close_connection = True
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with api.lock:
            api.requests.append((method, url.path))
            if method == "PATCH":
                api.writes.append((method, url.path, self.headers.get("Content-Type", ""),
                                   query.get("fieldManager", "")))
        try:
            if self.headers.get("Authorization") != f"Bearer {api.token}" and not (
                    api.anonymous and "Authorization" not in self.headers):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if url.path in _DISCOVERY:  # what kubectl reads before `kubectl exec`
                return self._send(200, _DISCOVERY[url.path])
            m = _ROUTE.match(url.path)
            if not m or m["plural"] not in KINDS:
                raise ApiError(404, "NotFound", "the server could not find the requested "
                                                "resource")
            ns, plural, name, sub = m["ns"], m["plural"], m["name"], m["sub"]
            watch = not name and query.get("watch") in ("1", "true")
            if method == "POST" and sub != "exec":
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
            verb = "create" if sub == "exec" else {
                "GET": "get" if name else "watch" if watch else "list", "PATCH": "patch",
                "DELETE": "delete"}[method]
            resource = f"{plural}/{sub}" if sub else plural
            if (verb, resource) in api.forbidden:
                group = KINDS[plural][0].rpartition("/")[0]
                raise ApiError(403, "Forbidden", f'{resource} "{name or ""}" is forbidden: '
                               f'User "system:serviceaccount:ci:engine" cannot {verb} '
                               f'resource "{resource}" in API group "{group}" in the '
                               f'namespace "{ns}"', name=name or "", kind=plural)
            if (method == "PATCH" and plural in api.over_quota
                    and api.objects.get((plural, ns, name or "")) is None):
                raise ApiError(403, "Forbidden", f'{plural} "{name}" is forbidden: exceeded '
                               f'quota: agents-quota, requested: count/{plural}=1, used: '
                               f'count/{plural}=10, limited: count/{plural}=10',
                               name=name or "", kind=plural)
            if method == "GET" and watch:
                return self._watch(ns, plural, query)
            if sub == "log":
                return self._log(ns, name, query)
            if sub == "exec":
                return serve_exec(self, ns, name or "", method, url.query)
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
            if api.endless_lists:  # a broken or hostile server: the same page again
                meta["continue"] = str(start)
            return 200, {"kind": KINDS[plural][1] + "List", "apiVersion": KINDS[plural][0],
                         "metadata": meta, "items": items[start:end]}
        if method == "GET":
            obj = api.get(plural, ns, key[2])
            if obj is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found', name=name,
                               kind=plural)
            return 200, obj
        if method == "DELETE":
            pre = ((json.loads(body) if body else {}).get("preconditions") or {}).get("uid")
            return 200, api.delete(key, query.get("propagationPolicy", "Background"), pre)
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

    def _watch(self, ns: str, plural: str, query: dict[str, str]) -> None:
        """A watch: the changes after resourceVersion as newline-delimited JSON events in
        chunks, until timeoutSeconds, the server stops or a test cuts it."""
        api, sel = self.api, query.get("labelSelector", "")
        given = query.get("resourceVersion", "")
        if not re.fullmatch(r"\d{0,18}", given):
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {given!r}")
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        with api.lock:
            stalled = api.watch_stall
            api.stalled += stalled
            while api.watch_stall and not api.stopping:
                api.changed.wait(0.1)
        if stalled:  # held, then closed unanswered
            self.close_connection = True
            return
        api_version, kind = KINDS[plural]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        out: list[bytes] = []
        with api.lock:
            api.watches.append((urlsplit(self.path).path, given))
            cuts, raw_at, since = api.cuts, len(api.raw), int(given or 0)
            if not given or given == "0":  # the current state first, as ADDED events
                out = [_event("ADDED", o) for o in api.items(plural, ns)
                       if _matches(o["metadata"].get("labels") or {}, sel)]
                since = api.rv
        now = time.monotonic()
        deadline, mark = now + timeout, now + api.bookmark_every
        try:
            while True:
                with api.lock:
                    expired = since < api.compacted  # changes after `since` are gone
                    for rv, change, key, obj, before in [] if expired else api.history:
                        if rv > since:  # `since`: the newest change looked at, any kind
                            typed = _seen(change, sel, obj, before) \
                                if key[:2] == (plural, ns) else ""
                            out += [_event(typed, obj)] if typed else []
                            since = rv
                    out += api.raw[raw_at:]
                    raw_at, now = len(api.raw), time.monotonic()
                    ending = expired or api.stopping or now >= deadline
                    if expired:
                        out.append(_event("ERROR", {
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "reason": "Expired", "code": 410,
                            "message": f"too old resource version: {since} "
                                       f"({api.compacted + 1})"}))
                    elif bookmarks and (now >= mark or ending):
                        since = max(since, api.rv)
                        out.append(_event("BOOKMARK", {
                            "kind": kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": str(since)}}))
                        mark = now + api.bookmark_every
                    cut = api.cuts != cuts
                    if not (out or cut or ending):
                        api.changed.wait(min(0.2, deadline - now, max(0.01, mark - now)))
                        continue
                if cut:  # no final chunk: the client sees the stream break
                    self.close_connection = True
                    return
                for data in out:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                out = []
                if ending:
                    self.wfile.write(b"0\r\n\r\n")
                    return
        except OSError:  # the client went away
            self.close_connection = True

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


# -- pods/exec: the exec websocket (v5/v4.channel.k8s.io) over RFC 6455, and the pods' ----
# -- processes on this machine (the stand-in for the kubelet and the container runtime) ---

EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")  # preferred: the client's order
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_REQUEST_LINE = 1 << 20  # Go's http.Server default: exec's argv travels in the URL
MAX_MESSAGE = 1 << 20  # one client message (stdin, resize), fragments included
OUT_FRAME = 16 << 10  # larger messages go out as fragments, as gorilla/websocket does
EXEC_DEADLINE = 120.0  # an exec's whole life; then its processes are killed
IO_TIMEOUT = 30.0  # a client that takes no data for this long is gone
# The pod's sandbox: a mount namespace whose /run is its own (a tmpfs) with the pod's
# directory at /run/engine, and a PID namespace; pid 1 holds both until its stdin, a pipe
# from the stand-in, closes (at stop(), or when the test process dies).
_SANDBOX = ('set -e; mount -t tmpfs -o mode=755 tmpfs /run; mkdir /run/engine; '
            'mount --bind "$1" /run/engine; echo ready; read -r _')


_DISCOVERY: dict[str, Any] = {  # legacy discovery, enough for kubectl to find pods/exec
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0-stand-in"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["get", "list"], "shortNames": ["po"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
         "verbs": ["create", "get"]}]},
}


class WsError(Exception):
    """A websocket protocol error: the connection is closed with this status code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One unmasked frame (a server's)."""
    n = len(payload)
    size = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big") if n < 1 << 16 \
        else bytes([127]) + n.to_bytes(8, "big")
    return bytes([(0x80 if fin else 0) | opcode]) + size + payload


def ws_message(opcode: int, payload: bytes, frame: int = OUT_FRAME) -> bytes:
    """A data message as frames of at most `frame` bytes (continuations after the first)."""
    parts = [payload[i:i + frame] for i in range(0, len(payload), frame)] or [b""]
    return b"".join(ws_frame(opcode if i == 0 else 0, p, i == len(parts) - 1)
                    for i, p in enumerate(parts))


class WsReader:
    """Decodes a client's frames as bytes arrive: masked (RFC 6455 5.1), fragmented data
    messages reassembled (control frames may come between fragments), at most MAX_MESSAGE
    bytes a message. `feed` returns complete (opcode, payload) messages."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.parts: list[bytes] = []
        self.opcode = 0  # of the fragmented message under way, 0 for none

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while (frame := self._frame()) is not None:
            fin, opcode, payload = frame
            if opcode >= 8:  # control: close, ping, pong
                if not fin or len(payload) > 125:
                    raise WsError(1002, "fragmented or long control frame")
                out.append((opcode, payload))
                continue
            if (opcode == 0) != bool(self.opcode):
                raise WsError(1002, "unexpected continuation" if opcode == 0
                              else "new message inside a fragmented one")
            self.opcode = self.opcode or opcode
            self.parts.append(payload)
            if sum(map(len, self.parts)) > MAX_MESSAGE:
                raise WsError(1009, "message too big")
            if fin:
                msg = b"".join(self.parts)
                if self.opcode == 1:
                    try:
                        msg.decode("utf-8")
                    except UnicodeDecodeError:
                        raise WsError(1007, "text message is not UTF-8") from None
                out.append((self.opcode, msg))
                self.parts, self.opcode = [], 0
        return out

    def _frame(self) -> tuple[bool, int, bytes] | None:
        b = self.buf
        if len(b) < 2:
            return None
        fin, rsv, opcode = bool(b[0] & 0x80), b[0] & 0x70, b[0] & 0x0F
        if rsv or opcode not in (0, 1, 2, 8, 9, 10):
            raise WsError(1002, "reserved bits or unknown opcode")
        if not b[1] & 0x80:
            raise WsError(1002, "client frames must be masked")
        n, at = b[1] & 0x7F, 2
        if n >= 126:
            width = 2 if n == 126 else 8
            if len(b) < at + width:
                return None
            n, at = int.from_bytes(b[at:at + width], "big"), at + width
        if n > MAX_MESSAGE:
            raise WsError(1009, "frame too big")
        if len(b) < at + 4 + n:
            return None
        mask = b[at:at + 4]
        data = bytes(x ^ mask[i % 4] for i, x in enumerate(b[at + 4:at + 4 + n]))
        del b[:at + 4 + n]
        return fin, opcode, data


def _bool(query: dict[str, list[str]], name: str) -> bool:
    value = (query.get(name) or ["false"])[-1]
    if value not in ("1", "t", "T", "true", "True", "TRUE", "0", "f", "F", "false", "False",
                     "FALSE"):
        raise ApiError(400, "BadRequest", f"invalid value {value!r} for {name}")
    return value in ("1", "t", "T", "true", "True", "TRUE")


class PodSandbox:
    """One pod's containers on this machine (the kubelet and container runtime are what
    this stands in for): a mount and PID namespace held by a sleeping pid 1, with the
    host directory `engine` at /run/engine (what the Pod mounts there) and `image-bin`
    first on PATH (the image's own programs: a test may put a hostile `tar` there). The
    rest of the file system is the host's. When pid 1 ends, so does every process in the
    pod."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.engine, self.image_bin = root / "engine", root / "image-bin"
        for d in (self.engine, self.image_bin):
            d.mkdir(parents=True, exist_ok=True)
        self.env["PATH"] = f"{self.image_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:" \
                           "/usr/bin:/sbin:/bin"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "--kill-child", "sh", "-c", _SANDBOX, "sh", str(self.engine)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        assert self.holder.stdout and self.holder.stderr
        ready, _, _ = select.select([self.holder.stdout], [], [], 20)
        if not ready or self.holder.stdout.readline() != b"ready\n":
            self.stop()
            raise RuntimeError("stand-in pod sandbox did not start (needs root for "
                               f"unshare): {self.holder.stderr.read(2000)!r}")
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children")
        self.pid = int(children.read_text().split()[0])  # pid 1 inside
        self.started: list[subprocess.Popen[bytes]] = []

    def enter(self, argv: list[str], tty: bool = False) -> list[str]:
        """argv run inside the pod (with a controlling terminal when `tty`)."""
        return [shutil.which("nsenter") or "nsenter", "-t", str(self.pid), "-m", "-p", "--",
                *([shutil.which("setsid") or "setsid", "--ctty", "--wait"] if tty else []),
                *argv]

    def project(self, mount_path: str, files: dict[str, str], mode: int) -> None:
        """A ConfigMap volume's files at `mount_path` (under /run/engine)."""
        d = self.engine / mount_path[len("/run/engine/"):]
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text)
            (d / name).chmod(mode)

    def which(self, cmd: str) -> bool:
        """Whether the pod can execute `cmd` (the runtime's lookup, before it starts)."""
        def host(p: str) -> Path | None:
            if p == "/run/engine" or p.startswith("/run/engine/"):
                return self.engine / p[len("/run/engine/"):]
            return None if p.startswith("/run/") else Path(p)
        dirs = [""] if "/" in cmd else self.env["PATH"].split(":")
        for d in dirs:
            p = host(f"{d}/{cmd}" if d else cmd)
            if p is not None and p.is_file() and os.access(p, os.X_OK):
                return True
        return False

    def run(self, argv: list[str], env: dict[str, str] | None = None
            ) -> subprocess.Popen[bytes]:
        """Start a process in the pod (a container's main process), output to root/*.log."""
        log = open(self.root / f"container-{len(self.started)}.log", "wb")  # noqa: SIM115
        with log:
            p = subprocess.Popen(self.enter(argv), env={**self.env, **(env or {})}, cwd="/",
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True)
        self.started.append(p)
        return p

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait(10)
        for f in (self.holder.stdin, self.holder.stdout, self.holder.stderr):
            if f:
                f.close()
        for p in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


class ExecSession:
    """One exec over an upgraded connection: the process's output goes out on its
    channels as it comes, stdin and resizes come in, and the exit status is sent on the
    error channel (a metav1.Status) before the close frame."""

    def __init__(self, sock: socket.socket, leftover: bytes, protocol: str) -> None:
        self.sock, self.leftover, self.protocol = sock, leftover, protocol
        self.lock = threading.Lock()
        self.gone = threading.Event()  # the client closed, or stopped taking data
        self.closed = threading.Event()  # the client's close frame arrived
        self.stdin: int | None = None
        self.tty_fd: int | None = None
        self.sock.settimeout(IO_TIMEOUT)

    def send(self, opcode: int, payload: bytes) -> None:
        try:
            with self.lock:
                self.sock.sendall(ws_message(opcode, payload) if opcode < 8
                                  else ws_frame(opcode, payload))
        except OSError:
            self.gone.set()

    def channel(self, channel: int, data: bytes) -> None:
        self.send(2, bytes([channel]) + data)

    def run(self, sandbox: PodSandbox, argv: list[str], opts: dict[str, bool],
            record: list[Any]) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        try:
            code = self._exec(sandbox, argv, opts) if sandbox.which(argv[0]) else None
        except OSError as e:
            code, argv = None, [f"{argv[0]} ({e.strerror})"]
        if self.reader.ident is None:  # the command never started
            self.reader.start()
        record.append(code)
        if not self.gone.is_set():
            self.channel(ERROR, json.dumps(_exec_status(argv, code)).encode())
            self.send(8, (1000).to_bytes(2, "big"))
            self.closed.wait(2)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.gone.set()
        self.reader.join(5)

    def _exec(self, sandbox: PodSandbox, argv: list[str], opts: dict[str, bool]) -> int:
        pipe, null = subprocess.PIPE, subprocess.DEVNULL
        master = slave = -1
        if opts["tty"]:
            master, slave = pty.openpty()
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            streams: dict[str, Any] = {"stdin": slave, "stdout": slave, "stderr": slave}
        else:
            streams = {"stdin": pipe if opts["stdin"] else null,
                       "stdout": pipe if opts["stdout"] else null,
                       "stderr": pipe if opts["stderr"] else null}
        env = {**sandbox.env, **({"TERM": "xterm"} if opts["tty"] else {})}  # as containerd
        proc = subprocess.Popen(sandbox.enter(argv, opts["tty"]), env=env, cwd="/",
                                start_new_session=True, **streams)
        pumps = []
        if opts["tty"]:
            os.close(slave)
            self.tty_fd = self.stdin = master
            pumps.append((master, STDOUT))
        else:
            self.stdin = proc.stdin.fileno() if proc.stdin else None
            pumps += [(f.fileno(), ch) for f, ch in ((proc.stdout, STDOUT),
                                                     (proc.stderr, STDERR)) if f]
        self.reader.start()  # stdin has somewhere to go now
        exited = threading.Event()
        threads = [threading.Thread(target=self._pump, args=(fd, ch, exited), daemon=True)
                   for fd, ch in pumps]
        for t in threads:
            t.start()
        deadline = time.monotonic() + EXEC_DEADLINE
        while proc.poll() is None:
            if self.gone.is_set() or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)
        exited.set()
        for t in threads:
            t.join(5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f:
                with contextlib.suppress(OSError):
                    f.close()
        if master >= 0:
            os.close(master)
        rc = proc.returncode
        return 128 - rc if rc < 0 else rc

    def _pump(self, fd: int, channel: int, exited: threading.Event) -> None:
        """fd's output to `channel`; after the process exits, what is left for at most a
        second (a background child may hold the pipe open)."""
        until = None
        while not self.gone.is_set():
            if exited.is_set():
                until = until or time.monotonic() + 1
                if time.monotonic() > until:
                    return
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(fd, 32 << 10)
            except OSError:  # EIO: the terminal's other side is closed
                return
            if not data:
                return
            self.channel(channel, data)

    def _read(self) -> None:
        frames = WsReader()
        data = self.leftover
        try:
            while not self.gone.is_set():
                for opcode, payload in frames.feed(data):
                    self._message(opcode, payload)
                ready, _, _ = select.select([self.sock], [], [], 0.2)
                data = self.sock.recv(64 << 10) if ready else b""
                if ready and not data:
                    break
        except WsError as e:
            self.send(8, e.code.to_bytes(2, "big") + str(e).encode()[:120])
        except OSError:
            pass
        self.gone.set()

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == 9:
            self.send(10, payload)
        elif opcode == 8:
            if len(payload) == 1:
                raise WsError(1002, "bad close payload")
            self.closed.set()
            if not self.gone.is_set():  # the client ends the exec: echo, then stop
                self.send(8, payload[:2])
                self.gone.set()
        elif opcode in (1, 2) and payload:
            self._channel(payload[0], payload[1:])

    def _channel(self, channel: int, data: bytes) -> None:
        if channel == STDIN and self.stdin is not None and data:
            with contextlib.suppress(OSError):
                os.write(self.stdin, data)
        elif channel == RESIZE and self.tty_fd is not None:
            size = json.loads(data or b"{}")
            fcntl.ioctl(self.tty_fd, termios.TIOCSWINSZ, struct.pack(
                "HHHH", int(size.get("Height", 24)), int(size.get("Width", 80)), 0, 0))
        elif (channel == CLOSE and self.protocol == EXEC_PROTOCOLS[0] and data[:1] == b"\0"
              and self.stdin is not None and self.tty_fd is None):
            with contextlib.suppress(OSError):
                os.close(self.stdin)
            self.stdin = None


def _exec_status(argv: list[str], code: int | None) -> dict[str, Any]:
    """What the kubelet writes on the error channel (v4 and v5)."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    if code is None:
        why = (f"error executing command in container: failed to exec in container: "
               f'exec: "{argv[0]}": executable file not found in $PATH')
        return {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: "
                f"{why}", "reason": "InternalError", "details": {"causes": [
                    {"message": why}]}, "code": 500}
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: error executing "
                       f"command [{' '.join(argv)}], exit code {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def serve_exec(h: _Handler, ns: str, name: str, method: str, raw_query: str) -> None:
    """GET or POST .../pods/{name}/exec?command=..&container=..&stdin=..&stdout=..&stderr=..
    &tty=..: checked as the API server does (ApiError before the upgrade), then upgraded to
    a websocket and run in the pod's sandbox. Not here: SPDY (kubectl falls back to it only
    when the websocket upgrade fails)."""
    api, q = h.api, parse_qs(raw_query, keep_blank_values=True)
    argv = q.get("command") or []
    opts = {k: _bool(q, k) for k in ("stdin", "stdout", "stderr", "tty")}
    opts["stderr"] = opts["stderr"] and not opts["tty"]  # a terminal has one output
    pod = api.get("pods", ns, name)
    if pod is None:
        raise ApiError(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
    containers = [c["name"] for c in pod["spec"].get("containers", [])]
    container = (q.get("container") or [""])[-1] or (containers[0] if len(containers) == 1
                                                     else "")
    if container not in containers:
        raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
    phase = pod["status"].get("phase")
    if phase in ("Succeeded", "Failed"):
        raise ApiError(400, "BadRequest", "cannot exec into a container in a completed pod; "
                                          f"current phase is {phase}")
    if phase != "Running":
        raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is '
                                          "waiting to start: ContainerCreating")
    if not argv:
        raise ApiError(400, "BadRequest", "you must specify at least one command for the "
                                          "container")
    if not (opts["stdin"] or opts["stdout"] or opts["stderr"]):
        raise ApiError(400, "BadRequest", "you must specify at least 1 of stdin, stdout, "
                                          "stderr")
    if method != "GET" or (h.headers.get("Upgrade") or "").lower() != "websocket":
        raise ApiError(400, "BadRequest", "Upgrade request required (this stand-in speaks "
                                          "websocket exec only, not SPDY)")
    key = h.headers.get("Sec-WebSocket-Key") or ""
    try:
        ok = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        ok = False
    if h.headers.get("Sec-WebSocket-Version") != "13" or not ok:
        raise ApiError(400, "BadRequest", "bad websocket handshake (version 13 and a "
                                          "16-byte key are required)")
    offered = [p.strip() for v in h.headers.get_all("Sec-WebSocket-Protocol") or ()
               for p in v.split(",") if p.strip()]
    protocol = next((p for p in offered if p in api.exec_protocols), None)
    if protocol is None:
        raise ApiError(400, "BadRequest", f"requested protocol(s) are not supported: "
                                          f"{offered}; supports {list(api.exec_protocols)}")
    if api.exec_stall:
        time.sleep(api.exec_stall)
        h.close_connection = True
        return
    try:
        sandbox = api.sandbox(ns, name)
    except (RuntimeError, OSError) as e:
        raise ApiError(500, "InternalError", f"stand-in pod sandbox: {e}") from None
    accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
    h.send_response(101)
    for k, v in (("Upgrade", "websocket"), ("Connection", "Upgrade"),
                 ("Sec-WebSocket-Accept", accept), ("Sec-WebSocket-Protocol", protocol)):
        h.send_header(k, v)
    h.end_headers()
    h.wfile.flush()
    h.close_connection = True
    sock: socket.socket = h.connection
    sock.setblocking(False)  # what the client sent right after its request, if anything
    try:
        leftover = h.rfile.read1(MAX_MESSAGE) or b""
    except (BlockingIOError, OSError):
        leftover = b""
    sock.setblocking(True)
    record: list[Any] = [ns, name, argv, protocol, opts]  # + the exit code (None: not found)
    with api.lock:
        api.execs.append(record)
    if api.exec_hostile:
        return _hostile_exec(api, sock, api.exec_hostile)
    ExecSession(sock, leftover, protocol).run(sandbox, argv, opts, record)


def _hostile_exec(api: FakeApiServer, sock: socket.socket, mode: str) -> None:
    """What a hostile pod or API server sends on an exec (FakeApiServer.exec_hostile),
    until the client goes away."""
    sock.settimeout(IO_TIMEOUT)
    if mode.startswith("status:"):
        with contextlib.suppress(OSError):
            sock.sendall(ws_frame(2, bytes([ERROR]) + mode[7:].encode())
                         + ws_frame(8, (1000).to_bytes(2, "big")))
        return
    head = {"fragments": ws_frame(2, bytes([STDOUT]) + b"A" * 1000, fin=False),
            "huge": bytes([0x82, 127]) + (1 << 30).to_bytes(8, "big") + bytes([STDOUT]),
            "trickle": bytes([0x82, 126]) + (4096).to_bytes(2, "big") + bytes([STDOUT])}
    with contextlib.suppress(OSError):
        sock.sendall(head[mode])
        while not api.stopping:
            if mode == "fragments":
                sock.sendall(ws_frame(0, b"A" * (64 << 10), fin=False))
            else:
                time.sleep(0.2)
                sock.sendall(b"A")
