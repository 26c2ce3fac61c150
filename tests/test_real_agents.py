"""The real agent programs under the engine, end to end.

Each test installs the real CLI from npm with `engine harness install` (into a cache kept
between runs, /tmp/grove-engine-test-cache), points it at a scripted model server on
127.0.0.1 (tests/model_server.py: the stand-in for the provider's API, speaking its wire
format) and applies a grove with `engine watch` running. The scripted model makes the
agent, through the CLI's own shell tool: read its instructions, write and commit a file,
`engine spawn` a helper and wait for it to be accepted, try a host it may not reach, and
report `engine done`. The test checks what the engine made of it: the helper written back
to spawned.yaml and run, the parent notified, the commit on the agent's branch, and with
`network: egress` (the Docker sandbox; the local runtime too when the engine is root,
in a network namespace of the agent's own) the gateway's record of the model traffic and
of the refused connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import egress
from engine.fsutil import flock
from tests.conftest import git, write_grove
from tests.model_server import ModelServer
from tests.test_spawn import Watch, phases, until

CACHE = Path(os.environ.get("GROVE_ENGINE_TEST_CACHE", "/tmp/grove-engine-test-cache"))
KEY_VAR = "SCRIPTED_MODEL_KEY"  # where the profile reads the (dummy) API key from

# per harness: provider wire format, profile env that points the CLI at the server, and
# a grove-level override of the catalogue entry where the CLI needs one for a custom
# endpoint (only config the user would write too)
def codex_command(url: str) -> list[str]:
    """codex exec pointed at a custom Responses endpoint with -c overrides (what a user
    writes in ~/.codex/config.toml), kept offline: no update check, analytics or plugins."""
    sets = ["model=gpt-5-codex", "model_provider=scripted",
            'model_providers.scripted.name="scripted"',
            f'model_providers.scripted.base_url="{url}/v1"',
            "model_providers.scripted.env_key=CODEX_API_KEY",
            "model_providers.scripted.wire_api=responses",
            "check_for_update_on_startup=false", "analytics.enabled=false",
            "features.plugins=false"]
    return ["codex", "exec", *(x for kv in sets for x in ("-c", kv)),
            "--dangerously-bypass-approvals-and-sandbox", "--skip-git-repo-check"]


def opencode_config(url: str) -> str:
    return json.dumps({"model": "scripted/scripted-model", "autoupdate": False,
                       "share": "disabled",
                       "provider": {"scripted": {
                           "npm": "@ai-sdk/openai-compatible", "name": "scripted",
                           "options": {"baseURL": f"{url}/v1",
                                       "apiKey": "{env:OPENAI_API_KEY}"},
                           "models": {"scripted-model": {"name": "scripted-model"}}}}})


HARNESS: dict[str, dict[str, Any]] = {
    "claude": {
        "provider": "anthropic",
        "env": lambda url: {"ANTHROPIC_BASE_URL": url},
        "credential": "ANTHROPIC_API_KEY",
    },
    "codex": {
        "provider": "openai-responses",
        "env": lambda url: {},
        "credential": "CODEX_API_KEY",
        "override": lambda url: {"builtin": "codex", "command": codex_command(url)},
    },
    "gemini": {
        "provider": "gemini",
        "env": lambda url: {"GOOGLE_GEMINI_BASE_URL": url},
        "credential": "GEMINI_API_KEY",
    },
    "opencode": {
        "provider": "openai-chat",
        # offline: no model list from models.dev, no plugin install from npm
        "env": lambda url: {"OPENCODE_CONFIG_CONTENT": opencode_config(url),
                            "OPENCODE_DISABLE_MODELS_FETCH": "true",
                            "npm_config_offline": "true"},
        "credential": "OPENAI_API_KEY",
    },
}


@pytest.fixture(scope="session")
def cli_cache() -> Path:
    """The harness install cache, with the CLIs these tests run (installed once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


def install(name: str) -> None:
    with flock(CACHE / f".test-install-{name}.lock"):
        p = subprocess.run([sys.executable, "-m", "engine", "harness", "install", name],
                           env={**os.environ, "GROVE_ENGINE_CACHE": str(CACHE)},
                           capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture
def cleanup(repo: Path, watch: list[Watch]) -> Iterator[None]:
    """After the controller (conftest's `watch` fixture) is gone: destroy, and stop the
    repository's gateway."""
    yield
    for w in watch:
        w.stop()
    subprocess.run([sys.executable, "-m", "engine", "destroy", "--auto-approve"], cwd=repo,
                   capture_output=True, timeout=300)
    egress.stop(repo)


def grove_text(harness: str, runtime: str, url: str) -> str:
    h = HARNESS[harness]
    port = url.rsplit(":", 1)[1]
    box: dict[str, Any] = {"runtime": runtime, "env": h["env"](url),
                           "credentials": {h["credential"]: {"fromEnv": KEY_VAR}},
                           "spawn": {"allowProfiles": ["helper"],
                                     "allowHarnesses": ["shell"]}}
    helper: dict[str, Any] = {"runtime": runtime}
    if sandboxed(runtime):
        box |= {"network": "egress", "egress": ["harness", f"127.0.0.1:{port}"]}
    if runtime == "docker":
        box |= {"image": "grove-engine/base:latest"}
        helper |= {"image": "grove-engine/base:latest"}
    doc = {"apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": "real"},
           "spec": {"defaults": {"profile": "box", "harness": harness},
                    "policy": {"maxAgents": 4, "maxDepth": 2, "maxChildren": 2},
                    "profiles": {"box": box, "helper": helper},
                    **({"harnesses": {harness: h["override"](url)}} if "override" in h
                       else {}),
                    "agents": [{"name": "lead", "task": "Follow the instructions you are "
                                "given; commit your work."}]}}
    return json.dumps(doc, indent=2)


SPAWN = ("engine spawn helper --profile helper --harness shell --wait --task "
         "'echo helped > helped.txt && git add helped.txt && git commit -qm helped'")
FORBIDDEN = ("python3 -c \"import urllib.request as u; u.urlopen('https://example.com/', "
             "timeout=10)\" 2>&1 | tail -n 1; true")


def sandboxed(runtime: str) -> bool:
    """Whether the agent runs with `network: egress`: always in Docker; on the local
    runtime when the engine is root (a network namespace of its own)."""
    return runtime == "docker" or os.geteuid() == 0


def script(runtime: str, instructions: str) -> list[str]:
    steps = [f"head -c 400 {instructions}",
             "echo real > real.txt && git add real.txt && git commit -qm 'real agent'",
             SPAWN]
    if sandboxed(runtime):
        steps.append(FORBIDDEN)
    steps.append("engine done --result lead-finished")
    return steps


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("runtime", ["local", pytest.param("docker", marks=pytest.mark.docker)])
@pytest.mark.parametrize("harness", sorted(HARNESS))
def test_real_agent_works_under_the_engine(harness: str, runtime: str, repo: Path,
                                           watch: list[Watch], cleanup: None,
                                           cli_cache: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           request: pytest.FixtureRequest) -> None:
    if runtime == "docker":
        request.getfixturevalue("base_image")
    install(harness)
    monkeypatch.setenv("GROVE_ENGINE_CACHE", str(cli_cache))
    monkeypatch.setenv(KEY_VAR, "scripted-model-key")
    instructions = {"claude": "CLAUDE.md", "gemini": "GEMINI.md"}.get(harness, "AGENTS.md")
    with ModelServer(HARNESS[harness]["provider"], script(runtime, instructions),
                     final_text="All done.") as server:
        write_grove(repo, "real", grove_text(harness, runtime, server.url))
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "grove")
        watch.append(Watch(repo))
        try:
            until(lambda: phases(repo) == {"lead": "Succeeded", "helper": "Succeeded"},
                  timeout=150, what="the agent and its helper to succeed")
        except AssertionError:
            log = subprocess.run([sys.executable, "-m", "engine", "logs", "lead"], cwd=repo,
                                 capture_output=True, text=True).stdout
            raise AssertionError(f"phases {phases(repo)}; commands run "
                                 f"{server.commands_run()}; log:\n{log[-3000:]}\nwatch:\n"
                                 f"{watch[0].text()[-2000:]}") from None
        assert server.finished()
        assert server.commands_run() == script(runtime, instructions)
        results = server.tool_results()
        assert "grove-engine" in results[0]  # it read the instructions the engine wrote
    # 1. the helper was written back and converged, and it ran
    docs = {d["name"]: d for d in spawned_docs_of(repo)}
    assert docs["helper"]["spawnedBy"] == "lead"
    assert git(repo, "show", "engine/real/helper:helped.txt") == "helped"
    # 2. the parent was notified
    inbox = repo / ".engine/inbox/real/lead"
    until(lambda: any(inbox.glob("notify-*")), 30, "the parent's notification")
    note = json.loads(next(inbox.glob("notify-*")).read_text())
    assert note["child"] == "helper" and note["phase"] == "Succeeded"
    # 3. the commit is on the agent's branch
    assert git(repo, "show", "engine/real/lead:real.txt") == "real"
    assert git(repo, "log", "-1", "--format=%s", "engine/real/lead") == "real agent"
    if not sandboxed(runtime):
        return
    # 4. the gateway logged the model traffic; 5. the other host was refused and logged
    port = server.url.rsplit(":", 1)[1]
    records = egress.read_log(repo, "real", "lead")
    model = [r for r in records if r["target"] == f"127.0.0.1:{port}"]
    assert model and all(r["verdict"] == "allowed" for r in model), records
    assert sum(r["bytesDown"] for r in model) > 1000
    refused = [r for r in records if r["target"] == "example.com:443"]
    assert refused and refused[0]["verdict"] == "refused", records
    events = [json.loads(ln) for ln in (repo / ".engine/events.jsonl").read_text()
              .splitlines()]
    assert any(e.get("event") == "Egress" and e.get("target") == "example.com:443"
               for e in events)


def spawned_docs_of(repo: Path) -> list[dict[str, Any]]:
    from engine.manifest import load_grove

    src = load_grove(repo / "groves/real", repo)
    return [{"name": n, **e.data} for n, e in src.agents.items() if "spawnRequest" in e.data]


def readme_grove() -> str:
    """The grove the README shows, exactly as it is there."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## A grove", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "network: egress" in block and "harness: claude" in block
    return block


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(600)
def test_readme_grove_runs_as_written(repo: Path, cli_cache: Path, base_image: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's headline grove, verbatim: real Claude Code in the Docker sandbox with
    egress to its API only. The one change is where its API is: `--set` points the base
    URL at the scripted model and adds that endpoint (the real one stays on the list)."""
    install("claude")
    monkeypatch.setenv("GROVE_ENGINE_CACHE", str(cli_cache))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "scripted-model-key")
    write_grove(repo, "demo", readme_grove())
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the README's grove")
    step = "f=$ENGINE_AGENT.md; echo $ENGINE_AGENT > $f && git add $f && git commit -qm $f"
    try:
        with ModelServer("anthropic", [step], final_text="Done.") as server:
            port = server.url.rsplit(":", 1)[1]
            p = subprocess.run(
                [sys.executable, "-m", "engine", "apply", "-g", "demo", "--auto-approve",
                 "--wait", "--timeout", "300", "--set", f"env.ANTHROPIC_BASE_URL={server.url}",
                 "--set", f"egress=[harness, '127.0.0.1:{port}']"],
                cwd=repo, capture_output=True, text=True, timeout=400)
            assert p.returncode == 0, p.stdout + p.stderr
            assert phases(repo) == {"researcher": "Succeeded", "coder": "Succeeded"}
        # coder started from researcher's work, and both committed on their branches
        assert git(repo, "show", "engine/demo/coder:researcher.md") == "researcher"
        assert git(repo, "show", "engine/demo/coder:coder.md") == "coder"
        records = egress.read_log(repo, "demo")
        for agent in ("researcher", "coder"):
            mine = [r for r in records if r["agent"] == agent]
            assert mine and all(r["target"] == f"127.0.0.1:{port}" for r in mine), records
            assert all(r["verdict"] == "allowed" for r in mine)
        policy = json.loads((egress.state_dir(repo) / "agents" / "demo" / "coder.json")
                            .read_text())
        assert sorted(policy["allow"]) == sorted(["api.anthropic.com:443",
                                                  f"127.0.0.1:{port}"])
    finally:
        subprocess.run([sys.executable, "-m", "engine", "destroy", "-g", "demo",
                        "--auto-approve"], cwd=repo, capture_output=True, timeout=300)
        egress.stop(repo)


def one_agent_grove(url: str, image: str) -> str:
    port = url.rsplit(":", 1)[1]
    return json.dumps({
        "apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": "one"},
        "spec": {"defaults": {"profile": "box", "harness": "claude"},
                 "profiles": {"box": {
                     "runtime": "docker", "image": image, "network": "egress",
                     "egress": ["harness", f"127.0.0.1:{port}"],
                     "env": {"ANTHROPIC_BASE_URL": url},
                     "credentials": {"ANTHROPIC_API_KEY": {"fromEnv": KEY_VAR}}}},
                 "agents": [{"name": "solo", "task": "Commit a file."}]}})


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(600)
def test_missing_program_is_one_error_and_a_baked_image_needs_no_cache(
        repo: Path, cli_cache: Path, base_image: str, tmp_path: Path, engine: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the program in the cache, the base image cannot run claude: apply says so
    in one line, with the install command, before anything starts. An image built from the
    cache (`engine image build claude`, offline) carries it and runs with no cache at all."""
    install("claude")
    monkeypatch.setenv(KEY_VAR, "scripted-model-key")
    monkeypatch.setenv("GROVE_ENGINE_CACHE", str(cli_cache))
    built = engine("image", "build", "claude")
    assert built.code == 0, built
    monkeypatch.setenv("GROVE_ENGINE_CACHE", str(tmp_path / "empty-cache"))
    step = "echo baked > baked.txt && git add baked.txt && git commit -qm baked"
    try:
        with ModelServer("anthropic", [step], final_text="Done.") as server:
            write_grove(repo, "one", one_agent_grove(server.url, "grove-engine/base:latest"))
            res = engine("apply", "--auto-approve")
            assert res.code == 1
            assert res.err.strip().splitlines()[-1].endswith(
                "harness claude is not installed: run `engine harness install claude` (or "
                "use an image that has it)"), res.err
            assert "Traceback" not in res.err
            assert not containers(repo, "one")  # nothing started
            write_grove(repo, "one", one_agent_grove(server.url, "grove-engine/claude:latest"))
            res = engine("apply", "--auto-approve", "--wait", "--timeout", "240")
            assert res.code == 0, res
            assert server.finished()
        assert git(repo, "show", "engine/one/solo:baked.txt") == "baked"
    finally:
        engine("destroy", "--auto-approve")
        egress.stop(repo)


def containers(repo: Path, grove: str) -> list[str]:
    p = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=engine.grove={grove}",
                        "--filter", f"label=engine.repo={repo.resolve()}"],
                       capture_output=True, text=True, check=True)
    return p.stdout.split()
