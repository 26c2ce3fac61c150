"""`engine events [-g GROVE] [--kind KIND] [--json] [--follow]`: the event log for people,
oldest first; with `--follow`, new events as they are recorded.

Reads `.engine/events.jsonl` (host-written; its fields can carry agents' words, so every
human line goes through `reader.for_terminal`, and JSON lines escape everything but ASCII).
`--kind` takes an event type (`AgentEnded`) or a notification kind (`failed`,
`engine.notify.kind_of`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import events, manifest, notify, ui
from engine.commands import _common
from engine.errors import EngineError, UsageError
from engine.schema import did_you_mean
from engine.trust import reader

POLL = 0.25  # seconds between looks at the log with --follow
EVENT_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")  # AgentEnded, SpawnRequest, ...
_HEAD = ("time", "grove", "event")
Keep = Callable[[dict[str, Any]], bool]


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "events", help="print the event log",
        description="The engine's event log, oldest first: agents ending, spawns requested, "
                    "approved and rejected, notifications failing, controller passes. "
                    "--follow keeps printing new events.")
    _common.add_grove_arg(p)
    p.add_argument("--kind", action="append", default=[], metavar="KIND",
                   help="only events of this type (AgentEnded) or notification kind "
                        "(failed, needs-input, ...); repeatable")
    p.add_argument("-n", "--tail", type=int, metavar="N", help="only the last N events")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    for kind in args.kind:
        if kind not in notify.KINDS and not EVENT_TYPE.fullmatch(kind):
            raise UsageError(f"--kind {kind!r}: not a notification kind "
                             f"({', '.join(sorted(notify.KINDS))}) nor an event type "
                             "(such as AgentEnded)")
    if args.tail is not None and args.tail < 0:
        raise UsageError("--tail: give a number of events, 0 or more")
    known = {d.name for d in manifest.grove_dirs(r.root)} | set(_common.orphaned_groves(r))
    for g in args.groves or []:
        if g not in known:
            raise EngineError(f"grove {g}: not found (groves: "
                              f"{', '.join(sorted(known)) or 'none'})"
                              f"{did_you_mean(g, known)}")
    path = events.path_for(r.root)
    keep = _filter(args.groves or [], args.kind)
    found, offset = _read(path, 0)
    shown = [ev for ev in found if keep(ev)]
    if args.tail is not None:
        shown = shown[-args.tail:] if args.tail > 0 else []
    if not shown and not args.json and not args.follow:
        print("No matching events." if found else "No events recorded.")
    for ev in shown:
        _print(ev, args.json)
    if args.follow:
        _follow(path, offset, keep, args.json)
    return 0


def _filter(groves: list[str], kinds: list[str]) -> Keep:
    def keep(ev: dict[str, Any]) -> bool:
        if groves and ev.get("grove") not in groves:
            return False
        return not kinds or ev.get("event") in kinds or notify.kind_of(ev) in kinds
    return keep


def _read(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The whole events from byte `offset` on, and the offset after the last."""
    out: list[dict[str, Any]] = []
    while True:
        lines, end = notify.read_from(path, offset)
        if end == offset:
            return out, offset
        for raw in lines:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if isinstance(ev, dict):
                out.append(ev)
        offset = end


def _follow(path: Path, offset: int, keep: Keep, as_json: bool) -> None:
    sys.stdout.flush()
    while True:
        if offset > _size(path):  # the log was replaced: all of it is new
            offset = 0
        found, offset = _read(path, offset)
        for ev in found:
            if keep(ev):
                _print(ev, as_json)
        sys.stdout.flush()
        if ui.reader_gone():
            return
        time.sleep(POLL)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _print(ev: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(ev, sort_keys=True) + "\n")  # ASCII: escapes all else
        return
    sys.stdout.write(line(ev) + "\n")


def line(ev: dict[str, Any]) -> str:
    """One terminal-safe line: time, grove/agent, event, then the other fields."""
    who = ev.get("agent") or ev.get("from") or ""
    skip = {*_HEAD, "agent" if ev.get("agent") else "from"}
    where = f"{ev.get('grove', '-')}/{who}" if who else str(ev.get("grove", "-"))
    rest = " ".join(f"{k}={_value(v)}" for k, v in sorted(ev.items()) if k not in skip)
    text = f"{ev.get('time', '?')}  {where}  {ev.get('event', '?')}  {rest}"
    return reader.for_terminal(text.replace("\n", " ")).rstrip()


def _value(value: Any) -> str:
    """A field's value: bare when it is one plain word, else quoted as JSON; escape
    sequences removed first, so what an agent wrote shows as text, never as codes."""
    if isinstance(value, str):
        text = reader.for_terminal(value)
        if text and not any(c.isspace() or c in "\"'=" for c in text):
            return text
        value = text
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
