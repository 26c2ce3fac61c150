"""Which profile settings each runtime honours: one table, read by `engine explain` (which
marks a setting the agent's runtime ignores) and rendered into docs/runtimes.md.

Data only: no runtime module is imported. Settings missing from the table (task, env,
credentials, maxDuration, restart, workspace ...) apply on every runtime; fields that only
one runtime reads (host, namespace ...) are refused elsewhere by validation
(`checks.RUNTIME_ONLY`), so they never reach an agent of another runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

RUNTIMES = ("local", "docker", "podman", "kubernetes")
ROOT_ONLY = "only when the engine runs as root"
NO_CONTAINER = "it runs no container"
ENFORCED_POLICY = "only where the cluster's network plugin enforces NetworkPolicy"


@dataclass(frozen=True)
class Use:
    """How a runtime applies a setting: `how` (for the docs), for the `values` listed
    (None: any value; any other is ignored because `otherwise`), and `only` a condition
    outside the manifests that it depends on (for the values `only_for`, None: all)."""

    how: str
    values: tuple[str, ...] | None = None
    otherwise: str = ""
    only: str = ""
    only_for: tuple[str, ...] | None = None


# setting (dotted, as `engine explain` shows it) -> runtime -> a Use, or why it is ignored
HONOURED: dict[str, dict[str, Use | str]] = {
    "image": {"local": NO_CONTAINER, "docker": Use("the container's image"),
              "kubernetes": Use("the container's image")},
    "user": {"local": Use("the harness runs as this uid, through setpriv", only=ROOT_ONLY),
             "docker": Use("`--user uid:gid`"),
             "kubernetes": Use("runAsUser, runAsGroup, fsGroup")},
    "access": {"local": Use("read-only: the workspace is not granted to the agent's uid",
                            only=ROOT_ONLY, only_for=("read-only",)),
               "docker": Use("read-only: the workspace is mounted read-only"),
               "kubernetes": Use("read-only: `/workspace` is mounted read-only")},
    "network": {"local": Use("`egress`: a network namespace of its own, through the gateway",
                             values=("egress",),
                             otherwise="the agent shares this machine's network"),
                "docker": Use("`--network` (`none`, `egress`, `host` or a named network)"),
                "kubernetes": Use("`none`, `egress`: a NetworkPolicy",
                                  values=("none", "egress"),
                                  otherwise="the Pod is on the cluster's Pod network",
                                  only=ENFORCED_POLICY)},
    "resources.cpus": {"local": "not enforced", "docker": Use("`--cpus`"),
                       "kubernetes": Use("cpu request and limit")},
    "resources.memory": {"local": "not enforced",
                         "docker": Use("`--memory`, no swap"),
                         "kubernetes": Use("memory request and limit")},
    "resources.pids": {"local": "not enforced", "docker": Use("`--pids-limit`"),
                       "kubernetes": "no per-Pod field; the kubelet's --pod-max-pids "
                                     "bounds it"},
    "resources.disk": {"local": "not enforced",
                       "docker": "not enforced (`--storage-opt size=` works only on some "
                                 "storage drivers)",
                       "kubernetes": Use("ephemeral-storage request and limit; the emptyDir "
                                         "workspace's sizeLimit")},
    "readOnlyRoot": {"local": NO_CONTAINER, "docker": Use("`--read-only`"),
                     "podman": Use("`--read-only`, with /run and /var/tmp read-only copies "
                                   "of the image's (Podman's own are writable tmpfs)"),
                     "kubernetes": Use("readOnlyRootFilesystem")},
    "privileged": {"local": NO_CONTAINER, "docker": Use("`--privileged`"),
                   "kubernetes": Use("a privileged container")},
    "mounts": {"local": "the agent sees this machine's files as they are",
               "docker": Use("bind mounts"),
               "kubernetes": "host paths do not exist on cluster nodes; a profile "
                                 "with mounts is refused"},
}

# Podman runs the Docker runtime's container spec through its Docker-compatible API: every
# setting is applied as on Docker, unless a row says otherwise.
for _row in HONOURED.values():
    _row.setdefault("podman", _row["docker"])


def _entry(runtime: str, key: str) -> Use | str | None:
    row = HONOURED.get(key)
    return None if row is None else row.get(runtime)


def ignored(runtime: str, key: str, value: Any) -> str | None:
    """Why `runtime` ignores setting `key` set to `value`; None when it applies (or when
    there is nothing set to apply)."""
    entry = _entry(runtime, key)
    if entry is None or value is None or value == [] or value == {}:
        return None
    if isinstance(entry, str):
        return entry
    if entry.values is not None and str(value) not in entry.values:
        return entry.otherwise
    if entry.only == ROOT_ONLY and (entry.only_for is None or str(value) in entry.only_for) \
            and os.geteuid() != 0:
        return f"not enforced: {ROOT_ONLY}, and this engine is not"
    return None


def condition(runtime: str, key: str, value: Any) -> str | None:
    """The condition outside the manifests under which `runtime` applies `key`, if any."""
    entry = _entry(runtime, key)
    if not isinstance(entry, Use) or not entry.only or ignored(runtime, key, value):
        return None
    if entry.only_for is not None and str(value) not in entry.only_for:
        return None
    return entry.only


def markdown() -> str:
    """The table of docs/runtimes.md ("What each runtime honours")."""
    lines = [f"| setting | {' | '.join(RUNTIMES)} |", "|---" * (len(RUNTIMES) + 1) + "|"]
    for key, row in HONOURED.items():
        cells = []
        for rt in RUNTIMES:
            entry = row[rt]
            if isinstance(entry, str):
                cells.append(f"ignored: {entry}")
                continue
            text = entry.how
            if entry.values is not None:
                text += f"; other values ignored: {entry.otherwise}"
            if entry.only:
                text += f" ({entry.only})"
            cells.append(text)
        lines.append(f"| `{key}` | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
