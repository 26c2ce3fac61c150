"""`engine egress [AGENT]`: the egress gateway's record of every connection an agent opened
(or tried to), allowed or refused: when, where to, how many bytes each way, how long.

Reads the gateway's log (`engine.egress.read_log`); the same records are in the event
stream as `Egress` events. Targets are what the agent asked for, printed terminal-safe.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine import egress, ui
from engine.commands import _common
from engine.trust import reader


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "egress", help="show the connections agents made through the egress gateway",
        description="Every connection an agent with network: egress opened through the "
                    "engine's gateway, allowed or refused, oldest first.")
    p.add_argument("agent", metavar="AGENT", nargs="?",
                   help="NAME or GROVE/NAME (default: every agent of the selected groves)")
    _common.add_grove_arg(p)
    p.add_argument("--refused", action="store_true", help="only refused connections")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N records")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    grove, agent = None, None
    if args.agent:
        loc = _common.locate(r, args)
        grove, agent = loc.grove, loc.agent
    records = [rec for rec in egress.read_log(r.root, grove, agent)
               if (grove or not args.groves or rec.get("grove") in args.groves)
               and (not args.refused or rec.get("verdict") == "refused")]
    if args.tail is not None:
        records = records[-args.tail:] if args.tail > 0 else []
    if args.json:
        ui.print_json({"apiVersion": "engine/v1alpha1", "kind": "EgressLog",
                       "records": records})
        return 0
    if not records:
        print("No connections recorded.")
        return 0
    rows = [[_s(rec.get("time")), f"{_s(rec.get('grove'))}/{_s(rec.get('agent'))}",
             _s(rec.get("method")), _s(rec.get("target")), _size(rec.get("bytesUp")),
             _size(rec.get("bytesDown")), f"{_num(rec.get('durationMs'))} ms",
             _verdict(rec)] for rec in records]
    head = ["TIME", "AGENT", "METHOD", "TARGET", "UP", "DOWN", "DURATION", "VERDICT"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for row in [head, *rows]:
        ui.out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _s(value: Any) -> str:
    return reader.one_line(reader.for_terminal(str(value if value is not None else "")))


def _verdict(rec: dict[str, Any]) -> str:
    if rec.get("verdict") == "allowed":
        return "allowed"
    reason = _s(rec.get("reason"))
    return f"refused ({reason})" if reason else "refused"


def _num(value: Any) -> str:
    return str(value) if isinstance(value, int | float) else "?"


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return "?"
    if value < 1024:
        return f"{value} B"
    return f"{value / 1024:.1f} KiB" if value < 1 << 20 else f"{value / (1 << 20):.1f} MiB"
