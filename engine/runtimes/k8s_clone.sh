#!/bin/sh
# grove-engine, kubernetes runtime: the init container. Clones the agent's branch
# ENGINE_BRANCH of ENGINE_REMOTE into ENGINE_WORKSPACE. A workspace kept on a
# PersistentVolumeClaim is fetched, not reset: work from an earlier Pod stays.
set -eu
ws=${ENGINE_WORKSPACE:-/workspace}
git config --global user.name >/dev/null 2>&1 ||
  git config --global user.name "${ENGINE_AGENT:-agent} (grove-engine)"
git config --global user.email >/dev/null 2>&1 ||
  git config --global user.email "${ENGINE_AGENT:-agent}@grove-engine.invalid"
cd "$ws"
if [ ! -d .git ]; then
  git init -q
  git remote add origin "$ENGINE_REMOTE"
  printf 'lost+found/\n' >>.git/info/exclude
fi
git fetch -q origin "+refs/heads/$ENGINE_BRANCH:refs/remotes/origin/$ENGINE_BRANCH"
if git rev-parse -q --verify "refs/heads/$ENGINE_BRANCH" >/dev/null; then
  git checkout -q "$ENGINE_BRANCH"
else
  git checkout -q -b "$ENGINE_BRANCH" "refs/remotes/origin/$ENGINE_BRANCH"
fi
git branch -q --set-upstream-to="origin/$ENGINE_BRANCH"
echo "engine: cloned $ENGINE_BRANCH at $(git rev-parse --short HEAD)"
