"""Security review: proofs of concept of attacks by an agent on the host (see
docs/security.md, "The trust boundary"). Each test asserts the SAFE behaviour, so it
FAILS while the weakness it names is present.

Two kinds of test: the real CLI with a real Docker agent (the agent's task is the attack,
as in tests/test_attacks.py), and host functions called directly on an agent repository
crafted the way an agent would craft it (faster; the files are then owned by the engine's
uid, which models an agent whose uid is the engine's: the default uid 1000 of a developer,
or uid 0 agents under a root engine).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import archive, workspace
from engine.errors import EngineError
from engine.runtimes import docker_spec
from tests.conftest import ROOT, git
from tests.test_attacks import allow_root, archived, everything_printed, grove, markers

pytestmark = pytest.mark.timeout(120)
BRANCH = "engine/g/a"


# -- helpers -------------------------------------------------------------------------------

def agent_repo(repo: Path) -> Path:
    """The agent's own repository, made as the executor makes it (grove g, agent a)."""
    wt = workspace.path_for(repo, "g", "a")
    git(repo, "branch", BRANCH)
    workspace.make(repo, wt, BRANCH, git(repo, "rev-parse", "HEAD"), "a", "g")
    return wt


def as_agent(wt: Path, *args: str) -> str:
    """git run BY THE AGENT in its own repository (as it would inside its container)."""
    return subprocess.run(["git", "-c", "user.name=a", "-c", "user.email=a@x", *args],
                          cwd=wt, check=True, capture_output=True, text=True).stdout.strip()


def nested_repo_with_filter(wt: Path, marker: Path) -> None:
    """The agent commits a gitlink `sub` and leaves `sub/.git` a repository whose config
    defines a clean filter that `.gitattributes` in `sub` applies to every file."""
    sub = wt / "sub"
    sub.mkdir()
    as_agent(sub, "init", "-q")
    (sub / "f").write_text("f\n")
    as_agent(sub, "add", "f")
    as_agent(sub, "commit", "-qm", "s")
    as_agent(wt, "update-index", "--add", "--cacheinfo",
             f"160000,{as_agent(sub, 'rev-parse', 'HEAD')},sub")
    as_agent(wt, "commit", "-qm", "gitlink")
    as_agent(sub, "config", "filter.evil.clean", f"touch {marker}; cat")
    (sub / ".gitattributes").write_text("* filter=evil\n")
    os.utime(sub / "f", (1, 1))  # stat-dirty: git must hash it again, through the filter


# -- 1. gitlink + nested repository: host code execution through the shadow status ------

def test_nested_repo_filter_never_runs_on_host_direct(repo: Path, tmp_path: Path) -> None:
    """The shadow `git status` recurses into a gitlink's checked-out repository and runs
    `git status` there with THAT repository's configuration (the hardening passed through
    GIT_CONFIG_COUNT only overrides fsmonitor/hooks/...; filters stay). The agent's clean
    filter runs on the host on `engine status` and on the archive."""
    wt = agent_repo(repo)
    marker = tmp_path / "pwned-filter"
    nested_repo_with_filter(wt, marker)
    base = git(repo, "rev-parse", "main")
    with contextlib.suppress(Exception):
        workspace.work_state(repo, "g", "a", wt, BRANCH, base)
    assert not marker.exists(), "the agent's filter ran on the host (engine status)"
    with contextlib.suppress(Exception):
        archive.archive(repo, "g", "a", wt, BRANCH, base)
    assert not marker.exists(), "the agent's filter ran on the host (archive)"


GITLINK_ATTACK = r"""
set -u
M={marker}
echo one > ONE && git add ONE && git commit -qm one
mkdir sub && cd sub && git init -q && echo f > f && git add f && git commit -qm s && cd ..
git update-index --add --cacheinfo 160000,$(git -C sub rev-parse HEAD),sub
git commit -qm gitlink
git -C sub config filter.evil.clean "touch $M-filter; cat"
echo '* filter=evil' > sub/.gitattributes
touch -d 2001-01-01 sub/f
echo wip > WIP
true
"""


def test_nested_repo_filter_never_runs_on_host_docker_uid0(repo: Path, tmp_path: Path,
                                                           engine, base_image: str) -> None:
    """The same through the real CLI with a Docker agent running as uid 0 (allowed by the
    user config) under a root engine: `engine status` runs the agent's filter on the host."""
    allow_root(tmp_path)
    marker = tmp_path / "pwned"
    grove(repo, {"a": GITLINK_ATTACK.format(marker=marker)}, user="0:0")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    seen = engine("status")
    found = markers(tmp_path)
    engine("destroy", "--auto-approve")
    assert found == [], f"agent code ran on the host: {found} ({seen})"


BOGUS_SUBMODULE = r"""
set -u
echo one > ONE && git add ONE && git commit -qm one
git update-index --add --cacheinfo 160000,$(git rev-parse HEAD),sub
git commit -qm gitlink
mkdir -p sub/.git
echo wip > WIP
true
"""


def test_gitlink_with_bogus_git_dir_keeps_status_and_destroy_working(repo: Path, engine,
                                                                      base_image: str
                                                                      ) -> None:
    """A default (uid 1000) agent commits a gitlink and leaves `sub/.git` an empty
    directory: the shadow status dies in the submodule ("not recognized as a git
    repository" / dubious ownership), so `engine status` fails for the whole grove and the
    archive fails, so the agent can never be destroyed."""
    grove(repo, {"a": BOGUS_SUBMODULE})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    seen = engine("status")
    done = engine("destroy", "--auto-approve")
    if done.code != 0:  # not even the container was removed: clean up for the next tests
        subprocess.run(["rm", "-rf", str(repo / ".engine/worktrees/g/a/sub")], check=False)
        engine("destroy", "--auto-approve")
    assert seen.code == 0, (seen, done)
    assert done.code == 0, done
    assert git(repo, "show", f"{archived(repo)}:WIP") == "wip"


# -- 2. shared workspace: the agent edits the manifests the engine runs ------------------

SHARED_MANIFEST_ATTACK = r"""
set -u
cat > groves/g/zz-more.yaml <<'EOF'
apiVersion: engine/v1alpha1
kind: Profile
metadata: {{name: unboxed}}
spec: {{runtime: local}}
---
apiVersion: engine/v1alpha1
kind: Agent
metadata: {{name: escape}}
spec: {{profile: unboxed, harness: shell, task: "touch {marker}-local"}}
EOF
true
"""


def test_shared_agent_cannot_add_an_unsandboxed_agent(repo: Path, tmp_path: Path, engine,
                                                      base_image: str) -> None:
    """A Docker agent in a `shared` workspace writes `groves/g/*.yaml` in the checkout
    (it is the workspace): a `runtime: local` profile and an agent using it. The next
    `engine watch` pass (or apply) runs that agent on the host, as the user. The same
    write can append to spawned.yaml (no gate), add credentials `fromFile: ~/.ssh/...`,
    `network: host`..."""
    marker = tmp_path / "pwned"
    grove(repo, {"a": SHARED_MANIFEST_ATTACK.format(marker=marker)}, workspace="shared")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    # groves/ is read-only in the container: the agent cannot write a manifest at all
    assert not (repo / "groves/g/zz-more.yaml").exists()
    engine("watch", "--once")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not markers(tmp_path):
        time.sleep(0.3)
    found = markers(tmp_path)
    (repo / "groves/g/zz-more.yaml").unlink(missing_ok=True)
    engine("destroy", "--auto-approve")
    assert found == [], f"the sandboxed agent got code run on the host: {found}"


def test_mount_source_symlink_is_not_followed_at_create(repo: Path) -> None:
    """docker_spec.mounts resolves a profile's repository-relative mount source when the
    container is created. In a shared workspace the agent can replace that directory with
    a symlink (to `/`, or to `.engine` with every agent's secrets): checks._mounts refused
    the same path only when the manifests were loaded, so a later (re)create (a restart,
    a child with the parent's mount, watch keeping the last good state) mounts whatever
    the agent's symlink names."""
    from tests.docker_fixtures import Agents
    (repo / "data").mkdir()
    a = Agents(repo.resolve(), "unused")
    g = a.grove("""apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: g}
spec:
  workspace: shared
  profiles: {box: {runtime: docker, image: x, mounts: [{source: data, target: /data}]}}
  defaults: {profile: box, harness: shell}
  agents: [{name: a, task: "true"}]
""")
    launch = a.launch(g.by_name["a"], mode="shared")
    assert launch.workdir.resolve() == repo.resolve()
    # the agent (shared workspace: the checkout is its /workspace) swaps the directory
    os.rename(repo / "data", repo / "data.old")
    os.symlink(str(repo / ".engine"), repo / "data")
    dirs = docker_spec.HostDirs(*(repo / "x" for _ in range(7)))
    with pytest.raises(EngineError, match="symlink on the way"):  # refused at create
        docker_spec.mounts(launch, dirs)


# -- 3. crashes (exit 3) of destroy and apply ----------------------------------------------

def test_non_utf8_file_name_does_not_crash_destroy(repo: Path, engine,
                                                   base_image: str) -> None:
    """A file whose name is not UTF-8: exchange.snapshot joins the paths as str and
    git.call encodes them strictly -> UnicodeEncodeError, `engine destroy` exits 3 and the
    agent can never be destroyed."""
    grove(repo, {"a": r"echo wip > WIP; echo x > $'bad\xff'; true"})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    done = engine("destroy", "--auto-approve")
    assert done.code == 0, done
    assert git(repo, "show", f"{archived(repo)}:WIP") == "wip"


def test_non_utf8_file_name_archive_direct(repo: Path) -> None:
    wt = agent_repo(repo)
    (wt / os.fsdecode(b"bad\xff")).write_text("x")
    (wt / "WIP").write_text("wip\n")
    ref = archive.archive(repo, "g", "a", wt, BRANCH, git(repo, "rev-parse", "main"))
    assert ref and git(repo, "show", f"{ref}:WIP") == "wip"


DEEP = r"""
set -u
echo wip > WIP
for i in $(seq 1200); do mkdir a && cd a; done
echo deep > f
true
"""


def test_deep_directories_do_not_crash_destroy(repo: Path, engine, base_image: str) -> None:
    """1200 nested directories: tree.copy_paths (Path.mkdir(parents=True)), copy_dir and
    shutil.rmtree (Python 3.11) recurse once per level -> RecursionError, exit 3."""
    grove(repo, {"a": DEEP})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    done = engine("destroy", "--auto-approve")
    assert (repo / ".engine/worktrees/g/a/WIP").read_text() == "wip\n"  # nothing lost
    # leave nothing deep behind: pytest's own cleanup of old tmp dirs would recurse too
    subprocess.run(["rm", "-rf", str(repo / ".engine/worktrees/g/a/a")], check=False)
    if done.code != 0:
        engine("destroy", "--auto-approve")
    # a tree deeper than the copy limit cannot be saved whole: destroy refuses in one
    # line (exit 1) and removes nothing, rather than crash or lose work
    assert done.code == 1, done
    assert "deeper than" in done.out and "Traceback" not in done.out + done.err


def test_instructions_file_made_a_directory_does_not_crash_apply(repo: Path, engine,
                                                                 base_image: str) -> None:
    """The agent replaces its instructions file with a directory; on its restart
    instructions._replace does os.replace(tmp, dir) -> IsADirectoryError (an OSError,
    not an EngineError): `engine apply` exits 3, and `watch` fails every pass (the
    whole grove stops converging)."""
    grove(repo, {"a": "rm -f NOTES.md && mkdir NOTES.md && echo x > NOTES.md/x"},
          restart="always", harness="noted")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    again = engine("apply", "--auto-approve")  # restart: always -> its restart fails
    engine("destroy", "--auto-approve")
    assert again.code == 1 and "cannot write" in again.out, again


# -- 4. hangs -------------------------------------------------------------------------------

def test_deep_ref_directories_do_not_hang_sync(repo: Path) -> None:
    """read_refs walks .git/refs/heads re-opening every directory from the workspace root
    (tree.listdir -> opendir walks all components each time) with no bound on
    directories: a chain of N empty directories costs O(N^2) opens. N=3000 takes about a
    minute (4000: 90 s, 30000: hours); every `engine status`, plan, destroy and watch pass
    syncs the agent (holding the grove lock)."""
    wt = agent_repo(repo)
    d = os.open(wt / ".git" / "refs" / "heads", os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("z", dir_fd=d)
        n = os.open("z", os.O_RDONLY, dir_fd=d)
        os.close(d)
        d = n
    os.close(d)
    code = ("import sys; from pathlib import Path; from engine.trust import exchange; "
            f"exchange.read_refs(Path({str(wt)!r}))")
    t0 = time.monotonic()
    try:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=15, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading the agent's refs took more than {time.monotonic() - t0:.0f}s")
    finally:
        subprocess.run(["rm", "-rf", str(wt / ".git/refs/heads/z")], check=False)


# -- 5. escape sequences on the user's terminal ------------------------------------------

ESCAPE_NAME = r"""
set -u
echo wip > WIP
truncate -s 5G "$(printf 'x\033[2J\033[H\033]0;pwned\033\\y')"
true
"""


def test_failure_message_carries_no_escape_sequence(repo: Path, engine,
                                                    base_image: str) -> None:
    """A sparse 5 GiB file whose name holds escape sequences: the archive refuses it
    ("<name>: the work is larger than the copy limit") and destroy prints that message
    raw (apply.Progress.finished through rich, which keeps ESC; cli.main prints
    EngineError summaries raw too): the agent clears the screen and sets the title."""
    grove(repo, {"a": ESCAPE_NAME})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    done = engine("destroy", "--auto-approve")
    printed = everything_printed(done)
    wt = repo / ".engine/worktrees/g/a"
    for p in wt.glob("x*y") if wt.is_dir() else []:
        p.unlink()
    engine("destroy", "--auto-approve")
    assert "\x1b" not in printed, repr(printed)


# -- 6. the agent makes itself impossible to archive (destroy refuses forever) ------------

def test_dot_git_variant_does_not_block_destroy(repo: Path, engine, base_image: str) -> None:
    """`.GIT/x` (or `a/.Git/x`): status lists it, copy_paths copies it (it only skips the
    exact name `.git`), then `git add` refuses the path ("invalid path") and the whole
    archive fails: destroy removes nothing, forever."""
    grove(repo, {"a": "echo wip > WIP; mkdir .GIT && echo x > .GIT/x; true"})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    done = engine("destroy", "--auto-approve")
    left = repo / ".engine/worktrees/g/a"
    if left.is_dir():
        subprocess.run(["rm", "-rf", str(left / ".GIT")], check=False)
        engine("destroy", "--auto-approve")
    assert done.code == 0, done


def test_directory_replaced_by_symlink_does_not_block_destroy(repo: Path) -> None:
    """An ordinary move (a tracked directory replaced by a symlink, `rm -r vendor && ln -s
    ../v vendor`) makes status list ` D a/x` and `?? a`; snapshot then passes `a/x` as a
    pathspec to `git add` -> "pathspec 'a/x' is beyond a symbolic link": the archive
    fails and the workspace can never be removed."""
    wt = agent_repo(repo)
    (wt / "a").mkdir()
    (wt / "a" / "x").write_text("x\n")
    as_agent(wt, "add", "a")
    as_agent(wt, "commit", "-qm", "a")
    subprocess.run(["rm", "-r", str(wt / "a")], check=True)
    os.symlink("elsewhere", wt / "a")
    (wt / "WIP").write_text("wip\n")
    ref = archive.archive(repo, "g", "a", wt, BRANCH, git(repo, "rev-parse", "main"))
    assert ref and git(repo, "show", f"{ref}:WIP") == "wip"


def test_packed_refs_flood_does_not_hang_sync(repo: Path) -> None:
    """MAX_REFS bounds loose refs only: packed-refs (up to 8 MiB, ~140k lines) is taken
    whole, and sync runs `git cat-file -t` once or twice per tip (one process each). 3000
    packed branches take ~30 s; a full 8 MiB file about half an hour, on every
    `engine status`, plan, destroy and watch pass. Real commits as tips would also put
    one refs/engine/work ref per tip into the trusted repository."""
    import hashlib
    wt = agent_repo(repo)
    (wt / ".git" / "packed-refs").write_text("".join(
        f"{hashlib.sha1(str(i).encode()).hexdigest()} refs/heads/b{i}\n"
        for i in range(3000)))
    code = ("from pathlib import Path; from engine.trust import exchange; "
            f"exchange.sync(Path({str(repo)!r}), 'g', 'a', Path({str(wt)!r}), {BRANCH!r})")
    t0 = time.monotonic()
    try:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=15, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"syncing the agent took more than {time.monotonic() - t0:.0f}s")


# -- 7. shared workspace: write-back reads spawned.yaml without the trust reader ----------

def shared_spawning_grove(repo: Path, task: str) -> None:
    from tests.conftest import write_grove
    from tests.docker_fixtures import IMAGE
    write_grove(repo, "g", f"""apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: g}}
spec:
  workspace: shared
  defaults: {{profile: box, harness: shell}}
  profiles:
    box: {{runtime: docker, image: {IMAGE}, spawn: {{allowProfiles: [box]}}}}
  agents:
    - name: a
      task: {json_str(task)}
""")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")


def json_str(text: str) -> str:
    import json
    return json.dumps(text)


def test_spawned_yaml_symlink_never_leaks_a_host_file(repo: Path, tmp_path: Path) -> None:
    """writeback._write reads groves/<g>/spawned.yaml with path.read_text() (follows a
    symlink) and writes what it read, plus the new document, back as a regular file. In a
    shared workspace that file is the agent's to replace: a symlink to a host file there
    when a spawn is written back (the agent flips it between a regular file, which the
    manifest loader and the gate's reload accept, and a symlink) puts the host file's
    content (as root: /etc/shadow, .engine/secret-key, other agents' secret files) into
    the checkout, where the agent reads it."""
    from engine import writeback
    secret = tmp_path / "host-secret"
    secret.write_text("canary-7f3a9e-host-secret\n")
    os.chmod(secret, 0o600)
    d = repo / "groves" / "g"
    d.mkdir(parents=True)
    os.symlink(secret, d / "spawned.yaml")  # what the agent leaves at the moment of the write
    with pytest.raises(EngineError, match="symbolic link"):  # refused, never read through
        writeback.append(repo, "g", [writeback.Spawn("c", "true", "a", "r1", "now")], False)
    f = d / "spawned.yaml"
    text = "" if f.is_symlink() else f.read_text(errors="replace")
    assert "canary-7f3a9e" not in text, "a host file was copied where the agent reads it"


def test_spawned_yaml_fifo_does_not_hang_watch(repo: Path, base_image: str) -> None:
    """A shared-workspace agent makes groves/g/spawned.yaml a FIFO and leaves any request
    in its inbox. `engine watch` keeps its last good manifests (the loader refuses the
    FIFO) and ingests: writeback.recorded_requests -> path.read_text() -> open() blocks
    forever. The controller is stuck in that pass (no request answered, nothing
    converged) until it is killed."""
    task = ("sleep 6; rm -f groves/g/spawned.yaml && mkfifo groves/g/spawned.yaml; "
            "echo '{\"kind\":\"StatusRequest\",\"spec\":{}}' > /run/engine/inbox/req-1.json; "
            "sleep 60")
    shared_spawning_grove(repo, task)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "engine"]
    subprocess.run([*cli, "apply", "--auto-approve"], cwd=repo, env=env, check=True,
                   capture_output=True, timeout=60)
    log = repo.parent / "watch.log"
    with log.open("w") as err:
        watch = subprocess.Popen([*cli, "watch", "--interval", "0.5"], cwd=repo, env=env,
                                 stdout=subprocess.DEVNULL, stderr=err)
    answer = repo / ".engine/inbox/g/a/res-1.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not answer.exists():
        time.sleep(0.3)
    answered = answer.exists()
    watch.send_signal(15)
    try:
        watch.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watch.kill()
        watch.wait()
    (repo / "groves/g/spawned.yaml").unlink(missing_ok=True)
    subprocess.run([*cli, "destroy", "--auto-approve"], cwd=repo, env=env,
                   capture_output=True, timeout=120)
    assert answered, "engine watch hangs on the agent's FIFO: " + log.read_text()[-500:]


def test_file_replaced_by_a_directory_is_archived(repo: Path) -> None:
    """A tracked file `a` becomes a directory holding `a/b`: status lists both ` D a` and
    `?? a/b`; the archive copies the directory once and keeps `a/b`."""
    wt = agent_repo(repo)
    (wt / "a").write_text("file\n")
    subprocess.run(["git", "add", "a"], cwd=wt, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a"],
                   cwd=wt, check=True)
    (wt / "a").unlink()
    (wt / "a").mkdir()
    (wt / "a" / "b").write_text("inside\n")
    ref = archive.archive(repo, "g", "a", wt, BRANCH, git(repo, "rev-parse", "main"))
    assert ref and git(repo, "show", f"{ref}:a/b") == "inside"


def test_copy_never_writes_through_a_symlink_in_its_own_copy(tmp_path: Path) -> None:
    """Two overlapping paths, the first a symlink when copied and the second beneath the
    same name: the copy never creates a file through the symlink it made."""
    from engine.trust import tree
    src, dest, outside = tmp_path / "src", tmp_path / "dest", tmp_path / "outside"
    for d in (src, dest, outside):
        d.mkdir()
    os.symlink(str(outside), src / "a")
    tree.copy_paths(src, ["a"], dest, tree.Budget(1 << 20))
    os.unlink(src / "a")
    (src / "a").mkdir()
    (src / "a" / "b").write_text("x")
    tree.copy_paths(src, ["a/b"], dest, tree.Budget(1 << 20))
    assert list(outside.iterdir()) == []


def test_failed_transfer_is_not_retried_by_every_observation(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HEAD names a commit the agent's store lacks (or a transfer that fails slowly, e.g.
    a huge sparse pack): observation retries it at most once a minute, an archive (a fresh
    sync) every time."""
    from engine.trust import exchange
    wt = agent_repo(repo)
    (wt / ".git" / "HEAD").write_text("1234567890123456789012345678901234567890\n")
    calls: list[int] = []
    real = exchange._fetch
    monkeypatch.setattr(exchange, "_fetch", lambda *a: calls.append(1) or real(*a))
    first = exchange.sync(repo, "g", "a", wt, BRANCH, fresh=False)
    assert first.problems and not first.head and calls == [1]
    again = exchange.sync(repo, "g", "a", wt, BRANCH, fresh=False)
    assert again.problems == first.problems and calls == [1]  # not tried again yet
    exchange.sync(repo, "g", "a", wt, BRANCH, fresh=True)
    assert calls == [1, 1]  # an archive always tries


def test_merge_refuses_a_branch_that_writes_into_engine_state(repo: Path) -> None:
    """An agent commits `.engine/exchange/<grove>/<other>/git/config` defining a filter
    (and an attributes file selecting it): `engine merge` would write them over the
    engine's own ignored state, and the next status would run the filter on the host.
    The merge is refused; the shadow's configuration is the engine's whatever is there."""
    from engine import review
    from engine.trust import exchange
    wt = agent_repo(repo)
    evil = wt / ".engine" / "exchange" / "g" / "b" / "git"
    evil.mkdir(parents=True)
    (evil / "config").write_text('[filter "x"]\n\tclean = touch /tmp/pwned-merge\n')
    as_agent(wt, "add", "-f", ".engine")
    as_agent(wt, "commit", "-qm", "state")
    workspace.sync(repo, "g", "a")
    with pytest.raises(EngineError, match=r"writes into \.engine/"):
        review.merge(repo, BRANCH, "main", "merge a")
    assert not (repo / ".engine" / "exchange" / "g" / "b").exists()
    # defence in depth: a planted shadow config is rewritten before git reads it
    base = git(repo, "rev-parse", "main")
    workspace.work_state(repo, "g", "a", wt, BRANCH, base)  # the shadow exists
    shadow = exchange.shadow_dir(repo, "g", "a") / "git"
    (shadow / "info").mkdir(exist_ok=True)
    (shadow / "config").write_text('[filter "x"]\n\tclean = touch /tmp/pwned-shadow\n')
    (shadow / "info" / "attributes").write_text("* filter=x\n")
    (wt / "README.md").write_text("changed\n")
    workspace.work_state(repo, "g", "a", wt, BRANCH, base)
    assert (shadow / "config").read_text() == exchange.SHADOW_CONFIG
    assert not (shadow / "info" / "attributes").exists()
    assert not Path("/tmp/pwned-shadow").exists()


def test_history_never_reads_spawned_yaml_through_a_symlink(repo: Path, tmp_path: Path,
                                                            engine) -> None:
    """spawned.yaml in the checkout replaced by a symlink to a host secret: `engine
    history` reports the file and never prints the secret."""
    secret = tmp_path / "host-secret"
    secret.write_text("canary-7f3a9e-host-secret\n")
    d = repo / "groves" / "g"
    d.mkdir(parents=True)
    (d / "grove.yaml").write_text("apiVersion: engine/v1alpha1\nkind: Grove\n"
                                  "metadata: {name: g}\nspec: {agents: []}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    os.symlink(secret, d / "spawned.yaml")
    out = engine("history")
    assert "canary-7f3a9e" not in out.out + out.err
    assert out.code in (0, 1)
