"""Stage 7 of the converge spine, execution: a `GrovePlan` -> runtime calls, in
spawn-graph order.

Called by `converge.run` only. Deletes run first, children before parents; then each
create, replace and restart starts as soon as the agents it comes after in the spawn graph
(its parent, its dependencies) are done in this run, with bounded parallelism: there is no
waiting for a whole generation. A dependent whose dependencies have not Succeeded yet is
recorded pending and started by a later pass. Whatever goes wrong with one agent, an
`EngineError` or a bug, is that agent's outcome ("failed"; its descendants "skipped"), is
kept in its record for `status`, and the rest go on. The inventory is saved after every
agent, so an interrupted run resumes. Progress flows out through `Hooks`; this module
never prints.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from engine import graph, inventory, paths, secrets, usage, workspace
from engine.desired import HOME_FILE_PREFIX, DesiredAgent, DesiredGrove
from engine.errors import EngineError, TemporaryError
from engine.fsutil import failpoint
from engine.inventory import Inventory, Record
from engine.observe import Runtimes
from engine.plan import Action, Change, GrovePlan
from engine.runtimes import Launch
from engine.trust.reader import one_line

if TYPE_CHECKING:
    import networkx as nx

RETRIES = 3
PAST = {Action.CREATE: "created", Action.REPLACE: "replaced", Action.RESTART: "restarted",
        Action.UPDATE: "updated", Action.DELETE: "deleted", Action.NOOP: "unchanged",
        Action.WAIT: "pending"}


@dataclass(frozen=True)
class Outcome:
    agent: str
    action: Action
    status: str  # created, replaced, restarted, updated, deleted, adopted, pending,
    # unchanged, skipped, failed
    message: str = ""
    archive: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status not in ("failed", "skipped")


class Hooks(Protocol):
    def started(self, grove: str, change: Change) -> None: ...

    def finished(self, grove: str, outcome: Outcome) -> None: ...


class NoHooks:
    def started(self, grove: str, change: Change) -> None:
        pass

    def finished(self, grove: str, outcome: Outcome) -> None:
        pass


@dataclass
class Settings:
    parallelism: int = 8
    cancelled: threading.Event | None = None  # set: start nothing new (Ctrl-C)
    # `engine resume --task`: per agent restarted, the next message in place of its task
    tasks: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """One execution of one grove's plan; thread-safe inventory updates."""

    root: Path
    grove: DesiredGrove
    inv: Inventory
    rts: Runtimes
    hooks: Hooks
    settings: Settings
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    _base: tuple[str, str] | None = None

    def base(self) -> tuple[str, str]:
        """The grove's base (ref, commit), resolved once per run."""
        with self.lock:
            if self._base is None:
                self._base = workspace.base_commit(self.root, self.grove.base_ref)
            return self._base

    @property
    def state_dir(self) -> Path:
        return paths.state(self.root)

    def record(self, name: str, rec: Record | None) -> None:
        with self.lock:
            if rec is None:
                self.inv.agents.pop(name, None)
            else:
                self.inv.agents[name] = rec
            inventory.save(self.state_dir, self.inv)


def client_path() -> Path:
    return Path(__file__).resolve().parent / "client.py"


def launch_for(root: Path, agent: DesiredAgent, ws: workspace.Workspace,
               resume: bool = False, task: str | None = None) -> Launch:
    values = {c.name: secrets.read(c) for c in agent.credentials}
    # plain config files for the home travel the way credential files do (not secret, but
    # the path is the same: a 0600 file in the agent's own home, never its environment)
    values |= {f"{HOME_FILE_PREFIX}{i}": content
               for i, (_, content) in enumerate(agent.home_files)}
    inbox = paths.state(root) / "inbox" / agent.grove / agent.name
    inbox.mkdir(parents=True, exist_ok=True)
    # commits made by an agent are attributed to it (the profile's env may override)
    ident = {"GIT_AUTHOR_NAME": f"{agent.name} ({agent.grove})",
             "GIT_AUTHOR_EMAIL": f"{agent.name}@{agent.grove}.agents.invalid"}
    ident |= {"GIT_COMMITTER_NAME": ident["GIT_AUTHOR_NAME"],
              "GIT_COMMITTER_EMAIL": ident["GIT_AUTHOR_EMAIL"]}
    env = {**ident, **dict(agent.env)}
    env.update({"ENGINE_GROVE": agent.grove, "ENGINE_AGENT": agent.name,
                "ENGINE_INBOX": str(inbox), "ENGINE_PARENT": agent.spawned_by or "",
                "ENGINE_BRANCH": ws.branch, "ENGINE_PROFILE": agent.profile})
    return Launch(agent=agent, repo_root=root, workdir=ws.workdir, git_paths=ws.git_paths,
                  run_dir=paths.state(root) / "run" / agent.grove / agent.name, inbox=inbox,
                  log_file=paths.state(root) / "logs" / agent.grove / f"{agent.name}.log",
                  client=client_path(), env=env, secrets=values, resume=resume, task=task)


def _retrying(fn: Callable[[], None]) -> None:
    for attempt in range(RETRIES):
        try:
            fn()
            return
        except TemporaryError as e:
            if attempt == RETRIES - 1:
                raise
            time.sleep(e.delay)


def _start(run: Run, change: Change, resume: bool) -> str:
    a = run.grove.by_name[change.agent]
    if change.action is Action.CREATE and change.waits_for:
        _save_record(run, a, None, pending=True)
        return "pending"
    _check_program(run, a)
    inputs = tuple(run.grove.by_name[d].branch for d in a.depends_on if d in run.grove.by_name)
    ws = workspace.ensure(run.root, a, run.grove.base_ref, inputs, run.base())
    failpoint("worktree")
    try:
        _write_instructions(run, a, ws)
        launch = launch_for(run.root, a, ws, resume,
                            run.settings.tasks.get(a.name) if resume else None)
        rt = run.rts.get(a.runtime, a.host)
        _retrying(lambda: rt.create(launch))
    except BaseException as e:  # the workspace stays owned (and archived on delete)
        _save_record(run, a, ws, error=_why(e))
        raise
    failpoint("runtime")
    _save_record(run, a, ws)
    failpoint("record")
    return PAST[change.action]



def _write_instructions(run: Run, a: DesiredAgent, ws: workspace.Workspace) -> None:
    try:
        from engine import instructions
    except ImportError:
        return
    instructions.write_instructions(a, ws.workdir, run.grove.policy)


def _why(e: BaseException) -> str:
    """One line for a failure (it can quote an agent's file names or git's stderr)."""
    if isinstance(e, EngineError):
        return one_line(e.summary, 1000)
    return one_line(f"internal error: {e.__class__.__name__}: {str(e)[:200]}", 1000)


def _save_record(run: Run, a: DesiredAgent, ws: workspace.Workspace | None,
                 pending: bool = False, error: str = "") -> None:
    old = run.inv.agents.get(a.name)
    rel = ""
    if ws is not None and ws.workdir != run.root:
        rel = str(ws.workdir.relative_to(run.root))
    rec = Record(spec_hash=a.spec_hash, settings=a.settings, runtime=a.runtime,
                 host=a.host or "", branch=ws.branch if ws else a.branch, workdir=rel,
                 workspace=a.workspace, base_commit=ws.base_commit if ws else "",
                 created_at=old.created_at if old and old.created_at else inventory.now(),
                 restarts=old.restarts if old else 0, pending=pending,
                 parent=a.spawned_by or "", notified="", error=error)
    if old is not None:  # a new run: what the agent used so far stays counted (budgets)
        rec.usage = usage.of_record(old.usage, old.run_usage).to_json()
        rec.run_mark = f"{rec.restarts}:{rec.created_at}"
    run.record(a.name, rec)


def _delete(run: Run, change: Change) -> tuple[str, str]:
    rec = run.inv.agents.get(change.agent)
    rt = run.rts.get(change.runtime or (rec.runtime if rec else "local"),
                     (rec.host if rec else change.host) or None)
    _retrying(lambda: rt.delete(run.grove.name, change.agent))
    ref = ""
    if rec is not None and rec.workdir:
        try:
            tip = run.base()[1]  # work merged into the base since is not archived again
        except EngineError:
            tip = ""
        ref = workspace.remove(run.root, run.grove.name, change.agent, rec.workspace,
                               run.root / rec.workdir, rec.branch, rec.base_commit,
                               tip) or ""
    elif rec is not None and rec.pruned_at and rec.branch:
        # pruned: no working copy, but its branch stayed (archived first if need be)
        try:
            tip = run.base()[1]
        except EngineError:
            tip = ""
        ref = workspace.remove_branch(run.root, run.grove.name, change.agent, rec.branch,
                                      rec.base_commit, tip) or ""
    elif rec is None:  # created, then the engine died before recording it: still ours
        found = workspace.orphan(run.root, run.grove.name, change.agent)
        if found is not None:
            mode, path, branch = found
            ref = workspace.remove(run.root, run.grove.name, change.agent, mode, path,
                                   branch, run.base()[1]) or ""
    run.record(change.agent, None)
    return "deleted", ref


def _one(run: Run, change: Change) -> Outcome:
    t0 = time.monotonic()
    run.hooks.started(run.grove.name, change)
    archive = ""
    try:
        if change.action is Action.DELETE:
            status, archive = _delete(run, change)
        elif change.action is Action.REPLACE:
            a = run.grove.by_name[change.agent]
            rec = run.inv.agents.get(change.agent)
            if rec and (rec.runtime, rec.host) != (a.runtime, a.host or ""):
                run.rts.get(rec.runtime, rec.host or None).delete(run.grove.name, a.name)
            else:  # the same runtime: the agent's home stays for the new object
                rt = run.rts.get(a.runtime, a.host)
                getattr(rt, "stop", rt.delete)(run.grove.name, a.name)
            status = _start(run, change, resume=False)
        elif change.action in (Action.CREATE, Action.RESTART):
            status = _start(run, change, resume=change.action is Action.RESTART)
            rec = run.inv.agents.get(change.agent)
            if change.action is Action.RESTART and rec is not None:
                rec.restarts += 1
                run.record(change.agent, rec)
        elif change.action is Action.UPDATE or change.adopt:
            _save_record(run, run.grove.by_name[change.agent], _ws_of(run, change.agent))
            status = "adopted" if change.adopt else "updated"
        else:
            status = PAST[change.action]
        out = Outcome(change.agent, change.action, status, change.reason, archive)
    except Exception as e:  # whatever happens to one agent is its outcome
        out = Outcome(change.agent, change.action, "failed", _why(e))
    out = Outcome(out.agent, out.action, out.status, out.message, out.archive,
                  round(time.monotonic() - t0, 3))
    run.outcomes[change.agent] = out
    run.hooks.finished(run.grove.name, out)
    return out


def _ws_of(run: Run, name: str) -> workspace.Workspace | None:
    a = run.grove.by_name[name]
    return workspace.ensure(run.root, a, run.grove.base_ref, base=run.base())


def _check_program(run: Run, a: DesiredAgent) -> None:
    """The agent's harness program is where its runtime looks (the install cache, PATH,
    or an image that carries it); else its one-line error naming the install command.
    (`converge.preflight` runs the same check at plan time for the whole plan.)"""
    if a.program is None:
        return
    check = getattr(run.rts.get(a.runtime, a.host), "check_program", None)
    if check is not None:
        check(a)


def execute(root: Path, grove: DesiredGrove, plan: GrovePlan, inv: Inventory, rts: Runtimes,
            hooks: Hooks | None = None, settings: Settings | None = None) -> list[Outcome]:
    """Carry out `plan`; returns one outcome per agent that had something to do."""
    run = Run(root, grove, inv, rts, hooks or NoHooks(), settings or Settings())
    starting = any(c.action in (Action.CREATE, Action.REPLACE, Action.RESTART)
                   for c in plan.changes)
    if starting:
        workspace.exclude_state_dir(root)
        workspace.prune(root)  # once, before workspaces are added concurrently
    deletes = {c.agent: c for c in plan.changes if c.action is Action.DELETE}
    if deletes:  # children before parents
        parents = {n: (inv.agents[n].parent if n in inv.agents else None) for n in deletes}
        _schedule(run, graph.build(deletes, parents, {}).reverse(copy=True), deletes)
    todo = {c.agent: c for c in plan.changes
            if c.action is not Action.DELETE and c.agent in grove.by_name
            and (c.action.is_change or c.adopt)}
    if todo:
        g = graph.build(grove.by_name, {a.name: a.spawned_by for a in grove.agents},
                        {a.name: a.depends_on for a in grove.agents})
        _schedule(run, g, todo)
    return [run.outcomes[n] for n in sorted(run.outcomes)]


def _schedule(run: Run, g: nx.DiGraph, todo: dict[str, Change]) -> None:
    """Run each change in `todo` as soon as everything before it in `g` is done; a node
    without a change is done at once. A failure skips the changes after it."""
    import networkx as nx

    waiting = {n: set(g.predecessors(n)) for n in g}
    running: dict[Future[Outcome], str] = {}
    cancelled = run.settings.cancelled

    def finish(n: str) -> None:
        for m in g.successors(n):
            if m in waiting:
                waiting[m].discard(n)

    with ThreadPoolExecutor(max_workers=max(1, run.settings.parallelism)) as pool:
        while waiting or running:
            ready = sorted(n for n, before in waiting.items() if not before)
            for n in ready:
                del waiting[n]
                if n not in todo:
                    finish(n)
                elif cancelled is None or not cancelled.is_set():
                    running[pool.submit(_one, run, todo[n])] = n
                # cancelled: nothing new starts, and nothing after it either
            if any(not before for before in waiting.values()):
                continue  # nodes without a change opened the way for more
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                n = running.pop(fut)
                if fut.result().status != "failed":
                    finish(n)
                    continue
                for d in sorted(nx.descendants(g, n)):
                    waiting.pop(d, None)
                    if d in todo and d not in run.outcomes:
                        skip = Outcome(d, todo[d].action, "skipped",
                                       f"skipped because {n} failed")
                        run.outcomes[d] = skip
                        run.hooks.finished(run.grove.name, skip)
