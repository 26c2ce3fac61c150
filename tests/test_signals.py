"""Agents' reports about themselves, end to end on the local runtime (real tmux agents,
the real agent-side client, real `engine apply` passes).

- Each adapter (`engine adapt FORMAT -- COMMAND`) reads the machine-readable output each
  CLI prints (claude stream-json, codex --json, gemini stream-json, opencode --format
  json; samples as the real CLIs printed them against the scripted model server) and the
  engine records those figures; the agent's log shows text, not JSON.
- A report is the agent's word, checked: bad numbers are unknown, a smaller figure does not
  lower what was counted, text is one clean line, and an agent reports only for itself.
- A person is told once per wait, and an agent toggling waiting/working cannot flood them.
- Usage survives a restart and keeps adding up.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from engine import inventory, paths
from tests.conftest import local_grove
from tests.test_spawn import until

CLAUDE = [
    {"type": "system", "subtype": "init"},
    {"type": "assistant", "message": {"id": "m1", "content": [
        {"type": "tool_use", "name": "Bash", "input": {"command": "echo one"}}],
        "usage": {"input_tokens": 1000, "output_tokens": 1}}},
    {"type": "user", "message": {"content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "one"}]}},
    {"type": "assistant", "message": {"id": "m2", "content": [
        {"type": "text", "text": "claude-said-this"}], "usage": {"input_tokens": 1000,
                                                                "output_tokens": 1}}},
    {"type": "result", "subtype": "success", "is_error": False, "num_turns": 2,
     "total_cost_usd": 0.016, "usage": {"input_tokens": 2000, "output_tokens": 400,
                                        "cache_creation_input_tokens": 0,
                                        "cache_read_input_tokens": 0}}]
CODEX = [
    {"type": "thread.started", "thread_id": "t1"}, {"type": "turn.started"},
    {"type": "item.completed", "item": {"id": "i1", "type": "command_execution",
                                        "command": "echo one", "aggregated_output": "one\n",
                                        "exit_code": 0, "status": "completed"}},
    {"type": "item.completed", "item": {"id": "i2", "type": "agent_message",
                                        "text": "codex-said-this"}},
    {"type": "turn.completed", "usage": {"input_tokens": 2003, "cached_input_tokens": 14,
                                         "output_tokens": 43, "reasoning_output_tokens": 6}}]
GEMINI = [
    {"type": "init", "session_id": "s", "model": "auto"},
    {"type": "tool_use", "tool_name": "run_shell_command", "tool_id": "x",
     "parameters": {"command": "echo one"}},
    {"type": "message", "role": "assistant", "content": "gemini-said-this", "delta": True},
    {"type": "result", "status": "success",
     "stats": {"total_tokens": 4124, "input_tokens": 4022, "output_tokens": 102,
               "tool_calls": 2}}]
OPENCODE = [
    {"type": "step_start", "part": {"type": "step-start"}},
    {"type": "tool_use", "part": {"type": "tool", "tool": "bash",
                                  "state": {"input": {"command": "echo one"}}}},
    {"type": "step_finish", "part": {"tokens": {"input": 1002, "output": 22, "reasoning": 0,
                                                "cache": {"read": 0, "write": 0}},
                                     "cost": 0}},
    {"type": "text", "part": {"type": "text", "text": "opencode-said-this"}},
    {"type": "step_finish", "part": {"tokens": {"input": 1003, "output": 23, "reasoning": 0,
                                                "cache": {"read": 0, "write": 0}},
                                     "cost": 0}}]


def printing(lines: list[dict[str, Any]]) -> str:
    """A shell command that prints these JSON lines, as the CLI would."""
    text = "".join(json.dumps(x) + "\n" for x in lines)
    return f"printf %s {shlex.quote(text)}"


def agent(name: str, task: str) -> str:
    return f"    - name: {name}\n      task: {json.dumps(task)}\n"


def rows(engine: Any) -> dict[str, dict[str, Any]]:
    r = engine("status", "--json")
    assert r.code == 0, r.err
    return {a["name"]: a for a in json.loads(r.out)["groves"][0]["agents"]}


def converge_until(engine: Any, cond: Any, what: str) -> None:
    def again() -> bool:
        assert engine("apply", "--auto-approve").code == 0
        return bool(cond())
    until(again, 60, what)


def test_each_adapter_relays_what_its_cli_printed(repo: Path, engine: Any) -> None:
    agents = "".join(agent(n, f"engine adapt {fmt} -- {printing(lines)}")
                     for n, fmt, lines in (("claude", "claude-stream", CLAUDE),
                                           ("codex", "codex-json", CODEX),
                                           ("gemini", "gemini-json", GEMINI),
                                           ("opencode", "opencode-json", OPENCODE)))
    local_grove(repo, agents)
    converge_until(engine, lambda: all(r["phase"] == "Succeeded" and r["usage"]
                                       for r in rows(engine).values()), "the usage")
    got = {n: r["usage"] for n, r in rows(engine).items()}
    assert got["claude"] == {"inputTokens": 2000, "outputTokens": 400, "costUSD": 0.016,
                             "turns": 2}
    assert got["codex"] == {"inputTokens": 2003, "outputTokens": 49, "turns": 1}
    assert got["gemini"] == {"inputTokens": 4022, "outputTokens": 102}  # cost unknown
    assert got["opencode"] == {"inputTokens": 2005, "outputTokens": 45, "turns": 2}
    text = engine("status")
    assert "unknown" in text.out  # codex, gemini, opencode report no cost: never "$0"
    for name in got:
        log = engine("logs", name).out
        assert f"{name}-said-this" in log and '"type"' not in log, log
        assert "echo one" in log


def report(spec: dict[str, Any], who: str = "") -> str:
    """A shell command writing one AgentReport as the client does (or as an agent could)."""
    doc = {"apiVersion": "engine/v1alpha1", "kind": "AgentReport", "id": "x",
           "from": who, "spec": spec}
    py = ("import json,os,sys,time,uuid; d=json.loads(sys.argv[1]); "
          "i='%020d-%s' % (time.time_ns(), uuid.uuid4().hex[:8]); "
          "d['id']=i; p=os.environ['ENGINE_INBOX']; "
          "open(os.path.join(p,'.t'+i),'w').write(json.dumps(d)); "
          "os.replace(os.path.join(p,'.t'+i), os.path.join(p,'req-'+i+'.json'))")
    return f"python3 -c {shlex.quote(py)} {shlex.quote(json.dumps(doc))}"


def test_a_report_is_the_agents_word_checked(repo: Path, engine: Any) -> None:
    steps = [
        report({"usage": {"inputTokens": 500, "outputTokens": 50, "costUSD": 0.25,
                          "turns": 3}}),
        "sleep 0.5",
        # lower figures, garbage and a claim to be another agent change nothing counted
        report({"usage": {"inputTokens": 1, "outputTokens": -5, "costUSD": "NaN",
                          "turns": True}}, who="quiet"),
        report({"usage": {"inputTokens": 10**30, "costUSD": float("inf")}}),
        report({"state": "waiting", "message": "\x1b[31mred\x1b]0;title\x07\nsecond line "
                + "x" * 5000}),
        "sleep 300"]
    local_grove(repo, agent("loud", "; ".join(steps)) + agent("quiet", "sleep 300"))
    converge_until(engine, lambda: rows(engine)["loud"]["conditions"], "the reports")
    converge_until(engine, lambda: not list((repo / ".engine/inbox/demo/loud").glob(
        "req-*")), "the reports to be taken")
    r = rows(engine)
    assert r["loud"]["usage"] == {"inputTokens": 500, "outputTokens": 50, "costUSD": 0.25,
                                  "turns": 3}
    assert r["quiet"]["usage"] in (None, {})  # nothing reported by or for it
    cond = r["loud"]["conditions"][0]
    assert cond["type"] == "WaitingForInput"
    assert "\x1b" not in cond["message"] and "\n" not in cond["message"]
    assert cond["message"].startswith("red") and len(cond["message"]) <= 500
    assert "\x1b" not in engine("status").out
    # reports are removed once taken, never answered; the one that is not JSON at all
    # (Infinity) is refused like any unreadable request
    box = repo / ".engine/inbox/demo/loud"
    assert not list(box.glob("req-*"))
    answers = [json.loads(p.read_text()) for p in box.glob("res-*")]
    assert [a["status"] for a in answers] == ["rejected"], answers


def test_a_wait_is_told_once_and_toggling_cannot_flood(repo: Path, engine: Any) -> None:
    flips = "; ".join(report({"state": s, "message": "again?"})
                      for _ in range(10) for s in ("waiting", "working"))
    local_grove(repo, agent("flip", flips + "; " + report({"state": "waiting",
                                                             "message": "really?"})
                            + "; sleep 300"))
    box = repo / ".engine/inbox/demo/flip"
    converge_until(engine, lambda: box.is_dir() and rows(engine)["flip"]["conditions"]
                   and not list(box.glob("req-*")), "the reports")
    told = [e for e in map(json.loads, (repo / ".engine/events.jsonl").read_text()
                           .splitlines()) if e.get("event") == "NeedsInput"]
    assert len(told) == 1, told
    assert rows(engine)["flip"]["conditions"][0]["message"] == "really?"


@pytest.mark.timeout(120)
def test_usage_adds_up_over_restarts(repo: Path, engine: Any) -> None:
    usage = {"inputTokens": 100, "outputTokens": 10, "costUSD": 0.5, "turns": 1}
    local_grove(repo, agent("again", report({"usage": usage}) + "; sleep 300"))
    converge_until(engine, lambda: rows(engine)["again"]["usage"], "the first report")
    assert engine("restart", "again").code == 0
    converge_until(engine, lambda: (rows(engine)["again"]["usage"] or {}).get(
        "inputTokens") == 200, "the second run's report")
    assert rows(engine)["again"]["usage"] == {"inputTokens": 200, "outputTokens": 20,
                                              "costUSD": 1.0, "turns": 2}
    rec = inventory.load(paths.state(repo), "demo").agents["again"]
    assert rec.usage == usage  # the first run's, kept as the total of ended runs


@pytest.mark.timeout(120)
def test_planted_report_files_are_refused_without_following_or_blocking(
        repo: Path, engine: Any) -> None:
    """An agent plants, in its own inbox, a FIFO and a symlink to a report it wrote
    elsewhere, both named like reports: a pass neither blocks on the FIFO nor follows the
    link, and nothing of them is counted."""
    outside = repo.parent / "elsewhere"
    outside.mkdir()
    outside.chmod(0o777)
    doc = json.dumps({"apiVersion": "engine/v1alpha1", "kind": "AgentReport", "id": "x",
                      "spec": {"usage": {"inputTokens": 999, "costUSD": 9.0}}})
    plant = (f"printf %s {shlex.quote(doc)} > {outside}/r.json; "
             f"ln -s {outside}/r.json \"$ENGINE_INBOX/req-20990101T000000.1-link.json\"; "
             "mkfifo \"$ENGINE_INBOX/req-20990101T000000.2-fifo.json\"; "
             + report({"usage": {"inputTokens": 5}}) + "; sleep 300")
    local_grove(repo, agent("sly", plant))
    box = repo / ".engine/inbox/demo/sly"
    until(lambda: engine("apply", "--auto-approve").code == 0
          and (box / "req-20990101T000000.2-fifo.json").exists() is False
          and rows(engine)["sly"]["usage"], 60, "the planted files to be dealt with")
    assert rows(engine)["sly"]["usage"] == {"inputTokens": 5}
    answers = {p.name: json.loads(p.read_text())["status"] for p in box.glob("res-*")}
    assert answers == {"res-20990101T000000.1-link.json": "rejected",
                       "res-20990101T000000.2-fifo.json": "rejected"}, answers
    assert (outside / "r.json").read_text() == doc  # followed by nothing, changed by none


def test_a_message_answers_a_wait_no_pass_has_taken_yet(repo: Path, engine: Any) -> None:
    """Without a controller the report waits in the inbox (status shows it): a message
    answers it there too, and the next pass does not set the wait again."""
    local_grove(repo, agent("asker", report({"state": "waiting", "message": "which way?",
                                             "usage": {"inputTokens": 7}})
                            + "; touch ASKED; read -r line; echo \"$line\" > GOT; "
                              "sleep 300"))
    assert engine("apply", "--auto-approve").code == 0
    work = repo / ".engine/worktrees/demo/asker"
    until(lambda: (work / "ASKED").exists(), 30, "the question")
    box = repo / ".engine/inbox/demo/asker"
    assert list(box.glob("req-*"))  # no pass has taken it
    assert rows(engine)["asker"]["conditions"][0]["message"] == "which way?"
    r = engine("message", "asker", "left")
    assert r.code == 0, r.err
    assert rows(engine)["asker"]["conditions"] == []
    assert not list(box.glob("req-*"))
    assert engine("apply", "--auto-approve").code == 0
    row = rows(engine)["asker"]
    assert row["conditions"] == [] and row["usage"] == {"inputTokens": 7}
    until(lambda: (work / "GOT").exists() and (work / "GOT").read_text() == "left\n", 30,
          "the answer")
