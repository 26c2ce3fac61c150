"""The controller: re-converge a grove whenever its manifests, inboxes or agents change.

Called by `engine watch`. Holds each grove's lock for as long as it runs (one controller
per grove). watchdog reports changes under `groves/<grove>/` (manifests), `.engine/inbox/
<grove>/` (requests) and `.engine/run/<grove>/` (agents ending on the local runtime); a
periodic resync with jitter catches everything else (containers dying, clock-driven
restarts). Each pass: ingest requests, load manifests (a bad edit is logged and the last
good desired state kept), plan, execute, notify parents. A failing pass is logged and the
loop goes on. SIGINT/SIGTERM stop it after the current pass.
"""

from __future__ import annotations

import contextlib
import random
import signal
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
                or "/done-" in path or "/notify-" in path or event.event_type in (
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

    def run(self) -> None:
        with contextlib.ExitStack() as stack:
            for g in self.groves:
                stack.enter_context(inventory.locked(self.root / ".engine", g, "watch"))
            stack.enter_context(self._observer())
            stack.enter_context(_signals(self.stop, self.wake))
            rts = Runtimes(self.root)
            self.log(f"watching {', '.join(self.groves)} (resync every "
                     f"{self.wopts.interval:g}s)")
            while not self.stop.is_set():
                self.wake.clear()
                for g in self.groves:
                    self.pass_once(g, rts)
                self.passes += 1
                if self.wopts.once or (self.wopts.max_passes and
                                       self.passes >= self.wopts.max_passes):
                    break
                jitter = self.wopts.interval * random.uniform(0.8, 1.2)
                if self.wake.wait(jitter):
                    time.sleep(self.wopts.debounce)
        self.log("stopped")

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
def _signals(stop: threading.Event, wake: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        wake.set()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
