"""Property tests of the pure stages (plan, graph) and one real-runtime property:
plan(desired, observe(apply(plan))) == no changes, with every edge respected in order."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import desired, graph, manifest
from engine.actual import Actual
from engine.inventory import Inventory, Record
from engine.plan import Action, plan_grove
from engine.runtimes import SUCCEEDED, Observed
from tests.conftest import git, searchable


@st.composite
def groves(draw: st.DrawFn, max_agents: int = 8) -> list[dict]:
    """Agent lists whose dependsOn/spawnedBy edges only point backwards: always a DAG."""
    n = draw(st.integers(1, max_agents))
    agents = []
    for i in range(n):
        a: dict = {"name": f"a{i}", "task": draw(st.sampled_from(["true", "echo hi", "exit 0"]))}
        if i and draw(st.booleans()):
            a["dependsOn"] = sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=2))))
            a["dependsOn"] = [f"a{j}" for j in a["dependsOn"]]
        if i and draw(st.booleans()):
            a["spawnedBy"] = f"a{draw(st.integers(0, i - 1))}"
        agents.append(a)
    return agents


def grove_text(agents: list[dict]) -> str:
    doc = {"apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": "p"},
           "spec": {"policy": {"maxAgents": 50, "maxDepth": 10, "maxChildren": 10},
                    "agents": agents}}
    return json.dumps(doc)


def build(tmp: Path, agents: list[dict]) -> desired.DesiredGrove:
    d = tmp / "groves" / "p"
    d.mkdir(parents=True, exist_ok=True)
    (d / "grove.yaml").write_text(grove_text(agents))
    return desired.build(manifest.load_grove(d, tmp), desired.Options(resolve_secrets=False))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(agents=groves())
def test_plan_of_converged_state_is_empty_and_order_respects_edges(tmp_path: Path,
                                                                    agents: list[dict]) -> None:
    g = build(tmp_path, agents)
    first = plan_grove(g, Actual("p", Inventory("p"), {}))
    assert all(c.action in (Action.CREATE,) for c in first.changes)
    # what a successful apply leaves behind: every agent recorded and Succeeded
    inv = Inventory("p", "lin", 1, {a.name: Record(a.spec_hash, a.settings, a.runtime)
                                    for a in g.agents})
    observed = {a.name: Observed("p", a.name, "local", a.spec_hash, SUCCEEDED, 0)
                for a in g.agents}
    again = plan_grove(g, Actual("p", inv, observed))
    assert not again.has_changes
    gr = graph.build(g.by_name, {a.name: a.spawned_by for a in g.agents},
                     {a.name: a.depends_on for a in g.agents})
    pos = {n: i for i, gen in enumerate(graph.generations(gr)) for n in gen}
    for u, v in gr.edges:
        assert pos[u] < pos[v]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(agents=groves(), drop=st.integers(0, 7))
def test_removing_an_agent_deletes_exactly_it(tmp_path: Path, agents: list[dict],
                                              drop: int) -> None:
    g = build(tmp_path, agents)
    inv = Inventory("p", "lin", 1, {a.name: Record(a.spec_hash, a.settings, a.runtime)
                                    for a in g.agents})
    observed = {a.name: Observed("p", a.name, "local", a.spec_hash, SUCCEEDED, 0)
                for a in g.agents}
    victim = f"a{drop % len(agents)}"
    keep = [dict(a) for a in agents if a["name"] != victim]
    for a in keep:
        if a.get("spawnedBy") == victim:
            del a["spawnedBy"]
        if victim in a.get("dependsOn", []):
            a["dependsOn"] = [d for d in a["dependsOn"] if d != victim]
    g2 = build(tmp_path, keep)
    p = plan_grove(g2, Actual("p", inv, observed))
    deletes = [c.agent for c in p.changes if c.action is Action.DELETE]
    assert deletes == [victim]


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(agents=groves(max_agents=5))
def test_real_apply_then_plan_is_empty(tmp_path_factory, agents: list[dict]) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path_factory.mktemp("prop")
    searchable(repo)
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text(".engine/\n")
    d = repo / "groves" / "p"
    d.mkdir(parents=True)
    (d / "grove.yaml").write_text(grove_text(agents))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")

    def engine(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "engine", *args], cwd=repo,
                              capture_output=True, text=True, timeout=120)

    p = engine("apply", "--auto-approve", "--wait", "--json-stream", "--timeout", "60")
    assert p.returncode == 0, p.stdout + p.stderr
    started = [json.loads(ln)["agent"] for ln in p.stdout.splitlines()
               if ln.startswith("{") and '"started"' in ln]
    order = {n: i for i, n in enumerate(started)}
    for a in agents:
        for dep in [*a.get("dependsOn", []), *([a["spawnedBy"]] if "spawnedBy" in a else [])]:
            assert order[dep] < order[a["name"]]
    assert engine("plan", "--detailed-exitcode").returncode == 0
    engine("destroy", "--auto-approve")


@settings(max_examples=80, deadline=None)
@given(agents=groves(max_agents=12))
def test_generations_match_networkx(agents: list[dict]) -> None:
    """The engine's wrappers agree with networkx's walks on a copy of the graph."""
    import networkx as nx

    g = graph.build([a["name"] for a in agents],
                    {a["name"]: a.get("spawnedBy") for a in agents},
                    {a["name"]: a.get("dependsOn", []) for a in agents})
    ref = nx.DiGraph(g)
    assert graph.generations(g) == [sorted(x) for x in nx.topological_generations(ref)]
    for n in g.nodes:
        assert graph.descendants(g, n) == nx.descendants(ref, n)
    assert graph.find_cycle(g) is None
    ref.add_edge(agents[-1]["name"], agents[0]["name"])
    if nx.is_directed_acyclic_graph(ref):
        return
    g.add_edge(agents[-1]["name"], agents[0]["name"])
    cycle = graph.find_cycle(g)
    assert cycle and cycle[0] == cycle[-1]
    assert all(g.has_edge(u, v) for u, v in itertools.pairwise(cycle))
