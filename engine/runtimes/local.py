"""Local runtime (the embedded default): each agent is a tmux session on this machine.

Called through `engine.runtimes.get("local", ...)`. Sessions live on the engine's own tmux
server (socket `.engine/tmux.sock`), never the user's. Each session runs a generated
wrapper (`.engine/run/<grove>/<agent>/run.sh`) that enters the agent's worktree, exports
its environment, reads its secrets from 0600 files (then deletes them), runs the harness
under `timeout` when maxDuration is set, and records the exit code atomically. Output is
piped to `.engine/logs/<grove>/<agent>.log`. Observation is one `list-sessions` call plus
the exit files of finished agents. Agents here share the user's home, so a harness's login
files (`credential_files`) are where the program already looks; they are not copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from engine import __version__
from engine.errors import EngineError, TemporaryError
from engine.fsutil import atomic_write
from engine.proc import CommandFailed, run
from engine.runtimes import FAILED, RUNNING, SUCCEEDED, Launch, Observed

SEP = "__"  # grove and agent names cannot contain "_", so session names are unambiguous


# What an agent inherits from the user who runs the engine; everything else (API keys in the
# shell, tokens, SSH agents) stays out, so an agent sees only its own credentials.
INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_ALL",
             "LC_CTYPE", "TERM", "TZ", "TMPDIR", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
             "XDG_DATA_HOME", "XDG_CACHE_HOME")


def clean_env() -> dict[str, str]:
    """The environment tmux (and so every agent session) starts from."""
    env = {k: os.environ[k] for k in INHERITED if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("TERM", "xterm-256color")
    return env


class LocalRuntime:
    name = "local"

    def __init__(self, repo_root: Path) -> None:
        self.root = repo_root
        self.state = repo_root / ".engine"
        self.socket = self.state / "tmux.sock"

    # -- helpers ---------------------------------------------------------------------------

    def tmux(self, *args: str, check: bool = True, input: str | None = None
             ) -> subprocess.CompletedProcess[str]:
        if shutil.which("tmux") is None:
            raise EngineError("tmux is not installed; the local runtime needs it "
                              "(apt-get install tmux)")
        return run(["tmux", "-S", str(self.socket), "-f", "/dev/null", *args], check=check,
                   input=input, env=clean_env())

    def session(self, grove: str, agent: str) -> str:
        return f"{grove}{SEP}{agent}"

    def run_dir(self, grove: str, agent: str) -> Path:
        return self.state / "run" / grove / agent

    def log_file(self, grove: str, agent: str) -> Path:
        return self.state / "logs" / grove / f"{agent}.log"

    def _sessions(self) -> set[str]:
        if not self.socket.exists():
            return set()
        p = self.tmux("list-sessions", "-F", "#{session_name}", check=False)
        return set(p.stdout.split()) if p.returncode == 0 else set()

    # -- Runtime protocol ------------------------------------------------------------------

    def observe(self, grove: str) -> dict[str, Observed]:
        live = self._sessions()
        out: dict[str, Observed] = {}
        base = self.state / "run" / grove
        if not base.is_dir():
            return out
        for d in sorted(base.iterdir()):
            meta = _read_json(d / "meta.json")
            if meta is None:
                continue
            name = d.name
            spec_hash = str(meta.get("specHash", ""))
            if self.session(grove, name) in live:
                out[name] = Observed(grove, name, self.name, spec_hash, RUNNING)
                continue
            code_text = _read(d / "exit")
            if code_text is None or not code_text.strip().lstrip("-").isdigit():
                out[name] = Observed(grove, name, self.name, spec_hash, FAILED, None,
                                     "session ended without an exit code (killed)")
                continue
            code = int(code_text)
            reason = (_read(d / "reason") or "").strip() or f"exited {code}"
            out[name] = Observed(grove, name, self.name, spec_hash,
                                 SUCCEEDED if code == 0 else FAILED, code,
                                 "" if code == 0 else reason)
        return out

    def create(self, launch: Launch) -> None:
        a = launch.agent
        sess = self.session(a.grove, a.name)
        self.tmux("kill-session", "-t", f"={sess}", check=False)
        rd = launch.run_dir
        rd.mkdir(parents=True, exist_ok=True)
        for stale in ("exit", "reason"):
            with contextlib.suppress(FileNotFoundError):
                (rd / stale).unlink()
        self._write_secrets(rd / "secrets", launch.secrets)
        bindir = rd / "bin"
        bindir.mkdir(exist_ok=True)
        atomic_write(bindir / "engine", f"#!/bin/sh\nexec python3 -S "
                     f"{shlex.quote(str(launch.client))} \"$@\"\n".encode(), 0o755)
        launch.log_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(rd / "run.sh", self._script(launch).encode(), 0o755)
        atomic_write(rd / "meta.json", json.dumps(
            {"specHash": a.spec_hash, "grove": a.grove, "agent": a.name,
             "engineVersion": __version__}).encode())
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            self.tmux("new-session", "-d", "-s", sess, "-x", "200", "-y", "50",
                      "-c", str(launch.workdir),
                      f"exec bash {shlex.quote(str(rd / 'run.sh'))}")
        except CommandFailed as e:
            if "server exited" in e.stderr or "lost server" in e.stderr:
                # the server was quitting as its last session ended: a new one is started
                # by the retry
                raise TemporaryError(f"agent {a.grove}/{a.name}: tmux server restarting",
                                     0.1) from None
            raise

    def _write_secrets(self, d: Path, values: dict[str, str]) -> None:
        if d.exists():
            shutil.rmtree(d)
        if not values:
            return
        d.mkdir(mode=0o700)
        for name, value in values.items():
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value)

    def _script(self, launch: Launch) -> str:
        a = launch.agent
        rd = launch.run_dir
        q = shlex.quote
        lines = [
            "#!/usr/bin/env bash",
            f"# grove-engine wrapper for agent {a.grove}/{a.name}; secrets are read from",
            "# files and deleted, never written here.",
            # the wrapper pipes its own pane to the log before the harness prints anything
            f"tmux pipe-pane -o -t \"$TMUX_PANE\" {q('cat >> ' + q(str(launch.log_file)))}",
            f"cd {q(str(launch.workdir))} || exit 127",
            f"export PATH={q(str(rd / 'bin'))}:\"$PATH\"",
        ]
        lines += [f"export {k}={q(v)}" for k, v in sorted(launch.env.items())]
        lines += [
            f"secrets={q(str(rd / 'secrets'))}",
            'if [ -d "$secrets" ]; then',
            '  for f in "$secrets"/*; do [ -f "$f" ] && export "${f##*/}=$(cat "$f")"; done',
            '  rm -rf "$secrets"',
            "fi",
        ]
        # a restart resumes the harness's previous session when it knows how
        command = a.resume_command if launch.resume and a.resume_command else a.command
        argv = " ".join(q(x) for x in command)
        if a.max_duration:
            argv = f"timeout --foreground -k 10 {a.max_duration} {argv}"
        lines += [
            argv,
            "code=$?",
            f"rd={q(str(rd))}",
        ]
        if a.max_duration:
            lines += [f'[ "$code" = 124 ] && echo "maxDuration {a.max_duration}s exceeded" '
                      '> "$rd/reason"']
        lines += ['[ "$code" = 127 ] && echo "exited 127: command not found" > "$rd/reason"',
                  'echo "$code" > "$rd/exit.tmp" && mv -f "$rd/exit.tmp" "$rd/exit"',
                  'exit "$code"', ""]
        return "\n".join(lines)

    def delete(self, grove: str, agent: str) -> None:
        self.tmux("kill-session", "-t", f"={self.session(grove, agent)}", check=False)
        rd = self.run_dir(grove, agent)
        if rd.exists():
            shutil.rmtree(rd)

    def logs(self, grove: str, agent: str, follow: bool = False) -> Iterator[str]:
        path = self.log_file(grove, agent)
        if not path.exists() and not follow:
            return
        sess = self.session(grove, agent)
        deadline_idle = 0.0
        with contextlib.ExitStack() as stack:
            while not path.exists():
                if sess not in self._sessions():
                    return
                time.sleep(0.1)
            f = stack.enter_context(path.open("r", errors="replace"))
            while True:
                line = f.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                if not follow:
                    return
                if sess not in self._sessions():
                    deadline_idle += 1
                    if deadline_idle > 3:  # a few reads after the end to drain the pipe
                        return
                time.sleep(0.1)

    def look(self, grove: str, agent: str) -> str:
        p = self.tmux("capture-pane", "-p", "-t", f"={self.session(grove, agent)}:",
                      check=False)
        if p.returncode == 0:
            return p.stdout
        tail = list(self.logs(grove, agent))[-50:]
        return "\n".join(tail) + ("\n" if tail else "")

    def attach(self, grove: str, agent: str) -> int:
        sess = self.session(grove, agent)
        if sess not in self._sessions():
            raise EngineError(f"agent {grove}/{agent}: not running")
        return subprocess.call(["tmux", "-S", str(self.socket), "attach-session", "-t",
                                f"={sess}"])

    def send(self, grove: str, agent: str, text: str) -> None:
        sess = self.session(grove, agent)
        if sess not in self._sessions():
            raise EngineError(f"agent {grove}/{agent}: not running, cannot deliver a message")
        buf = f"engine-msg-{os.getpid()}"
        self.tmux("load-buffer", "-b", buf, "-", input=text)
        self.tmux("paste-buffer", "-p", "-d", "-b", buf, "-t", f"={sess}:")
        time.sleep(0.05)  # a separate Enter, after the bracketed paste has landed
        self.tmux("send-keys", "-t", f"={sess}:", "Enter")


def _read(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


def _read_json(p: Path) -> dict[str, object] | None:
    text = _read(p)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def make(repo_root: Path, host: str | None = None) -> LocalRuntime:
    return LocalRuntime(repo_root)
