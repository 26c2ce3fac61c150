"""Shared plumbing for commands: find the repository, load groves, build desired state."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import desired, inventory, layers, manifest, paths, secrets
from engine.errors import Diagnostic, EngineError, InvalidManifests

STATE_DIR = paths.STATE_DIR
_GROVE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")


@dataclass(frozen=True)
class Repo:
    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR


def repo(inside_agent_ok: bool = False) -> Repo:
    """The repository the command works on (see `manifest.find_repo_root`). Refused
    inside an agent: in its workspace (the nearest `.git` there is the agent's own
    repository) or with ENGINE_AGENT set (the agent's environment), where the agent-side
    client is the `engine` to use; `inside_agent_ok` for read-only checks (validate, as a
    pre-commit hook of an agent's commit)."""
    cwd = Path.cwd()
    if not inside_agent_ok and (where := inside_agent(cwd)):
        raise EngineError(f"{where}; run engine from the repository root, or use the "
                          "agent-side commands: engine spawn/done/status")
    return Repo(manifest.find_repo_root(cwd))


def inside_agent(start: Path) -> str:
    """Which agent `start` (or this process's environment) belongs to, as the start of a
    sentence; "" when none."""
    agent = os.environ.get("ENGINE_AGENT", "")
    if agent:
        grove = os.environ.get("ENGINE_GROVE", "") or "?"
        return f"this runs as agent {agent} in grove {grove} (ENGINE_AGENT is set)"
    start = start.resolve()
    for d in (start, *start.parents):
        if len(d.parents) < 4 or d.parents[1].name != "worktrees" or \
                d.parents[2].name != STATE_DIR:
            continue
        from engine import workspace  # only here: validate does not pay for git

        root = d.parents[3]
        if workspace.path_for(root, d.parent.name, d.name) == d and (
                (root / ".git").exists() or (root / manifest.GROVES_DIR).is_dir()):
            return (f"this is agent {d.name}'s workspace in grove {d.parent.name} "
                    f"(repository {root})")
    return ""


def add_grove_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-g", "--grove", action="append", dest="groves", metavar="GROVE",
                   help="grove to work on (repeatable; default: every grove)")


def add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting for every agent (highest layer)")


def options(r: Repo, args: argparse.Namespace, resolve_secrets: bool = True,
            create_key: bool = False) -> desired.Options:
    return desired.Options(
        user=layers.load_user_config(), sets=layers.parse_sets(getattr(args, "set", []) or []),
        resolve_secrets=resolve_secrets,
        secret_key=secrets.repo_key(r.state_dir, create_key) if resolve_secrets else b"",
        repo_root=r.root)


def orphaned_groves(r: Repo) -> list[str]:
    """Groves whose directory is gone but whose state still records agents (they keep
    running until `engine destroy -g NAME`)."""
    state = r.state_dir / "state"
    if not state.is_dir():
        return []
    have = {d.name for d in manifest.grove_dirs(r.root)}
    out = []
    for p in sorted(state.glob("*.json")):
        if p.stem not in have and _GROVE_NAME.fullmatch(p.stem):
            try:
                if inventory.load(r.state_dir, p.stem).agents:
                    out.append(p.stem)
            except EngineError:
                out.append(p.stem)
    return out


def load(r: Repo, args: argparse.Namespace, resolve_secrets: bool = True,
         create_key: bool = False, orphans_ok: bool = False) -> list[desired.DesiredGrove]:
    """Desired state of the selected groves; all problems of all groves reported at once.
    `orphans_ok`: no grove directory at all is fine when a grove whose directory is gone
    still owns agents (the command shows them)."""
    opts = options(r, args, resolve_secrets, create_key)
    out, diags = [], []
    if orphans_ok and not getattr(args, "groves", None) and not manifest.grove_dirs(r.root) \
            and orphaned_groves(r):
        return []
    for d in manifest.select_groves(r.root, getattr(args, "groves", None)):
        try:
            out.append(desired.build(manifest.load_grove(d, r.root), opts))
        except InvalidManifests as e:
            diags.extend(e.diagnostics)
    if diags:
        raise InvalidManifests(diags)
    return out


def one_grove(r: Repo, args: argparse.Namespace, **kw: bool) -> desired.DesiredGrove:
    groves = load(r, args, **kw)
    if len(groves) != 1:
        raise EngineError("several groves here: name one with -g GROVE "
                          f"({', '.join(g.name for g in groves)})")
    return groves[0]


def find_agent(groves: list[desired.DesiredGrove], name: str
               ) -> tuple[desired.DesiredGrove, desired.DesiredAgent]:
    """An agent by `NAME` or `GROVE/NAME`, across the selected groves."""
    gname, _, aname = name.rpartition("/")
    hits = [(g, g.by_name[aname]) for g in groves
            if aname in g.by_name and (not gname or g.name == gname)]
    if not hits:
        raise EngineError(f"agent {name}: not found in "
                          f"{', '.join(g.name for g in groves) or 'any grove'}")
    if len(hits) > 1:
        raise EngineError(f"agent {name}: in several groves; say GROVE/{aname}")
    return hits[0]


def diag_lines(diags: list[Diagnostic]) -> list[str]:
    return [str(d) for d in sorted(diags)]


def add_agent_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("agent", metavar="AGENT", help="NAME or GROVE/NAME")
    add_grove_arg(p)


@dataclass(frozen=True)
class Located:
    grove: str
    agent: str
    runtime: str
    host: str
    record: Any  # inventory.Record | None


def locate(r: Repo, args: argparse.Namespace) -> Located:
    """Where an agent runs: from the inventory, else from the manifests."""
    from engine import inventory

    gname, _, aname = str(args.agent).rpartition("/")
    names = [gname] if gname else (getattr(args, "groves", None) or
                                    [d.name for d in manifest.grove_dirs(r.root)])
    hits = []
    for g in names:
        rec = inventory.load(r.state_dir, g).agents.get(aname)
        if rec is not None:
            hits.append(Located(g, aname, rec.runtime, rec.host, rec))
    if not hits:
        groves = load(r, argparse.Namespace(groves=names, set=[]), resolve_secrets=False)
        grove, a = find_agent(groves, args.agent)
        return Located(grove.name, a.name, a.runtime, a.host or "", None)
    if len(hits) > 1:
        raise EngineError(f"agent {aname}: in several groves; say GROVE/{aname}")
    return hits[0]


def review_target(r: Repo, args: argparse.Namespace) -> tuple[Located, str, str]:
    """For diff and merge: where the agent is, its branch (the agent's commits brought
    over first) and the grove's base ref ("" = the current branch, also when the manifests are
    broken, so work can still be reviewed)."""
    from engine import workspace

    loc = locate(r, args)
    branch = loc.record.branch if loc.record else paths.branch(loc.grove, loc.agent)
    if loc.record is None or loc.record.workspace != "shared":
        workspace.sync(r.root, loc.grove, loc.agent)  # the agent's commits, brought over
    try:
        base = load(r, argparse.Namespace(groves=[loc.grove], set=[]),
                    resolve_secrets=False)[0].base_ref
    except EngineError:
        base = ""
    return loc, branch, base
