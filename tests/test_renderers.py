"""The graph renderers against the real renderers: Graphviz `dot` (Debian's /usr/bin/dot)
for every DOT output, and mermaid-cli (npm, with Debian's Chromium) for Mermaid, raw and
inside the pull-request Markdown. Big groves must stay within mermaid's limits (500 edges,
50,000 characters per diagram), colours must be ones Graphviz accepts, and text from
manifests must not break out of a label, a code span or a table cell.

Chromium renders locally: mmdc loads the page from a file and serves its own scripts
through request interception; the proxy and resolver flags below make any other request
fail instead of leaving the machine.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import desired, graph, manifest, revisions, topology, topology_render
from tests import npm_tools
from tests.conftest import git, write_grove

DOT = Path("/usr/bin/dot")
CHROMIUM = Path("/usr/bin/chromium")
MERMAID_CLI = "@mermaid-js/mermaid-cli@12.2.0"
PUPPETEER = {"executablePath": str(CHROMIUM),
             "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run",
                      "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]}
ERROR_SVG = ("Syntax error", "Maximum text size", "Parse error")


# -- helpers ------------------------------------------------------------------------------

def grove_yaml(name: str, agents: dict[str, dict[str, Any]], **spec: Any) -> str:
    doc = {"apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": name},
           "spec": {"defaults": {"profile": "local", "harness": "shell"},
                    "policy": {"maxAgents": 5000, "maxDepth": 20, "maxChildren": 500},
                    "profiles": {"local": {"runtime": "local"}}, **spec,
                    "agents": [{"name": n, "task": f"echo {n}", **a}
                               for n, a in agents.items()]}}
    return yaml.safe_dump(doc, sort_keys=False)


def tree(n: int, fan: int = 4, prefix: str = "a") -> dict[str, dict[str, Any]]:
    """`n` agents: a0 at the top, agent i spawned by agent (i - 1) // fan; every tenth one
    also waits for its left neighbour (so the chart has dependsOn edges too)."""
    agents: dict[str, dict[str, Any]] = {f"{prefix}0": {}}
    for i in range(1, n):
        a: dict[str, Any] = {"spawnedBy": f"{prefix}{(i - 1) // fan}"}
        if i % 10 == 0:
            a["dependsOn"] = [f"{prefix}{i - 1}"]
        agents[f"{prefix}{i}"] = a
    return agents


def build(name: str, agents: dict[str, dict[str, Any]], **spec: Any) -> desired.DesiredGrove:
    src = manifest.load_grove(Path("/nonexistent/groves") / name, Path("/nonexistent"),
                              texts={"grove.yaml": grove_yaml(name, agents, **spec)})
    return desired.build(src, desired.Options(resolve_secrets=False))


def report(*diffs: topology.TopologyDiff) -> topology.Report:
    return topology.Report(revisions.Side("base", "main", "a" * 40),
                           revisions.Side("head", None, None), diffs)


def mermaid_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```mermaid\n(.*?)^```$", markdown, re.S | re.M)


def edges_of(flowchart: str) -> int:
    return len(re.findall(r"^  \S+ (?:-->|==>|-\.->)", flowchart, re.M))


def run_dot(text: str) -> tuple[str, str]:
    """SVG and stderr of the real `dot -Tsvg`."""
    if not DOT.exists():
        pytest.fail("graphviz not installed (apt-get install graphviz)")
    r = subprocess.run([str(DOT), "-Tsvg"], input=text, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


@pytest.fixture(scope="module")
def mmdc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Render Mermaid text with the real mermaid-cli; returns (exit code, stderr, svg)."""
    if not CHROMIUM.exists():
        pytest.fail("chromium not installed (apt-get install chromium)")
    prefix = npm_tools.install(MERMAID_CLI)
    work = tmp_path_factory.mktemp("mmdc")
    cfg = work / "puppeteer.json"
    cfg.write_text(json.dumps(PUPPETEER))
    count = [0]

    def render(text: str) -> tuple[int, str, str]:
        count[0] += 1
        src, out = work / f"d{count[0]}.mmd", work / f"d{count[0]}.svg"
        src.write_text(text)
        r = subprocess.run([str(npm_tools.node(prefix)), str(npm_tools.bin_path(prefix, "mmdc")),
                            "-i", str(src), "-o", str(out), "-p", str(cfg), "-q"],
                           env=npm_tools.env(prefix), capture_output=True, text=True,
                           timeout=240, check=False)
        return r.returncode, r.stderr, out.read_text() if out.exists() else ""

    return render


def assert_renders(render: Any, text: str) -> str:
    code, err, svg = render(text)
    assert code == 0, err[-2000:]
    assert "<svg" in svg and not any(e in svg for e in ERROR_SVG), svg[:2000]
    return svg


# -- Graphviz -----------------------------------------------------------------------------

BASE = {"lead": {}, "coder": {"spawnedBy": "lead"}, "tester": {"dependsOn": ["coder"]},
        "old": {"spawnedBy": "lead"}}
HEAD = {"lead": {}, "coder": {"spawnedBy": "lead", "restart": "always"},
        "tester": {"dependsOn": ["coder"]}, "helper": {"spawnedBy": "coder"}}


def test_every_dot_output_renders_without_warnings_and_in_colour() -> None:
    d = topology.compare(build("demo", BASE), build("demo", HEAD))
    svg, err = run_dot(topology_render.to_dot(d))
    assert err == ""
    for colour in (*graph.COLORS.values(), *graph.FILLS.values()):
        assert f'"{colour}"' in svg, colour  # added, removed, changed: nothing all black
    plain, err = run_dot(graph.to_dot(graph.build(["a", "b"], {"b": "a"}, {}), "demo"))
    assert err == "" and plain.count('class="node"') == 2


def test_dot_rejects_the_short_colours_so_the_check_can_fail() -> None:
    svg, err = run_dot('digraph g { a [color="#b80"]; }\n')
    assert "#b80" in err and "#bb8800" not in svg


def test_dot_labels_cannot_break_out() -> None:
    hostile = 'x"]; evil [label="pwned\\'
    text = graph.to_dot(graph.build([hostile, "b"], {"b": hostile}, {}), hostile + "\n}")
    svg, err = run_dot(text)
    assert err == ""
    assert svg.count('class="node"') == 2 and svg.count('class="edge"') == 1
    titles = re.findall(r"<title>(.*?)</title>", svg)
    # the whole name is the graph's title, the whole node name a node's: nothing escaped
    assert titles[0].startswith("x&quot;]; evil [label=&quot;pwned\\") and \
        titles[0].endswith("}")
    assert sum(t.startswith("x&quot;]; evil [label=&quot;pwned") for t in titles) == 3


# -- Mermaid ------------------------------------------------------------------------------

@pytest.mark.slow
def test_big_grove_mermaid_is_summarised_and_renders(repo: Path, engine: Any, mmdc: Any) -> None:
    agents = tree(600)
    write_grove(repo, "big", grove_yaml("big", agents))
    g = build("big", agents)
    whole = graph.mermaid_text(graph.chart_of(graph.build(
        [a.name for a in g.agents], {a.name: a.spawned_by for a in g.agents},
        {a.name: a.depends_on for a in g.agents})))
    assert edges_of(whole) > graph.MERMAID_MAX_EDGES
    code, err, _ = mmdc(whole)  # the limit is real: drawn whole, the chart fails
    assert code != 0 and "Edge limit exceeded" in err

    r = engine("graph", "--format", "mermaid")
    assert r.code == 0, r
    assert r.out.startswith("flowchart TD\n%% Summarised: the whole chart has ")
    assert r.err.startswith("note: Summarised: ")
    assert edges_of(r.out) <= graph.MERMAID_MAX_EDGES and len(r.out) <= graph.MERMAID_MAX_TEXT
    note = r.out.splitlines()[1]
    drawn = int(note.split("Drawn: the first ")[1].split(" ")[0])
    folded = int(note.split("the other ")[1].split(" ")[0])
    assert drawn + folded == 600
    boxes = re.findall(r'\["\+(\d+) more agents?"\]', r.out)
    assert sum(map(int, boxes)) == folded
    svg = assert_renders(mmdc, r.out)
    assert "more agents" in svg

    md = engine("graph", "--format", "markdown")
    assert md.code == 0 and "\n_Summarised: the whole chart has " in md.out
    [block] = mermaid_blocks(md.out)
    assert edges_of(block) <= graph.MERMAID_MAX_EDGES
    assert_renders(mmdc, block)


@pytest.mark.slow
def test_pull_request_markdown_and_diff_mermaid_render(repo: Path, engine: Any,
                                                       mmdc: Any) -> None:
    write_grove(repo, "demo", grove_yaml("demo", BASE))
    write_grove(repo, "big", grove_yaml("big", tree(50)))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    write_grove(repo, "demo", grove_yaml("demo", HEAD))
    write_grove(repo, "big", grove_yaml("big", tree(600)))  # 550 agents added
    r = engine("plan", "--base", "HEAD", "--format", "markdown")
    assert r.code == 0, r
    blocks = mermaid_blocks(r.out)
    assert len(blocks) == 2
    for block in blocks:
        assert edges_of(block) <= graph.MERMAID_MAX_EDGES
        assert block.count('["') <= topology_render.MAX_GRAPH_NODES
        assert_renders(mmdc, block)
    assert "\n_Summarised: the whole chart has " in r.out
    diff = engine("graph", "-g", "big", "--base", "HEAD", "--format", "mermaid")
    assert diff.code == 0 and "%% Summarised: " in diff.out
    assert_renders(mmdc, diff.out)
    dot = engine("graph", "-g", "big", "--base", "HEAD", "--format", "dot")
    svg, err = run_dot(dot.out)
    assert err == "" and graph.COLORS["added"] in svg


@pytest.mark.slow
def test_text_size_limit_is_kept(mmdc: Any) -> None:
    # 400 boxes, no edges, long labels: under the edge limit, over the text limit
    nodes = tuple(f"n{i:03d}" for i in range(400))
    c = graph.Chart(nodes, (), {n: f"{n} " + "y" * 150 for n in nodes})
    whole = graph.mermaid_text(c)
    assert len(whole) > graph.MERMAID_MAX_TEXT
    _, _, svg = mmdc(whole)
    assert "Maximum text size" in svg  # mermaid draws an error box, and the check sees it
    text, note = graph.mermaid(c)
    assert note and f"{len(whole):,} characters of Mermaid text" in note
    assert len(graph.mermaid_document(text, note)) <= graph.MERMAID_MAX_TEXT
    assert_renders(mmdc, graph.mermaid_document(text, note))


def test_small_charts_are_drawn_whole() -> None:
    g = graph.build(["a", "b", "c"], {"b": "a"}, {"c": ["b"]})
    text, note = graph.mermaid(graph.chart_of(g))
    assert note is None
    assert text == ('flowchart TD\n  n_a["a"]\n  n_b["b"]\n  n_c["c"]\n  n_a --> n_b\n'
                    "  n_b -->|dependsOn| n_c\n")


def test_summary_folds_into_the_nearest_drawn_ancestor() -> None:
    g = graph.build([f"a{i}" for i in range(7)], {f"a{i}": f"a{(i - 1) // 2}"
                                                    for i in range(1, 7)}, {})
    c = graph.chart_of(g)
    small, folded, hidden = graph.summarise(c, {"a0", "a1", "a2"})
    assert folded == 4 and hidden == 4
    assert small.labels["REST-a1"] == "+2 more agents" and small.labels["REST-a2"] == \
        "+2 more agents"
    assert ("a1", "REST-a1", graph.PARENT) in small.edges
    text, note = graph.mermaid(c, max_boxes=5)
    assert note is not None and "7 boxes (a readable chart holds 5)" in note
    assert text.count('["') <= 5


@pytest.mark.slow
def test_mermaid_labels_cannot_break_out(mmdc: Any) -> None:
    hostile = '"] --> evil["x" <img src=x onerror=alert(1)> ``` @someone\nclick a call f()'
    c = graph.Chart(("a", "b"), (("a", "b", graph.PARENT),), {"a": hostile, "b": "b"})
    text = graph.mermaid_text(c)
    assert text.count("\n") == 4 and "<img" not in text and '"]' not in text.split("\n")[1][:-2]
    svg = assert_renders(mmdc, text)
    assert re.findall(r'id="[^"]*-flowchart-(n_\w+?)-\d+"', svg) == ["n_a", "n_b"]
    assert "<img" not in svg and "&lt;img src=x onerror=alert(1)&gt; ``` @someone" in svg


# -- Markdown -----------------------------------------------------------------------------

def hostile_grove(value: str) -> desired.DesiredGrove:
    """A grove whose profile's nodeSelector has a key a pull request chose: keys are free
    text, and the changed setting's path shows in the comment."""
    key = "x`|```\n<img src=x onerror=alert(1)>@someone [a](https://evil.invalid) \x1b[31m"
    return build("demo", {"a": {}}, defaults={"profile": "k", "harness": "shell"},
                 profiles={"k": {"runtime": "kubernetes", "image": "x:1",
                                 "nodeSelector": {key: value}}})


def outside_code(markdown: str) -> str:
    """The Markdown with code spans and the mermaid fences' contents removed."""
    text = re.sub(r"^```mermaid\n.*?^```$", "", markdown, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def test_hostile_setting_names_stay_inside_code_spans() -> None:
    d = topology.compare(hostile_grove("1"), hostile_grove("2"))
    assert d.changed and "<img" in d.changed[0].fields[0]
    md = topology.render(report(d), "markdown")
    free = outside_code(md)
    for bad in ("<img", "@someone", "](", "\x1b"):
        assert bad not in free, bad
    assert md.count("```") == 2  # the mermaid fence only
    row = next(line for line in md.splitlines() if line.startswith("| changed |"))
    assert len(re.split(r"(?<!\\)\|", row)) == 9  # 7 cells: no `|` ended one early
    text = topology.render(report(d), "text")
    assert "\x1b" not in text and "\\u001b" in text and "\\u000a" in text
    assert json.loads(topology.render(report(d), "json"))["groves"][0]["changed"]


def test_left_out_note_says_what_and_why() -> None:
    d = topology.compare(None, build("big", tree(300)))
    md = topology.render(report(d), "markdown", limit=8000)
    assert len(md) <= 8000
    note = md.split("\n> ")[-1]
    assert note.startswith("Left out to keep this comment under 8,000 characters (GitHub's "
                           "limit is 65,536): the graph of 1 grove; grove `big`: ")
    shown_rows = md.count("| added |")
    shown_edges = md.count("\n- added edge ")
    assert f"{300 - shown_rows} of 300 table rows" in note
    assert f"{299 + 29 - shown_edges} of {299 + 29} edge changes" in note
    full = topology.render(report(d), "markdown")
    assert "\n> Left out: grove `big`: 100 of 300 table rows, 128 of 328 edge changes " \
           "(at most 200 of each per grove)." in full
