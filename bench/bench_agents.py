"""Benchmark: start-up overhead of a real agent in the Docker sandbox, against `docker run`.

From `engine apply` of a one-agent grove (real Claude Code, `network: egress`, the program
mounted from the install cache) to the first request the CLI sends to its model, against
the time `docker run` of the same image and the same command (the program mounted the
same way, the network the host's, so it reaches the model directly) takes to send it.
The model is the scripted server of the tests (tests/model_server.py) on 127.0.0.1, which
answers with a final message so each run ends at once. Target: at most 1.3x.

Needs a running Docker engine, grove-engine/base:latest (`engine image bootstrap`) and
`engine harness install claude` (GROVE_ENGINE_CACHE is honoured).

    python bench/bench_agents.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import egress, harness_install  # noqa: E402
from tests.model_server import ModelServer  # noqa: E402

IMAGE = "grove-engine/base:latest"
ENGINE = [sys.executable, "-m", "engine"]
TARGET = 1.3
TASK = "Say hello."


def first_request(server: ModelServer, t0: float, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    while not server.main_requests():
        if time.monotonic() > deadline:
            raise SystemExit("no model request within 120 s")
        time.sleep(0.005)
    return time.perf_counter() - t0


def docker_run(program: Path, server: ModelServer, workdir: Path) -> float:
    """`docker run` of the same image and command in a clone of the same repository,
    straight to the model."""
    name = f"bench-agents-{os.getpid()}"
    cmd = ["docker", "run", "--rm", "-d", "--name", name, "--network", "host",
           "-v", f"{workdir}:/workspace", "-w", "/workspace",
           "--user", "1000:1000", "--read-only", "--tmpfs", "/tmp", "--tmpfs",
           "/home/agent:uid=1000,gid=1000", "-e", "HOME=/home/agent",
           "-v", f"{program}:/opt/engine/harness:ro",
           "-e", "PATH=/opt/engine/harness/bin:/usr/local/bin:/usr/bin:/bin",
           "-e", f"ANTHROPIC_BASE_URL={server.url}", "-e", "ANTHROPIC_API_KEY=bench",
           "-e", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "-e", "DISABLE_TELEMETRY=1",
           "-e", "DISABLE_AUTOUPDATER=1", "--entrypoint", "claude", IMAGE,
           "--dangerously-skip-permissions", "-p", "--", TASK]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    took = first_request(server, t0)
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    return took


def make_repo(base: Path, url: str) -> Path:
    repo = base / "repo"
    (repo / "groves" / "b").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / ".gitignore").write_text(".engine/\n")
    port = url.rsplit(":", 1)[1]
    grove = {"apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": "b"},
             "spec": {"defaults": {"profile": "box", "harness": "claude"},
                      "profiles": {"box": {
                          "runtime": "docker", "image": IMAGE, "network": "egress",
                          "egress": ["harness", f"127.0.0.1:{port}"],
                          "env": {"ANTHROPIC_BASE_URL": url},
                          "credentials": {"ANTHROPIC_API_KEY": {"fromEnv": "BENCH_KEY"}}}},
                      "agents": [{"name": "a", "task": TASK}]}}
    (repo / "groves" / "b" / "grove.yaml").write_text(json.dumps(grove, indent=2))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})
    return repo


def engine_apply(base: Path, server: ModelServer, warm_gateway: bool) -> float:
    repo = make_repo(base, server.url)
    env = {**os.environ, "BENCH_KEY": "bench"}
    try:
        if warm_gateway:  # the gateway of a repository that already runs agents
            egress.write_policy(repo, "warm", "x", ["127.0.0.1:9"])
            egress.ensure_running(repo)
        t0 = time.perf_counter()
        p = subprocess.Popen([*ENGINE, "apply", "--auto-approve"], cwd=repo, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        took = first_request(server, t0)
        _, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise SystemExit(f"engine apply failed: {err.decode()}")
        return took
    finally:
        subprocess.run([*ENGINE, "destroy", "--auto-approve"], cwd=repo, env=env,
                       capture_output=True)
        egress.stop(repo)
        shutil.rmtree(repo, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    program = harness_install.installed("claude")
    if program is None:
        raise SystemExit(harness_install.missing_message("claude"))
    direct, cold, warm = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for i in range(args.runs):
            clone = base / f"d{i}"
            subprocess.run(["git", "clone", "-q", str(make_repo(base / f"src{i}", "http://127.0.0.1:9")),
                            str(clone)], check=True)
            subprocess.run(["chown", "-R", "1000:1000", str(clone)], check=False)
            for out, fn in ((direct, lambda s, c=clone: docker_run(program.root, s, c)),
                            (cold, lambda s, i=i: engine_apply(base / f"c{i}", s, False)),
                            (warm, lambda s, i=i: engine_apply(base / f"w{i}", s, True))):
                with ModelServer("anthropic", [], final_text="Hello.") as server:
                    out.append(fn(server))
    d, c, w = (statistics.median(x) for x in (direct, cold, warm))
    print(f"first model request, median of {args.runs} runs")
    print(f"  docker run (baseline)            {d:6.2f} s")
    print(f"  engine apply, gateway warm       {w:6.2f} s   {w / d:4.2f}x")
    print(f"  engine apply, gateway started    {c:6.2f} s   {c / d:4.2f}x")
    ok = w / d <= TARGET
    print(f"target: engine apply within {TARGET}x of docker run (gateway warm): "
          f"{'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
