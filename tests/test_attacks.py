"""The attack suite: a real agent in a real Docker container tries to break out through
what the host reads of its work, and the test looks for the marker on the host.

Every attack is the agent's task, run by the shell harness inside the sandbox. The host
side is the real CLI (`engine apply`, `status`, `diff`, `destroy`, in-process). Each test
asserts three things: no marker appears on the host (no host code ran), no host file
changed or leaked (a canary file outside the workspace), and no work was lost (the
archive holds the agent's files). Variants: worktree and clone workspaces, the agent as
uid 1000 and as uid 0 (the whole workspace is then the agent's, as when the engine and
the agent share a uid), and a shared workspace.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import git, write_grove
from tests.docker_fixtures import IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

CANARY = "canary-7f3a9e-host-secret"


def grove(repo: Path, tasks: dict[str, str], workspace: str = "worktree",
          user: str = "", restart: str = "never", harness: str = "shell") -> None:
    profile = f"{{runtime: docker, image: {IMAGE}, resources: {{pids: 256}}"
    profile += f", user: '{user}'}}" if user else "}"
    lines = ["apiVersion: engine/v1alpha1", "kind: Grove", "metadata: {name: g}", "spec:",
             f"  workspace: {workspace}", f"  defaults: {{profile: box, harness: {harness}}}",
             "  harnesses:",
             "    noted: {command: [bash, -c, '{{ task }}'], taskArg: none, "
             "instructionsFile: NOTES.md}",
             f"  profiles: {{box: {profile}}}", "  agents:"]
    for name, task in tasks.items():
        lines += [f"    - name: {name}", f"      restart: {restart}",
                  f"      task: {json.dumps(task)}"]
    write_grove(repo, "g", "\n".join(lines) + "\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")


def allow_root(home: Path) -> None:
    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "engine" / "config.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("security: {allowRootAgents: true}\n")


def markers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pwned"))


def canary(tmp_path: Path) -> Path:
    c = tmp_path / "host-secret"
    c.write_text(CANARY + "\n")
    os.chmod(c, 0o600)
    return c


def archived(repo: Path, agent: str = "a") -> str:
    refs = git(repo, "for-each-ref", "--format=%(refname)", f"refs/engine/archive/g/{agent}/")
    assert refs, "the work was not archived"
    return refs.splitlines()[-1]


def everything_printed(*results: object) -> str:
    return "\n".join(f"{getattr(r, 'out', '')}{getattr(r, 'err', '')}" for r in results)


CONFIG_ATTACK = r"""
set -u
M={marker}
echo one > ONE && git add ONE && git commit -qm one
git config core.fsmonitor "touch $M-fsmonitor; false"
git config core.hooksPath /workspace/.hooks
mkdir -p .hooks
for h in post-checkout pre-commit post-merge reference-transaction pre-auto-gc; do
  printf '#!/bin/sh\ntouch %s-hook-%s\n' "$M" "$h" > .hooks/$h
  mkdir -p .git/hooks && cp .hooks/$h .git/hooks/$h
done
chmod +x .hooks/* .git/hooks/*
git config filter.evil.clean "touch $M-filter; cat"
git config filter.evil.smudge "touch $M-smudge; cat"
git config diff.evil.command "touch $M-diffdriver"
git config diff.evil.textconv "touch $M-textconv"
echo '* filter=evil diff=evil' > .gitattributes
git config diff.external "touch $M-extdiff"
git config core.pager "touch $M-pager"
git config core.sshCommand "touch $M-ssh"
git config credential.helper "!touch $M-cred"
git config uploadpack.packObjectsHook "touch $M-packhook"
git config core.alternateRefsCommand "touch $M-altrefs"
git config core.worktree /
printf '[core]\n\tfsmonitor = touch %s-include\n' "$M" > inc.cfg
git config include.path /workspace/inc.cfg
echo work >> README.md
echo new > NEW.txt
true
"""


@pytest.mark.parametrize("variant", ["worktree", "clone", "uid0"])
def test_agent_git_configuration_never_runs_on_the_host(repo: Path, tmp_path: Path,
                                                        engine, variant: str) -> None:
    """fsmonitor, hooks, filters, diff drivers, pagers, includes, core.worktree: set by
    the agent in its own repository, none of them runs when the host reads its work."""
    marker = tmp_path / "pwned"
    if variant == "uid0":
        allow_root(tmp_path)
    grove(repo, {"a": CONFIG_ATTACK.format(marker=marker)},
          workspace="clone" if variant == "clone" else "worktree",
          user="0:0" if variant == "uid0" else "")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    # control: the attack is live. A plain `git status` in the agent's repository, as host
    # code did before, runs the agent's fsmonitor on the host
    subprocess.run(["git", "-c", "safe.directory=*", "status"],
                   cwd=repo / ".engine/worktrees/g/a", capture_output=True)
    assert "pwned-fsmonitor" in markers(tmp_path)
    for m in tmp_path.glob("pwned*"):
        m.unlink()
    seen = [engine("status"), engine("status", "--json"), engine("diff", "a"),
            engine("diff", "a", "--stat"), engine("plan")]
    assert all(r.code == 0 for r in seen), seen
    assert json.loads(seen[1].out)["groves"][0]["agents"][0]["dirty"] >= 2
    assert git(repo, "log", "-1", "--format=%s", "engine/g/a") == "one"
    done = engine("destroy", "--auto-approve")
    assert done.code == 0, done
    assert markers(tmp_path) == []
    ref = archived(repo)
    assert git(repo, "show", f"{ref}:NEW.txt") == "new"
    assert git(repo, "show", f"{ref}:README.md").endswith("work")
    assert git(repo, "fsck", "--no-progress") == ""


POINTER_ATTACK = r"""
set -u
echo one > ONE && git add ONE && git commit -qm one
echo wip > WIP
# pointers the host could follow: a commondir, alternates to host paths, refs that are
# symlinks to host files, a HEAD that is a symlink, a packed-refs that is a FIFO
echo {repo}/.git > .git/commondir
printf '%s\n' /etc {repo}/.git/objects > .git/objects/info/alternates.new
cat .git/objects/info/alternates >> .git/objects/info/alternates.new
mv .git/objects/info/alternates.new .git/objects/info/alternates
mkdir -p .git/refs/heads/evil
ln -s {canary} .git/refs/heads/evil/leak
ln -s {canary} .git/refs/stash
mkfifo .git/packed-refs
mv .git/HEAD .git/HEAD.real && ln -s {canary} .git/HEAD
ln -s {canary} leak
ln -s / rootlink
mkfifo fifo
true
"""


@pytest.mark.parametrize("user", ["", "0:0"])
def test_agent_git_pointers_are_never_followed(repo: Path, tmp_path: Path, engine,
                                               user: str) -> None:
    """commondir, alternates, symlinked refs and HEAD, a FIFO for packed-refs: the host
    follows none of them, does not hang, and still archives the work (HEAD cannot be
    resolved: the files are snapshot on top of the base)."""
    c = canary(tmp_path)
    if user:
        allow_root(tmp_path)
    grove(repo, {"a": POINTER_ATTACK.format(repo=repo, canary=c)}, user=user)
    assert engine("apply", "--auto-approve", "--wait").code == 0
    seen = [engine("status"), engine("status", "--json"), engine("diff", "a")]
    done = engine("destroy", "--auto-approve")
    assert done.code == 0, done
    assert CANARY not in everything_printed(*seen, done)
    ref = archived(repo)
    files = git(repo, "ls-tree", "-r", "--format=%(objectmode) %(path)", ref)
    assert "100644 WIP" in files.splitlines() and "100644 ONE" in files.splitlines()
    assert "120000 leak" in files.splitlines()  # a link, kept as a link
    assert git(repo, "show", f"{ref}:leak") == str(c)
    assert "fifo" not in files
    dump = subprocess.run(["git", "grep", "-I", "-l", CANARY, ref], cwd=repo,
                          capture_output=True, text=True).stdout
    assert dump == ""  # the canary's content is nowhere in the archive
    assert c.read_text() == CANARY + "\n"
    assert not (repo / ".engine/worktrees/g/a").exists()


OBJECT_STORE_ATTACK = r"""
set -u
O={objects}
rm -rf "$O"/* 2>/dev/null
find "$O" -type f -exec sh -c 'echo x > "$1"' _ {{}} \; 2>/dev/null
touch "$O/x" 2>/dev/null && echo "wrote" >> result || echo "refused" >> result
ls {repo}/.git/config 2>/dev/null && echo "config visible" >> result
echo '[core]' >> {repo}/.git/config 2>/dev/null && echo "config written" >> result
true
"""


def test_agent_cannot_destroy_history(repo: Path, engine) -> None:
    """The repository's object store is mounted read-only; nothing else of its .git is
    there at all."""
    objects = repo / ".git" / "objects"
    git(repo, "gc", "-q")
    before = sorted(str(p) for p in objects.rglob("*") if p.is_file())
    grove(repo, {"a": OBJECT_STORE_ATTACK.format(objects=objects, repo=repo)})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    result = (repo / ".engine/worktrees/g/a/result").read_text()
    assert result.strip() == "refused"
    assert sorted(str(p) for p in objects.rglob("*") if p.is_file() and
                  str(p) in before) == before
    assert git(repo, "fsck", "--no-progress") == ""
    assert git(repo, "cat-file", "-t", "main") == "commit"
    assert engine("destroy", "--auto-approve").code == 0


BREAK_ATTACK = r"""
set -u
echo x > X && git add X && git commit -qm x
echo wip > WIP
{breakage}
"""


@pytest.mark.parametrize("breakage", [
    "rm -rf .git",
    "echo 'ref: refs/heads/nowhere' > .git/HEAD",
    "echo 0000000000000000000000000000000000000000 > .git/HEAD",
    "rm -rf .git/objects && mkdir .git/objects",
    "rm -rf .git && mkfifo .git",
    "rm -rf .git && echo 'gitdir: /etc' > .git",
])
def test_archive_fails_closed(repo: Path, engine, breakage: str) -> None:
    """Whatever the agent does to its git metadata, destroy saves its files first (on
    top of the base when HEAD cannot be resolved) or removes nothing."""
    grove(repo, {"a": BREAK_ATTACK.format(breakage=breakage)})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    done = engine("destroy", "--auto-approve")
    assert done.code == 0, done
    ref = archived(repo)
    assert git(repo, "show", f"{ref}:WIP") == "wip"
    assert git(repo, "show", f"{ref}:X") == "x"
    assert not (repo / ".engine/worktrees/g/a").exists()


def test_replaced_branch_ref_keeps_both_tips(repo: Path, engine) -> None:
    """A sibling (or a person) moves the agent's branch in the repository to unrelated
    history: the archive keeps the agent's own tip and the moved one."""
    grove(repo, {"a": "echo x > X && git add X && git commit -qm x && echo wip > WIP"})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    engine("status")
    other = git(repo, "commit-tree", git(repo, "rev-parse", "main^{tree}"), "-m", "other")
    git(repo, "update-ref", "refs/heads/engine/g/a", other)
    assert engine("destroy", "--auto-approve").code == 0
    ref = archived(repo)
    parents = git(repo, "rev-list", "--parents", "-n1", ref).split()[1:]
    assert other in parents
    assert git(repo, "show", f"{ref}:WIP") == "wip"


GRANT_ATTACK = r"""
set -u
mkdir -p deep/etc
ln -s {target} hostlink
printf 'gitdir: {target}\n' > .git.evil
true
"""


def test_no_grant_follows_agent_paths(repo: Path, tmp_path: Path, engine) -> None:
    """On a restart the engine grants the agent uid its workspace again; a symlink, a
    `.git` file naming a host path, a directory swapped for a symlink never extend that
    grant to a host file."""
    target = tmp_path / "host-dir"
    target.mkdir()
    c = target / "file"
    c.write_text(CANARY)
    grove(repo, {"a": GRANT_ATTACK.format(target=target)}, restart="always")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    wt = repo / ".engine/worktrees/g/a"
    # the agent's tree now points at host paths; forget the once-per-uid marker so the
    # next start walks the tree again, then restart through the CLI
    for m in (repo / ".engine/exchange/g/a").glob("granted-*"):
        m.unlink()
    os.replace(wt / ".git.evil", wt / "deep" / ".git")
    assert engine("apply", "--auto-approve").code == 0
    for p in (target, c):
        with pytest.raises(OSError):
            os.getxattr(p, "system.posix_acl_access")
        assert p.stat().st_uid == os.getuid()
    assert engine("destroy", "--auto-approve").code == 0


def test_control_file_symlink_never_read(repo: Path, tmp_path: Path, engine) -> None:
    """A symlink at the agent's ctl/reason pointing at a host secret: the failure
    reason shown is never the file's content."""
    c = canary(tmp_path)
    grove(repo, {"a": f"ln -sf {c} /run/engine/ctl/reason; exit 3"})
    engine("apply", "--auto-approve", "--wait")
    seen = [engine("status"), engine("status", "--json")]
    assert CANARY not in everything_printed(*seen)
    assert engine("destroy", "--auto-approve").code == 0


def test_instructions_file_symlink_is_replaced_not_followed(repo: Path, tmp_path: Path,
                                                            engine) -> None:
    """The agent swaps its instructions file for a symlink to a host file; the restart
    that rewrites the instructions replaces the link and neither reads nor writes the
    host file."""
    c = canary(tmp_path)
    grove(repo, {"a": f"rm -f NOTES.md && ln -s {c} NOTES.md"}, restart="always",
          harness="noted")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    assert engine("apply", "--auto-approve").code == 0
    notes = repo / ".engine/worktrees/g/a/NOTES.md"
    assert c.read_text() == CANARY + "\n"
    assert not notes.is_symlink() or CANARY not in notes.read_text(errors="replace")
    engine("destroy", "--auto-approve")


SHARED_ATTACK = r"""
set -u
M={marker}
printf '[core]\n\tfsmonitor = touch %s-fsmonitor\n' "$M" >> .git/config 2>/dev/null \
  && echo config >> /tmp/wrote
printf '#!/bin/sh\ntouch %s-hook\n' "$M" > .git/hooks/post-merge 2>/dev/null \
  && echo hook >> /tmp/wrote
cat .engine/secret-key 2>/dev/null && echo key >> /tmp/wrote
ls .engine/worktrees 2>/dev/null && echo worktrees >> /tmp/wrote
cat /tmp/wrote 2>/dev/null > shared-result || echo none > shared-result
true
"""


def test_shared_workspace_cannot_touch_git_metadata(repo: Path, tmp_path: Path,
                                                    engine) -> None:
    """In a shared workspace the agent edits the user's checkout, never its .git (read
    only) or the engine's state (hidden)."""
    marker = tmp_path / "pwned"
    config_before = (repo / ".git" / "config").read_text()
    grove(repo, {"a": SHARED_ATTACK.format(marker=marker)}, workspace="shared")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    assert (repo / "shared-result").read_text().strip() == "none"
    assert (repo / ".git" / "config").read_text() == config_before
    assert not (repo / ".git" / "hooks" / "post-merge").exists()
    assert engine("status").code == 0
    assert markers(tmp_path) == []
    assert engine("destroy", "--auto-approve").code == 0


INBOX_ATTACK = r"""
set -u
cd "$ENGINE_INBOX"
mkfifo req-fifo.json
ln -s {canary} req-link.json
ln -s /dev/zero req-zero.json
mkdir req-dir.json
S='{{"kind":"SpawnRequest","spec":{{"name":'
printf '%s' "$S"'"x1","task":"t","dependsOn":5}}}}' > req-deps.json
printf '%s' "$S"'"x2","task":"\udc80"}}}}' > req-surrogate.json
head -c 200000 /dev/zero | tr '\0' 'a' > req-big.json
printf '\377\376' > req-utf.json
cd /workspace
engine spawn good --task 'true'
engine spawn wide --task 'true' --profile wide
true
"""


def test_inbox_attacks_never_stop_apply_and_escalation_is_refused(repo: Path,
                                                                  tmp_path: Path,
                                                                  engine) -> None:
    """A real agent fills its inbox with FIFOs, symlinks (to a host secret, /dev/zero), a
    directory, bad types, a lone surrogate, an oversized and a non-UTF-8 request, next to
    one good spawn and one that asks for more memory than it has: apply answers every
    request, accepts the good one, refuses the escalation, and never hangs or prints the
    secret."""
    c = canary(tmp_path)
    write_grove(repo, "g", "\n".join([
        "apiVersion: engine/v1alpha1", "kind: Grove", "metadata: {name: g}", "spec:",
        "  defaults: {profile: box, harness: shell}",
        "  profiles:",
        f"    box: {{runtime: docker, image: {IMAGE}, resources: {{memory: 256Mi}}, "
        "spawn: {allowProfiles: [box, wide]}}",
        f"    wide: {{runtime: docker, image: {IMAGE}, resources: {{memory: 1Gi}}}}",
        "  agents:", "    - name: a",
        f"      task: {json.dumps(INBOX_ATTACK.format(canary=c))}", ""]))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    first = engine("apply", "--auto-approve", "--wait")
    assert first.code == 0, first
    second = engine("apply", "--auto-approve", "--wait")
    assert second.code == 0, second
    box = repo / ".engine/inbox/g/a"
    answers = {p.name: json.loads(p.read_text()) for p in box.glob("res-*.json")}
    by_status = sorted((a["status"], a.get("child", "")) for a in answers.values())
    assert ("accepted", "good") in by_status
    assert sum(1 for s, _ in by_status if s == "rejected") >= 9
    wide = [a for a in answers.values() if a.get("reason", "").find("memory") >= 0]
    assert wide and wide[0]["status"] == "rejected"
    assert not list(box.glob("req-*"))  # every request ended: answered, moved aside
    spawned = (repo / "groves/g/spawned.yaml").read_text()
    assert "name: good" in spawned and "wide" not in spawned
    assert CANARY not in everything_printed(first, second) + json.dumps(answers)
    assert engine("destroy", "--auto-approve").code == 0


ESCAPES = r"""
printf 'plain\033]0;pwned-title\007 \033[2J\033[31mred\033[0m \233c done\n'
printf '\033]52;c;cHduZWQ=\007clipboard\n'
"""


def test_agent_output_reaches_the_terminal_without_escape_sequences(repo: Path,
                                                                    engine) -> None:
    """Title, clear-screen, colour, C1 CSI and clipboard (OSC 52) sequences a real agent
    prints: `engine logs`, `look` and `status` pass none of them through."""
    grove(repo, {"a": ESCAPES + "echo 'x\033[31m' > X; git add X; "
                 "git commit -qm $'c\\033]0;t\\007'; exit 4"})
    engine("apply", "--auto-approve", "--wait")
    outs = [engine("logs", "a"), engine("look", "a"), engine("status"), engine("diff", "a")]
    text = everything_printed(*outs)
    assert "plain" in text and "clipboard" in text
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    assert engine("destroy", "--auto-approve").code == 0
