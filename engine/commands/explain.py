"""`engine explain AGENT`: the resolved settings of an agent, each with its source, and
marked where the agent's runtime ignores it (engine.runtimes.honoured)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from engine import manifest, resolve, ui
from engine.commands import _common
from engine.runtimes import honoured


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "explain", help="show an agent's resolved settings and where each came from")
    p.add_argument("agent", metavar="AGENT", help="NAME or GROVE/NAME")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("--json", action="store_true",
                   help="print the resolved spec and each value's source as JSON")
    return p


def _flatten(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(data, dict) and data:
        out = []
        for k in sorted(data):
            out.extend(_flatten(data[k], (*prefix, k)))
        return out
    return [(prefix, data)]


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if "/" in args.agent and not args.groves:  # GROVE/NAME: only that grove need be valid
        args.groves = [args.agent.split("/", 1)[0]]
    groves = _common.load(r, args, resolve_secrets=False)
    grove, agent = _common.find_agent(groves, args.agent)
    src = manifest.load_grove(grove.directory, r.root)
    opts = _common.options(r, args, resolve_secrets=False)
    _, prov = resolve.resolve(src, agent.name, opts, provenance=True)
    settings = agent.settings_map()
    rows = []
    for key, value in _flatten(settings):
        source = prov.get(key) or next((prov[key[:i]] for i in range(len(key), 0, -1)
                                        if key[:i] in prov), "rendered")
        dotted = ".".join(key)
        rows.append({"key": dotted, "value": value, "source": source,
                     "ignored": honoured.ignored(agent.runtime, dotted, value),
                     "only": honoured.condition(agent.runtime, dotted, value)})
    if args.json:
        ui.print_json({"grove": grove.name, "agent": agent.name, "specHash": agent.spec_hash,
                       "settings": settings,
                       "sources": {r["key"]: r["source"] for r in rows},
                       "ignored": {r["key"]: r["ignored"] for r in rows if r["ignored"]},
                       "appliesOnly": {r["key"]: r["only"] for r in rows if r["only"]}})
        return 0
    ui.out(f"agent {grove.name}/{agent.name}  (spec {agent.spec_hash}, defined at "
           f"{agent.source})")
    width = max((len(r["key"]) for r in rows), default=10)
    for row in rows:
        value = json.dumps(row["value"], ensure_ascii=False)
        if len(value) > 70:
            value = value[:67] + "..."
        note = (f"(ignored by the {agent.runtime} runtime: {row['ignored']})  "
                if row["ignored"] else
                f"({agent.runtime} runtime: {row['only']})  " if row["only"] else "")
        ui.out(f"  {row['key']:<{width}}  {value:<40}  {note}# {row['source']}")
    return 0
