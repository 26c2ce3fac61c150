#!/usr/bin/env python3
"""The agent-side `engine` client: standard library only, put on PATH inside every agent.

Run by agents (never imported by the engine). It writes requests into the agent's inbox
(`$ENGINE_INBOX`) atomically, as `req-<id>.json`, and with --wait reads the result file
`res-<id>.json` the host side (`engine watch` or the next `engine apply`) writes next to
it. Commands: spawn, message, status, done. Exit 0 on success, 1 on rejection or error,
2 on usage errors.
"""

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

API = "engine/v1alpha1"
MAX_TEXT = 64 * 1024


def _inbox() -> str:
    path = os.environ.get("ENGINE_INBOX", "")
    if not path or not os.path.isdir(path):
        sys.stderr.write("error: ENGINE_INBOX is not set or missing: run this inside an "
                         "agent started by grove-engine\n")
        sys.exit(1)
    return path


def _write(kind: str, spec: dict[str, Any]) -> tuple[str, str]:
    inbox = _inbox()
    rid = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:10]
    doc = {"apiVersion": API, "kind": kind, "id": rid,
           "from": os.environ.get("ENGINE_AGENT", ""),
           "grove": os.environ.get("ENGINE_GROVE", ""),
           "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "spec": spec}
    tmp = os.path.join(inbox, f".req-{rid}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(inbox, f"req-{rid}.json"))
    return inbox, rid


def _wait(inbox: str, rid: str, timeout: float) -> dict[str, Any]:
    path = os.path.join(inbox, f"res-{rid}.json")
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                data: dict[str, Any] = json.load(f)
                return data
        except (FileNotFoundError, ValueError):
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
    sys.stderr.write(f"error: no answer to request {rid} after {timeout:.0f}s (is "
                     "`engine watch` running for this grove?)\n")
    sys.exit(1)


def _finish(res: dict[str, Any], ok_text: str) -> int:
    if res.get("status") in ("accepted", "ok", "delivered"):
        if ok_text:
            print(ok_text.format(**res))
        return 0
    sys.stderr.write(f"error: {res.get('reason', 'rejected')}\n")
    return 1


def cmd_spawn(a: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"name": a.name, "task": a.task}
    if a.profile:
        spec["profile"] = a.profile
    if a.harness:
        spec["harness"] = a.harness
    if a.depends_on:
        spec["dependsOn"] = a.depends_on
    inbox, rid = _write("SpawnRequest", spec)
    if not a.wait:
        print(rid)
        return 0
    return _finish(_wait(inbox, rid, a.timeout), "{child}")


def cmd_message(a: argparse.Namespace) -> int:
    inbox, rid = _write("MessageRequest", {"to": a.agent, "text": a.text[:MAX_TEXT]})
    if not a.wait:
        print(rid)
        return 0
    return _finish(_wait(inbox, rid, a.timeout), "")


def cmd_status(a: argparse.Namespace) -> int:
    inbox, rid = _write("StatusRequest", {})
    res = _wait(inbox, rid, a.timeout)
    if res.get("status") != "ok":
        return _finish(res, "")
    data = res.get("data", {})
    if a.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        for ag in data.get("agents", []):
            print(f"{ag.get('name', '?'):<24} {ag.get('phase', '?'):<10} "
                  f"{ag.get('parent') or '-'}")
    return 0


def cmd_done(a: argparse.Namespace) -> int:
    _write("DoneReport", {"result": (a.result or "")[:MAX_TEXT]})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engine", description="grove-engine, inside an agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spawn", help="ask for a child agent")
    s.add_argument("name")
    s.add_argument("--task", required=True)
    s.add_argument("--profile")
    s.add_argument("--harness")
    s.add_argument("--depends-on", action="append", default=[])
    s.add_argument("--wait", action="store_true")
    s.add_argument("--timeout", type=float, default=600)
    s.set_defaults(fn=cmd_spawn)
    m = sub.add_parser("message", help="send text to another agent of the grove")
    m.add_argument("agent")
    m.add_argument("text")
    m.add_argument("--wait", action="store_true")
    m.add_argument("--timeout", type=float, default=120)
    m.set_defaults(fn=cmd_message)
    st = sub.add_parser("status", help="the grove's agents and their phases")
    st.add_argument("--json", action="store_true")
    st.add_argument("--timeout", type=float, default=60)
    st.set_defaults(fn=cmd_status)
    d = sub.add_parser("done", help="report this agent's result to its parent")
    d.add_argument("--result", default="")
    d.set_defaults(fn=cmd_done)
    a = p.parse_args(argv)
    return int(a.fn(a))


if __name__ == "__main__":
    sys.exit(main())
