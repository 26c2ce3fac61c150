"""Benchmark: the Docker runtime against the Docker SDK used directly, in the same run.

1. Converge N docker agents from nothing and tear them down (`engine apply` then
   `engine destroy`), against a script that creates+starts and then removes the same
   number of containers of the same image with the SDK at the same parallelism
   (target: within 1.3x).
2. A no-op `engine apply` over N running docker agents (target: under 1 s); baseline: one
   filtered `containers.list`, what any observation must do.
3. Density, for docs/scaling.md: memory and CPU an idle agent costs (cgroup figures of the
   running containers), so agents per GiB and per core can be read off.

Needs a running Docker engine and grove-engine/base:latest (`engine image bootstrap`).

    python bench/bench_docker.py [--agents 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

IMAGE = "grove-engine/base:latest"
ENGINE = [sys.executable, "-m", "engine"]
PARALLELISM = 8


def sh(cwd: Path, *cmd: str) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def make_repo(base: Path, n: int) -> Path:
    repo = base / "repo"
    (repo / "groves" / "d").mkdir(parents=True)
    sh(repo, "git", "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text(".engine/\n")
    lines = ["apiVersion: engine/v1alpha1", "kind: Grove", "metadata: {name: d}", "spec:",
             "  defaults: {profile: box, harness: shell}",
             f"  policy: {{maxAgents: {n + 5}}}",
             "  profiles:",
             f"    box: {{runtime: docker, image: '{IMAGE}', network: none, "
             "resources: {cpus: 0.5, memory: 128Mi, pids: 64}}", "  agents:"]
    lines += [f"    - {{name: a{i}, task: sleep 3600}}" for i in range(n)]
    (repo / "groves" / "d" / "grove.yaml").write_text("\n".join(lines) + "\n")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "init")
    return repo


def engine_cycle(repo: Path) -> float:
    t0 = time.perf_counter()
    for cmd in (["apply", "--auto-approve", "--parallelism", str(PARALLELISM)],
                ["destroy", "--auto-approve"]):
        p = subprocess.run([*ENGINE, *cmd], cwd=repo, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"engine {cmd[0]} failed:\n{p.stdout}{p.stderr}")
    return time.perf_counter() - t0


def sdk_cycle(client: docker.DockerClient, n: int) -> float:
    tag = f"engine-bench-sdk-{os.getpid()}"

    def up(i: int) -> str:
        c = client.containers.create(
            IMAGE, ["sleep", "3600"], name=f"{tag}-{i}", network_mode="none",
            user="1000:1000", cap_drop=["ALL"], security_opt=["no-new-privileges"],
            read_only=True, tmpfs={"/tmp": ""}, init=True, pids_limit=64,
            mem_limit=128 * 2**20, memswap_limit=128 * 2**20, nano_cpus=500_000_000,
            labels={"bench": tag})
        c.start()
        return str(c.id)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(PARALLELISM) as pool:
        ids = list(pool.map(up, range(n)))
        list(pool.map(lambda cid: client.api.remove_container(cid, force=True), ids))
    return time.perf_counter() - t0


def density(client: docker.DockerClient, repo: Path) -> tuple[float, float]:
    """(MiB of memory, % of one core) an idle agent uses, averaged over the grove."""
    containers = client.containers.list(filters={"label": "engine.grove=d"})
    mem, cpu = [], []
    for c in containers:
        s = c.stats(stream=False)
        mem.append(s["memory_stats"].get("usage", 0) / 2**20)
        total = s["cpu_stats"]["cpu_usage"]["total_usage"] - \
            s["precpu_stats"]["cpu_usage"].get("total_usage", 0)
        system = s["cpu_stats"].get("system_cpu_usage", 0) - \
            s["precpu_stats"].get("system_cpu_usage", 0)
        ncpu = s["cpu_stats"].get("online_cpus", 1)
        cpu.append(100.0 * total / system * ncpu if system > 0 else 0.0)
    return statistics.mean(mem), statistics.mean(cpu)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for k, v in (("GIT_AUTHOR_NAME", "b"), ("GIT_AUTHOR_EMAIL", "b@b"),
                 ("GIT_COMMITTER_NAME", "b"), ("GIT_COMMITTER_EMAIL", "b@b")):
        os.environ.setdefault(k, v)
    client = docker.from_env()
    subprocess.run([*ENGINE, "image", "bootstrap"], check=True, capture_output=True)
    base = Path(tempfile.mkdtemp(prefix="engine-bench-docker-"))
    ok = True
    try:
        repo = make_repo(base, args.agents)
        engine_t = statistics.median(engine_cycle(repo) for _ in range(args.runs))
        sdk_t = statistics.median(sdk_cycle(client, args.agents) for _ in range(args.runs))
        ratio = engine_t / sdk_t
        ok &= ratio <= 1.3
        print(f"converge + destroy {args.agents} docker agents: engine {engine_t:.2f}s, SDK "
              f"create+start+remove {sdk_t:.2f}s, ratio {ratio:.2f}x, target <= 1.3x "
              f"{'PASS' if ratio <= 1.3 else 'FAIL'}")
        subprocess.run([*ENGINE, "apply", "--auto-approve"], cwd=repo, check=True,
                       capture_output=True)
        noops, raws = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run([*ENGINE, "apply", "--auto-approve"], cwd=repo, check=True,
                           capture_output=True)
            noops.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.containers.list(all=True, filters={"label": "engine.grove=d"})
            raws.append(time.perf_counter() - t0)
        noop, raw = statistics.median(noops), statistics.median(raws)
        ok &= noop < 1.0
        print(f"no-op apply over {args.agents} running docker agents: {noop:.3f}s, one "
              f"filtered list {raw:.3f}s, ratio {noop / raw:.1f}x, target < 1 s "
              f"{'PASS' if noop < 1.0 else 'FAIL'}")
        time.sleep(2)
        mem, cpu = density(client, repo)
        cores = os.cpu_count() or 1
        print(f"idle agent: {mem:.1f} MiB, {cpu:.2f}% of a core -> about "
              f"{1024 / mem:.0f} idle agents per GiB; with the default 1-CPU limit, "
              f"{cores} cores hold {cores} fully busy agents")
    finally:
        subprocess.run([*ENGINE, "destroy", "--auto-approve"], cwd=base / "repo",
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
