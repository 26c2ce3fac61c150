"""Benchmark: the web UI (`engine ui`) on a grove of AGENTS agents.

Baseline, measured in the same run: `engine status --json -g big`, what a terminal user
pays for the same document. Measured:
1. the status API (`GET /api/status`, what every page and the stream carry);
2. the grove page in Debian's Chromium (Playwright), from navigation to the graph drawn
   (`body[data-rendered]`). Target: under 1 s for 500 agents;
3. a live update: an agent added to the manifests, until the open page has drawn it
   (the stream's event applied). Target: under 500 ms;
4. the same update seen by a bare stream client (no browser), for comparison.
Chromium steps are skipped with a note when Playwright or /usr/bin/chromium is missing.

    python bench/bench_ui.py [--agents N] [--runs N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync",
        "--disable-dev-shm-usage"]


def grove_text(n: int) -> str:
    agents = "\n".join(f"    - name: agent-{i:04d}\n      task: 'true'" +
                       (f"\n      dependsOn: [agent-{i - 1:04d}]" if i % 7 == 6 else "")
                       for i in range(n))
    return f"""apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: big}}
spec:
  defaults: {{profile: local, harness: shell}}
  policy: {{maxAgents: {n + 10}}}
  profiles:
    local: {{runtime: local}}
  agents:
{agents}
"""


def run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    opts = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    repo = tmp / "repo"
    (repo / "groves" / "big").mkdir(parents=True)
    grove = repo / "groves" / "big" / "grove.yaml"
    grove.write_text(grove_text(opts.agents))
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "user.name=b", "-c", "user.email=b@example.invalid", "commit",
                 "-qm", "big"]):
        run(cmd, repo)
    cli = [sys.executable, "-m", "engine"]

    base = []
    for _ in range(opts.runs):
        t = time.perf_counter()
        subprocess.run([*cli, "status", "--json", "-g", "big"], cwd=repo, env=env,
                       check=True, capture_output=True)
        base.append(time.perf_counter() - t)
    baseline = statistics.median(base)
    print(f"baseline: engine status --json, {opts.agents} agents: {baseline * 1000:.0f} ms")

    proc = subprocess.Popen([*cli, "ui", "--port", "0"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        m = re.search(r"http://(g[0-9a-f]+\.localhost):(\d+)/\?token=(\S+)",
                      proc.stdout.readline())
        assert m, "engine ui printed no address"
        name, port, token = m.group(1), int(m.group(2)), m.group(3)
        host = f"{name}:{port}"
        session = sign_in(port, host, token)
        # the browser signs in with a token of its own: another server of the same grove
        url = second_url(repo, env, cli)
        api = []
        for _ in range(opts.runs):
            t = time.perf_counter()
            get(port, host, session, "/api/status?grove=big")
            api.append(time.perf_counter() - t)
        a = statistics.median(api)
        print(f"status API: {a * 1000:.1f} ms (ratio {a / baseline:.3f} of the baseline)")
        stream = stream_update(port, host, session, grove, opts.agents)
        print(f"live update, stream client: {stream * 1000:.0f} ms "
              f"(ratio {stream / baseline:.3f}; target under 500 ms: "
              f"{'met' if stream < 0.5 else 'MISSED'})")
        browser(url, grove, opts.agents + 1, baseline, opts.runs)
    finally:
        for p in [proc, *SERVERS]:
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def sign_in(port: int, host: str, token: str) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", f"/?token={token}", headers={"Host": host})
    r = c.getresponse()
    m = re.search(rb'name="grove-session" content="([^"]+)"', r.read())
    c.close()
    assert m, "no session"
    return m.group(1).decode()


def get(port: int, host: str, session: str, path: str) -> bytes:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", path, headers={"Host": host, "X-Grove-Session": session})
    r = c.getresponse()
    data = r.read()
    c.close()
    assert r.status == 200, (r.status, data[:200])
    return data


SERVERS: list[subprocess.Popen[str]] = []


def second_url(repo: Path, env: dict[str, str], cli: list[str]) -> str:
    """A second `engine ui` of the same repository, for the browser (a token signs in
    one client)."""
    p = subprocess.Popen([*cli, "ui", "--port", "0"], cwd=repo, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    SERVERS.append(p)
    assert p.stdout is not None
    m = re.search(r"http://\S+", p.stdout.readline())
    assert m, "engine ui printed no address"
    return m.group(0)


def stream_update(port: int, host: str, session: str, grove: Path, n: int) -> float:
    """Seconds from a manifest edit to the stream's event carrying the new agent."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", f"/api/stream?grove=big&session={session}", headers={"Host": host})
    r = c.getresponse()
    name = f"agent-{n:04d}"

    def next_status() -> dict[str, object]:
        data = b""
        while True:
            line = r.fp.readline()
            if line.startswith(b"data: ") and data == b"status":
                return json.loads(line[6:])  # type: ignore[no-any-return]
            data = line[7:].strip() if line.startswith(b"event: ") else data

    next_status()  # the current document, sent at once
    text = grove.read_text()
    t = time.perf_counter()
    grove.write_text(text + f"    - name: {name}\n      task: 'true'\n")
    while True:
        doc = next_status()
        if any(a["name"] == name for a in doc["grove"]["agents"]):  # type: ignore[index]
            took = time.perf_counter() - t
            break
    c.close()
    grove.write_text(text)
    return took


def browser(url: str, grove: Path, n: int, baseline: float, runs: int) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("grove page: skipped (playwright is not installed)")
        return
    if not Path(CHROMIUM).exists():
        print(f"grove page: skipped ({CHROMIUM} is missing)")
        return
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)  # signs in; the session stays in the origin's storage
        times = []
        for _ in range(runs):
            page.goto(url.split("?")[0] + "grove/big")
            page.wait_for_selector("body[data-rendered]", timeout=30000)
            times.append(float(page.evaluate("Number(document.body.dataset.rendered)")))
        load = statistics.median(times) / 1000
        nodes = page.locator("g.node").count()
        print(f"grove page, {nodes} agents: {load * 1000:.0f} ms from navigation to the "
              f"graph drawn (ratio {load / baseline:.3f}; target under 1 s: "
              f"{'met' if load < 1 else 'MISSED'})")
        name = f"agent-{n:04d}"
        text = grove.read_text()
        t0 = float(page.evaluate("Date.now()"))
        grove.write_text(text + f"    - name: {name}\n      task: 'true'\n")
        page.wait_for_selector(f'g.node[data-agent="{name}"]', timeout=30000)
        took = (float(page.evaluate("Date.now()")) - t0) / 1000
        grove.write_text(text)
        print(f"live update, browser: {took * 1000:.0f} ms from the edit to the node drawn "
              f"(ratio {took / baseline:.3f}; target under 500 ms: "
              f"{'met' if took < 0.5 else 'MISSED'})")
        b.close()


if __name__ == "__main__":
    sys.exit(main())
