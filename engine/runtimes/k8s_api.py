"""Kubernetes runtime, API edge: HTTP requests to one cluster, errors, and observed essence.

Called by `engine.runtimes.kubernetes` only. `Cluster.request` sends one request through
the urllib3 pool of a `kubernetes` ApiClient (which did the kubeconfig work: TLS,
tokens, exec plugins) and turns every failure a user can cause into one line: cluster
unreachable, namespace missing, RBAC forbidden (naming verb and resource), a field-manager
conflict (naming the manager); an answer is capped at MAX_BODY bytes (an error's body
at MAX_ERROR_BODY) and must come within its timeout. `essence` turns listed Pods and Jobs
into `Observed`, reading fields of the wrong shape as absent. This module does not import
the `kubernetes` package.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import urllib3

from engine import __version__
from engine.errors import EngineError, PermanentError, RuntimeUnavailable, TemporaryError
from engine.runtimes import (
    FAILED,
    LABEL_AGENT,
    LABEL_GROVE,
    LABEL_HASH,
    LABEL_REPO,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    Observed,
)

KINDS = {  # kind -> (API path prefix, plural)
    "Pod": ("/api/v1", "pods"), "Secret": ("/api/v1", "secrets"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Job": ("/apis/batch/v1", "jobs"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "Service": ("/api/v1", "services"),  # the egress gateway (network: egress)
    "Deployment": ("/apis/apps/v1", "deployments"),
}
APPLY = "application/apply-patch+yaml"
MAX_BODY = 64 << 20  # bytes of one answer (a list page): more is refused
MAX_ERROR_BODY = 64 << 10  # bytes of an error's body read (the rest is not)
_CHUNK = 64 << 10


def plural(kind: str) -> str:
    return KINDS[kind][1]


def path(kind: str, namespace: str, name: str = "", sub: str = "") -> str:
    prefix, plural = KINDS[kind]
    return "/".join(p for p in (f"{prefix}/namespaces/{namespace}/{plural}", name, sub) if p)


class NotFound(EngineError):
    """The object is not there (the namespace is: a missing namespace is its own error)."""


class Invalid(PermanentError):
    """422: the API server refused the object, e.g. a change to an immutable field."""


@dataclass(frozen=True)
class Call:
    """What a request does, in RBAC terms, so that errors can name it."""

    verb: str
    resource: str
    namespace: str
    name: str = ""


class Cluster:
    """One kubeconfig context: a base URL, auth headers and a connection pool."""

    def __init__(self, api_client: Any, context: str, namespace: str) -> None:
        self.api = api_client
        self.context = context
        self.namespace = namespace  # the context's default namespace

    def headers(self) -> dict[str, str]:
        """The kubeconfig's credentials (a bearer token, an exec plugin's, basic auth) and
        the engine's User-Agent, for any request to this cluster."""
        cfg = self.api.configuration
        headers = {"User-Agent": f"grove-engine/{__version__}"}
        for auth in cfg.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        if getattr(cfg, "username", None):
            headers["Authorization"] = cfg.get_basic_auth_token()
        return headers

    def request(self, method: str, url_path: str, call: Call, *,
                query: dict[str, str] | None = None, body: Any = None,
                content_type: str = "application/json", stream: bool = False,
                timeout: float = 30.0, idle: float | None = None) -> Any:
        """Parsed JSON of the response, or the open response when `stream`. The answer's
        headers must come within `timeout` seconds, and a body not streamed within
        `timeout` of each read (4 times that in all); a streamed body may stay silent
        `idle` seconds (None: for ever, as a followed log may)."""
        cfg = self.api.configuration
        url = cfg.host.rstrip("/") + url_path + ("?" + urlencode(query) if query else "")
        headers = {"Accept": "application/json", **self.headers()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        try:
            resp = self.api.rest_client.pool_manager.request(
                method, url, body=data, headers=headers, preload_content=False,
                timeout=urllib3.Timeout(connect=5.0, read=timeout),
                retries=urllib3.Retry(total=2, connect=2, read=0, redirect=0, status=0))
            if resp.status >= 400:
                raw = _read(resp, MAX_ERROR_BODY, timeout)[0]
                raise self._error(resp.status, _status(raw), call, resp.headers)
            if stream:
                sock = getattr(getattr(resp, "connection", None), "sock", None)
                if sock is not None:
                    sock.settimeout(idle)
                return resp
            raw, whole = _read(resp, MAX_BODY, timeout)
        except urllib3.exceptions.HTTPError as e:
            raise RuntimeUnavailable(f"kubernetes: cannot reach the cluster of context "
                                     f"{self.context} at {cfg.host}: {_reason(e)}") from None
        if not whole:
            raise EngineError(f"kubernetes: {call.verb} {call.resource}: the server's answer "
                              f"is longer than {MAX_BODY} bytes; refused")
        try:
            return json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            raise EngineError(f"kubernetes: {call.verb} {call.resource}: the server's answer "
                              "is not JSON") from None

    def _error(self, code: int, status: dict[str, Any], call: Call,
               headers: Any) -> EngineError:
        message = " ".join(str(status.get("message") or f"HTTP {code}").split())[:1000]
        details = _d(status.get("details"))
        where = f"in namespace {call.namespace}" if call.namespace else "in the cluster"
        obj = f"{call.resource} {call.namespace}/{call.name}" if call.name else call.resource
        if code == 401:
            return RuntimeUnavailable(f"kubernetes: the cluster of context {self.context} "
                                      "refused the kubeconfig's credentials (401)")
        if code == 403 and "exceeded quota" in message:
            quota = message[message.index("exceeded quota"):]
            return EngineError(f"kubernetes: {obj} refused by the ResourceQuota of "
                               f"namespace {call.namespace}: {quota[:300]}", message)
        if code == 403:
            named = f"{call.resource} {call.namespace}/{call.name}, " if call.name else ""
            return EngineError(f"kubernetes: RBAC forbids {call.verb} on {call.resource} "
                               f"{where} ({named}context {self.context}): grant verb "
                               f"{call.verb!r} on resource {call.resource!r}", message)
        if code == 404 and (details.get("kind") == "namespaces"
                            or message.startswith('namespaces "')):
            return EngineError(f"kubernetes: namespace {call.namespace} not found on context "
                               f"{self.context} (create it: kubectl create namespace "
                               f"{call.namespace})", message)
        if code == 404:
            return NotFound(f"kubernetes: {obj} not found", message)
        if code == 409 and status.get("reason") == "Conflict" and details.get("causes"):
            return EngineError(f"kubernetes: {obj}: {_conflicts(details['causes'])}; the "
                               "engine does not take fields over (undo that change, or "
                               "delete the object)", message)
        if code == 409:
            return TemporaryError(f"kubernetes: {obj}: {message}", delay=2.0)
        if code == 422:
            return Invalid(f"kubernetes: {obj} is invalid: {message}")
        if code == 429 or code >= 500:
            try:
                after = float(headers.get("Retry-After") or 1)
            except (AttributeError, ValueError):
                after = 1.0
            delay = min(max(after, 0.0), 300.0) if after == after else 1.0  # (not NaN)
            return TemporaryError(f"kubernetes: {call.verb} {obj}: {message}", delay=delay)
        return PermanentError(f"kubernetes: {call.verb} {obj}: {message} (HTTP {code})")


def _read(resp: Any, limit: int, timeout: float) -> tuple[bytes, bool]:
    """(at most `limit` bytes of the body, whether that is all of it), read within
    `timeout` seconds of each other and 4 times `timeout` in all; the connection is
    released when the body was read to its end, else closed."""
    buf = bytearray()
    deadline = time.monotonic() + 4 * timeout
    whole = False
    try:
        for chunk in resp.stream(_CHUNK):
            buf += chunk
            if len(buf) > limit or time.monotonic() > deadline:
                break
        else:
            whole = True
    finally:
        if whole:
            resp.release_conn()
        else:
            resp.close()
    if not whole and len(buf) <= limit:
        raise urllib3.exceptions.TimeoutError("the answer took too long")
    return bytes(buf[:limit]), whole


def _status(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"message": raw.decode(errors="replace").strip()[:200]}
    return value if isinstance(value, dict) else {}


def _reason(e: Exception) -> str:
    text = str(getattr(e, "reason", None) or e)
    m = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    return (m.group(1) if m else text.rsplit(": ", 1)[-1]).strip().lower()


def _conflicts(causes: Any) -> str:
    """'field .spec.x is managed by "kubectl-edit"', for each conflicting field."""
    out = []
    for c in _ds(causes):
        m = re.search(r'conflict with "([^"]+)"', str(c.get("message", "")))
        manager = m.group(1) if m else "another field manager"
        out.append(f"field {c.get('field', '?')} is managed by {manager!r}")
    return "; ".join(sorted(set(out)))


# -- observed essence -------------------------------------------------------------------

_PULL_FAILURES = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                  "CreateContainerConfigError", "CreateContainerError"}


def _d(value: Any) -> dict[str, Any]:
    """`value` when it is an object, else {}: a field of the wrong shape reads as absent."""
    return value if isinstance(value, dict) else {}


def _ds(value: Any) -> list[dict[str, Any]]:
    """The objects of a list (nothing for what is not a list)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _created(obj: dict[str, Any]) -> str:
    return str(_d(obj.get("metadata")).get("creationTimestamp") or "")


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    for cs in _ds(_d(pod.get("status")).get("containerStatuses")):
        if cs.get("name") == "agent":
            return (_d(_d(cs.get("state")).get("terminated"))
                    or _d(_d(cs.get("lastState")).get("terminated")))
    return {}


def _waiting(pod: dict[str, Any]) -> str:
    st = _d(pod.get("status"))
    for cs in [*_ds(st.get("initContainerStatuses")), *_ds(st.get("containerStatuses"))]:
        reason = _d(_d(cs.get("state")).get("waiting")).get("reason")
        if reason:
            return str(reason)[:200]
    return ""


def _code(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def pod_state(pod: dict[str, Any]) -> tuple[str, int | None, str]:
    """(phase, exit code, reason) of one Pod (fields of the wrong shape read as absent)."""
    st = _d(pod.get("status"))
    if _d(pod.get("metadata")).get("deletionTimestamp"):
        return STOPPED, None, "terminating"
    phase, term, waiting = st.get("phase") or "Pending", _terminated(pod), _waiting(pod)
    code = _code(term.get("exitCode"))
    if st.get("reason") == "DeadlineExceeded":
        return FAILED, code, "maxDuration exceeded"
    if phase == "Succeeded":
        return SUCCEEDED, 0 if code is None else code, ""
    if phase == "Failed":
        why = ("killed (out of memory)" if term.get("reason") == "OOMKilled"
               else f"exited {code}" if code is not None
               else str(st.get("reason") or "failed")[:200])
        return FAILED, code, why
    if waiting in _PULL_FAILURES:
        return FAILED, None, f"cannot start: {waiting}"
    if phase == "Running":
        return RUNNING, None, f"restarting ({waiting})" if waiting else ""
    if phase == "Unknown":
        return FAILED, None, "pod state unknown (node unreachable)"
    return PENDING, None, f"starting ({waiting})" if waiting else "starting"


def _job_state(job: dict[str, Any]) -> tuple[str, str] | None:
    for cond in _ds(_d(job.get("status")).get("conditions")):
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return SUCCEEDED, ""
        if cond.get("type") == "Failed":
            reason = str(cond.get("reason") or "")[:200]
            return FAILED, "maxDuration exceeded" if reason == "DeadlineExceeded" else reason
    return None


def _agent(obj: Any) -> str:
    """The agent an object is labelled with ("" for none, or what is not an object)."""
    agent = _d(_d(_d(obj).get("metadata")).get("labels")).get(LABEL_AGENT)
    return agent if isinstance(agent, str) else ""


def essence(grove: str, pods: list[dict[str, Any]], jobs: list[dict[str, Any]],
            host: str) -> dict[str, Observed]:
    """One `Observed` per agent from the listed Pods and Jobs: a finished Job's verdict
    wins; otherwise the newest live Pod (a terminating one only when nothing else is).
    An object without an agent label is not an agent's."""
    out: dict[str, Observed] = {}
    by_agent: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        if _agent(pod):
            by_agent.setdefault(_agent(pod), []).append(pod)
    jobs_by = {_agent(j): j for j in jobs if _agent(j)}
    for agent in sorted(set(by_agent) | set(jobs_by)):
        cands = sorted(by_agent.get(agent, []), key=lambda p: (
            not _d(p.get("metadata")).get("deletionTimestamp"), _created(p)))
        job = jobs_by.get(agent)
        owner = job or cands[-1]
        phase, code, reason = pod_state(cands[-1]) if cands else (PENDING, None, "no pod yet")
        verdict = _job_state(job) if job else None
        if verdict and job and _d(job.get("metadata")).get("deletionTimestamp"):
            verdict = (STOPPED, "terminating")
        if verdict and verdict[0] != phase:
            phase, reason = verdict[0], verdict[1] or reason
        spec_hash = _d(_d(owner.get("metadata")).get("labels")).get(LABEL_HASH)
        out[agent] = Observed(grove=grove, name=agent, runtime="kubernetes",
                              spec_hash=spec_hash if isinstance(spec_hash, str) else "",
                              phase=phase, exit_code=code, reason=reason, host=host)
    return out


def agent_labels(grove: str, agent: str, repo: str) -> dict[str, str]:
    """The labels that say an object is this grove's agent's (the repository's, when the
    grove names a remote)."""
    return {LABEL_GROVE: grove, LABEL_AGENT: agent, **({LABEL_REPO: repo} if repo else {})}


def foreign(obj: dict[str, Any], labels: dict[str, str]) -> str:
    """Why an existing object of an agent's name is not that agent's ("" when it is): its
    owner labels differ, or something other than the agent's workload owns it. The engine
    never writes to, adopts or deletes such an object."""
    meta = obj.get("metadata") or {}
    have = meta.get("labels") or {}
    wrong = [f"{k}={have.get(k, 'none')}" for k, v in labels.items() if have.get(k) != v]
    if wrong:
        return "label " + ", ".join(wrong)
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") not in ("Job", "Pod") or ref.get("name") != meta.get("name"):
            return f"owned by {ref.get('kind', '?')} {ref.get('name', '?')}"
    return ""


def outdated(old: dict[str, Any], wanted: dict[str, Any], repo: str) -> bool:
    """Whether an agent's existing workload must go before `wanted` is applied: create()
    starts the agent, so a finished, terminating or differently specified one is replaced.
    Refuses an object of the same name that another repository's grove owns."""
    meta, kind = wanted["metadata"], wanted["kind"]
    labels = old["metadata"].get("labels") or {}
    if labels.get(LABEL_REPO) != repo:
        raise EngineError(f"kubernetes: {kind.lower()} {meta['namespace']}/{meta['name']} "
                          "exists and is not owned by this repository's grove (label "
                          f"{LABEL_REPO}={labels.get(LABEL_REPO, 'none')}); not touching it")
    status = old.get("status") or {}
    finished = status.get("phase") in ("Succeeded", "Failed") or any(
        c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
        for c in status.get("conditions") or [] if kind == "Job")
    return bool(old["metadata"].get("deletionTimestamp") or finished
                or labels.get(LABEL_HASH) != meta["labels"][LABEL_HASH])
