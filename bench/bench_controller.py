"""Benchmark: the controller (`engine watch`) on the local runtime.

1. Dependent start latency. A grove of PAIRS pairs `dep-i -> after-i` (after-i dependsOn
   dep-i); each dep sleeps a different short time and writes the time it ends, each
   dependent writes the time its task starts. Measured: the median of (dependent's task
   start - dependency's end) with `engine watch` running. Beside it, the runtime's own
   start time, measured in the same run: a raw `tmux new-session` of the same task (the
   time from the call to the task's first line). Target: the controller's part (median
   latency - runtime start) under 100 ms.
2. A no-op pass with 200 idle local agents: `Controller.pass_once` in this process
   (imports paid, as in a running controller), median of several passes. Baseline: one
   `tmux list-sessions` call, which any observation must at least make. Target: under
   0.3 s.

    python bench/bench_controller.py [--pairs N] [--agents N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINE = [sys.executable, "-m", "engine"]


def sh(cwd: Path, *cmd: str) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def new_repo(base: Path, name: str, grove: str) -> Path:
    r = base / name
    (r / "groves" / "bench").mkdir(parents=True)
    sh(r, "git", "init", "-q", "-b", "main")
    (r / ".gitignore").write_text(".engine/\n")
    (r / "groves" / "bench" / "grove.yaml").write_text(grove)
    sh(r, "git", "add", "-A")
    sh(r, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init")
    return r


HEAD = ("apiVersion: engine/v1alpha1\nkind: Grove\nmetadata: {name: bench}\nspec:\n"
        "  policy: {maxAgents: 1000}\n  agents:\n")


def stamp(path: Path) -> str:
    return f"python3 -c 'import time; print(time.time())' > {path}"


def runtime_start(base: Path, runs: int) -> float:
    """The raw start time of the runtime: `tmux new-session` until the task's first line."""
    sock = base / "raw.sock"
    out = []
    for i in range(runs):
        f = base / f"raw-{i}"
        t0 = time.time()
        subprocess.run(["tmux", "-S", str(sock), "-f", "/dev/null", "new-session", "-d",
                        "-s", f"r{i}", stamp(f)], check=True)
        while not f.exists() or not f.read_text().strip():
            time.sleep(0.002)
        out.append(float(f.read_text()) - t0)
    subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True)
    return statistics.median(out)


def bench_latency(base: Path, pairs: int) -> bool:
    marks = base / "marks"
    marks.mkdir()
    os.chmod(marks, 0o777)  # agents may run as another user (the engine as root)
    lines = [HEAD]
    for i in range(pairs):
        sleep = 1 + 0.25 * i
        lines.append(f"    - name: dep-{i}\n      task: \"sleep {sleep}; "
                     f"{stamp(marks / f'end-{i}')}\"\n")
        lines.append(f"    - name: after-{i}\n      dependsOn: [dep-{i}]\n"
                     f"      task: \"{stamp(marks / f'start-{i}')}\"\n")
    repo = new_repo(base, "latency", "".join(lines))
    ctl = subprocess.Popen([*ENGINE, "watch", "--interval", "30"], cwd=repo,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60 + pairs
        while time.time() < deadline and not all(
                (marks / f"start-{i}").exists() for i in range(pairs)):
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        ctl.send_signal(signal.SIGTERM)
        _, err = ctl.communicate(timeout=10)
        subprocess.run([*ENGINE, "destroy", "--auto-approve"], cwd=repo,
                       capture_output=True)
    lat = []
    for i in range(pairs):
        try:
            lat.append(float((marks / f"start-{i}").read_text())
                       - float((marks / f"end-{i}").read_text()))
        except (OSError, ValueError):
            raise SystemExit(f"pair {i} did not run; controller said:\n{err}") from None
    raw = runtime_start(base, 9)
    med = statistics.median(lat)
    part = med - raw
    ok = part <= 0.1
    print(f"{'dependent start after its dependency ends':<46} {med * 1000:7.1f}ms  runtime "
          f"start {raw * 1000:6.1f}ms  controller {part * 1000:6.1f}ms  ratio "
          f"{med / raw if raw else float('inf'):5.2f}x  target controller <= 100ms  "
          f"{'PASS' if ok else 'FAIL'}")
    print(f"  ({pairs} pairs; latencies ms: "
          f"{', '.join(f'{x * 1000:.0f}' for x in sorted(lat))})")
    return ok


def bench_idle_pass(base: Path, n: int, runs: int) -> bool:
    repo = new_repo(base, "idle", HEAD + "".join(
        f"    - {{name: agent-{i}, task: sleep 3600}}\n" for i in range(n)))
    sh(repo, *ENGINE, "apply", "--auto-approve")
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from engine import controller, desired
        from engine.observe import Runtimes

        ctl = controller.Controller(repo, ["bench"], desired.Options(repo_root=repo),
                                    controller.Options(revision=""), log=lambda _: None)
        rts = Runtimes(repo)
        ctl.pass_once("bench", rts)  # warm: the first pass pays the imports
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ctl.pass_once("bench", rts)
            times.append(time.perf_counter() - t0)
        sock = repo / ".engine" / "tmux.sock"
        raw = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(["tmux", "-S", str(sock), "list-sessions"], capture_output=True)
            raw.append(time.perf_counter() - t0)
    finally:
        subprocess.run([*ENGINE, "destroy", "--auto-approve"], cwd=repo, capture_output=True)
    t, b = statistics.median(times), statistics.median(raw)
    ok = t <= 0.3
    print(f"{f'no-op controller pass, {n} idle local agents':<46} {t:8.3f}s  baseline "
          f"{b:8.3f}s  ratio {t / b if b else float('inf'):6.2f}x  target <= 0.3s  "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-controller-") as d:
        base = Path(d)
        os.chmod(base, 0o755)
        ok = bench_latency(base, args.pairs)
        ok &= bench_idle_pass(base, args.agents, args.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
