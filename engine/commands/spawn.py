"""`engine spawn NAME --task T` from outside an agent: add an agent to the grove's
engine-owned `spawned.yaml` (inside an agent, the agent-side client handles `spawn`)."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

from engine import desired, inbox, inventory, manifest, policy, ui, writeback
from engine.commands import _common
from engine.errors import EngineError, InvalidManifests
from engine.inbox import NAME


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "spawn", help="add an agent (written to groves/<grove>/spawned.yaml)")
    p.add_argument("name", metavar="NAME", help="the new agent's name (lower-case letters, "
                   "digits and '-', at most 40 characters)")
    p.add_argument("--task", required=True, help="what the agent is to do (its task text)")
    p.add_argument("--profile", help="profile to run it with (default: the grove's)")
    p.add_argument("--harness", help="harness to run it with (default: the grove's)")
    p.add_argument("--parent", help="spawn as a child of this agent: the parent's spawn "
                   "policy applies, as for a request from inside it")
    p.add_argument("--depends-on", action="append", default=[], metavar="AGENT",
                   help="start it only after AGENT has succeeded (repeatable)")
    p.add_argument("--commit", action="store_true", help="commit spawned.yaml with trailers")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    grove = _common.one_grove(r, args, resolve_secrets=False)
    if not NAME.fullmatch(args.name):
        raise EngineError(f"agent name {args.name!r} is not valid (lower-case letters, "
                          "digits and '-', at most 40 characters)")
    if args.name in grove.by_name:
        raise EngineError(f"agent {grove.name}/{args.name} already exists")
    rid = f"cli-{uuid.uuid4().hex[:12]}"
    opts = _common.options(r, args, resolve_secrets=False)
    if args.parent:
        # a child named on the command line passes the same gate as one an agent asks for
        spec = {"name": args.name, "task": args.task, "profile": args.profile,
                "harness": args.harness, "dependsOn": args.depends_on}
        req = inbox.Request(args.parent, Path(), rid, "SpawnRequest",
                            {k: v for k, v in spec.items() if v})
        try:
            spawn = policy.Gate(r.root, grove, opts).check(req)
        except EngineError as e:
            raise EngineError(f"agent {grove.name}/{args.name}: refused: {e.summary}") from None
    else:
        spawn = writeback.Spawn(args.name, args.task, "", rid, inventory.now(),
                                args.profile or "", args.harness or "",
                                tuple(args.depends_on))
    # check the grove as it would be with the new agent before writing anything
    src = manifest.load_grove(grove.directory, r.root)
    doc = spawn.document()
    src.agents[spawn.name] = manifest.Entry(spawn.name, doc["spec"], src.grove.doc, ("spec",))
    try:
        desired.build(src, opts)
    except InvalidManifests as e:
        raise EngineError(f"agent {grove.name}/{args.name}: "
                          f"{e.diagnostics[0].message}") from None
    commit = args.commit or grove.commit_spawns
    note = writeback.append(r.root, grove.name, [spawn], commit)
    ui.out(f"added {grove.name}/{args.name} to {writeback.spawned_path(r.root, grove.name)}"
           f"{' (committed)' if commit and not note else ''}; "
           "run engine apply (or engine watch) to start it")
    return 0
