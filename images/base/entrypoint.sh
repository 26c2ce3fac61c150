#!/bin/bash
# grove-engine container entrypoint: run the harness in a tmux session, wait for it, and
# exit with its exit code.
#
# The Docker runtime bind-mounts this file (read-only) from the installed package at
# /usr/local/lib/engine/entrypoint.sh and runs `bash entrypoint.sh ARGV...`, so images never
# need rebuilding when it changes; images/base bakes in a copy as well.
#
# Contract with the runtime (engine/runtimes/docker_spec.py):
#   /run/secrets/NAME       one file per credential; exported as $NAME to the harness only
#                           (unless it is delivered as a file, see ENGINE_CREDENTIAL_FILES)
#   /run/engine/ctl/exit    written here: the harness's exit code
#   /run/engine/ctl/reason  written here when the end needs explaining (out of memory,
#                           maxDuration exceeded); read by the engine's observe
#   /run/engine/log         the pane's output (tmux pipe-pane), followed by `engine logs`
#   ENGINE_MAX_DURATION     seconds; past it the harness is stopped and the exit code is 124
#   ENGINE_CREDENTIAL_FILES lines NAME=PATH: copy /run/secrets/NAME to $HOME/PATH (0600)
#   ENGINE_EGRESS_SOCKET    network: egress: the gateway's socket; the forwarder
#                           (/usr/local/lib/engine/forwarder.py) is started first, on the
#                           proxy port 3128 and on each port of ENGINE_EGRESS_FORWARD
set -u
CTL=/run/engine/ctl
SESSION=agent

if [ "${1:-}" = __run ]; then
  # Inside the tmux pane: wait until output capture is on, then run the harness.
  shift
  tmux wait-for engine-go
  # credentials delivered as files into $HOME are not also put in the environment
  as_files=" $(printf '%s\n' "${ENGINE_CREDENTIAL_FILES:-}" | cut -s -d= -f1 | tr '\n' ' ') "
  unset ENGINE_CREDENTIAL_FILES
  for f in /run/secrets/*; do
    [ -f "$f" ] || continue
    name=${f##*/}
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    [[ "$as_files" == *" $name "* ]] && continue
    export "$name=$(cat "$f")"
  done
  cd /workspace 2>/dev/null || true
  if command -v "$1" >/dev/null; then
    "$@"
    code=$?
  else
    echo "command not found: $1" | tee "$CTL/reason" >&2
    code=127
  fi
  printf '%s\n' "$code" >"$CTL/exit.tmp" && mv -f "$CTL/exit.tmp" "$CTL/exit"
  tmux wait-for -S engine-done
  exit "$code"
fi

oom_kills() {
  local f
  for f in /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control; do
    if [ -r "$f" ]; then
      awk '$1 == "oom_kill" {print $2; found=1} END {if (!found) print 0}' "$f"
      return
    fi
  done
  echo 0
}

finish() {
  # $1: exit code; $2: reason (may be empty)
  [ -n "$2" ] && printf '%s\n' "$2" >"$CTL/reason"
  exit "$1"
}

stop() {
  tmux kill-server 2>/dev/null
  finish 143 "stopped"
}
trap stop TERM INT

mkdir -p "$HOME" 2>/dev/null
if [ -n "${ENGINE_CREDENTIAL_FILES:-}" ]; then
  while IFS='=' read -r name path; do
    [ -n "$name" ] && [ -f "/run/secrets/$name" ] || continue
    mkdir -p "$(dirname "$HOME/$path")"
    (umask 077 && cat "/run/secrets/$name" >"$HOME/$path")
  done <<<"$ENGINE_CREDENTIAL_FILES"
fi

if [ -n "${ENGINE_EGRESS_SOCKET:-}" ]; then
  # network: egress. The container has no network of its own; the forwarder listens on
  # the proxy port (and on each loopback endpoint's port) and carries every connection
  # over the mounted socket to the engine's gateway, which allows only the agent's list.
  ready=/tmp/.engine-egress-ready
  rm -f "$ready"
  forward=()
  read -ra eps <<<"${ENGINE_EGRESS_FORWARD:-}"  # no globbing: [::1]:8080 stays as it is
  for ep in "${eps[@]}"; do forward+=(--forward "$ep"); done
  python3 -S /usr/local/lib/engine/forwarder.py --socket "$ENGINE_EGRESS_SOCKET" \
    --proxy-port 3128 "${forward[@]}" --ready "$ready" 2>>/run/engine/log &
  for _ in $(seq 1 200); do
    [ -e "$ready" ] && break
    kill -0 $! 2>/dev/null || break
    sleep 0.05
  done
  [ -e "$ready" ] || finish 1 "egress: the forwarder to the engine's gateway did not start"
fi

oom_before=$(oom_kills)
tmux new-session -d -s "$SESSION" -x 200 -y 50 -- /bin/bash "$0" __run "$@" || finish 127 \
  "tmux could not start the harness"
tmux pipe-pane -t "$SESSION" -o 'cat >>/run/engine/log'
tmux wait-for -S engine-go

timed_out=
if [ -n "${ENGINE_MAX_DURATION:-}" ]; then
  timeout "$ENGINE_MAX_DURATION" tmux wait-for engine-done &
  wait $!
  [ $? -eq 124 ] && timed_out=1
else
  tmux wait-for engine-done &
  wait $!
fi
if [ -n "$timed_out" ]; then
  tmux kill-server 2>/dev/null
  finish 124 "maxDuration ${ENGINE_MAX_DURATION}s exceeded"
fi
# The harness has signalled (or the server is gone): wait for the pane to close.
for _ in $(seq 1 50); do
  tmux has-session -t "$SESSION" 2>/dev/null || break
  sleep 0.1
done

code=$(cat "$CTL/exit" 2>/dev/null)
reason=$(cat "$CTL/reason" 2>/dev/null)
if [ -z "$code" ]; then
  code=137
  reason="harness ended without an exit status (killed)"
fi
if [ "$code" -ne 0 ] && [ "$(oom_kills)" -gt "$oom_before" ]; then
  reason="killed: out of memory"
fi
finish "$code" "$reason"
