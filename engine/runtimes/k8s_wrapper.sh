#!/bin/bash
# grove-engine, kubernetes runtime: the agent container's entrypoint. Exports the agent's
# credentials from their files, runs the harness (its argv is "$@") in the tmux session
# "agent" so that look/send/attach work over pods/exec, copies the session's output to the
# container log, and before exit pushes the agent's commits to its branch on the remote
# (uncommitted work goes to refs/engine/wip/<grove>/<agent>). Exits with the harness status.
set -u
E=${ENGINE_DIR:-/run/engine}
S="$E/tmux.sock"
ws=${ENGINE_WORKSPACE:-/workspace}
export PATH="$E/bin:$PATH" SHELL=/bin/bash
for f in "${ENGINE_SECRETS:-/run/secrets}"/*; do
  n=${f##*/}
  [[ -f $f && $n =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && export "$n=$(cat "$f")"
done
cd "$ws" || exit 1

if [[ ${1-} == --harness ]]; then # inside tmux: wait until output is captured, then run
  while [[ ! -e $E/go ]]; do sleep 0.05; done
  mapfile -d '' -t argv <"$E/argv"
  "${argv[@]}"
  echo $? >"$E/exit.tmp" && mv "$E/exit.tmp" "$E/exit"
  exit 0
fi

push() { # the branch, then a snapshot of uncommitted work; 0 when both reached the remote
  [[ -d $ws/.git ]] || return 0
  local ok=0 idx tree commit
  git push -q origin "HEAD:refs/heads/$ENGINE_BRANCH" || ok=1
  if [[ -n $(git status --porcelain) ]]; then
    idx=$(mktemp)
    [[ -f .git/index ]] && cp .git/index "$idx"
    GIT_INDEX_FILE=$idx git add -A &&
      tree=$(GIT_INDEX_FILE=$idx git write-tree) &&
      commit=$(git commit-tree "$tree" -p HEAD -m "engine: uncommitted work of $ENGINE_AGENT") &&
      git push -q -f origin "$commit:refs/engine/wip/$ENGINE_GROVE/$ENGINE_AGENT" || ok=1
    rm -f "$idx"
  fi
  return $ok
}

mkdir -p "$E/inbox"
rm -f "$E/exit" "$E/go"
printf '%s\0' "$@" >"$E/argv"
if [[ -n ${ENGINE_INSTRUCTIONS_FILE-} && -f $E/bin/instructions && ! -e $ENGINE_INSTRUCTIONS_FILE ]]; then
  cp "$E/bin/instructions" "$ENGINE_INSTRUCTIONS_FILE"
  [[ -d .git ]] && printf '%s\n' "$ENGINE_INSTRUCTIONS_FILE" >>.git/info/exclude
fi
: >"$E/agent.log"
tmux -S "$S" new-session -d -s agent -x 200 -y 50 "exec /bin/bash $(printf %q "$0") --harness"
tmux -S "$S" pipe-pane -t agent -o "cat >>$(printf %q "$E/agent.log")"
touch "$E/go"
tail -n +1 -f "$E/agent.log" &
tailer=$!
stopped=
trap 'stopped=1; tmux -S "$S" kill-server 2>/dev/null' TERM INT
while [[ ! -e $E/exit ]] && tmux -S "$S" has-session -t agent 2>/dev/null; do sleep 0.2; done
sleep 0.3
kill "$tailer" 2>/dev/null
wait "$tailer" 2>/dev/null
code=$(cat "$E/exit" 2>/dev/null || echo $((stopped ? 143 : 1)))
if ! push; then
  echo "engine: could not push $ENGINE_BRANCH to the remote" >&2
  ((code == 0)) && code=1
fi
exit "$code"
