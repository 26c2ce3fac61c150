"""What a person does from the web UI, run through the engine's own command line.

Every action is one `engine` subcommand in a child process (`python -P -m engine ...`, no
shell; -P: a directory `engine/` in the repository, which merged work could add, is never
imported in place of the engine): the same code path, the same grove lock and the same
one-line errors as typing it. Called by `engine.web.app`. The request body is untrusted
(a page could be tampered with): each field is checked against the names the engine
accepts before it becomes an argument, values go after their option as `--opt=VALUE`
(never read as another option), and a message is passed on stdin.
"""

from __future__ import annotations

import os
import re
import secrets as pysecrets
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.trust import reader

NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
REQUEST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
DIGEST = re.compile(r"[0-9a-f]{16,64}")
PLAN_ID = re.compile(r"[0-9a-f]{16}")
MAX_TEXT = 64 * 1024  # bytes of a message
MAX_REASON = 200
MAX_OUTPUT = 256 * 1024  # characters of a command's output kept
TIMEOUT = 120.0  # seconds an action may take (apply runs as a job instead)
AGENT_ACTIONS = ("stop", "start", "restart", "merge")
ACTIONS = ("message", "approve", "deny", "apply", *AGENT_ACTIONS)


class Refused(Exception):
    """A request the UI will not turn into a command (one line, shown to the person)."""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def line(self) -> str:
        """The command's one line: its error (`error: ...`), else its last output line."""
        text = self.err if self.code else self.out
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if self.code:
            errs = [ln for ln in lines if ln.startswith("error:")]
            return reader.one_line(errs[0] if errs else (lines[-1] if lines else
                                   f"error: exit status {self.code}"), 500)
        return reader.one_line(lines[-1] if lines else "done", 500)


def command(argv: list[str]) -> list[str]:
    """The command line of `engine ARGV`: this Python, -P (no directory of the repository
    on the module path)."""
    return [sys.executable, "-P", "-m", "engine", *argv]


def env() -> dict[str, str]:
    """The person's environment (the command acts as them), without colour."""
    out = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    out.pop("ENGINE_AGENT", None)
    return out


def run_cli(root: Path, argv: list[str], stdin: str | None = None,
            timeout: float = TIMEOUT) -> Result:
    """`engine ARGV` in `root`, as the person would type it; output capped."""
    try:
        p = subprocess.run(command(argv), cwd=root, env=env(),
                           input=stdin if stdin is not None else "",
                           capture_output=True, text=True, errors="replace",
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(1, "", f"error: engine {argv[0]} took longer than {timeout:g}s")
    return Result(p.returncode, p.stdout[-MAX_OUTPUT:], p.stderr[-MAX_OUTPUT:])


def _field(body: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise Refused(f"error: {what}: missing or not a valid name")
    return v


def argv_for(body: dict[str, Any], plans: Path) -> tuple[list[str], str | None]:
    """The command line (and stdin) an action request stands for; Refused when a field is
    missing or malformed."""
    action = body.get("action")
    if action not in ACTIONS:
        raise Refused(f"error: unknown action {reader.one_line(str(action), 40)!r}")
    grove = _field(body, "grove", NAME, "grove")
    if action == "apply":
        pid = _field(body, "planId", PLAN_ID, "plan")
        path = plans / f"{pid}.json"
        if not path.is_file():
            raise Refused("error: that plan is no longer here; reload the plan page")
        return ["apply", str(path), "--auto-approve"], None
    if action in ("approve", "deny"):
        req = _field(body, "request", REQUEST, "request")
        if body.get("parent") is not None:  # request ids are their parent's own
            req = f"{_field(body, 'parent', NAME, 'parent')}/{req}"
        argv = [action, req, f"--grove={grove}"]
        if action == "approve":
            digest = body.get("digest")
            if digest:
                argv.append(f"--digest={_field(body, 'digest', DIGEST, 'digest')}")
            return argv, None
        reason = reader.one_line(str(body.get("reason") or ""), MAX_REASON)
        if not reason:
            raise Refused("error: deny: say why (the parent agent is told)")
        return [*argv, f"--reason={reason}"], None
    agent = f"{grove}/{_field(body, 'agent', NAME, 'agent')}"
    if action == "message":
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise Refused("error: message: empty text")
        if len(text.encode()) > MAX_TEXT:
            raise Refused(f"error: message: longer than {MAX_TEXT // 1024} KiB")
        return ["message", agent, "-"], text
    return [action, agent], None


@dataclass
class Job:
    """A long action (apply) running in the background; the page polls it."""

    argv: list[str]
    output: list[str] = field(default_factory=list)
    code: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"done": self.code is not None, "code": self.code,
                "output": "".join(self.output)[-MAX_OUTPUT:]}


class Jobs:
    def __init__(self, root: Path, on_done: Callable[[], None] | None = None) -> None:
        self.root = root
        self.jobs: dict[str, Job] = {}
        self.on_done = on_done
        self._lock = threading.Lock()

    def start(self, argv: list[str]) -> str:
        with self._lock:
            if any(j.code is None for j in self.jobs.values()):
                raise Refused("error: an apply started from this page is still running")
            jid = pysecrets.token_hex(8)
            self.jobs[jid] = job = Job(argv)
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return jid

    def _run(self, job: Job) -> None:
        try:
            p = subprocess.Popen(command(job.argv), cwd=self.root, env=env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace")
            assert p.stdout is not None
            for line in p.stdout:
                job.output.append(line)
                if len(job.output) > 5000:
                    del job.output[:1000]
            job.code = p.wait()
        except OSError as e:
            job.output.append(f"error: {e.strerror}\n")
            job.code = 1
        if self.on_done is not None:
            self.on_done()

    def get(self, jid: str) -> Job | None:
        return self.jobs.get(jid)
