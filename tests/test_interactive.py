"""People in the loop, with the real Claude Code: a conversation, "needs input", usage.

The real `claude` CLI (installed by `engine harness install`, as in test_real_agents) runs
under `engine watch` on the local runtime against the scripted model server on 127.0.0.1
(tests/model_server.py: the stand-in for the provider's API). The scripted model does some
work, asks the user a question and ends its turn; the test sees the engine turn Claude
Code's own Stop hook into the WaitingForInput condition (status, events, a webhook on
loopback), answers with `engine message`, and the agent finishes: it reports done, the
engine types /exit, and it ends Succeeded. The usage the server reported (tokens per
answer) is what the engine recorded; a budget below it stops the agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import git, write_grove
from tests.model_server import Ask, ModelServer, Step
from tests.test_real_agents import CACHE, HARNESS, KEY_VAR, install
from tests.test_spawn import Watch, engine_json, until

QUESTION = "Which colour do you want?"
TOKENS = (1000, 200)  # input, output tokens the scripted model reports with every answer


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                outer.bodies.append(json.loads(self.rfile.read(n) or b"null"))
                self.send_response(204)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def cleanup(repo: Path, watch: list[Watch]) -> Iterator[None]:
    yield
    for w in watch:
        w.stop()
    subprocess.run([sys.executable, "-m", "engine", "destroy", "--auto-approve"], cwd=repo,
                   capture_output=True, timeout=300)


def codex_tui(url: str) -> list[str]:
    """The codex TUI pointed at the scripted endpoint (the -c overrides a user would put
    in ~/.codex/config.toml), offline."""
    headless = HARNESS["codex"]["override"](url)["command"]
    sets = headless[2:headless.index("--dangerously-bypass-approvals-and-sandbox")]
    return ["codex", *sets, "--dangerously-bypass-approvals-and-sandbox", "--no-daemon"]


def harness_entry(harness: str, url: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"builtin": harness, "mode": "interactive"}
    if harness == "codex":
        entry["interactive"] = {"command": codex_tui(url), "adapter": "codex-tui",
                                "taskArg": "flag", "taskFlag": "--", "exitText": "/quit",
                                "resume": ["resume", "--last"]}
    return entry


def grove(url: str, hook: str, limits: dict[str, Any] | None = None,
          harness: str = "claude", runtime: str = "local") -> str:
    h = HARNESS[harness]
    box: dict[str, Any] = {"runtime": runtime, "env": h["env"](url),
                           "credentials": {h["credential"]: {"fromEnv": KEY_VAR}}}
    if runtime == "docker":  # no network but the model, through the egress gateway
        box |= {"image": "grove-engine/base:latest", "network": "egress",
                "egress": ["harness", f"127.0.0.1:{url.rsplit(':', 1)[1]}"]}
    spec: dict[str, Any] = {
        "defaults": {"profile": "box", "harness": harness},
        "profiles": {"box": box},
        "harnesses": {harness: harness_entry(harness, url)},
        "notify": {"channels": {"people": {"webhook": {"url": {"fromEnv": "TEST_HOOK_URL"}}}},
                   "routes": [{"on": ["needs-input", "succeeded", "failed",
                                      "budget-exceeded"], "to": ["people"]}]},
        "agents": [{"name": "lead", "task": "Start the work.",
                    **({"limits": limits} if limits else {})}]}
    return json.dumps({"apiVersion": "engine/v1alpha1", "kind": "Grove",
                       "metadata": {"name": "chat"}, "spec": spec}, indent=2)


def agent_row(repo: Path) -> dict[str, Any]:
    doc = engine_json(repo, "status")
    rows: list[dict[str, Any]] = doc["groves"][0]["agents"]
    return next((r for r in rows if r["name"] == "lead"), {})


def events_of(repo: Path, kind: str) -> list[dict[str, Any]]:
    path = repo / ".engine/events.jsonl"
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == kind]


def start(repo: Path, watch: list[Watch], server: ModelServer, receiver: Receiver,
          monkeypatch: pytest.MonkeyPatch, limits: dict[str, Any] | None = None,
          harness: str = "claude", runtime: str = "local") -> None:
    install(harness)
    monkeypatch.setenv("GROVE_ENGINE_CACHE", str(CACHE))
    monkeypatch.setenv(KEY_VAR, "scripted-model-key")
    monkeypatch.setenv("TEST_HOOK_URL", receiver.url)
    write_grove(repo, "chat", grove(server.url, receiver.url, limits, harness, runtime))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    watch.append(Watch(repo))


def diagnose(repo: Path, server: ModelServer, watch: list[Watch]) -> str:
    log = subprocess.run([sys.executable, "-m", "engine", "look", "lead"], cwd=repo,
                         capture_output=True, text=True).stdout
    return (f"row {agent_row(repo)}; commands {server.commands_run()}; screen:\n{log[-3000:]}"
            f"\nwatch:\n{watch[0].text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("harness,runtime", [
    ("claude", "local"), ("codex", "local"), ("gemini", "local"),
    pytest.param("claude", "docker", marks=pytest.mark.docker)])
def test_a_conversation_waits_for_a_person_and_finishes(
        harness: str, runtime: str, repo: Path, watch: list[Watch], cleanup: None,
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    if runtime == "docker":
        request.getfixturevalue("base_image")
    script: list[Step] = [
        "echo one > one.txt && git add one.txt && git commit -qm one", Ask(QUESTION),
        "echo blue > colour.txt && git add colour.txt && git commit -qm colour",
        "engine done --result colour-chosen"]
    server = ModelServer(HARNESS[harness]["provider"], script, final_text="All done.",
                         usage=TOKENS).start()
    request.addfinalizer(server.stop)
    start(repo, watch, server, receiver, monkeypatch, harness=harness, runtime=runtime)
    try:
        until(lambda: any(c["type"] == "WaitingForInput"
                          for c in agent_row(repo).get("conditions", [])),
              timeout=150, what="the agent to wait for input")
    except AssertionError:
        raise AssertionError(diagnose(repo, server, watch)) from None
    row = agent_row(repo)
    assert row["phase"] == "Running"
    cond = next(c for c in row["conditions"] if c["type"] == "WaitingForInput")
    assert cond["message"] == QUESTION  # the harness's own message, from its Stop hook
    assert QUESTION in subprocess.run([sys.executable, "-m", "engine", "status"],
                                      cwd=repo, capture_output=True, text=True).stdout
    until(lambda: events_of(repo, "NeedsInput"), timeout=30,  # the pass that saw the
          what="the NeedsInput event")                         # condition records it
    needs = events_of(repo, "NeedsInput")
    assert len(needs) == 1 and needs[0]["agent"] == "lead", needs
    until(lambda: any(b.get("kind") == "needs-input" for b in receiver.bodies), 30,
          "the webhook notification")
    note = next(b for b in receiver.bodies if b.get("kind") == "needs-input")
    assert note["agent"] == "lead" and QUESTION in json.dumps(note)
    # a person answers; the agent goes on, reports done, and the engine ends it
    p = subprocess.run([sys.executable, "-m", "engine", "message", "lead",
                        "Blue, please."], cwd=repo, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    try:
        until(lambda: agent_row(repo).get("phase") == "Succeeded", timeout=120,
              what="the agent to finish")
    except AssertionError:
        raise AssertionError(diagnose(repo, server, watch)) from None
    assert server.commands_run() == [s for s in script if isinstance(s, str)]
    main = len(server.main_requests())
    assert git(repo, "show", "engine/chat/lead:colour.txt") == "blue"
    assert (repo / ".engine/results/chat/lead.txt").read_text() == "colour-chosen"
    until(lambda: any(b.get("kind") == "succeeded" for b in receiver.bodies), 30,
          "the succeeded notification")
    # the usage the model reported is the agent's: tokens from the CLI's own session record
    # (Claude Code's transcript, codex's session log, gemini's chat file) for every answer
    # of the conversation; cost where the CLI prices tokens (Claude Code's status line)
    row = agent_row(repo)
    u = row["usage"]
    assert u["inputTokens"] == TOKENS[0] * main and u["outputTokens"] == TOKENS[1] * main, \
        (u, main)
    if harness == "claude":
        assert u["turns"] == main
        assert u.get("costUSD", 0) > 0
    else:
        assert "costUSD" not in u  # not reported: unknown, never 0
    assert row["conditions"] == []  # ended: no longer waiting for anyone
    if (harness, runtime) == ("claude", "local"):
        resumed(repo, server)


def resumed(repo: Path, server: ModelServer) -> None:
    """`engine resume` continues the same conversation (the harness's --continue) with a
    new message: the model sees the whole history, answers (the script is done: its final
    text), and the agent, in a new run, waits again instead of ending."""
    p = subprocess.run([sys.executable, "-m", "engine", "resume", "lead", "--task",
                        "One more thing."], cwd=repo, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    until(lambda: agent_row(repo).get("phase") == "Running" and any(
        c["message"] == "All done." for c in agent_row(repo).get("conditions", [])), 120,
        "the resumed conversation to wait again")
    history = json.dumps(server.main_requests()[-1].body)
    assert "One more thing." in history and QUESTION in history  # the same session


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_budget_below_the_usage_stops_the_agent(
        repo: Path, watch: list[Watch], cleanup: None, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    script: list[Step] = ["echo one > one.txt && git add one.txt && git commit -qm one",
                          "echo two > two.txt", Ask(QUESTION), "engine done"]
    with ModelServer("anthropic", script, final_text="All done.", usage=TOKENS) as server:
        start(repo, watch, server, receiver, monkeypatch, limits={"maxTokens": 2000})
        try:
            until(lambda: agent_row(repo).get("phase") in ("Stopped", "Failed"),
                  timeout=150, what="the budget to stop the agent")
        except AssertionError:
            raise AssertionError(diagnose(repo, server, watch)) from None
    row = agent_row(repo)
    assert any(c["type"] == "Budget" for c in row.get("conditions", [])), row
    assert "maxTokens" in row["reason"]
    assert row["usage"]["inputTokens"] + row["usage"]["outputTokens"] > 2000
    assert len(events_of(repo, "BudgetExceeded")) == 1
    until(lambda: any(b.get("kind") == "budget-exceeded" for b in receiver.bodies), 30,
          "the budget notification")
    # its work is kept: the commit it made is on its branch
    assert git(repo, "show", "engine/chat/lead:one.txt") == "one"
    # nothing restarts it while the budget is crossed
    p = subprocess.run([sys.executable, "-m", "engine", "start", "lead"], cwd=repo,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "maxTokens" in p.stderr and "Traceback" not in p.stderr
    os.environ.pop("TEST_HOOK_URL", None)
