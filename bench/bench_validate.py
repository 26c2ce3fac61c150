"""Benchmark: `engine validate` on generated groves of 1,000 and 10,000 agents.

Run: python bench/bench_validate.py [--sizes 1000,10000] [--repeat 3] [--strict]

For each size it writes a grove into a temporary directory, then measures (best of
--repeat runs):
  - raw:        yaml.load of the same files with the C safe loader (the fair baseline);
  - in-process: engine.cli.main(["validate"]) in this interpreter (imports already paid);
  - subprocess: `python -m engine validate` as a user runs it (bytecode cached, after one
                untimed run), its CPU time and peak memory (ru_maxrss, from wait4).
Targets (this project's, on a 2-core machine): 1,000 agents under 0.5 s, 10,000 under 3 s,
peak memory under 300 MB at 10,000; judged on the subprocess wall time, which is what a
user waits for (the CPU time beside it shows what other load on the machine added).
Prints PASS/FAIL per target; --strict makes a FAIL the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TARGET_SECONDS = {1000: 0.5, 10000: 3.0}
TARGET_MB = 300
HEADER = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata:
  name: bench
spec:
  workspace: worktree
  defaults: {{profile: local, harness: shell, restart: never}}
  policy: {{maxAgents: {n}, maxDepth: 3, maxChildren: 10}}
  profiles:
    local:
      runtime: local
      env: {{LOG_LEVEL: info}}
      spawn: {{allowProfiles: [local, sandbox]}}
    sandbox:
      runtime: docker
      image: grove-engine/base:latest
      access: read-only
      resources: {{cpus: 0.5, memory: 512Mi, pids: 128}}
      spawn: {{allowProfiles: []}}
  agents:
"""


def grove_text(n: int) -> str:
    """A grove of n agents in the shapes people write: plain and templated tasks, two
    profiles, dependency chains, per-agent env and resources."""
    out = [HEADER.format(n=n)]
    for i in range(n):
        out.append(f"    - name: agent-{i}\n")
        if i % 2:
            out.append(f"      task: |\n        echo {{{{ agent.name }}}} of {{{{ grove.name }}}}"
                       f" > OUT-{i}.md\n        git add -A && git commit -qm 'agent {i}'\n")
        else:
            out.append(f"      task: Survey part {i} of the code base and write NOTES-{i}.md.\n")
        if i % 3 == 1:
            out.append("      profile: sandbox\n")
        if i % 5 and i:
            out.append(f"      dependsOn: [agent-{i - 1}]\n")
        if i % 4 == 0:
            out.append(f"      env: {{PART: '{i}'}}\n      resources: {{memory: 1Gi}}\n")
    return "".join(out)


def best(runs: list[float]) -> float:
    return min(runs)


def raw_load(files: list[Path], repeat: int) -> float:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for f in files:
            list(yaml.load_all(f.read_text(), Loader=loader))
        times.append(time.perf_counter() - t)
    return best(times)


def in_process(root: Path, repeat: int) -> float:
    from engine.cli import main

    times = []
    cwd = os.getcwd()
    try:
        os.chdir(root)
        for _ in range(repeat):
            out, err = io.StringIO(), io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["validate"])
            times.append(time.perf_counter() - t)
            if code != 0:
                raise SystemExit(f"validate failed: {err.getvalue()}")
    finally:
        os.chdir(cwd)
    return best(times)


def as_subprocess(root: Path, repeat: int, pycache: Path) -> tuple[float, float, float]:
    """Best wall time, best CPU time (user + system) and the largest peak memory (MB) of
    `python -m engine validate`. Bytecode is cached (in `pycache`, outside the tree) and
    one untimed run comes first, as on any machine after the first run."""
    times, cpus, peaks = [], [], []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "PYTHONPYCACHEPREFIX": str(pycache)}
    for i in range(repeat + 1):
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "engine", "validate"], cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(p.pid, 0)
        took = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        err = p.stderr.read().decode() if p.stderr else ""
        if p.returncode != 0:
            raise SystemExit(f"validate failed ({p.returncode}): {err}")
        if i:
            times.append(took)
            cpus.append(usage.ru_utime + usage.ru_stime)
            peaks.append(usage.ru_maxrss / 1024)
    return best(times), best(cpus), max(peaks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = ap.parse_args()
    verdicts = []
    print(f"python {sys.version.split()[0]}, PyYAML {yaml.__version__} "
          f"(C loader: {hasattr(yaml, 'CSafeLoader')}), best of {args.repeat}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other work on "
          "the machine slows every column)")
    print(f"{'agents':>7} {'MB file':>8} {'raw yaml':>9} {'in-proc':>8} {'x raw':>6} "
          f"{'subproc':>8} {'x raw':>6} {'cpu':>7} {'peak MB':>8}")
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            root = Path(tmp) / f"n{n}"
            grove = root / "groves" / "bench" / "grove.yaml"
            grove.parent.mkdir(parents=True)
            grove.write_text(grove_text(n))
            raw = raw_load([grove], args.repeat)
            inproc = in_process(root, args.repeat)
            sub, cpu, peak = as_subprocess(root, args.repeat, Path(tmp) / "pycache")
            size = grove.stat().st_size / 1e6
            print(f"{n:>7} {size:>8.2f} {raw:>8.3f}s {inproc:>7.3f}s {inproc / raw:>5.2f}x "
                  f"{sub:>7.3f}s {sub / raw:>5.2f}x {cpu:>6.3f}s {peak:>8.1f}")
            if n in TARGET_SECONDS:
                verdicts.append((f"{n} agents under {TARGET_SECONDS[n]} s (subprocess "
                                 f"{sub:.3f} s wall, {cpu:.3f} s cpu; in-process "
                                 f"{inproc:.3f} s)", sub < TARGET_SECONDS[n]))
            if n == 10000:
                verdicts.append((f"peak memory at 10000 agents under {TARGET_MB} MB "
                                 f"({peak:.1f} MB)", peak < TARGET_MB))
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 1 if args.strict and not all(ok for _, ok in verdicts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
