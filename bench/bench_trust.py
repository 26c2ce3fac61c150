"""Benchmark: what the trust boundary costs, each figure against a raw baseline measured in
the same run.

1. One git call through the hardened runner (`engine.trust.git.run`, GitPython's `Git`
   with the hardened environment) against the same `git rev-parse HEAD` through plain
   `subprocess.run` (target: at most 1.5x).
2. Reading an inbox request through the safe reader (`reader.read_json`: `O_NOFOLLOW` walk,
   `fstat`, size cap, strict UTF-8) against `json.loads(open(...).read())` (target: at
   most 1.5x).
3. Observing one agent whose work did not move (`exchange.sync` with its cache, then the
   shadow `git status`) against the two plain git calls the engine made before
   (`git status` and `git rev-parse` in a worktree) (target: at most 1.5x).
4. Making an agent's workspace (`workspace.make`) against `git worktree add` of the same
   commit (target: at most 1.5x).

    python bench/bench_trust.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def sh(cwd: Path, *cmd: str) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def per_call(fn: Callable[[int], object], n: int, runs: int) -> float:
    """Median over `runs` of the mean time of one call of `fn(i)` over n calls."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        out.append((time.perf_counter() - t0) / n)
    return statistics.median(out)


def verdict(name: str, value: float, baseline: float, ok: bool, target: str) -> bool:
    print(f"{name:<46} {value * 1e3:8.3f}ms  baseline {baseline * 1e3:8.3f}ms  ratio "
          f"{value / baseline:5.2f}x  target {target}  {'PASS' if ok else 'FAIL'}")
    return ok


def new_repo(base: Path) -> Path:
    repo = base / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    for i in range(200):
        (repo / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init")
    return repo


def bench_runner(repo: Path, runs: int) -> bool:
    from engine.trust import git

    git.run(repo, "rev-parse", "HEAD")  # GitPython imported once, as in any command
    ours = per_call(lambda _: git.run(repo, "rev-parse", "HEAD"), 40, runs)
    raw = per_call(lambda _: subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo,
                                            capture_output=True, check=True), 40, runs)
    return verdict("git call through the hardened runner", ours, raw, ours <= 1.5 * raw,
                   "<= 1.5x")


def bench_reader(base: Path, runs: int) -> bool:
    from engine.trust import reader

    box = base / "inbox"
    box.mkdir()
    doc = json.dumps({"kind": "SpawnRequest", "spec": {"name": "c", "task": "x" * 500}})
    for i in range(200):
        (box / f"req-{i}.json").write_text(doc)
    ours = per_call(lambda i: reader.read_json(box, f"req-{i % 200}.json", 65536), 200, runs)
    raw = per_call(lambda i: json.loads((box / f"req-{i % 200}.json").read_text()), 200,
                   runs)
    return verdict("inbox request through the safe reader", ours, raw, ours <= 1.5 * raw,
                   "<= 1.5x")


def bench_observe(repo: Path, runs: int) -> bool:
    from engine import workspace

    tip = sh(repo, "git", "rev-parse", "HEAD")
    sh(repo, "git", "branch", "engine/g/a", tip)
    wt = repo / ".engine" / "worktrees" / "g" / "a"
    workspace.make(repo, wt, "engine/g/a", tip, "a", "g")
    (wt / "f1.txt").write_text("changed\n")
    sh(repo, "git", "worktree", "add", "-q", "-b", "plain", str(repo / "plain"), tip)
    (repo / "plain" / "f1.txt").write_text("changed\n")
    workspace.work_state(repo, "g", "a", wt, "engine/g/a", tip)  # the shadow made once

    def before(_: int) -> None:
        subprocess.run(["git", "status", "--porcelain"], cwd=repo / "plain",
                       capture_output=True, check=True)
        subprocess.run(["git", "rev-list", "--count", f"{tip}..HEAD"], cwd=repo / "plain",
                       capture_output=True, check=True)

    ours = per_call(lambda _: workspace.work_state(repo, "g", "a", wt, "engine/g/a", tip),
                    20, runs)
    raw = per_call(before, 20, runs)
    return verdict("observe one agent (sync + shadow status)", ours, raw, ours <= 1.5 * raw,
                   "<= 1.5x")


def bench_make(repo: Path, runs: int) -> bool:
    from engine import workspace

    tip = sh(repo, "git", "rev-parse", "HEAD")
    count = iter(range(10**6))

    def ours(_: int) -> None:
        n = next(count)
        workspace.make(repo, repo / ".engine" / "m" / f"a{n}", f"engine/m/a{n}", tip,
                       f"a{n}", "m")

    def raw(_: int) -> None:
        n = next(count)
        subprocess.run(["git", "worktree", "add", "-q", "-b", f"wt{n}",
                        str(repo / ".engine" / "w" / f"a{n}"), tip], cwd=repo,
                       capture_output=True, check=True)

    t_ours = per_call(ours, 10, runs)
    t_raw = per_call(raw, 10, runs)
    return verdict("make an agent's workspace", t_ours, t_raw, t_ours <= 1.5 * t_raw,
                   "<= 1.5x")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="engine-bench-trust-"))
    for k, v in {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
                 "GIT_COMMITTER_EMAIL": "b@b"}.items():
        os.environ.setdefault(k, v)
    try:
        repo = new_repo(base)
        ok = bench_runner(repo, args.runs)
        ok &= bench_reader(base, args.runs)
        ok &= bench_observe(repo, args.runs)
        ok &= bench_make(repo, args.runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
