"""The import-linter contracts catch the layering mistakes they are there for: a copy of
the package with one deliberately bad import must fail `lint-imports`, and the package as
it is must pass."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")

BAD = [
    # planning must stay pure: no observation (and so no runtime call) behind a plan
    ("engine/plan.py", "from engine import observe as _bad  # noqa\n",
     "Planning imports no code with effects"),
    # commands never import each other (shared plumbing lives in engine.commands._*)
    ("engine/commands/destroy.py", "from engine.commands import apply as _bad  # noqa\n",
     "Commands never import each other"),
    # a stage never imports a later one
    ("engine/desired.py", "from engine import executor as _bad  # noqa\n",
     "Later stages import earlier ones"),
    # only the Docker runtime talks to Docker
    ("engine/executor.py", "import docker as _bad  # noqa\n",
     "Only the Docker runtime imports the docker SDK"),
    # the runtime registry is the only way to a runtime implementation
    ("engine/converge.py", "from engine.runtimes import local as _bad  # noqa\n",
     "Runtime implementations are reached only through the registry"),
]


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--config", str(tree / ".importlinter"),
                           "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def copy(tmp: Path) -> Path:
    tree = tmp / "tree"
    shutil.copytree(ROOT / "engine", tree / "engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tree / ".importlinter")
    return tree


def test_the_package_keeps_every_contract(tmp_path: Path) -> None:
    p = lint(copy(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "broken" not in p.stdout.split("Contracts:")[-1].replace("0 broken", "")


@pytest.mark.parametrize(("path", "line", "contract"), BAD,
                         ids=[b[2].split()[0].lower() + "-" + b[0].split("/")[-1] for b in BAD])
def test_a_bad_import_breaks_its_contract(tmp_path: Path, path: str, line: str,
                                          contract: str) -> None:
    tree = copy(tmp_path)
    f = tree / path
    text = f.read_text()
    # after the module's `from __future__` line, where an import may go
    head, sep, rest = text.partition("from __future__ import annotations\n")
    f.write_text(head + sep + line + rest if sep else line + text)
    p = lint(tree)
    assert p.returncode != 0, f"{path}: `{line.strip()}` kept every contract"
    flat = " ".join(p.stdout.split())  # names may wrap at the terminal's width
    verdict = re.search(re.escape(contract) + r".*? (KEPT|BROKEN)\b", flat)
    assert verdict is not None and verdict.group(1) == "BROKEN", p.stdout
