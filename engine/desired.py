"""Stage 2, desired state: `GroveSource` -> frozen `DesiredGrove` of fully resolved agents.

Called by every command that reads manifests (validate, plan, apply, explain, watch).
Layers each agent's settings (`resolve`), renders templates, resolves credential references (values
only for a keyed digest), checks references, policy and cycles, and computes each agent's
spec hash over canonical JSON. Every problem is collected and raised as `InvalidManifests`.
No raw dicts travel past this stage except the canonical settings kept for display.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import checks, graph, harnesses, layers, paths, secrets
from engine import egress as egress_names
from engine.errors import Diagnostic, EngineError, InvalidManifests
from engine.manifest import Entry, GroveSource
from engine.render import TemplateError, render
from engine.resolve import Options as Options
from engine.resolve import harness_layers
from engine.resolve import resolve as resolve
from engine.schema import did_you_mean
from engine.secrets import CredentialRef
from engine.yamlio import MAX_FILE_BYTES, NotReadable, bulk, read_regular

# Settings that change how the engine treats an agent but not the agent's process: a change
# updates the inventory in place instead of replacing the agent.
IN_PLACE = frozenset({"restart", "dependsOn", "spawnedBy", "spawnedAt", "spawnRequest",
                      "description", "spawn", "limits"})
DEFAULT_POLICY = {"maxAgents": 50, "maxDepth": 3, "maxChildren": 10}
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "Ki": 1024, "Mi": 1024**2,
          "Gi": 1024**3, "Ti": 1024**4}
_ENV_REF = re.compile(r"\benv\.([A-Za-z_][A-Za-z0-9_]*)|\benv\[\s*['\"]([^'\"]+)['\"]\s*\]")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Resources:
    cpus: float | None = None
    memory: int | None = None  # bytes
    pids: int | None = None


@dataclass(frozen=True)
class Limits:
    """An agent's budgets (`limits`), for it and its spawn subtree together; None: no
    limit on that field. `engine.budget` enforces them."""

    max_cost_usd: float | None = None
    max_tokens: int | None = None
    max_turns: int | None = None

    def items(self) -> list[tuple[str, float | int]]:
        """(manifest field, value) of the limits that are set, in a fixed order."""
        return [(k, v) for k, v in zip(LIMIT_FIELDS, (self.max_cost_usd, self.max_tokens,
                                                      self.max_turns), strict=True)
                if v is not None]


LIMIT_FIELDS = ("maxCostUSD", "maxTokens", "maxTurns")


@dataclass(frozen=True)
class DesiredAgent:
    """One fully resolved agent: everything a runtime needs except secret values."""

    grove: str
    name: str
    profile: str
    harness: str
    runtime: str
    task: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    credentials: tuple[CredentialRef, ...]
    depends_on: tuple[str, ...]
    spawned_by: str | None
    restart: str
    max_duration: int | None
    image: str | None
    host: str | None
    access: str
    network: str
    resources: Resources
    user: str
    read_only_root: bool
    privileged: bool
    mounts: tuple[tuple[str, str, bool], ...]  # (source, target, read-only)
    allow_profiles: tuple[str, ...]
    allow_harnesses: tuple[str, ...] | None
    instructions_file: str | None
    role: str
    auth: str | None
    workspace: str
    depth: int
    source: str  # file:line of the agent's definition
    settings: str  # canonical JSON of the resolved settings (no secret values)
    spec_hash: str
    runtime_extra: tuple[tuple[str, str], ...] = ()  # runtime-specific settings, JSON values
    # argv for a restart that resumes the harness's previous session; () = cannot resume
    resume_command: tuple[str, ...] = ()
    # `engine resume --task`: resume_command without the task, and how a task follows it
    # (taskArg, taskFlag), so another text can take the task's place (`argv`)
    resume_prefix: tuple[str, ...] = ()
    task_form: tuple[str, str] = ("position", "")
    # credentials the chosen auth method needs as files: (credential name, path relative to
    # the agent's home); the runtime writes the value there (0600), not into the environment
    credential_files: tuple[tuple[str, str], ...] = ()
    # `network: egress`: the endpoints ("host:port", normalized, sorted) the gateway lets
    # this agent reach; () for any other network
    egress: tuple[str, ...] = ()
    # the installable agent program of the harness: (catalogue name, pinned version), as
    # `engine harness install NAME@VERSION` puts it in the cache; None: nothing to install
    program: tuple[str, str] | None = None
    # plain configuration files the chosen auth method puts in the agent's home: (path
    # relative to the home, content); delivered like credential files (HOME_FILE_PREFIX<n>)
    home_files: tuple[tuple[str, str], ...] = ()
    # `mode: interactive`: the program runs as a conversation in its session (message,
    # attach and resume talk to it); headless runs one task and exits
    mode: str = "headless"
    # the agent-side adapter (`engine adapt NAME -- argv`) that relays the harness's
    # machine-readable output (tokens, cost, "needs input") to the engine; None: none
    adapter: str | None = None
    exit_text: str = ""  # typed into an interactive program to end it once it is done
    limits: Limits = Limits()  # budgets; a change is made in place (IN_PLACE)

    @property
    def branch(self) -> str:
        return paths.branch(self.grove, self.name)

    def argv(self, resume: bool = False, task: str | None = None) -> tuple[str, ...]:
        """What a runtime runs: the command; on a restart the resume argv when the harness
        has one, with `task` (`engine resume --task`) as the next message in place of the
        agent's own task."""
        if not resume or not self.resume_command:
            argv = self.command
        elif task is None:
            argv = self.resume_command
        else:
            mode, flag = self.task_form
            argv = self.resume_prefix + tuple(task_args({"taskArg": mode,
                                                         "taskFlag": flag}, task))
        return ("engine", "adapt", self.adapter, "--", *argv) if self.adapter else argv

    def settings_map(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.settings)
        return value

    def extra(self, key: str, default: Any = None) -> Any:
        for k, v in self.runtime_extra:
            if k == key:
                return json.loads(v)
        return default


HOME_FILE_PREFIX = "ENGINE_HOME_FILE_"  # the name a home file travels under, like a credential


def _program(merged: dict[str, Any]) -> tuple[str, str] | None:
    """(catalogue name, version) of the harness's installable program, if it has one."""
    install = merged.get("install")
    if not isinstance(install, dict) or not install.get("version"):
        return None
    return str(merged.get("builtin") or merged["harness"]), str(install["version"])


@dataclass(frozen=True)
class _Auth:
    """The chosen auth method: its credentials, name, credential files and plain env."""

    creds: tuple[CredentialRef, ...]
    name: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    set_env: dict[str, str] = field(default_factory=dict)
    home_files: tuple[tuple[str, str], ...] = ()  # (path in the home, content)


@dataclass(frozen=True)
class Policy:
    max_agents: int
    max_depth: int
    max_children: int
    approval: str = "auto"  # manual: a person approves children (engine approve / deny)
    approval_from_depth: int = 1  # with manual: children at this depth or deeper only


@dataclass(frozen=True)
class DesiredGrove:
    name: str
    directory: Path
    base_ref: str  # "" = the repository's current branch
    workspace: str
    policy: Policy
    commit_spawns: bool
    remote: str
    agents: tuple[DesiredAgent, ...]  # sorted by name
    profiles: tuple[str, ...]
    harnesses: tuple[str, ...]
    manifest_digest: str
    by_name: dict[str, DesiredAgent] = field(compare=False, hash=False, repr=False,
                                             default_factory=dict)
    sync_prune: bool = False  # spec.sync.prune: the controller deletes agents that left
    self_heal: bool = True  # spec.sync.selfHeal: the controller repairs drift
    # spec.notify as written (engine.notify parses it); no agent's spec hash covers it
    notify: dict[str, Any] = field(compare=False, hash=False, repr=False,
                                   default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name.update({a.name: a for a in self.agents})

    def agent(self, name: str) -> DesiredAgent:
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(sorted(self.by_name)[:10]) or "none"
            raise EngineError(f"agent {self.name}/{name}: not in the grove's manifests "
                              f"(agents: {known})") from None


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(data: Any) -> str:
    return _CANONICAL.encode(data)


def parse_duration(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    return int(value[:-1]) * _SECONDS[value[-1]]


@functools.lru_cache(maxsize=256)
def parse_memory(value: Any) -> int | None:
    if value is None:
        return None
    m = re.fullmatch(r"([0-9]+)([A-Za-z]*)", str(value))
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"bad memory size {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _adapter(value: Any) -> str | None:
    return None if value in (None, "", "none") else str(value)


def _interactive(merged: dict[str, Any]) -> bool:
    """`mode: interactive` takes the harness's `interactive` invocation (command, how the
    task is sent as the first message, resume, adapter, exit text) in place of the
    headless one. False when the harness has none to offer."""
    block = merged.pop("interactive", None)
    if merged.get("mode") != "interactive":
        return True
    if not isinstance(block, dict):
        return False
    for key in ("command", "taskArg", "taskFlag", "resume", "adapter", "exitText"):
        if key in block:
            merged[key] = block[key]
        elif key in ("resume", "adapter", "exitText"):
            merged.pop(key, None)
    return True


def task_args(merged: dict[str, Any], task: str) -> list[str]:
    """How the task follows the command: `taskArg` position (last argument), flag
    (`taskFlag` then the task; a flag ending in '=' is joined to it) or none."""
    mode = merged.get("taskArg", "position")
    if mode == "none":
        return []
    if mode == "position":
        return [task]
    flag = str(merged.get("taskFlag") or "-p")
    return [flag + task] if flag.endswith("=") else [flag, task]


def manifest_digest(directory: Path) -> str:
    """A digest of the grove's files, read as the loader reads them: regular files only,
    never blocking on a FIFO or reading a device (what cannot be read is hashed as the
    reason, so the digest still changes and loading reports it)."""
    h = hashlib.sha256()
    for p in sorted(directory.glob("*.yaml")):
        try:
            data = read_regular(p, MAX_FILE_BYTES, follow_symlinks=False)
        except (NotReadable, OSError) as e:
            data = f"\0unreadable: {e}".encode()
        h.update(p.name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


# -- building ---------------------------------------------------------------------------

class _Builder:
    def __init__(self, src: GroveSource, opts: Options) -> None:
        self.src = src
        self.opts = opts
        self.diags: list[Diagnostic] = []
        self.parents = {n: e.data.get("spawnedBy") for n, e in src.agents.items()}
        self.auth_methods: dict[str, list[dict[str, Any]]] = {}  # per harness name
        self.bases: dict[tuple[str, str], dict[str, Any]] = {}
        self.allow_env: list[str] = []  # the current agent's allowEnv
        self.limit_diags: list[Diagnostic] = []  # budgets that are no positive number

    def problem(self, entry: Entry, message: str, *sub: str | int) -> None:
        self.diags.append(entry.diag(f"agent {entry.name}: {message}", *sub))

    def build(self) -> DesiredGrove:
        src = self.src
        opts = self.opts
        self.diags += checks.profiles(src, opts.user, opts.repo_root)
        self.diags += checks.root_users(src, opts.user, opts.sets)
        self.diags += checks.allow_env(src, opts.user, opts.sets)
        self.diags += checks.references(src, harnesses.names())
        self.limit_diags = limit_problems(src)
        self.diags += self.limit_diags
        self.diags += checks.notify(src)
        agents = []
        for name in sorted(src.agents):
            try:
                agents.append(self._agent(src.agents[name]))
            except InvalidManifests as e:
                self.diags.extend(e.diagnostics)
        pol = {**DEFAULT_POLICY, **(src.spec.get("policy") or {})}
        policy = Policy(pol["maxAgents"], pol["maxDepth"], pol["maxChildren"],
                        str(pol.get("approval", "auto")), int(pol.get("approvalFromDepth", 1)))
        self.diags += checks.graph_problems(src, self.parents, policy.max_agents, policy.max_depth,
                                   policy.max_children)
        if self.diags:
            raise InvalidManifests(self.diags)
        spec = src.spec
        return DesiredGrove(
            name=src.name, directory=src.directory, base_ref=spec.get("baseRef", ""),
            workspace=spec.get("workspace", "worktree"), policy=policy,
            commit_spawns=bool((spec.get("writeBack") or {}).get("commit", False)),
            remote=spec.get("remote", ""), agents=tuple(agents),
            profiles=tuple(sorted(set(src.profiles) | {"local"})),
            harnesses=tuple(sorted(set(src.harnesses) | set(harnesses.names()))),
            manifest_digest=manifest_digest(src.directory) if src.directory.is_dir() else "",
            sync_prune=bool((spec.get("sync") or {}).get("prune", False)),
            self_heal=bool((spec.get("sync") or {}).get("selfHeal", True)),
            notify=dict(spec.get("notify") or {}))

    def _agent(self, entry: Entry) -> DesiredAgent:
        src, opts = self.src, self.opts
        merged, _ = resolve(src, entry.name, opts, bases=self.bases)
        if not _interactive(merged):
            self.problem(entry, f"harness {merged['harness']} has no interactive "
                                "invocation (mode: interactive needs its `interactive:`)", "mode")
        self.allow_env = [str(n) for n in merged.get("allowEnv") or []]
        runtime = merged.get("runtime", "local")
        parent = merged.get("spawnedBy")
        ctx: dict[str, Any] = {
            "agent": {"name": entry.name, "profile": merged["profile"],
                      "harness": merged["harness"], "parent": parent or "",
                      "grove": src.name},
            "grove": {"name": src.name},
            "env": self._template_env(),
        }
        task = self._render(entry, merged.get("task", ""), ctx, "task")
        ctx["task"] = task
        merged["task"] = task
        role = self._render(entry, merged.get("role", ""), ctx, "role")
        env = tuple(sorted((k, self._render(entry, str(v), ctx, "env", k))
                           for k, v in (merged.get("env") or {}).items()))
        command, resume = self._command(entry, merged, ctx)
        prefix = resume[:len(resume) - len(task_args(merged, task))] if resume else ()
        auth = self._credentials(entry, merged)
        creds = auth.creds
        if merged.get("credentials"):  # the resolved settings list what the agent gets
            merged["credentials"] = {c.name: merged["credentials"][c.name] for c in creds}
        env = tuple(sorted({**auth.set_env, **dict(env)}.items()))
        merged["env"] = dict(env)
        merged["command"] = list(command)
        if auth.name:
            merged["auth"] = auth.name
        egress = self._egress(entry, merged)
        refs = [("dependsOn", d) for d in merged.get("dependsOn") or []]
        refs += [("spawnedBy", parent)] if parent else []
        for key, ref in refs:
            if ref not in src.agents:
                self.problem(entry, f"{key} names unknown agent {ref!r}"
                                    f"{did_you_mean(ref, src.agents)}", key)
        image = merged.get("image")
        if runtime in ("docker", "podman", "kubernetes") and not image:
            self.problem(entry, f"runtime {runtime} needs an image (set image: in profile "
                                f"{merged['profile']})")
        try:
            res = merged.get("resources") or {}
            resources = Resources(res.get("cpus"), parse_memory(res.get("memory")),
                                  res.get("pids"))
        except ValueError as e:
            raise InvalidManifests([entry.diag(f"agent {entry.name}: resources: {e}",
                                               "resources")]) from None
        digest = self._digest(entry, creds)
        hashed = {k: v for k, v in merged.items() if k not in IN_PLACE}
        if auth.home_files:  # what lands in the home is part of what the agent runs with
            hashed["homeFiles"] = dict(auth.home_files)
        spec_hash = hashlib.sha256(canonical([hashed, digest]).encode()).hexdigest()[:16]
        spawn = merged.get("spawn") or {}
        extra = tuple(sorted((k, canonical(merged[k])) for k in checks.RUNTIME_ONLY
                             if k in merged and k != "host"))
        return DesiredAgent(
            grove=src.name, name=entry.name, profile=merged["profile"],
            harness=merged["harness"], runtime=runtime, task=task, command=command, env=env,
            credentials=creds, depends_on=tuple(merged.get("dependsOn") or ()),
            spawned_by=parent, restart=merged.get("restart", "never"),
            max_duration=parse_duration(merged.get("maxDuration")), image=image,
            host=merged.get("host"), access=merged.get("access", "read-write"),
            network=merged.get("network", "none"), resources=resources,
            user=str(merged.get("user", 1000)), read_only_root=bool(merged.get("readOnlyRoot")),
            privileged=bool(merged.get("privileged")),
            mounts=tuple((m["source"], m["target"], bool(m.get("readOnly")))
                         for m in merged.get("mounts") or []),
            allow_profiles=tuple(spawn.get("allowProfiles") or ()),
            allow_harnesses=tuple(spawn["allowHarnesses"]) if "allowHarnesses" in spawn
            else None,
            instructions_file=merged.get("instructionsFile"), role=role, auth=auth.name,
            workspace=merged.get("workspace", "worktree"),
            depth=graph.depth_of(self.parents, entry.name), source=entry.where(),
            settings=canonical(merged), spec_hash=spec_hash, runtime_extra=extra,
            resume_command=resume, resume_prefix=prefix,
            task_form=(str(merged.get("taskArg", "position")), str(merged.get("taskFlag") or "")),
            egress=egress, program=_program(merged),
            credential_files=auth.files + tuple(
                (f"{HOME_FILE_PREFIX}{i}", path) for i, (path, _) in enumerate(auth.home_files)),
            home_files=auth.home_files, mode=str(merged.get("mode") or "headless"),
            adapter=_adapter(merged.get("adapter")), exit_text=str(merged.get("exitText") or ""),
            limits=self._limits(entry, merged))

    def _limits(self, entry: Entry, merged: dict[str, Any]) -> Limits:
        """The resolved `limits`. The manifests' values were checked where they are
        written (`limit_problems`); one that is no positive number here came from the
        user config, and is said at the agent."""
        raw = merged.get("limits") or {}
        values: dict[str, Any] = {}
        for key in LIMIT_FIELDS:
            value = raw.get(key) if isinstance(raw, dict) else None
            if value is None:
                continue
            if _limit_value(key, value) is None:
                if not self.limit_diags:
                    self.problem(entry, f"limits.{key}: {value!r} is not a positive "
                                        f"{'number' if key == 'maxCostUSD' else 'integer'}",
                                 "limits")
                continue
            values[key] = _limit_value(key, value)
        return Limits(values.get("maxCostUSD"), values.get("maxTokens"),
                      values.get("maxTurns"))

    def _egress(self, entry: Entry, merged: dict[str, Any]) -> tuple[str, ...]:
        """The endpoints of a `network: egress` agent: the profile's `egress` list, where
        the entry `harness` (the default) stands for the harness's declared endpoints."""
        network = merged.get("network", "none")
        wanted = merged.get("egress")
        if network != "egress":
            if wanted:
                self.problem(entry, f"egress applies only with network: egress (network is "
                                    f"{network})", "egress")
            return ()
        out: set[str] = set()
        items: list[tuple[str, str]] = []
        for i, item in enumerate(["harness"] if wanted is None else wanted):
            if item == "harness":
                items += [(f"harness {merged.get('harness')}: endpoints", str(e))
                          for e in merged.get("endpoints") or []]
            else:
                items.append((f"egress[{i}]", str(item)))
        bad = 0
        for where, item in items:
            try:
                host, port = egress_names.parse_endpoint(item)
                out.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            except ValueError as e:
                bad += 1
                self.problem(entry, f"{where}: {e}", "egress")
        if not out and not bad:
            self.problem(entry, f"network: egress with no endpoint: harness "
                                f"{merged.get('harness')} declares none, so list them in "
                                "egress: [host:port, ...]", "network")
        return tuple(sorted(out))

    def _render(self, entry: Entry, text: str, ctx: dict[str, Any], *where: str) -> str:
        try:
            return render(text, ctx)
        except TemplateError as e:
            field_name = ".".join(where)
            self.problem(entry, f"{field_name}: {self._env_problem(text, ctx) or e}", *where)
            return text

    def _template_env(self) -> dict[str, str]:
        """`env` as templates see it: the allowed variables' values, or with `host_env`
        off (checking a pull request) a `${NAME}` placeholder for each, so no value of the
        engine's environment can reach a rendered field or an error message."""
        if not self.opts.host_env:
            return {k: f"${{{k}}}" for k in self.allow_env}
        return {k: os.environ[k] for k in self.allow_env if k in os.environ}

    def _env_problem(self, text: str, ctx: dict[str, Any]) -> str:
        """A clearer reason when a template reads an `env` name it may not (or that is
        unset), naming the variable but never a value."""
        for m in _ENV_REF.finditer(text):
            name = m.group(1) or m.group(2)
            if name not in self.allow_env:
                allowed = ", ".join(self.allow_env) or "none"
                return f"env.{name}: {name} is not in the profile's allowEnv (allowed: " \
                       f"{allowed})"
            if name not in ctx["env"]:
                return f"env.{name}: environment variable {name} is not set"
        return ""

    def _command(self, entry: Entry, merged: dict[str, Any], ctx: dict[str, Any]
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The argv that starts the agent, and the argv that resumes its previous session
        on a restart (`resume` arguments before the task; () when the harness has none)."""
        argv = [self._render(entry, a, ctx, "command") for a in merged.get("command") or []]
        if not argv:
            self.problem(entry, f"harness {merged['harness']} has no command")
            return (), ()
        resume = [self._render(entry, str(a), ctx, "resume") for a in merged.get("resume") or []]
        task = task_args(merged, ctx["task"])
        return tuple(argv + task), (tuple(argv + resume + task) if resume else ())

    def _credentials(self, entry: Entry, merged: dict[str, Any]) -> _Auth:
        """The credentials the agent receives: every credential of the profile, except the
        harness's own auth credentials (those any of its auth methods names) of a method
        that is not chosen. The chosen method is the one `auth:` names, else the first one
        the profile's credentials satisfy. None satisfied is a problem naming what is
        missing (never a value)."""
        avail = {}
        for name, ref in sorted((merged.get("credentials") or {}).items()):
            if ref:
                src, val = next(iter(ref.items()))
                avail[name] = CredentialRef(name, "env" if src == "fromEnv" else "file", val)
        wanted = merged.get("auth") if isinstance(merged.get("auth"), str) else None
        hname = merged["harness"]
        if hname not in self.auth_methods:  # the agent's `auth:` replaces the list: take it
            hl = harness_layers(self.src, hname) or []  # from the harness's own layers
            self.auth_methods[hname] = layers.merge(hl)[0].get("auth") or []
        methods = self.auth_methods[hname]
        harness = f"harness {hname}"
        if not methods:
            if wanted:
                self.problem(entry, f"auth {wanted!r}: {harness} has no auth methods", "auth")
            return _Auth(tuple(avail.values()))
        own = {str(n) for m in methods
               for n in [*(m.get("env") or []), *(f["credential"] for f in m.get("files") or [])]}
        others = tuple(c for n, c in avail.items() if n not in own)
        names = [str(m["name"]) for m in methods]
        if wanted and wanted not in names:
            self.problem(entry, f"auth {wanted!r}: {harness} has no such auth method "
                                f"(methods: {', '.join(names)})", "auth")
            return _Auth(others, wanted)
        unmet = []
        for m in methods:
            if wanted and m["name"] != wanted:
                continue
            files = tuple(sorted((str(f["credential"]), str(f["path"]))
                                 for f in m.get("files") or []))
            needs = sorted({*m.get("env", []), *(n for n, _ in files)})
            missing = [w for w in (self._missing(merged, n, avail.get(n)) for n in needs) if w]
            if not missing:
                home = tuple(sorted((str(k), str(v))
                                    for k, v in (m.get("homeFiles") or {}).items()))
                return _Auth(tuple(c for n, c in avail.items() if n in needs or n not in own),
                             str(m["name"]), files,
                             {k: str(v) for k, v in (m.get("setEnv") or {}).items()}, home)
            unmet.append(f"{m['name']}: {', '.join(missing)}")
        self.problem(entry, f"{harness}: no auth method is satisfied ({'; '.join(unmet)})")
        return _Auth(others, wanted)

    def _missing(self, merged: dict[str, Any], name: str, cred: CredentialRef | None
                 ) -> str:
        """Why credential `name` cannot be had ("" when it can): the profile lacks it, or
        its environment variable or file is absent."""
        if cred is None:
            return f"credential {name} is not in profile {merged['profile']}"
        if self._present(cred):
            return ""
        what = "is not set" if cred.source == "env" else "does not exist"
        return f"credential {name}: {cred.describe()} {what}"

    def _present(self, cred: CredentialRef) -> bool:
        """Whether the source is there (a file that is there but is no regular file, say a
        FIFO, is refused when its value is read, naming where it was declared)."""
        if not self.opts.resolve_secrets:
            return True
        if cred.source == "env":
            return cred.ref in os.environ
        return os.path.lexists(Path(cred.ref).expanduser())

    def _digest(self, entry: Entry, creds: tuple[CredentialRef, ...]) -> str:
        if not self.opts.resolve_secrets:
            return "unresolved" if creds else ""
        try:
            return secrets.digest(creds, self.opts.secret_key or b"engine")
        except secrets.MissingSecret as e:
            # said at the agent, naming where the credential was declared (never a value)
            _, prov = resolve(self.src, entry.name, self.opts, provenance=True)
            declared = [w for k, w in sorted(prov.items()) if k[:1] == ("credentials",)
                        and e.summary.startswith(f"credential {k[1]}:")]
            at = f" (declared at {declared[0]})" if declared else ""
            self.problem(entry, f"{e.summary}{at}", "credentials")
            return ""


def _limit_value(key: str, value: Any) -> float | int | None:
    """A budget as the engine keeps it, or None when it is no positive (finite) number
    (the schema cannot refuse NaN: every comparison with it is false)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    if key == "maxCostUSD":
        return float(value)
    return int(value) if float(value).is_integer() else None  # 5.0 is the integer 5


def limit_problems(src: GroveSource) -> list[Diagnostic]:
    """Budgets that are no positive number (NaN, which passes the schema), each at the
    file:line that sets it: the grove's `spec.limits`, a profile's or an agent's."""
    out = []
    places: list[tuple[Any, Any]] = [(src.spec.get("limits"), lambda m, k: src.grove.diag(
        f"grove {src.name}: {m}", "spec", "limits", k))]
    for kind, entries in (("profile", src.profiles), ("agent", src.agents)):
        for name, e in sorted(entries.items()):
            places.append((e.data.get("limits"), lambda m, k, e=e, w=f"{kind} {name}":
                           e.diag(f"{w}: {m}", "limits", k)))
    for limits, diag in places:
        if not isinstance(limits, dict):
            continue
        for key in LIMIT_FIELDS:
            value = limits.get(key)
            if value is not None and _limit_value(key, value) is None:
                out.append(diag(f"limits.{key}: {value!r} is not a positive number", key))
    return out


def build(src: GroveSource, opts: Options | None = None) -> DesiredGrove:
    """Resolve every agent of a grove; raise InvalidManifests listing all problems."""
    with bulk():
        return _Builder(src, opts or Options()).build()
