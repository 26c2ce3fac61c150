"""The controller: re-converge a grove whenever its manifests, inboxes or agents change.

Called by `engine watch`. Holds each grove's lock for as long as it runs (one controller
per grove). watchdog reports changes under `groves/<grove>/` (manifests), `.engine/inbox/
<grove>/` (requests) and `.engine/run/<grove>/` (agents ending on the local runtime); a
periodic resync with jitter catches everything else (containers dying, clock-driven
restarts). Each pass: ingest requests, load manifests (a bad edit is logged and the last
good desired state kept), plan, execute, notify parents. A failing pass is logged and the
loop goes on (one agent's bad request is only that request's rejection).

SIGINT/SIGTERM stop it at once: between passes the loop just ends; during a pass the
handler raises `Stopped` in the main thread, which unwinds the pass (every step is safe to
cut short, as a crash is) and releases the locks. Whatever is still running GRACE seconds
after the signal (a blocked call, worker threads) does not hold the process: a reaper
thread, started before the first lock is taken and woken only by the handler, removes this
controller's lock files and ends it. So `engine watch` always ends within a second of the
signal and never leaves a grove locked.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from engine import desired, events, executor, inbox, ingest, inventory, manifest, plan
from engine.desired import DesiredGrove
from engine.errors import EngineError, InvalidManifests
from engine.observe import Runtimes, observe, status_rows

Log = Callable[[str], None]
GRACE = 0.5  # seconds from SIGINT/SIGTERM to the forced exit, if the unwinding is not done


class Stopped(BaseException):
    """SIGINT/SIGTERM during a pass: unwinds it (a BaseException, so no `except Exception`
    on the way swallows it)."""


@dataclass
class Options:
    interval: float = 10.0  # resync period (seconds), jittered by +-20%
    debounce: float = 0.02  # gather a burst of events into one pass
    parallelism: int = 8
    once: bool = False  # one pass, then return (tests, cron)
    max_passes: int = 0  # 0 = unbounded


class _Wake(FileSystemEventHandler):
    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def on_any_event(self, event: FileSystemEvent) -> None:
        # a finished request arrives as a rename of its temporary file: look at the target
        path = str(getattr(event, "dest_path", "") or event.src_path)
        if "/.req-" in path or path.endswith(".tmp") or "/res-" in path \
                or "/done-" in path or "/bad-" in path or "/notify-" in path \
                or event.event_type in (
                    "opened", "closed_no_write"):
            return  # our own writes and half-written requests: nothing to do yet
        self.flag.set()


@dataclass
class Controller:
    root: Path
    groves: list[str]
    opts: desired.Options
    wopts: Options = field(default_factory=Options)
    log: Log = print
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    last_good: dict[str, DesiredGrove] = field(default_factory=dict)
    passes: int = 0
    locks: list[tuple[str, str]] = field(default_factory=list)  # (grove, lock id) held
    in_pass: bool = False
    signalled: threading.Event = field(default_factory=threading.Event)  # the reaper's

    def run(self) -> None:
        with contextlib.ExitStack() as stack:
            # the handler first: a signal while the locks are taken still ends us cleanly
            stack.enter_context(_signals(self._on_signal, self._reap, self.signalled))
            for g in self.groves:
                info = stack.enter_context(inventory.locked(self.root / ".engine", g,
                                                            "watch"))
                self.locks.append((g, info.id))
            stack.enter_context(self._observer())
            self.log(f"watching {', '.join(self.groves)} (resync every "
                     f"{self.wopts.interval:g}s)")
            with contextlib.suppress(Stopped):
                self._loop(Runtimes(self.root))
        self.log("stopped")

    def _loop(self, rts: Runtimes) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            self.in_pass = True
            try:
                for g in self.groves:
                    self.pass_once(g, rts)
            finally:
                self.in_pass = False
            self.passes += 1
            if self.wopts.once or (self.wopts.max_passes and
                                   self.passes >= self.wopts.max_passes):
                break
            jitter = self.wopts.interval * random.uniform(0.8, 1.2)
            if self.wake.wait(jitter):
                time.sleep(self.wopts.debounce)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = not self.stop.is_set()
        self.stop.set()
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
        for g, lock_id in self.locks:
            with contextlib.suppress(EngineError, OSError):
                inventory.force_unlock(self.root / ".engine", g, lock_id)
        with contextlib.suppress(Exception):
            self.log("stopped (forced)")
            sys.stderr.flush()
        os._exit(0)

    @contextlib.contextmanager
    def _observer(self) -> Iterator[None]:
        obs: Any = Observer()
        handler = _Wake(self.wake)
        for g in self.groves:
            for d in (self.root / manifest.GROVES_DIR / g,
                      self.root / ".engine" / "inbox" / g, self.root / ".engine" / "run" / g):
                d.mkdir(parents=True, exist_ok=True)
                obs.schedule(handler, str(d), recursive=True)
        obs.start()
        try:
            yield
        finally:
            obs.stop()
            obs.join(timeout=5)

    def _desired(self, name: str) -> DesiredGrove | None:
        try:
            g = desired.build(manifest.load_grove(self.root / manifest.GROVES_DIR / name,
                                                  self.root), self.opts)
        except InvalidManifests as e:
            self.log(f"grove {name}: manifests invalid, keeping the last good state: "
                     f"{e.summary}")
            events.record(self.root, {"grove": name, "event": "InvalidManifests",
                                      "reason": e.summary})
            return self.last_good.get(name)
        self.last_good[name] = g
        return g

    def pass_once(self, name: str, rts: Runtimes) -> None:
        try:
            self._pass(name, rts)
        except EngineError as e:
            self.log(f"grove {name}: {e.summary}")
            events.record(self.root, {"grove": name, "event": "PassFailed",
                                      "reason": e.summary})
        except Exception as e:  # a bug must not take the controller down; log it loudly
            self.log(f"grove {name}: internal error: {e!r}")
            events.record(self.root, {"grove": name, "event": "PassCrashed",
                                      "reason": repr(e)})

    def _pass(self, name: str, rts: Runtimes) -> None:
        grove = self._desired(name)
        if grove is None:
            return
        # 1. requests from agents (spawns become manifest entries); runtimes whose agents
        # cannot write to the host's inbox directory (Pods) carry it over their API first
        self._sync_remote_inboxes(grove, rts)
        rep = ingest.process(self.root, grove, self.opts, rts,
                             lambda g: status_rows(g, observe(self.root, g.name, g, rts)))
        for child in rep.accepted:
            self.log(f"grove {name}: spawn accepted: {child}")
        for rid, why in rep.rejected:
            self.log(f"grove {name}: request {rid} rejected: {why}")
        if rep.wrote_manifests:
            grove = self._desired(name) or grove
        # 2. converge
        actual = observe(self.root, name, grove, rts)
        the_plan = plan.plan_grove(grove, actual)
        if the_plan.has_changes:
            res = executor.execute(self.root, grove, the_plan, actual.inventory, rts,
                                   _LogHooks(self.log),
                                   executor.Settings(parallelism=self.wopts.parallelism))
            del res
            actual = observe(self.root, name, grove, rts)
        # 3. tell parents about children that ended
        ingest.notify_parents(self.root, grove, actual)


    def _sync_remote_inboxes(self, grove: DesiredGrove, rts: Runtimes) -> None:
        remote = [a for a in grove.agents if a.runtime == "kubernetes"]
        if not remote:
            return
        running = observe(self.root, grove.name, grove, rts).observed
        for a in remote:
            obs = running.get(a.name)
            rt = rts.get(a.runtime, a.host)
            sync = getattr(rt, "sync_inbox", None)
            if obs is None or obs.phase != "Running" or sync is None:
                continue
            try:
                sync(grove.name, a.name, inbox.inbox_dir(self.root, grove.name, a.name))
            except EngineError as e:
                self.log(f"{grove.name}/{a.name}: inbox sync failed: {e.summary}")


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
    threading.Thread(target=reaper, name="watch-reaper", daemon=True).start()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        release.set()
