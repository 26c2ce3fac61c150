"""Stage 2, grove-wide checks: what no single agent's settings can tell.

Called by `desired` while it builds a grove. Profiles against the security switches of the
user config (privileged containers, host mounts) and the fields their runtime understands;
the spawn graph for cycles (printed as the cycle) and the policy bounds. Returns
diagnostics; raises nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from engine import graph, layers
from engine.errors import Diagnostic
from engine.manifest import GroveSource

_PLURAL = {"profile": "profiles", "harness": "harnesses"}
# Profile fields that only one runtime reads; elsewhere they are a mistake, not a no-op.
RUNTIME_ONLY = {
    "host": {"docker"},
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
        if runtime in ("docker", "kubernetes") and entry.data.get("privileged") \
                and not user.allow_privileged:
            out.append(entry.diag(
                f"profile {name}: privileged containers are refused (set "
                f"security.allowPrivileged: true in {layers.user_config_path()} to allow)",
                "privileged"))
        for i, m in enumerate(entry.data.get("mounts") or []):
            source = m["source"]
            path = (root / Path(source).expanduser()).resolve()
            if not path.is_relative_to(root) and not user.allow_host_mounts:
                out.append(entry.diag(
                    f"profile {name}: mount source {source} is outside the repository (set "
                    f"security.allowHostMounts: true in {layers.user_config_path()} to allow)",
                    "mounts", i, "source"))
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
    cycle = graph.wait_cycle(waits)
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
