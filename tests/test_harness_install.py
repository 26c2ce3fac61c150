"""`engine harness install|list|uninstall` and engine.harness_install, with real npm and
real installs from the npm registry (no fakes).

Installs take seconds to minutes, so they are few: one fresh install of Gemini CLI (a
JavaScript CLI with its own Node) by two engines at once, then reused; one failing npm run;
and the shared persistent cache (`harness_program`, below) that other test files can use
too. npm's download cache sits in the persistent cache as well, so a repeated run fetches
only metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import harness_install
from engine.harness_install import Installed
from tests.conftest import npm_env

ROOT = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------------------------------------


needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache for this test (removed after: installs are hundreds of MB)."""
    cache = tmp_path / "cache"
    npm_env(monkeypatch, cache)
    yield cache / "harnesses"
    shutil.rmtree(cache, ignore_errors=True)


def _engine_proc(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT,
                            env=env or dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _tree_is_world_readable(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            if not p.is_symlink():
                assert stat.S_IMODE(p.stat().st_mode) == 0o755, p
        for f in filenames:
            p = Path(dirpath, f)
            if p.is_symlink():
                target = os.readlink(p)
                assert not os.path.isabs(target), (p, target)
                assert p.resolve().is_relative_to(root.resolve()), (p, target)
                continue
            assert stat.S_IMODE(p.lstat().st_mode) in (0o644, 0o755), p


def _as_uid_1000(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                           "env", "-i", *(f"{k}={v}" for k, v in env.items()), *cmd],
                          capture_output=True, text=True, timeout=60, cwd="/")


# --- fast: the catalogue, the cache's rules, bad input --------------------------------------


def test_catalogue_entries() -> None:
    assert harness_install.names() == ["claude", "codex", "gemini", "opencode"]
    for name in harness_install.names():
        e = harness_install.entry(name)
        assert e.packages[0].endswith(f"@{e.version}") and e.program == name
        # a JavaScript CLI brings its Node; a native one needs none
        assert (e.node is None) == bool(e.binary), name
    e = harness_install.entry("claude")
    assert e.packages_for("2.1.300") == ["@anthropic-ai/claude-code@2.1.300"]
    other = harness_install.Entry("x", ("@a/x@1.0.0", "@a/x-linux-x64@1.0.0", "y@3.0.0"),
                                  "1.0.0", "x")
    assert other.packages_for("1.2.0-beta.1") == ["@a/x@1.2.0-beta.1",
                                                  "@a/x-linux-x64@1.2.0-beta.1", "y@3.0.0"]


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GROVE_ENGINE_CACHE", str(tmp_path / "c"))
    assert harness_install.cache_root() == tmp_path / "c" / "harnesses"
    monkeypatch.delenv("GROVE_ENGINE_CACHE")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert harness_install.cache_root() == Path("/var/cache/grove-engine/harnesses")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert harness_install.cache_root() == tmp_path / "xdg" / "grove-engine" / "harnesses"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert harness_install.cache_root() == Path.home() / ".cache/grove-engine/harnesses"


def test_installed_needs_install_json(fresh_cache: Path) -> None:
    assert harness_install.installed("codex") is None
    v = fresh_cache / "codex" / "0.169.0"
    (v / "bin").mkdir(parents=True)
    assert harness_install.installed("codex") is None  # incomplete: no install.json
    (v / "install.json").write_text(json.dumps({"name": "codex", "bin": "codex"}))
    got = harness_install.installed("codex")
    assert got == Installed("codex", "0.169.0", v, v / "bin", "codex")
    assert harness_install.installed("codex", "0.169.0") == got
    for name, version in [("codex", "../0.169.0"), ("codex", "0.169"), ("../codex", None),
                          ("nope", None), ("shell", None)]:
        assert harness_install.installed(name, version) is None
    assert harness_install.missing_message("claude") == (
        "harness claude is not installed: run `engine harness install claude` (or use an "
        "image that has it)")
    assert "`engine harness install claude@2.1.1`" in harness_install.missing_message(
        "claude", "2.1.1")


@pytest.mark.parametrize("arg,message", [
    ("claud", "unknown harness 'claud' (did you mean claude? installable: claude, codex, "
              "gemini, opencode)"),
    ("nope", "unknown harness 'nope' (installable: claude, codex, gemini, opencode)"),
    ("../claude", "unknown harness '../claude'"),
    ("shell", "harness shell has nothing to install"),
    ("claude@1.2", "bad version '1.2'"),
    ("claude@", "bad version ''"),
    ("claude@1.2.3;touch /tmp/x", "bad version '1.2.3;touch /tmp/x'"),
    ("claude@--registry=http://x", "bad version '--registry=http://x'"),
    ("codex@1.0.0 2.0.0", "bad version"),
])
def test_bad_input_is_one_line(arg: str, message: str, engine, fresh_cache: Path) -> None:
    res = engine("harness", "install", arg)
    assert res.code == 1, res
    assert res.err.startswith(f"error: {message}") and res.err.count("\n") == 1, res.err
    assert "Traceback" not in res.err
    assert not fresh_cache.exists() or not any(fresh_cache.glob("*/*"))


def test_every_argument_is_checked_before_installing(engine, fresh_cache: Path) -> None:
    res = engine("harness", "install", "gemini", "nope")
    assert res.code == 1 and "unknown harness 'nope'" in res.err
    assert not fresh_cache.exists()


def test_without_npm(engine, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch,
                     tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = engine("harness", "install", "codex")
    assert res.code == 1
    assert res.err == "error: npm not found: installing a harness needs npm (Node.js), e.g. " \
                      "apt-get install npm\n"


def test_npm_error_line() -> None:
    etarget = """npm error code ETARGET
npm error notarget No matching version found for @openai/codex@0.0.0-nope.
npm error notarget In most cases you or one of your dependencies are requesting a package \
version that doesn't exist.
npm error A complete log of this run can be found in: /root/.npm/_logs/x-debug-0.log
"""
    assert harness_install.npm_error(etarget, 1) == \
        "No matching version found for @openai/codex@0.0.0-nope. (ETARGET)"
    e404 = """npm error code E404
npm error 404 Not Found - GET https://registry.npmjs.org/@openai%2fcodex-nonexist-zz
npm error 404
npm error 404  The requested resource '@openai/codex-nonexist-zz@1.0.0' could not be found \
or you do not have permission to access it.
npm error 404
npm error 404 Note that you can also install from a
npm error 404 tarball, folder, http url, or git url.
npm error A complete log of this run can be found in: /root/.npm/_logs/x-debug-0.log
"""
    assert harness_install.npm_error(e404, 1) == (
        "The requested resource '@openai/codex-nonexist-zz@1.0.0' could not be found or you "
        "do not have permission to access it. (E404)")
    refused = """npm error code ECONNREFUSED
npm error syscall connect
npm error errno ECONNREFUSED
npm error FetchError: request to http://127.0.0.1:9/@openai%2fcodex failed, reason: connect \
ECONNREFUSED 127.0.0.1:9
npm error     at ClientRequest.<anonymous> (/usr/lib/node_modules/npm/index.js:130:14)
npm error   code: 'ECONNREFUSED',
npm error }
npm error
npm error If you are behind a proxy, please make sure that the 'proxy' config is set properly.
npm error A complete log of this run can be found in: /root/.npm/_logs/x-debug-0.log
"""
    assert harness_install.npm_error(refused, 1) == (
        "FetchError: request to http://127.0.0.1:9/@openai%2fcodex failed, reason: connect "
        "ECONNREFUSED 127.0.0.1:9")
    assert harness_install.npm_error("", 7) == "exit 7"
    assert harness_install.npm_error("something odd\n", 7) == "something odd"


def test_list_with_nothing_installed(engine, fresh_cache: Path) -> None:
    res = engine("harness", "list", "--json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["apiVersion"] == "engine/v1alpha1" and doc["kind"] == "HarnessList"
    assert doc["formatVersion"] == 1 and doc["cache"] == str(fresh_cache)
    assert [h["name"] for h in doc["harnesses"]] == ["claude", "codex", "gemini", "opencode"]
    assert all(h["installed"] == [] for h in doc["harnesses"])
    gemini = doc["harnesses"][2]
    assert gemini["pinned"] == "0.61.0" and gemini["program"] == "gemini"
    assert gemini["node"] and gemini["packages"] == ["@google/gemini-cli@0.61.0"]
    res = engine("harness", "list")
    lines = res.out.splitlines()
    assert lines[0].split() == ["NAME", "PROGRAM", "PINNED", "INSTALLED"]
    assert lines[1].split() == ["claude", "claude", "2.1.328", "-"]
    assert lines[-1] == f"cache: {fresh_cache}"


# --- real npm ----------------------------------------------------------------------------


@needs_npm
def test_failing_npm_leaves_nothing(engine, fresh_cache: Path) -> None:
    res = engine("harness", "install", "codex@0.0.0-nope")
    assert res.code == 1, res
    assert res.err.splitlines()[-1] == ("error: npm install @openai/codex@0.0.0-nope failed: "
                                        "No matching version found for "
                                        "@openai/codex@0.0.0-nope. (ETARGET)")
    assert res.err.startswith("installing @openai/codex@0.0.0-nope (+ node-linux-")
    assert sorted(p.name for p in (fresh_cache / "codex").iterdir()) == [".lock"]
    assert harness_install.installed("codex", "0.0.0-nope") is None


@needs_npm
@pytest.mark.slow
def test_fresh_install_twice_at_once_then_reused(engine, fresh_cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    home = fresh_cache / "gemini"
    # what a killed install leaves: a temporary tree and a version dir without install.json
    (home / ".0.61.0.tmp-killed" / "node_modules").mkdir(parents=True)
    (home / "0.61.0" / "node_modules").mkdir(parents=True)
    procs = [_engine_proc("harness", "install", "gemini") for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = "".join(err for _, err in outs)
    print(said)
    v = home / "0.61.0"
    assert said.count("installing @google/gemini-cli@0.61.0 (+ node-linux-") == 1, said
    assert said.count(f"installed gemini 0.61.0 at {v}  (bin: {v}/bin/gemini)") == 1, said
    assert said.count(f"gemini 0.61.0 is already installed at {v}") == 1, said
    assert "gemini --version: 0.61.0" in said
    assert sorted(p.name for p in home.iterdir()) == [".lock", "0.61.0"]

    got = harness_install.installed("gemini")
    assert got == Installed("gemini", "0.61.0", v, v / "bin", "gemini")
    info = json.loads((v / "install.json").read_text())
    node = info["node"]
    assert info["name"] == "gemini" and info["version"] == "0.61.0" and info["bin"] == "gemini"
    assert info["checked"] == "0.61.0" and info["installedAt"].endswith("Z")
    node_pkg = "node-{}-{}".format(*harness_install._platform())
    assert info["packages"] == ["@google/gemini-cli@0.61.0", f"{node_pkg}@{node}"]
    assert sorted(os.listdir(v / "bin")) == ["gemini", "node"]
    _tree_is_world_readable(v)

    # the CLI's `#!/usr/bin/env node` finds the installed Node through PATH (bin/ only:
    # the host's own node, if any, is not on it)
    env = {"PATH": str(v / "bin"), "HOME": str(fresh_cache.parent)}
    run = subprocess.run([str(v / "bin/gemini"), "--version"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "0.61.0", run
    run = subprocess.run(["node", "-p", "process.version + ' ' + process.execPath"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == [f"v{node}",
                                  str(v / f"node_modules/{node_pkg}/bin/node")], run

    # idempotent: reused as it is
    before = (v / "install.json").stat().st_mtime_ns
    res = engine("harness", "install", "gemini@0.61.0")
    assert res.code == 0 and res.err == f"gemini 0.61.0 is already installed at {v}\n", res
    assert (v / "install.json").stat().st_mtime_ns == before

    doc = json.loads(engine("harness", "list", "--json").out)
    (gemini,) = [h for h in doc["harnesses"] if h["name"] == "gemini"]
    assert gemini["installed"] == [{"version": "0.61.0", "path": str(v), "bin": str(v / "bin"),
                                    "node": node, "installedAt": info["installedAt"]}]
    assert "0.61.0" in engine("harness", "list").out.splitlines()[3]

    res = engine("harness", "uninstall", "gemini")
    assert res.code == 0 and res.out == "removed gemini 0.61.0\n"
    assert harness_install.installed("gemini") is None
    assert sorted(p.name for p in home.iterdir()) == [".lock"]


@needs_npm
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="runs the program as uid 1000: needs root and setpriv")
def test_shared_install_runs_as_another_user(harness_program: Callable[..., Installed],
                                             shared_harness_cache: Path) -> None:
    # a native binary (no Node) from the cache shared with other test files
    got = harness_program("claude")
    assert got.root == shared_harness_cache / "claude" / got.version
    assert harness_install.installed("claude") == got
    _tree_is_world_readable(got.root)
    assert os.readlink(got.bin_dir / "claude") == \
        "../node_modules/@anthropic-ai/claude-code-linux-x64/claude"
    home = Path(tempfile.mkdtemp(prefix="engine-test-uid1000-"))
    try:
        os.chown(home, 1000, 1000)
        res = _as_uid_1000([str(got.bin_dir / "claude"), "--version"],
                           {"PATH": f"{got.bin_dir}:/usr/bin:/bin", "HOME": str(home),
                            "DISABLE_AUTOUPDATER": "1"})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert res.returncode == 0 and res.stdout.startswith(f"{got.version} "), res


@needs_npm
def test_unusable_cache_is_one_line(engine, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GROVE_ENGINE_CACHE", str(tmp_path / "file" / "cache"))
    res = engine("harness", "install", "codex")
    assert res.code == 1 and res.err.count("\n") == 1, res
    assert res.err.startswith(f"error: harness cache {tmp_path / 'file'}"), res
    assert "Not a directory (set GROVE_ENGINE_CACHE to a directory you can write)" in res.err
