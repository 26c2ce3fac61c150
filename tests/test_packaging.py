"""Packaging: grove-engine is on no package index, so every documented install names a clone
or a git URL; the wheel carries the license, classifiers and project URLs; a git URL at a
tag installs for real; the CHANGELOG has a section for the version being released.

The build tests run pip in a fresh virtual environment with hatchling (the build backend)
installed the way pip is configured on the machine, then build and install with
`--no-build-isolation --no-deps`: nothing else is fetched.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

import engine
from tests.conftest import ROOT, git

# `pip install ...` (also `"$VENV/bin/pip" install`, `python -m pip install`)
_PIP_INSTALL = re.compile(r"""\bpip3?["']?\s+install\b(?P<args>.*)""")
# the distribution named as a requirement (not as a part of a URL or path)
_REQUIREMENT = re.compile(r"(?<![\w/.@-])grove-engine(?P<extras>\[[^\]]*\])?(?![\w/-])")
_FROM_SOURCE = re.compile(r"\s*@\s*(git\+|file:|\.|/)")


def documented_files() -> list[Path]:
    return sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md",
                   *(ROOT / "docs").rglob("*.md"), *(ROOT / "docs" / "examples").glob("*.yml"),
                   *(ROOT / "engine").rglob("*.py")])


def index_installs(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each `pip install` that takes grove-engine from an index."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        m = _PIP_INSTALL.search(line)
        if m is None:
            continue
        args = m.group("args")
        for req in _REQUIREMENT.finditer(args):
            if not _FROM_SOURCE.match(args, req.end()):
                out.append((n, line.strip()))
                break
    return out


@pytest.mark.parametrize("line", [
    "pip install grove-engine", "pip install 'grove-engine[ui]'",
    '"$RUNNER_TEMP/engine/bin/pip" install grove-engine==0.1.0',
    "python -m pip install -U grove-engine[kubernetes] rich",
])
def test_index_installs_are_found(line: str) -> None:
    assert index_installs(f"text\n  {line}\n") == [(2, line)]


@pytest.mark.parametrize("line", [
    "pip install -e .", "pip install -e '.[kubernetes]'",
    'pip install "grove-engine @ git+https://github.com/grove-engine/grove-engine@v0.1.0"',
    "pip install 'grove-engine[ui] @ git+https://github.com/grove-engine/grove-engine@v0.1.0'",
    "pip install 'grove-engine @ file:///src/grove-engine'",
    "pip install git+https://github.com/grove-engine/grove-engine@v0.1.0",
])
def test_source_installs_pass(line: str) -> None:
    assert index_installs(line) == []


def test_every_documented_install_works_without_an_index() -> None:
    found = [f"{p.relative_to(ROOT)}:{n}: {line}" for p in documented_files()
             if p.is_file() for n, line in index_installs(p.read_text())]
    assert found == [], "grove-engine is on no index; install from a clone or a git URL " \
                        "(pip install 'grove-engine @ git+https://...@vX.Y.Z'):\n" + \
                        "\n".join(found)


def test_license_is_the_full_apache_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, "
                                    "January 2004")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "9. Accepting Warranty or Additional Liability." in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
    assert text.rstrip().endswith("limitations under the License.")


def test_changelog_has_a_section_for_the_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    heading = re.compile(rf"^## \[{re.escape(engine.__version__)}\] - \d{{4}}-\d\d-\d\d$",
                         re.MULTILINE)
    assert heading.search(changelog), \
        f"CHANGELOG.md: no '## [{engine.__version__}] - YYYY-MM-DD' section for __version__"
    assert changelog.index("## [Unreleased]") < heading.search(changelog).start()  # type: ignore[union-attr]


def test_contributing_documents_the_checks_and_the_release() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for tool in ("ruff check", "mypy", "lint-imports", "validate --no-secrets", "pytest"):
        assert tool in ci and tool in text, tool
    for step in ("pip install -e '.[dev]'", "engine/__init__.py", "## [Unreleased]",
                 "git tag -a v", "git push origin", "rev: v"):
        assert step in text, step


@pytest.fixture(scope="module")
def build_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtual environment with hatchling and nothing of grove-engine."""
    venv = tmp_path_factory.mktemp("build") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "hatchling>=1.27"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip install hatchling: {r.stderr[-2000:]}"
    yield venv


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_metadata(build_venv: Path, tmp_path: Path) -> None:
    r = subprocess.run([str(build_venv / "bin" / "python"), "-m", "pip", "wheel", "-q",
                        "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel, = tmp_path.glob("grove_engine-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = f"grove_engine-{engine.__version__}.dist-info"
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        assert z.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert "engine/py.typed" in names and "engine/schemas/v1alpha1/grove.json" in names
    for data in ("engine/runtimes/seccomp_default.json", "engine/runtimes/k8s_clone.sh",
                 "engine/runtimes/k8s_wrapper.sh"):  # read at run time, not imported
        assert data in names, data
    assert meta["Name"] == "grove-engine" and meta["Version"] == engine.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    classifiers = meta.get_all("Classifier") or []
    for c in ("Development Status :: 3 - Alpha", "Environment :: Console",
              "Intended Audience :: Developers", "Operating System :: POSIX :: Linux",
              "Operating System :: MacOS", "Programming Language :: Python :: 3.11",
              "Programming Language :: Python :: 3.12", "Programming Language :: Python :: 3.13",
              "Topic :: Software Development", "Typing :: Typed"):
        assert c in classifiers, c
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert urls == {
        "Homepage": "https://grove-engine.dev",
        "Documentation": "https://grove-engine.dev/",
        "Source": "https://github.com/grove-engine/grove-engine",
        "Issues": "https://github.com/grove-engine/grove-engine/issues",
        "Changelog": "https://github.com/grove-engine/grove-engine/blob/main/CHANGELOG.md"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_from_a_git_url_at_a_tag(build_venv: Path, tmp_path: Path) -> None:
    """What the README says, with the repository cloned to a local path in place of GitHub
    (`git+file://localhost/...`: a requirement URL needs a host)."""
    clone = tmp_path / "grove-engine"
    git(tmp_path, "clone", "-q", str(ROOT), str(clone))
    git(clone, "tag", "-a", "v0.0.0-test", "-m", "a release")
    git(clone, "commit", "-q", "--allow-empty", "-m", "after the release")  # not at the tag
    tagged = git(clone, "rev-parse", "v0.0.0-test^{commit}")
    r = subprocess.run(
        [str(build_venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-build-isolation",
         f"grove-engine @ git+file://localhost{clone}@v0.0.0-test"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    version = git(clone, "show", f"{tagged}:engine/__init__.py")
    expected = re.search(r'__version__ = "([^"]+)"', version)
    assert expected is not None
    v = subprocess.run([str(build_venv / "bin" / "engine"), "--version"], capture_output=True,
                       text=True, timeout=60)
    assert (v.returncode, v.stdout) == (0, f"grove-engine {expected.group(1)}\n"), v
    direct = (build_venv / "lib").glob("python3*/site-packages/grove_engine-*.dist-info/"
                                       "direct_url.json")
    assert tagged in next(direct).read_text()  # installed from the tag, not from the branch
