"""Credentials per harness and runtime. A harness's auth selection decides only which of its
own auth credentials (those its auth methods name) pass: the chosen method's do, the other
methods' do not. Every other credential of the profile (GIT_TOKEN, NPM_TOKEN here) reaches
the agent on every runtime. Local and docker: a real agent (the built-in harness with its
command replaced by a probe that writes down the credential NAMES it sees, never a value)
run by `engine apply`. Kubernetes: the agent's Secret as the API server stand-in
(tests/k8s_apiserver.py) receives it from `engine apply`. Values never appear anywhere
but where the agent reads them."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import desired, manifest
from tests.conftest import git, write_grove
from tests.k8s_apiserver import FakeApiServer

HARNESSES = ["claude", "codex", "gemini", "opencode", "shell"]
# per harness: (the method chosen: its variable; another method's variable; another
# method's login file credential and where it would go in the home). The shell harness
# has no auth methods: every credential passes, claude's names included.
AUTH = {
    "claude": ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN",
               ("CLAUDE_CREDENTIALS", ".claude/.credentials.json")),
    "codex": ("CODEX_API_KEY", "OPENAI_API_KEY", ("CODEX_AUTH_JSON", ".codex/auth.json")),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY",
               ("GEMINI_OAUTH_CREDS", ".gemini/oauth_creds.json")),
    "opencode": ("ANTHROPIC_API_KEY", "OPENAI_API_KEY",
                 ("OPENCODE_AUTH_JSON", ".local/share/opencode/auth.json")),
    "shell": ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN",
              ("CLAUDE_CREDENTIALS", ".claude/.credentials.json")),
}
METHOD = {"claude": "api-key", "codex": "api-key", "gemini": "api-key",
          "opencode": "anthropic-api-key", "shell": None}  # the method chosen
OTHERS = ["GIT_TOKEN", "NPM_TOKEN"]  # no harness authenticates with these
# the base image, labelled as carrying every harness program (the probe runs instead)
IMAGE = "grove-engine/test-credentials:latest"
SEEN = "creds-seen.txt"  # the probe's report, in the agent's workspace


def value(name: str) -> str:
    return f"v4lue-of-{name.lower()}-never-shown"


def declared(harness: str) -> list[str]:
    chosen, other, (login, _) = AUTH[harness]
    return sorted({*OTHERS, chosen, other, login})


def expected(harness: str) -> list[str]:
    """The credentials the agent gets."""
    if harness == "shell":
        return declared(harness)
    return sorted([*OTHERS, AUTH[harness][0]])


def probe(harness: str) -> str:
    """A bash script writing the names of the declared credentials it has (as variables,
    or as the login file in its home): names only."""
    _, _, (login, path) = AUTH[harness]
    checks = [f'[ -n "${{{n}+x}}" ] && echo {n}' for n in declared(harness)]
    checks.append(f'[ -e "$HOME/{path}" ] && echo file:{login}')
    return f"exec > {SEEN}; " + "; ".join(checks) + "; true"


def grove_text(harness: str, runtime: str, tmp: Path, remote: Path | None = None,
               kubeconfig: Path | None = None, auth: str | None = None) -> str:
    _, _, (login, _) = AUTH[harness]
    creds: dict[str, Any] = {n: {"fromEnv": f"SRC_{n}"} for n in declared(harness)
                             if n != login}
    creds[login] = {"fromFile": str(tmp / "login.json")}
    profile: dict[str, Any] = {"runtime": runtime, "credentials": creds}
    if runtime != "local":
        profile["image"] = IMAGE
    if runtime == "kubernetes":
        profile |= {"namespace": "agents", "kubeconfig": str(kubeconfig)}
    spec: dict[str, Any] = {"profiles": {"box": profile}}
    if remote is not None:
        spec["remote"] = str(remote)
    if harness == "shell":
        agent = {"name": "a", "profile": "box", "harness": "shell", "task": probe(harness)}
    else:  # the built-in, its program replaced by the probe (the task follows as "$1")
        spec["harnesses"] = {harness: {"builtin": harness, "command": ["bash", "-c",
                                                                       probe(harness)],
                                       "adapter": "none"}}
        agent = {"name": "a", "profile": "box", "harness": harness, "task": "do the work",
                 **({"auth": auth} if auth else {})}
    spec["agents"] = [agent]
    return yaml.safe_dump({"apiVersion": "engine/v1alpha1", "kind": "Grove",
                           "metadata": {"name": "g"}, "spec": spec}, sort_keys=False)


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every credential's source (under another name than the agent sees: the local
    runtime inherits the engine's environment), and the login file."""
    for n in {n for h in AUTH.values() for n in (h[0], h[1], h[2][0])} | set(OTHERS):
        monkeypatch.delenv(n, raising=False)
        monkeypatch.setenv(f"SRC_{n}", value(n))
    src = tmp_path / "src"
    src.mkdir()
    (src / "login.json").write_text(value("login"))
    return src


def all_values() -> list[str]:
    names = {n for h in AUTH.values() for n in (h[0], h[1], h[2][0])} | set(OTHERS)
    return [value(n) for n in sorted(names)] + [value("login")]


def assert_no_values(text: str, where: str) -> None:
    for v in all_values():
        assert v not in text, f"a credential value in {where}"
        assert base64.b64encode(v.encode()).decode() not in text, f"a value in {where}"


def assert_state_clean(repo: Path, secrets: Path | None = None) -> None:
    """No value in the engine's state but in `secrets` (the files a container mounts)."""
    for p in (repo / ".engine").rglob("*"):
        if p.is_file() and not p.is_symlink() and not (secrets and p.is_relative_to(secrets)):
            assert_no_values(p.read_bytes().decode(errors="replace"), str(p))


def commit(repo: Path) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")


def seen(repo: Path) -> list[str]:
    return sorted((repo / ".engine" / "worktrees" / "g" / "a" / SEEN).read_text().split())


# -- what the engine resolves, and what explain and plan say ----------------------------

@pytest.mark.parametrize("harness", HARNESSES)
def test_resolved_agent_explain_and_plan_list_what_the_agent_gets(
        harness: str, repo: Path, sources: Path, engine: Any) -> None:
    write_grove(repo, "g", grove_text(harness, "local", sources))
    a = desired.build(manifest.load_grove(repo / "groves" / "g", repo),
                      desired.Options(repo_root=repo)).agent("a")
    assert [c.name for c in a.credentials] == expected(harness)
    assert a.auth == METHOD[harness]
    assert all(n != AUTH[harness][2][0] for n, _ in a.credential_files)
    res = engine("explain", "a")
    assert res.code == 0, res
    listed = sorted({line.split()[0].split(".")[1] for line in res.out.splitlines()
                     if line.strip().startswith("credentials.")})
    assert listed == expected(harness)
    res_json = engine("explain", "a", "--json")
    assert sorted(json.loads(res_json.out)["settings"]["credentials"]) == expected(harness)
    plan = engine("plan")
    assert plan.code in (0, 2), plan
    for r in (res, res_json, plan):
        assert_no_values(r.out + r.err, "the output")


# -- local and docker: a real agent says which credentials it has -----------------------

@pytest.fixture(scope="session")
def probe_image(base_image: str) -> str:
    labels = "".join(f" engine.harness.{h}=probe" for h in HARNESSES if h != "shell")
    subprocess.run(["docker", "build", "-q", "-t", IMAGE, "-"], check=True,
                   capture_output=True, input=f"FROM {base_image}\nLABEL{labels}\n",
                   text=True, timeout=300)
    return IMAGE


@pytest.fixture
def destroy(repo: Path) -> Iterator[None]:
    yield
    subprocess.run([sys.executable, "-m", "engine", "destroy", "--auto-approve"], cwd=repo,
                   capture_output=True, timeout=300)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("runtime", ["local", pytest.param("docker", marks=pytest.mark.docker)])
@pytest.mark.parametrize("harness", HARNESSES)
def test_agent_sees_its_credentials(harness: str, runtime: str, repo: Path, sources: Path,
                                    engine: Any, destroy: None,
                                    request: pytest.FixtureRequest) -> None:
    if runtime == "docker":
        request.getfixturevalue("probe_image")
    write_grove(repo, "g", grove_text(harness, runtime, sources))
    commit(repo)
    res = engine("apply", "--auto-approve", "--wait", "--timeout", "120")
    assert res.code == 0, res
    # not the other method's variable nor its login file (shell: every one, as variables)
    assert seen(repo) == expected(harness)
    assert_no_values(res.out + res.err, "apply's output")
    secrets = repo / ".engine" / "run" / "g" / "a" / "secrets"
    if runtime == "docker":  # the files mounted at /run/secrets: the same names
        assert sorted(p.name for p in secrets.iterdir()
                      if not p.name.startswith(desired.HOME_FILE_PREFIX)) == expected(harness)
    assert_state_clean(repo, secrets if runtime == "docker" else None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("runtime", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_chosen_login_file_passes_with_the_other_credentials(
        runtime: str, repo: Path, sources: Path, engine: Any, destroy: None,
        request: pytest.FixtureRequest) -> None:
    """`auth: login`: the login file lands in the home; the api-key and oauth-token
    variables stay behind; GIT_TOKEN and NPM_TOKEN pass."""
    if runtime == "docker":
        request.getfixturevalue("probe_image")
    write_grove(repo, "g", grove_text("claude", runtime, sources, auth="login"))
    commit(repo)
    a = desired.build(manifest.load_grove(repo / "groves" / "g", repo),
                      desired.Options(repo_root=repo)).agent("a")
    assert [c.name for c in a.credentials] == ["CLAUDE_CREDENTIALS", *OTHERS]
    assert a.credential_files == (("CLAUDE_CREDENTIALS", ".claude/.credentials.json"),)
    res = engine("apply", "--auto-approve", "--wait", "--timeout", "120")
    assert res.code == 0, res
    got = set(seen(repo))
    assert {"file:CLAUDE_CREDENTIALS", *OTHERS} <= got, got
    assert not got & {"ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"}, got
    assert_no_values(res.out + res.err, "apply's output")


# -- kubernetes: the agent's Secret --------------------------------------------------------

def cluster_objects(api: FakeApiServer) -> list[dict[str, Any]]:
    return [o for plural in ("configmaps", "secrets", "networkpolicies", "jobs", "pods",
                             "persistentvolumeclaims", "services", "deployments")
            for o in api.items(plural, "agents")]


@pytest.mark.parametrize("harness", HARNESSES)
def test_kubernetes_secret_holds_every_credential_but_other_auth_methods(
        harness: str, repo: Path, sources: Path, api: FakeApiServer, engine: Any) -> None:
    remote = repo.parent / "remote.git"
    git(repo.parent, "init", "-q", "--bare", str(remote))
    kubeconfig = api.kubeconfig(repo.parent / "kubeconfig")
    write_grove(repo, "g", grove_text(harness, "kubernetes", sources, remote, kubeconfig))
    commit(repo)
    res = engine("apply", "--auto-approve", "-g", "g")
    assert res.code == 0, res
    objects = cluster_objects(api)
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert [s["metadata"]["name"] for s in secrets] == ["g-a"]
    data = {k: v for k, v in secrets[0]["data"].items()  # gemini's settings.json aside
            if not k.startswith(desired.HOME_FILE_PREFIX)}
    login = AUTH[harness][2][0]
    assert sorted(data) == expected(harness)
    for name in expected(harness):
        want = value("login") if name == login else value(name)
        assert base64.b64decode(data[name]).decode() == want
    job = next(o for o in objects if o["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in
           job["spec"]["template"]["spec"]["containers"][0]["env"]}
    # the token reaches git: its credential helper reads the mounted GIT_TOKEN
    assert "credential.helper" in [v for k, v in env.items() if k.startswith("GIT_CONFIG_KEY_")]
    for o in objects:
        if o["kind"] != "Secret":
            assert_no_values(json.dumps(o), f"{o['kind']}/{o['metadata']['name']}")
    assert_no_values(res.out + res.err, "apply's output")
    assert_state_clean(repo)
