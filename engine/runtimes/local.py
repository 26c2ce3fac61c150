"""Local runtime (the embedded default): each agent is a tmux session on this machine.

Called through `engine.runtimes.get("local", ...)`. Sessions live on the engine's own tmux
server (socket `.engine/tmux.sock`), never the user's. Each session runs a generated
wrapper (`.engine/run/<grove>/<agent>/run.sh`) that enters the agent's worktree, exports
its environment, reads its secrets from 0600 files (then deletes them), runs the harness
under `timeout` when maxDuration is set, and records the exit code atomically. Output is
piped to `.engine/logs/<grove>/<agent>.log`. Observation is one `list-sessions` call plus
the exit files of finished agents. Agents here share the user's home, so a harness's login
files (`credential_files`) are where the program already looks; they are not copied.

Not a sandbox: agents run as the engine's user and see what it sees. What ends with an
agent is `local_contain`'s job (a cgroup, a PID namespace or a marker sweep). Everything
under `.engine/run` and `.engine/logs` is agent-writable, so it is read through
`engine.trust.reader`: no symlink followed, no FIFO waited on, sizes capped.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from engine import __version__, egress, events, fsutil, harness_install, paths
from engine.desired import HOME_FILE_PREFIX, DesiredAgent
from engine.errors import EngineError, TemporaryError
from engine.fsutil import atomic_write
from engine.proc import CommandFailed, run
from engine.runtimes import FAILED, RUNNING, SUCCEEDED, Launch, Observed, logfile
from engine.runtimes import docker_fs as fs
from engine.runtimes import local_contain as contain
from engine.runtimes.docker_spec import egress_env, uid_gid
from engine.trust.reader import Untrusted, one_line, read_json, read_text, subdirs

SEP = "__"  # grove and agent names cannot contain "_", so session names are unambiguous
KILLED = "session ended without an exit code (killed)"
BAD_EXIT = "invalid exit code file"  # not a regular file holding a small integer
_EXIT = re.compile(r"-?[0-9]{1,3}")
# files of one run that a new run must not inherit
_STALE = ("exit", "reason", "started", "reaped")


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
        self.state = paths.state(repo_root)
        self.socket = self.state / "tmux.sock"
        self._server: int | None = None

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

    def _gone(self, sess: str) -> bool:
        """Whether tmux says for certain that `sess` is not running (a failed listing is
        not taken as an answer)."""
        if not self.socket.exists():
            return True
        p = self.tmux("has-session", "-t", f"={sess}", check=False)
        return p.returncode != 0 and any(m in p.stderr for m in (
            "can't find session", "no server running", "error connecting"))

    def _pane_pids(self, sess: str) -> list[int]:
        if not self.socket.exists():
            return []
        p = self.tmux("list-panes", "-s", "-t", f"={sess}", "-F", "#{pane_pid}", check=False)
        return [int(x) for x in p.stdout.split() if x.isdigit()] if p.returncode == 0 else []

    # -- Runtime protocol ------------------------------------------------------------------

    def observe(self, grove: str) -> dict[str, Observed]:
        live = self._sessions()
        out: dict[str, Observed] = {}
        base = self.state / "run" / grove
        for name in subdirs(base):
            try:
                meta = read_json(base, f"{name}/meta.json", 65536)
            except Untrusted:
                continue
            if not isinstance(meta, dict):
                continue
            spec_hash = str(meta.get("specHash", ""))
            if self.session(grove, name) in live:
                out[name] = Observed(grove, name, self.name, spec_hash, RUNNING)
                continue
            self._reap_abandoned(grove, name)
            code, reason = _ended(base, name)
            phase = SUCCEEDED if code == 0 else FAILED
            out[name] = Observed(grove, name, self.name, spec_hash, phase, code, reason)
        return out

    def _reap_abandoned(self, grove: str, agent: str) -> None:
        """A run whose wrapper started but did not clean up (its session was killed from
        outside): end what it left running, once."""
        rd = self.run_dir(grove, agent)
        if not os.path.lexists(rd / "started") or os.path.lexists(rd / "reaped"):
            return
        if not self._gone(self.session(grove, agent)):
            return
        contain.kill(contain.load(rd.parent, grove, agent))
        with contextlib.suppress(OSError):
            os.close(os.open(rd / "reaped", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))

    def create(self, launch: Launch) -> None:
        a = launch.agent
        sess = self.session(a.grove, a.name)
        rd = launch.run_dir
        if rd.exists():  # it ran before: end that run (and what it left) first
            self._stop(a.grove, a.name)
        rd.mkdir(parents=True, exist_ok=True)
        for stale in _STALE:
            with contextlib.suppress(FileNotFoundError):
                (rd / stale).unlink()
        self._write_secrets(rd / "secrets", {  # home files are files, not variables
            k: v for k, v in launch.secrets.items() if not k.startswith(HOME_FILE_PREFIX)})
        bindir = rd / "bin"
        bindir.mkdir(exist_ok=True)
        client = launch.client
        drop = agent_ids(a)
        if drop:
            # the agent's uid may not reach the engine's install: it gets its own copy
            client = bindir / "client.py"
            atomic_write(client, launch.client.read_bytes(), 0o644)
            self._prepare_user(launch, *drop)
        atomic_write(bindir / "engine", f"#!/bin/sh\nexec python3 -S "
                     f"{shlex.quote(str(client))} \"$@\"\n".encode(), 0o755)
        logfile.private_dir(launch.log_file)
        logfile.rotate(launch.log_file)  # the run before's log: logs --previous
        if a.network == "egress":
            self._egress(a)
        c = self._contain(launch)
        atomic_write(rd / "run.sh", self._script(launch, c).encode(), 0o755)
        atomic_write(rd / "meta.json", json.dumps(
            {"specHash": a.spec_hash, "grove": a.grove, "agent": a.name,
             "engineVersion": __version__}).encode())
        self._start(sess, launch)
        events.record(self.root, {"grove": a.grove, "agent": a.name, "runtime": self.name,
                                  "event": "AgentContained", "containment": c.mechanism})

    def check_program(self, a: DesiredAgent) -> None:
        """The harness program is installed in the cache or on PATH; else one error naming
        the install command."""
        if a.program is None or harness_install.installed(*a.program) is not None:
            return
        if shutil.which(a.command[0], path=clean_env()["PATH"]) is None:
            raise EngineError(f"agent {a.grove}/{a.name}: "
                              f"{harness_install.missing_message(a.program[0])}")

    def _egress(self, a: DesiredAgent) -> None:
        """`network: egress` here: the agent gets a network namespace of its own (only a
        loopback interface), with the forwarder to the gateway inside. Making one needs
        root; anything less would be the host's whole network, so it is refused."""
        who = f"agent {a.grove}/{a.name}"
        if os.geteuid() != 0 or shutil.which("unshare", path=clean_env()["PATH"]) is None:
            raise EngineError(f"{who}: network: egress on the local runtime needs the engine "
                              "to run as root (the agent gets a network namespace of its "
                              "own, with util-linux unshare); use runtime: docker")
        egress.write_policy(self.root, a.grove, a.name, list(a.egress))
        egress.ensure_running(self.root)

    def _netns(self, launch: Launch) -> str:
        """The prefix that runs the agent in a new network namespace whose only way out is
        the forwarder to its gateway socket (started first, as root, inside it)."""
        a = launch.agent
        q = shlex.quote
        sock = egress.socket_dir(self.root, a.grove, a.name)
        ready = launch.run_dir / "egress-ready"
        forwarder = Path(egress.__file__).resolve().parent / "forwarder.py"
        loop = [e for e in a.egress if egress.is_loopback(egress.parse_endpoint(e)[0])]
        fwd = " ".join(f"--forward {q(e)}" for e in loop)
        # the socket by a relative name, from its own directory: a deep repository path
        # would not fit a socket address
        inner = (f"rm -f {q(str(ready))}; (cd {q(str(sock))} && exec {q(sys.executable)} -S "
                 f"{q(str(forwarder))} --lo-up --socket {egress.SOCKET_NAME} --proxy-port "
                 f"{egress.PROXY_PORT} {fwd} --ready {q(str(ready))}) & "
                 f"for i in $(seq 200); do [ -e {q(str(ready))} ] && exec \"$@\"; "
                 "sleep 0.05; done; echo 'egress: the forwarder to the gateway did not "
                 "start' >&2; exit 1")
        return f"unshare --net -- bash -c {q(inner)} _ "

    def home(self, grove: str, agent: str) -> Path:
        """The private home of an agent run under its own uid (the engine is root): kept
        across restarts, replacements and `stop` (a harness's session lives there), removed
        by `delete`."""
        return fs.home_dir(self.root, grove, agent)

    def _prepare_user(self, launch: Launch, uid: int, gid: int) -> None:
        """The engine is root and the agent runs as `uid`: it must reach its workspace
        (every directory above it searchable), own its home and inbox, and write its
        workspace (an ACL, as for a container)."""
        a = launch.agent
        # every directory above the repository must be searchable by the agent's uid (a
        # 0700 /root or mktemp directory is not): it gets search, not listing, by an ACL
        blocked = unreachable(launch.workdir, uid, gid, stop=self.state)
        while blocked is not None:
            try:
                fs.grant_search(blocked, uid)
            except (OSError, EngineError):
                blocked_now: Path | None = blocked
            else:
                events.record(self.root, {"grove": a.grove, "agent": a.name,
                                          "event": "SearchGranted", "path": str(blocked),
                                          "uid": uid})
                blocked_now = unreachable(launch.workdir, uid, gid, stop=self.state)
            if blocked_now == blocked:
                raise EngineError(
                    f"agent {a.grove}/{a.name}: uid {uid} (the agent's user; agents never "
                    f"run as root) cannot reach its workspace: {blocked} is not searchable "
                    f"for it and no ACL can be added. Allow it (chmod o+x {blocked}) or keep "
                    "the repository elsewhere")
            blocked = blocked_now
        for d in (self.state, self.state / "worktrees", launch.workdir.parent):
            if d.is_dir() and d.is_relative_to(self.state):
                d.chmod(d.stat().st_mode | 0o111)  # search only: nothing listed or read
        home = fs.ensure_home(self.root, a.grove, a.name, uid, gid)  # kept across restarts
        # a login shell (codex runs its commands with `bash -lc`) resets PATH from
        # /etc/profile: the agent's own profile puts its `engine` and program back first.
        # The home is the agent's: everything is written beneath it by descriptor, never
        # through a link it planted (a previous run of it may have)
        write_beneath(home, ".profile", (
            "# written by grove-engine for this agent\n"
            f"export PATH={shlex.quote(agent_path(launch))}:\"$PATH\"\n").encode(), uid, gid)
        for name, rel in a.credential_files:
            if name in launch.secrets:
                write_beneath(home, rel, launch.secrets[name].encode(), uid, gid)
        fs.give(launch.inbox, uid, gid)
        if a.access != "read-only":
            fs.grant_workspace(launch, uid)

    def _contain(self, launch: Launch) -> contain.Containment:
        """This run's containment, chosen for this machine and recorded in its run dir."""
        c = contain.choose(launch.agent.grove, launch.agent.name, self._server_pid(),
                           agent_ids(launch.agent))
        atomic_write(launch.run_dir / contain.RECORD, c.record().encode())
        if c.mechanism == "pidns":
            atomic_write(launch.run_dir / contain.INIT_FILE, contain.INIT.encode())
        return c

    def _start(self, sess: str, launch: Launch) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            self.tmux("new-session", "-d", "-s", sess, "-x", "200", "-y", "50",
                      "-c", str(launch.workdir),
                      f"exec bash {shlex.quote(str(launch.run_dir / 'run.sh'))}")
        except CommandFailed as e:
            if "server exited" in e.stderr or "lost server" in e.stderr:
                # the server was quitting as its last session ended: a new one is started
                # by the retry
                raise TemporaryError(f"agent {launch.agent.grove}/{launch.agent.name}: "
                                     "tmux server restarting", 0.1) from None
            raise

    def _server_pid(self) -> int | None:
        """The running tmux server's pid (it forks every wrapper), or None; asked once per
        runtime while that server lives."""
        if self._server is not None and Path(f"/proc/{self._server}").is_dir():
            return self._server
        if not self.socket.exists():
            return None
        p = self.tmux("display-message", "-p", "#{pid}", check=False)
        self._server = int(p.stdout) if p.returncode == 0 and p.stdout.strip().isdigit() \
            else None
        return self._server

    def _stop(self, grove: str, agent: str) -> None:
        """End the agent's session and every process it started."""
        sess = self.session(grove, agent)
        p = self.tmux("list-panes", "-s", "-t", f"={sess}", "-F", "#{pane_pid}", check=False)
        panes = [int(x) for x in p.stdout.split() if x.isdigit()] if p.returncode == 0 else []
        if p.returncode == 0 or not any(m in p.stderr for m in (
                "can't find session", "no server running", "error connecting")):
            self.tmux("kill-session", "-t", f"={sess}", check=False)
        contain.kill(contain.load(self.state / "run" / grove, grove, agent), panes)

    def _write_secrets(self, d: Path, values: dict[str, str]) -> None:
        if d.exists():
            fsutil.remove_tree(d)
        if not values:
            return
        d.mkdir(mode=0o700)
        for name, value in values.items():
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value)

    def _script(self, launch: Launch, c: contain.Containment) -> str:
        a = launch.agent
        q = shlex.quote
        # a restart resumes the harness's previous session when it knows how
        command = a.argv(launch.resume, launch.task)
        # the agent's own PATH (its `engine`, its program) reaches only the agent: the
        # wrapper, which runs as the engine's user, resolves its tools from a clean PATH
        proxy = ""
        if a.network == "egress":
            proxy = " ".join(f"{k}={q(v)}" for k, v in egress_env(a.egress).items()
                             if not k.startswith("ENGINE_")) + " "
        argv = (f"env PATH={q(agent_path(launch))}:\"$PATH\" {proxy}"
                + " ".join(q(x) for x in command))
        drop = agent_ids(a)
        if drop:
            argv = f"setpriv --reuid={drop[0]} --regid={drop[1]} --clear-groups -- {argv}"
        if a.network == "egress":
            argv = self._netns(launch) + argv
        # maxDuration is enforced from outside the agent's containment, where it cannot
        # reach (a delegated cgroup could otherwise freeze the timer)
        outer = f"timeout --foreground -k 10 {a.max_duration}" if a.max_duration else ""
        lines = self._prologue(launch, c)
        lines += contain.run_lines(c, argv, outer)
        lines += contain.end_lines(c)
        if a.max_duration:
            lines += [f'[ "$code" = 124 ] && echo "maxDuration {a.max_duration}s exceeded" '
                      '> "$rd/reason"']
        lines += ['[ "$code" = 127 ] && echo "exited 127: command not found" > "$rd/reason"',
                  'echo "$code" > "$rd/exit.tmp" && mv -f "$rd/exit.tmp" "$rd/exit"']
        lines += contain.last_lines(c)
        lines += ['exit "$code"', ""]
        return "\n".join(lines)

    def _prologue(self, launch: Launch, c: contain.Containment) -> list[str]:
        """The wrapper up to the harness: log, directory, environment, secrets."""
        a = launch.agent
        rd = launch.run_dir
        q = shlex.quote
        lines = [
            "#!/usr/bin/env bash",
            f"# grove-engine wrapper for agent {a.grove}/{a.name}; secrets are read from",
            "# files and deleted, never written here.",
            f"rd={q(str(rd))}",
            ': > "$rd/started"',
            # the wrapper pipes its own pane to the log before the harness prints anything
            f"tmux pipe-pane -o -t \"$TMUX_PANE\" {q('cat >> ' + q(str(launch.log_file)))}",
            f"cd {q(str(launch.workdir))} || exit 127",
        ]
        if agent_ids(a):
            home = self.home(a.grove, a.name)
            lines += [f"export HOME={q(str(home))} USER=agent LOGNAME=agent ENGINE_OWN_HOME=1",
                      "unset XDG_CONFIG_HOME XDG_DATA_HOME XDG_CACHE_HOME XDG_RUNTIME_DIR",
                      # its repository is not its uid's: git must still work in it
                      "export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory "
                      "GIT_CONFIG_VALUE_0='*'"]
        lines += [f"export {k}={q(v)}" for k, v in sorted(launch.env.items())]
        lines += [
            f"export {contain.TOKEN_VAR}={c.token}",
            f"secrets={q(str(rd / 'secrets'))}",
            'if [ -d "$secrets" ]; then',
            '  for f in "$secrets"/*; do [ -f "$f" ] && export "${f##*/}=$(cat "$f")"; done',
            '  rm -rf "$secrets"',
            "fi",
        ]
        return lines

    def stop(self, grove: str, agent: str) -> None:
        """End the session and what it started; the home, run dir and log stay. A run
        ended here is recorded as a stopped container's is: exit 143, "stopped"."""
        live = not self._gone(self.session(grove, agent))
        self._stop(grove, agent)
        egress.remove_policy(self.root, grove, agent)
        rd = self.run_dir(grove, agent)
        if live and os.path.lexists(rd / "started") and not os.path.lexists(rd / "exit"):
            with contextlib.suppress(EngineError):  # beneath the run dir, by descriptor
                write_beneath(rd, "reason", b"stopped\n", os.getuid(), os.getgid())
                write_beneath(rd, "exit", b"143\n", os.getuid(), os.getgid())

    def delete(self, grove: str, agent: str) -> None:
        self.stop(grove, agent)
        fs.remove_home(self.root, grove, agent)
        rd = self.run_dir(grove, agent)
        if rd.is_symlink():
            rd.unlink()
        elif rd.exists():
            fsutil.remove_tree(rd)

    def logs(self, grove: str, agent: str, follow: bool = False, tail: int | None = None,
             previous: bool = False) -> Iterator[str]:
        sess = self.session(grove, agent)
        base = self.state / "logs"
        if previous:  # the run before this one (logfile.rotate): it has ended
            f = _open_log(base, grove, f"{agent}.log{logfile.PREVIOUS}", tail)
            if f is None:
                raise EngineError(f"agent {grove}/{agent}: no previous run (its log is "
                                  "kept once it has run again)")
            follow = False
        else:
            f = _open_log(base, grove, f"{agent}.log", tail)
        while f is None:
            if not follow or sess not in self._sessions():
                return
            time.sleep(0.1)
            f = _open_log(base, grove, f"{agent}.log", tail)
        try:
            if tail is not None:  # the last `tail` lines there are now, then what comes
                last: collections.deque[str] = collections.deque(maxlen=max(tail, 0))
                while line := f.readline(1 << 20):
                    last.append(line.rstrip("\n"))
                yield from last
            idle = 0
            while True:
                line = f.readline(1 << 20)
                if line:
                    yield line.rstrip("\n")
                    continue
                if not follow:
                    return
                if logfile.replaced(f.fileno(), base / grove / f"{agent}.log"):
                    # a restart rotated the log: this run's is read from its start
                    nxt = _open_log(base, grove, f"{agent}.log")
                    if nxt is not None:
                        f.close()
                        f, idle = nxt, 0
                        continue
                if sess not in self._sessions():
                    idle += 1
                    if idle > 3:  # a few reads after the end to drain the pipe
                        return
                time.sleep(0.1)
        finally:
            f.close()

    def look(self, grove: str, agent: str) -> str:
        p = self.tmux("capture-pane", "-p", "-t", f"={self.session(grove, agent)}:",
                      check=False)
        if p.returncode == 0:
            return p.stdout
        tail = list(self.logs(grove, agent, tail=50))
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
        time.sleep(0.3)  # a separate Enter, once the bracketed paste has landed (gemini
        # takes an Enter sooner than ~0.1 s after a paste as a newline in the message)
        self.tmux("send-keys", "-t", f"={sess}:", "Enter")


def agent_path(launch: Launch) -> str:
    """What goes first on the agent's PATH: its `engine` client, then its program."""
    a = launch.agent
    program = harness_install.installed(*a.program) if a.program else None
    return ":".join([str(launch.run_dir / "bin")] + ([str(program.bin_dir)] if program else []))


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def write_beneath(top: Path, rel: str, data: bytes, uid: int, gid: int) -> None:
    """`top/rel` (0600, owned by uid:gid) written through descriptors: no symlink below
    `top` is followed, made directories are the agent's, and the file is replaced whole."""
    try:
        _write_beneath(top, rel, data, uid, gid)
    except OSError as e:  # e.g. the agent left a directory where the file goes
        raise EngineError(f"{top}/{rel}: cannot be written ({e.strerror}); refused") from None


def _write_beneath(top: Path, rel: str, data: bytes, uid: int, gid: int) -> None:
    *dirs, name = rel.split("/")
    if not name or any(p in ("", ".", "..") for p in (*dirs, name)):
        raise EngineError(f"{rel!r}: not a plain path inside the home")
    fd = os.open(top, _DIR)
    try:
        for d in dirs:
            try:
                os.mkdir(d, 0o700, dir_fd=fd)
                os.chown(d, uid, gid, dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                pass
            try:
                nxt = os.open(d, _DIR, dir_fd=fd)
            except OSError:
                raise EngineError(f"{top}/{rel}: {d} is not a directory of the agent's "
                                  "(a link or a file); refused") from None
            os.close(fd)
            fd = nxt
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        w = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600, dir_fd=fd)
        try:
            os.fchown(w, uid, gid)
            os.write(w, data)
        finally:
            os.close(w)
        os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def agent_ids(a: DesiredAgent) -> tuple[int, int] | None:
    """(uid, gid) to run the harness as when that is not the engine's own: the engine is
    root and the agent's user (default 1000) is not. Agent programs refuse to run
    unattended as root (Claude Code does), and an agent has no business being root."""
    if os.geteuid() != 0:
        return None
    uid, gid = uid_gid(a.user)
    return None if uid == 0 else (uid, gid)


def unreachable(path: Path, uid: int, gid: int, stop: Path) -> Path | None:
    """The first directory above `path` (outside `stop`, which the engine fixes itself)
    that `uid` cannot search, judged by mode bits (an ACL can only add to them)."""
    for d in reversed(path.resolve().parents):
        if d.is_relative_to(stop.resolve()):
            break
        st = d.stat()
        bits = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bits and not _acl_search(d, uid):
            return d
    return None


def _acl_search(d: Path, uid: int) -> bool:
    try:
        raw = os.getxattr(d, "system.posix_acl_access")
    except OSError:
        return False
    entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    return any(tag == 0x02 and who == uid and perm & 1 for tag, perm, who in entries)


def _ended(base: Path, name: str) -> tuple[int | None, str]:
    """Exit code and reason of a run that is no longer running, from its agent-writable
    `exit` and `reason` files; a refused or non-integer exit file is a failure."""
    try:
        text = read_text(base, f"{name}/exit", 64).strip()
    except Untrusted:
        return None, (KILLED if not os.path.lexists(base / name / "exit") else BAD_EXIT)
    if not _EXIT.fullmatch(text):
        return None, BAD_EXIT
    code = int(text)
    if code == 0:
        return 0, ""
    try:
        reason = one_line(read_text(base, f"{name}/reason", 4096))
    except Untrusted:
        reason = ""
    return code, reason or f"exited {code}"


_LOG_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def _open_log(base: Path, grove: str, name: str, tail: int | None = None) -> TextIO | None:
    """`base/<grove>/<name>` opened for streaming under the reader's rules (no symlink
    followed beneath `base`, only a regular file, never blocking), at the start of its last
    `tail` lines when given (`logfile.tail_start`); None otherwise."""
    try:
        top = os.open(base, _LOG_DIR)
        try:
            sub = os.open(grove, _LOG_DIR, dir_fd=top)
        finally:
            os.close(top)
        try:
            fd = os.open(name, _LOG_FILE, dir_fd=sub)
        finally:
            os.close(sub)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    if tail is not None:
        os.lseek(fd, logfile.tail_start(fd, tail), os.SEEK_SET)
    return os.fdopen(fd, "r", encoding="utf-8", errors="replace")  # universal newlines


def make(repo_root: Path, host: str | None = None) -> LocalRuntime:
    return LocalRuntime(repo_root)
