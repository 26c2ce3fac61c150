"""Stage 5, agent start: write an agent's instructions into its harness's instructions file.

Called by the executor before it starts (or restarts) each agent. Writes the agent's task,
its role and a generated section on the agent-side `engine` commands and the grove's
limits into `agent.instructions_file` (CLAUDE.md, GEMINI.md, AGENTS.md...) in the agent's
workdir, and returns that path (None for harnesses without one, e.g. `shell`).

The engine's text always sits between the markers `<!-- engine:begin -->` and
`<!-- engine:end -->`. A file the repository already has is never overwritten: the section
is appended once and replaced in place on every later start, so re-running is idempotent
and the repository's own text is kept byte for byte.

Keeping the workspace clean (the section is per agent and must not reach a commit): when
the engine makes an agent's repository (`workspace.make`, before the agent ever runs) it
lists the file in that repository's `info/exclude` or, when the file is tracked, marks it
`--skip-worktree` there, so `git status` stays clean and `git commit -a` leaves the section
out. An agent that must itself edit that file runs `git update-index --no-skip-worktree
FILE` first (the section says so). In a `shared` workspace a created file goes to the
repository's `info/exclude`; a tracked one shows the section as a change of the user's
checkout.

The workspace is the agent's: the file is read and replaced beneath it without following
a symlink (`engine.trust`), so a symlink planted at its name is replaced, never written
through, and its target is never read.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from engine.desired import DesiredAgent, Policy
from engine.errors import EngineError
from engine.trust import reader
from engine.trust.git import run as git

BEGIN = "<!-- engine:begin -->"
END = "<!-- engine:end -->"
_EXCLUDE_NOTE = "# grove-engine: agent instructions it generates (engine/instructions.py)"
MAX_BYTES = 1 << 20


def write_instructions(agent: DesiredAgent, workdir: Path, policy: Policy) -> Path | None:
    """Write or refresh the agent's section of its instructions file; return the file."""
    if not agent.instructions_file:
        return None
    rel = relative(agent)
    section = render_section(agent, policy)
    try:
        old = reader.read_text(workdir, rel, MAX_BYTES)
        existed = True
    except reader.Untrusted:
        old, existed = "", False  # missing, or not a regular file: replaced whole
    new = merge(old, section)
    if new != old or not existed:
        try:
            _replace(workdir, rel, new.encode("utf-8"))
        except (OSError, reader.Untrusted) as e:  # the agent put a directory there...
            raise EngineError(f"agent {agent.grove}/{agent.name}: cannot write its "
                              f"instructions file {rel} ({getattr(e, 'strerror', None) or e})"
                              ) from None
    if agent.workspace == "shared" and (not existed or old.strip() == _own(old)) and \
            not git(workdir, "ls-files", "--", rel, check=False):
        exclude(Path(git(workdir, "rev-parse", "--path-format=absolute", "--git-common-dir"))
                / "info" / "exclude", rel)
    return workdir / rel


def relative(agent: DesiredAgent) -> str:
    """The instructions file as a clean path relative to the workspace."""
    rel = Path(str(agent.instructions_file))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise EngineError(f"agent {agent.grove}/{agent.name}: instructions file "
                          f"{agent.instructions_file} is outside the workspace")
    return rel.as_posix()


def _replace(workdir: Path, rel: str, data: bytes) -> None:
    """Write `workdir/rel` whole (temp file, fsync, rename) in its directory, reached
    without following a symlink; the directory is made when missing."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        with reader.opendir(workdir, tuple(parts[:i - 1])) as d, \
                contextlib.suppress(FileExistsError):
            os.mkdir(parts[i - 1], 0o755, dir_fd=d)
    with reader.opendir(workdir, tuple(parts[:-1])) as d:
        tmp = f".{parts[-1]}.engine-tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=d)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                     dir_fd=d)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, parts[-1], src_dir_fd=d, dst_dir_fd=d)


def merge(existing: str, section: str) -> str:
    """`existing` with the engine section replaced (or appended once, after the file's own
    text and a blank line). Only the first begin..end span is the engine's."""
    start = existing.find(BEGIN)
    end = existing.find(END, start + len(BEGIN)) if start >= 0 else -1
    if start >= 0 and end >= 0:
        return existing[:start] + section + existing[end + len(END):]
    if not existing.strip():
        return section + "\n"
    sep = "" if existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
    return existing + sep + section + "\n"


def render_section(agent: DesiredAgent, policy: Policy) -> str:
    """The engine's section, markers included: pure text from the agent and the policy."""
    lines = [
        BEGIN,
        f"<!-- Written by grove-engine for agent {agent.grove}/{agent.name} at every start; "
        "edits here are replaced. -->",
        "",
        f"# Agent `{agent.name}` of grove `{agent.grove}`",
        "",
        "## Your task",
        "",
        _quote(agent.task).rstrip("\n") or "(no task given)",
    ]
    if agent.role.strip():
        lines += ["", "## Your role", "", _quote(agent.role).rstrip("\n")]
    lines += ["", *_protocol(agent, policy), END]
    return "\n".join(lines)


def _protocol(agent: DesiredAgent, policy: Policy) -> list[str]:
    parent = f"agent `{agent.spawned_by}`" if agent.spawned_by else "the grove's manifests"
    lines = [
        "## Working with grove-engine",
        "",
        f"You were started by {parent}. Work in this directory and commit your work to "
        f"the branch `{agent.branch}`; the engine reviews and merges it from there.",
        "The `engine` command on your PATH talks to the engine (through your inbox, never "
        "directly to other agents):",
        "",
        "- `engine spawn NAME --task T [--profile P] [--wait]`: ask for a child agent to do "
        "part of the work. With `--wait`, wait for the answer: the child's name, or why "
        "it was refused.",
        "- `engine message AGENT TEXT`: send a message to another agent of the grove.",
        "- `engine status --json`: the grove's agents, their phases and parents.",
        "- `engine done [--result TEXT]`: report that you have finished, with a short "
        "result for your parent; then exit.",
        "",
        "Limits of this grove (a spawn past one is refused):",
        "",
        f"- at most {policy.max_agents} agents in the grove;",
        f"- spawn depth at most {policy.max_depth} (yours is {agent.depth}; a child of yours "
        f"would be {agent.depth + 1});",
        f"- at most {policy.max_children} children per agent.",
        "",
    ]
    if agent.allow_profiles and agent.depth < policy.max_depth:
        lines.append("Profiles you may give a child (`--profile`): "
                     + ", ".join(f"`{p}`" for p in agent.allow_profiles) + ".")
    else:
        lines.append("You may not spawn children: "
                     + ("your depth is the grove's limit." if agent.allow_profiles
                        else "your profile allows no profiles for children."))
    if agent.allow_profiles and agent.allow_harnesses is not None:
        lines.append("Harnesses a child may use (`--harness`): "
                     + (", ".join(f"`{h}`" for h in agent.allow_harnesses) or "none") + ".")
    lines += [
        "",
        "This section is generated and hidden from git: do not commit it. If your task is "
        f"to edit `{agent.instructions_file}` and git does not see your change, run "
        f"`git update-index --no-skip-worktree {agent.instructions_file}`, and leave this "
        "section out of the commit.",
    ]
    return lines


def _quote(text: str) -> str:
    """User text with anything that looks like the engine's markers defused, so a task
    that quotes them cannot end the section early."""
    return text.replace("<!-- engine:", "<!-- engine\u200b:")


def _own(text: str) -> str:
    """The engine's section of `text`, stripped ("" when there is none)."""
    start = text.find(BEGIN)
    end = text.find(END, start + len(BEGIN)) if start >= 0 else -1
    return text[start:end + len(END)].strip() if start >= 0 and end >= 0 else "\0"


def exclude(path: Path, rel: str) -> None:
    """Add `/rel` to the exclude file `path` (one the engine trusts: the repository's, or
    a fresh agent repository's before the agent runs) once, in one small append."""
    pattern = "/" + rel
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if pattern in text.splitlines():
        return
    add = "" if not text or text.endswith("\n") else "\n"
    add += ("" if _EXCLUDE_NOTE in text else _EXCLUDE_NOTE + "\n") + pattern + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(add)
        f.flush()
        os.fsync(f.fileno())
