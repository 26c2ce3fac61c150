"""Shared plumbing for commands: find the repository, load groves, build desired state."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import desired, inventory, layers, manifest, paths, secrets
from engine.errors import Diagnostic, EngineError, InvalidManifests
from engine.schema import did_you_mean

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
    """An agent by `NAME` or `GROVE/NAME`, across the selected groves (`pick_agent`)."""
    by = {g.name: g for g in groves}
    gname, aname = pick_agent(name, {g.name: g.by_name for g in groves})
    return by[gname], by[gname].by_name[aname]


def pick_agent(ref: str, known: Mapping[str, Collection[str]],
               missing: str = "not found in") -> tuple[str, str]:
    """(grove, name) of the agent AGENT names, every command's one resolver. `known`:
    grove -> the names of its agents there are (the groves -g selected, or all of them).
    `GROVE/NAME` is looked up in that grove only; `NAME` in every grove of `known`, and
    must be in exactly one. Unknown: `agent REF: <missing> GROVES` and the closest name
    of those groves (as GROVE/NAME when several were searched); in several groves: the
    candidates, as GROVE/NAME."""
    gname, _, aname = ref.rpartition("/")
    if gname and gname not in known:
        raise EngineError(f"grove {gname!r} not found (groves: "
                          f"{', '.join(sorted(known)) or 'none'})"
                          f"{did_you_mean(gname, known)}")
    looked = [gname] if gname else sorted(known)
    hits = [g for g in looked if aname in known[g]]
    if len(hits) > 1:
        raise EngineError(f"agent {aname}: in several groves "
                          f"({', '.join(f'{g}/{aname}' for g in hits)}); say GROVE/{aname}")
    if not hits:
        if len(looked) == 1:
            hint = did_you_mean(aname, known[looked[0]])
        else:
            hint = did_you_mean(aname, {n for g in looked for n in known[g]})
            if hint:  # the name as it is in its grove(s), never as if in another
                near = hint[len(" (did you mean '"):-len("'?)")]
                owners = [f"{g}/{near}" for g in looked if near in known[g]]
                hint = f" (did you mean {' or '.join(map(repr, owners))}?)"
        raise EngineError(f"agent {ref}: {missing} {', '.join(looked) or 'any grove'}{hint}")
    return hits[0], aname


def all_groves(r: Repo) -> list[str]:
    """Every grove with a directory, and every grove whose directory is gone but whose
    state still records agents."""
    return sorted({d.name for d in manifest.grove_dirs(r.root)} | set(orphaned_groves(r)))


def agent_names(r: Repo, groves: list[str] | None, archived: bool = False
                ) -> dict[str, set[str]]:
    """Grove -> every agent of it there is: in its manifests (none counted for a grove whose
    manifests do not load), in its inventory, and with `archived`, those with archived work
    (agents removed long ago). `groves` (from -g): those only, each one known somewhere."""
    from engine import archive

    names: dict[str, set[str]] = {g: set() for g in all_groves(r)}
    for d in manifest.grove_dirs(r.root):
        with contextlib.suppress(EngineError):
            names[d.name] |= set(manifest.load_grove(d, r.root).agents)
    for g in list(names):
        names[g] |= set(inventory.load(r.state_dir, g).agents)
    if archived:
        for a in archive.listing(r.root):
            names.setdefault(a.grove, set()).add(a.agent)
    for g in groves or []:
        if g not in names:
            raise EngineError(f"grove {g!r} not found (groves: "
                              f"{', '.join(sorted(names)) or 'none'}){did_you_mean(g, names)}")
    return {g: names[g] for g in groves} if groves else names


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
    """Where an agent runs: from the inventory (of the groves -g selects, else of every
    grove, including one whose directory is gone), else from the manifests."""
    ref = str(args.agent)
    gname, _, aname = ref.rpartition("/")
    dirs = {d.name for d in manifest.grove_dirs(r.root)}
    names = [gname] if gname else (getattr(args, "groves", None) or all_groves(r))
    invs = {g: inventory.load(r.state_dir, g) for g in names if _GROVE_NAME.fullmatch(g)}
    recorded = {g: set(inv.agents) for g, inv in invs.items() if g in dirs or inv.agents}
    if any(aname in agents for agents in recorded.values()):
        if not gname:  # a grove that declares NAME but has not run it makes NAME ambiguous
            for d in manifest.grove_dirs(r.root):  # too, as for every other command
                if d.name in names and aname not in recorded.get(d.name, ()):
                    with contextlib.suppress(EngineError):
                        if aname in manifest.load_grove(d, r.root).agents:
                            recorded[d.name] = {*recorded.get(d.name, ()), aname}
        g, a = pick_agent(ref, recorded)
        rec = invs[g].agents[a]
        return Located(g, a, rec.runtime, rec.host, rec)
    wanted = [g for g in names if g in dirs or g not in recorded]  # unknown ones: an error
    groves = load(r, argparse.Namespace(groves=wanted or None, set=[]),
                  resolve_secrets=False) if wanted or not names else []
    known = {**recorded, **{g.name: set(g.by_name) | recorded.get(g.name, set())
                            for g in groves}}
    g, a = pick_agent(ref, known)
    spec = next(x for x in groves if x.name == g).by_name[a]
    return Located(g, a, spec.runtime, spec.host or "", None)


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
