"""Benchmark: plan and apply on the local runtime, each against a raw baseline of the same run.

1. `engine plan` with nothing running, 1,000 and 10,000 agents (targets 1 s and 5 s);
   baseline: yaml.safe_load (C loader) of the same manifest files.
2. Converge 50 local agents from nothing (`engine apply --auto-approve`); baseline: a bash
   script doing `git worktree add` + `tmux new-session` for each of 50 agents (target 1.5x).
3. A no-op `engine apply` over those 50 running agents (target 1 s); baseline: one
   `tmux list-sessions` call, what any observation must at least do.

Each figure is the median of several runs of the real command as a user runs it (a new
process each time).

    python bench/bench_reconcile.py [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ENGINE = [sys.executable, "-m", "engine"]


def sh(cwd: Path, *cmd: str) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def new_repo(base: Path, name: str) -> Path:
    r = base / name
    r.mkdir()
    sh(r, "git", "init", "-q", "-b", "main")
    (r / ".gitignore").write_text(".engine/\n")
    sh(r, "git", "add", "-A")
    sh(r, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init")
    return r


def write_grove(repo: Path, n: int, task: str) -> Path:
    d = repo / "groves" / "bench"
    d.mkdir(parents=True, exist_ok=True)
    lines = ["apiVersion: engine/v1alpha1", "kind: Grove", "metadata: {name: bench}",
             "spec:", "  defaults: {profile: local, harness: shell}",
             f"  policy: {{maxAgents: {n + 10}, maxDepth: 3, maxChildren: 10}}",
             "  profiles:", "    local: {runtime: local, env: {LOG_LEVEL: info}}", "  agents:"]
    for i in range(n):
        lines += [f"    - name: agent-{i}", f"      task: {task}"]
        if i % 10:
            lines.append(f"      dependsOn: [agent-{i - i % 10}]")
    (d / "grove.yaml").write_text("\n".join(lines) + "\n")
    return d


def timed(cmd: list[str], cwd: Path, runs: int, env: dict[str, str] | None = None) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
        out.append(time.perf_counter() - t0)
        if p.returncode not in (0, 2):
            raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr}")
    return statistics.median(out)


def raw_load(d: Path, runs: int) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for f in sorted(d.glob("*.yaml")):
            list(yaml.load_all(f.read_text(), Loader=LOADER))
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def verdict(name: str, value: float, target: float, baseline: float, unit: str = "s") -> bool:
    ok = value <= target
    print(f"{name:<44} {value:8.3f}{unit}  baseline {baseline:8.3f}{unit}  ratio "
          f"{value / baseline if baseline else float('inf'):6.2f}x  target <= {target:g}{unit}"
          f"  {'PASS' if ok else 'FAIL'}")
    return ok


def bench_plan(base: Path, runs: int, sizes: list[int], targets: dict[int, float]) -> bool:
    ok = True
    for n in sizes:
        repo = new_repo(base, f"plan-{n}")
        d = write_grove(repo, n, "echo hi")
        t = timed([*ENGINE, "plan"], repo, runs)
        ok &= verdict(f"plan, {n} agents, nothing running", t, targets[n], raw_load(d, runs))
    return ok


def bash_baseline(base: Path, n: int) -> float:
    repo = new_repo(base, "baseline")
    sock = repo / ".engine" / "tmux.sock"
    (repo / ".engine" / "worktrees").mkdir(parents=True)
    script = "\n".join([
        "set -e",
        *(f"git worktree add -q -b engine/bench/agent-{i} .engine/worktrees/agent-{i} main && "
          f"tmux -S {sock} -f /dev/null new-session -d -s a{i} -c .engine/worktrees/agent-{i} "
          f"'sleep 600'" for i in range(n))])
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", script], cwd=repo, check=True, capture_output=True)
    t = time.perf_counter() - t0
    subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True)
    return t


def bench_apply(base: Path, runs: int, n: int = 50) -> bool:
    ok = True
    raw = statistics.median(bash_baseline(base / f"b{i}", n) for i in range(runs)
                            if (base / f"b{i}").mkdir() is None)
    times = []
    repo = None
    for i in range(runs):
        repo = new_repo(base, f"apply-{i}")
        (repo / "groves" / "bench").mkdir(parents=True)
        lines = ["apiVersion: engine/v1alpha1", "kind: Grove", "metadata: {name: bench}",
                 "spec:", "  agents:"] + [f"    - {{name: agent-{j}, task: sleep 600}}"
                                          for j in range(n)]
        (repo / "groves" / "bench" / "grove.yaml").write_text("\n".join(lines) + "\n")
        t0 = time.perf_counter()
        subprocess.run([*ENGINE, "apply", "--auto-approve"], cwd=repo, check=True,
                       capture_output=True)
        times.append(time.perf_counter() - t0)
        if i < runs - 1:
            subprocess.run([*ENGINE, "destroy", "--auto-approve"], cwd=repo,
                           capture_output=True)
    ok &= verdict(f"converge {n} local agents from nothing", statistics.median(times),
                  1.5 * raw, raw)
    assert repo is not None
    sock = repo / ".engine" / "tmux.sock"
    t_raw = timed(["tmux", "-S", str(sock), "list-sessions"], repo, runs)
    t_noop = timed([*ENGINE, "apply", "--auto-approve"], repo, runs)
    ok &= verdict(f"no-op apply over {n} running agents", t_noop, 1.0, t_raw)
    subprocess.run([*ENGINE, "destroy", "--auto-approve"], cwd=repo, capture_output=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the 10,000-agent plan")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    os.environ.setdefault("GIT_AUTHOR_NAME", "bench")
    os.environ.setdefault("GIT_AUTHOR_EMAIL", "bench@example.invalid")
    os.environ.setdefault("GIT_COMMITTER_NAME", "bench")
    os.environ.setdefault("GIT_COMMITTER_EMAIL", "bench@example.invalid")
    try:
        sizes = [1000] if args.quick else [1000, 10000]
        ok = bench_plan(base, args.runs, sizes, {1000: 1.0, 10000: 5.0})
        ok &= bench_apply(base, args.runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
