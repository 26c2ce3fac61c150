"""Trust boundary, git: the one way the engine runs git.

Called by every stage that touches a repository (workspaces, archive, review, revisions,
history, write-back, the Kubernetes push). Built on GitPython: its `Git` command object
runs each call with the hardened environment below; `repository()` is the GitPython
`Repo` of the trusted repository. Returns git's output; a failure is `GitFailed`.

Hardened, whatever uid the engine runs as:
- no system or global configuration (`GIT_CONFIG_NOSYSTEM`, `GIT_CONFIG_GLOBAL=/dev/null`),
  except for `remote=True` calls on the trusted repository (a push uses the user's own
  credential helper and ssh settings);
- `core.fsmonitor`, hooks, pagers, editors, credential helpers and external diff off;
  filter and diff drivers exist only where the trusted configuration defines them;
- transports limited to file, https/http, ssh and git (no `ext::`, no `fd::`), objects
  received are fsck-checked, submodules never recursed into (every `status` also says
  `--ignore-submodules=all`: a `.gitmodules` cannot turn that back on, and git never runs
  inside a nested repository whose configuration an agent wrote);
- git's ownership check (`safe.directory`) is kept as it is;
- stray `GIT_*` variables of the engine's own environment (GIT_DIR, GIT_INDEX_FILE...)
  never reach a call: each call says exactly which repository, work tree and index it uses.

Agent repositories are never the repository of a call: the exchange reads them as data
(`engine.trust.exchange`).
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError

if TYPE_CHECKING:
    import git as gitpython

HARDENED = (
    ("core.fsmonitor", "false"), ("core.hooksPath", "/dev/null"), ("core.pager", "cat"),
    ("core.editor", "false"), ("sequence.editor", "false"), ("core.askPass", ""),
    ("core.alternateRefsCommand", ""), ("core.untrackedCache", "false"),
    ("diff.external", ""), ("diff.noprefix", "false"), ("color.ui", "false"),
    ("protocol.allow", "never"), ("protocol.file.allow", "always"),
    ("protocol.https.allow", "always"), ("protocol.http.allow", "always"),
    ("protocol.ssh.allow", "always"), ("protocol.git.allow", "always"),
    ("transfer.fsckObjects", "true"), ("fetch.recurseSubmodules", "false"),
    ("submodule.recurse", "false"), ("diff.ignoreSubmodules", "all"),
    ("status.submoduleSummary", "false"), ("gc.auto", "0"), ("maintenance.auto", "false"),
    ("safe.bareRepository", "explicit"), ("advice.detachedHead", "false"),
    ("init.defaultBranch", "main"), ("commit.gpgSign", "false"), ("tag.gpgSign", "false"),
)
# GIT_* variables a call may inherit from the engine's environment: who the engine is and
# how it reaches remotes. Everything else named GIT_* is dropped.
_INHERIT = frozenset({"GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                      "GIT_COMMITTER_EMAIL", "GIT_SSH", "GIT_SSH_COMMAND",
                      "GIT_SSH_VARIANT", "GIT_TERMINAL_PROMPT", "GIT_ASKPASS"})
_IDENTITY = {"GIT_AUTHOR_NAME": "grove-engine", "GIT_AUTHOR_EMAIL": "engine@localhost",
             "GIT_COMMITTER_NAME": "grove-engine", "GIT_COMMITTER_EMAIL": "engine@localhost"}


class GitFailed(EngineError):
    """A git call exited non-zero; the summary is git's last line of error output."""

    def __init__(self, args: Sequence[str], code: int, stderr: str) -> None:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        super().__init__(f"git {args[0] if args else ''}: "
                         f"{lines[-1] if lines else f'exit {code}'}", stderr.strip())
        self.code = code
        self.stderr = stderr


class Result:
    """What one call returned: exit code, stdout, stderr (bytes)."""

    def __init__(self, code: int, out: bytes, err: bytes) -> None:
        self.returncode = code
        self.out = out
        self.err = err

    @property
    def stdout(self) -> str:
        return self.out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")


def _scrub() -> None:
    """Drop the engine process's own GIT_* variables: GitPython starts every call from
    os.environ, and a GIT_DIR or GIT_INDEX_FILE there would redirect it."""
    for key in [k for k in os.environ if k.startswith("GIT_") and k not in _INHERIT]:
        del os.environ[key]


def environment(remote: bool = False, extra: Mapping[str, str] | None = None
                ) -> dict[str, str]:
    """The variables every call runs with (on top of the scrubbed process environment)."""
    items = [kv for kv in HARDENED if not (remote and kv[0] == "core.askPass")]
    env = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_COUNT": str(len(items)), "LC_ALL": "C", "LANGUAGE": "C"}
    if not remote:
        env["GIT_CONFIG_GLOBAL"] = os.devnull
        env.update({k: os.environ.get(k, v) for k, v in _IDENTITY.items()})
    for i, (k, v) in enumerate(items):
        env[f"GIT_CONFIG_KEY_{i}"] = k
        env[f"GIT_CONFIG_VALUE_{i}"] = v
    env.update(extra or {})
    return env


@functools.lru_cache(maxsize=32)
def _command(cwd: str) -> Any:
    _scrub()
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    from git.cmd import Git  # GitPython is imported on first use: most commands never run git

    return Git(cwd)


def call(cwd: Path, *args: str, input: bytes | str | None = None,
         env: Mapping[str, str] | None = None, timeout: float | None = 120,
         remote: bool = False, pass_fds: Sequence[int] = ()) -> Result:
    """Run `git args...` in `cwd`, hardened; never raises for a non-zero exit."""
    cmd = _command(str(cwd))
    data = input.encode() if isinstance(input, str) else input
    try:
        auto = cmd.execute(["git", *args], istream=subprocess.PIPE, as_process=True,
                           env=environment(remote, env), pass_fds=tuple(pass_fds))
    except Exception as e:  # GitCommandNotFound and OSError alike
        raise EngineError(f"git: cannot run ({e.__class__.__name__}: is git installed?)"
                          ) from None
    proc = auto.proc
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise EngineError(f"git {args[0] if args else ''}: timed out after {timeout}s"
                          ) from None
    return Result(proc.returncode, out or b"", err or b"")


def run(cwd: Path, *args: str, check: bool = True, input: bytes | str | None = None,
        env: Mapping[str, str] | None = None, timeout: float | None = 120,
        remote: bool = False) -> str:
    """git's stdout (stripped); a non-zero exit raises GitFailed unless `check` is off
    (then whatever git printed, usually "")."""
    r = call(cwd, *args, input=input, env=env, timeout=timeout, remote=remote)
    if r.returncode != 0 and check:
        raise GitFailed(args, r.returncode, r.stderr)
    return r.stdout.strip()


def ok(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether `git args...` exits 0 (rev-parse --verify, merge-base --is-ancestor...)."""
    return call(cwd, *args, env=env).returncode == 0


def raw(cwd: Path, *args: str, input: bytes | None = None) -> bytes:
    """git's stdout as bytes (trees, -z listings, cat-file); raises GitFailed."""
    r = call(cwd, *args, input=input)
    if r.returncode != 0:
        raise GitFailed(args, r.returncode, r.stderr)
    return r.out


def popen(cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    """A long-running hardened git (cat-file --batch) with pipes for stdin and stdout."""
    cmd = _command(str(cwd))
    auto = cmd.execute(["git", *args], istream=subprocess.PIPE, as_process=True,
                       env=environment())
    proc: subprocess.Popen[bytes] = auto.proc
    proc.engine_keep = auto  # type: ignore[attr-defined]  # its finalizer kills the process
    return proc


def repository(root: Path) -> gitpython.Repo:
    """GitPython's Repo of the trusted repository (never of an agent's). Reading it runs
    nothing: GitPython parses the configuration and the `.git` pointer itself."""
    _scrub()
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import git as gitpython_mod

    return gitpython_mod.Repo(root)


def raw_env(cwd: Path, env: Mapping[str, str], *args: str) -> bytes:
    """Like `raw`, with extra variables (the exchange's shadow repository)."""
    r = call(cwd, *args, env=env)
    if r.returncode != 0:
        raise GitFailed(args, r.returncode, r.stderr)
    return r.out
