"""Where the engine keeps things: one home for the `.engine/` layout and the agent branch
format. Everything under `.engine/` and every `engine/<grove>/<agent>` branch name is made
here; no other module spells them (tests/test_paths.py checks it).

    .engine/state/<grove>.json        inventory (and <grove>.lock, the grove's lock)
    .engine/inbox/<grove>/<agent>/    requests from the agent, answers, notes to it
    .engine/run/<grove>/<agent>/      runtime control files (exit code, reason)
    .engine/logs/<grove>/<agent>.log  the agent's output
    .engine/home/<grove>/<agent>/     the agent's private home
    .engine/worktrees/<grove>/<agent> the agent's repository
    .engine/results/<grove>/<agent>.txt  what the agent reported with `engine done`
"""

from __future__ import annotations

from pathlib import Path

STATE_DIR = ".engine"
BRANCH_PREFIX = "engine"


def state(root: Path) -> Path:
    """The engine's directory in repository `root`."""
    return root / STATE_DIR


def inbox(root: Path, grove: str, agent: str | None = None) -> Path:
    d = state(root) / "inbox" / grove
    return d / agent if agent else d


def run_dir(root: Path, grove: str, agent: str) -> Path:
    return state(root) / "run" / grove / agent


def log_file(root: Path, grove: str, agent: str) -> Path:
    return state(root) / "logs" / grove / f"{agent}.log"


def home(root: Path, grove: str, agent: str) -> Path:
    return state(root) / "home" / grove / agent


def worktree(root: Path, grove: str, agent: str) -> Path:
    return state(root) / "worktrees" / grove / agent


def result(root: Path, grove: str, agent: str) -> Path:
    return state(root) / "results" / grove / f"{agent}.txt"


def branch(grove: str, agent: str) -> str:
    """The branch an agent works on."""
    return f"{BRANCH_PREFIX}/{grove}/{agent}"


def agent_of_branch(name: str) -> tuple[str, str] | None:
    """(grove, agent) of an agent branch name, or None."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == BRANCH_PREFIX and all(parts[1:]):
        return parts[1], parts[2]
    return None
