"""Desired state: the spec hash (what replaces an agent and what does not), secrets kept
out of it, templating in the sandbox, and `engine explain --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import desired, manifest, render
from engine.errors import InvalidManifests
from tests.conftest import ROOT, write_grove

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata:
  name: g
spec:
  profiles:
    box:
      runtime: docker
      image: engine/agent:1
      allowEnv: [ENGINE_TEST_ALLOWED]
      credentials:
        TOKEN: {fromEnv: ENGINE_TEST_TOKEN}
  agents:
    - name: a
      profile: box
      task: write the notes
      restart: never
    - name: b
      task: read the notes
      dependsOn: [a]
"""
SECRET = "hunter2-sentinel-0c1d"


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_TEST_TOKEN", SECRET)


def build(root: Path, text: str, **opts: Any) -> desired.DesiredGrove:
    d = write_grove(root, "g", text)
    src = manifest.load_grove(d, root)
    return desired.build(src, desired.Options(secret_key=b"k" * 32, repo_root=root, **opts))


def hashes(root: Path, text: str) -> dict[str, str]:
    return {a.name: a.spec_hash for a in build(root, text).agents}


def test_spec_hash_is_stable_across_runs_and_processes(tmp_path: Path) -> None:
    first = hashes(tmp_path, GROVE)
    assert hashes(tmp_path, GROVE) == first
    probe = ("import json, pathlib; from engine import desired, manifest; "
             "src = manifest.load_grove(pathlib.Path('groves/g'), pathlib.Path('.')); "
             "g = desired.build(src, desired.Options(secret_key=b'k' * 32)); "
             "print(json.dumps({a.name: a.spec_hash for a in g.agents}))")
    for seed in ("1", "2"):  # a different hash seed must not change the spec hash
        out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, text=True,
                             capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed,
                                                       "PYTHONPATH": str(ROOT)}).stdout
        assert json.loads(out) == first


def test_spec_hash_ignores_key_order_and_formatting(tmp_path: Path) -> None:
    reordered = GROVE.replace("      profile: box\n      task: write the notes\n",
                              "      task: 'write the notes'\n      profile: box\n")
    reordered = reordered.replace("      runtime: docker\n      image: engine/agent:1\n",
                                  "      image: \"engine/agent:1\"\n      runtime: docker\n")
    assert reordered != GROVE
    assert hashes(tmp_path / "x", reordered) == hashes(tmp_path / "y", GROVE)


@pytest.mark.parametrize(("old", "new", "changed"), [
    ("task: write the notes", "task: write better notes", {"a"}),
    ("image: engine/agent:1", "image: engine/agent:2", {"a"}),
    ("task: read the notes", "task: read the notes\n      env: {X: '1'}", {"b"}),
    ("runtime: docker", "runtime: docker\n      network: host", {"a"}),
])
def test_spec_hash_changes_with_what_the_process_sees(tmp_path: Path, old: str, new: str,
                                                      changed: set[str]) -> None:
    before = hashes(tmp_path / "x", GROVE)
    after = hashes(tmp_path / "y", GROVE.replace(old, new))
    assert {n for n in before if before[n] != after[n]} == changed


@pytest.mark.parametrize(("old", "new"), [
    ("restart: never", "restart: always"),
    ("dependsOn: [a]", "dependsOn: []"),
    ("task: read the notes", "task: read the notes\n      restart: on-failure"),
])
def test_spec_hash_ignores_in_place_fields(tmp_path: Path, old: str, new: str) -> None:
    before = build(tmp_path / "x", GROVE)
    after = build(tmp_path / "y", GROVE.replace(old, new))
    assert {a.name: a.spec_hash for a in before.agents} == \
        {a.name: a.spec_hash for a in after.agents}
    assert [a.settings for a in before.agents] != [a.settings for a in after.agents]


def test_rotating_a_secret_replaces_but_never_shows(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    one = build(tmp_path, GROVE).by_name["a"]
    monkeypatch.setenv("ENGINE_TEST_TOKEN", "rotated-sentinel-99aa")
    two = build(tmp_path, GROVE).by_name["a"]
    assert one.spec_hash != two.spec_hash
    assert one.settings == two.settings  # only the keyed digest differs
    assert build(tmp_path, GROVE).by_name["b"].spec_hash == \
        build(tmp_path, GROVE).by_name["b"].spec_hash
    for agent in (one, two):
        text = repr(agent) + agent.settings + str(agent.env) + str(agent.command)
        assert SECRET not in text and "rotated-sentinel-99aa" not in text
        assert [(c.name, c.source, c.ref) for c in agent.credentials] == [
            ("TOKEN", "env", "ENGINE_TEST_TOKEN")]


def test_without_secrets_the_hash_still_says_credentials_exist(tmp_path: Path) -> None:
    g = build(tmp_path, GROVE, resolve_secrets=False)
    assert g.by_name["a"].spec_hash != build(
        tmp_path, GROVE.replace("        TOKEN: {fromEnv: ENGINE_TEST_TOKEN}\n", ""),
        resolve_secrets=False).by_name["a"].spec_hash


# -- templating -------------------------------------------------------------------------

def agent_task(root: Path, task: str, **kw: Any) -> str:
    text = GROVE.replace("task: write the notes", f"task: {json.dumps(task)}")
    return build(root, text, **kw).by_name["a"].task


def test_template_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_TEST_ALLOWED", "visible")
    task = agent_task(tmp_path, "{{ agent.name }}@{{ grove.name }} via {{ agent.profile }}/"
                                "{{ agent.harness }}: {{ env.ENGINE_TEST_ALLOWED }}")
    assert task == "a@g via box/shell: visible"


def test_task_is_rendered_into_the_command(tmp_path: Path) -> None:
    text = GROVE.replace("  agents:", "  harnesses:\n    echo:\n"
                         "      command: [sh, -c, 'echo {{ task }} > {{ agent.name }}.txt']\n"
                         "      taskArg: none\n  agents:")
    text = text.replace("      profile: box\n", "      profile: box\n      harness: echo\n")
    a = build(tmp_path, text).by_name["a"]
    assert a.command == ("sh", "-c", "echo write the notes > a.txt")


def problems_of(root: Path, task: str, **kw: Any) -> list[str]:
    with pytest.raises(InvalidManifests) as e:
        agent_task(root, task, **kw)
    return [str(d) for d in e.value.diagnostics]


@pytest.mark.parametrize(("task", "why"), [
    ("{{ env.HOME }}", "task: env.HOME: HOME is not in the profile's allowEnv (allowed: "
                       "ENGINE_TEST_ALLOWED)"),
    ("{{ env['PATH'] }}", "task: env.PATH: PATH is not in the profile's allowEnv (allowed: "
                          "ENGINE_TEST_ALLOWED)"),
    ("{{ env.ENGINE_TEST_ALLOWED }}", "task: env.ENGINE_TEST_ALLOWED: environment variable "
                                      "ENGINE_TEST_ALLOWED is not set"),
    ("{{ agent.nickname }}", "task: template error: 'dict object' has no attribute "
                             "'nickname'"),
    ("{{ nothing }}", "task: template error: 'nothing' is undefined"),
    ("{{ task }}", "task: template error: 'task' is undefined"),
    ("{% for x in range(3) %}", "task: template syntax error: Unexpected end of template."),
    ("{{ agent.__class__ }}", "task: template refused by the sandbox"),
    ("{{ ''.__class__.__mro__ }}", "task: template refused by the sandbox"),
    ("{{ cycler.__init__.__globals__ }}", "task: template refused by the sandbox"),
    ("{{ 'x' * 300000 }}", "task: template output over 200000 characters"),
])
def test_template_errors_name_file_line_and_field(tmp_path: Path, task: str, why: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_TEST_ALLOWED", raising=False)
    [problem] = problems_of(tmp_path, task)
    assert problem.startswith(f"groves/g/grove.yaml:16:7: agent a: {why}")


def test_template_in_env_names_the_variable(tmp_path: Path) -> None:
    text = GROVE.replace("      restart: never\n",
                         "      restart: never\n      env: {GREETING: '{{ agent.nam }}'}\n")
    with pytest.raises(InvalidManifests) as e:
        build(tmp_path, text)
    [d] = e.value.diagnostics
    assert (d.line, d.col) == (18, 13)  # the variable's own key
    assert d.message.startswith("agent a: env.GREETING: template error: ")


def test_env_values_never_reach_templates_unless_allowed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setenv("ENGINE_TEST_ALLOWED", "ok")
    task = agent_task(tmp_path, "{{ env | list | join(',') }}")
    assert task == "ENGINE_TEST_ALLOWED"


# the fast substitution must give exactly what jinja gives
CTX = {"task": "t {{ x }}", "agent": {"name": "a", "profile": "p", "items": "I", "n": 3},
       "grove": {"name": "g"}, "env": {"HOME": "/h", "get": "G"}}
PIECES = st.sampled_from(["{{ task }}", "{{agent.name}}", "{{ agent.items }}", "{{ env.get }}",
                          "{{ env.HOME }}", "{{ grove.name }}", "{{ agent.n }}", "{{ true }}",
                          "{{", "}}", "{", "}", "{%", "%}", "{#", "#}", "-", " ", "\n", "\r\n",
                          "x", "{{- task }}", "{{ agent . name }}", "{{ none }}", "$", "\\"])


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, max_size=8).map("".join))
def test_fast_substitution_matches_jinja(text: str) -> None:
    try:
        expected: str | None = render._jinja(text, CTX) if render.is_template(text) else text
    except render.TemplateError:
        expected = None
    fast = render._substitute(text, CTX)
    if fast is not None:
        assert fast == expected
    try:
        got: str | None = render.render(text, CTX)
    except render.TemplateError:
        got = None
    assert got == expected


# -- explain --json ---------------------------------------------------------------------

def flat(data: Any, prefix: str = "") -> set[str]:
    if isinstance(data, dict) and data:
        return set().union(*(flat(v, f"{prefix}{k}.") for k, v in data.items()))
    return {prefix[:-1]}


def test_explain_json_shape(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", GROVE)
    r = engine("explain", "g/a", "--json")
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert set(doc) == {"grove", "agent", "specHash", "settings", "sources", "ignored",
                        "appliesOnly"}
    assert (doc["grove"], doc["agent"]) == ("g", "a")
    assert len(doc["specHash"]) == 16 and int(doc["specHash"], 16) >= 0
    assert set(doc["sources"]) == flat(doc["settings"])
    assert doc["settings"]["credentials"] == {"TOKEN": {"fromEnv": "ENGINE_TEST_TOKEN"}}
    assert doc["sources"]["credentials.TOKEN.fromEnv"] == "groves/g/grove.yaml:12"
    assert SECRET not in r.out
    assert r.out == engine("explain", "a", "--json").out  # stable, sorted output


def test_explain_unknown_agent(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", GROVE)
    r = engine("explain", "nobody")
    assert (r.code, r.err) == (1, "error: agent nobody: not found in g\n")
