"""Topology diff between git revisions: revisions, topology, `engine graph`, plan_between.

Real git repositories and the real CLI; desired states are built from real manifests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import desired, graph, manifest, revisions, topology, topology_render
from engine.errors import EngineError
from tests.conftest import ROOT, git, write_grove


def grove_yaml(name: str, agents: dict[str, dict[str, Any]], **spec: Any) -> str:
    doc = {"apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": name},
           "spec": {"defaults": {"profile": "local", "harness": "shell"},
                    "policy": {"maxAgents": 5000, "maxDepth": 10, "maxChildren": 500},
                    "profiles": {"local": {"runtime": "local", "env": {"A": "1"}}},
                    **spec,
                    "agents": [{"name": n, "task": f"echo {n}", **a}
                               for n, a in agents.items()]}}
    return yaml.safe_dump(doc, sort_keys=False)


def build(name: str, agents: dict[str, dict[str, Any]], **spec: Any) -> desired.DesiredGrove:
    src = manifest.load_grove(Path("/nonexistent/groves") / name, Path("/nonexistent"),
                              texts={"grove.yaml": grove_yaml(name, agents, **spec)})
    return desired.build(src, desired.Options(resolve_secrets=False))


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


BASE = {"lead": {}, "coder": {"spawnedBy": "lead"}, "tester": {"dependsOn": ["coder"]},
        "old": {"spawnedBy": "lead"}}
HEAD = {"lead": {}, "coder": {"spawnedBy": "lead", "restart": "always", "env": {"B": "2"}},
        "tester": {"dependsOn": ["coder"]}, "helper": {"spawnedBy": "coder"}}


# -- compare ------------------------------------------------------------------------------

def test_compare_reports_added_removed_changed_fields_and_edges() -> None:
    d = topology.compare(build("demo", BASE), build("demo", HEAD))
    assert d.status == "changed"
    assert [a.name for a in d.added] == ["helper"]
    assert d.added[0].parent == "coder"
    assert [a.name for a in d.removed] == ["old"]
    assert [(c.name, c.fields) for c in d.changed] == [("coder", ("env.B", "restart"))]
    assert d.unchanged == ("lead", "tester")
    assert d.edges_added == (topology.Edge("coder", "helper", graph.PARENT),)
    assert d.edges_removed == (topology.Edge("lead", "old", graph.PARENT),)
    assert d.has_changes


def test_compare_with_a_missing_side_is_all_added_or_all_removed() -> None:
    new = topology.compare(None, build("demo", BASE))
    assert new.status == "added" and len(new.added) == 4 and not new.removed
    gone = topology.compare(build("demo", BASE), None)
    assert gone.status == "removed" and len(gone.removed) == 4 and not gone.added
    assert len(gone.edges_removed) == 3


def test_profile_change_marks_every_agent_using_it_changed() -> None:
    base = build("demo", {"a": {}, "b": {}})
    head = build("demo", {"a": {}, "b": {}},
                 profiles={"local": {"runtime": "local", "env": {"A": "2"}}})
    d = topology.compare(base, head)
    assert [(c.name, c.fields) for c in d.changed] == [("a", ("env.A",)), ("b", ("env.A",))]
    assert not d.edges_added and not d.edges_removed


def test_edges_match_the_spawn_graph_of_engine_graph() -> None:
    g = build("demo", {**HEAD, "x": {"spawnedBy": "lead", "dependsOn": ["lead", "tester"]}})
    nx_graph = graph.build([a.name for a in g.agents], {a.name: a.spawned_by for a in g.agents},
                           {a.name: a.depends_on for a in g.agents})
    want = {(u, v, nx_graph.edges[u, v]["kind"]) for u, v in nx_graph.edges}
    assert {(e.source, e.target, e.kind) for e in topology.edges_of(g)} == want


names = st.lists(st.sampled_from([f"a{i}" for i in range(8)]), unique=True, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names, names, st.sets(st.sampled_from([f"a{i}" for i in range(8)])))
def test_compare_partitions_every_agent(base: list[str], head: list[str],
                                        tweak: set[str]) -> None:
    b = build("p", {n: {} for n in base}) if base else None
    h = build("p", {n: ({"restart": "always"} if n in tweak else {}) for n in head}) \
        if head else None
    if b is None and h is None:
        return
    d = topology.compare(b, h)
    assert {a.name for a in d.added} == set(head) - set(base)
    assert {a.name for a in d.removed} == set(base) - set(head)
    assert {c.name for c in d.changed} == set(base) & set(head) & tweak
    assert set(d.unchanged) == (set(base) & set(head)) - tweak
    same = topology.compare(h, h) if h else topology.compare(b, b)
    assert not same.has_changes and same.status == "unchanged"


# -- collapsing and Markdown ------------------------------------------------------------

def big_tree(n_seeds: int, fan: int, depth: int) -> dict[str, dict[str, Any]]:
    agents: dict[str, dict[str, Any]] = {f"s{i}": {} for i in range(n_seeds)}
    level = list(agents)
    for _ in range(depth):
        nxt = []
        for p in level:
            for j in range(fan):
                agents[f"{p}-{j}"] = {"spawnedBy": p}
                nxt.append(f"{p}-{j}")
        level = nxt
    return agents


def test_graph_of_a_big_grove_shows_only_the_changed_branch() -> None:
    base = big_tree(10, 3, 3)  # 10 + 30 + 90 + 270 = 400 agents
    head = {**base, "s4-1-2-new": {"spawnedBy": "s4-1-2"}}
    head["s7-0-0-0"] = {"spawnedBy": "s7-0-0", "restart": "on-failure"}
    d = topology.compare(build("big", base), build("big", head))
    shown, folded = topology_render.visible(d)
    assert shown == {"s4", "s4-1", "s4-1-2", "s4-1-2-new", "s7", "s7-0", "s7-0-0", "s7-0-0-0"}
    assert sum(folded.values()) == 401 - len(shown)
    assert folded[None] == 8 * 40  # the 8 other seeds with their subtrees
    assert folded["s4"] == 2 * 13 and folded["s4-1"] == 2 * 4 and folded["s4-1-2"] == 3
    mermaid = topology_render.to_mermaid(d)
    assert mermaid.count('["') == len(shown) + len(folded)
    assert 'n_MORE["+320 unchanged"]' in mermaid
    assert 'n_MORE_s4["+26 unchanged"]' in mermaid  # s4-0 and s4-2 with their children
    assert "n_s4_1_2 ==> n_s4_1_2_new" in mermaid
    assert "class n_s4_1_2_new added" in mermaid and "class n_s7_0_0_0 changed" in mermaid
    # plain arrows: the 5 unchanged parent -> child edges between drawn agents, and one
    # from each drawn agent to the box folding its unchanged children
    assert mermaid.count("-->") == 5 + len([a for a in folded if a])


def test_markdown_has_summary_table_and_styled_mermaid(repo: Path) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    commit(repo, "base")
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    text, changed = topology.plan_between(repo, None, "HEAD")
    assert changed
    assert text.startswith(topology_render.MARKER)
    assert "## Grove topology: 1 added, 1 removed, 1 changed, 2 unchanged" in text
    assert "| added | `helper` | `coder` | local | shell | local | new agent |" in text
    assert "| removed | `old` | `lead` |" in text
    assert "| changed | `coder` | `lead` | local | shell | local | `env.B`, `restart` |" in text
    mermaid = text.split("```mermaid\n")[1].split("```")[0]
    assert "n_coder ==> n_helper" in mermaid and "n_lead -.-> n_old" in mermaid
    assert "classDef added fill:#d4f8d4" in mermaid
    assert "classDef removed fill:#f8d4d4" in mermaid
    assert "class n_old removed" in mermaid and "class n_coder changed" in mermaid


def test_markdown_is_capped_with_a_note() -> None:
    base = build("big", big_tree(40, 5, 1))  # 240 agents
    head = build("big", {n: {**a, "restart": "always"} for n, a in big_tree(40, 5, 1).items()})
    report = topology.Report(revisions.Side("base", "main", "a" * 40),
                             revisions.Side("head", None, None),
                             (topology.compare(base, head),))
    full = topology.render(report, "markdown", limit=10**6)
    assert "| ... | 40 more not shown |" in full  # 200 rows at most per grove
    # the cap, not the size, left those rows out, and the note says so
    assert full.endswith("\n> Left out: grove `big`: 40 of 240 table rows (at most 200 of "
                         "each per grove). Run `engine graph --base REF --format json` for "
                         "the full diff.\n")
    short = topology.render(report, "markdown", limit=5000)
    assert len(short) <= 5000
    assert "> Left out to keep this comment under 5,000 characters (GitHub's limit is " \
           "65,536): the graph of 1 grove; grove `big`: " in short
    rows = short.count("| changed |")
    assert f"grove `big`: {240 - rows} of 240 table rows (at most {rows} of each" in short
    assert "```mermaid" not in short
    assert short.count("```") % 2 == 0


def test_markdown_summarises_a_graph_too_big_to_read() -> None:
    d = topology.compare(None, build("big", big_tree(40, 9, 1)))  # 400 agents added
    report = topology.Report(revisions.Side("base", "main", "a" * 40),
                             revisions.Side("head", None, None), (d,))
    text = topology.render(report, "markdown")
    note = text.split("\n_Summarised: ")[1].split("_\n")[0]
    assert note.startswith("the whole chart has 400 boxes (a readable chart holds 300). "
                           "Drawn: the first ")
    mermaid = text.split("```mermaid\n")[1].split("```")[0]
    boxes = mermaid.count('["')
    assert boxes <= topology_render.MAX_GRAPH_NODES
    drawn = int(note.split("Drawn: the first ")[1].split(" ")[0])
    folded = int(note.split("the other ")[1].split(" ")[0])
    assert drawn + folded == 400 and folded > 0
    assert f'["+{folded} more agents"]' in mermaid or "more agents" in mermaid
    assert len(text) <= topology_render.MARKDOWN_LIMIT


def test_markdown_lists_every_edge_its_summary_counts() -> None:
    d = topology.compare(build("demo", BASE), build("demo", HEAD))
    report = topology.Report(revisions.Side("base", "main", "a" * 40),
                             revisions.Side("head", None, None), (d,))
    text = topology.render(report, "markdown")
    assert "spawn edges: 1 added, 1 removed." in text
    assert "- added edge `coder` → `helper` (spawned)" in text
    assert "- removed edge `lead` → `old` (spawned)" in text
    assert text.count("- added edge") == 1 and text.count("- removed edge") == 1


# -- revisions: bad input ---------------------------------------------------------------

def test_missing_revision_is_one_line(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    r = engine("graph", "--base", "no-such-branch")
    assert r.code == 1
    assert r.err == "error: revision no-such-branch not found\n"
    assert engine("graph", "--base", "--help-me").code != 0


def test_grove_missing_at_base_is_all_added(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    r = engine("graph", "--base", "HEAD", "--format", "json")
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert doc["groves"][0]["status"] == "added"
    assert [a["name"] for a in doc["groves"][0]["added"]] == ["coder", "lead", "old", "tester"]


def test_grove_deleted_in_head_is_all_removed(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    first = commit(repo, "add")
    git(repo, "rm", "-rq", "groves")
    commit(repo, "remove")
    r = engine("graph", "--base", first, "--head", "HEAD", "--format", "text")
    assert r.code == 0, r
    assert "grove demo (removed)" in r.out and "  - old (spawned by lead)" in r.out


def test_invalid_base_says_which_side_and_where(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE) + "    colour: red\n")
    commit(repo, "broken")
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    r = engine("graph", "--base", "HEAD")
    assert r.code == 1
    first = r.err.splitlines()[0]
    assert first.startswith("error: base HEAD (")
    assert "invalid manifests: groves/demo/grove.yaml:" in first
    assert "colour" in first


def test_invalid_head_says_head(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    commit(repo, "ok")
    write_grove(repo, "demo", grove_yaml("demo", HEAD).replace("dependsOn:\n    - coder",
                                                               "dependsOn:\n    - nobody"))
    r = engine("graph", "--base", "HEAD", "--format", "markdown")
    assert r.code == 1
    assert r.err.startswith("error: head working tree: invalid manifests: groves/demo/grove.yaml:")
    assert "unknown agent 'nobody'" in r.err


def test_not_a_git_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              engine: Any) -> None:
    write_grove(tmp_path, "demo", grove_yaml("demo", BASE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    r = engine("graph", "--base", "HEAD")
    assert r.code == 1 and "not a git repository" in r.err


def test_revision_reads_committed_text_not_the_working_tree(repo: Path) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    write_grove(repo, "demo", "apiVersion: engine/v1alpha1\nkind: Agent\nmetadata: {name: x}\n"
                              "spec: {task: t}\n", file="spawned.yaml")
    sha = commit(repo, "base")
    (repo / "groves/demo/spawned.yaml").unlink()
    (repo / "groves/demo/notes.txt").write_text("not yaml")
    side, groves = revisions.load_revision(repo, "HEAD")
    assert side.commit == sha
    assert sorted(groves["demo"].by_name) == ["coder", "lead", "old", "tester", "x"]
    assert groves["demo"].agent("x").source == "groves/demo/spawned.yaml:4"
    with pytest.raises(EngineError, match="grove nope: not found"):
        topology.diff_revisions(repo, ["nope"], "HEAD")


# -- engine graph, plan_between ----------------------------------------------------------

def test_graph_without_base_renders_current_manifests(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    r = engine("graph")
    assert r.code == 0 and r.out.startswith("flowchart TD")
    assert "n_lead --> n_coder" in r.out and "n_coder -->|dependsOn| n_tester" in r.out
    assert '"coder" -> "helper";' in engine("graph", "--format", "dot").out
    doc = json.loads(engine("graph", "--format", "json").out)
    assert doc["grove"] == "demo" and len(doc["nodes"]) == 4
    tree = engine("graph", "--format", "text").out
    assert "  lead\n    coder\n      helper\n  tester  (after coder)\n" in tree
    write_grove(repo, "other", grove_yaml("other", BASE))
    several = engine("graph")
    assert several.code == 1 and "several groves here" in several.err
    assert engine("graph", "-g", "other", "--format", "json").code == 0
    assert "### Grove `other`" in engine("graph", "--format", "markdown").out


def test_graph_head_without_base_is_a_usage_error(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    r = engine("graph", "--head", "HEAD")
    assert r.code == 2 and "--head needs --base" in r.err


def test_graph_compares_two_revisions(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    a = commit(repo, "a")
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    commit(repo, "b")
    write_grove(repo, "demo", grove_yaml("demo", {}))  # the working tree is ignored
    r = engine("graph", "--base", a, "--head", "HEAD", "--format", "text")
    assert r.code == 0, r
    assert "  + helper (spawned by coder)\n  - old (spawned by lead)\n" in r.out
    assert "  ~ coder: env.B, restart\n" in r.out
    assert "Topology: 1 added, 1 removed, 1 changed, 2 unchanged; edges: 1 added, " \
           "1 removed." in r.out
    mermaid = engine("graph", "--base", a, "--head", "HEAD").out
    assert "class n_helper added" in mermaid


def test_plan_between_formats_and_unchanged(repo: Path) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    commit(repo, "a")
    text, changed = topology.plan_between(repo, ["demo"], "HEAD", fmt="text")
    assert not changed and "no changes" in text
    md, _ = topology.plan_between(repo, None, "HEAD", None, "markdown")
    assert "No topology changes (4 agents unchanged)." in md
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    out, changed = topology.plan_between(repo, None, "HEAD", fmt="json")
    assert changed and json.loads(out)["summary"]["added"] == 1
    with pytest.raises(EngineError, match="unknown format"):
        topology.plan_between(repo, None, "HEAD", fmt="yaml")


def test_json_matches_the_published_schema(repo: Path) -> None:
    schema = json.loads((ROOT / "schemas" / "topology-diff.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    commit(repo, "a")
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    write_grove(repo, "new", grove_yaml("new", {"solo": {}}))
    out, _ = topology.plan_between(repo, None, "HEAD", fmt="json")
    doc = json.loads(out)
    assert sorted(e.message for e in v.iter_errors(doc)) == []
    assert [g["status"] for g in doc["groves"]] == ["changed", "added"]
    assert doc["head"] == {"label": "head", "ref": None, "commit": None, "workingTree": True}
    bad = {**doc, "summary": {**doc["summary"], "added": "one"}}
    assert list(v.iter_errors(bad))


def test_engine_plan_base_goes_through_plan_between(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    commit(repo, "a")
    same = engine("plan", "--base", "HEAD", "--detailed-exitcode")
    assert same.code == 0, same
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    md = engine("plan", "--base", "HEAD", "--format", "markdown", "--detailed-exitcode")
    assert md.code == 2, md
    assert md.out.startswith(topology_render.MARKER)
    assert "| added | `helper` |" in md.out


def test_groves_below_the_top_of_a_monorepo(repo: Path, engine: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    infra = repo / "infra"
    write_grove(infra, "demo", grove_yaml("demo", BASE))
    commit(repo, "a")
    write_grove(infra, "demo", grove_yaml("demo", HEAD))
    monkeypatch.chdir(infra)
    r = engine("graph", "--base", "HEAD", "--format", "text")
    assert r.code == 0, r
    assert "  + helper (spawned by coder)" in r.out and "grove demo (changed)" in r.out
    hist = engine("history", "--json")
    assert hist.code == 0, hist
    assert [a["name"] for a in json.loads(hist.out)["commits"][0]["added"]] == \
        ["coder", "lead", "old", "tester"]


def test_a_grove_with_identical_files_is_built_once(repo: Path) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    write_grove(repo, "other", grove_yaml("other", BASE))
    commit(repo, "a")
    write_grove(repo, "other", grove_yaml("other", HEAD))
    _, old = revisions.load_revision(repo, "HEAD")
    _, new = revisions.load_worktree(repo, known=old)
    assert new["demo"] is old["demo"]
    assert new["other"] is not old["other"]
    assert new["other"].manifest_digest != old["other"].manifest_digest
    _, again = revisions.load_revision(repo, "HEAD", "head", known=old)
    assert again["other"] is old["other"]


def test_markdown_lists_every_edge_the_count_includes() -> None:
    base = build("demo", {"a": {}, "b": {}, "c": {"spawnedBy": "a"}})
    head = build("demo", {"a": {}, "b": {}, "c": {"spawnedBy": "b", "dependsOn": ["a"]},
                          "d": {"spawnedBy": "a"}})
    report = topology.Report(revisions.Side("base", "main", "a" * 40),
                             revisions.Side("head", None, None), (topology.compare(base, head),))
    text = topology.render(report, "markdown")
    assert "- added edge `b` → `c` (spawned)" in text
    assert "- added edge `a` → `c` (dependsOn)" in text
    assert "- removed edge `a` → `c` (spawned)" in text
    # d is in the table as added, spawned by a; its edge is counted, so it is listed too
    assert "- added edge `a` → `d` (spawned)" in text
    assert "spawn edges: 3 added, 1 removed." in text
    assert text.count("\n- added edge ") == 3 and text.count("\n- removed edge ") == 1
    assert "  + edge a -> d (spawned)" in topology.render(report, "text")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=-1, max_value=30), min_size=1, max_size=30),
       st.sets(st.integers(min_value=0, max_value=29), max_size=5))
def test_collapsing_accounts_for_every_agent_once(parents: list[int], changed: set[int]) -> None:
    # agent i's parent is an earlier agent (or none), so the spawn tree has no cycle
    infos = tuple(topology.AgentInfo(f"a{i}", f"a{p}" if 0 <= p < i else None, "local", "shell",
                                     "local") for i, p in enumerate(parents))
    changes = tuple(topology.AgentChange(a, ("task",)) for a in infos
                    if int(a.name[1:]) in changed)
    names = {c.name for c in changes}
    d = topology.TopologyDiff("g", "changed", (), (), changes,
                              tuple(a.name for a in infos if a.name not in names), (), (),
                              infos, ())
    shown, folded = topology_render.visible(d)
    parent = {a.name: a.parent for a in infos}
    assert names <= shown
    assert all(parent[n] is None or parent[n] in shown for n in shown)  # placed by ancestors
    assert len(shown) + sum(folded.values()) == len(infos)
    assert all(anchor is None or anchor in shown for anchor in folded)
