#!/usr/bin/env bash
# Start a Docker engine for the tests if none answers. No bridge, no iptables: containers
# use --network none (or host), so the engine never touches the machine's networking.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
if ! command -v dockerd >/dev/null; then
  echo "dockerd not installed (apt-get install -y docker.io)" >&2; exit 1
fi
mkdir -p /var/log
nohup dockerd --bridge=none --iptables=false >/var/log/engine-ci-dockerd.log 2>&1 &
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not start; see /var/log/engine-ci-dockerd.log" >&2
tail -20 /var/log/engine-ci-dockerd.log >&2
exit 1
