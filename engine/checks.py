"""Stage 2, grove-wide checks: what no single agent's settings can tell.

Called by `desired` while it builds a grove. Profiles against the security switches of the
user config (privileged containers, host mounts, root agents) and the fields their runtime
understands; mounts that would reach the repository's `.git` or `.engine` (never allowed);
`allowEnv` naming a credential (never allowed: templates must not see a secret); the spawn
graph for cycles (printed as the cycle) and the policy bounds. Returns diagnostics; raises
nothing.
"""

from __future__ import annotations

import graphlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine import graph, harnesses, layers, paths
from engine.errors import Diagnostic
from engine.manifest import Entry, GroveSource

_PLURAL = {"profile": "profiles", "harness": "harnesses"}
# Profile fields that only one runtime reads; elsewhere they are a mistake, not a no-op.
RUNTIME_ONLY = {
    "host": {"docker", "podman"},
    "namespace": {"kubernetes"}, "context": {"kubernetes"}, "kubeconfig": {"kubernetes"},
    "runtimeClassName": {"kubernetes"}, "serviceAccountName": {"kubernetes"},
    "nodeSelector": {"kubernetes"}, "tolerations": {"kubernetes"},
    "imagePullPolicy": {"kubernetes"}, "imagePullSecrets": {"kubernetes"},
    "persistence": {"kubernetes"},
}


def profiles(src: GroveSource, user: layers.UserConfig, repo_root: Path | None
             ) -> list[Diagnostic]:
    out = []
    root = (repo_root or Path.cwd()).resolve()
    for name, entry in sorted(src.profiles.items()):
        runtime = entry.data.get("runtime", "local")
        for key, runtimes in RUNTIME_ONLY.items():
            if key in entry.data and runtime not in runtimes:
                out.append(entry.diag(f"profile {name}: field {key!r} only applies to runtime "
                                      f"{'/'.join(sorted(runtimes))}, not {runtime}", key))
        if runtime in ("docker", "podman", "kubernetes") and entry.data.get("privileged") \
                and not user.allow_privileged:
            out.append(entry.diag(
                f"profile {name}: privileged containers are refused (set "
                f"security.allowPrivileged: true in {layers.user_config_path()} to allow)",
                "privileged"))
        out += _mounts(name, entry, user, root)
    return out


def _mounts(name: str, entry: Entry, user: layers.UserConfig, root: Path
            ) -> list[Diagnostic]:
    """A mount may never be, be inside or contain the repository's `.git` or `.engine`
    (git's internals, every agent's worktree and secrets); one outside the repository
    needs security.allowHostMounts."""
    out = []
    guarded = _guarded_dirs(root)
    for i, m in enumerate(entry.data.get("mounts") or []):
        source = m["source"]
        path = (root / Path(source).expanduser()).resolve()
        hit = next((label for label, g in guarded if path == g or path.is_relative_to(g)
                    or g.is_relative_to(path)), None)
        if hit:
            out.append(entry.diag(f"profile {name}: mount source {source} would expose the "
                                  f"repository's {hit} (a mount may not be, be inside or "
                                  "contain .git or .engine)", "mounts", i, "source"))
        elif not path.is_relative_to(root) and not user.allow_host_mounts:
            out.append(entry.diag(
                f"profile {name}: mount source {source} is outside the repository (set "
                f"security.allowHostMounts: true in {layers.user_config_path()} to allow)",
                "mounts", i, "source"))
    return out


def _guarded_dirs(root: Path) -> list[tuple[str, Path]]:
    """The repository's `.engine` and git directories: `.git`, and when `.git` is a file
    (a worktree), the directory it names and that one's common directory."""
    dot_git = root / ".git"
    out = [(".git", dot_git.resolve()), (paths.STATE_DIR, paths.state(root).resolve())]
    try:
        first = dot_git.read_text(errors="replace").splitlines()[0] if dot_git.is_file() \
            else ""
    except (OSError, IndexError):
        return out
    if first.startswith("gitdir:"):
        gitdir = (root / first.removeprefix("gitdir:").strip()).resolve()
        out.append((".git", gitdir))
        try:
            common = (gitdir / "commondir").read_text().strip()
            out.append((".git", (gitdir / common).resolve()))
        except OSError:
            pass
    return out


def is_root(user: Any) -> bool:
    """Whether a `user` setting runs the agent as uid 0 (`0`, `"0:0"`, `"00:5"`, `root`)."""
    if user is None or isinstance(user, bool):
        return False
    uid = str(user).partition(":")[0].strip()
    return uid == "root" or (uid.isdigit() and int(uid) == 0)


def root_users(src: GroveSource, user: layers.UserConfig, sets: Mapping[str, Any]
               ) -> list[Diagnostic]:
    """Agents running as root need security.allowRootAgents: true in the user config
    (only there: a manifest can never allow itself root)."""
    if user.allow_root_agents:
        return []
    how = f"(set security.allowRootAgents: true in {layers.user_config_path()} to allow)"
    out = [e.diag(f"profile {n}: user {e.data['user']} runs agents as root, refused {how}",
                  "user") for n, e in sorted(src.profiles.items()) if is_root(e.data.get("user"))]
    if is_root(user.defaults.data.get("user")):
        out.append(user.defaults.diag(("user",), f"user config: defaults.user "
                                                 f"{user.defaults.data['user']} runs agents as "
                                                 f"root, refused {how}"))
    if is_root(sets.get("user")):
        out.append(Diagnostic("--set", 0, 0, f"user={sets['user']} runs agents as root, "
                                             f"refused {how}"))
    return out


def allow_env(src: GroveSource, user: layers.UserConfig, sets: Mapping[str, Any]
              ) -> list[Diagnostic]:
    """`allowEnv` lets templates read the engine's environment (and so put it into the
    agent's command, env and the state file): it may never name a credential's source
    variable, a credential's name or a variable a harness authenticates with."""
    secret = _secret_names(src, user, sets)
    out = []
    for name, entry in sorted(src.profiles.items()):
        for i, var in enumerate(entry.data.get("allowEnv") or []):
            if var in secret:
                out.append(entry.diag(f"profile {name}: allowEnv names {var}, {secret[var]} "
                                      "(templates may never read a secret)", "allowEnv", i))
    for i, var in enumerate(user.defaults.data.get("allowEnv") or []):
        if var in secret:
            out.append(user.defaults.diag(("allowEnv", i), f"user config: defaults.allowEnv "
                                                           f"names {var}, {secret[var]}"))
    out += [Diagnostic("--set", 0, 0, f"allowEnv names {var}, {secret[var]}")
            for var in sets.get("allowEnv") or [] if var in secret]
    return out


def _secret_names(src: GroveSource, user: layers.UserConfig, sets: Mapping[str, Any]
                  ) -> dict[str, str]:
    """Environment variable name -> what makes it secret."""
    out: dict[str, str] = {}
    layers_ = [(f"profile {n}", e.data) for n, e in sorted(src.profiles.items())]
    for owner, data in [*layers_, ("the user config", user.defaults.data), ("--set", sets)]:
        for cname, ref in sorted((data.get("credentials") or {}).items()):
            if isinstance(ref, dict) and isinstance(ref.get("fromEnv"), str):
                out.setdefault(ref["fromEnv"], f"the source of credential {cname} of {owner}")
            out.setdefault(cname, f"credential {cname} of {owner}")
    auth = [(n, e.data.get("auth")) for n, e in sorted(src.harnesses.items())]
    auth += [(n, (harnesses.spec(n) or {}).get("auth")) for n in harnesses.names()]
    for hname, methods in auth:
        for m in methods or []:
            for var in [*m.get("env", []), *(f["credential"] for f in m.get("files", []))]:
                out.setdefault(var, f"a credential harness {hname} authenticates with")
    return out


def references(src: GroveSource, builtin_harnesses: list[str]) -> list[Diagnostic]:
    """Names that must exist even when no agent uses them yet: the grove's default profile
    and harness, and what profiles let children use (the spawn policy reads them)."""
    profiles = sorted(set(src.profiles) | {"local"})
    harnesses = sorted(set(src.harnesses) | set(builtin_harnesses))
    out = []
    defaults = src.spec.get("defaults") or {}
    for key, known in (("profile", profiles), ("harness", harnesses)):
        if key in defaults and defaults[key] not in known:
            out.append(src.grove.diag(f"grove {src.name}: spec.defaults.{key}: unknown {key} "
                                      f"{defaults[key]!r} ({_PLURAL[key]}: {', '.join(known)})",
                                      "spec", "defaults", key))
    for name, entry in sorted(src.profiles.items()):
        spawn = entry.data.get("spawn") or {}
        for key, kind, known in (("allowProfiles", "profile", profiles),
                                 ("allowHarnesses", "harness", harnesses)):
            for i, ref in enumerate(spawn.get(key) or []):
                if ref not in known:
                    out.append(entry.diag(f"profile {name}: spawn.{key} names unknown {kind} "
                                          f"{ref!r} ({_PLURAL[kind]}: {', '.join(known)})",
                                          "spawn", key, i))
    return out


def graph_problems(src: GroveSource, parents: Mapping[str, str | None], max_agents: int,
                   max_depth: int, max_children: int) -> list[Diagnostic]:
    out = []
    waits = {n: [*(e.data.get("dependsOn") or []), *([p] if (p := parents[n]) else [])]
             for n, e in src.agents.items()}
    ts: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for n in sorted(waits):  # sorted in, so the same grove always reports the same cycle
        ts.add(n, *sorted({w for w in waits[n] if w in waits}))
    cycle: list[str] = []
    try:
        ts.prepare()
    except graphlib.CycleError as e:  # args[1]: [x, ..., x], each waited for by the next
        ring = e.args[1][-2::-1]  # so that each waits for the next, as the message says
        i = ring.index(min(ring))
        cycle = [*ring[i:], *ring[:i], ring[i]]
    if cycle:
        first = src.agents[cycle[0]]
        key = "dependsOn" if cycle[1] in (first.data.get("dependsOn") or []) else "spawnedBy"
        out.append(first.diag(f"agent {first.name}: dependency cycle: " + " -> ".join(cycle)
                              + " (each waits for the next)", key))
    if len(src.agents) > max_agents:
        out.append(src.grove.diag(f"grove {src.name}: {len(src.agents)} agents, over "
                                  f"policy.maxAgents {max_agents}", "spec", "policy"))
    children: dict[str, int] = {}
    for name, parent in sorted(parents.items()):
        if not parent:
            continue
        children[parent] = children.get(parent, 0) + 1
        entry = src.agents[name]
        if children[parent] == max_children + 1:
            out.append(entry.diag(f"agent {name}: parent {parent} has more than "
                                  f"policy.maxChildren {max_children} children", "spawnedBy"))
        depth = graph.depth_of(parents, name)
        if not cycle and depth > max_depth:
            out.append(entry.diag(f"agent {name}: spawn depth {depth} is over policy.maxDepth "
                                  f"{max_depth}", "spawnedBy"))
    return out


# -- spec.notify ------------------------------------------------------------------------

NOTIFY_TIMEOUT_MAX = 60  # seconds: one webhook attempt or one command run
_CHANNEL_TYPES = ("webhook", "command", "stream")
_NOTIFY_DIR = "notify"  # .engine/notify/...: where relative stream files may also live
_ENGINE_FILES = frozenset({"events.jsonl", "secret-key"})


def stream_path_problem(path: str) -> str:
    """Why a stream channel may not append to `path` ("" when it may): a relative path
    must be a file directly in `.engine/` (not one the engine keeps) or under
    `.engine/notify/`, never in a directory agents write to; absolute paths are the
    user's choice."""
    p = Path(path)
    if p.is_absolute():
        return ""
    parts = p.parts
    if ".." in parts or not parts or parts[0] != paths.STATE_DIR or len(parts) < 2:
        return f"a relative path must stay inside {paths.STATE_DIR}/ (or be absolute)"
    if len(parts) == 2 and (parts[1] in _ENGINE_FILES or parts[1].startswith(".")):
        return f"{paths.STATE_DIR}/{parts[1]} is the engine's own file"
    if len(parts) > 2 and parts[1] != _NOTIFY_DIR:
        return (f"a relative path must be a file directly in {paths.STATE_DIR}/ or under "
                f"{paths.STATE_DIR}/{_NOTIFY_DIR}/ (not in a directory agents write to)")
    return ""


def _timeout_problem(value: Any) -> str:
    seconds = value if isinstance(value, int) else \
        int(str(value)[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[str(value)[-1]]
    if seconds <= 0:
        return f"timeout {value} is not positive"
    if seconds > NOTIFY_TIMEOUT_MAX:
        return f"timeout {value} is over {NOTIFY_TIMEOUT_MAX}s"
    return ""


def notify(src: GroveSource) -> list[Diagnostic]:
    """spec.notify: each channel is one of webhook, command or stream; timeouts are
    positive and bounded; stream files stay out of the engine's and agents' files; every
    route names channels that exist. (Kinds, formats and retries the schema checks.)"""
    spec = src.spec.get("notify") or {}
    at = ("spec", "notify")
    out = []
    channels = spec.get("channels") or {}
    for name, ch in sorted(channels.items()):
        where = (*at, "channels", name)
        said = f"grove {src.name}: spec.notify.channels.{name}"
        kinds = [k for k in _CHANNEL_TYPES if k in ch]
        if len(kinds) != 1:
            out.append(src.grove.diag(f"{said}: needs exactly one of webhook, command or "
                                      f"stream (has {', '.join(kinds) or 'none'})", *where))
        if "timeout" in ch and "command" not in ch:
            out.append(src.grove.diag(f"{said}: timeout applies to command channels only "
                                      "(a webhook's goes inside webhook:)", *where, "timeout"))
        for sub, value in (((), ch.get("timeout")),
                           (("webhook",), (ch.get("webhook") or {}).get("timeout"))):
            if value is not None and (why := _timeout_problem(value)):
                out.append(src.grove.diag(f"{said}: {why}", *where, *sub, "timeout"))
        program = (ch.get("command") or [""])[0] if isinstance(ch.get("command"), list) \
            else ""
        inside = program.startswith("/") and Path(os.path.normpath(program)).is_relative_to(
            src.directory.parent.parent)
        if program and "/" in program and (not program.startswith("/") or inside):
            # a script in the checkout is a file agents can write: it would run as the
            # engine's user. A program on PATH, or a path outside, is not theirs
            out.append(src.grove.diag(f"{said}: command {program!r}: a path in the "
                                      "repository (a file agents can write) is refused; "
                                      "name a program on PATH or an absolute path outside "
                                      "the repository", *where, "command", 0))
        if "stream" in ch and (why := stream_path_problem(ch["stream"]["path"])):
            out.append(src.grove.diag(f"{said}: stream path {ch['stream']['path']}: {why}",
                                      *where, "stream", "path"))
    known = ", ".join(sorted(channels)) or "none"
    for i, route in enumerate(spec.get("routes") or []):
        for j, target in enumerate(route.get("to") or []):
            if target not in channels:
                out.append(src.grove.diag(f"grove {src.name}: spec.notify.routes[{i}].to: "
                                          f"unknown channel {target!r} (channels: {known})",
                                          *at, "routes", i, "to", j))
    return out
