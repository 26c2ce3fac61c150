"""The agent programs' host cache: `engine harness install NAME[@VERSION]` puts a pinned
agent CLI (Claude Code, Codex, Gemini CLI, OpenCode: npm packages) where the runtimes find it.

Called by `engine harness` (install, list, uninstall) and by the runtimes (`installed`,
`missing_message`): Docker mounts an install read-only at /opt/engine/harness, the local
runtime puts its `bin/` first on PATH. Images need no registry at build time this way.

Layout, under `cache_root()`:

    <name>/.lock                  flock: one install (or uninstall) of <name> at a time
    <name>/<version>/node_modules npm install --ignore-scripts of the catalogue's packages
    <name>/<version>/bin/         relative symlinks: <program>, and `node` for JavaScript CLIs
    <name>/<version>/install.json what was installed; its presence marks a complete install

Each install is built in `<name>/.<version>.tmp-<random>` and renamed into place whole, so a
version directory is either complete or absent. Everything is world-readable: agents run
as uid 1000 read what root installed. The catalogue is the `install:` entry of each built-in
harness (engine/harnesses/<name>.yaml). No install script of any package runs: where a
package's bin is a placeholder its postinstall would replace, the entry names the native
binary (`binary:`) and the engine links that.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import fsutil, harnesses
from engine.errors import EngineError

VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+([-.][0-9A-Za-z.]+)?\Z")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_NPM_TIMEOUT = 900.0  # seconds for one npm install
_VERSION_TIMEOUT = 60.0  # seconds for `<program> --version`
_HEARTBEAT = 20.0  # seconds between "still installing" lines


@dataclass(frozen=True)
class Installed:
    """A complete install: `bin_dir` goes first on PATH, `program` is the command in it."""

    name: str
    version: str
    root: Path
    bin_dir: Path
    program: str


@dataclass(frozen=True)
class Entry:
    """A catalogue entry (a built-in harness's `install:`)."""

    name: str
    packages: tuple[str, ...]
    version: str
    program: str
    node: str | None = None
    binary: tuple[str, ...] = ()

    def packages_for(self, version: str) -> list[str]:
        """The npm specs to install for `version`: packages pinned at the catalogue's
        version follow the one asked for (the platform packages move with the CLI)."""
        out = []
        for spec in self.packages:
            pkg, _, pinned = spec.rpartition("@")
            out.append(f"{pkg}@{version}" if pinned == self.version else spec)
        return out


def cache_root() -> Path:
    """$GROVE_ENGINE_CACHE/harnesses; as root /var/cache/grove-engine/harnesses; else
    ${XDG_CACHE_HOME:-~/.cache}/grove-engine/harnesses."""
    env = os.environ.get("GROVE_ENGINE_CACHE")
    if env:
        return Path(env).absolute() / "harnesses"
    if os.geteuid() == 0:
        return Path("/var/cache/grove-engine/harnesses")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "grove-engine" / "harnesses"


def names() -> list[str]:
    """The harnesses that have something to install."""
    return [n for n in harnesses.names() if (harnesses.spec(n) or {}).get("install")]


def entry(name: str) -> Entry:
    """The catalogue entry of `name`; EngineError (one line) for any other name."""
    spec = harnesses.spec(name) if _NAME_RE.match(name) else None
    if spec is None:
        known = names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise EngineError(f"unknown harness {name!r} ({hint}installable: {', '.join(known)})")
    data = spec.get("install")
    if not isinstance(data, dict) or not data.get("npm") or not data.get("version") \
            or not data.get("bin"):
        raise EngineError(f"harness {name} has nothing to install (installable: "
                          f"{', '.join(names())})")
    return Entry(name=name, packages=tuple(str(p) for p in data["npm"]),
                 version=str(data["version"]), program=str(data["bin"]),
                 node=str(data["node"]) if data.get("node") else None,
                 binary=tuple(str(b) for b in data.get("binary") or ()))


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise EngineError(f"bad version {version!r}: expected MAJOR.MINOR.PATCH, e.g. 1.2.3 "
                          f"or 1.2.3-beta.1")
    return version


def installed(name: str, version: str | None = None) -> Installed | None:
    """The complete install of `name` at `version` (default: the catalogue's), or None."""
    if not _NAME_RE.match(name):
        return None
    if version is None:
        spec = harnesses.spec(name) or {}
        version = str((spec.get("install") or {}).get("version") or "")
    if not VERSION_RE.match(version):
        return None
    root = cache_root() / name / version
    if os.geteuid() == 0 and not _root_only(root):
        return None  # a tree another user could change is never run, mounted or trusted
    try:
        info = json.loads((root / "install.json").read_text())
    except (OSError, ValueError):
        return None
    program = info.get("bin") if isinstance(info, dict) else None
    if not isinstance(program, str) or not program or "/" in program:
        return None
    return Installed(name=name, version=version, root=root, bin_dir=root / "bin",
                     program=program)


def _root_only(path: Path) -> bool:
    """Whether `path` and every directory above it are root's and writable by no one else
    (a world-writable directory counts when it is sticky, like /tmp, and root owns what is
    below it): as root, nothing from the cache may be run or mounted that another user
    could have put there."""
    for d in [path, *path.parents]:
        try:
            st = os.lstat(d)
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(d)
            except OSError:
                return False
        if st.st_uid != 0:
            return False
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return False
    return True


def versions(name: str) -> list[Installed]:
    """Every complete install of `name` in the cache, oldest version first."""
    out = []
    with contextlib.suppress(OSError):
        for d in (cache_root() / name).iterdir():
            if VERSION_RE.match(d.name) and (got := installed(name, d.name)):
                out.append(got)
    return sorted(out, key=lambda i: _version_key(i.version))


def missing_message(name: str, version: str | None = None) -> str:
    """What to tell the user when an agent needs `name` and the cache does not have it."""
    pinned = (harnesses.spec(name) or {}).get("install") or {}
    what = f"{name}@{version}" if version and version != pinned.get("version") else name
    return (f"harness {what} is not installed: run `engine harness install {what}` "
            f"(or use an image that has it)")


def install(name: str, version: str | None, echo: Callable[[str], None]) -> Installed:
    """Install `name` at `version` (default: the catalogue's) unless it is there already.
    Atomic and safe to run concurrently; progress goes to `echo`."""
    e = entry(name)
    version = check_version(version if version is not None else e.version)
    have = installed(name, version)
    if have:
        echo(f"{name} {version} is already installed at {have.root}")
        return have
    npm = shutil.which("npm")
    if npm is None:
        raise EngineError("npm not found: installing a harness needs npm (Node.js), e.g. "
                          "apt-get install npm")
    home = cache_root() / name
    lock = home / ".lock"
    try:
        _makedirs(home)
        with fsutil.flock(lock, blocking=False) as got:
            if got:
                return _install_locked(e, version, npm, echo)
        echo(f"waiting for another install of {name} to finish ({lock})")
        with fsutil.flock(lock):
            return _install_locked(e, version, npm, echo)
    except OSError as err:
        raise EngineError(f"harness cache {err.filename or home}: {err.strerror} (set "
                          f"GROVE_ENGINE_CACHE to a directory you can write)") from None


def uninstall(name: str, version: str | None) -> bool:
    """Remove one install; False when it was not there."""
    e = entry(name)
    version = check_version(version if version is not None else e.version)
    home = cache_root() / name
    if not (home / version).exists():
        return False
    try:
        with fsutil.flock(home / ".lock"):
            if not (home / version).exists():
                return False
            gone = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-rm-", dir=home))
            os.rename(home / version, gone / "v")
            shutil.rmtree(gone, ignore_errors=True)
    except OSError as err:
        raise EngineError(f"harness cache {err.filename or home}: {err.strerror}") from None
    return True


def describe(name: str) -> dict[str, Any]:
    """`harness list --json` entry of `name`."""
    e = entry(name)
    rows = []
    for i in versions(name):
        info = _read_info(i.root)
        rows.append({"version": i.version, "path": str(i.root), "bin": str(i.bin_dir),
                     "node": info.get("node"), "installedAt": info.get("installedAt")})
    return {"name": name, "program": e.program, "pinned": e.version,
            "packages": list(e.packages), "node": e.node, "installed": rows}


# --- the install itself (holding <name>/.lock) ------------------------------------------


def _install_locked(e: Entry, version: str, npm: str, echo: Callable[[str], None]) -> Installed:
    have = installed(e.name, version)
    if have:  # another engine installed it while this one waited
        echo(f"{e.name} {version} is already installed at {have.root}")
        return have
    home = cache_root() / e.name
    final = home / version
    for stale in home.glob(".*.tmp-*"):  # left by a killed install; the lock is ours
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # no install.json: never complete
        shutil.rmtree(final)
    os_name, arch = _platform()
    packages = e.packages_for(version)
    node_pkg = f"node-{os_name}-{arch}"
    extra = [f"{node_pkg}@{e.node}"] if e.node else []
    more = f" (+ {', '.join(extra)})" if extra else ""
    echo(f"installing {packages[0]}{_plus(packages[1:])}{more} with npm into {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=home))
    try:
        _npm_install(npm, tmp, packages + extra, echo)
        program = tmp / "bin" / e.program
        (tmp / "bin").mkdir()
        node_version = None
        if e.node:
            node_version = _package_version(tmp, node_pkg)
            _link(tmp, f"node_modules/{node_pkg}/bin/node", "node")
        env = _version_env(e.name)
        if e.binary:
            target, said = _pick_binary(e, tmp, os_name, arch, env)
        else:
            target = _bin_target(tmp, packages[0], e.program)
            _link(tmp, target, e.program)
            said = _run_version(program, tmp / "bin", env)
        _normalize_modes(tmp)
        info = {"name": e.name, "version": version, "packages": packages + extra,
                "node": node_version, "bin": e.program, "target": target,
                "installedAt": datetime.datetime.now(datetime.UTC)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "checked": e.version}
        fsutil.atomic_write(tmp / "install.json",
                            (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        os.rename(tmp, final)
        fsutil.fsync_dir(home)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"{e.program} --version: {said}")
    echo(f"installed {e.name} {version} at {final}  (bin: {final / 'bin' / e.program})")
    got = installed(e.name, version)
    assert got is not None
    return got


def _plus(rest: list[str]) -> str:
    return f" (+{len(rest)} package{'s' if len(rest) != 1 else ''})" if rest else ""


def _platform() -> tuple[str, str]:
    """node's names of this OS and CPU (linux/darwin, x64/arm64)."""
    os_name = {"linux": "linux", "darwin": "darwin"}.get(sys.platform)
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64",
            "arm64": "arm64"}.get(platform.machine().lower())
    if os_name is None or arch is None:
        raise EngineError(f"harness install: unsupported platform {sys.platform} "
                          f"{platform.machine()} (linux or darwin, x86_64 or arm64)")
    return os_name, arch


def _npm_install(npm: str, prefix: Path, packages: list[str],
                 echo: Callable[[str], None]) -> None:
    cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--no-save",
           "--omit=dev", "--ignore-scripts", "--loglevel=error",
           "--", *packages]
    env = dict(os.environ, npm_config_update_notifier="false")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=prefix, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", umask=0o022, start_new_session=True)
    except OSError as err:
        raise EngineError(f"npm: cannot run {npm}: {err.strerror}") from None
    with _reaped(proc):
        while True:
            try:
                out, err_text = proc.communicate(timeout=_HEARTBEAT)
                break
            except subprocess.TimeoutExpired:
                waited = time.monotonic() - started
                if waited > _NPM_TIMEOUT:
                    raise EngineError(f"npm install timed out after {int(waited)}s") from None
                echo(f"  ... npm still installing ({int(waited)}s)")
    if proc.returncode != 0:
        raise EngineError(f"npm install {packages[0]} failed: "
                          f"{npm_error(err_text + out, proc.returncode)}")


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Kill npm (its whole session: npm starts children) if anything interrupts the wait."""
    try:
        yield
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, 9)
            proc.wait()


_NPM_NOISE = ("A complete log of this run", "In most cases you or one of your dependencies",
              "Note that you can also install from", "tarball, folder, http url",
              "If you are behind a proxy", "npm help config", "Log files were not written",
              "You can rerun the command with")


def npm_error(output: str, code: int) -> str:
    """The one line of npm's error output that says what went wrong."""
    lines = []
    code_name = ""
    for raw in output.splitlines():
        m = re.match(r"^npm (?:error|ERR!) ?(.*)$", raw.rstrip())
        if not m:
            continue
        text = m.group(1)
        if text.startswith((" ", "\t")) or text in ("{", "}"):
            continue  # stack frames and the error object's fields
        if c := re.match(r"^code (\S+)$", text):
            code_name = c.group(1)
            continue
        if re.match(r"^(syscall|errno|path|dest|signal|command|cwd) ", text):
            continue
        text = re.sub(r"^(notarget|404|network|enoent|code E\w+)\s+", "", text).strip()
        if text and text != "404" and not any(n in text for n in _NPM_NOISE):
            lines.append(text)
    if not lines:
        rest = [ln.strip() for ln in output.splitlines() if ln.strip()]
        lines = rest[-1:] or [f"exit {code}"]
    line = lines[-1]
    if code_name and code_name not in line:
        line = f"{line} ({code_name})"
    return line if len(line) <= 400 else line[:397] + "..."


def _package_version(prefix: Path, package: str) -> str:
    data = json.loads((prefix / "node_modules" / package / "package.json").read_text())
    return str(data["version"])


def _bin_target(prefix: Path, package_spec: str, program: str) -> str:
    """The file the package's package.json `bin` names for `program`, relative to `prefix`."""
    package = package_spec.rpartition("@")[0]
    pdir = Path("node_modules") / package
    try:
        data = json.loads((prefix / pdir / "package.json").read_text())
    except (OSError, ValueError) as err:
        raise EngineError(f"npm installed no readable {package}/package.json: {err}") from None
    bins = data.get("bin")
    if isinstance(bins, str):
        bins = {package.rpartition("/")[2]: bins}
    rel = bins.get(program) if isinstance(bins, dict) else None
    if not isinstance(rel, str):
        raise EngineError(f"{package} has no program {program} (its bin: {sorted(bins or {})})")
    target = os.path.normpath(pdir / rel)
    if target.startswith("..") or os.path.isabs(target):
        raise EngineError(f"{package}: bin {program} points outside the package: {rel}")
    return target


def _link(prefix: Path, target: str, name: str) -> None:
    """bin/<name> -> ../<target>, relative so the tree works mounted anywhere."""
    link = prefix / "bin" / name
    if not (prefix / target).is_file():
        raise EngineError(f"npm installed no {target}")
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(Path("..") / target)
    os.chmod(prefix / target, 0o755)


def _pick_binary(e: Entry, prefix: Path, os_name: str, arch: str,
                 env: dict[str, str]) -> tuple[str, str]:
    """The first `binary:` candidate that exists and answers --version: (target, output)."""
    failures = []
    for pattern in e.binary:
        rel = "node_modules/" + pattern.replace("{os}", os_name).replace("{arch}", arch)
        if not (prefix / rel).is_file():
            continue
        _link(prefix, rel, e.program)
        try:
            return rel, _run_version(prefix / "bin" / e.program, prefix / "bin", env)
        except EngineError as err:
            failures.append(err.summary)
    if failures:
        raise EngineError(failures[-1])
    raise EngineError(f"npm installed no native {e.program} for {os_name}-{arch} "
                      f"(looked for {', '.join(e.binary)})")


def _version_env(name: str) -> dict[str, str]:
    env = {k: str(v) for k, v in ((harnesses.spec(name) or {}).get("env") or {}).items()}
    for k in ("LANG", "TZ"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def _run_version(program: Path, bin_dir: Path, env: dict[str, str]) -> str:
    """Run `program --version` (its bin dir first on PATH, a scratch HOME so it writes
    nothing of the user's) and return the last line it printed."""
    with tempfile.TemporaryDirectory(prefix="engine-harness-home-") as home:
        full = dict(env, HOME=home, PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
                    TERM="dumb", NO_COLOR="1", CI="1")
        try:
            proc = subprocess.run([str(program), "--version"], env=full, cwd=home,
                                  capture_output=True, text=True, errors="replace",
                                  timeout=_VERSION_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise EngineError(f"{program.name} --version did not answer within "
                              f"{int(_VERSION_TIMEOUT)}s") from None
        except OSError as err:
            raise EngineError(f"{program.name} --version: {err.strerror}") from None
    said = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not said:
        why = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise EngineError(f"the installed {program.name} does not run: --version exited "
                          f"{proc.returncode}: {(why or ['no output'])[-1][:300]}")
    return said[-1][:200]


def _normalize_modes(root: Path) -> None:
    """Directories 0755, files 0644 (0755 if executable by anyone), symlinks untouched."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if st.st_mode & 0o111 else 0o644)


def _makedirs(path: Path) -> None:
    """mkdir -p with 0755 for each directory it creates, whatever the umask."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            os.chmod(d, 0o755)


def _read_info(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / "install.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _version_key(v: str) -> tuple[tuple[int, ...], str]:
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)(.*)$", v)
    if not m:
        return ((), v)
    # a release sorts after its pre-releases (1.0.0-rc.1 < 1.0.0)
    return ((int(m[1]), int(m[2]), int(m[3]), 0 if m[4] else 1), m[4])
