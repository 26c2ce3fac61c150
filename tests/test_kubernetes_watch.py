"""Kubernetes runtime, watching (engine/runtimes/k8s_watch.py): informers against the API
server stand-in (tests/k8s_apiserver.py, the suite's one stand-in) follow creates, updates
and deletes; resume from their resourceVersion after a dropped stream; list again on 410,
on a malformed stream and at each resync; and make a no-op observe pass cost no request.
The controller watches; one-shot commands do not. A server that never answers a watch,
a thread that is stuck, a write the watch misses, endless continue tokens, oversized
answers and data of the wrong shape never make observe serve a stale cache, hang or
trace back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.errors import EngineError, RuntimeUnavailable
from engine.runtimes import FAILED, PENDING, RUNNING, SUCCEEDED, get
from engine.runtimes import k8s_api as ka
from engine.runtimes import k8s_watch as kw
from engine.runtimes.k8s_api import Call, Cluster
from tests.conftest import git
from tests.k8s_apiserver import FakeApiServer
from tests.test_kubernetes import SECRET, Kube, job_pod, wait_for

SEL = "engine.grove=w"


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GIT_TOKEN", SECRET)


@pytest.fixture
def server(api: FakeApiServer) -> FakeApiServer:
    return api


@pytest.fixture
def kube(repo: Path, server: FakeApiServer) -> Kube:
    return Kube(repo, server)


def pod(name: str, grove: str = "w", phase: str = "") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"engine.grove": grove,
                                                  "engine.agent": name}},
            "spec": {"containers": [{"name": "agent", "image": "x"}]}}


def put(api: FakeApiServer, obj: dict[str, Any], ns: str = "default") -> None:
    """Create or change an object in the stand-in's store (what another client does)."""
    with api.lock:
        api.apply(("pods", ns, obj["metadata"]["name"]), obj, "someone", True)


def remove(api: FakeApiServer, name: str, ns: str = "default") -> None:
    with api.lock:
        api.delete(("pods", ns, name), "Background")


@pytest.fixture
def cluster(kube: Kube) -> Cluster:
    return kube.rt.cluster(str(kube.kubeconfig), "")


@pytest.fixture
def informer(cluster: Cluster) -> Iterator[kw.Informer]:
    inf = kw.Informer(cluster, "Pod", "default", SEL).start()
    yield inf
    inf.stop()
    assert not inf._thread.is_alive()


def names(inf: kw.Informer) -> dict[str, str]:
    """name -> phase ("" while none) of what the informer holds."""
    return {o["metadata"]["name"]: o["status"].get("phase", "") for o in inf.items() or []}


def watch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("k8s-watch-")]


def test_the_cache_follows_creates_updates_and_deletes(kube: Kube,
                                                       informer: kw.Informer) -> None:
    api = kube.api
    put(api, pod("a"))
    assert wait_for(informer.items) is not None
    assert names(informer) == {"a": "Pending"}
    put(api, pod("b"))
    put(api, pod("other", grove="x"))  # outside the selection: never cached
    wait_for(lambda: names(informer) == {"a": "Pending", "b": "Pending"})
    api.set_pod("default", "a", "Running")
    wait_for(lambda: names(informer)["a"] == "Running")
    remove(api, "b")
    wait_for(lambda: names(informer) == {"a": "Running"})
    moved = pod("a", grove="x")  # relabelled out of the selection: gone from the cache
    put(api, moved)
    wait_for(lambda: names(informer) == {})
    assert informer.lists == 1 and informer.synced
    assert informer.resource_version == str(api.rv)
    slim = kw._slim(api.get("pods", "default", "other"), {})[1]
    assert slim is not None and "spec" not in slim and "managedFields" not in slim["metadata"]


def test_a_dropped_stream_resumes_from_its_resource_version(kube: Kube,
                                                            informer: kw.Informer) -> None:
    api = kube.api
    put(api, pod("a"))
    wait_for(lambda: "a" in names(informer))
    wait_for(lambda: api.watches)
    rv = informer.resource_version
    with api.lock:  # the stream breaks before it carries these changes
        api.drop_watches()
        api.set_pod("default", "a", "Succeeded", exit_code=0)
        api.apply(("pods", "default", "b"), pod("b"), "someone", True)
    wait_for(lambda: names(informer) == {"a": "Succeeded", "b": "Pending"})
    assert len(api.watches) == 2  # the first watch, and the one after the cut, from the
    assert api.watches[-1] == ("/api/v1/namespaces/default/pods", rv)  # RV it had then
    assert informer.lists == 1  # nothing listed again


def test_410_expired_lists_again(kube: Kube, informer: kw.Informer) -> None:
    api = kube.api
    put(api, pod("a"))
    wait_for(lambda: "a" in names(informer))
    with api.lock:  # cut, changed, and the history compacted past the informer's RV
        api.drop_watches()
        api.apply(("pods", "default", "b"), pod("b"), "someone", True)
        api.compact()
    wait_for(lambda: informer.lists == 2 and informer.synced)
    assert names(informer) == {"a": "Pending", "b": "Pending"}


def test_bookmarks_advance_the_resource_version(kube: Kube, cluster: Cluster) -> None:
    api = kube.api
    api.bookmark_every = 0.05
    inf = kw.Informer(cluster, "Pod", "default", SEL).start()
    try:
        wait_for(lambda: inf.synced and api.watches)
        put(api, pod("elsewhere"), ns="agents")  # changes the informer does not see
        put(api, pod("elsewhere2"), ns="agents")
        wait_for(lambda: inf.resource_version == str(api.rv))
        with api.lock:  # a compaction now costs no LIST: the bookmark's RV is current
            api.drop_watches()
            api.compact()
        wait_for(lambda: len(api.watches) >= 2)
        put(api, pod("a"))
        wait_for(lambda: "a" in names(inf))
        assert inf.lists == 1
    finally:
        inf.stop()


def test_resync_lists_again_and_repairs_a_lost_event(kube: Kube, cluster: Cluster) -> None:
    api = kube.api
    put(api, pod("a"))
    inf = kw.Informer(cluster, "Pod", "default", SEL, resync=0.3).start()
    try:
        wait_for(lambda: "a" in names(inf))
        with api.lock:  # a change no watch ever reports (an event lost on the way)
            api.objects[("pods", "default", "a")]["status"] = {"phase": "Failed"}
        wait_for(lambda: names(inf) == {"a": "Failed"})
        first = inf.lists
        assert first >= 2
        wait_for(lambda: inf.lists > first)  # and again, at its interval
    finally:
        inf.stop()


@pytest.mark.parametrize("raw", [
    b"this is not json\n",
    b'{"type": "ADDED"}\n',
    b'{"type": "WHATEVER", "object": {"metadata": {"resourceVersion": "1"}}}\n',
    b'{"type": "ADDED", "object": {"metadata": {"resourceVersion": "9"}}}\n',
    b'{"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}}\n',
    b"[1, 2, 3]\n",
    b'{"type": "ADDED", "object": ' + b"[" * 2000 + b"\n",  # longer than a line may be
    b"[" * 990 + b"\n",  # deep
])
def test_a_malformed_stream_unsyncs_observe_lists_and_it_recovers(
        kube: Kube, cluster: Cluster, raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kw, "MAX_LINE", 1000)
    monkeypatch.setattr(kw, "BACKOFF", (0.3, 0.3))
    api = kube.api
    put(api, pod("a"))
    inf = kw.Informer(cluster, "Pod", "default", SEL).start()
    try:
        wait_for(lambda: inf.synced and api.watches)
        api.inject(raw)
        wait_for(lambda: not inf.synced)
        assert inf.error and "\n" not in inf.error
        assert inf.items() is None  # observe lists for itself meanwhile
        wait_for(lambda: inf.synced and inf.lists == 2)
        assert names(inf) == {"a": "Pending"} and inf._thread.is_alive()
    finally:
        inf.stop()


def test_a_huge_line_is_refused_before_it_is_held(kube: Kube, cluster: Cluster,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kw, "MAX_LINE", 64 << 10)
    inf = kw.Informer(cluster, "Pod", "default", SEL).start()
    try:
        wait_for(lambda: inf.synced and kube.api.watches)
        kube.api.inject(b'{"type": "ADDED", "object": {"x": "' + b"y" * (1 << 20))
        wait_for(lambda: "longer than" in inf.error)
    finally:
        inf.stop()


def test_a_server_that_goes_away_unsyncs_and_observe_says_so(kube: Kube) -> None:
    kube.grove()
    kube.rt.start_watching()
    try:
        assert kube.rt.observe("kube") == {}
        kube.api.stop()
        with pytest.raises(RuntimeUnavailable) as err:
            wait_for(lambda: kube.rt.observe("kube") is None)
        assert "cannot reach the cluster" in err.value.summary
    finally:
        kube.rt.stop_watching()


def test_a_no_op_observe_pass_makes_no_request_once_synced(kube: Kube) -> None:
    g = kube.grove()
    kube.rt.create(kube.launch(g.agent("worker")))
    plain = get("kubernetes", kube.repo)
    woken = threading.Event()
    kube.rt.start_watching(woken.set)
    try:
        first = kube.rt.observe("kube")
        assert first == plain.observe("kube")
        assert first["worker"].phase == PENDING
        assert {("Pod", "agents"), ("Job", "agents")} <= {
            (k, n) for _, k, n, _ in kube.rt._informers}
        wait_for(lambda: len(kube.api.watches) >= 2)  # synced: listed, and watching
        kube.api.requests.clear()
        for _ in range(3):
            assert kube.rt.observe("kube") == first
        assert kube.api.requests == []
        assert not woken.is_set()
        kube.api.set_pod("agents", job_pod(kube), "Running")
        woken.wait(10)
        assert woken.is_set()  # the controller is woken by the change
        wait_for(lambda: kube.rt.observe("kube")["worker"].phase == RUNNING)
        kube.api.set_pod("agents", job_pod(kube), "Succeeded", exit_code=0)
        kube.api.set_job("agents", "kube-worker", "Complete")
        wait_for(lambda: kube.rt.observe("kube")["worker"].phase == SUCCEEDED)
        assert kube.rt.observe("kube") == plain.observe("kube")
    finally:
        kube.rt.stop_watching()
    assert watch_threads() == []


def test_finding_an_agents_pod_for_exec_lists_nothing_once_synced(kube: Kube) -> None:
    """Inbox sync, look and message find the agent's Pod in the watch cache: a pass that
    syncs every running agent's inbox makes no LIST per agent."""
    g = kube.grove()
    kube.rt.create(kube.launch(g.agent("worker")))
    kube.api.set_pod("agents", job_pod(kube), "Running")
    kube.rt.start_watching()
    try:
        kube.rt.observe("kube")
        wait_for(lambda: len(kube.api.watches) >= 2)
        wait_for(lambda: kube.rt.observe("kube")["worker"].phase == RUNNING)
        kube.api.requests.clear()
        _, ns, name = kube.rt._pod("kube", "worker")
        assert (ns, name) == ("agents", job_pod(kube)) and kube.api.requests == []
    finally:
        kube.rt.stop_watching()
    kube.api.requests.clear()
    assert kube.rt._pod("kube", "worker")[2] == job_pod(kube)  # not watching: one LIST
    assert [m for m, _ in kube.api.requests] == ["GET"]


def test_observe_after_its_own_writes_shows_them(kube: Kube) -> None:
    g = kube.grove()
    kube.rt.start_watching()
    try:
        assert kube.rt.observe("kube") == {}
        kube.rt.create(kube.launch(g.agent("worker")))
        assert "worker" in kube.rt.observe("kube")
        kube.rt.delete("kube", "worker")
        assert "worker" not in kube.api.watches  # (the Job's deletion is waited for;
        wait_for(lambda: kube.rt.observe("kube") == {})  # its Pod's is the server's)
    finally:
        kube.rt.stop_watching()


def test_the_controller_watches_and_one_shot_commands_do_not(kube: Kube, engine: Any,
                                                             repo: Path) -> None:
    kube.grove()
    git(kube.repo, "add", "-A")
    git(kube.repo, "commit", "-qm", "grove")
    assert engine("plan", "-g", "kube").code in (0, 2)
    assert engine("status", "-g", "kube").code == 0
    assert kube.api.watches == []
    res = engine("watch", "--once", "-g", "kube")
    assert res.code == 0, res
    assert "Job/kube-worker" in kube.objects()
    assert {p for p, _ in kube.api.watches} == {"/api/v1/namespaces/agents/pods",
                                                "/apis/batch/v1/namespaces/agents/jobs"}
    assert watch_threads() == []  # stopped with the controller
    assert engine("destroy", "--auto-approve", "-g", "kube").code == 0


def test_a_watch_never_answered_times_out_and_lists_again(
        kube: Kube, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes a watch and never sends its headers holds the thread only its
    timeoutSeconds and GRACE: then it lists again and sees what the watch did not say."""
    monkeypatch.setattr(kw, "GRACE", 1.0)
    monkeypatch.setattr(kw, "BACKOFF", (0.1, 0.1))
    api = kube.api
    put(api, pod("a"))
    inf = kw.Informer(cluster, "Pod", "default", SEL, timeout=1, resync=60).start()
    try:
        wait_for(lambda: inf.synced and api.watches)
        api.watch_stall = True
        api.drop_watches()
        wait_for(lambda: api.stalled)
        api.set_pod("default", "a", "Failed")  # no watch says so
        wait_for(lambda: names(inf) == {"a": "Failed"})
        assert inf.lists >= 2 and api.stalled >= 1
    finally:
        api.watch_stall = False
        inf.stop()


def test_a_stuck_thread_serves_no_stale_cache(kube: Kube, cluster: Cluster,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever holds the informer's thread, its cache is not served once it has heard
    nothing for longer than a resync and a watch take."""
    monkeypatch.setattr(kw, "GRACE", 1.0)
    api, gate = kube.api, threading.Event()
    put(api, pod("a"))
    inf = kw.Informer(cluster, "Pod", "default", SEL, resync=0.5, timeout=1,
                      on_change=lambda: gate.wait(30)).start()
    try:
        wait_for(lambda: inf.synced and api.watches)
        put(api, pod("b"))  # the thread tells on_change, which never returns
        wait_for(lambda: inf.items() is None)
        assert inf.synced  # it still says so, but observe lists for itself
        gate.set()
        wait_for(lambda: names(inf) == {"a": "Pending", "b": "Pending"})
    finally:
        gate.set()
        inf.stop()


def test_a_write_the_watch_misses_lists_again(kube: Kube, cluster: Cluster,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An expected write the cache does not show within EXPECT_TTL is not waited out and
    then trusted: the informer lists again (its watch cut; or, stuck before any answer,
    observe lists meanwhile)."""
    monkeypatch.setattr(kw, "EXPECT_TTL", 0.5)
    monkeypatch.setattr(kw, "BACKOFF", (0.1, 0.1))
    api = kube.api
    put(api, pod("a"))
    inf = kw.Informer(cluster, "Pod", "default", SEL).start()
    try:
        wait_for(lambda: inf.synced and api.watches)
        with api.lock:  # a write no watch reports
            api.objects[("pods", "default", "a")]["status"] = {"phase": "Failed"}
            written = {**api.objects[("pods", "default", "a")]}
            written["metadata"] = {**written["metadata"], "resourceVersion": str(api.rv + 1)}
        inf.expect("a", written)
        assert inf.items(wait=0.1) is None
        time.sleep(0.6)
        wait_for(lambda: names(inf) == {"a": "Failed"})
        assert inf.lists == 2 and len(api.watches) == 2  # the watch was cut for it

        api.watch_stall = True  # the thread now waits on a watch that never answers
        api.drop_watches()
        wait_for(lambda: api.stalled)
        api.set_pod("default", "a", "Running")
        inf.expect("a", api.get("pods", "default", "a"))
        assert inf.items(wait=0.1) is None
        time.sleep(0.6)
        assert inf.items(wait=0.1) is None  # past EXPECT_TTL: still not the stale cache
        assert "did not show in the watch" in inf.error and not inf.synced
        api.watch_stall = False
        wait_for(lambda: names(inf) == {"a": "Running"})
    finally:
        api.watch_stall = False
        inf.stop()


def test_endless_continue_tokens_are_refused(kube: Kube, cluster: Cluster,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    api = kube.api
    for n in range(5):
        put(api, pod(f"p{n}"))
    kube.grove()
    api.endless_lists = True
    out: list[Any] = []

    def one_shot() -> None:
        try:
            kube.rt.observe("kube")
        except EngineError as e:
            out.append(e.summary)
    t = threading.Thread(target=one_shot, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and len(out) == 1
    assert "gave the same continue token twice" in out[0] and "\n" not in out[0]
    inf = kw.Informer(cluster, "Pod", "default", SEL).start()
    try:
        wait_for(lambda: "continue token" in inf.error)
        assert inf.items() is None
    finally:
        inf.stop()
    api.endless_lists = False  # pages that never end, each with a new token
    monkeypatch.setattr(kw, "MAX_OBJECTS", 3)
    with pytest.raises(EngineError) as err:
        kw.list_all(cluster, "Pod", "default", SEL, 1)
    assert "more than 3 objects" in err.value.summary
    monkeypatch.setattr(kw, "MAX_OBJECTS", 5)  # as many as there are: listed
    assert len(kw.list_all(cluster, "Pod", "default", SEL, 1)[0]) == 5


def test_answers_are_bounded(kube: Kube, cluster: Cluster,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    api = kube.api
    for n in range(10):
        put(api, pod(f"p{n}"))
    monkeypatch.setattr(ka, "MAX_BODY", 2000)
    with pytest.raises(EngineError) as err:
        kw.list_all(cluster, "Pod", "default", SEL, 500)
    assert "longer than 2000 bytes" in err.value.summary
    assert len(kw.list_all(cluster, "Pod", "default", SEL, 1)[0]) == 10  # small pages
    monkeypatch.setattr(ka, "MAX_ERROR_BODY", 1000)
    name = "n" * 5000
    with pytest.raises(ka.NotFound) as nf:
        cluster.request("GET", ka.path("Pod", "default", name),
                        Call("get", "pods", "default", "x"))
    assert len(nf.value.detail) <= 1000


@pytest.mark.parametrize("status", [
    {"phase": "Running", "containerStatuses": "x"},
    {"phase": "Failed", "containerStatuses": ["x", {"name": "agent", "state": "x",
                                                   "lastState": ["x"]}]},
    {"phase": "Failed", "containerStatuses": [{"name": "agent", "state": {
        "terminated": {"exitCode": "x", "reason": ["x"]}}}]},
    {"phase": ["x"], "initContainerStatuses": [{"state": {"waiting": "x"}}], "reason": {}},
    "x",
    ["x"],
])
def test_status_of_the_wrong_shape_reads_as_absent(status: Any) -> None:
    labels = {"engine.agent": "w", "engine.spec-hash": "h"}
    pods = [{"metadata": {"name": "w-1", "labels": labels, "deletionTimestamp": None},
             "status": status},
            {"metadata": {"name": "odd", "labels": "x"}}, {"metadata": "x"}]
    jobs = [{"metadata": {"name": "w", "labels": {**labels, "engine.spec-hash": ["h"]}},
             "status": {"conditions": ["x", {"status": "True", "type": "Failed",
                                             "reason": ["x"]}]}},
            {"metadata": {"name": "v", "labels": {"engine.agent": "v"}},
             "status": {"conditions": "x"}}]
    out = ka.essence("g", pods, jobs, "ctx")
    assert set(out) == {"w", "v"}
    assert out["w"].phase == FAILED and out["w"].spec_hash == ""
    assert out["v"].reason == "no pod yet"
    name, slim = kw._slim({"metadata": {"name": "a", "labels": "x"}, "status": "x"}, {})
    assert (name, slim) == ("a", {"metadata": {"name": "a", "labels": {}}, "status": {}})
