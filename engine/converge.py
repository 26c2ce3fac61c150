"""The converge spine: one pass over one grove, in eight numbered stages.

Every command that changes what runs goes through `run` here: `apply` (all stages, with a
person confirming at stage 6), `destroy` (an empty desired state), the controller
(`engine watch` and `apply --wait`, no confirmation, its sync policy applied at stage 5)
and the single-agent operations (`restart`, `stop`, `start`, `apply -target/-replace`).
`plan` runs stages 1-5 and stops. The caller holds the grove's lock for the pass.

  1. sync remote inboxes  runtimes whose agents cannot write the host's inbox (Pods) carry
                          their requests over
  2. desired state        the manifests at a git revision (the controller's default) or in
                          the working tree; spawn write-backs not committed yet count
  3. requests             pending requests are read and judged, nothing is written: accepted
                          spawns join the desired state as `spawn requested by X`
  4. observe              runtimes, inventory, workspaces
  5. plan                 desired x actual (or a saved plan after the staleness check), then
                          the caller's targets, replacements and sync policy; preflight
                          checks (a base commit, programs and images) fail here, not later
  6. confirm              the caller's question; "no" ends the pass having changed nothing
  7. execute              requests are taken in (spawns written back, answers written), then
                          the plan runs; each agent's failure is that agent's outcome
  8. notify               parents of children that ended; answered inbox files expire

A failure before stage 7 is one `EngineError` for the whole grove and nothing changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine import (
    approval,
    budget,
    desired,
    events,
    executor,
    ingest,
    inventory,
    manifest,
    notify,
    paths,
    plan,
    signals,
)
from engine.actual import Actual
from engine.desired import DesiredGrove
from engine.errors import EngineError, InvalidManifests, StalePlanError
from engine.executor import Hooks, Outcome, Settings
from engine.observe import Runtimes, observe, status_rows
from engine.plan import Action, Change, GrovePlan
from engine.runtimes import FAILED, SUCCEEDED
from engine.trust import reader


@dataclass(frozen=True)
class Ask:
    """What a caller wants from one pass over one grove."""

    grove: str
    revision: str | None = None  # converge this git ref's manifests; None: the working tree
    saved: GrovePlan | None = None  # apply exactly this plan (checked for staleness)
    destroy: bool = False  # the desired state is empty: everything the grove owns goes
    targets: frozenset[str] = frozenset()  # -target: only these and what they need
    replace: frozenset[str] = frozenset()  # -replace: a new runtime object for these
    restart: frozenset[str] = frozenset()  # `engine restart`: start these again
    controller: bool = False  # unattended: apply the grove's sync policy
    finish: bool = False  # `apply --wait`: a Succeeded agent is done, even with restart: always
    hold: frozenset[str] = frozenset()  # restarts backing off (a crash loop slows down)
    gave_up: frozenset[str] = frozenset()  # `apply --wait`: restarted enough, count as Failed
    take_requests: bool = True  # stage 3 and 7: agents' requests
    execute: bool = True  # False: stop after stage 5 (`engine plan`)
    confirm: Callable[[GrovePlan], bool] | None = None  # stage 6; None: yes
    hooks: Hooks | None = None
    settings: Settings = field(default_factory=Settings)
    lock_id: str = ""  # the caller's lock, checked before stage 7 (a controller may lose it)
    loaded: DesiredGrove | None = None  # stage 2 done already (the working tree's state)


@dataclass
class Result:
    grove: str
    plan: GrovePlan
    outcomes: list[Outcome] = field(default_factory=list)
    desired: DesiredGrove | None = None
    actual: Actual | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request id, reason)
    accepted: list[str] = field(default_factory=list)  # spawned children taken in
    cancelled: bool = False

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


class LostLock(EngineError):
    """The caller's lock was taken from it: act no further."""


# -- stage 2: the desired state ---------------------------------------------------------

def empty(root: Path, name: str) -> DesiredGrove:
    """The desired state of a destroyed grove: nothing."""
    return DesiredGrove(name, root / manifest.GROVES_DIR / name, "", "worktree",
                        desired.Policy(0, 0, 0), False, "", (), (), (), "destroy",
                        sync_prune=True)


def load_source(root: Path, name: str, revision: str | None
                ) -> tuple[manifest.GroveSource, str]:
    """The grove's manifests and their digest: in the working tree, or at `revision` (a
    commit) plus the engine's own write-backs the revision does not have yet (spawned.yaml
    as the engine appended it: the working-tree file when it only extends the committed
    one). The digest is "" for the working tree (`desired.build` computes it)."""
    directory = root / manifest.GROVES_DIR / name
    if revision is None:
        return manifest.load_grove(directory, root), ""
    from engine import revisions

    texts, diags = revisions.texts_at(root, revision, [name])
    if diags:
        raise InvalidManifests(diags)
    files = texts.get(name)
    if files is None:
        raise EngineError(f"grove {name}: {manifest.GROVES_DIR}/{name}/ is not committed "
                          f"(not in {revision[:12]}): the controller converges commits; "
                          "commit it, or run engine watch --working-tree")
    mine = _spawned_on_disk(root, name)
    if mine is not None and mine.startswith(files.get(manifest.SPAWNED_FILE, "")):
        files = {**files, manifest.SPAWNED_FILE: mine}
    return manifest.load_grove(directory, root, texts=files), revisions.digest(files)


def _source(root: Path, name: str, revision: str | None
            ) -> Callable[[], manifest.GroveSource]:
    return lambda: load_source(root, name, revision)[0]


def _spawned_on_disk(root: Path, name: str) -> str | None:
    """spawned.yaml as the engine last wrote it: its own copy under `.engine/state/`, not
    the checkout's file (which an agent with a shared workspace could append to)."""
    from engine import writeback, yamlio

    path = writeback.ledger_path(root, name)
    try:
        return yamlio.read_regular(path, yamlio.MAX_FILE_BYTES, follow_symlinks=False
                                   ).decode("utf-8")
    except (OSError, ValueError, yamlio.NotReadable):
        return None


def load_desired(root: Path, name: str, opts: desired.Options, revision: str | None = None,
                 spawns: list[ingest.Judged] | None = None) -> DesiredGrove:
    """Stage 2 (with stage 3's accepted spawns): the resolved, frozen desired state. The
    digest is that of the manifests alone, so a saved plan stays comparable."""
    src, digest = load_source(root, name, revision)
    for j in spawns or ():
        doc = j.spawn.document()
        src.agents[j.spawn.name] = manifest.Entry(j.spawn.name, doc["spec"], src.grove.doc,
                                                  ("spec",))
    g = desired.build(src, opts)
    return dataclasses.replace(g, manifest_digest=digest) if digest else g


# -- the pass ---------------------------------------------------------------------------

def sync_remote_inboxes(root: Path, name: str, rts: Runtimes, log: Callable[[str], None]
                        ) -> None:
    """Stage 1: agents on runtimes whose Pods cannot write into the host's inbox directory
    hand their requests over the runtime's API (only running ones)."""
    from engine import inbox

    inv = inventory.load(paths.state(root), name)
    keys = sorted({(r.runtime, r.host) for r in inv.agents.values()
                   if r.runtime == "kubernetes"})
    for key in keys:
        rt = rts.get(key[0], key[1] or None)
        sync = getattr(rt, "sync_inbox", None)
        if sync is None:
            continue
        try:
            running = rt.observe(name)
        except EngineError as e:
            log(f"grove {name}: inbox sync skipped: {e.summary}")
            continue
        for agent, obs in sorted(running.items()):
            rec = inv.agents.get(agent)
            if obs.phase != "Running" or rec is None or (rec.runtime, rec.host) != key:
                continue
            try:
                sync(name, agent, inbox.inbox_dir(root, name, agent))
            except EngineError as e:
                log(f"{name}/{agent}: inbox sync failed: {e.summary}")


def run(root: Path, ask: Ask, rts: Runtimes, opts: desired.Options,
        log: Callable[[str], None] = lambda _: None) -> Result:
    """One pass (module docstring). Raises EngineError only before stage 7."""
    name = ask.grove
    # 1. sync remote inboxes
    if ask.take_requests and not ask.destroy:
        sync_remote_inboxes(root, name, rts, log)
    # 2. desired state
    base = empty(root, name) if ask.destroy else ask.loaded if ask.loaded is not None \
        and ask.revision is None else load_desired(root, name, opts, ask.revision)
    # 3. requests: judged, not yet answered
    judged: list[ingest.Judged] = []
    awaiting: list[ingest.Judged] = []  # waiting for a person (engine approve): shown only
    source = _source(root, name, ask.revision)  # the gate judges by the plan's manifests
    if ask.take_requests and not ask.destroy and ask.saved is None:
        judged, awaiting = ingest.review(root, base, opts, source)
    elif ask.saved is not None and ask.saved.spawns:
        judged = [j for j in ingest.judge(root, base, opts, source)
                  if j.request in ask.saved.spawns]
    grove = load_desired(root, name, opts, ask.revision, judged) if judged else base
    # 4. observe
    actual = observe(root, name, grove, rts)
    # 5. plan
    if ask.saved is not None:
        check_fresh(root, base, ask.saved)
        _check_saved_spawns(grove, ask.saved)
        the_plan = ask.saved
    else:
        requested = tuple((j.request, j.spawn.name, j.spawn.parent) for j in judged)
        waiting = tuple(plan.Awaiting(
            j.request, j.spawn.name, j.spawn.parent,
            approval.short(approval.digest(j.spawn.document())),
            reader.visible(j.spawn.task), reader.one_line(j.spawn.profile, 80),
            reader.one_line(j.spawn.harness, 80), j.spawn.depends_on) for j in awaiting)
        the_plan = shape(plan.plan_grove(grove, actual, _spawn_reasons(judged), requested,
                                         waiting), grove, actual, ask)
    preflight(root, grove, the_plan, rts)
    result = Result(name, the_plan, desired=grove, actual=actual)
    if not ask.execute:
        return result
    # 6. confirm
    if the_plan.has_changes and ask.confirm is not None and not ask.confirm(the_plan):
        result.cancelled = True
        return result
    if ask.lock_id and not inventory.held(paths.state(root), name, ask.lock_id):
        raise LostLock(f"grove {name}: this operation's lock was removed (force-unlock?); "
                       "stopping without acting")
    # 7. execute: requests first (agents' reports taken, spawns written back and answered),
    # then the plan
    if not ask.destroy:  # before anything restarts: a report belongs to the run it was
        # made in (day-2 operations too, which take no other requests)
        signals.take(root, grove, actual.inventory, rts,
                     {n: o.phase for n, o in actual.observed.items()})
    if ask.take_requests and not ask.destroy:
        rep = ingest.process(root, base, opts, rts,
                             lambda g: status_rows(g, observe(root, g.name, g, rts)),
                             only={j.key: j.spawn for j in judged},
                             commit=True if ask.revision is not None else None,
                             source=source)
        result.accepted, result.rejected = rep.accepted, rep.rejected
        if judged:  # what was written back is what runs (a child shown but not taken in
            # stays out): plan again from the manifests, same observation
            grove = load_desired(root, name, opts, ask.revision)
            the_plan = _replanned(the_plan, shape(plan.plan_grove(grove, actual), grove,
                                                  actual, ask))
            result.plan, result.desired = the_plan, grove
    if not ask.destroy:  # budgets: what crossed one stops (its work kept), and stays so
        halted = budget.enforce(root, grove, actual, rts, log)
        the_plan = budget.hold(the_plan, halted + budget.blocked(grove, actual.inventory))
        result.plan = the_plan
    if the_plan.has_changes:
        result.outcomes = executor.execute(root, grove, the_plan, actual.inventory, rts,
                                           ask.hooks, ask.settings)
        actual = observe(root, name, grove, rts)
    result.actual = actual
    # 8. notify
    if not ask.destroy:
        told = ingest.notify_parents(root, grove, actual)
        if told or result.accepted or result.rejected:  # answers and notes reach remote
            sync_remote_inboxes(root, name, rts, log)   # inboxes now, not a pass later
        announce(root, grove, actual)
        _expire_inbox(root, name)
        notify.dispatch(root, grove)  # to people: in the background, never blocking
    return result


def announce(root: Path, grove: DesiredGrove, actual: Actual) -> int:
    """An `AgentEnded` event once per ending of each agent (what people are notified of)."""
    inv = actual.inventory
    told = 0
    for name, rec in sorted(inv.agents.items()):
        obs = actual.observed.get(name)
        if obs is None or obs.phase not in (SUCCEEDED, FAILED):
            continue
        mark = f"{obs.phase}:{rec.restarts}"
        if rec.announced == mark:
            continue
        rec.announced = mark
        events.record(root, {"grove": grove.name, "agent": name, "event": "AgentEnded",
                             "phase": obs.phase, "exitCode": obs.exit_code,
                             "reason": obs.reason})
        told += 1
    if told:
        inventory.save(paths.state(root), inv)
    return told


def _expire_inbox(root: Path, name: str) -> None:
    from engine import inbox

    clean = getattr(inbox, "clean_answered", None)
    if clean is not None:
        with contextlib.suppress(OSError, EngineError):
            clean(root, name)


def _spawn_reasons(judged: list[ingest.Judged]) -> dict[str, str]:
    return {j.spawn.name: f"spawn requested by {j.spawn.parent or 'engine spawn'}"
            for j in judged}


def _replanned(confirmed: GrovePlan, again: GrovePlan) -> GrovePlan:
    """The plan after the confirmed spawns were written back: the same actions, or the
    confirmation no longer stands."""
    def acts(p: GrovePlan) -> set[tuple[str, str, str]]:
        return {(c.agent, c.action.word, c.spec_hash) for c in p.changes
                if c.action.is_change}

    # a request rewritten after the plan was shown would run a child nobody confirmed
    if acts(again) - acts(confirmed):
        raise StalePlanError(f"grove {confirmed.grove}: the manifests changed while the "
                             "plan was confirmed; run it again")
    return dataclasses.replace(again, requested=confirmed.requested)


# -- stage 5 ----------------------------------------------------------------------------

def shape(p: GrovePlan, grove: DesiredGrove, actual: Actual, ask: Ask) -> GrovePlan:
    """The plan as this caller may carry it out: forced replacements and restarts,
    targets (and what they need), and an unattended controller's sync policy."""
    for n in sorted(ask.replace | ask.restart | ask.targets):
        if n not in grove.by_name and n not in actual.inventory.agents \
                and n not in actual.observed:
            raise EngineError(f"agent {grove.name}/{n}: not in the grove (agents: "
                              f"{', '.join(sorted(grove.by_name)[:10]) or 'none'})")
    changes = []
    for c in p.changes:
        a = grove.by_name.get(c.agent)
        if c.agent in ask.replace and a is not None and c.action is not Action.DELETE:
            c = Change(c.agent, Action.REPLACE if c.agent in actual.observed else
                       Action.CREATE, "replacement requested", a.runtime, a.host or "",
                       spec_hash=a.spec_hash, waits_for=c.waits_for)
        elif c.agent in ask.restart and a is not None and c.action is not Action.DELETE:
            # started again in its workspace, resuming the harness's session if it can
            c = Change(c.agent, Action.RESTART, "restart requested", a.runtime, a.host or "",
                       spec_hash=a.spec_hash)
        changes.append(c)
    if ask.targets:
        keep = set(ask.targets)
        for n in ask.targets:
            keep |= _needs(grove, n)
        changes = [c for c in changes if c.agent in keep]
    if ask.controller:
        changes = [_policy(c, grove, actual) for c in changes]
    if ask.finish:
        changes = [_finished(c, grove, actual) for c in changes]
    if ask.hold or ask.gave_up:
        changes = [_held(c, ask) for c in changes]
    return dataclasses.replace(p, changes=tuple(changes))


def _needs(grove: DesiredGrove, name: str) -> set[str]:
    """What `name` needs to run: its dependencies and its parent, transitively."""
    out: set[str] = set()
    todo = [name]
    while todo:
        a = grove.by_name.get(todo.pop())
        if a is None:
            continue
        for d in (*a.depends_on, *([a.spawned_by] if a.spawned_by else [])):
            if d not in out:
                out.add(d)
                todo.append(d)
    return out


def _policy(c: Change, grove: DesiredGrove, actual: Actual) -> Change:
    """The controller's sync policy (Argo CD's automated prune/selfHeal)."""
    if c.action is Action.DELETE and not grove.sync_prune:
        return dataclasses.replace(c, action=Action.ORPHAN, reason=c.reason +
                                   "; kept: spec.sync.prune is off (engine apply deletes it)")
    if not grove.self_heal and _is_drift(c, actual):
        return dataclasses.replace(c, action=Action.NOOP, reason=c.reason +
                                   "; not repaired: spec.sync.selfHeal is off")
    return c


def _held(c: Change, ask: Ask) -> Change:
    """Restarts per policy the controller is holding back (never one a person asked for)."""
    if c.action is not Action.RESTART or c.reason == "restart requested":
        return c
    if c.agent in ask.gave_up:
        return dataclasses.replace(c, action=Action.NOOP, reason=c.reason.split(",")[0] +
                                   f"; not restarted again by this wait (restarted "
                                   f"{RESTARTS_IN_A_WAIT} times)")
    if c.agent in ask.hold:
        return dataclasses.replace(c, action=Action.NOOP,
                                   reason=c.reason + "; restart backing off")
    return c


RESTARTS_IN_A_WAIT = 3  # `apply --wait` restarts a failing agent this often, then reports it


def _finished(c: Change, grove: DesiredGrove, actual: Actual) -> Change:
    """`apply --wait` returns once every agent has finished: one that Succeeded is not
    restarted by `restart: always` there (the long-running controller, engine watch, does)."""
    a, obs = grove.by_name.get(c.agent), actual.observed.get(c.agent)
    if c.action is Action.RESTART and a is not None and a.restart == "always" \
            and obs is not None and obs.phase == SUCCEEDED and c.reason != "restart requested":
        return dataclasses.replace(c, action=Action.NOOP, reason="succeeded (restart: always: "
                                   "engine watch restarts it)")
    return c


def _is_drift(c: Change, actual: Actual) -> bool:
    rec = actual.inventory.agents.get(c.agent)
    if rec is None or rec.pending:
        return False
    if c.action is Action.CREATE:  # recorded as started, gone from the runtime
        return not rec.error
    return c.action is Action.REPLACE and rec.spec_hash == c.spec_hash


def preflight(root: Path, grove: DesiredGrove, p: GrovePlan, rts: Runtimes) -> None:
    """The checks that would otherwise fail only while executing: a repository with a
    commit to start from, each starting agent's harness program and image."""
    starting = [c for c in p.changes
                if c.action in (Action.CREATE, Action.REPLACE, Action.RESTART)]
    if not starting:
        return
    from engine import workspace

    workspace.base_commit(root, grove.base_ref)
    for c in starting:
        a = grove.by_name.get(c.agent)
        if a is None:
            continue
        rt = rts.get(a.runtime, a.host)
        for check in ("check_program", "check_image"):
            fn = getattr(rt, check, None)
            if fn is not None:
                fn(a)


def _check_saved_spawns(grove: DesiredGrove, saved: GrovePlan) -> None:
    """The children a saved plan takes in are still the ones it showed (a request can be
    rewritten by its agent between plan and apply)."""
    for c in saved.changes:
        if c.agent in saved.spawn_agents and c.spec_hash:
            a = grove.by_name.get(c.agent)
            if a is None or a.spec_hash != c.spec_hash:
                raise StalePlanError(f"agent {grove.name}/{c.agent}: saved plan is stale: "
                                     "its spawn request changed or was withdrawn; run "
                                     "engine plan again")


def check_fresh(root: Path, grove: DesiredGrove, saved: GrovePlan) -> None:
    """Refuse a saved plan when the manifests or the inventory moved since it was made."""
    inv = inventory.load(paths.state(root), grove.name)
    if saved.manifest_digest != grove.manifest_digest:
        raise StalePlanError(f"grove {grove.name}: saved plan is stale: the manifests changed "
                             "since it was made; run engine plan again")
    if (saved.lineage, saved.serial) != (inv.lineage, inv.serial):
        raise StalePlanError(f"grove {grove.name}: saved plan is stale: the state changed "
                             f"since it was made (serial {saved.serial} -> {inv.serial}); "
                             "run engine plan again")
    spawned = set(saved.spawn_agents)
    for c in saved.changes:
        a = grove.by_name.get(c.agent)
        deleting = c.action in (Action.DELETE, Action.ORPHAN)
        if c.agent in spawned:
            continue
        if (a is None) != deleting or any(d not in grove.by_name and d not in spawned
                                          for d in c.waits_for):
            raise StalePlanError(f"agent {grove.name}/{c.agent}: the saved plan does not "
                                 "match the manifests (edited by hand?); run engine plan "
                                 "again")
        if c.spec_hash and a is not None and a.spec_hash != c.spec_hash:
            raise StalePlanError(f"agent {grove.name}/{c.agent}: saved plan is stale: its "
                                 "spec changed (a credential rotated?); run engine plan again")


# -- where the manifests come from -----------------------------------------------------

def current_branch(root: Path) -> str:
    """The branch checked out (the controller's default revision)."""
    from engine.trust.git import run as git

    try:
        return git(root, "symbolic-ref", "--quiet", "--short", "HEAD").strip()
    except EngineError:
        raise EngineError("the repository is on a detached HEAD: name the revision to "
                          "converge with --revision REF (or --working-tree)") from None


def resolve_revision(root: Path, ref: str) -> str:
    from engine import revisions

    return revisions.resolve(root, ref)


def manifests_modified(root: Path, name: str) -> bool:
    """Whether the grove's manifests in the working tree differ from HEAD's (tracked
    edits or new files; the engine's own uncommitted write-backs count too)."""
    from engine.trust.git import run as git

    try:
        out = git(root, "status", "--porcelain", "--untracked-files=all", "--",
                  f"{manifest.GROVES_DIR}/{name}")
    except EngineError:
        return False
    return bool(out.strip())


def record_revision(root: Path, name: str, commit: str) -> None:
    """Remember which commit the grove was last converged from ("" = working tree)."""
    inv = inventory.load(paths.state(root), name)
    if inv.revision != commit and (inv.agents or commit):
        inv.revision = commit
        inventory.save(paths.state(root), inv)


def event(root: Path, grove: str, kind: str, reason: str) -> None:
    events.record(root, {"grove": grove, "event": kind, "reason": reason})
