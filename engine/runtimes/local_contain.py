"""Process containment for the local runtime: every process an agent starts ends with it.

Called by `engine.runtimes.local`: `choose` at create (the strongest mechanism this machine
allows, recorded as `containment.json` in the agent's run dir), `run_lines`/`end_lines` for
its wrapper script, and `load` + `kill` at delete, replace, and when a session ended without
its wrapper cleaning up. Mechanisms, strongest first:

- `cgroup`: a cgroup v2 per agent, a child of the tmux server's cgroup. The harness enters
  it before it starts; `cgroup.kill` ends everything in it, whatever `setsid`, `nohup`,
  double-forks or `disown` did. Needs a writable cgroup2 hierarchy (root, or a delegated
  subtree); a wrapper that cannot enter it falls back to `marker` and rewrites the record.
- `pidns`: the harness runs in its own PID namespace (`unshare --pid --fork --kill-child
  --mount-proc`, plus `--user --map-current-user` when not root) under a small init; when
  the init exits, the kernel kills every process left in the namespace.
- `marker`: best effort. Every agent process inherits ENGINE_AGENT_TOKEN=<random>; at the end
  the session's process group is killed and /proc is scanned for the token (stop, then
  kill). A process that clears or overwrites its environment and leaves the process group
  (`env -i setsid ...`) escapes it.

The token is set and swept under every mechanism. ENGINE_LOCAL_CONTAINMENT=pidns|marker
caps the choice at a weaker mechanism (the tests use it to cover each one).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError
from engine.proc import run
from engine.trust.reader import Untrusted, read_json

MECHANISMS = ("cgroup", "pidns", "marker")  # strongest first
TOKEN_VAR = "ENGINE_AGENT_TOKEN"
CAP_VAR = "ENGINE_LOCAL_CONTAINMENT"
RECORD = "containment.json"
INIT_FILE = "init.py"  # in the run dir, under `pidns`
_TOKEN = re.compile(r"[0-9a-f]{32}")
_KERNEL_W = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class Containment:
    mechanism: str
    token: str  # the value of ENGINE_AGENT_TOKEN in every process of this run
    cgroup: str = ""  # the agent's cgroup directory (mechanism cgroup)
    unshare: tuple[str, ...] = ()  # the namespace command prefix (mechanism pidns)

    def record(self, note: str = "") -> str:
        doc = {"mechanism": self.mechanism, "token": self.token, "cgroup": self.cgroup}
        return json.dumps({**doc, "note": note} if note else doc)


def choose(grove: str, agent: str, server_pid: int | None,
           delegate: tuple[int, int] | None = None) -> Containment:
    """The strongest containment this machine gives a new run of grove/agent (its cgroup,
    if any, is created here; with `delegate`, the (uid, gid) the agent runs as, that
    cgroup is delegated to it, so it may make cgroups of its own inside it)."""
    cap = os.environ.get(CAP_VAR) or MECHANISMS[0]
    if cap not in MECHANISMS:
        raise EngineError(f"{CAP_VAR}={cap!r}: must be one of {', '.join(MECHANISMS)}")
    allowed = MECHANISMS[MECHANISMS.index(cap):]
    token = secrets.token_hex(16)
    if "cgroup" in allowed:
        cg = _make_cgroup(_cgroup_name(grove, agent, token), server_pid)
        if cg is not None and delegate is not None:
            _delegate(cg, *delegate)
        if cg is not None:
            return Containment("cgroup", token, cgroup=str(cg))
    if "pidns" in allowed and _unshare_prefix():
        return Containment("pidns", token, unshare=_unshare_prefix())
    return Containment("marker", token)


def load(base: Path, grove: str, agent: str) -> Containment | None:
    """The containment recorded for grove/agent under `base` (.engine/run/<grove>), checked:
    the run dir is agent-writable, so a record that does not fit is not acted on."""
    try:
        doc = read_json(base, f"{agent}/{RECORD}", 4096)
    except Untrusted:
        return None
    if not isinstance(doc, dict):
        return None
    mech, token, cg = doc.get("mechanism"), doc.get("token"), doc.get("cgroup", "")
    if mech not in MECHANISMS or not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return None
    if mech == "cgroup" and not (isinstance(cg, str) and _cgroup_ok(cg, grove, agent, token)):
        return Containment("marker", token)  # the token sweep still applies
    return Containment(str(mech), token, cg if mech == "cgroup" else "")


def kill(c: Containment | None, pane_pids: Iterable[int] = ()) -> None:
    """End every process of one run: its tmux pane's process group, its cgroup, and
    whatever still carries its token."""
    for pid in pane_pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    if c is None:
        return
    if c.mechanism == "cgroup":
        _kill_cgroup(Path(c.cgroup))
    _sweep(c.token)


# -- the wrapper's part -----------------------------------------------------------------

INIT = """\
# grove-engine: pid 1 of the agent's PID namespace. Runs the harness, forwards termination
# signals, reaps orphans, exits with the harness's status; the kernel then kills every
# process left in the namespace.
import os, signal, sys
pid = os.fork()
if pid == 0:
    for s in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(s, signal.SIG_DFL)
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as e:
        sys.stderr.write(f"{sys.argv[1]}: {e.strerror}\\n")
        os._exit(127)
def forward(sig, frame):
    try:
        os.kill(pid, sig)
    except OSError:
        pass
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, forward)
for s in (signal.SIGINT, signal.SIGQUIT):  # the terminal sends these to the harness too
    signal.signal(s, signal.SIG_IGN)
while True:
    p, status = os.wait()
    if p == pid:
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status)
                 else 128 + os.WTERMSIG(status))
"""

_KILL_CGROUP = r"""kill_cgroup() {  # everything in the agent's cgroup, then the cgroup
  local i p k v
  if ! echo 1 > "$cg/cgroup.kill"; then  # kernels before 5.14: kill what is listed
    for i in 1 2 3 4 5 6 7 8 9 10; do
      while read -r p; do kill -KILL "$p"; done < "$cg/cgroup.procs"
    done
  fi
  for i in {1..100}; do
    while read -r k v; do [ "$k" = populated ] && break; done < "$cg/cgroup.events"
    [ "$v" = 0 ] && break
    sleep 0.05
  done
  find "$cg" -depth -type d -exec rmdir {} +  # with any cgroups nested in it
} 2>/dev/null"""

_REAP_MARKED = r"""reap_marked() {  # best effort: stop, then kill, what carries the token
  local e p v want="ENGINE_AGENT_TOKEN=$ENGINE_AGENT_TOKEN" stopped=" " more=1 n=0
  while [ -n "$more" ] && [ "$n" -lt 20 ]; do
    more="" n=$((n + 1))
    for e in /proc/[0-9]*/environ; do
      p=${e#/proc/} && p=${p%/environ}
      [[ $p == "$$" || $stopped == *" $p "* ]] && continue
      while IFS= read -r -d '' v; do
        [ "$v" = "$want" ] && kill -STOP "$p" && stopped+="$p " && more=1 && break
      done < "$e"
    done
  done
  for p in $stopped; do kill -KILL "$p"; done
} 2>/dev/null"""


def run_lines(c: Containment, argv: str, outer: str = "") -> list[str]:
    """Wrapper lines that run `argv` (a shell command line) contained and leave its exit
    status in $code; $rd is the run dir. `outer` (e.g. `timeout ...`) wraps it from
    outside the containment: the agent cannot reach it there."""
    q = shlex.quote
    pre = f"{outer} " if outer else ""
    if c.mechanism == "pidns":  # the timer inside: root's there, no cgroup is delegated
        ns = " ".join(q(x) for x in c.unshare)
        return [f'{ns} -- {q(sys.executable)} -I -S "$rd/{INIT_FILE}" {pre}{argv}',
                "code=$?"]
    if c.mechanism == "marker":
        return [f"{pre}{argv}", "code=$?"]
    fallback = Containment("marker", c.token).record("could not enter cgroup " + c.cgroup)
    enter = "bash -c 'echo $$ > \"$0\" && exec \"$@\"' \"$cg/cgroup.procs\""
    return [
        f"cg={q(c.cgroup)}",
        'if ( echo "$BASHPID" > "$cg/cgroup.procs" ) 2>/dev/null; then',
        f"  {pre}{enter} {argv}",
        "else",
        '  echo "engine: cannot enter cgroup $cg; containment falls back to marker" >&2',
        f'  echo {q(fallback)} > "$rd/{RECORD}"; rmdir "$cg"; cg=""',
        f"  {pre}{argv}",
        "fi",
        "code=$?",
    ]


def end_lines(c: Containment) -> list[str]:
    """Wrapper lines run after the harness ended, before its exit code is recorded: kill
    whatever it left behind, then say so (`reaped`)."""
    if c.mechanism == "pidns":
        return [': > "$rd/reaped"']  # the namespace ended with its init
    if c.mechanism == "marker":
        return [_REAP_MARKED, "reap_marked", ': > "$rd/reaped"']
    return [_KILL_CGROUP, _REAP_MARKED,
            'if [ -n "$cg" ]; then kill_cgroup; else reap_marked; fi', ': > "$rd/reaped"']


def last_lines(c: Containment) -> list[str]:
    """After the exit code is recorded: under `marker`, the session's process group too
    (the wrapper with it), for what cleared its environment without leaving the group."""
    if c.mechanism == "marker":
        return ["kill -KILL 0"]
    if c.mechanism == "cgroup":
        return ['[ -n "$cg" ] || kill -KILL 0']
    return []


# -- cgroup v2 ----------------------------------------------------------------------------

def _cgroup_name(grove: str, agent: str, token: str) -> str:
    return f"grove-engine_{grove}__{agent}_{token}"


def _cgroup2_mounts() -> list[tuple[str, str]]:
    """(root inside the hierarchy, mount point) of every cgroup2 mount this process sees."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            out.append((_unescape(fields[3]), _unescape(fields[4])))
    return out


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _cgroup_dir(pid: int | None) -> Path | None:
    """The cgroup v2 directory of `pid` (this process when None), when it is mounted."""
    try:
        text = Path(f"/proc/{pid or 'self'}/cgroup").read_text()
    except OSError:
        return None
    rel = next((ln[3:] for ln in text.splitlines() if ln.startswith("0::")), None)
    if rel is None or not rel.startswith("/") or rel.endswith(" (deleted)"):
        return None
    for root, mount in _cgroup2_mounts():
        if rel == root or rel.startswith(root.rstrip("/") + "/"):
            return Path(mount, rel[len(root):].lstrip("/"))
    return None


def _make_cgroup(name: str, server_pid: int | None) -> Path | None:
    """A new cgroup under the tmux server's (which forks the wrapper; ours when no server
    runs yet), or None when this user cannot create one and move processes into it."""
    parent = _cgroup_dir(server_pid)
    if parent is None:
        return None
    cg = parent / name
    try:
        cg.mkdir()
    except OSError:
        return None
    if all(os.access(d / "cgroup.procs", os.W_OK) for d in (parent, cg)):
        return cg
    with contextlib.suppress(OSError):
        cg.rmdir()
    return None


def _delegate(cg: Path, uid: int, gid: int) -> None:
    """cgroup v2 delegation: the directory and the files a delegatee writes are the
    agent's. cgroup.kill, which ends the run, stays the engine's."""
    for p in (cg, cg / "cgroup.procs", cg / "cgroup.threads", cg / "cgroup.subtree_control"):
        with contextlib.suppress(FileNotFoundError):
            os.chown(p, uid, gid, follow_symlinks=False)


def _cgroup_ok(cg: str, grove: str, agent: str, token: str) -> bool:
    """Whether a recorded path is this run's cgroup: on a cgroup2 mount, named for it."""
    return (os.path.isabs(cg) and os.path.normpath(cg) == cg
            and Path(cg).name == _cgroup_name(grove, agent, token)
            and any(cg.startswith(m.rstrip("/") + "/") for _, m in _cgroup2_mounts()))


def _kill_cgroup(cg: Path) -> None:
    if not cg.is_dir():
        return
    try:
        fd = os.open(cg / "cgroup.kill", _KERNEL_W)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
    except OSError:  # kernels before 5.14 have no cgroup.kill: kill what is listed
        for _ in range(10):
            for pid in _cgroup_pids(cg):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _populated(cg) and time.monotonic() < deadline:
        time.sleep(0.02)
    for d, _, _ in os.walk(cg, topdown=False):  # with any cgroups nested in it
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _cgroup_pids(cg: Path) -> list[int]:
    try:
        return [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _populated(cg: Path) -> bool:
    try:
        return "populated 1" in (cg / "cgroup.events").read_text()
    except OSError:
        return False


# -- PID namespace -------------------------------------------------------------------------

@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """The `unshare` options that give an agent its own PID namespace here; () if none do
    (no util-linux, no CAP_SYS_ADMIN and no user namespaces, or `--map-current-user`
    unknown to an older util-linux)."""
    if shutil.which("unshare") is None:
        return ()
    ns = ("--pid", "--fork", "--kill-child", "--mount-proc")
    tries: list[tuple[str, ...]] = [("unshare", *ns)] if os.geteuid() == 0 else []
    tries.append(("unshare", "--user", "--map-current-user", *ns))
    for prefix in tries:
        with contextlib.suppress(EngineError):
            if run([*prefix, "--", sys.executable, "-I", "-S", "-c", ""], check=False,
                   timeout=20).returncode == 0:
                return prefix
    return ()


# -- the token sweep ------------------------------------------------------------------------

def _sweep(token: str) -> None:
    """Stop every process whose environment carries `token` until no new one appears (so
    none can fork past the scan), then kill them all."""
    needle = f"\0{TOKEN_VAR}={token}\0".encode()
    stopped: set[int] = set()
    for _ in range(20):
        new = [p for p in _marked(needle) if p not in stopped]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
            stopped.add(pid)
    for pid in stopped:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _marked(needle: bytes) -> list[int]:
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read(1 << 20)
        except OSError:
            continue
        if needle in b"\0" + env + b"\0":
            out.append(int(name))
    return out
