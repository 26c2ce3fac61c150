"""Benchmark: what people-in-the-loop adds to a converge pass.

1. Taking agents' reports. AGENTS agents each leave REPORTS AgentReports (usage and
   waiting/working, as the adapters write them) in their inboxes; `signals.take` applies
   them to the inventory, records NeedsInput events, saves the inventory and removes
   them. Baseline, measured in the same run: `inbox.scan` of the same inboxes, the read
   any handling must at least make. Target: under 3x the baseline.
2. Telling people. `notify.dispatch` of EVENTS new events routed to a webhook that accepts
   connections and never answers, one that answers 500, and a stream file. Baseline: the
   same dispatch with no route matching (reading the new events only). Target: the pass
   waits for no delivery: under 50 ms, whatever the hooks do.

    python bench/bench_people.py [--agents N] [--reports N] [--events N] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import events, inbox, inventory, notify, paths, signals  # noqa: E402
from engine.desired import DesiredGrove, Policy  # noqa: E402
from engine.inventory import Inventory, Record  # noqa: E402


def grove(root: Path, spec: dict[str, object]) -> DesiredGrove:
    return DesiredGrove("bench", root / "groves" / "bench", "", "worktree", Policy(50, 3, 10),
                        False, "", (), (), (), "", notify=spec)


def write_reports(root: Path, agents: int, reports: int) -> None:
    for a in range(agents):
        box = inbox.inbox_dir(root, "bench", f"a{a}")
        box.mkdir(parents=True, exist_ok=True)
        for r in range(reports):
            spec = ({"state": "waiting", "message": f"question {r}?"} if r % 2 else
                    {"usage": {"inputTokens": 1000 * r, "outputTokens": 10 * r}})
            rid = f"20261130T000000.{r:09d}-{a:010d}"
            (box / f"req-{rid}.json").write_text(json.dumps(
                {"apiVersion": "engine/v1alpha1", "kind": "AgentReport", "id": rid,
                 "spec": spec}))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_reports(base: Path, agents: int, reports: int, runs: int) -> tuple[float, float]:
    take, scan = [], []
    for i in range(runs):
        root = base / f"r{i}"
        inv = Inventory("bench", agents={f"a{a}": Record("h", "{}", "local")
                                         for a in range(agents)})
        inventory.save(paths.state(root), inv)
        write_reports(root, agents, reports)
        scan.append(timed(lambda: inbox.scan(root, "bench", reports=True)))  # noqa: B023
        g = grove(root, {})
        took = timed(lambda: signals.take(root, g, inv))  # noqa: B023
        assert not list(inbox.inbox_dir(root, "bench", "a0").glob("req-*"))
        take.append(took)
    return statistics.median(take), statistics.median(scan)


class Hanging:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"


def failing() -> str:
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(500)
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/"


def bench_dispatch(base: Path, n: int, runs: int) -> tuple[float, float]:
    hang = Hanging()
    os.environ["BENCH_HANG"] = hang.url
    os.environ["BENCH_FAIL"] = failing()
    routed = {"channels": {
        "hang": {"webhook": {"url": {"fromEnv": "BENCH_HANG"}, "timeout": "2s",
                             "retries": 1}},
        "fail": {"webhook": {"url": {"fromEnv": "BENCH_FAIL"}, "retries": 1}},
        "log": {"stream": {"path": ".engine/notify/bench.jsonl"}}},
        "routes": [{"on": ["*"], "to": ["hang", "fail", "log"]}]}
    quiet = {"channels": {"log": {"stream": {"path": ".engine/notify/bench.jsonl"}}},
             "routes": [{"on": ["budget-exceeded"], "to": ["log"]}]}
    times: dict[str, list[float]] = {"routed": [], "quiet": []}
    for i in range(runs):
        for name, spec in (("routed", routed), ("quiet", quiet)):
            root = base / f"d{name}{i}"
            g = grove(root, spec)
            paths.state(root).mkdir(parents=True, exist_ok=True)
            notify.dispatch(root, g)  # first use: the cursor starts at the end
            for k in range(n):
                events.record(root, {"grove": "bench", "agent": f"a{k % 20}",
                                     "event": "NeedsInput" if k % 2 else "AgentEnded",
                                     "phase": "Failed", "message": f"question {k}?"})
            times[name].append(timed(lambda: notify.dispatch(root, g)))  # noqa: B023
    return statistics.median(times["routed"]), statistics.median(times["quiet"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--reports", type=int, default=6)
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        take, scan = bench_reports(base, a.agents, a.reports, a.runs)
        print(f"reports: {a.agents} agents x {a.reports} reports: take {take * 1000:.1f} ms, "
              f"baseline scan {scan * 1000:.1f} ms, ratio {take / scan:.2f}x (target < 3x)")
        routed, quiet = bench_dispatch(base, a.events, a.runs)
        print(f"dispatch: {a.events} events to a hanging hook, a 500 hook and a file: "
              f"{routed * 1000:.1f} ms; baseline (nothing routed) {quiet * 1000:.1f} ms, "
              f"ratio {routed / quiet:.2f}x (target < 50 ms)")
        subprocess.run(["pkill", "-f", "engine.notify"], check=False)
        ok = take / scan < 3 and routed < 0.05
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
