"""The harness catalog: exact command lines, environment, credentials and files per harness
(golden files), auth selection, the missing-credential error, instructions files, overrides
and bad input. Real git and the real CLI; the agent programs themselves need network and
keys, so their command lines are checked exactly instead of run (DESIGN.md section 8).

Golden files live in tests/golden/harnesses/; `UPDATE_GOLDEN=1 pytest tests/test_harnesses.py`
rewrites them, and a stale one fails the test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import desired, harnesses, instructions, manifest, workspace
from engine.errors import InvalidManifests
from tests.conftest import ROOT, git, write_grove

GOLDEN = Path(__file__).resolve().parent / "golden" / "harnesses"
HARNESSES = ["claude", "codex", "gemini", "opencode", "shell"]
# Quotes, $, backticks, command substitution, a backslash, newlines, a tab, and a leading
# "-" that an agent program would read as an option if it were not protected.
TASK = ("- fix \"double\" and 'single' quotes, $HOME ${PATH} `id` $(whoami) \\ back\n"
        "second line\n\ttabbed; rm -rf / #")
SECRET = "s3cr3t-value-never-printed"  # every credential's value in these tests
CREDS = ["ANTHROPIC_API_KEY", "GEMINI_API_KEY", "CODEX_API_KEY", "OTHER_TOKEN"]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    assert path.read_text() == text, (
        f"{path.name} is stale (the output changed): review the diff and run "
        f"UPDATE_GOLDEN=1 pytest {__file__}")


def grove_yaml(agents: list[dict[str, Any]], profiles: dict[str, Any] | None = None,
               harness_defs: dict[str, Any] | None = None) -> str:
    spec: dict[str, Any] = {
        "profiles": profiles if profiles is not None else {
            "sandbox": {"runtime": "docker", "spawn": {"allowProfiles": ["sandbox"]},
                        "credentials": {c: {"fromEnv": c} for c in CREDS}},
            "shellbox": {"runtime": "docker", "image": "grove-engine/base:latest",
                         "credentials": {c: {"fromEnv": c} for c in CREDS}},
        },
        "agents": agents,
    }
    if harness_defs:
        spec["harnesses"] = harness_defs
    return yaml.safe_dump({"apiVersion": "engine/v1alpha1", "kind": "Grove",
                           "metadata": {"name": "demo"}, "spec": spec}, sort_keys=False)


def build(repo: Path, text: str, resolve_secrets: bool = True) -> desired.DesiredGrove:
    d = write_grove(repo, "demo", text)
    return desired.build(manifest.load_grove(d, repo),
                         desired.Options(repo_root=repo, resolve_secrets=resolve_secrets))


def problems(repo: Path, text: str, resolve_secrets: bool = True) -> str:
    with pytest.raises(InvalidManifests) as e:
        build(repo, text, resolve_secrets)
    return "\n".join(str(d) for d in e.value.diagnostics)


def set_creds(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for c in [*CREDS, "CLAUDE_CODE_OAUTH_TOKEN", "GOOGLE_API_KEY"]:
        monkeypatch.delenv(c, raising=False)
    for c in names:
        monkeypatch.setenv(c, SECRET)


def essence(a: desired.DesiredAgent) -> dict[str, Any]:
    """What a runtime receives for one agent, minus secret values (there are none)."""
    return {
        "argv": list(a.command),
        "resume_argv": list(a.resume_command),
        "env": dict(a.env),
        "auth": a.auth,
        "credentials": {c.name: c.describe() for c in a.credentials},
        "credential_files": dict(a.credential_files),
        "image": a.image,
        "instructions_file": a.instructions_file,
        "config_dir": a.settings_map().get("configDir"),
    }


# -- the catalog ------------------------------------------------------------------------

def test_catalog_lists_every_builtin() -> None:
    assert harnesses.names() == HARNESSES
    for name in HARNESSES:
        spec = harnesses.spec(name)
        assert spec and spec["command"], name


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_golden(name: str, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch, *CREDS)
    agent = {"name": "worker", "harness": name, "task": TASK,
             "profile": "shellbox" if name == "shell" else "sandbox"}
    a = build(repo, grove_yaml([agent])).agent("worker")
    text = json.dumps(essence(a), indent=2, sort_keys=True) + "\n"
    assert SECRET not in text and SECRET not in a.settings
    check_golden(f"{name}.json", text)


@pytest.mark.parametrize("name", ["claude", "codex", "gemini", "opencode"])
def test_task_arrives_as_one_argument(name: str, repo: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch, *CREDS)
    a = build(repo, grove_yaml([{"name": "w", "harness": name, "task": TASK,
                                 "profile": "sandbox"}])).agent("w")
    for argv in (a.command, a.resume_command):
        if name == "gemini":
            assert argv[-1] == "--prompt=" + TASK
        else:  # the end of options, then the task, exactly
            assert argv[-2:] == ("--", TASK)


def test_shell_harness_runs_the_task_as_its_script(repo: Path) -> None:
    a = build(repo, grove_yaml([{"name": "w", "harness": "shell", "task": TASK,
                                 "profile": "local"}], profiles={})).agent("w")
    assert a.command == ("bash", "-c", TASK)
    assert a.resume_command == () and a.instructions_file is None and a.image is None


# -- auth selection ---------------------------------------------------------------------

CLAUDE_PROFILE = {"sandbox": {"runtime": "docker", "credentials": {
    "ANTHROPIC_API_KEY": {"fromEnv": "ANTHROPIC_API_KEY"},
    "CLAUDE_CODE_OAUTH_TOKEN": {"fromEnv": "CLAUDE_CODE_OAUTH_TOKEN"},
    "OTHER_TOKEN": {"fromEnv": "OTHER_TOKEN"}}}}


def claude_agent(**extra: Any) -> list[dict[str, Any]]:
    return [{"name": "a", "profile": "sandbox", "harness": "claude", "task": "t", **extra}]


def test_first_satisfied_method_wins_and_only_its_auth_secrets_pass(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other methods' credentials stay behind; a credential no method names passes."""
    set_creds(monkeypatch, "CLAUDE_CODE_OAUTH_TOKEN", "OTHER_TOKEN")
    a = build(repo, grove_yaml(claude_agent(), CLAUDE_PROFILE)).agent("a")
    assert a.auth == "oauth-token"
    assert [c.name for c in a.credentials] == ["CLAUDE_CODE_OAUTH_TOKEN", "OTHER_TOKEN"]
    set_creds(monkeypatch, "ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "OTHER_TOKEN")
    a = build(repo, grove_yaml(claude_agent(), CLAUDE_PROFILE)).agent("a")
    assert a.auth == "api-key"
    assert [c.name for c in a.credentials] == ["ANTHROPIC_API_KEY", "OTHER_TOKEN"]
    assert sorted(json.loads(a.settings)["credentials"]) == ["ANTHROPIC_API_KEY",
                                                              "OTHER_TOKEN"]


def test_agent_names_its_auth_method(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch, "ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "OTHER_TOKEN")
    a = build(repo, grove_yaml(claude_agent(auth="oauth-token"), CLAUDE_PROFILE)).agent("a")
    assert a.auth == "oauth-token"
    assert [c.name for c in a.credentials] == ["CLAUDE_CODE_OAUTH_TOKEN", "OTHER_TOKEN"]
    assert json.loads(a.settings)["auth"] == "oauth-token"
    msg = problems(repo, grove_yaml(claude_agent(auth="nosuch"), CLAUDE_PROFILE))
    assert re.search(r"grove\.yaml:\d+.*auth 'nosuch': harness claude has no such auth "
                     r"method \(methods: api-key, oauth-token, login\)", msg), msg
    set_creds(monkeypatch)
    msg = problems(repo, grove_yaml(claude_agent(auth="oauth-token"), CLAUDE_PROFILE))
    assert "oauth-token: credential CLAUDE_CODE_OAUTH_TOKEN: environment variable " \
           "CLAUDE_CODE_OAUTH_TOKEN is not set" in msg
    assert "api-key" not in msg  # only the named method is considered


def test_file_credential_becomes_a_file_in_home(repo: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch)
    creds = tmp_path / "credentials.json"
    profile = {"sandbox": {"runtime": "docker", "credentials": {
        "CLAUDE_CREDENTIALS": {"fromFile": str(creds)}}}}
    msg = problems(repo, grove_yaml(claude_agent(), profile))
    assert f"login: credential CLAUDE_CREDENTIALS: file {creds} does not exist" in msg
    creds.write_text(SECRET)
    a = build(repo, grove_yaml(claude_agent(), profile)).agent("a")
    assert a.auth == "login"
    assert a.credential_files == (("CLAUDE_CREDENTIALS", ".claude/.credentials.json"),)
    assert [c.name for c in a.credentials] == ["CLAUDE_CREDENTIALS"]


def test_auth_method_sets_plain_env_below_the_agents_own(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch)
    oauth = tmp_path / "oauth_creds.json"
    oauth.write_text("{}")
    profile = {"sandbox": {"runtime": "docker", "credentials": {
        "GEMINI_OAUTH_CREDS": {"fromFile": str(oauth)}}}}
    agent = [{"name": "g", "profile": "sandbox", "harness": "gemini", "task": "t"}]
    a = build(repo, grove_yaml(agent, profile)).agent("g")
    trust = {"GEMINI_CLI_TRUST_WORKSPACE": "true"}  # the harness's own env
    assert a.auth == "login" and dict(a.env) == {"GOOGLE_GENAI_USE_GCA": "true", **trust}
    # the login file, and the method's settings.json (the auth type), both into the home
    assert a.credential_files == (("GEMINI_OAUTH_CREDS", ".gemini/oauth_creds.json"),
                                  ("ENGINE_HOME_FILE_0", ".gemini/settings.json"))
    assert '"selectedType": "oauth-personal"' in dict(a.home_files)[".gemini/settings.json"]
    agent[0]["env"] = {"GOOGLE_GENAI_USE_GCA": "false"}
    assert dict(build(repo, grove_yaml(agent, profile)).agent("g").env) == {
        "GOOGLE_GENAI_USE_GCA": "false", **trust}


def test_harness_without_auth_methods_passes_every_credential(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch, *CREDS)
    a = build(repo, grove_yaml([{"name": "s", "profile": "shellbox", "harness": "shell",
                                 "task": "true"}])).agent("s")
    assert a.auth is None and sorted(c.name for c in a.credentials) == sorted(CREDS)
    msg = problems(repo, grove_yaml([{"name": "s", "profile": "shellbox", "harness": "shell",
                                      "task": "true", "auth": "api-key"}]))
    assert "auth 'api-key': harness shell has no auth methods" in msg


def test_no_secrets_mode_still_needs_the_credential_declared(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch)
    a = build(repo, grove_yaml(claude_agent(), CLAUDE_PROFILE), resolve_secrets=False)
    assert a.agent("a").auth == "api-key"
    msg = problems(repo, grove_yaml(claude_agent(), {"sandbox": {"runtime": "docker"}}),
                   resolve_secrets=False)
    assert "credential ANTHROPIC_API_KEY is not in profile sandbox" in msg


CLI_GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: demo}
spec:
  profiles:
    sandbox:
      runtime: docker
      credentials:
        ANTHROPIC_API_KEY: {fromEnv: ANTHROPIC_API_KEY}
        OTHER_TOKEN: {fromEnv: OTHER_TOKEN}
  agents:
    - name: coder
      profile: sandbox
      harness: claude
      task: write the code
"""


def test_missing_credential_fails_validate_naming_it(
        repo: Path, engine: Any, monkeypatch: pytest.MonkeyPatch,
        harness_program: Callable[..., Any], shared_harness_cache: Path) -> None:
    harness_program("claude")  # plan checks that the agent's harness is there
    set_creds(monkeypatch, "OTHER_TOKEN")
    write_grove(repo, "demo", CLI_GROVE)
    outputs = []
    res = engine("validate")
    outputs.append(res.out + res.err)
    assert res.code == 1, res
    assert re.search(r"groves/demo/grove\.yaml:\d+.*agent coder: harness claude: no auth "
                     r"method is satisfied \(api-key: credential ANTHROPIC_API_KEY: "
                     r"environment variable ANTHROPIC_API_KEY is not set", res.err), res
    res = engine("validate", "--json")
    outputs.append(res.out + res.err)
    assert res.code == 1 and "ANTHROPIC_API_KEY is not set" in res.out
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    for args in (("validate",), ("explain", "coder"), ("plan", "--json"), ("plan",)):
        res = engine(*args)
        outputs.append(res.out + res.err)
        assert res.code in (0, 2), res
    assert all(SECRET not in o for o in outputs)
    for p in (repo / ".engine").rglob("*") if (repo / ".engine").exists() else []:
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


# -- overrides --------------------------------------------------------------------------

def test_grove_harness_overrides_a_builtin_field_by_field(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch, "ANTHROPIC_API_KEY", "OTHER_TOKEN")
    defs = {"quick": {"builtin": "claude", "command": ["claude", "-p", "--model", "haiku"],
                      "maxDuration": "30m"}}
    agents = [{"name": "a", "profile": "sandbox", "harness": "quick", "task": "t"},
              {"name": "b", "profile": "sandbox", "harness": "quick", "task": "t",
               "maxDuration": 60}]
    g = build(repo, grove_yaml(agents, CLAUDE_PROFILE, defs))
    a = g.agent("a")
    assert a.command == ("claude", "-p", "--model", "haiku", "--", "t")
    assert a.resume_command == ("claude", "-p", "--model", "haiku", "--continue", "--", "t")
    assert (a.instructions_file, a.auth, a.image) == ("CLAUDE.md", "api-key",
                                                      "grove-engine/claude:latest")
    assert a.max_duration == 1800 and g.agent("b").max_duration == 60


def test_harness_image_is_only_a_default(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch, "ANTHROPIC_API_KEY", "OTHER_TOKEN")
    profile = {"sandbox": {**CLAUDE_PROFILE["sandbox"], "image": "example/agent:1"}}
    assert build(repo, grove_yaml(claude_agent(), profile)).agent("a").image == \
        "example/agent:1"
    assert build(repo, grove_yaml(claude_agent(), CLAUDE_PROFILE)).agent("a").image == \
        "grove-engine/claude:latest"


def test_override_without_auth_methods_passes_the_profiles_credentials(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch, "OTHER_TOKEN")  # e.g. a local login instead of a key
    defs = {"claude": {"builtin": "claude", "auth": []}}
    profile = {"sandbox": {"runtime": "docker", "credentials": {
        "OTHER_TOKEN": {"fromEnv": "OTHER_TOKEN"}}}}
    a = build(repo, grove_yaml(claude_agent(), profile, defs)).agent("a")
    assert a.auth is None and [c.name for c in a.credentials] == ["OTHER_TOKEN"]
    assert a.command == ("claude", "--dangerously-skip-permissions", "-p", "--output-format",
                         "stream-json", "--verbose", "--", "t")


@pytest.mark.parametrize("name,package", [
    ("claude", "@anthropic-ai/claude-code"), ("gemini", "@google/gemini-cli"),
    ("codex", "@openai/codex"), ("opencode", "opencode-ai")])
def test_image_dockerfile(name: str, package: str) -> None:
    """A harness image is the base plus the installed program, with no registry: no RUN
    step at all, the program COPYed from the build context, labelled for check_program."""
    text = (ROOT / "images" / name / "Dockerfile").read_text()
    steps = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert steps[0] == "FROM grove-engine/base:latest"
    assert not any(s.startswith("RUN") for s in steps)
    assert "COPY program /opt/engine/harness" in steps
    assert f"LABEL engine.harness.{name}=${{VERSION}}" in steps
    spec = harnesses.spec(name)
    assert spec is not None and spec["image"] == f"grove-engine/{name}:latest"
    assert spec["install"]["npm"][0].startswith(package + "@")


# -- bad input --------------------------------------------------------------------------

def test_unknown_builtin_is_a_schema_error_with_location(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml(
        [{"name": "a", "harness": "mine", "task": "t", "profile": "local"}], {},
        {"mine": {"builtin": "nosuch", "command": ["x"]}}))
    res = engine("validate")
    assert res.code == 1
    assert re.search(r"groves/demo/grove\.yaml:14:7: .*mine: builtin: 'nosuch' is not one "
                     r"of claude, gemini, codex, opencode, shell", res.err), res


def test_harness_without_command(repo: Path, engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml(
        [{"name": "a", "harness": "bare", "task": "t", "profile": "local"}], {},
        {"bare": {"description": "no command"}}))
    res = engine("validate")
    assert res.code == 1
    assert re.search(r"grove\.yaml:\d+.*agent a: harness bare has no command", res.err), res
    write_grove(repo, "demo", grove_yaml(
        [{"name": "a", "harness": "bare", "task": "t", "profile": "local"}], {},
        {"bare": {"command": []}}))
    res = engine("validate")
    assert res.code == 1 and re.search(r"grove\.yaml:\d+:\d+: .*(should be non-empty|"
                                       r"too short)", res.err), res


@pytest.mark.parametrize("bad", ["../outside.md", "a/../../b.md", "/etc/passwd", "."])
def test_instructions_file_may_not_leave_the_workspace(bad: str, repo: Path,
                                                       engine: Any) -> None:
    write_grove(repo, "demo", grove_yaml(
        [{"name": "a", "harness": "mine", "task": "t", "profile": "local"}], {},
        {"mine": {"builtin": "shell", "instructionsFile": bad}}))
    res = engine("validate")
    assert res.code == 1 and f"instructionsFile: '{bad}' is not valid" in res.err, res


# -- instructions files -----------------------------------------------------------------

POLICY = desired.Policy(max_agents=20, max_depth=2, max_children=4)


def agent_for(repo: Path, monkeypatch: pytest.MonkeyPatch, **extra: Any
              ) -> desired.DesiredAgent:
    set_creds(monkeypatch, "ANTHROPIC_API_KEY", "OTHER_TOKEN")
    profile = {"sandbox": {**CLAUDE_PROFILE["sandbox"],
                           "spawn": {"allowProfiles": ["sandbox"],
                                     "allowHarnesses": ["claude", "shell"]}}}
    a = build(repo, grove_yaml(claude_agent(role="You review code.", **extra),
                               profile)).agent("a")
    commit_all(repo)
    return a


def commit_all(repo: Path) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "groves")


def worktree(repo: Path, name: str = "a", hide: str = "CLAUDE.md") -> Path:
    """The agent's own repository, made the way the executor makes it."""
    wt = repo / ".engine" / "worktrees" / "demo" / name
    git(repo, "branch", f"engine/demo/{name}")
    workspace.make(repo, wt, f"engine/demo/{name}", git(repo, "rev-parse", "HEAD"), name,
                   "demo", hide=hide)
    return wt


def test_instructions_created_and_hidden_from_git(repo: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    a = agent_for(repo, monkeypatch, task=TASK)
    wt = worktree(repo)
    path = instructions.write_instructions(a, wt, POLICY)
    assert path == wt / "CLAUDE.md"
    text = path.read_text()
    check_golden("instructions-claude.md", text)
    assert TASK in text and "You review code." in text
    assert git(wt, "status", "--porcelain") == ""
    assert git(repo, "status", "--porcelain") == ""
    exclude = wt / ".git" / "info" / "exclude"  # the agent's own repository's
    before = exclude.read_text()
    assert before.count("/CLAUDE.md\n") == 1
    mtime = path.stat().st_mtime_ns
    assert instructions.write_instructions(a, wt, POLICY) == path
    assert path.read_text() == text and path.stat().st_mtime_ns == mtime
    assert exclude.read_text() == before


def test_tracked_file_kept_section_appended_once(repo: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    own = "# Project rules\n\nUse tabs.\n"
    (repo / "CLAUDE.md").write_text(own)
    git(repo, "add", "CLAUDE.md")
    git(repo, "commit", "-qm", "rules")
    wt = worktree(repo)
    a = agent_for(repo, monkeypatch, task="first task <!-- engine:end --> still task")
    path = instructions.write_instructions(a, wt, POLICY)
    assert path is not None
    text = path.read_text()
    assert text.startswith(own + "\n" + instructions.BEGIN)
    assert text.count(instructions.BEGIN) == 1 and text.count(instructions.END) == 1
    assert "still task" in text
    assert git(wt, "status", "--porcelain") == ""  # the section never reaches a commit
    git(wt, "commit", "-qam", "nothing", "--allow-empty")
    assert git(wt, "show", "HEAD:CLAUDE.md") + "\n" == own
    b = dataclasses.replace(a, task="second task")
    instructions.write_instructions(b, wt, POLICY)
    again = path.read_text()
    assert again.startswith(own) and again.count(instructions.BEGIN) == 1
    assert "second task" in again and "first task" not in again
    assert again == own + "\n" + instructions.render_section(b, POLICY) + "\n"
    assert (repo / "CLAUDE.md").read_text() == own  # the user's checkout is untouched


def test_shared_workspace_shows_the_section_as_a_change(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (repo / "AGENTS.md").write_text("rules\n")
    git(repo, "add", "AGENTS.md")
    git(repo, "commit", "-qm", "rules")
    a = dataclasses.replace(agent_for(repo, monkeypatch), instructions_file="AGENTS.md",
                            workspace="shared")
    instructions.write_instructions(a, repo, POLICY)
    assert git(repo, "status", "--porcelain") == "M AGENTS.md"
    assert "S AGENTS.md" not in git(repo, "ls-files", "-v")


def test_section_states_limits_and_child_profiles(repo: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    a = agent_for(repo, monkeypatch)
    text = instructions.render_section(a, POLICY)
    for cmd in ("engine spawn NAME --task T [--profile P] [--wait]", "engine message AGENT TEXT",
                "engine status --json", "engine done [--result TEXT]"):
        assert f"`{cmd}`" in text
    assert "at most 20 agents" in text and "depth at most 2" in text
    assert "at most 4 children" in text
    assert "(`--profile`): `sandbox`." in text and "`claude`, `shell`" in text
    deep = dataclasses.replace(a, depth=2)
    assert "You may not spawn children: your depth is the grove's limit." in \
        instructions.render_section(deep, POLICY)
    none = dataclasses.replace(a, allow_profiles=())
    assert "your profile allows no profiles for children" in \
        instructions.render_section(none, POLICY)


def test_shell_harness_writes_no_instructions(repo: Path) -> None:
    a = build(repo, grove_yaml([{"name": "s", "harness": "shell", "task": "true",
                                 "profile": "local"}], {})).agent("s")
    commit_all(repo)
    assert instructions.write_instructions(a, repo, POLICY) is None
    assert git(repo, "status", "--porcelain") == ""


# -- end to end: the local runtime starts the harness's exact argv ----------------------

def test_local_runtime_passes_task_intact_and_only_chosen_auth_secret(
        repo: Path, engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in program (python dumping its argv) replaces `claude` in a grove override
    of the built-in: everything else is the real catalog entry and the real runtime."""
    set_creds(monkeypatch)  # the local runtime inherits the engine's environment: the
    monkeypatch.setenv("SRC_KEY", SECRET)  # credentials come from other variable names
    monkeypatch.setenv("SRC_OTHER", SECRET)
    monkeypatch.setenv("SRC_OAUTH", SECRET)
    drop = tmp_path / "out"  # as root, the agent runs as uid 1000: a place it may write
    drop.mkdir(mode=0o777)
    drop.chmod(0o777)
    out = drop / "seen.json"
    dump = ("import hashlib, json, os, sys; k = os.environ.get('ANTHROPIC_API_KEY', ''); "
            "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
            "'key': hashlib.sha256(k.encode()).hexdigest(), "
            "'other': 'OTHER_TOKEN' in os.environ, "
            "'oauth': 'CLAUDE_CODE_OAUTH_TOKEN' in os.environ}, open(" + repr(str(out)) +
            ", 'w'))")
    profile = {"local": {"runtime": "local", "credentials": {
        "ANTHROPIC_API_KEY": {"fromEnv": "SRC_KEY"}, "OTHER_TOKEN": {"fromEnv": "SRC_OTHER"},
        "CLAUDE_CODE_OAUTH_TOKEN": {"fromEnv": "SRC_OAUTH"}}}}
    # a python the agent's uid can run (the engine's may live under a 0700 /root)
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
    defs = {"claude": {"builtin": "claude", "command": [python, "-c", dump]}}
    write_grove(repo, "demo", grove_yaml(
        [{"name": "a", "profile": "local", "harness": "claude", "task": TASK}], profile, defs))
    res = engine("apply", "--auto-approve", "--wait", "--timeout", "30")
    assert res.code == 0, res
    seen = json.loads(out.read_text())
    assert seen["argv"] == ["--", TASK]
    assert seen["key"] == hashlib.sha256(SECRET.encode()).hexdigest()
    assert seen["oauth"] is False  # a credential of a method that was not chosen
    assert seen["other"] is True  # a credential no auth method names always passes
    wt = Path(seen["cwd"])
    assert instructions.BEGIN in (wt / "CLAUDE.md").read_text()
    assert git(wt, "status", "--porcelain") == ""
    assert SECRET not in res.out + res.err
    for p in (repo / ".engine").rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
