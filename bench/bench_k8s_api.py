"""Benchmark: Kubernetes API requests per no-op observe pass, listing against watching.

For N agents (a Job and its Pod each, created directly in the store of the API server
stand-in, tests/k8s_apiserver.py) in one namespace, the runtime's `observe` is called as
a controller pass calls it, and the stand-in counts the requests it receives:

1. LIST mode (one-shot commands, and the baseline): a paged label-selector LIST of Pods
   and one of Jobs per pass (pages of LIST_PAGE objects, so the count grows with N once N
   passes a page).
2. WATCH mode (`engine watch`: `start_watching`): after the informers' first LIST and
   watch, a pass answers from their caches. Target: 0 requests per pass, for every N.
3. One resync of WATCH mode (every 5 minutes by default): a paged LIST per kind again,
   plus the watch it then reopens.

The time of a pass is shown beside each count, against LIST mode in the same run.

    python bench/bench_k8s_api.py [--agents 10,100,1000] [--passes 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.runtimes import LABEL_AGENT, LABEL_GROVE, LABEL_HASH, LABEL_REPO
from engine.runtimes import k8s_objects as objs
from engine.runtimes import kubernetes as k8s
from tests.k8s_apiserver import FakeApiServer

REMOTE = "https://git.example.com/org/bench.git"
GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: bench}}
spec:
  remote: {remote}
  defaults: {{profile: pod, harness: shell}}
  profiles:
    pod: {{runtime: kubernetes, image: "grove-engine/base:latest", namespace: agents,
          kubeconfig: {kubeconfig}}}
  agents:
    - {{name: agent-0, task: "true"}}
"""


def job(i: int) -> dict[str, Any]:
    labels = {LABEL_GROVE: "bench", LABEL_AGENT: f"agent-{i}", LABEL_HASH: "h" * 12,
              LABEL_REPO: objs.repo_label(REMOTE)}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"bench-agent-{i}", "namespace": "agents", "labels": labels},
            "spec": {"template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "agent", "image": "x"}],
                                           "restartPolicy": "Never"}}}}


def setup(base: Path, n: int) -> tuple[FakeApiServer, Path]:
    api = FakeApiServer(namespaces=("agents",), history=4 * n + 100)
    api.start()
    with api.lock:
        for i in range(n):
            api.apply(("jobs", "agents", f"bench-agent-{i}"), job(i), "grove-engine", False)
    for i, (_, ns, name) in enumerate(sorted(k for k in api.objects if k[0] == "pods")):
        if i % 2:
            api.set_pod(ns, name, "Running")
    repo = base / f"repo-{n}"
    (repo / "groves" / "bench").mkdir(parents=True)
    kubeconfig = api.kubeconfig(base / f"kubeconfig-{n}")
    (repo / "groves" / "bench" / "grove.yaml").write_text(
        GROVE.format(remote=REMOTE, kubeconfig=kubeconfig))
    return api, repo


def passes(rt: k8s.KubernetesRuntime, api: FakeApiServer, n: int, runs: int
           ) -> tuple[float, float]:
    """(requests per pass, median seconds per pass) of `runs` observe passes."""
    times = []
    api.requests.clear()
    for _ in range(runs):
        t0 = time.perf_counter()
        seen = rt.observe("bench")
        times.append(time.perf_counter() - t0)
        assert len(seen) == n, (len(seen), n)
    return len(api.requests) / runs, statistics.median(times)


def resync(rt: k8s.KubernetesRuntime, api: FakeApiServer) -> tuple[int, int]:
    """(LIST requests, watch requests) of one resync of every informer."""
    infs = list(rt._informers.values())
    api.requests.clear()
    watches = len(api.watches)
    t0 = time.monotonic()
    for inf in infs:
        inf._next_list = 0.0  # due now: the watch in progress ends, a LIST follows
    api.drop_watches()
    deadline = time.monotonic() + 60
    while not all(inf.listed_at > t0 for inf in infs) or len(api.watches) < watches + len(
            infs):
        if time.monotonic() > deadline:
            raise SystemExit("resync did not happen within 60 s")
        time.sleep(0.01)
    opened = len(api.watches) - watches
    return len(api.requests) - opened, opened


def bench(base: Path, n: int, runs: int) -> tuple[bool, str]:
    api, repo = setup(base, n)
    try:
        plain = k8s.make(repo)
        plain.observe("bench")  # warm: kubeconfig loaded, connection open
        list_req, list_t = passes(plain, api, n, runs)
        watching = k8s.make(repo)
        watching.start_watching(resync=3600)
        watching.observe("bench")  # the informers' first LIST, then their watches open
        deadline = time.monotonic() + 60
        while len(api.watches) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        watch_req, watch_t = passes(watching, api, n, runs)
        lists, opened = resync(watching, api)
        watching.stop_watching()
    finally:
        api.stop()
    ok = watch_req == 0
    ratio = watch_req / list_req if list_req else float("inf")
    line = (f"{n:>6} agents  LIST {list_req:4.1f} req/pass {list_t * 1000:7.2f}ms   "
            f"WATCH {watch_req:4.1f} req/pass {watch_t * 1000:7.2f}ms   ratio {ratio:4.2f}x "
            f"(time {watch_t / list_t if list_t else 0:5.3f}x)   resync {lists} LIST + "
            f"{opened} watch   target 0 req/pass  {'PASS' if ok else 'FAIL'}")
    return ok, line


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", default="10,100,1000")
    ap.add_argument("--passes", type=int, default=20)
    args = ap.parse_args()
    print(f"API requests per no-op observe pass (one namespace; LIST_PAGE={k8s.LIST_PAGE}; "
          "baseline: LIST mode)")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-k8s-api-") as d:
        for n in (int(x) for x in args.agents.split(",")):
            good, line = bench(Path(d), n, args.passes)
            ok &= good
            print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
