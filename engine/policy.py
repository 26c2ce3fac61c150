"""The spawn gate: a spawn request against the grove's policy, the child against its parent.

Called by `ingest` (requests agents leave in their inboxes) and by `engine spawn --parent`.
`Gate.check` validates a request (fields, names, template syntax, `maxAgents`, `maxDepth`,
`maxChildren`, `spawn.allowProfiles` / `allowHarnesses`), resolves the child as it would run
(the one step with effects: the grove's manifests are read once per Gate and the child is
built by `desired.build`), and refuses it when `compare` finds anything. `compare(parent,
child)` is pure and returns every field on which the child would get more than its parent,
so one rejection reports all of them. `needs_approval` reads the grove's approval setting
(whether an accepted child waits for a person: `engine approve`). Nothing is written here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from engine import budget, desired, inventory, manifest, paths, writeback
from engine.desired import DesiredAgent, DesiredGrove
from engine.errors import EngineError, InvalidManifests

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
TEMPLATE = re.compile(r"\{\{|\{%|\{#")
ACCESS_RANK = {"read-only": 0, "read-write": 1}
# workspace modes from most to least isolated (a grove-wide setting today)
WORKSPACE_RANK = {"clone": 0, "worktree": 1, "shared": 2}
REQUEST_FIELDS = frozenset({"name", "task", "profile", "harness", "dependsOn"})
# kubernetes settings that choose the cluster, the identity or the isolation of the Pod
K8S_FIELDS = ("context", "kubeconfig", "namespace", "serviceAccountName", "runtimeClassName",
              "imagePullSecrets", "nodeSelector", "tolerations")


class Ask(Protocol):
    """What the gate reads of a request; `inbox.Request` is one."""

    @property
    def agent(self) -> str: ...  # whose inbox it came from: the parent

    @property
    def id(self) -> str: ...

    @property
    def spec(self) -> dict[str, Any]: ...


class Gate:
    """Checks spawn requests against the grove's policy, counting earlier accepted ones."""

    def __init__(self, root: Path, grove: DesiredGrove, opts: desired.Options,
                 source: Callable[[], manifest.GroveSource] | None = None) -> None:
        self.root = root
        self.grove = grove
        self.opts = opts
        self.accepted: list[writeback.Spawn] = []
        self._src: manifest.GroveSource | None = None
        # the manifests the plan is made from (a revision's, not the checkout's)
        self._source = source or (lambda: manifest.load_grove(grove.directory, root))

    def check(self, req: Ask) -> writeback.Spawn:
        """The child to write back, or EngineError with the (one-line) reason."""
        parent = self.grove.by_name.get(req.agent)
        if parent is None:
            raise EngineError(f"{req.agent} is not an agent of grove {self.grove.name}")
        name, task, deps = _request_fields(req.spec)
        _fits_policy(self.grove, parent, name, deps, self.accepted)
        profile, harness = _profile_and_harness(parent, req.spec)
        # the profile checked here is the one written: a child never falls back to a
        # grove default its parent may not hand out
        spawn = writeback.Spawn(name, task, parent.name, req.id, inventory.now(), profile,
                                harness, tuple(deps))
        child = self._resolve(spawn)  # and its budget against what the parent has left
        problems = compare(parent, child) + budget.spawn_problems(
            self.grove, parent, child, inventory.load(paths.state(self.root), self.grove.name))
        if problems:
            self.forget(spawn.name)
            raise EngineError(f"child {name} would get more than its parent {parent.name}: "
                              + "; ".join(problems))
        self.accepted.append(spawn)
        return spawn

    def _resolve(self, spawn: writeback.Spawn) -> DesiredAgent:
        """The child as it would run: the grove's manifests plus its document, built."""
        if self._src is None:
            self._src = self._source()
        src = self._src
        doc = spawn.document()
        src.agents[spawn.name] = manifest.Entry(spawn.name, doc["spec"], src.grove.doc,
                                                ("spec",))
        try:
            return desired.build(src, self.opts).by_name[spawn.name]
        except InvalidManifests as e:
            del src.agents[spawn.name]
            raise EngineError(e.diagnostics[0].message) from None

    def forget(self, name: str) -> None:
        """Drop a child that failed the escalation check from the cached sources."""
        if self._src is not None:
            self._src.agents.pop(name, None)


# -- the request against the grove's policy (pure) ----------------------------------------

def needs_approval(grove: DesiredGrove, parent: str) -> bool:
    """Whether a child of `parent` waits for a person (`policy.approval: manual`, the
    child at `approvalFromDepth` or deeper) before it is taken in; False for a parent that
    is not in the grove (the gate refuses its requests anyway)."""
    pol, p = grove.policy, grove.by_name.get(parent)
    return pol.approval == "manual" and p is not None and p.depth + 1 >= pol.approval_from_depth


def _request_fields(spec: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(name, task, dependsOn) of a well-formed request; EngineError otherwise."""
    unknown = set(spec) - REQUEST_FIELDS
    if unknown:
        raise EngineError(f"unknown field {sorted(unknown)[0]!r} in spawn request")
    name, task = spec.get("name"), spec.get("task")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise EngineError(f"child name {name!r} is not valid (lower-case letters, digits "
                          "and '-', at most 40 characters)")
    if not isinstance(task, str) or not task.strip():
        raise EngineError("the task must be a non-empty string")
    deps = spec.get("dependsOn") or []
    if not isinstance(deps, list):
        raise EngineError("dependsOn must be a list of agent names")
    values = [name, task, str(spec.get("profile", "")), str(spec.get("harness", "")),
              *map(str, deps)]
    if any(TEMPLATE.search(v) for v in values):
        raise EngineError("template syntax ({{ }}, {% %}) is not allowed in spawn requests")
    return name, task, [str(d) for d in deps]


def _fits_policy(g: DesiredGrove, parent: DesiredAgent, name: str, deps: list[str],
                 accepted: list[writeback.Spawn]) -> None:
    """Check the name, maxAgents, maxDepth, maxChildren and dependsOn."""
    taken = set(g.by_name) | {s.name for s in accepted}
    if name in taken:
        raise EngineError(f"an agent named {name} already exists in grove {g.name}")
    pol = g.policy
    if len(taken) + 1 > pol.max_agents:
        raise EngineError(f"grove {g.name} is at policy.maxAgents {pol.max_agents}")
    if parent.depth + 1 > pol.max_depth:
        raise EngineError(f"spawn depth {parent.depth + 1} would exceed policy.maxDepth "
                          f"{pol.max_depth}")
    kids = sum(1 for a in g.agents if a.spawned_by == parent.name) + sum(
        1 for s in accepted if s.parent == parent.name)
    if kids + 1 > pol.max_children:
        raise EngineError(f"{parent.name} already has {kids} children "
                          f"(policy.maxChildren {pol.max_children})")
    for d in deps:
        if d not in taken:
            raise EngineError(f"dependsOn names unknown agent {d!r}")


def _profile_and_harness(parent: DesiredAgent, spec: dict[str, Any]) -> tuple[str, str]:
    """The child's profile (the parent's when not asked for) and the harness to write
    ("" = the grove's default), both checked against the parent's spawn policy."""
    profile = str(spec.get("profile") or parent.profile)
    if profile not in parent.allow_profiles:
        allowed = ", ".join(parent.allow_profiles) or "none"
        raise EngineError(f"profile {profile} is not allowed for children of "
                          f"{parent.name} (spawn.allowProfiles: {allowed})")
    harness = str(spec.get("harness") or parent.harness)
    if parent.allow_harnesses is not None and harness not in parent.allow_harnesses:
        raise EngineError(f"harness {harness} is not allowed for children of {parent.name}")
    return profile, str(spec.get("harness", ""))


# -- the child against its parent (pure) -------------------------------------------------

def compare(parent: DesiredAgent, child: DesiredAgent) -> list[str]:
    """Every way `child`, resolved as it would run, gets more than `parent`: one line per
    problem, each starting with the field ([] = the child may run).

    Rules (the parent's value bounds the child's):
    - user: the same user (uid[:gid]) as the parent; only a root parent (uid 0) may hand
      out another user, so no child runs as root unless its parent does;
    - readOnlyRoot: a parent with a read-only root filesystem has children with one too;
    - privileged: only a privileged parent has privileged children;
    - mounts: each of the child's mounts is one of the parent's (same source and target),
      and read-only where the parent's is;
    - resources (cpus, memory, pids) and maxDuration: never above the parent's; unset (or
      0, which means no limit) on the child while the parent has a limit counts as above;
    - network: none < egress or a named network < host; a named network only the
      parent's own; egress only under an egress or host parent, with endpoints the parent
      may reach;
    - credentials: each of the child's is one the parent has, with the same source (the
      same name read from another variable or file is refused);
    - access: read-only < read-write; workspace: clone < worktree < shared;
    - runtime: a local (unsandboxed) parent may use any runtime; any other parent's
      children stay on its runtime, on docker on the same `host`, on kubernetes with the
      same context, kubeconfig, namespace, service account, runtime class, image pull
      secrets, node selector and tolerations.
    The image, harness, task, env and restart policy are not bounded.
    """
    return [problem for rule in _RULES for problem in rule(parent, child)]


def _user(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    if c.user == p.user or _is_root(p.user):
        return []
    if _is_root(c.user):
        return [f"user: would run as root ({c.user}); the parent runs as {p.user}"]
    return [f"user: would run as {c.user}; the parent runs as {p.user} (only a root "
            "parent may hand out another user)"]


def _is_root(user: str) -> bool:
    uid = user.partition(":")[0].strip()
    return uid == "root" or (uid.isdigit() and int(uid) == 0)


def _root_fs(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    if p.read_only_root and not c.read_only_root:
        return ["readOnlyRoot: would get a writable root filesystem; the parent's is "
                "read-only"]
    return []


def _privileged(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    if c.privileged and not p.privileged:
        return ["privileged: would be privileged; the parent is not"]
    return []


def _mounts(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    theirs = {(src, dst): ro for src, dst, ro in p.mounts}
    out = []
    for src, dst, ro in c.mounts:
        if (src, dst) not in theirs:
            out.append(f"mounts: would mount {src} at {dst}; the parent has no such mount")
        elif theirs[(src, dst)] and not ro:
            out.append(f"mounts: would mount {src} at {dst} read-write; the parent has it "
                       "read-only")
    return out


def _resources(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    out = []
    for key in ("cpus", "memory", "pids"):
        mine = getattr(c.resources, key) or None
        theirs = getattr(p.resources, key) or None
        if theirs is not None and (mine is None or mine > theirs):
            out.append(f"resources.{key}: would get {_amount(key, mine)}; the parent has "
                       f"{_amount(key, theirs)}")
    return out


def _amount(key: str, value: float | None) -> str:
    if value is None:
        return "no limit"
    if key == "memory":
        for unit, size in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
            if value % size == 0:
                return f"{int(value // size)}{unit}"
        return f"{int(value)} bytes"
    return str(value)


def _duration(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    mine, theirs = c.max_duration or None, p.max_duration or None
    if theirs is not None and (mine is None or mine > theirs):
        got = f"{mine}s" if mine else "no limit"
        return [f"maxDuration: would get {got}; the parent has {theirs}s"]
    return []


def _network(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    mine, theirs = _net_rank(c.network), _net_rank(p.network)
    if mine > theirs or (mine == 2 and c.network != p.network):
        return [f"network: would get {c.network}; the parent has {p.network}"]
    if mine == 1 and theirs == 2:  # a named network and egress reach different places
        return [f"network: would get egress; the parent has network {p.network}"]
    if mine == 1 and theirs == 1:
        extra = sorted(set(c.egress) - set(p.egress))
        if extra:
            return [f"egress: would reach {', '.join(extra)}, which the parent cannot"]
    return []


def _net_rank(network: str) -> int:
    """none < egress (the gateway, a subset of the parent's endpoints) and a named network
    (the parent's own; the two are not comparable) < host."""
    return {"none": 0, "egress": 1, "host": 3}.get(network, 2)


def _credentials(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    theirs = {ref.name: ref for ref in p.credentials}
    out = []
    for ref in c.credentials:
        own = theirs.get(ref.name)
        if own is None:
            out.append(f"credentials: would get {ref.name}; the parent does not have it")
        elif (own.source, own.ref) != (ref.source, ref.ref):
            out.append(f"credentials: would read {ref.name} from {ref.describe()}; the "
                       f"parent's {ref.name} comes from {own.describe()}")
    return out


def _access(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    out = []
    if ACCESS_RANK.get(c.access, 1) > ACCESS_RANK.get(p.access, 1):
        out.append(f"access: would get {c.access}; the parent has {p.access}")
    if WORKSPACE_RANK.get(c.workspace, 2) > WORKSPACE_RANK.get(p.workspace, 2):
        out.append(f"workspace: would get {c.workspace}; the parent has {p.workspace}")
    return out


def _runtime(p: DesiredAgent, c: DesiredAgent) -> list[str]:
    if p.runtime == "local":
        return []
    if c.runtime == "local":
        return [f"runtime: would run unsandboxed (local); the parent runs on {p.runtime}"]
    if c.runtime != p.runtime:
        return [f"runtime: would run on {c.runtime}; the parent runs on {p.runtime}"]
    if c.runtime in ("docker", "podman") and c.host != p.host:
        return [f"host: would run on Docker host {c.host or '(default)'}; the parent runs on "
                f"{p.host or '(default)'}"]
    if c.runtime == "kubernetes":
        return [f"{key}: would get {_show(c.extra(key))}; the parent has "
                f"{_show(p.extra(key))}" for key in K8S_FIELDS if c.extra(key) != p.extra(key)]
    return []


def _show(value: Any) -> str:
    return "unset" if value is None else value if isinstance(value, str) else json.dumps(
        value, sort_keys=True)


_RULES = (_user, _root_fs, _privileged, _mounts, _resources, _network, _credentials,
          _access, _runtime, _duration)
