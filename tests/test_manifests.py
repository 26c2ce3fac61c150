"""Bad input through the real CLI: one `file:line:col: message` line per problem, exit 1,
no traceback, nothing written. Also: the fast schema pre-check agrees with jsonschema."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import desired, manifest, schema, schema_fast, yamlio
from engine.errors import InvalidManifests
from tests.conftest import ROOT, Result, write_grove

ERROR = re.compile(r"^error: (?P<file>[^:\s]+):(?P<line>\d+):(?P<col>\d+): (?P<msg>\S.*)$")
HEAD = "apiVersion: engine/v1alpha1\nkind: Grove\nmetadata:\n  name: g\nspec:\n"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root` (git's own files included) with its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def problems(r: Result) -> list[tuple[str, int, int, str]]:
    """The error lines of a failed run, parsed; fails the test on any other kind of line."""
    assert r.code == 1, r
    assert "Traceback" not in r.err + r.out, r
    lines = r.err.splitlines()
    assert lines[-1] == f"{len(lines) - 1} problem{'s' if len(lines) != 2 else ''} found", r
    out = []
    for line in lines[:-1]:
        m = ERROR.match(line)
        assert m, f"not a file:line:col error line: {line!r}"
        out.append((m["file"], int(m["line"]), int(m["col"]), m["msg"]))
    return out


def bad(engine: Any, repo: Path, *args: str) -> list[tuple[str, int, int, str]]:
    before = snapshot(repo)
    found = problems(engine("validate", *args))
    assert snapshot(repo) == before, "validate changed files"
    return found


def test_malformed_yaml(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", "apiVersion: engine/v1alpha1\nkind: Grove\nmetadata: {name: g\n"
                           "spec: {}\n")
    [(f, line, col, msg)] = bad(engine, repo)
    assert (f, line, col) == ("groves/g/grove.yaml", 4, 5)
    assert msg.startswith("invalid YAML: ")


def test_tab_indented_file(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", "apiVersion: engine/v1alpha1\nkind: Grove\nmetadata:\n\tname: g\n")
    [(f, line, col, msg)] = bad(engine, repo)
    assert (f, line, col) == ("groves/g/grove.yaml", 4, 1)
    assert "tab character used for indentation" in msg


def test_unknown_field_is_named_where_it_is(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents:\n    - name: a\n      task: x\n"
                                  "      colour: red\n")
    [(f, line, col, msg)] = bad(engine, repo)
    assert (f, line, col) == ("groves/g/grove.yaml", 9, 7)
    assert msg == "agent a: unknown field 'colour'"


def test_unknown_field_in_a_profile_and_an_agent_document(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  profiles:\n    box:\n      runtime: local\n"
                                  "      gpus: 2\n")
    write_grove(repo, "g", "apiVersion: engine/v1alpha1\nkind: Agent\nmetadata: {name: b}\n"
                           "spec:\n  task: x\n  priority: high\n", file="b.yaml")
    assert bad(engine, repo) == [
        ("groves/g/b.yaml", 6, 3, "agent b: unknown field 'priority'"),
        ("groves/g/grove.yaml", 9, 7, "profile box: unknown field 'gpus'"),
    ]


def test_wrong_type(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  policy:\n    maxAgents: many\n")
    assert bad(engine, repo) == [("groves/g/grove.yaml", 7, 5,
                                  "grove g: spec.policy.maxAgents: expected integer, got string")]


def test_unknown_api_version_and_kind(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents: []\n")
    write_grove(repo, "g", "apiVersion: engine/v2\nkind: Agent\nmetadata: {name: a}\n",
                file="a.yaml")
    write_grove(repo, "g", "apiVersion: engine/v1alpha1\nkind: Robot\nmetadata: {name: b}\n",
                file="b.yaml")
    assert bad(engine, repo) == [
        ("groves/g/a.yaml", 1, 1, "document: unknown apiVersion 'engine/v2'; expected "
                                  "'engine/v1alpha1'"),
        ("groves/g/b.yaml", 2, 1, "document: unknown kind 'Robot'; expected one of Grove, "
                                  "Agent, Profile, Harness"),
    ]


@pytest.mark.parametrize("name", ["../x", "A B", "a" * 100, "x/../../etc", "ok\n", "-a", ""])
def test_unsafe_agent_names(engine: Any, repo: Path, name: str) -> None:
    write_grove(repo, "g", HEAD + f"  agents:\n    - name: {json.dumps(name)}\n      task: x\n")
    [(f, line, col, msg)] = bad(engine, repo)
    assert (f, line, col) == ("groves/g/grove.yaml", 7, 7)
    assert msg.startswith("agent at spec.agents[0]: name: ")
    assert "is not valid (a DNS-label-like name" in msg
    assert len(msg) < 250  # a 100-character name is shortened, not printed whole


def test_unsafe_grove_and_profile_names(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  profiles:\n    ../up: {runtime: local}\n"
                                  "  harnesses:\n    Big Shell: {builtin: shell}\n")
    write_grove(repo, "x", HEAD.replace("name: g", "name: ../x") + "  agents: []\n")
    found = bad(engine, repo)
    assert [(f, line, col) for f, line, col, _ in found] == [
        ("groves/g/grove.yaml", 7, 5), ("groves/g/grove.yaml", 9, 5),
        ("groves/x/grove.yaml", 4, 3)]
    assert found[0][3].startswith("profile ../up: '../up' is not a valid name (a DNS-label")
    assert found[1][3].startswith("harness Big Shell: 'Big Shell' is not a valid name")
    assert found[2][3].startswith("grove '../x': metadata.name: '../x' is not valid")


def test_duplicate_agent_names_both_places(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents:\n    - name: a\n      task: x\n"
                                  "    - name: a\n      task: y\n")
    assert bad(engine, repo) == [("groves/g/grove.yaml", 9, 7, "agent a: duplicate name (first "
                                  "defined at groves/g/grove.yaml:7)")]


def test_duplicate_agent_across_files(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents:\n    - name: a\n      task: x\n")
    write_grove(repo, "g", "# another\napiVersion: engine/v1alpha1\nkind: Agent\n"
                           "metadata: {name: a}\nspec: {task: y}\n", file="more.yaml")
    [(f, line, col, msg)] = bad(engine, repo)
    assert (f, line, col) == ("groves/g/more.yaml", 4, 12)
    assert msg == "agent a: duplicate name (first defined at groves/g/grove.yaml:7)"


def test_grove_directory_problems(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", "apiVersion: engine/v1alpha1\nkind: Agent\nmetadata: {name: a}\n"
                           "spec: {task: x}\n", file="a.yaml")
    write_grove(repo, "h", HEAD.replace("name: g", "name: other") + "  agents: []\n")
    write_grove(repo, "h", HEAD.replace("name: g", "name: h") + "  agents: []\n", file="b.yaml")
    write_grove(repo, "k", HEAD.replace("name: g", "name: kk") + "  agents: []\n")
    assert bad(engine, repo) == [
        ("groves/g/a.yaml", 1, 1, "grove g: no kind: Grove document in groves/g/ (a grove "
                                  "directory needs exactly one)"),
        ("groves/h/grove.yaml", 2, 1, "grove h: a grove directory holds exactly one kind: "
                                      "Grove (the first is in groves/h/b.yaml)"),
        ("groves/k/grove.yaml", 4, 3, "grove kk: metadata.name must match its directory 'k'"),
    ]


def test_dependency_cycle_is_printed(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents:\n"
                "    - name: a\n      task: x\n      dependsOn: [b]\n"
                "    - name: b\n      task: y\n      dependsOn: [a]\n"
                "    - name: c\n      task: z\n      dependsOn: [a]\n")
    assert bad(engine, repo) == [("groves/g/grove.yaml", 9, 7, "agent a: dependency cycle: "
                                  "a -> b -> a (each waits for the next)")]


def test_cycle_through_spawned_by(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents:\n"
                "    - name: a\n      task: x\n      spawnedBy: c\n"
                "    - name: b\n      task: y\n      spawnedBy: a\n"
                "    - name: c\n      task: z\n      dependsOn: [b]\n")
    [(_, line, _, msg)] = bad(engine, repo)
    assert line == 9
    assert msg == "agent a: dependency cycle: a -> c -> b -> a (each waits for the next)"


def test_alias_bomb_is_rejected_fast_and_small(repo: Path) -> None:
    levels = ["lol: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        levels.append(f"l{i}: &a{i} [{refs}]")
    write_grove(repo, "g", HEAD + "  agents: []\n" + "\n".join(levels) + "\n")
    # A fresh interpreter, so its peak memory is this run's alone.
    probe = textwrap.dedent("""
        import json, resource, sys, time
        from engine.cli import main
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        code = main(["validate", "--no-secrets"])
        took = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"code": code, "seconds": took, "growth_kb": after - before}))
    """)
    before = snapshot(repo)
    r = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert snapshot(repo) == before
    stats = json.loads(r.stdout.splitlines()[-1])
    assert stats["code"] == 1
    assert stats["seconds"] < 2.0
    assert stats["growth_kb"] < 200 * 1024
    assert "Traceback" not in r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: groves/g/grove.yaml:")
    assert "alias bomb" in first


def test_oversized_file_is_refused_by_size(engine: Any, repo: Path) -> None:
    d = write_grove(repo, "g", HEAD + "  agents: []\n")
    with (d / "huge.yaml").open("w") as f:
        line = "# " + "x" * 1021 + "\n"
        for _ in range(50 * 1024):
            f.write(line)
    t = time.perf_counter()
    [(f_, line_no, col, msg)] = bad(engine, repo)
    assert time.perf_counter() - t < 2
    assert (f_, line_no, col) == ("groves/g/huge.yaml", 1, 1)
    assert msg == f"file is {50 * 1024 * 1024} bytes, over the {8 * 1024 * 1024}-byte limit"


@pytest.mark.parametrize("tag", ["!!python/object:os.system", "!!python/object/apply:os.system",
                                 "!!python/name:os.system", "!!binary", "!custom"])
def test_python_and_unknown_tags_are_refused(engine: Any, repo: Path, tmp_path: Path,
                                             tag: str) -> None:
    marker = tmp_path / "pwned"
    write_grove(repo, "g", HEAD + f"  agents:\n    - name: a\n      task: {tag} "
                                  f"[\"touch {marker}\"]\n")
    [(_, line, col, msg)] = bad(engine, repo)
    assert (line, col) == (8, 13)
    assert msg.startswith("unsupported YAML tag ")
    assert not marker.exists()


def test_template_escaping_the_sandbox_is_refused(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents:\n    - name: a\n"
                "      task: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"\n")
    [(f, line, col, msg)] = bad(engine, repo)
    assert (f, line, col) == ("groves/g/grove.yaml", 8, 7)
    assert msg.startswith("agent a: task: template refused by the sandbox: ")
    assert "__class__" in msg


SENTINELS = {"ENGINE_TEST_TOKEN_A": "sentinel-aaa-5f1e9c", "ENGINE_TEST_TOKEN_B":
             "sentinel-bbb-77d0a2"}


def test_missing_from_env_names_the_variable_and_no_secret(
        engine: Any, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SENTINELS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ENGINE_TEST_MISSING", raising=False)
    write_grove(repo, "g", HEAD + textwrap.indent(textwrap.dedent("""\
          profiles:
            p:
              allowEnv: [ENGINE_TEST_TOKEN_B]
              credentials:
                A: {fromEnv: ENGINE_TEST_TOKEN_A}
                GONE: {fromEnv: ENGINE_TEST_MISSING}
          agents:
            - name: a
              profile: p
              task: uses the credentials
        """), "  "))
    [(f, line, col, msg)] = bad(engine, repo)
    assert (f, line, col) == ("groves/g/grove.yaml", 13, 7)
    assert msg == ("agent a: credential GONE: environment variable ENGINE_TEST_MISSING is not "
                   "set (declared at groves/g/grove.yaml:11)")
    for args in (("validate", "--json"), ("explain", "a", "--json"), ("explain", "a"),
                 ("validate", "--no-secrets")):
        r = engine(*args)
        for value in SENTINELS.values():
            assert value not in r.out + r.err, args


def test_all_problems_of_every_file_at_once(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  policy: {maxDepth: deep}\n  agents:\n"
                                  "    - name: a\n      task: x\n      colour: red\n")
    write_grove(repo, "g", "apiVersion: [\n", file="broken.yaml")
    found = bad(engine, repo)
    assert [(f, line) for f, line, _, _ in found] == [
        ("groves/g/broken.yaml", 2), ("groves/g/grove.yaml", 6), ("groves/g/grove.yaml", 10)]
    assert len({m.split(":")[0] for *_, m in found}) == 3


def test_all_reference_problems_at_once(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + textwrap.indent(textwrap.dedent("""\
          agents:
            - name: a
              task: x
              dependsOn: [b]
              profile: nope
            - name: b
              task: "{{ env.HOME }}"
              dependsOn: [a]
            - name: c
              task: x
              dependsOn: [ghost]
        """), "  "))
    assert bad(engine, repo) == [
        ("groves/g/grove.yaml", 9, 7,
         "agent a: dependency cycle: a -> b -> a (each waits for the next)"),
        ("groves/g/grove.yaml", 10, 7, "agent a: unknown profile 'nope' (profiles: local)"),
        ("groves/g/grove.yaml", 12, 7, "agent b: task: env.HOME: HOME is not in the profile's "
                                       "allowEnv (allowed: none)"),
        ("groves/g/grove.yaml", 16, 7, "agent c: dependsOn names unknown agent 'ghost'"),
    ]


def test_problems_of_several_groves_and_json(engine: Any, repo: Path) -> None:
    write_grove(repo, "one", HEAD.replace("name: g", "name: one") + "  agents: [{name: A}]\n")
    write_grove(repo, "two", HEAD.replace("name: g", "name: two") + "  policy: {maxAgents: 0}\n")
    r = engine("validate", "--json")
    assert r.code == 1
    doc = json.loads(r.out)
    assert doc["valid"] is False
    assert [(e["file"], e["line"], e["col"]) for e in doc["errors"]] == [
        ("groves/one/grove.yaml", 6, 12), ("groves/one/grove.yaml", 6, 13),
        ("groves/two/grove.yaml", 6, 12)]
    assert set(doc["errors"][0]) == {"file", "line", "col", "path", "message"}


def test_valid_grove_passes_with_a_summary(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents:\n    - name: a\n      task: x\n")
    r = engine("validate")
    assert (r.code, r.out, r.err) == (0, "valid: 1 grove (g), 1 agent\n", "")


def test_repository_example_groves_are_valid(engine: Any, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.chdir(ROOT)
    r = engine("validate", "--no-secrets")
    assert r.code == 0, r


# -- the fast schema pre-check must never accept what jsonschema rejects ----------------

NAMES = st.sampled_from(["a", "coder", "x-1", "A", "../x", "a b", "ok\n", "", "-a", "a" * 41])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.5, 2.0]),
                    NAMES, st.sampled_from(["never", "always", "30m", "2Gi", "1x", "/t"]))
FIELDS = ["name", "task", "role", "profile", "harness", "auth", "dependsOn", "restart",
          "maxDuration", "env", "resources", "spawnedBy", "spawnedAt", "spawnRequest",
          "runtime", "image", "access", "network", "credentials", "user", "mounts", "spawn",
          "allowEnv", "cpus", "memory", "pids", "fromEnv", "fromFile", "source", "target",
          "command", "taskArg", "builtin", "colour", "LOG_LEVEL"]
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)), max_leaves=12)
TARGETS = [("agent.json", "entry"), ("agent.json", "spec"), ("profile.json", "spec"),
           ("harness.json", "spec"), ("common.json", "duration"), ("common.json", "resources"),
           ("common.json", "credential"), ("common.json", "name")]


VALID = {
    ("agent.json", "entry"): {"name": "coder", "task": "x", "dependsOn": ["a", "b"],
                              "restart": "never", "maxDuration": "30m", "env": {"A": "b"},
                              "resources": {"cpus": 1, "memory": "2Gi", "pids": 64}},
    ("profile.json", "spec"): {"runtime": "docker", "image": "i", "access": "read-only",
                               "network": "none", "user": "1000:1000", "allowEnv": ["HOME"],
                               "credentials": {"TOKEN": {"fromEnv": "T"}, "F": None},
                               "mounts": [{"source": "s", "target": "/t"}],
                               "spawn": {"allowProfiles": ["a"]}},
    ("harness.json", "spec"): {"builtin": "shell", "command": ["bash", "-c", "x"],
                               "taskArg": "flag", "taskFlag": "-p", "resume": ["--continue"],
                               "instructionsFile": "AGENTS.md", "maxDuration": 60},
}


def near_valid() -> st.SearchStrategy[tuple[tuple[str, str], Any]]:
    """A valid value with some keys dropped and at most one replaced: mostly the edge of
    valid, where a pre-check that is too lenient would show."""
    def make(target: tuple[str, str], keep: list[bool], key: str, value: Any,
             change: bool) -> tuple[tuple[str, str], Any]:
        base = VALID[target]
        out = {k: base[k] for k, kept in zip(base, keep, strict=False)
               if kept or k in ("name", "task")}
        if change:
            out[key] = value
        return target, out
    return st.builds(make, st.sampled_from(sorted(VALID)), st.lists(st.booleans(), min_size=12,
                     max_size=12), st.sampled_from(FIELDS), VALUES, st.booleans())


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.one_of(
    near_valid(),
    st.tuples(st.sampled_from(TARGETS),
              st.one_of(VALUES, st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6)))))
def test_fast_check_agrees_with_jsonschema(case: tuple[tuple[str, str], Any]) -> None:
    (file, pointer), value = case
    fast = schema_fast.checker(schema.schema_dir(), file, pointer)
    assert fast is not None, f"{file}#{pointer} fell off the fast path"
    full = not any(True for _ in schema.validator(file, pointer).iter_errors(value))
    # True must imply valid; on these schemas the pre-check is exact, so demand that too
    assert fast(value) == full, value


def test_fast_check_covers_every_kind_and_accepts_valid_documents() -> None:
    for file in schema.KINDS.values():
        assert schema_fast.checker(schema.schema_dir(), file) is not None, file
    for grove in sorted((ROOT / "groves").iterdir()):
        for doc in yamlio.load_file(grove / "grove.yaml"):
            assert schema_fast.checker(schema.schema_dir(), "grove.json")(doc.data)  # type: ignore[misc]


def test_trailing_newline_does_not_sneak_past_a_pattern() -> None:
    for check in (schema.is_valid, lambda v, f, p: schema_fast.checker(  # type: ignore[misc]
            schema.schema_dir(), f, p)(v)):
        assert check("coder", "common.json", "name")
        assert not check("coder\n", "common.json", "name")
    assert not any(True for _ in schema.validator("common.json", "name").iter_errors("coder")
                   ) and any(True for _ in schema.validator("common.json", "name")
                             .iter_errors("coder\n"))


def test_security_gate_and_runtime_only_fields(engine: Any, repo: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    write_grove(repo, "g", HEAD + textwrap.indent(textwrap.dedent("""\
        profiles:
          root:
            runtime: docker
            image: x
            privileged: true
            mounts: [{source: /etc, target: /host-etc}, {source: ./data, target: /data}]
          plain:
            runtime: local
            namespace: team
        agents: []
        """), "  "))
    found = bad(engine, repo)
    assert [(line, col) for _, line, col, _ in found] == [(10, 7), (11, 17), (14, 7)]
    assert found[0][3].startswith("profile root: privileged containers are refused (set "
                                  "security.allowPrivileged: true in ")
    assert found[1][3].startswith("profile root: mount source /etc is outside the "
                                  "repository (set security.allowHostMounts: true in ")
    assert found[2][3] == ("profile plain: field 'namespace' only applies to runtime "
                           "kubernetes, not local")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "config.yaml").write_text(
        "security: {allowPrivileged: true, allowHostMounts: true}\n")
    assert [m for *_, m in bad(engine, repo)] == [found[2][3]]


def test_policy_bounds(engine: Any, repo: Path) -> None:
    agents = "".join(f"    - name: c{i}\n      task: x\n      spawnedBy: p\n" for i in range(3))
    write_grove(repo, "g", HEAD + "  policy: {maxAgents: 4, maxDepth: 1, maxChildren: 2}\n"
                "  agents:\n    - name: p\n      task: x\n" + agents
                + "    - name: d\n      task: x\n      spawnedBy: c0\n")
    assert bad(engine, repo) == [
        ("groves/g/grove.yaml", 6, 3, "grove g: 5 agents, over policy.maxAgents 4"),
        ("groves/g/grove.yaml", 18, 7, "agent c2: parent p has more than policy.maxChildren 2 "
                                       "children"),
        ("groves/g/grove.yaml", 21, 7, "agent d: spawn depth 2 is over policy.maxDepth 1"),
    ]


def test_few_bad_agents_in_a_big_grove_are_found_quickly(engine: Any, repo: Path) -> None:
    entries = [f"    - name: a{i}\n      task: x\n" for i in range(3000)]
    entries[1234] = "    - name: a1234\n      task: x\n      colour: red\n"
    entries[2999] = "    - name: A2999\n      task: x\n"
    write_grove(repo, "g", HEAD + "  policy: {maxAgents: 5000}\n  agents:\n" + "".join(entries))
    t = time.perf_counter()
    found = bad(engine, repo)
    assert time.perf_counter() - t < 10  # the whole grove through jsonschema takes far longer
    assert found == [
        ("groves/g/grove.yaml", 8 + 2 * 1234 + 2, 7, "agent a1234: unknown field 'colour'"),
        ("groves/g/grove.yaml", 8 + 2 * 2999 + 1, 7,
         "agent at spec.agents[2999]: name: 'A2999' is not valid (a DNS-label-like name: "
         "lower-case letters, digits and '-', 1 to 40 characters, starting and ending with a "
         "letter or digit)")]


# -- no input, however broken, gets past the loader as anything but a diagnostic ---------

SEED = HEAD + textwrap.indent(textwrap.dedent("""\
    defaults: {profile: box, env: {A: "1"}}
    profiles:
      box: {runtime: local, allowEnv: [HOME], credentials: {T: {fromEnv: HOME}}}
    harnesses:
      sh: {builtin: shell, command: [bash, -c, "{{ task }}"]}
    agents:
      - name: a
        task: "{{ agent.name }}"
        dependsOn: [b]
      - name: b
        harness: sh
        task: x
        resources: {memory: 1Gi, cpus: 0.5}
    """), "  ")
JUNK = st.sampled_from(["", "  ", "\t", ":", "- ", "[", "]", "{", "}", "&a ", "*a", "!!str ",
                        "!!python/object:os.system ", "<<: *a", "~", "null", "1e9", "-1",
                        "name: ../x", "profile: nope", "dependsOn: [a]", "spawnedBy: a",
                        "task: '{{ env.X }}'", "task: {{", "'", '"', "\\", "#", "---",
                        "%YAML 1.1", "? ", "|", ">", "\x00", "\u00e9", "0o17", "yes"])


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 40), JUNK), max_size=4))
def test_any_broken_grove_is_a_diagnostic_never_a_crash(edits: list[tuple[int, int, str]],
                                                        tmp_path_factory: pytest.TempPathFactory
                                                        ) -> None:
    lines = SEED.splitlines()
    for line, col, junk in edits:
        i = line % len(lines)
        lines[i] = lines[i][:col] + junk + lines[i][col:]
    root = tmp_path_factory.mktemp("fuzz")
    d = write_grove(root, "g", "\n".join(lines) + "\n")
    try:
        desired.build(manifest.load_grove(d, root),
                      desired.Options(resolve_secrets=True, secret_key=b"k", repo_root=root))
    except InvalidManifests as e:
        for diag in e.diagnostics:
            assert diag.file.startswith("groves/g/") and diag.line >= 1 and diag.col >= 1, diag
            assert "\n" not in diag.message


def test_control_character_is_located(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + "  agents:\n    - name: a\n      task: ab\x00c\n")
    assert bad(engine, repo) == [("groves/g/grove.yaml", 8, 15, "invalid YAML: character "
                                  "#x0000 is not allowed (control characters)")]


def test_references_no_agent_uses_yet(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + textwrap.indent(textwrap.dedent("""\
        defaults: {profile: ghost, harness: shell}
        profiles:
          box:
            spawn: {allowProfiles: [box, nowhere], allowHarnesses: [shell, robot]}
        agents: []
        """), "  "))
    assert bad(engine, repo) == [
        ("groves/g/grove.yaml", 6, 14, "grove g: spec.defaults.profile: unknown profile "
                                       "'ghost' (profiles: box, local)"),
        ("groves/g/grove.yaml", 9, 36, "profile box: spawn.allowProfiles names unknown "
                                       "profile 'nowhere' (profiles: box, local)"),
        ("groves/g/grove.yaml", 9, 70, "profile box: spawn.allowHarnesses names unknown "
                                       "harness 'robot' (harnesses: claude, codex, gemini, "
                                       "opencode, shell)"),
    ]


def test_fast_check_gives_up_on_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"type": "object", "patternProperties": {}}))
    (tmp_path / "b.json").write_text(json.dumps(
        {"$defs": {"x": {"properties": {"k": {}}, "additionalProperties": True}},
         "$ref": "#/$defs/x", "unevaluatedProperties": False}))
    (tmp_path / "c.json").write_text(json.dumps({"type": "array", "uniqueItems": True}))
    assert schema_fast.checker(tmp_path, "a.json") is None
    assert schema_fast.checker(tmp_path, "b.json") is None
    unique = schema_fast.checker(tmp_path, "c.json")
    assert unique is not None
    assert unique(["a", "b"]) and not unique(["a", "a"])
    assert not unique([1, True])  # unsure (1 == True in Python): left to jsonschema


def test_name_problems_reported_with_schema_problems(engine: Any, repo: Path) -> None:
    """A misnamed grove, a duplicate agent and an unknown field: one run shows all three."""
    write_grove(repo, "g", HEAD.replace("name: g", "name: other") +
                "  agents:\n    - {name: a, task: x}\n    - {name: a, task: y, colour: red}\n")
    messages = [m for *_, m in bad(engine, repo)]
    assert len(messages) == 3
    assert any("metadata.name must match its directory" in m for m in messages)
    assert any("duplicate name" in m for m in messages)
    assert any("unknown field 'colour'" in m for m in messages)


def test_mistyped_references_get_the_closest_name(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", HEAD + textwrap.indent(textwrap.dedent("""\
          agents:
            - name: reviewer
              task: x
            - name: a
              task: x
              dependsOn: [reviwer]
            - name: b
              task: x
              profile: locl
            - name: c
              task: x
              harness: shel
        """), "  "))
    found = [msg for _, _, _, msg in bad(engine, repo)]
    assert found == [
        "agent a: dependsOn names unknown agent 'reviwer' (did you mean 'reviewer'?)",
        "agent b: unknown profile 'locl' (did you mean 'local'?) (profiles: local)",
        "agent c: unknown harness 'shel' (did you mean 'shell'?) (harnesses: claude, codex, "
        "gemini, opencode, shell)",
    ]
