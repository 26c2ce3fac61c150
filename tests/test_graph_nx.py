"""The spawn graph is a networkx DiGraph, and only commands that build one import networkx:
`validate` and `status` (the 1,000-agent validate target is 0.5 s) never pay its import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import graph
from tests.conftest import git, write_grove

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: demo}
spec:
  defaults: {profile: local, harness: shell}
  profiles:
    local: {runtime: local, spawn: {allowProfiles: [local]}}
  agents:
    - name: lead
      task: "true"
    - name: coder
      task: "true"
      spawnedBy: lead
    - name: tester
      task: "true"
      dependsOn: [coder]
"""


def imported(repo: Path, *args: str) -> set[str]:
    """Top-level packages `python -m engine ARGS` imports, read from -X importtime."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "engine", *args], cwd=repo,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in p.stderr.splitlines()
            if ln.startswith("import time:") and ln.count("|") == 2}


def test_validate_and_status_do_not_import_networkx(repo: Path) -> None:
    write_grove(repo, "demo", GROVE)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    assert "networkx" not in imported(repo, "validate")
    assert "networkx" not in imported(repo, "status")
    # the check can see networkx when it is there: the commands that build a graph
    assert "networkx" in imported(repo, "plan")
    assert "networkx" in imported(repo, "graph", "--format", "json")


def test_build_is_a_digraph_with_edge_kinds_in_sorted_order() -> None:
    g = graph.build(["tester", "lead", "coder", "ghost-free"],
                    {"coder": "lead", "tester": None, "ghost-free": "nobody"},
                    {"tester": ["coder", "lead", "missing"], "coder": ["lead"]})
    assert isinstance(g, nx.DiGraph)
    assert list(g.nodes) == ["coder", "ghost-free", "lead", "tester"]
    # parent -> child wins over a dependsOn of the same pair; unknown names are left out
    assert [(u, v, k) for u, v, k in g.edges(data="kind")] == [
        ("coder", "tester", graph.DEPENDS), ("lead", "coder", graph.PARENT),
        ("lead", "tester", graph.DEPENDS)]
    assert graph.generations(g) == [["ghost-free", "lead"], ["coder"], ["tester"]]
    assert graph.descendants(g, "lead") == {"coder", "tester"}
    assert graph.descendants(g, "tester") == set()
    assert graph.descendants(g, "not-there") == set()
    assert graph.find_cycle(g) is None


def test_a_cycle_is_a_closed_path_and_no_order() -> None:
    g = graph.build(["a", "b", "c", "d"], {"b": "a"}, {"c": ["b"], "a": ["c"], "d": ["a"]})
    assert graph.find_cycle(g) == ["a", "b", "c", "a"]
    with pytest.raises(ValueError, match="cycle"):
        graph.generations(g)
    assert graph.descendants(g, "a") == {"b", "c", "d"}  # never the node itself


def test_json_of_a_cycle_has_no_generations() -> None:
    g = graph.build(["a", "b"], {}, {"a": ["b"], "b": ["a"]})
    assert '"generations": []' in graph.to_json(g, "g")


def test_validate_reports_a_cycle_from_its_smallest_name(engine: Any, repo: Path) -> None:
    """graphlib finds the cycle; the message starts it at its smallest name, whatever
    order the agents are written in."""
    write_grove(repo, "g", "apiVersion: engine/v1alpha1\nkind: Grove\nmetadata:\n  name: g\n"
                "spec:\n  agents:\n"
                "    - name: c\n      task: x\n      dependsOn: [b]\n"
                "    - name: b\n      task: x\n      spawnedBy: a\n"
                "    - name: a\n      task: x\n      dependsOn: [c]\n")
    res = engine("validate")
    assert res.code == 1
    assert "agent a: dependency cycle: a -> c -> b -> a (each waits for the next)" in res.err


def kahn(nodes: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """An independent oracle: generations by hand (Kahn), each sorted."""
    pred = {n: {u for u, v in edges if v == n} for n in nodes}
    out, done = [], set()
    while len(done) < len(nodes):
        gen = sorted(n for n in nodes if n not in done and pred[n] <= done)
        assert gen, "cycle"
        out.append(gen)
        done |= set(gen)
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=20),
       st.integers(1, 10))
def test_generations_and_descendants_agree_with_an_oracle(pairs: list[tuple[int, int]],
                                                          n: int) -> None:
    names = [f"a{i}" for i in range(n)]
    # only backward edges, so a DAG: i depends on j < i, or j spawned i
    deps = {f"a{i}": [f"a{j}" for k, j in pairs if k == i and j < i] for i in range(n)}
    parents = {f"a{i}": f"a{j}" for j, i in pairs if j < i < n}
    g = graph.build(names, parents, deps)
    edges = list(g.edges)
    assert graph.generations(g) == kahn(sorted(names), edges)
    for x in names:
        reach: set[str] = set()
        todo = [x]
        while todo:
            u = todo.pop()
            for v in (b for a, b in edges if a == u and b not in reach):
                reach.add(v)
                todo.append(v)
        assert graph.descendants(g, x) == reach
