"""Docs that must not rot: the CI example runs real commands, the references are generated
from the schemas and parsers, the site builds, and editor support matches the schemas."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from engine.cli import build_parser
from engine.errors import UsageError
from tests.conftest import ROOT

WORKFLOW = ROOT / "docs" / "examples" / "github-actions.yml"
# Commands the workflow uses that no module registers yet. Empty: every one exists.
PENDING: set[str] = set()
OPERATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1", ">&"}


def _gen(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def engine_commands(script: str) -> list[list[str]]:
    """Every `engine ...` command line in a shell script, as argv without redirections."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        words: list[str] = []
        for tok in [*lex, ";"]:
            if tok in OPERATORS:
                if words and words[0] == "engine":
                    out.append(words[1:])
                words = []
            else:
                words.append(tok)
    return [_strip_redirects(c) for c in out]


def _strip_redirects(argv: list[str]) -> list[str]:
    clean, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok in REDIRECTS:
            skip = True
        else:
            clean.append(tok)
    return clean


def workflow() -> dict[Any, Any]:
    doc: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return doc


def test_workflow_triggers_and_jobs() -> None:
    doc = workflow()
    on = doc[True] if True in doc else doc["on"]  # YAML 1.1 reads a bare `on` as true
    assert set(on) == {"pull_request", "push"} and on["push"]["branches"] == ["main"]
    jobs = doc["jobs"]
    assert set(jobs) == {"validate", "topology", "apply"}
    assert jobs["topology"]["if"] == "github.event_name == 'pull_request'"
    assert "refs/heads/main" in jobs["apply"]["if"]
    assert jobs["topology"]["permissions"]["pull-requests"] == "write"
    checkout = [s for s in jobs["topology"]["steps"] if "checkout" in s.get("uses", "")]
    assert checkout[0]["with"]["fetch-depth"] == 0
    apply_checkout = [s for s in jobs["apply"]["steps"] if "checkout" in s.get("uses", "")]
    assert apply_checkout[0]["with"]["clean"] is False
    scripts = {name: "\n".join(s.get("run", "") for s in job["steps"])
               for name, job in jobs.items()}
    assert "gh pr comment" in scripts["topology"]
    assert ["validate", "--no-secrets"] in engine_commands(scripts["validate"])
    topo = engine_commands(scripts["topology"])
    assert ["plan", "--base", "$BASE_SHA", "--format", "markdown"] in topo
    applied = engine_commands(scripts["apply"])
    assert any(c[0] == "apply" and "--auto-approve" in c for c in applied)


def test_every_engine_command_in_the_workflow_parses() -> None:
    parser = build_parser()
    steps = [s for job in workflow()["jobs"].values() for s in job["steps"]]
    commands = [c for s in steps for c in engine_commands(s.get("run", ""))]
    assert len(commands) >= 6
    registered = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for argv in commands:
        if argv[0] in PENDING:
            assert argv[0] not in registered, f"{argv[0]} exists now: drop it from PENDING"
            continue
        try:
            parser.parse_args(argv)
        except UsageError as e:
            pytest.fail(f"engine {shlex.join(argv)}: {e.summary}")


def test_command_extraction_sees_through_shell_syntax() -> None:
    script = ("set +e\nengine plan --detailed-exitcode --out p || test $? -eq 2\n"
              "echo engine > x && engine graph --base \"$B\" \\\n  --format json > t.json\n"
              "# engine not-a-command\n")
    assert engine_commands(script) == [["plan", "--detailed-exitcode", "--out", "p"],
                                       ["graph", "--base", "$B", "--format", "json"]]


def test_reference_is_generated_from_the_schemas() -> None:
    gen = _gen("gen_reference")
    text = gen.render()
    assert (ROOT / "docs" / "reference.md").read_text() == text, \
        "docs/reference.md is stale: run python docs/gen_reference.py"
    for schema in sorted((ROOT / "schemas" / "v1alpha1").glob("*.json")):
        props = json.loads(schema.read_text()).get("properties", {})
        if "kind" in props:
            assert f"Schema: `{json.loads(schema.read_text())['$id']}`" in text
    assert "| `spec.runtime` | string | `local`, `docker`, `kubernetes` | `local` |" in text
    assert "| `spec.policy.maxDepth` | integer | 0 to 64 | `3` |" in text


def test_commands_page_is_generated_from_the_parsers() -> None:
    gen = _gen("gen_commands")
    text = gen.render()
    assert (ROOT / "docs" / "commands.md").read_text() == text, \
        "docs/commands.md is stale: run python docs/gen_commands.py"
    assert "## engine graph" in text and "`--base` | `REF`" in text


def test_generators_check_mode_detects_a_stale_file(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _gen("gen_reference")
    monkeypatch.setattr(gen, "OUT", ROOT / "docs" / "reference.md")
    assert gen.main(["--check"]) == 0
    stale = tmp_path / "reference.md"
    stale.write_text("# old\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "OUT", stale)
    assert gen.main(["--check"]) == 1


def test_schemas_have_stable_ids_and_editors_page_names_them() -> None:
    editors = (ROOT / "docs" / "editors.md").read_text()
    for schema in sorted((ROOT / "schemas" / "v1alpha1").glob("*.json")):
        sid = json.loads(schema.read_text())["$id"]
        assert sid == f"https://grove-engine.dev/schemas/v1alpha1/{schema.name}"
        assert f"`{sid}`" in editors
    assert "# yaml-language-server: $schema=../../schemas/v1alpha1/grove.json" in editors


def test_engine_init_writes_the_modeline(tmp_path: Path, engine: Any) -> None:
    r = engine("init", str(tmp_path), "--name", "demo")
    assert r.code == 0, r
    first = (tmp_path / "groves" / "demo" / "grove.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: " \
                    "$schema=https://grove-engine.dev/schemas/v1alpha1/grove.json"


def test_getting_started_has_the_two_readme_commands() -> None:
    text = (ROOT / "docs" / "getting-started.md").read_text()
    assert ("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/engine plan -g "
            "local-demo && .venv/bin/engine apply -g local-demo --auto-approve --wait") in text
    assert "\nbash .ci/run\n" in text


def test_exit_codes_are_documented_as_the_cli_implements_them() -> None:
    import engine.cli

    doc = engine.cli.__doc__ or ""
    for code in ("0", "1", "2", "3", "130"):
        assert code in doc
    for page in ("ci.md", "commands.md"):
        text = (ROOT / "docs" / page).read_text()
        for row in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
            assert row in text, f"{page}: no exit code row {row}"
        assert "--detailed-exitcode" in text


def test_mkdocs_nav_lists_the_pages() -> None:
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = [next(iter(item.values())) for item in cfg["nav"]]
    assert pages == ["index.md", "getting-started.md", "concepts.md", "configuration.md",
                     "reference.md",
                     "commands.md", "runtimes.md", "controller.md", "operations.md",
                     "harnesses.md", "people.md", "notifications.md", "budgets.md",
                     "approval.md", "ui.md", "security.md", "ci.md",
                     "editors.md", "kubernetes.md", "scaling.md", "troubleshooting.md"]


@pytest.mark.timeout(300)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    assert mkdocs.exists(), "mkdocs is a dev dependency: pip install -e '.[dev]'"
    site = tmp_path / "site"
    r = subprocess.run([str(mkdocs), "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(site)], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr
    assert (site / "ci" / "index.html").exists()
    assert (site / "examples" / "github-actions.yml").exists()
    assert "spec.policy.maxDepth" in (site / "reference" / "index.html").read_text()
