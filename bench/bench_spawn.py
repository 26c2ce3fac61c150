"""Benchmark: time from `engine spawn` inside an agent to the child Running, with
`engine watch` converging (target: median under 0.5 s on local, under 1.5 s on docker).

Beside it, the runtime's own start time for the same kind of agent, measured in the same
run: `git worktree add` + `tmux new-session` (local) or `docker run` of the agent image
(docker), so the ratio shows what the engine adds on top of starting the process.

    python bench/bench_spawn.py [--spawns 20] [--runtime local|docker]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "engine" / "client.py"
TARGET = {"local": 0.5, "docker": 1.5}


def sh(cwd: Path, *cmd: str) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_repo(base: Path, runtime: str) -> Path:
    repo = base / "repo"
    (repo / "groves" / "b").mkdir(parents=True)
    sh(repo, "git", "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text(".engine/\n")
    profile = ("{runtime: local, spawn: {allowProfiles: [p]}}" if runtime == "local" else
               "{runtime: docker, image: 'grove-engine/base:latest', spawn: {allowProfiles: [p]}}")
    (repo / "groves" / "b" / "grove.yaml").write_text(
        "apiVersion: engine/v1alpha1\nkind: Grove\nmetadata: {name: b}\nspec:\n"
        "  defaults: {profile: p, harness: shell}\n"
        "  policy: {maxAgents: 100, maxDepth: 2, maxChildren: 50}\n"
        f"  profiles:\n    p: {profile}\n"
        "  agents:\n    - {name: seed, task: sleep 600}\n")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "init")
    return repo


def running(repo: Path, name: str, runtime: str) -> bool:
    if runtime == "local":
        sock = repo / ".engine" / "tmux.sock"
        return subprocess.run(["tmux", "-S", str(sock), "has-session", "-t", f"=b__{name}"],
                              capture_output=True).returncode == 0
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=engine.agent={name}",
                          "--filter", "label=engine.grove=b"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def wait_until(cond, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.005)


def spawn_latencies(repo: Path, n: int, runtime: str) -> list[float]:
    inbox = repo / ".engine" / "inbox" / "b" / "seed"
    env = {**os.environ, "ENGINE_INBOX": str(inbox), "ENGINE_AGENT": "seed",
           "ENGINE_GROVE": "b"}
    out = []
    for i in range(n):
        name = f"child-{i}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-S", str(CLIENT), "spawn", name, "--task",
                        "sleep 600"], env=env, check=True, capture_output=True)
        wait_until(lambda name=name: running(repo, name, runtime))
        out.append(time.perf_counter() - t0)
    return out


def raw_start(repo: Path, n: int, runtime: str) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        if runtime == "local":
            wt = repo.parent / f"raw-{i}"
            sh(repo, "git", "worktree", "add", "-q", "-b", f"raw-{i}", str(wt), "main")
            sh(repo, "tmux", "-S", str(repo.parent / "raw.sock"), "-f", "/dev/null",
               "new-session", "-d", "-s", f"raw{i}", "-c", str(wt), "sleep 600")
        else:
            sh(repo, "docker", "run", "-d", "--rm", "--network", "none", "--name",
               f"engine-bench-raw-{os.getpid()}-{i}", "grove-engine/base:latest", "sleep", "600")
        out.append(time.perf_counter() - t0)
    if runtime == "local":
        subprocess.run(["tmux", "-S", str(repo.parent / "raw.sock"), "kill-server"],
                       capture_output=True)
    else:
        for i in range(n):
            subprocess.run(["docker", "rm", "-f", f"engine-bench-raw-{os.getpid()}-{i}"],
                           capture_output=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spawns", type=int, default=20)
    ap.add_argument("--runtime", choices=["local", "docker"], default="local")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="engine-bench-spawn-"))
    for k, v in (("GIT_AUTHOR_NAME", "b"), ("GIT_AUTHOR_EMAIL", "b@b"),
                 ("GIT_COMMITTER_NAME", "b"), ("GIT_COMMITTER_EMAIL", "b@b")):
        os.environ.setdefault(k, v)
    repo = make_repo(base, args.runtime)
    watch = subprocess.Popen([sys.executable, "-m", "engine", "watch", "--interval", "30"],
                             cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: running(repo, "seed", args.runtime))
        spawn = spawn_latencies(repo, args.spawns, args.runtime)
        raw = raw_start(repo, args.spawns, args.runtime)
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=30)
        subprocess.run([sys.executable, "-m", "engine", "destroy", "--auto-approve"],
                       cwd=repo, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    med, raw_med = statistics.median(spawn), statistics.median(raw)
    ok = med <= TARGET[args.runtime]
    print(f"spawn -> Running ({args.runtime}), median of {args.spawns}: {med:.3f}s "
          f"(p90 {sorted(spawn)[int(len(spawn) * 0.9) - 1]:.3f}s); runtime's own start "
          f"{raw_med:.3f}s; ratio {med / raw_med:.2f}x; target <= {TARGET[args.runtime]}s "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
