#!/usr/bin/env bash
# Start Podman's Docker-compatible API service for the tests if none answers (as root, at
# /run/podman/podman.sock), with the engine's base image in its store. No network is ever
# made: containers default to `--network none` (netns = "none"), so Podman never creates
# its default bridge network or touches the machine's networking. No registry is reached:
# the base image comes from the Docker engine (docker save | podman load) or, without
# one, from `engine image bootstrap` through the Podman socket itself.
set -euo pipefail
cd "$(dirname "$0")/.."
SOCK=/run/podman/podman.sock
if ! command -v podman >/dev/null; then
  echo "podman not installed (apt-get install -y podman)" >&2; exit 1
fi
# Rootful Podman raises every container's nofile and nproc limits past the machine's; without
# CAP_SYS_RESOURCE (a sandbox, a container) runc cannot raise them: "error setting rlimit
# type 7: operation not permitted". The machine's own hard limits always work.
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu); pid_max=$(cat /proc/sys/kernel/pid_max)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ] && nproc=$pid_max
conf=/etc/containers/containers.conf
want="# written by grove-engine's .ci/podman-up.sh: no network unless a container asks for
# one, limits the machine allows, no systemd or journald (not running here)
[containers]
netns = \"none\"
default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]

[engine]
cgroup_manager = \"cgroupfs\"
events_logger = \"file\""
restart=0
if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
  mkdir -p /etc/containers
  printf '%s\n' "$want" >"$conf"
  restart=1
fi

answers() { curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }
PIDFILE=/run/podman/engine-ci.pid  # the service this script started (restarted on a new conf)
if [ "$restart" = 1 ] && [ -s "$PIDFILE" ] && answers; then
  kill "$(cat "$PIDFILE")" 2>/dev/null || true
  for _ in $(seq 1 20); do answers || break; sleep 0.5; done
fi
if ! answers; then
  mkdir -p /run/podman /var/log
  nohup podman system service --time=0 "unix://$SOCK" >/var/log/engine-ci-podman.log 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do answers && break; sleep 1; done
  if ! answers; then
    echo "podman system service did not start; see /var/log/engine-ci-podman.log" >&2
    tail -20 /var/log/engine-ci-podman.log >&2
    exit 1
  fi
fi

image=grove-engine/base:latest
if ! podman image exists "$image"; then
  if docker info >/dev/null 2>&1; then  # the Docker tests need it too: bootstrap it once there
    docker image inspect "$image" >/dev/null 2>&1 || .venv/bin/engine image bootstrap
    docker save "$image" | podman load -q >/dev/null
  else
    DOCKER_HOST="unix://$SOCK" .venv/bin/engine image bootstrap
  fi
fi
