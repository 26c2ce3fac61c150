#!/usr/bin/env python3
"""The agent-side `engine` client: standard library only, put on PATH inside every agent.

Run by agents (never imported by the engine). It writes requests into the agent's inbox
(`$ENGINE_INBOX`) atomically, as `req-<id>.json`, and with --wait reads the result file
`res-<id>.json` the host side (`engine watch` or the next `engine apply`) writes next to
it. Commands: spawn, message, status, done. Exit 0 on success, 1 on rejection or error,
2 on usage errors.

`adapt NAME -- ARGV` runs the harness program (the engine puts it in front of a harness's
command when the harness names an adapter) and `hook NAME` is what the program's own hooks
call: together they relay what the program says about itself, in its machine-readable form,
as `AgentReport` requests: tokens, cost and turns, and whether it waits for a person
("needs input", with its message). The engine treats these reports as the agent's word.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import uuid
from typing import IO, Any

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
    # ids sort in the order requests were made (reports are taken in that order)
    rid = f"{time.strftime('%Y%m%dT%H%M%S')}.{time.time_ns() % 10**9:09d}-{uuid.uuid4().hex[:10]}"
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
            waits = [c.get("message", "") for c in ag.get("conditions") or []
                     if isinstance(c, dict) and c.get("type") == "WaitingForInput"]
            print(f"{ag.get('name', '?'):<24} {ag.get('phase', '?'):<10} "
                  f"{ag.get('parent') or '-'}"
                  + (f"  (needs input: {waits[0]})" if waits else ""))
    return 0


def cmd_done(a: argparse.Namespace) -> int:
    _write("DoneReport", {"result": (a.result or "")[:MAX_TEXT]})
    return 0


# --- adapters and hooks: what the harness says about itself -----------------------------

REPORT_EVERY = 5.0  # seconds between mid-run usage reports (the last one is always sent)


def _report(state: str | None = None, message: str = "",
            usage: dict[str, Any] | None = None) -> None:
    """An AgentReport into the inbox; silently nothing outside an agent (a hook run by
    hand) so a harness never fails because of its hooks."""
    path = os.environ.get("ENGINE_INBOX", "")
    if not path or not os.path.isdir(path):
        return
    spec: dict[str, Any] = {}
    if state:
        spec["state"] = state
        spec["message"] = message[:2000]
    if usage:
        spec["usage"] = usage
    if spec:
        _write("AgentReport", spec)


def _json_lines(stream: IO[str]) -> Any:
    for line in stream:
        try:
            yield line, json.loads(line)
        except ValueError:
            yield line, None


def _say(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


class _Throttle:
    def __init__(self) -> None:
        self.last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= REPORT_EVERY:
            self.last = now
            return True
        return False


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _num(v: Any) -> int:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0


def _claude_stream(stream: IO[str]) -> None:
    """Claude Code `-p --output-format stream-json --verbose`: text out, usage relayed
    (per message while it runs, the result's totals and total_cost_usd at the end)."""
    seen: dict[str, tuple[int, int]] = {}
    throttle = _Throttle()
    for line, ev in _json_lines(stream):
        if not isinstance(ev, dict):
            _say(line)
            continue
        kind = ev.get("type")
        msg = _obj(ev.get("message"))
        if kind == "assistant":
            for block in msg.get("content") or []:
                if block.get("type") == "text":
                    _say(str(block.get("text", "")))
                elif block.get("type") == "tool_use":
                    inp = block.get("input") or {}
                    _say(f"● {block.get('name')}({inp.get('command') or json.dumps(inp)})")
            u = msg.get("usage") or {}
            seen[str(msg.get("id"))] = (
                _num(u.get("input_tokens")) + _num(u.get("cache_creation_input_tokens"))
                + _num(u.get("cache_read_input_tokens")), _num(u.get("output_tokens")))
            if throttle.due():
                _report(usage={"inputTokens": sum(i for i, _ in seen.values()),
                               "outputTokens": sum(o for _, o in seen.values()),
                               "turns": len(seen)})
        elif kind == "user":
            for block in msg.get("content") or []:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    out = block.get("content")
                    text = out if isinstance(out, str) else json.dumps(out)
                    _say("  ⎿ " + "\n    ".join(text.splitlines()[:5]))
        elif kind == "result":
            u = ev.get("usage") or {}
            usage = {"inputTokens": _num(u.get("input_tokens"))
                     + _num(u.get("cache_creation_input_tokens"))
                     + _num(u.get("cache_read_input_tokens")),
                     "outputTokens": _num(u.get("output_tokens")),
                     "turns": _num(ev.get("num_turns"))}
            if isinstance(ev.get("total_cost_usd"), int | float):
                usage["costUSD"] = ev["total_cost_usd"]
            _report(usage=usage)
            if ev.get("is_error"):
                _say(f"error: {ev.get('result') or ev.get('subtype')}")


def _codex_json(stream: IO[str]) -> None:
    """`codex exec --json`: items as text; turn.completed's usage is the thread's total
    so far (a resumed run's includes the runs before it), reported as it is."""
    total = {"inputTokens": 0, "outputTokens": 0, "turns": 0}
    for line, ev in _json_lines(stream):
        if not isinstance(ev, dict):
            _say(line)
            continue
        kind = ev.get("type")
        item = _obj(ev.get("item"))
        if kind == "item.completed":
            if item.get("type") == "agent_message":
                _say(str(item.get("text", "")))
            elif item.get("type") == "command_execution":
                _say(f"● {item.get('command')}")
                out = str(item.get("aggregated_output") or "")
                if out:
                    _say("  ⎿ " + "\n    ".join(out.splitlines()[:5]))
        elif kind == "turn.completed":
            u = _obj(ev.get("usage"))
            total["inputTokens"] = _num(u.get("input_tokens"))
            total["outputTokens"] = _num(u.get("output_tokens")) \
                + _num(u.get("reasoning_output_tokens"))
            total["turns"] += 1
            _report(usage=dict(total))
        elif kind in ("turn.failed", "error"):
            err = _obj(ev.get("error")) or ev
            _say(f"error: {err.get('message')}")


def _gemini_json(stream: IO[str]) -> None:
    """`gemini --output-format stream-json`: messages as text, the result's stats."""
    for line, ev in _json_lines(stream):
        if not isinstance(ev, dict):
            _say(line)
            continue
        kind = ev.get("type")
        if kind == "message" and ev.get("role") == "assistant":
            sys.stdout.write(str(ev.get("content", "")))
            sys.stdout.flush()
        elif kind == "tool_use":
            params = ev.get("parameters") or {}
            _say(f"\n● {ev.get('tool_name')}({params.get('command') or json.dumps(params)})")
        elif kind == "result":
            st = _obj(ev.get("stats"))
            _report(usage={"inputTokens": _num(st.get("input_tokens")),
                           "outputTokens": _num(st.get("output_tokens"))})
            _say("")


def _opencode_json(stream: IO[str]) -> None:
    """`opencode run --format json`: text parts shown, each step_finish's tokens and cost
    summed."""
    total: dict[str, Any] = {"inputTokens": 0, "outputTokens": 0, "costUSD": 0.0, "turns": 0}
    for line, ev in _json_lines(stream):
        if not isinstance(ev, dict):
            _say(line)
            continue
        part = _obj(ev.get("part"))
        kind = ev.get("type")
        if kind == "text":
            _say(str(part.get("text", "")))
        elif kind == "tool_use":
            st = part.get("state") or {}
            _say(f"● {part.get('tool')}({(st.get('input') or {}).get('command', '')})")
        elif kind == "step_finish":
            tok = part.get("tokens") or {}
            cache = tok.get("cache") or {}
            total["inputTokens"] += _num(tok.get("input")) + _num(cache.get("read")) \
                + _num(cache.get("write"))
            total["outputTokens"] += _num(tok.get("output")) + _num(tok.get("reasoning"))
            if isinstance(part.get("cost"), int | float):
                total["costUSD"] += part["cost"]
            total["turns"] += 1
            # opencode prices tokens only when the model's config has prices; 0 then
            # means "not priced", which is unknown, not free
            _report(usage={k: v for k, v in total.items() if k != "costUSD" or v > 0})


STREAMS = {"claude-stream": _claude_stream, "codex-json": _codex_json,
           "gemini-json": _gemini_json, "opencode-json": _opencode_json}


def _read_json(path: str) -> dict[str, Any]:
    """A program's JSON settings file as an object ({} when missing or not one)."""
    try:
        with open(path) as f:
            conf = json.load(f)
    except (OSError, ValueError):
        return {}
    return conf if isinstance(conf, dict) else {}


def _write_json(path: str, conf: dict[str, Any]) -> None:
    """Replace a settings file whole; a home that cannot take it leaves the program with
    its own questions (never an error of the harness)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.engine-{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(conf, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _claude_tui(argv: list[str]) -> list[str]:
    """Claude Code as a conversation: its hooks report "needs input" (Stop,
    Notification), work again (UserPromptSubmit) and usage (the transcript; the status
    line's cost). First-run dialogs are answered as the engine's user would: onboarding
    done, this workspace trusted, and an API key from the environment is used through
    apiKeyHelper (a key in ANTHROPIC_API_KEY would stop at a confirmation dialog)."""
    os.environ["ENGINE_RUN_STARTED"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    settings: dict[str, Any] = {
        "hooks": {ev: [{"hooks": [{"type": "command", "command": "engine hook claude"}]}]
                  for ev in ("Stop", "Notification", "UserPromptSubmit", "SessionEnd")},
        "statusLine": {"type": "command", "command": "engine hook claude-status"}}
    key = os.environ.pop("ANTHROPIC_API_KEY", None)
    if key:
        os.environ["ENGINE_CLAUDE_API_KEY"] = key
        settings["apiKeyHelper"] = "printenv ENGINE_CLAUDE_API_KEY"
    own = os.environ.get("ENGINE_OWN_HOME") == "1"
    path = os.path.join(os.path.expanduser("~"), ".claude.json")
    conf = _read_json(path)
    projects = conf.setdefault("projects", {})
    if isinstance(projects, dict):  # this workspace is trusted (it is the agent's)
        projects.setdefault(os.getcwd(), {})["hasTrustDialogAccepted"] = True
    if own:  # the agent's own home: the first-run questions are answered once, as the
        # user would; a home shared with the user keeps the user's own answers
        conf.setdefault("hasCompletedOnboarding", True)
        conf.setdefault("bypassPermissionsModeAccepted", True)
    _write_json(path, conf)
    return [argv[0], "--settings", json.dumps(settings), *argv[1:]]


def _codex_tui(argv: list[str]) -> list[str]:
    """Codex as a conversation: its `notify` program reports each finished turn (with the
    -c override codex runs embedded: no background server outliving it), and the
    workspace is trusted in $CODEX_HOME/config.toml (an override does not answer that
    dialog; the line is what codex itself writes when the user accepts)."""
    os.environ["ENGINE_RUN_STARTED"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    home = os.environ.get("CODEX_HOME") or os.path.expanduser("~/.codex")
    cwd = os.getcwd()
    head = f'[projects."{cwd}"]'
    path = os.path.join(home, "config.toml")
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        text = ""
    if head not in text and '"' not in cwd and "\\" not in cwd:
        try:
            os.makedirs(home, exist_ok=True)
            with open(path, "a") as f:
                f.write(f'\n{head}\ntrust_level = "trusted"\n')
        except OSError:
            pass
    return [argv[0], "-c", 'notify=["engine", "hook", "codex"]', *argv[1:]]


def _gemini_tui(argv: list[str]) -> list[str]:
    """Gemini CLI as a conversation: its hooks (~/.gemini/settings.json of the agent's
    own home) report a turn that ended (AfterAgent: it waits for the user) and one that
    starts (BeforeAgent)."""
    os.environ["ENGINE_RUN_STARTED"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    if os.environ.get("ENGINE_OWN_HOME") != "1":  # never into the user's own settings
        # (its system-settings override must be a root-owned file): no hooks, no signal
        sys.stderr.write("engine adapt gemini-tui: the agent shares your home; its hooks "
                         "are not installed (no WaitingForInput or usage from it)\n")
        return argv
    path = os.path.join(os.path.expanduser("~"), ".gemini", "settings.json")
    conf = _read_json(path)
    hooks = conf.setdefault("hooks", {})
    if isinstance(hooks, dict):
        for ev in ("AfterAgent", "BeforeAgent"):
            hooks[ev] = [{"matcher": "*", "hooks": [
                {"type": "command", "command": "engine hook gemini", "name": "grove-engine"}]}]
    cfg = conf.setdefault("hooksConfig", {})
    if isinstance(cfg, dict):
        cfg["notifications"] = False
    _write_json(path, conf)
    return argv


TUIS = {"claude-tui": _claude_tui, "codex-tui": _codex_tui, "gemini-tui": _gemini_tui}


def cmd_adapt(a: argparse.Namespace) -> int:
    argv = [x for x in a.argv if x != "--"] if a.argv[:1] == ["--"] else a.argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.stderr.write("error: adapt: no command\n")
        return 2
    if a.name in TUIS:
        argv = TUIS[a.name](argv)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            sys.stderr.write(f"error: {argv[0]}: {e.strerror}\n")
            return 127
    if a.name not in STREAMS:  # an adapter this client does not know: run as it is
        try:
            return subprocess.call(argv)
        except OSError as e:
            sys.stderr.write(f"error: {argv[0]}: {e.strerror}\n")
            return 127
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, errors="replace")
    except OSError as e:
        sys.stderr.write(f"error: {argv[0]}: {e.strerror}\n")
        return 127
    assert proc.stdout is not None
    try:
        STREAMS[a.name](proc.stdout)
    except Exception as e:  # the program's output is shown even if it cannot be parsed
        sys.stderr.write(f"engine adapt: {type(e).__name__}: {e}\n")
        for line in proc.stdout:
            _say(line)
    return proc.wait()


def _since(entry: dict[str, Any]) -> bool:
    start = os.environ.get("ENGINE_RUN_STARTED", "")
    return not start or str(entry.get("timestamp", ""))[:19] >= start


def _records(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a program's JSON-lines log written during this run (others,
    and lines that are not JSON objects, skipped; [] when it cannot be read)."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if isinstance(e, dict) and _since(e):
                    out.append(e)
    except OSError:
        return []
    return out


def _per_message(per: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Usage from (input, output) tokens per model message id (a message a log writes
    more than once, under one id, counts once): one turn per message."""
    if not per:
        return {}
    return {"inputTokens": sum(i for i, _ in per.values()),
            "outputTokens": sum(o for _, o in per.values()), "turns": len(per)}


def _claude_transcript(path: str) -> dict[str, Any]:
    """Tokens and turns of this run from Claude Code's transcript."""
    per: dict[str, tuple[int, int]] = {}
    for e in _records(path):
        msg = _obj(e.get("message"))
        if e.get("type") == "assistant" and msg:
            u = _obj(msg.get("usage"))
            per[str(msg.get("id"))] = (
                _num(u.get("input_tokens")) + _num(u.get("cache_creation_input_tokens"))
                + _num(u.get("cache_read_input_tokens")), _num(u.get("output_tokens")))
    return _per_message(per)


def _gemini_chat(path: str) -> dict[str, Any]:
    """Tokens and turns of this run from Gemini CLI's chat file."""
    per: dict[str, tuple[int, int]] = {}
    for e in _records(path):
        if e.get("type") == "gemini":
            t = _obj(e.get("tokens"))
            per[str(e.get("id"))] = (_num(t.get("input")),
                                     _num(t.get("output")) + _num(t.get("thoughts")))
    return _per_message(per)


def _codex_rollout(thread: str) -> dict[str, Any]:
    """Tokens and turns from codex's session log ($CODEX_HOME/sessions/.../rollout-*-ID
    .jsonl): the last token_count event's totals, the finished turns counted."""
    home = os.environ.get("CODEX_HOME") or os.path.expanduser("~/.codex")
    files = sorted(glob.glob(os.path.join(home, "sessions", "*", "*", "*",
                                          f"rollout-*{thread}*.jsonl")))
    if not thread or not files:
        return {}
    usage: dict[str, Any] = {}
    turns = 0
    for e in _records(files[-1]):
        pl = _obj(e.get("payload"))
        if pl.get("type") == "token_count" and _obj(pl.get("info")):
            t = _obj(_obj(pl.get("info")).get("total_token_usage"))
            usage = {"inputTokens": _num(t.get("input_tokens")),
                     "outputTokens": _num(t.get("output_tokens"))}
        elif pl.get("type") == "task_complete":
            turns += 1
    if turns:
        usage["turns"] = turns
    return usage


def _status_file() -> str:
    d = os.environ.get("TMPDIR") or "/tmp"
    who = f"{os.environ.get('ENGINE_GROVE', '')}-{os.environ.get('ENGINE_AGENT', '')}"
    return os.path.join(d, f".engine-status-{who}.json")


def cmd_hook(a: argparse.Namespace) -> int:
    """Called by the harness's own hooks, with its JSON on stdin (claude) or as the last
    argument (codex `notify`). Never fails the harness: always exit 0."""
    try:
        _hook(a.name, a.payload)
    except Exception as e:  # a hook that breaks must not break the program
        sys.stderr.write(f"engine hook: {type(e).__name__}: {e}\n")
    return 0


def _hook(name: str, payload: list[str]) -> None:
    if name == "codex":
        data = json.loads(payload[-1]) if payload else {}
        if not isinstance(data, dict) or data.get("type") != "agent-turn-complete":
            return
        first = (data.get("input-messages") or [""])[0]
        if str(first).startswith("Generate a concise, single-line task title"):
            return  # codex's own side thread (its title), not the conversation
        _report("waiting", str(data.get("last-assistant-message") or ""),
                _codex_rollout(str(data.get("thread-id") or "")))
        return
    data = json.loads(sys.stdin.read(1 << 20) or "{}")
    if not isinstance(data, dict):
        return
    if name == "gemini":
        event = data.get("hook_event_name")
        if event == "BeforeAgent":
            _report("working")
        elif event == "AfterAgent":
            _report("waiting", str(data.get("prompt_response") or ""),
                    _gemini_chat(str(data.get("transcript_path") or "")))
        _say("{}")  # gemini reads a hook's stdout as its JSON answer
        return
    if name == "claude-status":  # the status line: cost so far; printed as the line
        cost = (data.get("cost") or {}).get("total_cost_usd")
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            path = _status_file()
            try:
                with open(path) as f:
                    last = json.load(f)
            except (OSError, ValueError):
                last = None
            if last != cost:
                _report(usage={"costUSD": cost})
                with open(path, "w") as f:
                    json.dump(cost, f)
            _say(f"grove-engine {os.environ.get('ENGINE_AGENT', '')} · ${cost:.4f}")
        return
    event = data.get("hook_event_name")
    if event == "UserPromptSubmit":
        _report("working")
    elif event == "Stop":
        _report("waiting", str(data.get("last_assistant_message") or ""),
                _claude_transcript(str(data.get("transcript_path") or "")))
    elif event == "Notification":
        _report("waiting", str(data.get("message") or ""))
    elif event == "SessionEnd":  # the transcript is complete now (a Stop hook may run
        # before the turn's last message is written)
        _report(usage=_claude_transcript(str(data.get("transcript_path") or "")))


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
    ad = sub.add_parser("adapt", help="run the harness program, relaying its usage")
    ad.add_argument("name")
    ad.add_argument("argv", nargs=argparse.REMAINDER)
    ad.set_defaults(fn=cmd_adapt)
    h = sub.add_parser("hook", help="called by the harness program's own hooks")
    h.add_argument("name")
    h.add_argument("payload", nargs="*")
    h.set_defaults(fn=cmd_hook)
    a = p.parse_args(argv)
    return int(a.fn(a))


if __name__ == "__main__":
    sys.exit(main())
