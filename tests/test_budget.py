"""Budgets (`limits`) end to end: `engine validate` refusing bad ones, resolution (agent
over profile over grove), the spawn subtree's roll-up, `budget.enforce` stopping real
local agents (tmux sessions, git worktrees) with their work archived, `engine start`
refusing while a budget is crossed, the spawn gate refusing an over-budget child asked
for by the real agent-side client, and `engine cost` / `engine status` in text and JSON.

Usage is written into the inventory under the grove's lock, as the engine's own ingest of
an agent's report does: it is the engine's state, not a fake of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import budget, desired, events, inventory, manifest, plan
from engine.errors import EngineError
from engine.observe import Runtimes, observe
from engine.usage import Usage
from tests.conftest import ROOT, git, write_grove
from tests.test_json_output import check

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: demo}}
spec:
  defaults: {{profile: local, harness: shell}}
  limits: {{maxTurns: 50{grove_limits}}}
  profiles:
    local: {{runtime: local, spawn: {{allowProfiles: [local, small]}}}}
    small: {{runtime: local, limits: {{maxCostUSD: 0.8}}, spawn: {{allowProfiles: [small]}}}}
  agents:
{agents}"""

# seed -> kid -> grandkid, seed -> other: a 3-level spawn subtree
TREE = """\
    - name: seed
      restart: always
      task: 'echo seed > notes.txt; sleep 300'
      limits: {{maxCostUSD: {seed_cost}, maxTokens: 10000}}
    - name: kid
      spawnedBy: seed
      task: 'echo kid > notes.txt; sleep 300'
      limits: {{maxCostUSD: 0.5}}
    - name: grandkid
      spawnedBy: kid
      task: 'echo grandkid > notes.txt; sleep 300'
    - name: other
      spawnedBy: seed
      profile: small
      task: 'sleep 300'
"""


def grove(repo: Path, agents: str, grove_limits: str = "") -> None:
    write_grove(repo, "demo", GROVE.format(agents=agents, grove_limits=grove_limits))


def tree(repo: Path, seed_cost: str = "1.0") -> None:
    grove(repo, TREE.format(seed_cost=seed_cost))


@pytest.fixture
def destroy(repo: Path) -> Iterator[None]:
    yield
    subprocess.run([sys.executable, "-m", "engine", "destroy", "--auto-approve"], cwd=repo,
                   capture_output=True, timeout=120)


def desired_grove(repo: Path) -> desired.DesiredGrove:
    return desired.build(manifest.load_grove(repo / "groves/demo", repo))


def report(repo: Path, usage: dict[str, dict[str, Any]]) -> None:
    """Usage as the engine records an agent's report: in its inventory record."""
    st = repo / ".engine"
    with inventory.locked(st, "demo", "test", wait=30):
        inv = inventory.load(st, "demo")
        for name, u in usage.items():
            inv.agents[name].run_usage = u
        inventory.save(st, inv)


def enforce(repo: Path) -> list[str]:
    """One enforcement pass, as converge runs it: under the lock, after observing."""
    g = desired_grove(repo)
    with inventory.locked(repo / ".engine", "demo", "test", wait=30):
        rts = Runtimes(repo)
        return budget.enforce(repo, g, observe(repo, "demo", g, rts), rts)


def status(engine) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    res = engine("status", "--json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    check("status.json", doc)
    return {a["name"]: a for a in doc["groves"][0]["agents"]}


def until(cond: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


def running(engine, names: set[str]) -> None:  # type: ignore[no-untyped-def]
    until(lambda: all(status(engine)[n]["phase"] == "Running" for n in names),
          f"{sorted(names)} running")


def one_error(res, *texts: str) -> None:  # type: ignore[no-untyped-def]
    assert res.code == 1, res
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.err, res
    for t in texts:
        assert t in errors[0], res


# -- validate ------------------------------------------------------------------------

BAD = [
    # (agents' limits, grove limits, the problem's field, the line it is on)
    ("      limits: {maxCostUSD: 0}\n", "", "limits.maxCostUSD", 13),
    ("      limits: {maxCostUSD: -1.5}\n", "", "limits.maxCostUSD", 13),
    ("      limits: {maxTokens: 1.5}\n", "", "limits.maxTokens", 13),
    ("      limits: {maxTurns: '10'}\n", "", "limits.maxTurns", 13),
    ("      limits: {maxCostUSD: .nan}\n", "", "limits.maxCostUSD", 13),
    ("", ", maxCostUSD: .nan", "limits.maxCostUSD", 6),
    ("", ", maxTokens: 0", "limits.maxTokens", 6),
    ("", ", maxCostUSD: lots", "limits.maxCostUSD", 6),
]


@pytest.mark.parametrize(("agent", "grove_limits", "field", "line"), BAD)
def test_validate_refuses_a_budget_that_is_no_positive_number(
        repo: Path, engine, agent: str, grove_limits: str, field: str, line: int
        ) -> None:  # type: ignore[no-untyped-def]
    grove(repo, "    - name: a\n      task: 'true'\n" + agent, grove_limits)
    text = (repo / "groves/demo/grove.yaml").read_text()
    assert field.split(".")[1] in text.splitlines()[line - 1]
    res = engine("validate")
    one_error(res, f"groves/demo/grove.yaml:{line}:", field)
    assert not (repo / ".engine/state").exists()  # nothing changed
    res = engine("plan")
    one_error(res, f"groves/demo/grove.yaml:{line}:", field)


def test_a_profiles_nan_budget_is_said_at_the_profile(repo: Path, engine
                                                      ) -> None:  # type: ignore[no-untyped-def]
    grove(repo, "    - name: a\n      task: 'true'\n      profile: small\n")
    path = repo / "groves/demo/grove.yaml"
    path.write_text(path.read_text().replace("maxCostUSD: 0.8", "maxCostUSD: .NaN"))
    one_error(engine("validate"), "groves/demo/grove.yaml:9:", "profile small",
              "limits.maxCostUSD")


def test_limits_resolve_agent_over_profile_over_grove(repo: Path, engine
                                                      ) -> None:  # type: ignore[no-untyped-def]
    tree(repo)
    g = desired_grove(repo)
    lim = {a.name: a.limits for a in g.agents}
    assert lim["seed"] == desired.Limits(1.0, 10000, 50)  # its own, the grove's maxTurns
    assert lim["other"] == desired.Limits(0.8, None, 50)  # profile small, grove
    assert lim["grandkid"] == desired.Limits(None, None, 50)
    # an agent's null removes a limit set below it, field by field
    grove(repo, "    - name: a\n      task: 'true'\n      profile: small\n"
                "      limits: {maxTurns: null, maxTokens: 5}\n")
    assert desired_grove(repo).agent("a").limits == desired.Limits(0.8, 5, None)
    res = engine("explain", "a")
    assert res.code == 0, res
    assert "limits.maxCostUSD" in res.out and "grove.yaml:9" in res.out, res.out


# -- roll-up, cost, status -------------------------------------------------------------

def test_cost_before_anything_ran_and_bad_agents(repo: Path, engine
                                                 ) -> None:  # type: ignore[no-untyped-def]
    tree(repo)
    res = engine("cost")
    assert res.code == 0, res
    seed = next(ln for ln in res.out.splitlines() if ln.split()[:1] == ["seed"])
    assert seed.split()[1:5] == ["-"] * 4, res.out  # never started: nothing used
    assert res.out.splitlines()[-1] == "  total: unknown", res.out
    doc = json.loads(engine("cost", "--json").out)
    check("cost.json", doc)
    assert doc["groves"][0]["total"] == {"agents": 0, "usage": {},
                                         "unknown": {"costUSD": 0, "tokens": 0, "turns": 0}}
    one_error(engine("cost", "nope"), "agent nope: not found")
    one_error(engine("cost", "seed"), "agent demo/seed: not started yet")
    assert not (repo / ".engine/state").exists()


def test_rollup_over_three_levels_and_engine_cost(repo: Path, engine, destroy
                                                  ) -> None:  # type: ignore[no-untyped-def]
    tree(repo)
    assert engine("apply", "--auto-approve").code == 0
    running(engine, {"seed", "kid", "grandkid", "other"})
    # nothing reported yet: unknown everywhere, never 0
    inv = inventory.load(repo / ".engine", "demo")
    assert budget.subtree_usage(inv, "seed") == Usage()
    res = engine("cost")
    assert res.code == 0, res
    assert "0.00" not in res.out and "total: unknown" in res.out, res.out
    report(repo, {"seed": {"costUSD": 0.2, "inputTokens": 1000, "outputTokens": 200,
                           "turns": 3},
                  "kid": {"costUSD": 0.1, "inputTokens": 500, "outputTokens": 100},
                  "other": {"turns": 2}})
    inv = inventory.load(repo / ".engine", "demo")
    assert budget.descendants(inv, "seed") == ["kid", "other", "grandkid"]
    seed = budget.subtree_usage(inv, "seed")
    assert (seed.cost_usd, seed.tokens, seed.turns) == (pytest.approx(0.3), 1800, 5)
    assert budget.subtree_usage(inv, "kid").turns is None  # nobody below kid reported it
    assert budget.subtree_usage(inv, "grandkid") == Usage()
    g = desired_grove(repo)
    assert budget.exceeded(g, inv) == []
    assert budget.left(g.agent("seed").limits, inv, "seed") == {
        "maxCostUSD": 0.7, "maxTokens": 8200, "maxTurns": 47}
    # text: unknown where nothing was reported; the total is a lower bound
    res = engine("cost")
    assert res.code == 0, res
    rows = {ln.split()[0]: ln.split() for ln in res.out.splitlines()[2:-1]}
    assert rows["grandkid"][1:5] == ["unknown"] * 4, res.out
    assert rows["seed"][1:5] == ["1000", "200", "$0.2000", "3"], res.out
    assert "total: at least $0.3000 (2 agents unknown), at least 1800 tokens (2 agents " \
           "unknown), at least 5 turns (2 agents unknown)" in res.out, res.out
    # JSON, against its schema
    res = engine("cost", "--json")
    doc = json.loads(res.out)
    check("cost.json", doc)
    agents = {a["name"]: a for a in doc["groves"][0]["agents"]}
    assert agents["grandkid"]["usage"] == {} and agents["grandkid"]["started"] is True
    assert agents["seed"]["subtree"]["usage"]["costUSD"] == pytest.approx(0.3)
    assert agents["seed"]["subtree"]["unknown"] == {"costUSD": 2, "tokens": 2, "turns": 2}
    assert agents["seed"]["left"]["maxCostUSD"] == pytest.approx(0.7)
    assert doc["groves"][0]["total"]["unknown"]["costUSD"] == 2
    # AGENT: the subtree as a tree with subtotals
    res = engine("cost", "kid")
    assert res.code == 0, res
    lines = res.out.splitlines()
    assert lines[0].startswith("demo/kid: subtree at least $0.1000 (1 agent unknown)")
    assert lines[1].startswith("└─ grandkid: subtree unknown"), res.out
    doc = json.loads(engine("cost", "seed", "--json").out)
    check("cost.json", doc)
    assert [c["name"] for c in doc["tree"]["children"]] == ["kid", "other"]
    assert doc["tree"]["children"][0]["children"][0]["name"] == "grandkid"
    # status: tokens and cost per agent, usage and limits in JSON
    rows = status(engine)
    assert rows["seed"]["usage"]["costUSD"] == 0.2 and rows["grandkid"]["usage"] == {}
    assert rows["seed"]["limits"] == {"maxCostUSD": 1.0, "maxTokens": 10000, "maxTurns": 50}
    text = engine("status").out
    line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["grandkid"])
    assert line.split()[-2:] == ["unknown", "unknown"], text
    # a change of limits is made in place: the running agent is not replaced
    tree(repo, seed_cost="2.0")
    res = engine("plan")
    assert "replace" not in res.out.split("Plan:")[-1].replace("0 to replace", ""), res.out
    assert "update" in res.out and "limits" in res.out, res.out


# -- enforcement ------------------------------------------------------------------------

def budget_events(repo: Path) -> list[dict[str, Any]]:
    return [e for e in events.read(repo) if e.get("event") == "BudgetExceeded"]


def test_enforce_stops_the_agent_and_its_subtree_keeping_their_work(
        repo: Path, engine, destroy) -> None:  # type: ignore[no-untyped-def]
    tree(repo)
    assert engine("apply", "--auto-approve").code == 0
    running(engine, {"seed", "kid", "grandkid", "other"})
    wt = repo / ".engine/worktrees/demo"
    until(lambda: (wt / "grandkid/notes.txt").exists(), "grandkid's notes")
    # kid's subtree crosses kid's budget: kid and grandkid stop, seed and other run on
    report(repo, {"kid": {"costUSD": 0.3}, "grandkid": {"costUSD": 0.25}})
    assert enforce(repo) == ["kid", "grandkid"]
    rows = status(engine)
    assert {n: r["phase"] for n, r in rows.items()} == {
        "seed": "Running", "other": "Running", "kid": "Stopped", "grandkid": "Stopped"}
    assert rows["kid"]["conditions"] == [
        {"type": "Budget", "message": "budget exceeded: maxCostUSD 0.50, used $0.55"}]
    assert "budget of kid exceeded" in rows["grandkid"]["reason"]
    rec = inventory.load(repo / ".engine", "demo").agents["kid"]
    assert rec.stopped and rec.stopped_reason == "budget exceeded: maxCostUSD 0.50, used $0.55"
    # the work is kept twice over: the workspace stays, and an archive holds it
    assert (wt / "kid/notes.txt").read_text() == "kid\n"
    res = engine("restore", "--list", "kid")
    assert res.code == 0 and "refs/engine/archive/demo/kid/1" in res.out, res
    assert git(repo, "show", "refs/engine/archive/demo/grandkid/1:notes.txt") == "grandkid"
    [ev] = budget_events(repo)
    assert (ev["agent"], ev["limit"], ev["used"], ev["stopped"]) == (
        "kid", "maxCostUSD", pytest.approx(0.55), ["kid", "grandkid"])
    assert ev["reason"] == "budget exceeded: maxCostUSD 0.50, used $0.55"
    # a second pass does nothing: no stop, no event
    assert enforce(repo) == []
    assert len(budget_events(repo)) == 1
    # then seed's subtree crosses seed's budget: the rest of the tree stops, once
    report(repo, {"seed": {"costUSD": 0.3}, "other": {"costUSD": 0.2}})
    assert enforce(repo) == ["seed", "other"]
    assert {r["phase"] for r in status(engine).values()} == {"Stopped"}
    assert [e["agent"] for e in budget_events(repo)] == ["kid", "seed"]
    assert enforce(repo) == []
    # neither apply nor a controller starts them again (seed has restart: always)
    res = engine("apply", "--auto-approve")
    assert res.code == 0, res
    assert engine("watch", "--once", "--working-tree").code == 0
    assert {r["phase"] for r in status(engine).values()} == {"Stopped"}
    assert len(budget_events(repo)) == 2


def test_hold_keeps_a_plan_from_starting_what_enforce_stopped(repo: Path) -> None:
    tree(repo)
    g = desired_grove(repo)
    p = plan.plan_grove(g, observe(repo, "demo", g, Runtimes(repo)))
    held = budget.hold(p, ["kid", "grandkid"])
    actions = {c.agent: (c.action.word, c.reason) for c in held.changes}
    assert actions["kid"] == ("no-op", "stopped: budget exceeded")
    assert actions["grandkid"] == ("no-op", "stopped: budget exceeded")
    assert actions["seed"][0] == actions["other"][0] == "create"
    assert budget.hold(p, []) is p


def test_turns_count_only_the_agents_own(repo: Path, engine, destroy
                                         ) -> None:  # type: ignore[no-untyped-def]
    tree(repo)
    assert engine("apply", "--auto-approve").code == 0
    running(engine, {"seed", "kid", "grandkid", "other"})
    report(repo, {"kid": {"turns": 40}, "grandkid": {"turns": 40}})  # 80 below seed
    assert enforce(repo) == []
    report(repo, {"kid": {"turns": 50}})
    assert enforce(repo) == ["kid", "grandkid"]
    assert budget_events(repo)[0]["reason"] == "budget exceeded: maxTurns 50, used 50"


def test_engine_start_refuses_while_the_budget_is_crossed(
        repo: Path, engine, destroy) -> None:  # type: ignore[no-untyped-def]
    tree(repo)
    assert engine("apply", "--auto-approve").code == 0
    running(engine, {"seed", "kid", "grandkid", "other"})
    report(repo, {"seed": {"costUSD": 0.9, "inputTokens": 10, "outputTokens": 5},
                  "kid": {"costUSD": 0.15}})
    assert enforce(repo) == ["seed", "kid", "other", "grandkid"]
    res = engine("start", "seed")
    one_error(res, "agent demo/seed: budget exceeded: maxCostUSD 1.00, used $1.05",
              "raise limits.maxCostUSD")
    # below a crossed budget, too: its usage would count against it
    one_error(engine("start", "grandkid"), "the budget of seed", "maxCostUSD 1.00")
    # and no other way round it: restart and resume refuse alike
    one_error(engine("restart", "seed"), "budget exceeded", "raise limits.maxCostUSD")
    one_error(engine("resume", "kid", "--task", "go on"), "the budget of seed")
    assert status(engine)["seed"]["phase"] == "Stopped"
    # the limit raised in the manifests: it starts (and is not stopped again)
    tree(repo, seed_cost="3.0")
    res = engine("start", "seed")
    assert res.code == 0, res
    running(engine, {"seed"})
    assert enforce(repo) == []


# -- the spawn gate ---------------------------------------------------------------------

LEAD = """\
    - name: lead
      limits: {maxCostUSD: 1.0}
      task: |
        engine spawn big --profile small --wait --timeout 120 --task 'sleep 1' 2> big.err
        echo $? > big.rc
        engine spawn free --wait --timeout 120 --task 'sleep 1' 2> free.err
        echo $? > free.rc
        sleep 300
"""


def _requests(repo: Path) -> set[str]:
    box = repo / ".engine/inbox/demo/lead"
    return {p.name for p in box.glob("req-*.json")} if box.is_dir() else set()


def test_spawn_gate_refuses_a_child_whose_budget_is_more_than_is_left(
        repo: Path, engine, destroy) -> None:  # type: ignore[no-untyped-def]
    grove(repo, LEAD)
    assert engine("apply", "--auto-approve").code == 0
    first = until(lambda: _requests(repo), "lead's first spawn request")
    report(repo, {"lead": {"costUSD": 0.5}})
    assert engine("apply", "--auto-approve").code == 0  # ingests the request
    wt = repo / ".engine/worktrees/demo/lead"
    until(lambda: (wt / "big.rc").exists(), "the answer to big")
    assert (wt / "big.rc").read_text().strip() == "1"
    err = (wt / "big.err").read_text()
    assert "limits.maxCostUSD: would get 0.80; lead has 0.50 left of its 1.00" in err, err
    assert not (repo / "groves/demo/spawned.yaml").exists()  # nothing written back
    # a child without a budget of its own is fine: its usage counts against lead's
    until(lambda: _requests(repo) - first, "lead's second spawn request")
    assert engine("apply", "--auto-approve").code == 0
    until(lambda: (wt / "free.rc").exists(), "the answer to free")
    assert (wt / "free.rc").read_text().strip() == "0", (wt / "free.err").read_text()
    assert "name: free" in (repo / "groves/demo/spawned.yaml").read_text()
    # once lead has used its budget, no child at all
    g = desired_grove(repo)
    report(repo, {"lead": {"costUSD": 1.0}})
    inv = inventory.load(repo / ".engine", "demo")
    with pytest.raises(EngineError, match="lead has used its budget"):
        budget.check_spawn(g, g.agent("lead"), g.agent("free"), inv)


def test_schema_files_are_valid() -> None:
    for name in ("cost.json", "status.json"):
        doc = json.loads((ROOT / "schemas" / name).read_text())
        assert doc["$id"] == f"https://grove-engine.dev/schemas/{name}"


PENDING_CHILD = """\
    - name: seed
      task: 'sleep 300'
      limits: {maxCostUSD: 1.0}
    - name: gate
      task: 'sleep 4'
    - name: late
      spawnedBy: seed
      dependsOn: [gate]
      task: 'echo late > late.txt; sleep 300'
"""


def test_a_child_pending_under_a_crossed_budget_never_starts(
        repo: Path, engine, destroy) -> None:  # type: ignore[no-untyped-def]
    grove(repo, PENDING_CHILD)
    assert engine("apply", "--auto-approve").code == 0
    running(engine, {"seed", "gate"})
    assert status(engine)["late"]["phase"] == "Pending"  # waits for gate
    report(repo, {"seed": {"costUSD": 1.5}})
    assert enforce(repo) == ["seed"]  # late was not started: nothing of it to stop
    until(lambda: status(engine)["gate"]["phase"] == "Succeeded", "gate to succeed")
    res = engine("apply", "--auto-approve")  # late could start now...
    assert res.code == 0, res
    st = status(engine)
    assert st["late"]["phase"] == "Pending", st["late"]  # ...but its usage would count
    # against seed's crossed budget
