"""Attacks through the files agents write, on a real filesystem: FIFOs, symlinks (to
/etc/passwd, /dev/zero and a host secret), directories, oversized files, invalid UTF-8,
lone surrogates, escape sequences and odd names in inboxes, control files and logs.

Each test checks the exact refusal, that the rest of the work still happens (a good
request next to the bad ones is accepted), that nothing hangs (pytest-timeout, and real
`engine watch` processes stopped by SIGTERM within a second) and that no byte of a
symlink's target reaches any output. Everything is real: git repositories, the local
runtime's tmux sessions, the engine's CLI. The one stand-in is a hung tmux server (a Unix
socket that accepts and never answers) to hold a pass blocked, named where it is made.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.runtimes import docker_fs, docker_spec, k8s_inbox
from engine.trust import reader
from engine.trust.reader import NotFound, Untrusted
from tests.conftest import git
from tests.test_spawn import grove, spawned_docs, until, write_request

pytestmark = pytest.mark.timeout(120)

MARKER = "HOST-SECRET-7f3a9c"
PASSWD_LINE = Path("/etc/passwd").read_text().splitlines()[0]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A host file no agent may read: its content must never appear anywhere."""
    p = tmp_path / "host-secret.txt"
    p.write_text(f"{MARKER}\nsecond line\n")
    return p


def spawn_body(name: str, **extra: object) -> bytes:
    return json.dumps({"kind": "SpawnRequest",
                       "spec": {"name": name, "task": "true", **extra}}).encode()


def assert_clean(*texts: str) -> None:
    """No host secret, no passwd line, no escape sequence in what the engine printed."""
    for text in texts:
        assert MARKER not in text
        assert PASSWD_LINE not in text
        assert "\x1b" not in text and "\x9b" not in text


# -- the reader itself -------------------------------------------------------------------

def test_for_terminal_strips_csi_osc_c1_and_keeps_newlines_and_tabs() -> None:
    raw = ("\x1b[31mred\x1b[0m \x1b]0;title\x07\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\"
           " \x9b2Jc1\x9d0;t\x07 \x1bPdcs\x1b\\ bell\x07 cr\r\x1b(0box\tx\ny \u202eevil\x00")
    out = reader.for_terminal(raw)
    assert out == "red link c10;t  bell crbox\tx\ny evil"
    assert reader.one_line("\n\n  \x1b[1mfirst\x1b[0m  \nsecond") == "first"
    assert reader.one_line("x" * 500, 10) == "x" * 10


def test_read_bytes_refuses_symlinks_anywhere_on_the_path(tmp_path: Path,
                                                          secret: Path) -> None:
    base = tmp_path / "base"
    (base / "real").mkdir(parents=True)
    (base / "real" / "f").write_text("ok")
    (base / "link").symlink_to(base / "real")
    (base / "etc").symlink_to("/etc")
    (base / "real" / "secret").symlink_to(secret)
    assert reader.read_bytes(base, "real/f", 10) == b"ok"
    for rel in ("link/f", "etc/passwd", "real/secret"):
        with pytest.raises(Untrusted, match=r"refused \(a symlink or not a directory") as e:
            reader.read_bytes(base, rel, 1 << 20)
        assert_clean(e.value.summary)
    with pytest.raises(NotFound, match="not found"):
        reader.read_bytes(base, "real/nothing", 10)
    with pytest.raises(Untrusted, match="refused path"):
        reader.read_bytes(base, "../base/real/f", 10)


def test_fifo_device_and_directory_are_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero")
    started = time.monotonic()
    for name in ("fifo", "dir"):
        with pytest.raises(Untrusted, match=r"refused \(not a regular file\)"):
            reader.read_bytes(tmp_path, name, 100)
    with pytest.raises(Untrusted, match="symlink"):
        reader.read_bytes(tmp_path, "zero", 100)
    assert time.monotonic() - started < 1


def test_size_utf8_surrogates_and_json_constants(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "latin1").write_bytes(b'{"a": "caf\xe9"}')
    (tmp_path / "surrogate").write_text('{"a": ["\\udc80"]}')
    (tmp_path / "nan").write_text('{"a": NaN}')
    with pytest.raises(Untrusted, match=r"larger than 100 bytes"):
        reader.read_bytes(tmp_path, "big", 100)
    with pytest.raises(Untrusted, match=r"not UTF-8 at byte 10"):
        reader.read_text(tmp_path, "latin1", 100)
    with pytest.raises(Untrusted, match="lone surrogate"):
        reader.read_json(tmp_path, "surrogate", 100)
    with pytest.raises(Untrusted, match="NaN is not allowed"):
        reader.read_json(tmp_path, "nan", 100)


def test_listing_renaming_and_replacing_act_on_entries_never_targets(
        tmp_path: Path, secret: Path) -> None:
    tmp_path = tmp_path / "box"
    tmp_path.mkdir()
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "p")
    (tmp_path / "s").symlink_to(secret)
    assert reader.regular_files(tmp_path) == ["f"]
    assert reader.entries(tmp_path) == ["d", "f", "p", "s"]
    reader.replace_file(tmp_path, "s", b"answer")  # replaces the link itself
    assert not (tmp_path / "s").is_symlink() and (tmp_path / "s").read_bytes() == b"answer"
    assert secret.read_text().startswith(MARKER)
    (tmp_path / "s2").symlink_to(secret)
    reader.rename(tmp_path, ".", "s2", "moved")
    assert (tmp_path / "moved").is_symlink() and secret.exists()
    assert reader.subdirs(tmp_path) == ["d"]


# -- control files and logs -------------------------------------------------------------

def test_read_reason_never_shows_a_symlink_target(tmp_path: Path, secret: Path) -> None:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    assert docker_spec.read_reason(ctl) == ""
    unreadable = "unreadable reason (ctl/reason is not a small regular text file)"
    for make in (lambda p: p.symlink_to(secret), lambda p: p.symlink_to("/etc/shadow"),
                 lambda p: p.symlink_to("/etc/passwd"), os.mkfifo, lambda p: p.mkdir(),
                 lambda p: p.write_bytes(b"\xff\xfe bad"),
                 lambda p: p.write_bytes(b"x" * 5000)):
        path = ctl / "reason"
        make(path)
        assert docker_spec.read_reason(ctl) == unreadable
        os.rmdir(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    (ctl / "reason").write_text("\x1b]0;owned\x07\x1b[2JOOM killed\x1b[0m\nsecond line\n")
    assert docker_spec.read_reason(ctl) == "OOM killed"
    entry = {"State": "exited", "Status": "Exited (137) 1 second ago", "Labels": {},
             "Mounts": [{"Destination": docker_spec.CTL, "Source": str(ctl)}]}
    assert docker_spec.observed(entry, "").reason == "OOM killed"


def test_read_log_refuses_symlinks_and_fifos_and_splits_huge_lines(tmp_path: Path,
                                                                   secret: Path) -> None:
    log = tmp_path / "agent.log"
    log.symlink_to(secret)
    with pytest.raises(Untrusted, match="symlink") as e:
        list(docker_fs.read_log(log, False, lambda: False))
    assert_clean(e.value.summary)
    log.unlink()
    os.mkfifo(log)
    with pytest.raises(Untrusted, match="not a regular file"):
        list(docker_fs.read_log(log, True, lambda: True))
    log.unlink()
    log.write_bytes(b"one\r\n" + b"z" * (64 * 1024 + 10) + b"\n\xfftail")
    lines = list(docker_fs.read_log(log, False, lambda: False))
    assert lines[0] == "one" and len(lines[1]) == 64 * 1024 and lines[2] == "z" * 10
    assert lines[3] == "\ufffdtail"


# -- the Kubernetes inbox archive --------------------------------------------------------

def _archive(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(data[m.name]) if m.name in data else None)
    return base64.b64encode(buf.getvalue()).decode()


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0,
            link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.size, m.linkname = kind, size, link
    return m


def test_k8s_extract_takes_only_small_plain_regular_files(tmp_path: Path) -> None:
    big = b"{" + b" " * (k8s_inbox.MAX_FILE + 500) + b"}"
    data = {"./req-ok.json": b"{}", "./req-big.json": big, "./sub/req-x.json": b"{}",
            "./req-\x1b[31m.json": b"{}"}
    members = [_member(n, size=len(d)) for n, d in data.items()]
    members += [_member("./req-link.json", tarfile.SYMTYPE, link="/etc/passwd"),
                _member("./req-hard.json", tarfile.LNKTYPE, link="./req-ok.json"),
                _member("./req-dev.json", tarfile.CHRTYPE),
                _member("./req-fifo.json", tarfile.FIFOTYPE),
                _member("./req-dir.json", tarfile.DIRTYPE)]
    got = k8s_inbox.extract(_archive(members, data), tmp_path / "in")
    assert [p.name for p in got] == ["req-big.json", "req-ok.json"]
    assert sorted(os.listdir(tmp_path / "in")) == ["req-big.json", "req-ok.json"]
    # an oversized request is cut just past the cap, so the host refuses it and answers
    assert len((tmp_path / "in" / "req-big.json").read_bytes()) == k8s_inbox.MAX_FILE + 1
    with pytest.raises(Untrusted, match="larger than"):
        reader.read_bytes(tmp_path / "in", "req-big.json", k8s_inbox.MAX_FILE)
    with pytest.raises(EngineError, match="archive larger than"):
        k8s_inbox.extract("A" * (k8s_inbox.MAX_ARCHIVE + 4), tmp_path / "in")


def test_k8s_sync_sends_only_regular_answers_and_skips_answered_requests(
        tmp_path: Path, secret: Path) -> None:
    pod, host = tmp_path / "pod", tmp_path / "host"
    pod.mkdir()
    host.mkdir()
    (pod / "req-1.json").write_text("{}")
    (pod / "req-2.json").write_text("{}")
    (host / "done-1.json").write_text("{}")
    (host / "res-1.json").write_text('{"status": "ok"}')  # answered: not pulled again
    (host / "res-9.json").symlink_to(secret)  # never read, never sent

    def run(argv: list[str]) -> str:
        argv = [a.replace(k8s_inbox.INBOX, str(pod)) for a in argv]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert [p.name for p in k8s_inbox.sync(run, host)] == ["req-2.json"]
    assert (pod / "res-1.json").read_text() == '{"status": "ok"}'
    assert not (pod / "res-9.json").exists()


# -- the inbox, through `engine apply` ---------------------------------------------------

def _plant_bad_requests(box: Path, secret: Path) -> dict[str, str]:
    """Every kind of bad entry; returns request id -> the exact rejection reason."""
    box.mkdir(parents=True, exist_ok=True)
    (box / "req-dir.json").mkdir()
    os.mkfifo(box / "req-fifo.json")
    (box / "req-zero.json").symlink_to("/dev/zero")
    (box / "req-passwd.json").symlink_to("/etc/passwd")
    (box / "req-secret.json").symlink_to(secret)
    (box / "req-big.json").write_bytes(spawn_body("big", task="a" * 70000))
    (box / "req-latin1.json").write_bytes(b'{"kind": "SpawnRequest", "spec": {"name": "\xe9"}}')
    (box / "req-surrogate.json").write_text(
        '{"kind": "SpawnRequest", "spec": {"name": "s\\udc80", "task": "true"}}')
    (box / "req-deps.json").write_bytes(spawn_body("deps", dependsOn=5))
    (box / "req-depsobj.json").write_bytes(spawn_body("depso", dependsOn=[{"a": 1}]))
    (box / "req-name.json").write_bytes(spawn_body("x", profile=["local"]))
    (box / "req-spec.json").write_text('{"kind": "SpawnRequest", "spec": "take over"}')
    (box / "req-array.json").write_text("[1, 2]")
    symlink = "refused (a symlink or not a directory on the way)"
    shape = ("a request must be a JSON object with kind (AgentReport, DoneReport, "
             "MessageRequest, SpawnRequest, StatusRequest) and spec (an object)")
    return {
        "dir": "req-dir.json: refused (not a regular file)",
        "fifo": "req-fifo.json: refused (not a regular file)",
        "zero": f"req-zero.json: {symlink}", "passwd": f"req-passwd.json: {symlink}",
        "secret": f"req-secret.json: {symlink}",
        "big": "req-big.json: refused (larger than 65536 bytes)",
        "latin1": "req-latin1.json: refused (not UTF-8 at byte 43)",
        "surrogate": "req-surrogate.json: refused (a lone surrogate in a string)",
        "deps": "req-deps.json: spec.dependsOn must be a list of agent names",
        "depsobj": "req-depsobj.json: spec.dependsOn must be a list of agent names",
        "name": "req-name.json: spec.profile must be a string",
        "spec": f"req-spec.json: {shape}", "array": f"req-array.json: {shape}",
    }


def _outputs(repo: Path) -> list[str]:
    """Everything the engine wrote that a person or an agent reads: answers, the event
    log (symlinks an agent left are not followed here either)."""
    out = [(repo / ".engine/events.jsonl").read_text()]
    for p in (repo / ".engine/inbox").rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name.startswith(("res-", "notify-")):
            out.append(p.read_text())
    return out


def _answered(repo: Path) -> list[str]:
    return [e["id"] for e in map(json.loads, (repo / ".engine/events.jsonl").read_text()
                                 .splitlines()) if "id" in e]


def test_apply_rejects_every_bad_request_and_accepts_the_good_one(
        repo: Path, engine, secret: Path) -> None:  # type: ignore[no-untyped-def]
    grove(repo, "    - name: seed\n      task: sleep 30\n")
    assert engine("apply", "--auto-approve").code == 0
    box = repo / ".engine/inbox/tree/seed"
    expected = _plant_bad_requests(box, secret)
    weird = "req-\x1b]0;owned\x07 id.json"  # an id that may not reach a path or terminal
    (box / weird).write_bytes(spawn_body("weird"))
    write_request(repo, "seed", "good", spawn_body("good"))
    started = time.monotonic()
    res = engine("apply", "--auto-approve")
    assert res.code == 0, res
    assert time.monotonic() - started < 30
    for rid, reason in expected.items():
        doc = json.loads((box / f"res-{rid}.json").read_text())
        assert (doc["status"], doc["reason"]) == ("rejected", reason), rid
        assert os.path.lexists(box / f"bad-{rid}.json"), rid  # moved aside, not followed
        assert f"request {rid} rejected: {reason}" in res.err
    assert (box / "bad-dir.json").is_dir() and (box / "bad-passwd.json").is_symlink()
    assert Path("/etc/passwd").read_text().splitlines()[0] == PASSWD_LINE
    odd = [p.name for p in box.iterdir() if p.name.startswith("res-invalid-")]
    assert len(odd) == 1
    assert "bad request id" in json.loads((box / odd[0]).read_text())["reason"]
    assert json.loads((box / "res-good.json").read_text())["status"] == "accepted"
    assert [d["name"] for d in spawned_docs(repo)] == ["good"]
    assert not [p for p in box.iterdir() if p.name.startswith("req-")]
    assert_clean(res.out, res.err, *_outputs(repo))
    # nothing is read twice: a second apply sees no request at all
    answered = _answered(repo)
    again = engine("apply", "--auto-approve")
    assert again.code == 0 and "rejected" not in again.err
    assert _answered(repo) == answered


def test_symlinked_inbox_and_planted_answers_are_not_trusted(
        repo: Path, engine, secret: Path) -> None:  # type: ignore[no-untyped-def]
    grove(repo, "    - name: seed\n      task: sleep 30\n")
    assert engine("apply", "--auto-approve").code == 0
    elsewhere = repo.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "req-x.json").write_bytes(spawn_body("from-elsewhere"))
    (repo / ".engine/inbox/tree/ghost").symlink_to(elsewhere)  # not a real directory
    box = repo / ".engine/inbox/tree/seed"
    # an answer planted before the request is read: a spawn is accepted only when it is
    # recorded, and a symlink in its place is replaced, never written through
    write_request(repo, "seed", "planted", spawn_body("planted"))
    (box / "res-planted.json").write_text('{"status": "accepted", "reason": "\\u001b[2J"}')
    write_request(repo, "seed", "linked", spawn_body("linked"))
    (box / "res-linked.json").symlink_to(secret)
    # a directory where the answer goes: no answer, but the request still ends, once
    write_request(repo, "seed", "dirans", spawn_body("dirans"))
    (box / "res-dirans.json").mkdir()
    assert engine("apply", "--auto-approve").code == 0
    assert json.loads((box / "res-planted.json").read_text())["status"] == "rejected"
    assert json.loads((box / "res-linked.json").read_text())["status"] == "accepted"
    assert secret.read_text().startswith(MARKER)
    assert sorted(d["name"] for d in spawned_docs(repo)) == ["dirans", "linked"]
    assert (box / "done-dirans.json").is_file() and (box / "res-dirans.json").is_dir()
    assert not [p for p in box.iterdir() if p.name.startswith((".", "req-"))]
    events = [json.loads(ln) for ln in (repo / ".engine/events.jsonl").read_text()
              .splitlines()]
    assert [e["reason"] for e in events if e.get("id") == "dirans"] == [
        "(the answer could not be written: Is a directory)"]
    assert (elsewhere / "req-x.json").exists() and not list(elsewhere.glob("res-*"))


# -- what reaches the terminal -----------------------------------------------------------

ESCAPES = r"printf '\033]0;owned\007\033[2J\033[31mhello\033[0m \302\2332J world\n'"


def test_logs_look_and_status_show_no_escape_sequences(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    grove(repo, f"    - name: seed\n      task: |\n        {ESCAPES}; exit 3\n")
    assert engine("apply", "--auto-approve", "--wait").code != 0
    logs = engine("logs", "seed")
    assert logs.code == 0 and "hello" in logs.out and "world" in logs.out
    look = engine("look", "seed")
    assert look.code == 0 and "hello" in look.out
    # a reason file the agent wrote: escapes, a lot of text, several lines
    (repo / ".engine/run/tree/seed/reason").write_text(
        "\x1b]0;owned\x07\x1b[2J" + "evil " * 300 + "\nsecond\n")
    human = engine("status")
    assert human.code == 0 and "(evil evil" in human.out
    rows = json.loads(engine("status", "--json").out)["groves"][0]["agents"]
    assert rows[0]["reason"] == ("evil " * 40).strip()
    assert_clean(logs.out, look.out, human.out, human.err, json.dumps(rows))


def test_a_message_reaches_the_other_agent_without_escape_sequences(repo: Path,
                                                                   engine) -> None:  # type: ignore[no-untyped-def]
    grove(repo, "    - name: listener\n      task: |\n        IFS= read -r line\n"
                "        printf '%s' \"$line\" > HEARD && git add HEARD && "
                "git commit -qm heard\n")
    assert engine("apply", "--auto-approve").code == 0
    write_request(repo, "listener", "m1", json.dumps({"kind": "MessageRequest", "spec": {
        "to": "listener", "text": "hi \x1b[201~\x1b]0;x\x07\x9b2J there"}}).encode())
    assert engine("apply", "--auto-approve", "--wait").code == 0
    assert git(repo, "show", "engine/tree/listener:HEARD") == \
        "[message from listener] hi  there"


# -- engine watch: keeps going, and ends within a second ---------------------------------

class Watch:
    def __init__(self, repo: Path) -> None:
        self.log = repo.parent / f"watch-{time.monotonic_ns()}.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "watch", "--interval", "0.5"], cwd=repo,
                stdout=subprocess.DEVNULL, stderr=err)

    def stopping_takes(self, sig: int = signal.SIGTERM) -> float:
        """Seconds from `sig` to the end of the process (which must exit 0)."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=10)
        took = time.monotonic() - started
        assert code == 0, self.log.read_text()
        return took


def test_watch_answers_bad_requests_keeps_going_and_stops_within_a_second(
        repo: Path, watch: list[Watch], secret: Path) -> None:
    grove(repo, "    - name: seed\n      task: sleep 60\n")
    w = Watch(repo)
    watch.append(w)
    box = repo / ".engine/inbox/tree/seed"
    until(lambda: "seed: created" in w.log.read_text() or box.is_dir(), what="seed")
    expected = _plant_bad_requests(box, secret)
    write_request(repo, "seed", "good", spawn_body("good"))
    until(lambda: (box / "res-good.json").exists() and
          all((box / f"res-{rid}.json").exists() for rid in expected), what="answers")
    assert json.loads((box / "res-good.json").read_text())["status"] == "accepted"
    assert json.loads((box / "res-fifo.json").read_text())["status"] == "rejected"
    # and it goes on: a later good request is still taken
    write_request(repo, "seed", "later", spawn_body("later"))
    until(lambda: (box / "res-later.json").exists(), what="the later request")
    assert w.proc.poll() is None
    assert w.stopping_takes() < 1.0
    assert not (repo / ".engine/state/tree.lock").exists()
    assert_clean(w.log.read_text(), *_outputs(repo))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_watch_ends_within_a_second_while_a_pass_is_blocked(repo: Path, sig: int,
                                                            watch: list[Watch]) -> None:
    grove(repo, "    - name: seed\n      task: sleep 60\n")
    # the stand-in: a tmux server that accepts and never answers, as a hung one does;
    # the pass blocks in `tmux list-sessions` until the signal
    (repo / ".engine").mkdir()
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(str(repo / ".engine/tmux.sock"))
    hung.listen(8)
    hung.settimeout(60)
    conns: list[socket.socket] = []
    accepted = threading.Event()

    def serve() -> None:
        with hung:
            conns.append(hung.accept()[0])
            accepted.set()
    threading.Thread(target=serve, daemon=True).start()
    w = Watch(repo)
    watch.append(w)
    assert accepted.wait(60), w.log.read_text()
    time.sleep(0.2)  # well inside the blocked call
    assert (repo / ".engine/state/tree.lock").exists()
    assert w.stopping_takes(sig) < 1.0
    assert not (repo / ".engine/state/tree.lock").exists()
    assert "stopped" in w.log.read_text()
    for c in conns:
        c.close()
