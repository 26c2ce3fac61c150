"""Kubernetes runtime, watching (engine/runtimes/k8s_watch.py): informers against the API
server stand-in (tests/k8s_apiserver.py, the suite's one stand-in) follow creates, updates
and deletes; resume from their resourceVersion after a dropped stream; list again on 410,
on a malformed stream and at each resync; and make a no-op observe pass cost no request.
The controller watches; one-shot commands do not."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.errors import RuntimeUnavailable
from engine.runtimes import PENDING, RUNNING, SUCCEEDED, get
from engine.runtimes import k8s_watch as kw
from engine.runtimes.k8s_api import Cluster
from tests.conftest import git
from tests.k8s_apiserver import FakeApiServer
from tests.test_kubernetes import SECRET, Kube, job_pod, wait_for

SEL = "engine.grove=w"


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GIT_TOKEN", SECRET)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    api = FakeApiServer(namespaces=("default", "agents"))
    api.start()
    yield api
    api.stop()


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
