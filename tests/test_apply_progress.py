"""`engine apply --wait` progress: on a real pseudo-terminal a live table (rich's Live
display) with a row per agent (phase, elapsed time, change), ending as a static table; piped
or with TERM=dumb, plain lines without escape sequences; Ctrl-C leaves the terminal sane and
exits 130. Real agents: tmux sessions of the shell harness on the local runtime."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import git, local_grove

AGENTS = """\
    - {name: quick, task: "echo quick"}
    - {name: slow, task: "sleep 2; echo slow"}
    - {name: after, task: "echo after", dependsOn: [slow]}
"""
APPLY = [sys.executable, "-m", "engine", "apply", "--auto-approve", "--wait",
         "--timeout", "60"]
SHOW_CURSOR = b"\x1b[?25h"
COLOUR = re.compile(rb"\x1b\[(?:[0-9;]*;)?3[0-7]m")  # an SGR foreground colour


def setup(repo: Path, agents: str = AGENTS) -> None:
    local_grove(repo, agents)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("CI", "TERM", "COLUMNS")}
    return {**e, "TERM": "xterm-256color", **extra}


def on_pty(argv: list[str], cwd: Path, environ: dict[str, str], timeout: float = 90,
           when: Callable[[bytes], bool] | None = None) -> tuple[int, bytes, bytes]:
    """Run argv with a 120x40 pseudo-terminal as stdin, stdout and stderr; with `when`,
    send SIGINT (what Ctrl-C sends) once the output satisfies it. Returns (exit status,
    the whole output, the output after the interrupt)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen(argv, cwd=cwd, env=environ, stdin=slave, stdout=slave,
                         stderr=slave, start_new_session=True)
    os.close(slave)
    out, after, sent = b"", b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    chunk = b""
                if not chunk and p.poll() is not None:
                    break
                out += chunk
                after += chunk if sent else b""
            elif p.poll() is not None:
                break
            if when is not None and not sent and when(out):
                os.killpg(p.pid, signal.SIGINT)
                sent = True
        else:
            raise AssertionError(f"still running after {timeout}s: {out[-2000:]!r}")
        return p.wait(timeout=10), out, after
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)


def test_live_view_on_a_terminal(repo: Path) -> None:
    setup(repo)
    code, out, _ = on_pty(APPLY, repo, env())  # NO_COLOR=1 from conftest: no colour
    text = out.decode()
    assert code == 0, text[-3000:]
    frames = text.count("waiting: ")
    assert frames >= 2, text  # refreshed while it waited
    assert re.search(r"demo/slow +Running +\d+s +create: created", text), text
    assert re.search(r"demo/after +Pending +\d+s", text), text
    assert "\x1b[2K" in text and "\x1b[?25l" in text  # redrawn in place, cursor hidden
    final = text.rsplit("waiting: ", 1)[1]
    assert "3/3 agents finished" in final  # the static table, after the last frame
    for name in ("after", "quick", "slow"):
        assert re.search(rf"demo/{name} +Succeeded +\d+s +create: created", final), final
    assert final.index("3/3 agents finished") < final.index(SHOW_CURSOR.decode()) \
        < final.index("Apply complete: 3 created.")
    assert not COLOUR.search(out)  # NO_COLOR
    assert "[bold]" not in text and "[/" not in text


def test_colour_without_no_color(repo: Path) -> None:
    setup(repo, "    - {name: one, task: \"echo one\"}\n")
    e = env()
    e.pop("NO_COLOR", None)
    code, out, _ = on_pty(APPLY, repo, e)
    assert code == 0, out[-2000:]
    assert re.search(rb"\x1b\[32mSucceeded", out), out[-2000:]


def test_plain_lines_when_piped_or_dumb(repo: Path) -> None:
    setup(repo)
    p = subprocess.run(APPLY, cwd=repo, env=env(), capture_output=True, timeout=90)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "\x1b" not in out + p.stderr.decode()
    lines = out.splitlines()
    for line in ("demo/slow: Running", "demo/slow: Succeeded", "demo/after: Succeeded"):
        assert any(x.startswith(line + " (after ") and x.endswith("s)") for x in lines), out
    assert lines.index(next(x for x in lines if x.startswith("demo/slow: Running"))) < \
        lines.index(next(x for x in lines if x.startswith("demo/slow: Succeeded")))
    assert lines[-2] == "Apply complete: 3 created."
    # TERM=dumb on a terminal: the same plain lines, nothing redrawn
    git(repo, "rm", "-rq", "groves")
    git(repo, "commit", "-qm", "gone")
    subprocess.run([sys.executable, "-m", "engine", "destroy", "-g", "demo",
                    "--auto-approve"], cwd=repo, env=env(), capture_output=True, timeout=60)
    setup(repo, "    - {name: other, task: \"sleep 1\"}\n")
    code, raw, _ = on_pty(APPLY, repo, env(TERM="dumb"))
    assert code == 0, raw[-2000:]
    assert b"\x1b" not in raw
    assert re.search(rb"demo/other: Succeeded \(after \d+s\)", raw), raw


def test_ctrl_c_stops_the_live_view_and_exits_130(repo: Path) -> None:
    setup(repo, "    - {name: long, task: \"sleep 60\"}\n")
    code, out, after = on_pty(APPLY, repo, env(), when=lambda o: re.search(
        rb"demo/long +Running", o) is not None)
    assert code == 130, out[-3000:]
    assert SHOW_CURSOR in after  # Live stopped: the cursor is back
    text = after.decode()
    assert "apply interrupted" in text
    assert re.search(r"demo/long +Running +\d+s", text.rsplit("waiting: ", 1)[-1]), text
    subprocess.run([sys.executable, "-m", "engine", "stop", "demo/long"], cwd=repo,
                   env=env(), capture_output=True, timeout=60)
