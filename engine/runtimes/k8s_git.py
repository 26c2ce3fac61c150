"""Kubernetes runtime, workspace edge: make an agent's branch reachable by the cluster.

Called by `engine.runtimes.kubernetes` before it applies an agent's objects. The init
container in the Pod clones the branch `engine/<grove>/<agent>` from the grove's
`spec.remote`, so the host pushes it there first, with the user's own git credentials.
Returns nothing; raises EngineError (or TemporaryError on a timeout) naming the remote.
"""

from __future__ import annotations

import os
import subprocess

from engine.errors import EngineError, TemporaryError
from engine.runtimes import Launch


def push_branch(launch: Launch, remote: str) -> None:
    """Make the agent's branch reachable by the cluster: push it to the grove's remote.
    A rejected push is fine when the remote already has the branch (the agent's own
    earlier pushes may be ahead of the local branch)."""
    agent = launch.agent
    src = launch.workdir if launch.workdir.is_dir() else launch.repo_root
    ref = "HEAD" if src == launch.workdir else f"refs/heads/{agent.branch}"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        if subprocess.run(["git", "-C", str(launch.repo_root), "rev-parse", "-q", "--verify",
                           ref], capture_output=True, env=env).returncode:
            ref = "HEAD"
        push = subprocess.run(["git", "-C", str(src), "push", "-q", remote,
                               f"{ref}:refs/heads/{agent.branch}"],
                              capture_output=True, text=True, env=env, timeout=120)
        if push.returncode == 0:
            return
        there = subprocess.run(["git", "-C", str(src), "ls-remote", "--exit-code", remote,
                                f"refs/heads/{agent.branch}"],
                               capture_output=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        raise TemporaryError(f"agent {agent.grove}/{agent.name}: git push to {remote} timed "
                             "out", delay=10.0) from None
    if there.returncode != 0:
        lines = [x for x in push.stderr.splitlines() if x.strip()]
        raise EngineError(f"agent {agent.grove}/{agent.name}: cannot push {agent.branch} to "
                          f"{remote}: {lines[-1] if lines else 'git push failed'}")
