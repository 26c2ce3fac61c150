"""The controller: converge groves again whenever their revision, inboxes or agents change.

Called by `engine watch` (until stopped) and by `engine apply --wait` (the controller in the
foreground, until every agent has finished). Each pass of each grove is one
`converge.run` with the grove's lock held for that pass only, so `apply`, `destroy` and the
single-agent commands run between passes (they wait for a pass in progress).

What it converges is a git revision: by default the commit of the branch checked out,
resolved again on every pass, so uncommitted edits to manifests never act (Argo CD and
Flux converge commits too). The engine's own spawn write-backs are converged at once and
committed to the branch. `--working-tree` (a development mode, named as such) converges
the files as they are instead.

It wakes on: a change of the branch (`.git`), requests in `.engine/inbox/<grove>/`,
agents ending (`.engine/run/<grove>/`, the local runtime's exit files; on Kubernetes,
the runtime's watch of its Pods and Jobs: `start_watching`), and in
working-tree mode the manifests; a periodic resync with jitter catches the rest
(containers dying, clock-driven restarts). A failing pass is logged and the loop goes on.
A controller whose lock was removed from under it stops, saying so.

SIGINT/SIGTERM stop it at once: between passes the loop just ends; during a pass the
handler marks the pass cancelled (nothing new starts) and raises `Stopped` in the main
thread, which unwinds it (every step is safe to cut short, as a crash is) and releases the
lock. Whatever is still running GRACE seconds after the signal does not hold the process:
a reaper thread, woken only by the handler, removes this controller's lock and ends it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from engine import converge, desired, events, executor, inventory, manifest, paths, plan, runtimes
from engine.errors import EngineError, InvalidManifests, LockedError
from engine.observe import Runtimes
from engine.runtimes import FAILED, SUCCEEDED, Runtime

Log = Callable[[str], None]
GRACE = 0.5  # seconds from SIGINT/SIGTERM to the forced exit, if the unwinding is not done
BUSY_RETRY = 0.1  # seconds between attempts while another operation holds a grove's lock
MIN_GAP = 0.05  # seconds from the end of a pass to the start of one an event woke


class Stopped(BaseException):
    """SIGINT/SIGTERM during a pass: unwinds it (a BaseException, so no `except Exception`
    on the way swallows it)."""


@dataclass
class Options:
    interval: float = 10.0  # resync period (seconds), jittered by +-20%
    debounce: float = 0.005  # gather a burst of events into one pass
    parallelism: int = 8
    once: bool = False  # one pass, then return (tests, cron)
    max_passes: int = 0  # 0 = unbounded
    revision: str | None = ""  # a ref to converge; "" = the current branch; None = files
    until_done: bool = False  # `apply --wait`: return when every agent has finished
    timeout: float = 0.0  # with until_done: give up after this long (0 = never)


@dataclass
class Controller:
    root: Path
    groves: list[str]
    opts: desired.Options
    wopts: Options = field(default_factory=Options)
    log: Log = print
    hooks: executor.Hooks | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    passes: int = 0
    locks: dict[str, str] = field(default_factory=dict)  # grove -> lock ID held now
    in_pass: bool = False
    signalled: threading.Event = field(default_factory=threading.Event)  # the reaper's
    cancelled: threading.Event = field(default_factory=threading.Event)  # start nothing
    phases: dict[str, dict[str, str]] = field(default_factory=dict)  # until_done: last seen
    outcomes: list[tuple[str, executor.Outcome]] = field(default_factory=list)
    timed_out: bool = False
    lost: str = ""  # why the controller stopped acting ("" while it may)
    had_errors: bool = False  # a pass failed (`watch --once` reports it in its status)
    _busy: dict[str, str] = field(default_factory=dict)  # grove -> holder last reported
    _restarted: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    _idle_streak: int = 0  # passes in a row that changed nothing (_throttle)
    _pass_end: float = 0.0
    _acted: bool = False
    _watching: list[Any] = field(default_factory=list)  # runtimes watching for us

    def run(self) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_signals(self._on_signal, self._reap, self.signalled))
            if not self.wopts.until_done:  # one `engine watch` per grove
                for g in self.groves:
                    stack.enter_context(_sole_controller(self.root, g))
            stack.enter_context(self._observer())
            stack.callback(self._unwatch)
            what = ("the working tree (development mode: uncommitted edits act)"
                    if self.wopts.revision is None else
                    f"revision {self.wopts.revision or 'of the current branch'}")
            if not self.wopts.until_done:
                self.log(f"watching {', '.join(self.groves)}: converging {what} (resync "
                         f"every {self.wopts.interval:g}s)")
            with contextlib.suppress(Stopped):
                self._loop(Runtimes(self.root, self._runtime))
        if not self.wopts.until_done:
            self.log("stopped")

    def _loop(self, rts: Runtimes) -> None:
        deadline = time.monotonic() + self.wopts.timeout if self.wopts.timeout else 0.0
        while not self.stop.is_set():
            self.wake.clear()
            self.in_pass = True
            busy = False
            self._acted = False
            try:
                for g in self.groves:
                    busy |= not self.pass_once(g, rts)
                    if self.lost:
                        return
            finally:
                self.in_pass = False
                self._pass_end = time.monotonic()
            self._idle_streak = 0 if self._acted else self._idle_streak + 1
            self.passes += 1
            if self.wopts.once or (self.wopts.max_passes and
                                   self.passes >= self.wopts.max_passes):
                break
            if self.wopts.until_done and not busy and self._all_done():
                break
            if deadline and time.monotonic() > deadline:
                self.timed_out = True
                break
            pause = BUSY_RETRY if busy else self.wopts.interval * random.uniform(0.8, 1.2)
            due = self._next_restart()
            if due is not None:
                pause = min(pause, due + 0.01)
            if self.wopts.until_done:
                pause = min(pause, 0.5)  # a Docker agent's end wakes nothing: look often
            if deadline:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            if self.wake.wait(pause):
                self._throttle()
                time.sleep(self.wopts.debounce)

    def _runtime(self, name: str, root: Path, host: str | None) -> Runtime:
        """A runtime for the passes: one that can watch what it observes (kubernetes)
        does, and wakes the loop when that changes (a Pod ending starts a pass at once)."""
        rt = runtimes.get(name, root, host)
        start = getattr(rt, "start_watching", None)
        if callable(start):
            start(self.wake.set)
            self._watching.append(rt)
        return rt

    def _unwatch(self) -> None:
        for rt in self._watching:
            with contextlib.suppress(Exception):
                rt.stop_watching()
        self._watching.clear()

    def _throttle(self) -> None:
        """Passes woken by events start at least MIN_GAP after the last one ended, and after
        passes that found nothing to do the wait doubles up to a second: an agent writing
        requests or exit files in a loop cannot make the controller spin, while an event
        after a quiet spell or a pass that acted goes (almost) at once."""
        rest = MIN_GAP - (time.monotonic() - self._pass_end)
        if self._idle_streak:
            rest = max(rest, min(1.0, 0.02 * 2 ** min(self._idle_streak, 6)))
        if rest > 0:
            time.sleep(rest)

    def pass_once(self, name: str, rts: Runtimes) -> bool:
        """One pass over grove `name`; False when another operation held its lock."""
        try:
            with inventory.locked(paths.state(self.root), name, "watch") as info:
                self.locks[name] = info.id
                try:
                    self._pass(name, rts, info.id)
                finally:
                    self.locks.pop(name, None)
            self._busy.pop(name, None)
            return True
        except LockedError as e:
            if self._busy.get(name) != e.summary:
                self._busy[name] = e.summary
                self.log(f"grove {name}: waiting: {e.summary}")
            return False
        except converge.LostLock as e:
            self.lost = e.summary
            self.log(f"{e.summary}; the controller stops")
            events.record(self.root, {"grove": name, "event": "ControllerLostLock",
                                      "reason": e.summary})
            return True
        except InvalidManifests as e:
            self.had_errors = True
            self.log(f"grove {name}: manifests invalid, nothing changed: {e.summary}")
            events.record(self.root, {"grove": name, "event": "InvalidManifests",
                                      "reason": e.summary})
        except EngineError as e:
            self.had_errors = True
            self.log(f"grove {name}: {e.summary}")
            events.record(self.root, {"grove": name, "event": "PassFailed",
                                      "reason": e.summary})
        except Exception as e:  # a bug must not take the controller down; log it loudly
            self.had_errors = True
            self.log(f"grove {name}: internal error: {e!r}")
            events.record(self.root, {"grove": name, "event": "PassCrashed",
                                      "reason": repr(e)})
        return True

    def _backoff(self, grove: str) -> tuple[frozenset[str], frozenset[str]]:
        """Agents whose restart per policy waits (exponential back-off after each restart
        this controller made: 1 s, 2 s, 4 s ... up to 5 min, as Kubernetes does for a
        crash loop), and, for `apply --wait`, those restarted often enough already."""
        now = time.monotonic()
        hold = frozenset(a for (g, a), (n, t) in self._restarted.items()
                         if g == grove and now < t + _delay(n))
        gave_up = frozenset(a for (g, a), (n, _) in self._restarted.items()
                            if g == grove and self.wopts.until_done
                            and n >= converge.RESTARTS_IN_A_WAIT)
        return hold, gave_up

    def _next_restart(self) -> float | None:
        """Seconds until the earliest held restart may go (the loop wakes for it)."""
        now = time.monotonic()
        due = [t + _delay(n) - now for (n, t) in self._restarted.values()
               if t + _delay(n) > now]
        return min(due) if due else None

    def _pass(self, name: str, rts: Runtimes, lock_id: str) -> None:
        commit = self._commit()
        hold, gave_up = self._backoff(name)
        res = converge.run(self.root, converge.Ask(
            name, revision=commit, controller=True, finish=self.wopts.until_done,
            hold=hold, gave_up=gave_up,
            hooks=self.hooks or _LogHooks(self.log),
            settings=executor.Settings(parallelism=self.wopts.parallelism,
                                       cancelled=self.cancelled),
            lock_id=lock_id), rts, self.opts, self.log)
        converge.record_revision(self.root, name, commit or "")
        for child in res.accepted:
            self.log(f"grove {name}: spawn accepted: {child}")
        for rid, why in res.rejected:
            self.log(f"grove {name}: request {rid} rejected: {why}")
        self.outcomes.extend((name, o) for o in res.outcomes)
        for o in res.outcomes:
            if o.action is plan.Action.RESTART and o.status != "failed":
                n, _ = self._restarted.get((name, o.agent), (0, 0.0))
                self._restarted[(name, o.agent)] = (n + 1, time.monotonic())
        self._acted |= bool(res.outcomes or res.accepted or res.rejected)
        if self.wopts.until_done and res.desired is not None and res.actual is not None:
            phases = terminal_phases(res.desired, res.actual, res.plan)
            for c in res.plan.changes:  # a restart backing off is not an ending
                if c.agent in hold and c.agent not in gave_up and \
                        c.reason.endswith("restart backing off"):
                    phases[c.agent] = "Restarting"
            self.phases[name] = phases

    def _commit(self) -> str | None:
        if self.wopts.revision is None:
            return None
        ref = self.wopts.revision or converge.current_branch(self.root)
        return converge.resolve_revision(self.root, ref)

    def _all_done(self) -> bool:
        """Every agent of every grove Succeeded, Failed, is blocked behind a failure or is
        stopped, and no request waits in an inbox but those waiting for a person (engine
        approve: no pass of the controller can answer them)."""
        from engine import approval, inbox

        for g in self.groves:
            phases = self.phases.get(g)
            if phases is None or any(p not in DONE for p in phases.values()):
                return False
            reqs, bad = inbox.scan(self.root, g)
            try:
                people = {k for k, e in approval.load(self.root, g).items()
                          if e.announced and not e.decision}
            except EngineError:
                people = set()
            if bad or any(f"{r.agent}/{r.id}" not in people for r in reqs):
                return False
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = not self.stop.is_set()
        self.stop.set()
        self.cancelled.set()  # nothing new starts, whatever else happens
        self.signalled.set()  # the reaper first: nothing below can keep us past GRACE
        self.wake.set()
        if first and self.in_pass:
            raise Stopped(f"signal {signum}")

    def _reap(self) -> None:
        """GRACE seconds after a signal, end the process if the unwinding has not: drop
        our locks first. Returns at once when run() ends without a signal."""
        self.signalled.wait()
        if not self.stop.is_set():
            return
        time.sleep(GRACE)
        for g, lock_id in list(self.locks.items()):
            with contextlib.suppress(EngineError, OSError):
                inventory.release(paths.state(self.root), g, lock_id)
        with contextlib.suppress(Exception):
            self.log("stopped (forced)")
            sys.stderr.flush()
        with contextlib.suppress(Exception):  # a live view may have hidden the cursor
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[?25h\n")
                sys.stdout.flush()
        os._exit(130 if self.wopts.until_done else 0)

    @contextlib.contextmanager
    def _observer(self) -> Iterator[None]:
        # watchdog warns (from its own thread) when a watched directory is replaced and its
        # watch re-added: harmless, and never the user's business
        warnings.filterwarnings("ignore", message="Callback with id",
                                category=RuntimeWarning, module="watchdog")
        obs: Any = Observer()
        handler = _Wake(self.wake, self.root)
        dirs: list[tuple[Path, bool]] = []
        for g in self.groves:
            dirs += [(paths.state(self.root) / "inbox" / g, True),
                     (paths.state(self.root) / "run" / g, True)]
            if self.wopts.revision is None:
                dirs.append((self.root / manifest.GROVES_DIR / g, True))
        git_dir = self.root / ".git"
        if self.wopts.revision is not None and git_dir.is_dir():
            dirs += [(git_dir, False), (git_dir / "refs" / "heads", True)]
        for d, recursive in dirs:
            d.mkdir(parents=True, exist_ok=True)
            obs.schedule(handler, str(d), recursive=recursive)
        obs.start()
        try:
            yield
        finally:
            obs.stop()
            obs.join(timeout=5)


DONE = (SUCCEEDED, FAILED, "Blocked", "Stopped")


def _delay(restarts: int) -> float:
    """Back-off before the next restart per policy, after `restarts` of them."""
    return min(300.0, 2.0 ** max(0, restarts - 1))


@contextlib.contextmanager
def _sole_controller(root: Path, grove: str) -> Iterator[None]:
    """The mark of the grove's one controller, held for its life (a lock of its own: the
    grove's lock is taken per pass). A second `engine watch` is refused, naming the first."""
    mark = inventory.locked(paths.state(root), f"{grove}.controller", "watch")
    try:
        mark.__enter__()
    except LockedError as e:
        holder = inventory.read_lock(paths.state(root), f"{grove}.controller")
        who = f" (pid {holder.pid} on {holder.host}, since {holder.created})" if holder \
            else ""
        raise EngineError(f"grove {grove} already has a controller: engine watch{who}",
                          "stop it first (kill -TERM PID); apply and destroy run beside it"
                          ) from e
    try:
        yield
    finally:
        mark.__exit__(None, None, None)


def terminal_phases(grove: desired.DesiredGrove, actual: Any, the_plan: plan.GrovePlan
                    ) -> dict[str, str]:
    """Each agent's phase for `apply --wait`: as observed; Failed when its last start
    failed; Blocked behind a failed dependency (however far up); Stopped when stopped."""
    inv = actual.inventory
    phases: dict[str, str] = {}
    for a in grove.agents:
        rec = inv.agents.get(a.name)
        obs = actual.observed.get(a.name)
        if rec is not None and rec.stopped:
            phases[a.name] = "Stopped"
        elif obs is not None:
            phases[a.name] = obs.phase
        elif rec is not None and rec.error:
            phases[a.name] = FAILED
        elif rec is not None and rec.pruned_at:
            phases[a.name] = rec.pruned_phase() or SUCCEEDED
        else:
            phases[a.name] = "Pending"
    changed = True
    while changed:
        changed = False
        for a in grove.agents:
            if phases[a.name] == "Pending" and any(
                    phases.get(d) in (FAILED, "Blocked") for d in a.depends_on):
                phases[a.name] = "Blocked"
                changed = True
    return phases


class _Wake(FileSystemEventHandler):
    """Wakes the controller for what changes a pass: a request arriving in an inbox (the
    rename of the finished `req-*.json`), a local agent's exit files, a branch moving,
    and in working-tree mode a manifest saved. Anything else an agent writes into the
    watched directories wakes nothing."""

    def __init__(self, flag: threading.Event, root: Path) -> None:
        self.flag = flag
        state = paths.state(root)
        self.inbox, self.run = f"{state}/inbox/", f"{state}/run/"
        self.git, self.groves = f"{root}/.git/", f"{root}/{manifest.GROVES_DIR}/"

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        path = str(getattr(event, "dest_path", "") or event.src_path)
        if self.wakes(path):
            self.flag.set()

    def wakes(self, path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        if base.endswith(".lock"):
            return False
        if path.startswith(self.inbox):
            return base.startswith("req-") and base.endswith(".json")
        if path.startswith(self.run):
            return base in ("exit", "reason")
        if path.startswith(self.git):
            return "/refs/heads/" in path or base in ("HEAD", "packed-refs")
        return path.startswith(self.groves) and base.endswith(".yaml")


class _LogHooks:
    def __init__(self, log: Log) -> None:
        self.log = log

    def started(self, grove: str, change: plan.Change) -> None:
        pass

    def finished(self, grove: str, o: executor.Outcome) -> None:
        extra = f": {o.message}" if not o.ok else ""
        self.log(f"{grove}/{o.agent}: {o.status}{extra}")


@contextlib.contextmanager
def _signals(handler: Callable[[int, FrameType | None], None], reaper: Callable[[], None],
             release: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM go to `handler` (main thread only), with `reaper` running in a
    daemon thread until `release` is set (by the handler, or here at the end)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    threading.Thread(target=reaper, name="controller-reaper", daemon=True).start()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        release.set()
