#!/usr/bin/env bash
# Start a rootless Podman API service for the tests (as root, after .ci/podman-up.sh): an
# unprivileged user `engine-rootless` with subordinate ids, its own storage (native
# overlay, else vfs) and the engine's base image, serving
# unix:///run/user/UID/podman/podman.sock. The rootful service is not touched.
#
# A machine that cannot run rootless Podman (no user namespaces for the user) is not a CI
# failure: the exact reason goes to $REASON and the rootless tests skip with it. A machine
# that runs it without cgroup v2 controllers for the user (cgroup v1) is used as it is: the
# engine refuses agents there unless ENGINE_PODMAN_UNLIMITED=1, and the tests check both.
set -euo pipefail
cd "$(dirname "$0")/.."
USER_NAME=engine-rootless
REASON=/run/engine-podman-rootless.unavailable
rm -f "$REASON"
unavailable() { printf '%s\n' "$*" >"$REASON"; echo "rootless podman: $*" >&2; exit 0; }

command -v newuidmap >/dev/null || apt-get install -y -qq uidmap >/dev/null  # a CI failure
id "$USER_NAME" >/dev/null 2>&1 || useradd -m -U -s /bin/bash "$USER_NAME"
uid=$(id -u "$USER_NAME")
grep -q "^$USER_NAME:" /etc/subuid || usermod --add-subuids 300000-365535 "$USER_NAME"
grep -q "^$USER_NAME:" /etc/subgid || usermod --add-subgids 300000-365535 "$USER_NAME"
run=/run/user/$uid
mkdir -p "$run" && chown "$USER_NAME:" "$run" && chmod 700 "$run"
# runuser keeps the caller's environment: the user's long-lived service gets none of root's
as_user() { runuser -u "$USER_NAME" -- env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME="$(getent passwd "$USER_NAME" | cut -d: -f6)" XDG_RUNTIME_DIR="$run" "$@"; }

if ! err=$(cd / && as_user unshare -U true 2>&1); then
  unavailable "unshare -U as $USER_NAME failed: $err"
fi
conf_dir=$(getent passwd "$USER_NAME" | cut -d: -f6)/.config/containers
if [ ! -f "$conf_dir/storage.conf" ]; then
  as_user mkdir -p "$conf_dir"
  printf '[storage]\ndriver = "overlay"\n' | as_user tee "$conf_dir/storage.conf" >/dev/null
  if ! (cd / && as_user podman info >/dev/null 2>&1); then  # no rootless native overlay
    printf '[storage]\ndriver = "vfs"\n' | as_user tee "$conf_dir/storage.conf" >/dev/null
    (cd / && as_user podman system reset -f >/dev/null 2>&1) || true
  fi
fi
if ! err=$(cd / && as_user podman unshare true 2>&1); then
  unavailable "podman unshare as $USER_NAME failed: $err"
fi

SOCK=$run/podman/podman.sock
answers() { curl -sf --max-time 10 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }
PIDFILE=$run/podman/service.pid  # written by the service's own shell: its pid
if ! answers; then
  # a socket nothing answers on (the service died or hangs): end the service this script
  # started, if it is still there, and start afresh
  pid=$(cat "$PIDFILE" 2>/dev/null || pgrep -u "$USER_NAME" -xf \
    "podman system service --time=0 unix://$SOCK" || true)
  for p in $pid; do
    [ "$(ps -o uid=,comm= -p "$p" 2>/dev/null | tr -s ' ' | sed 's/^ //')" = "$uid podman" ] \
      || continue
    kill -CONT "$p" 2>/dev/null; kill "$p" 2>/dev/null || true
    for _ in $(seq 1 10); do kill -0 "$p" 2>/dev/null || break; sleep 1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -f "$SOCK" "$PIDFILE"
  as_user mkdir -p "$run/podman"
  (cd / && as_user nohup sh -c 'echo $$ >"$1" && exec podman system service --time=0 "$2"' \
    sh "$PIDFILE" "unix://$SOCK" >/var/log/engine-ci-podman-rootless.log 2>&1 &)
  for _ in $(seq 1 60); do answers && break; sleep 1; done
  answers || unavailable "podman system service as $USER_NAME did not start: \
$(tail -3 /var/log/engine-ci-podman-rootless.log | tr '\n' ' ')"
fi

image=grove-engine/base:latest
if ! (cd / && as_user podman image exists "$image"); then
  if docker image inspect "$image" >/dev/null 2>&1; then
    docker save "$image" | (cd / && as_user podman load -q >/dev/null)
  else
    podman save "$image" | (cd / && as_user podman load -q >/dev/null)  # from the rootful store
  fi
fi
