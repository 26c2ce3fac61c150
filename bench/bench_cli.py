"""Benchmark: the command line's conventions on a grove of AGENTS agents.

Baseline, measured in the same run: `engine --version` (the interpreter and the engine's
entry point, nothing else). Measured, each the median of RUNS runs, as a ratio to it:
1. completing a command name (`engine va<TAB>`, argcomplete's protocol, as the shell asks);
2. completing a grove name (`engine status -g <TAB>`);
3. completing an agent name (`engine logs agent-00<TAB>`) over AGENTS agents;
4. `engine validate -` with the grove on standard input, against `engine validate` of the
   same grove as a file.
Targets: a completion within 0.5 s (what a TAB may take before it feels stuck), and
`validate -` within 1.2x of `validate`.

    python bench/bench_cli.py [--agents N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_ui import grove_text  # the same 500-agent grove as the UI's benchmark

ROOT = Path(__file__).resolve().parent.parent
ENGINE = [sys.executable, "-P", "-m", "engine"]


def timed(cmd: list[str], cwd: Path, env: dict[str, str], stdin: bytes | None = None,
          fd8: bool = False) -> tuple[float, bytes]:
    """Seconds one run of `cmd` took, and what it wrote (to fd 8 for a completion)."""
    r = -1
    if fd8:  # argcomplete answers on fd 8: the child gets a pipe there
        r, w = os.pipe()
        os.dup2(w, 8)
        os.close(w)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(8,) if fd8 else ())
    if fd8:
        os.close(8)
    out, err = proc.communicate(stdin, timeout=60)
    took = time.perf_counter() - started
    if fd8:
        with os.fdopen(r, "rb") as f:
            out = f.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}: {err.decode()[-500:]}")
    return took, out


def complete(line: str, cwd: Path, env: dict[str, str]) -> tuple[float, list[str]]:
    e = dict(env, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
             _ARGCOMPLETE_IFS="\n", _ARGCOMPLETE_SHELL="bash")
    took, out = timed(ENGINE, cwd, e, fd8=True)
    return took, [w.strip() for w in out.decode().split("\n") if w.strip()]


def median(f: object, runs: int) -> float:
    return statistics.median(f() for _ in range(runs))  # type: ignore[operator]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=500, help="agents in the grove")
    ap.add_argument("--runs", type=int, default=7, help="runs per measurement (median)")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        repo = Path(tmp)
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        (repo / "groves" / "big").mkdir(parents=True)
        text = grove_text(a.agents)
        (repo / "groves" / "big" / "grove.yaml").write_text(text)

        base = median(lambda: timed([*ENGINE, "--version"], repo, env)[0], a.runs)
        print(f"baseline `engine --version`: {base * 1000:.0f} ms")
        _, got = complete("engine va", repo, env)
        assert "validate" in got, got
        _, got = complete("engine status -g ", repo, env)
        assert "big" in got, got
        _, got = complete("engine logs agent-00", repo, env)
        assert "agent-0001" in got and len(got) == 100, len(got)
        ok = True
        for label, line in (("command name", "engine va"),
                            ("grove name", "engine status -g "),
                            (f"agent name ({a.agents} agents)", "engine logs agent-00")):
            t = median(lambda line=line: complete(line, repo, env)[0], a.runs)
            ok &= t < 0.5
            print(f"complete {label}: {t * 1000:.0f} ms, ratio {t / base:.2f} "
                  f"(target < 500 ms: {'met' if t < 0.5 else 'MISSED'})")
        f = median(lambda: timed([*ENGINE, "validate"], repo, env)[0], a.runs)
        s = median(lambda: timed([*ENGINE, "validate", "-"], repo, env,
                                 stdin=text.encode())[0], a.runs)
        ok &= s < 1.2 * f
        print(f"validate (file): {f * 1000:.0f} ms, ratio {f / base:.2f}")
        print(f"validate - (stdin): {s * 1000:.0f} ms, ratio {s / base:.2f}, "
              f"{s / f:.2f}x the file (target < 1.2x: {'met' if s < 1.2 * f else 'MISSED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
