"""Kubernetes runtime, watching: one informer per (cluster, kind, namespace, selector).

Called by `engine.runtimes.kubernetes` once watching is on (`start_watching`, which the
controller calls; one-shot commands never start a thread). An informer LISTs once (the
items and the list's resourceVersion), then its daemon thread WATCHes from that
resourceVersion and applies each event to a cache of slim objects (what `k8s_api.essence`
reads). Bookmarks advance the resourceVersion. A stream that ends or breaks is watched
again from the last resourceVersion: nothing is missed and nothing is listed. 410 Expired,
an ERROR event, a malformed or oversized line or a failed request means a LIST again (with
back-off), and until it succeeds the informer is not synced: `items` answers None and
observe lists for itself. A full LIST every `resync` seconds bounds what a lost event can
hide. The server is not trusted: lines are capped at MAX_LINE bytes, the cache and a
list at MAX_OBJECTS (and a list's pages, a continue token given twice refused), a watch
unanswered or silent at its timeout and GRACE, and no exception leaves the thread; an
informer that has heard nothing for longer than a resync and a watch take (a stuck
thread) is not read.

Read-your-writes: after this process writes a Pod or Job (`expect`), `items` answers from
the cache only once the cache shows that write (its resourceVersion or later; gone or
terminating after a delete), so a pass never plans from a cache older than its own last
actions; a write not shown within EXPECT_TTL unsyncs the informer and it lists again.
This module does not import the `kubernetes` package.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import urllib3

from engine.errors import EngineError
from engine.runtimes import k8s_api as api
from engine.runtimes.k8s_api import Call, Cluster

RESYNC = 300.0  # seconds between full LISTs of a synced informer
WATCH_TIMEOUT = 240  # timeoutSeconds of one watch request (jittered up to +25%)
GRACE = 30.0  # a stream still open this long after its timeoutSeconds is broken
MAX_LINE = 4 << 20  # bytes of one watch event (etcd's largest object is 1.5 MiB)
MAX_OBJECTS = 50_000  # objects one informer caches; more: not synced, observe lists
BACKOFF = (0.5, 30.0)  # seconds: first and longest wait before listing again
MAX_BROKEN = 5  # watches in a row that break or end at once before a LIST again
SYNC_WAIT = 10.0  # seconds observe waits for a new informer's first LIST
FRESH_WAIT = 2.0  # seconds observe waits for the cache to show this process's writes
EXPECT_TTL = 30.0  # seconds a write is waited for before the informer lists again
_CHUNK = 64 << 10

Slim = dict[str, Any]


class _Expired(Exception):
    """410: the resourceVersion is older than the server's history: LIST again."""


class _Bad(Exception):
    """The server said something the informer cannot use: LIST again, after back-off."""


def list_all(cl: Cluster, kind: str, ns: str, selector: str, page: int
             ) -> tuple[list[dict[str, Any]], str]:
    """(every object of `kind` matching `selector`, the list's resourceVersion), in pages
    of `page` (the first page's resourceVersion: later pages are of the same snapshot).
    More than MAX_OBJECTS objects, more pages than they take, or a continue token given
    twice is a one-line EngineError: a server never holds the caller in an endless list."""
    items: list[dict[str, Any]] = []
    query = {"labelSelector": selector, "limit": str(page)}
    rv = ""
    seen: set[str] = set()
    for _ in range(MAX_OBJECTS // max(page, 1) + 1):
        got = cl.request("GET", api.path(kind, ns), Call("list", api.plural(kind), ns),
                         query=query)
        got = got if isinstance(got, dict) else {}
        meta = got.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        rv = rv or str(meta.get("resourceVersion") or "")
        more = got.get("items")
        items += [o for o in more if isinstance(o, dict)] if isinstance(more, list) else []
        if len(items) > MAX_OBJECTS:
            break
        token = str(meta.get("continue") or "")
        if not token:
            return items, rv
        if token in seen:
            raise EngineError(f"kubernetes: list {api.plural(kind)} in namespace {ns}: the "
                              "server gave the same continue token twice; refused")
        seen.add(token)
        query = {**query, "continue": token}
    raise EngineError(f"kubernetes: list {api.plural(kind)} in namespace {ns}: more than "
                      f"{MAX_OBJECTS} objects (or pages of {page}); refused")


def _wanted(selector: str) -> dict[str, str]:
    """The `k=v` terms of a selector (all `k8s_objects.selector` makes)."""
    return dict(t.split("=", 1) for t in selector.split(",") if "=" in t)


def _slim(obj: Any, want: dict[str, str]) -> tuple[str, Slim | None]:
    """(name, what essence reads of the object), None for one outside the selection;
    _Bad for what is not an object."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name or not isinstance(meta, dict):
        raise _Bad("an object without metadata.name")
    labels = meta.get("labels")  # labels that are not an object read as none
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    if any(labels.get(k) != v for k, v in want.items()):
        return name, None
    keep = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp",
            "deletionTimestamp")
    status = obj.get("status")
    return name, {"metadata": {**{k: meta[k] for k in keep if k in meta}, "labels": labels},
                  "status": status if isinstance(status, dict) else {}}


def _view(obj: Slim | None) -> Any:
    """What observe sees of an object: a change elsewhere (resourceVersion alone) wakes
    nobody."""
    if obj is None:
        return None
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return meta, obj["status"]


def _rv(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


class Informer:
    """A cache of one kind's objects in one namespace, kept by a LIST and a WATCH."""

    def __init__(self, cluster: Cluster, kind: str, namespace: str, selector: str, *,
                 page: int = 500, resync: float = RESYNC, timeout: int = WATCH_TIMEOUT,
                 on_change: Callable[[], None] | None = None) -> None:
        self.cluster, self.kind, self.namespace, self.selector = (cluster, kind, namespace,
                                                                  selector)
        self.page, self.resync, self.timeout = page, resync, timeout
        self.on_change = on_change
        self.lists = 0  # LISTs made (the first one and every relist, resync or error)
        self.watches = 0  # watch requests made
        self.error = ""  # why it is not synced ("" when it is, or before the first LIST)
        self.listed_at = 0.0  # time.monotonic() of the last LIST that succeeded
        self.heard_at = 0.0  # ... of the last LIST, event or watch that ended cleanly
        self._want = _wanted(selector)
        self._cond = threading.Condition()
        self._cache: dict[str, Slim] = {}
        self._rv = ""
        self._synced = False
        self._ever = False  # synced once: later differences wake the controller
        self._next_list = 0.0
        self._expect: dict[str, tuple[int | None, bool, float]] = {}  # (rv, gone, until)
        self._tried = threading.Event()
        self._stop = threading.Event()
        self._resp: Any = None
        self._thread = threading.Thread(
            target=self._run, name=f"k8s-watch-{kind.lower()}-{namespace}", daemon=True)

    # -- the caller's side --------------------------------------------------------------

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self, wait: float = 5.0) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:  # a read in progress returns at once
            with contextlib.suppress(Exception):
                resp.shutdown()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(wait)

    @property
    def synced(self) -> bool:
        with self._cond:
            return self._synced

    @property
    def resource_version(self) -> str:
        with self._cond:
            return self._rv

    def items(self, wait: float = FRESH_WAIT) -> list[Slim] | None:
        """The cached objects; None (the caller lists) when the informer is not synced,
        has heard nothing from the server for longer than a resync and a watch take (its
        thread is stuck), or its cache does not show this process's writes yet after
        `wait` seconds. A new informer's first LIST is waited for up to SYNC_WAIT."""
        if not self._tried.wait(SYNC_WAIT):
            return None
        deadline = time.monotonic() + wait
        with self._cond:
            while self._synced and not self._fresh():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            # a working thread hears (a LIST, an event, a watch's end) at least once a
            # resync and a watch (of at least 1 s, at most its timeout) and GRACE
            quiet = self.resync + max(1.0, min(self.timeout * 1.25, self.resync)) + GRACE
            stale = time.monotonic() - self.heard_at > quiet
            return list(self._cache.values()) if self._synced and not stale else None

    def expect(self, name: str, written: dict[str, Any] | None) -> None:
        """This process wrote `name`: the server's answer to an apply, or None for a
        delete (then the cache must show it gone or terminating)."""
        rv = _rv(((written or {}).get("metadata") or {}).get("resourceVersion"))
        gone = written is None
        if written is not None:  # an object outside the selection is expected absent
            with contextlib.suppress(_Bad):
                gone = _slim(written, self._want)[1] is None
        with self._cond:
            self._expect[name] = (rv, gone, time.monotonic() + EXPECT_TTL)

    def _fresh(self) -> bool:
        """Every write expected is in the cache (the lock is held). A write the cache has
        not shown within EXPECT_TTL means the watch missed it: the informer is not synced
        and lists again (its watch is cut), so the cache is not trusted."""
        now = time.monotonic()
        for name, (rv, gone, until) in list(self._expect.items()):
            have = self._cache.get(name)
            if gone:
                met = have is None or bool(have["metadata"].get("deletionTimestamp"))
            else:
                seen = _rv(have["metadata"].get("resourceVersion")) if have else None
                met = have is not None and (rv is None or (seen or 0) >= rv)
            if met:
                del self._expect[name]
            elif now > until:
                self._expect.clear()
                self._synced = False
                self.error = (f"a write of {name} did not show in the watch within "
                              f"{EXPECT_TTL:g}s; listing again")
                self._next_list = 0.0
                resp = self._resp
                if resp is not None:  # the thread stops watching and lists at once
                    with contextlib.suppress(Exception):
                        resp.shutdown()
                self._cond.notify_all()
                return True
        return not self._expect

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        failures = broken = 0
        while not self._stop.is_set():
            try:
                if not self.synced or time.monotonic() >= self._next_list:
                    self._list()
                    failures = 0
                if self._watch():
                    broken = 0
                    continue
                # cut mid-stream, or ended at once: watch again from the same
                # resourceVersion, soon; after MAX_BROKEN of these in a row, list again
                broken += 1
                if broken >= MAX_BROKEN:
                    raise _Bad(f"{broken} watches in a row broke or ended at once")
                self._stop.wait(min(BACKOFF[1], 0.05 * 2 ** broken))
            except _Expired:
                self._unsync("the watch's resourceVersion expired (410)")
            except Exception as e:  # every failure only means: not synced, list again
                self._unsync(_why(e))
                failures += 1
                delay = min(BACKOFF[1], BACKOFF[0] * 2 ** min(failures - 1, 10))
                self._stop.wait(delay * random.uniform(0.8, 1.2))

    def _unsync(self, why: str) -> None:
        with self._cond:
            self._synced, self.error = False, why
            self._cond.notify_all()
        self._tried.set()

    def _list(self) -> None:
        self.lists += 1
        items, rv = list_all(self.cluster, self.kind, self.namespace, self.selector,
                             self.page)
        if not rv:
            raise _Bad("the list has no resourceVersion")
        if len(items) > MAX_OBJECTS:
            raise _Bad(f"more than {MAX_OBJECTS} objects")
        fresh: dict[str, Slim] = {}
        for obj in items:
            name, slim = _slim(obj, self._want)
            if slim is not None:
                fresh[name] = slim
        with self._cond:
            changed = self._ever and ({k: _view(v) for k, v in self._cache.items()}
                                      != {k: _view(v) for k, v in fresh.items()})
            self._cache, self._rv, self._synced, self._ever = fresh, rv, True, True
            self.error = ""
            self.listed_at = self.heard_at = time.monotonic()
            self._next_list = self.listed_at + self.resync
            self._cond.notify_all()
        self._tried.set()
        if changed:
            self._changed()

    def _watch(self) -> bool:
        """One watch request, read to its end; False when the stream broke, or ended
        within a second having said nothing (a server ending every watch at once)."""
        left = max(1.0, self._next_list - time.monotonic())
        timeout = int(max(1, min(left, self.timeout * random.uniform(1.0, 1.25))))
        self.watches += 1
        resp = self.cluster.request(  # a server that goes silent, before its answer's
            "GET", api.path(self.kind, self.namespace),  # headers or after, does not
            Call("watch", api.plural(self.kind), self.namespace),  # hold the thread
            query={"labelSelector": self.selector, "watch": "1",
                   "resourceVersion": self.resource_version, "allowWatchBookmarks": "true",
                   "timeoutSeconds": str(timeout)}, stream=True, timeout=timeout + GRACE,
            idle=timeout + GRACE)
        with self._cond:
            self._resp = resp
        if self._stop.is_set():  # stop() came before there was a response to shut down
            resp.close()
            return True
        began = time.monotonic()
        deadline = began + timeout + GRACE
        buf = bytearray()
        clean = said = False
        try:
            for chunk in resp.stream(_CHUNK):
                start = len(buf)
                buf += chunk
                while (i := buf.find(b"\n", start)) >= 0:
                    if i > MAX_LINE:
                        raise _Bad(f"a watch event longer than {MAX_LINE} bytes")
                    line = bytes(buf[:i])
                    del buf[:i + 1]
                    start = 0
                    if line.strip():
                        self._event(line)
                        said = True
                if len(buf) > MAX_LINE:
                    raise _Bad(f"a watch event longer than {MAX_LINE} bytes")
                if self._stop.is_set() or time.monotonic() > deadline:
                    return True
            clean = True
            with self._cond:
                self.heard_at = time.monotonic()
            if bytes(buf).strip():
                self._event(bytes(buf))
                said = True
        except (OSError, urllib3.exceptions.HTTPError):  # broken, timed out, shut down
            return False
        finally:
            self._resp = None
            with contextlib.suppress(Exception):
                if clean:
                    resp.release_conn()
                else:
                    resp.close()
        return said or time.monotonic() - began >= 1.0

    def _event(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
        except (ValueError, RecursionError):
            raise _Bad("a watch event is not JSON") from None
        obj = ev.get("object") if isinstance(ev, dict) else None
        kind = ev.get("type") if isinstance(ev, dict) else None
        if not isinstance(obj, dict):
            raise _Bad("a watch event without an object")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired()
            raise _Bad(f"watch error: {str(obj.get('message') or obj.get('code'))[:200]}")
        rv = (obj.get("metadata") or {}).get("resourceVersion") \
            if isinstance(obj.get("metadata"), dict) else None
        if not isinstance(rv, str) or not rv:
            raise _Bad("a watch event without a resourceVersion")
        if kind == "BOOKMARK":
            with self._cond:
                self._rv, self.heard_at = rv, time.monotonic()
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise _Bad(f"a watch event of type {str(kind)[:40]!r}")
        name, slim = _slim(obj, self._want)
        with self._cond:
            before = self._cache.get(name)
            if kind == "DELETED" or slim is None:
                self._cache.pop(name, None)
            elif name in self._cache or len(self._cache) < MAX_OBJECTS:
                self._cache[name] = slim
            else:
                raise _Bad(f"more than {MAX_OBJECTS} objects")
            self._rv, self.heard_at = rv, time.monotonic()
            changed = _view(before) != _view(self._cache.get(name))
            self._cond.notify_all()
        if changed:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            with contextlib.suppress(Exception):
                self.on_change()


def _why(e: Exception) -> str:
    summary = getattr(e, "summary", None)
    return str(summary or e or type(e).__name__)[:300]
