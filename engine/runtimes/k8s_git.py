"""Kubernetes runtime, workspace edge: make an agent's branch reachable by the cluster.

Called by `engine.runtimes.kubernetes` before it applies an agent's objects. The init
container in the Pod clones the branch `engine/<grove>/<agent>` from the grove's
`spec.remote`, so the host pushes it there first, with the user's own git credentials.
Returns nothing; raises EngineError (or TemporaryError on a timeout) naming the remote.
"""

from __future__ import annotations

from engine.errors import EngineError, TemporaryError
from engine.runtimes import Launch
from engine.trust import git


def push_branch(launch: Launch, remote: str) -> None:
    """Make the agent's branch reachable by the cluster: push it to the grove's remote.
    Pushed from the trusted repository (the agent's own commits are brought over first),
    never from a repository an agent can write. A rejected push is fine when the remote
    already has the branch (the agent's own earlier pushes may be ahead of the local
    branch)."""
    agent = launch.agent
    root = launch.repo_root
    if launch.workdir.is_dir() and launch.workdir.resolve() != root.resolve():
        from engine.trust import exchange

        exchange.sync(root, agent.grove, agent.name, launch.workdir, agent.branch)
    ref = f"refs/heads/{agent.branch}"
    if not git.ok(root, "rev-parse", "-q", "--verify", ref):
        ref = "HEAD"
    try:
        push = git.call(root, "push", "-q", remote, f"{ref}:refs/heads/{agent.branch}",
                        remote=True)
        if push.returncode == 0:
            return
        there = git.call(root, "ls-remote", "--exit-code", remote,
                         f"refs/heads/{agent.branch}", timeout=60, remote=True)
    except EngineError as e:
        if "timed out" in e.summary:
            raise TemporaryError(f"agent {agent.grove}/{agent.name}: git push to {remote} "
                                 "timed out", delay=10.0) from None
        raise
    if there.returncode != 0:
        lines = [x for x in push.stderr.splitlines() if x.strip()]
        raise EngineError(f"agent {agent.grove}/{agent.name}: cannot push {agent.branch} to "
                          f"{remote}: {lines[-1] if lines else 'git push failed'}")
