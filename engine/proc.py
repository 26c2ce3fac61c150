"""The one subprocess helper for programs other than git: run a command, capture output,
turn failure into EngineError.

Called by the local runtime (tmux). Git never runs through here: every git call goes
through the hardened runner `engine.trust.git`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from engine.errors import EngineError


class CommandFailed(EngineError):
    def __init__(self, cmd: Sequence[str], code: int, stderr: str) -> None:
        first = (stderr.strip().splitlines() or [""])[-1]
        super().__init__(f"{' '.join(cmd[:3])}: exit {code}: {first}", stderr.strip())
        self.code = code
        self.stderr = stderr


def run(cmd: Sequence[str], cwd: Path | None = None, check: bool = True,
        input: str | None = None, env: Mapping[str, str] | None = None,
        timeout: float | None = 120) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, input=input, env=env, text=True,
                              capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise EngineError(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise EngineError(f"{' '.join(cmd[:3])}: timed out after {timeout}s") from None
    if check and proc.returncode != 0:
        raise CommandFailed(cmd, proc.returncode, proc.stderr)
    return proc
