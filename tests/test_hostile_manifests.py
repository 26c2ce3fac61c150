"""Hostile manifests (issue 11, items 6 and 7): what a pull request can put in groves/ must
not print the CI's environment, hang or eat memory, read devices or FIFOs, hand a secret
to a template, run agents as root or next to .git, or make two groves kill each other's
agents.

Every command runs the real CLI (`engine` in a subprocess, so a hang is a failed test, not
a stuck run) on a real git repository, with a canary secret in its environment that must
never appear in anything it prints."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import layers, render, schema, schema_fast
from engine.runtimes import docker_spec, get
from engine.runtimes import k8s_objects as objs
from tests.conftest import ROOT, git, write_grove
from tests.k8s_apiserver import FakeApiServer
from tests.test_kubernetes import KUBE, Kube, load

CANARY = "s3cr3t-canary"
BIN = ROOT / ".venv" / "bin" / "engine"
ENGINE = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "engine"]
HEAD = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: g}
spec:
"""


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float


def engine(repo: Path, *args: str, **env: str) -> Run:
    """The real `engine` command in `repo`, with the canary in its environment."""
    t = time.monotonic()
    p = subprocess.run([*ENGINE, *args], cwd=repo, capture_output=True, text=True,
                       timeout=90, env={**os.environ, "CANARY_SECRET": CANARY, **env})
    return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - t)


def one_error(r: Run, where: str) -> str:
    """The one `error:` line of a failed run, which names `where` (file:line); nothing
    the run printed holds the canary, and it was quick."""
    assert r.code == 1, r
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.err
    assert re.search(rf"(^error: |: ){re.escape(where)}(:\d+)?: ", errors[0]), errors[0]
    assert CANARY not in r.out + r.err
    assert "Traceback" not in r.err
    assert r.seconds < 30, r.seconds
    return errors[0]


def grove(repo: Path, body: str, name: str = "g") -> None:
    write_grove(repo, name, HEAD.replace("name: g", f"name: {name}")
                + textwrap.indent(textwrap.dedent(body), "  "))


def commit(repo: Path) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "groves")


# -- 1. templates see no environment when checking a pull request; errors echo no value --

LEAKS = [
    "{{ {}[env.CANARY_SECRET] }}",                # undefined item, named by the value
    "{{ env.CANARY_SECRET.index('zz') }}",
    "{{ env.CANARY_SECRET | int(base=99) ~ none.x }}",
    "{{ ('%d' % env.CANARY_SECRET) }}",
    "{{ env.CANARY_SECRET | float + [] }}",
    "{% include env.CANARY_SECRET %}",
    "{{ range(env.CANARY_SECRET) }}",
    "{{ agent[env.CANARY_SECRET] }}",
    "{{ env.CANARY_SECRET.__class__ }}",
]
PRINTS_ENV = """\
profiles:
  p: {allowEnv: [CANARY_SECRET]}
agents:
  - name: a
    profile: p
    task: "TASK"
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("template", LEAKS)
def test_template_errors_never_echo_an_environment_value(repo: Path, template: str) -> None:
    grove(repo, PRINTS_ENV.replace("TASK", template.replace('"', '\\"')))
    commit(repo)
    for args in (("validate", "--no-secrets"), ("validate",), ("plan", "--base", "HEAD")):
        line = one_error(engine(repo, *args), "groves/g/grove.yaml:10")
        assert "agent a: task: template " in line, line


@pytest.mark.timeout(120)
def test_pull_request_templates_see_no_environment_value(repo: Path) -> None:
    """validate --no-secrets and plan --base render `env.X` as a placeholder: the value
    reaches no output, and no exit status or changed field depends on it."""
    grove(repo, PRINTS_ENV.replace("TASK", "x"))
    commit(repo)
    grove(repo, PRINTS_ENV.replace("TASK", "{{ 'x' if env.CANARY_SECRET.startswith('s3') "
                                           "else env.CANARY_SECRET }}"))
    r = engine(repo, "validate", "--no-secrets")
    assert (r.code, CANARY in r.out + r.err) == (0, False), r
    runs = [engine(repo, "plan", "--base", "HEAD", "--format", "json", CANARY_SECRET=v)
            for v in (CANARY, "zz-other")]
    assert runs[0].code == 0 and CANARY not in runs[0].out + runs[0].err, runs[0]
    assert runs[0].out == runs[1].out  # the same answer whatever the value is
    assert "task" in runs[0].out  # changed: the placeholder never starts with s3


def test_unit_error_messages_keep_names_written_in_the_template() -> None:
    ctx = {"env": {"X": CANARY}, "agent": {"name": "a"}}
    for text, message in [("{{ nothing }}", "template error: 'nothing' is undefined"),
                          ("{{ agent.nickname }}",
                           "template error: 'dict object' has no attribute 'nickname'"),
                          ("{{ agent[env.X] }}",
                           "template error: undefined name, attribute or item"),
                          ("{{ env.X.index('q') }}",
                           "template error: ValueError: substring not found"),
                          ("{{ env.X | float + [] }}", "template error: TypeError")]:
        with pytest.raises(render.TemplateError) as e:
            render.render(text, ctx)
        assert str(e.value).startswith(message), (text, str(e.value))
        assert CANARY not in str(e.value)


# -- 2. templates are bounded --------------------------------------------------------------

BOMBS = [
    ("{{ 9**(9**9) }}", "number over 8192 bits"),
    ("{{ range(10**9) | list }}", "range over 10000 items"),
    ("{{ 'a' * 10**10 }}", "repetition would make over"),
    ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
     "over 200000 steps"),
    ("{% set s = 'a' * 100000 %}{% for i in range(10000) %}{{ s }}{% endfor %}",
     "characters output in all"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}"
     "{{ f(60) }}", ""),
    ("{{ '%0999999999d' % 1 }}", "format width or precision over"),
    ("{{ '{:>999999999}'.format(1) }}", "format width or precision over"),
    ("{{ 'a' | center(10**9) }}", "width of filter center over"),
    ("{{ ('{0}' * 50000).format('a' * 1000) }}", "formatting would make over"),
    ("{{ (range(1000) | list) | join('x' * 100000) }}", "join would make over"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(64) %}"
     "{% set ns.x = ns.x ~ ns.x %}{% endfor %}", "concatenation would make over"),
    ("{% set ns = namespace(x=[1]) %}{% for i in range(64) %}"
     "{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x == [] }}", "a value over"),
    ("{{ ('\\t' * 100000).expandtabs(100000) }}", "expandtabs would make over"),
    ("{{ [1] | batch(10**9, 'x') | list }}", "linecount of filter batch over"),
    ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("template", "why"), BOMBS)
def test_unit_template_bombs_fail_fast(template: str, why: str) -> None:
    t = time.monotonic()
    with pytest.raises(render.TemplateError) as e:
        render.render(template, {"env": {}})
    assert time.monotonic() - t < render.MAX_SECONDS + 3
    assert why in str(e.value), str(e.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("template", [b[0] for b in BOMBS[:5]])
def test_template_bombs_are_one_line_errors(repo: Path, template: str) -> None:
    grove(repo, PRINTS_ENV.replace("TASK", template.replace('"', '\\"')))
    line = one_error(engine(repo, "validate", "--no-secrets"), "groves/g/grove.yaml:10")
    assert "template refused by the sandbox: " in line


def test_ordinary_templates_still_render() -> None:
    ctx = {"task": "t", "agent": {"name": "a"}, "grove": {"name": "g"}, "env": {"X": "1"}}
    text = ("{% for x in [1, 2] %}{{ loop.index }}/{{ loop.length }} {% endfor %}"
            "{{ '%s-%d' % ('a', 3) }} {{ '{}:{}'.format(1, 2) }} {{ 2**10 }} "
            "{{ 'ab' * 3 }} {{ agent.name ~ '@' ~ grove.name }} {{ [1, 2] | tojson }} "
            "{{ range(3) | join(',') }} {{ task | upper | center(5) }}")
    assert render.render(text, ctx) == \
        "1/2 2/2 a-3 1:2 1024 ababab a@g [1, 2] 0,1,2   T  "


# -- 3. manifests and fromFile credentials: regular files within limits only --------------

def special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "dir":
        path.mkdir()
    else:  # sparse: over the limit without writing it
        with path.open("wb") as f:
            f.truncate(64 * 1024 * 1024)


REASONS = {"fifo": "is a FIFO, not a regular file", "zero": "is a symbolic link",
           "dir": "is a directory, not a regular file", "big": "bytes, over the"}
# fromFile follows a symlink (users point at ~/.config/...), to find the device behind it
FOLLOWED = {**REASONS, "zero": "is a character device, not a regular file"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(REASONS))
def test_manifest_that_is_no_regular_file(repo: Path, kind: str) -> None:
    grove(repo, "agents: [{name: a, task: x}]\n")
    special(kind, repo / "groves" / "g" / "extra.yaml")
    for args in (("validate",), ("plan",), ("plan", "--base", "HEAD")):
        line = one_error(engine(repo, *args), "groves/g/extra.yaml:1")
        assert REASONS[kind] in line, line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(REASONS))
def test_from_file_credential_that_is_no_regular_file(repo: Path, tmp_path: Path,
                                                      kind: str) -> None:
    source = tmp_path / "token"
    special(kind, source)
    grove(repo, f"""\
        profiles:
          p:
            credentials:
              T: {{fromFile: {source}}}
        agents: [{{name: a, profile: p, task: x}}]
        """)
    for args in (("validate",), ("plan",)):
        line = one_error(engine(repo, *args), "groves/g/grove.yaml:9")
        assert f"agent a: credential T: file {source} " in line, line
        assert line.endswith("(declared at groves/g/grove.yaml:8)"), line
        assert FOLLOWED[kind] in line, line
    assert engine(repo, "validate", "--no-secrets").code == 0  # nothing is read then


@pytest.mark.timeout(120)
def test_from_file_may_be_a_symlink_to_a_regular_file(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "real").write_text(CANARY + "\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    grove(repo, f"""\
        profiles:
          p: {{credentials: {{T: {{fromFile: {tmp_path / "link"}}}}}}}
        agents: [{{name: a, profile: p, task: x}}]
        """)
    r = engine(repo, "validate")
    assert r.code == 0 and CANARY not in r.out + r.err, r


@pytest.mark.timeout(120)
def test_grove_directory_that_is_a_symlink(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "grove.yaml").write_text(HEAD.replace("name: g", "name: evil")
                                        + f"  colour: {CANARY}\n")
    grove(repo, "agents: [{name: a, task: x}]\n")
    (repo / "groves" / "evil").symlink_to(outside)
    line = one_error(engine(repo, "validate"), "groves/evil")
    assert "is a symbolic link" in line


# -- 4. allowEnv never names a credential ---------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize(("allowed", "why"), [
    ("CANARY_SECRET", "the source of credential T of profile p"),
    ("T", "credential T of profile p"),
    ("GH_TOKEN", "credential GH_TOKEN of profile q"),
    ("ANTHROPIC_API_KEY", "a credential harness claude authenticates with"),
])
def test_allow_env_may_not_name_a_credential(repo: Path, allowed: str, why: str) -> None:
    grove(repo, f"""\
        profiles:
          p:
            allowEnv: [HOME, {allowed}]
            credentials:
              T: {{fromEnv: CANARY_SECRET}}
          q:
            credentials:
              GH_TOKEN: {{fromFile: /nonexistent}}
        agents:
          - name: a
            profile: p
            task: "{{{{ env.HOME }}}}"
        """)
    for args in (("validate", "--no-secrets"), ("apply", "--auto-approve")):
        line = one_error(engine(repo, *args), "groves/g/grove.yaml:7")
        assert f"profile p: allowEnv names {allowed}, {why}" in line, line
    state = repo / ".engine"
    assert not any(CANARY.encode() in p.read_bytes() for p in state.rglob("*")
                   if p.is_file()) if state.exists() else True


# -- 5. root agents and mounts of .git / .engine ---------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("user", ['"0"', '"0:0"', '"00:1000"'])
def test_root_agents_need_the_user_config(repo: Path, user: str) -> None:
    grove(repo, f"""\
        profiles:
          p: {{runtime: docker, image: x, user: {user}}}
        agents: [{{name: a, profile: p, task: x}}]
        """)
    line = one_error(engine(repo, "validate", "--no-secrets"), "groves/g/grove.yaml:6")
    assert "profile p: user " in line and "runs agents as root" in line
    assert "security.allowRootAgents: true" in line
    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "engine" / "config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("security: {allowRootAgents: true}\n")
    assert engine(repo, "validate", "--no-secrets").code == 0
    cfg.write_text("security: {allowRootAgents: 'yes'}\n")
    line = one_error(engine(repo, "validate", "--no-secrets"), f"{cfg}:1")
    assert "security.allowRootAgents: expected true or false" in line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", [".git", ".git/objects", ".", ".engine", ".engine/state",
                                    "..", "./src/../.git"])
def test_mounts_never_reach_git_or_engine(repo: Path, source: str) -> None:
    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "engine" / "config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("security: {allowHostMounts: true}\n")  # even then
    grove(repo, f"""\
        profiles:
          p:
            runtime: docker
            image: x
            mounts: [{{source: "{source}", target: /m}}]
        agents: [{{name: a, profile: p, task: x}}]
        """)
    line = one_error(engine(repo, "validate", "--no-secrets"), "groves/g/grove.yaml:9")
    assert f"profile p: mount source {source} would expose the repository's ." in line
    grove(repo, """\
        profiles:
          p: {runtime: docker, image: x, mounts: [{source: src, target: /m}]}
        agents: [{name: a, profile: p, task: x}]
        """)
    assert engine(repo, "validate", "--no-secrets").code == 0


def test_user_config_schema_is_the_source_and_the_fast_check_agrees() -> None:
    assert schema_fast.checker(schema.schema_dir(), "common.json", "userConfig") is not None
    assert layers.user_config_keys()["security"] == (
        "allowPrivileged", "allowHostMounts", "allowRootAgents")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["defaults", "security", "other"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=3),
              st.dictionaries(st.sampled_from(["allowPrivileged", "allowHostMounts",
                                               "allowRootAgents", "allowAll"]),
                              st.one_of(st.booleans(), st.none(), st.integers()))))))
def test_fast_check_agrees_with_jsonschema_on_user_configs(value: Any) -> None:
    fast = schema_fast.checker(schema.schema_dir(), "common.json", "userConfig")
    assert fast is not None
    full = not any(True for _ in schema.validator("common.json", "userConfig")
                   .iter_errors(value))
    assert fast(value) == full, value


# -- 6. runtime names: one per (repository, grove, agent) ------------------------------------

def test_container_names_of_groves_that_read_alike_differ(tmp_path: Path) -> None:
    one = docker_spec.container_name(tmp_path, "a", "b-c")
    two = docker_spec.container_name(tmp_path, "a-b", "c")
    assert one != two
    assert one.startswith("engine-a-b-c-") and two.startswith("engine-a-b-c-")
    assert docker_spec.container_name(tmp_path / "other", "a", "b-c") != one
    assert docker_spec.container_name(tmp_path, "a", "b-c") == one  # stable


NAME = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?", fullmatch=True)


@settings(max_examples=500, deadline=None)
@given(NAME, NAME, NAME, NAME)
def test_kubernetes_names_are_unique_and_short(g1: str, a1: str, g2: str, a2: str) -> None:
    n1, n2 = objs.object_name(g1, a1), objs.object_name(g2, a2)
    assert (n1 == n2) == ((g1, a1) == (g2, a2))
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?", n1), n1


def test_kubernetes_names_that_used_to_collide() -> None:
    assert objs.legacy_object_name("a", "b-c") == objs.legacy_object_name("a-b", "c")
    assert objs.object_name("a", "b-c") == "a-b--c"
    assert objs.object_name("a-b", "c") == "a--b-c"
    assert objs.object_name("demo", "coder") == "demo-coder"  # dashless names unchanged
    long = objs.object_name("g" * 40, "a" * 40)
    assert len(long) == 52 and "---" in long


DOCKER_GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: {grove}}}
spec:
  defaults: {{profile: box, harness: shell}}
  profiles:
    box:
      runtime: docker
      image: {image}
      credentials: {{T: {{fromEnv: CANARY_SECRET}}}}
  agents:
    - {{name: {agent}, task: sleep 300}}
"""


def containers(repo: Path) -> dict[str, str]:
    """name -> state of every container this repository owns."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=engine.repo={repo}",
                          "--format", "{{.Names}} {{.State}}"], capture_output=True,
                         text=True, check=True).stdout
    return dict(line.split() for line in out.splitlines())


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_groves_that_read_alike_keep_their_own_containers(repo: Path,
                                                          base_image: str) -> None:
    root = repo.resolve()
    for g, a in (("a", "b-c"), ("a-b", "c")):
        write_grove(repo, g, DOCKER_GROVE.format(grove=g, agent=a, image=base_image))
    try:
        for g in ("a", "a-b", "a"):  # each apply leaves the other grove's agent alone
            r = engine(repo, "apply", "-g", g, "--auto-approve")
            assert r.code == 0 and CANARY not in r.out + r.err, r
        names = {docker_spec.container_name(root, "a", "b-c"),
                 docker_spec.container_name(root, "a-b", "c")}
        assert len(names) == 2
        assert {n: s for n, s in containers(root).items()} == dict.fromkeys(names, "running")
        inspect = subprocess.run(["docker", "inspect", *names], capture_output=True,
                                 text=True, check=True).stdout
        assert CANARY not in inspect
        for state in (repo / ".engine" / "state").glob("*.json"):
            assert CANARY not in state.read_text()
    finally:
        for g in ("a", "a-b"):
            engine(repo, "destroy", "-g", g, "--auto-approve")
    assert containers(root) == {}


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_container_under_the_old_name_is_still_found_and_removed(repo: Path,
                                                                 base_image: str) -> None:
    """An engine upgrade must not orphan a running agent: a container named the old way
    (`engine-<grove>-<agent>-<digest of the repository>`) is observed and destroyed."""
    root = repo.resolve()
    write_grove(repo, "g", DOCKER_GROVE.format(grove="g", agent="a", image=base_image))
    old = f"engine-g-a-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
    try:
        assert engine(repo, "apply", "--auto-approve").code == 0
        subprocess.run(["docker", "rename", docker_spec.container_name(root, "g", "a"), old],
                       check=True)
        status = json.loads(engine(repo, "status", "--json").out)
        assert [(x["name"], x["phase"]) for x in status["groves"][0]["agents"]] == [
            ("a", "Running")]
        r = engine(repo, "destroy", "--auto-approve")
        assert r.code == 0, r
        assert containers(root) == {}
    finally:
        subprocess.run(["docker", "rm", "-f", old], capture_output=True)


@pytest.mark.timeout(120)
def test_kubernetes_objects_under_the_old_name_are_removed_only_if_theirs(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(kube, x-worker) made by an engine before the escaped naming is `kube-x-worker`,
    which (kube-x, worker) also had: deleting the latter leaves it alone, deleting the
    former removes it."""
    monkeypatch.setenv("TEST_GIT_TOKEN", "token")
    server = FakeApiServer(namespaces=("default", "agents"))
    server.start()
    try:
        kube = Kube(repo, server)
        for g, a in (("kube", "x-worker"), ("kube-x", "worker")):
            text = KUBE.format(remote=kube.remote, namespace="agents", task='"echo hi"',
                               kubeconfig=kube.kubeconfig, extra="", restart="never")
            write_grove(repo, g, text.replace("name: kube}", f"name: {g}}}")
                        .replace("- name: worker", f"- name: {a}"))
        old = load(repo, "kube").agent("x-worker")
        with monkeypatch.context() as m:  # the engine before: ambiguous names
            m.setattr(objs, "object_name", objs.legacy_object_name)
            kube.rt.create(kube.launch(old))
        made = sorted(kube.objects())
        assert "Job/kube-x-worker" in made
        get("kubernetes", repo).delete("kube-x", "worker")
        assert sorted(kube.objects()) == made  # another grove's: untouched
        get("kubernetes", repo).delete("kube", "x-worker")
        assert [k for k in kube.objects() if not k.startswith("Pod/")] == []
    finally:
        server.stop()
