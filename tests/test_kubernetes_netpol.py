"""Kubernetes runtime, the agent's NetworkPolicy: `network: none` reaches only the git remote
(exactly its addresses, resolved on the engine's host by `k8s_net`) and the cluster DNS;
`network: egress` reaches only the gateway (and the remote directly when git cannot use the
gateway: ssh, git://, http).

No test needs the internet: remotes are named by IP address, by a name under `.invalid`
(RFC 2606: never resolves), or by a name under `.test` that the `names` fixture answers by
replacing the resolver (`socket.getaddrinfo`, the edge): a remote's host never resolves to
loopback or link-local (the engine refuses those), so no real name can stand for one. The
client flow runs against the API server stand-in (tests/k8s_apiserver.py), pushing to a
real `git daemon` on loopback: the engine's host-side git reaches it through the test
HOME's `url.<base>.insteadOf` (git's own configuration), while the NetworkPolicy names what
the remote's name resolves to."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.desired import DesiredAgent
from engine.errors import EngineError
from engine.runtimes import k8s_net
from engine.runtimes import k8s_objects as objs
from tests.conftest import git, write_grove
from tests.k8s_apiserver import FakeApiServer
from tests.test_kubernetes import KUBE, SECRET, Kube, free_port, load, pod_launch, validate

DNS = {"to": [{"namespaceSelector": {"matchLabels": {
           "kubernetes.io/metadata.name": "kube-system"}},
       "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
       "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
GATEWAY = {"to": [{"podSelector": {"matchLabels": {"engine.egress": "gateway"}}}],
           "ports": [{"protocol": "TCP", "port": 3128}]}
UNRESOLVABLE = "https://no-such-host.invalid/org/r.git"
HOST = "git.example.test"  # a remote named by host name: `names` resolves it
HOST_ADDRS = ("192.0.2.10", "2001:db8::10")  # documentation ranges: never a real host

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: net}
spec:
  remote: https://git.example.com/org/repo.git
  defaults: {profile: none, harness: shell}
  profiles:
    none:
      runtime: kubernetes
      image: registry.example.com/agents/base:1.2
      namespace: agents
    egress:
      runtime: kubernetes
      image: registry.example.com/agents/base:1.2
      namespace: agents
      network: egress
      egress: [api.anthropic.com:443]
  agents:
    - {name: closed, task: make test}
    - {name: proxied, task: make test, profile: egress}
"""


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TEST_GIT_TOKEN", SECRET)
    k8s_net._cache.clear()
    yield
    k8s_net._cache.clear()


def agents(root: Path) -> dict[str, DesiredAgent]:
    write_grove(root, "net", GROVE)
    return {a.name: a for a in load(root, "net").agents}


def tcp(port: int, *cidrs: str) -> dict[str, Any]:
    return {"to": [{"ipBlock": {"cidr": c}} for c in cidrs],
            "ports": [{"protocol": "TCP", "port": port}]}


def launch(agent: DesiredAgent, remote: str) -> objs.PodLaunch:
    """The PodLaunch create and render make: with the remote's addresses resolved here."""
    return replace(pod_launch(agent, remote),
                   remote_addresses=k8s_net.remote_addresses(agent, remote))


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The resolver (the edge) answers names under `.test` from this table, whose values a
    test may change; every other name goes to the real resolver."""
    table = {HOST: [*HOST_ADDRS, HOST_ADDRS[0]],  # duplicates, as resolvers answer
             "loopback.example.test": ["127.0.0.1"],
             "mixed.example.test": ["203.0.113.5", "2001:db8::5", "169.254.169.254"],
             "metadata.example.test": ["fd00:ec2::254"]}
    real = socket.getaddrinfo

    def resolver(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in table:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in table[host]]
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    return table


def localhost() -> list[str]:
    """What this machine resolves `localhost` to (127.0.0.1, and ::1 where listed)."""
    return sorted({str(i[4][0]) for i in socket.getaddrinfo("localhost", 1,
                                                             type=socket.SOCK_STREAM)},
                  key=lambda a: (":" in a, a))


def cidrs(addrs: list[str]) -> list[str]:
    return [f"{a}/128" if ":" in a else f"{a}/32" for a in addrs]


# -- the policies, built from real resolutions ------------------------------------------

@pytest.mark.parametrize(("remote", "port", "literal"), [
    (f"https://{HOST}/org/r.git", 443, ""),
    (f"https://{HOST}:8443/org/r.git", 8443, ""),
    (f"ssh://git@{HOST}/org/r.git", 22, ""),
    (f"git@{HOST}:org/r.git", 22, ""),  # scp-style
    (f"git://{HOST}/r.git", 9418, ""),
    ("https://192.0.2.7/org/r.git", 443, "192.0.2.7/32"),
    ("ssh://git@[2001:db8::7]:2222/r.git", 2222, "2001:db8::7/128"),
    # private ranges stay allowed: self-hosted git servers live there
    ("ssh://git@10.0.0.5:2222/r.git", 2222, "10.0.0.5/32"),
    ("git@172.16.3.4:org/r.git", 22, "172.16.3.4/32"),
    ("https://192.168.1.20/org/r.git", 443, "192.168.1.20/32"),
    ("git://[fd12:3456::7]/r.git", 9418, "fd12:3456::7/128"),
    ("git://[::ffff:10.0.0.5]/r.git", 9418, "::ffff:a00:5/128"),
])
def test_network_none_reaches_exactly_the_remote_and_the_cluster_dns(
        tmp_path: Path, names: dict[str, list[str]], remote: str, port: int, literal: str
        ) -> None:
    agent = agents(tmp_path)["closed"]
    pl = launch(agent, remote)
    pol = objs.network_policy(agent, pl)
    assert pol is not None
    validate(pol)
    spec = pol["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    if not literal:
        assert pl.remote_addresses == HOST_ADDRS
        assert spec["egress"] == [tcp(port, *cidrs(list(HOST_ADDRS))), DNS]
    else:  # an IP address needs no resolution, and the Pod no DNS
        assert pl.remote_addresses == ()
        assert spec["egress"] == [tcp(port, literal)]
    # never a port (53 above all) to any address: every rule names where it goes
    assert all(rule.get("to") for rule in spec["egress"])


@pytest.mark.parametrize("remote", ["/srv/git/r.git", "file:///srv/git/r.git"])
def test_a_remote_without_a_network_gets_no_egress_at_all(tmp_path: Path, remote: str
                                                         ) -> None:
    agent = agents(tmp_path)["closed"]
    pl = launch(agent, remote)
    assert pl.remote_addresses == ()
    pol = objs.network_policy(agent, pl)
    assert pol is not None and pol["spec"]["egress"] == [] and pol["spec"]["ingress"] == []
    validate(pol)


def test_network_egress_sends_https_git_through_the_gateway(
        tmp_path: Path, names: dict[str, list[str]]) -> None:
    agent = agents(tmp_path)["proxied"]
    https = launch(agent, f"https://{HOST}:8443/org/r.git")
    assert https.remote_addresses == ()  # the gateway resolves it, not this machine
    pol = objs.network_policy(agent, https)
    assert pol is not None and pol["spec"]["egress"] == [GATEWAY, DNS]
    doc = json.loads(objs.gateway_policies("agents", agent, "t", https.remote)["data"][
        "net.proxied.json"])
    assert doc["allow"] == ["api.anthropic.com:443", f"{HOST}:8443"]
    gateway_pol = objs.gateway_objects(agent, https, "t")[4]  # the gateway may reach it
    assert gateway_pol["spec"]["egress"][1]["ports"] == [
        {"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8443}]
    # ssh speaks no HTTP proxy: exactly the remote, directly, and on no gateway list
    ssh = launch(agent, f"git@{HOST}:org/r.git")
    pol = objs.network_policy(agent, ssh)
    assert pol is not None
    assert pol["spec"]["egress"] == [GATEWAY, DNS, tcp(22, *cidrs(list(HOST_ADDRS)))]
    assert objs.allowed(agent, ssh.remote) == ["api.anthropic.com:443"]
    for p in (https, ssh):
        for obj in objs.build(agent, p, {}, "t" * 43):
            validate(obj)


def test_resolved_addresses_are_not_in_the_spec_hash(tmp_path: Path) -> None:
    """A DNS change gives a new NetworkPolicy, and nothing else: the workload and its
    spec-hash label stay, so the agent is not restarted."""
    agent = agents(tmp_path)["closed"]
    pl = pod_launch(agent, "git@git.example.com:org/r.git")
    one = objs.build(agent, replace(pl, remote_addresses=("192.0.2.10",)), {})
    two = objs.build(agent, replace(pl, remote_addresses=("192.0.2.11", "2001:db8::1")), {})
    changed = [a["kind"] for a, b in zip(one, two, strict=True) if a != b]
    assert changed == ["NetworkPolicy"]
    assert two[-1]["metadata"]["labels"]["engine.spec-hash"] == agent.spec_hash
    assert two[-2]["spec"]["egress"][0] == tcp(22, "192.0.2.11/32", "2001:db8::1/128")
    # unresolved (a caller that did not resolve): no rule to the remote, never a wider one
    bare = objs.network_policy(agent, pl)
    assert bare is not None and bare["spec"]["egress"] == [DNS]


def test_resolve_sorts_and_dedupes_and_is_bounded_in_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert k8s_net.resolve("localhost", 443) == tuple(localhost())
    real = socket.getaddrinfo
    release = threading.Event()

    def resolver(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "many.invalid":  # two families, duplicates, a scope id, unsorted
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1%lo", 22, 0, 1)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.20", 22)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.3", 22)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.20", 22))]
        if host == "slow.invalid":
            release.wait(30)
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    assert k8s_net.resolve("many.invalid", 22) == ("192.0.2.3", "192.0.2.20", "fe80::1")
    started = time.monotonic()
    with pytest.raises(OSError, match=r"no answer within 0\.5s"):
        k8s_net.resolve("slow.invalid", 22, timeout=0.5)
    assert time.monotonic() - started < 10
    release.set()


# -- bad input: a remote this machine cannot resolve ------------------------------------

def test_an_unresolvable_remote_is_one_line_naming_the_profile(tmp_path: Path) -> None:
    agent = agents(tmp_path)["closed"]
    with pytest.raises(EngineError) as info:
        k8s_net.remote_addresses(agent, UNRESOLVABLE)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("agent net/closed: profile none (network: none): cannot resolve "
                          "the git remote's host no-such-host.invalid "
                          f"({UNRESOLVABLE}) on this machine: ")
    # with network: egress an https remote is the gateway's to resolve: nothing to do here
    assert k8s_net.remote_addresses(agents(tmp_path)["proxied"], UNRESOLVABLE) == ()
    # a remote that embeds a token is refused as such, before it could be printed
    with pytest.raises(EngineError, match="must not embed a password"):
        k8s_net.remote_addresses(agent, "https://u:tok3n@no-such-host.invalid/r.git")
    # a port no NetworkPolicy can name: one line, not a traceback
    with pytest.raises(EngineError, match=r"spec\.remote 'https://h:99999/r\.git': Port out"):
        k8s_net.remote_addresses(agent, "https://h:99999/r.git")


# -- bad input: a remote that would open the node or the cloud's metadata service --------

REFUSED = ("; an agent's NetworkPolicy and egress gateway never open a loopback, link-local, "
           "unspecified or multicast address to it (private ranges are fine)")


@pytest.mark.parametrize(("remote", "names_what"), [
    ("https://169.254.169.254/x", "169.254.169.254, link-local"),  # cloud metadata
    ("http://169.254.170.2/v2/credentials", "169.254.170.2, link-local"),  # ECS task creds
    ("git://[::ffff:169.254.169.254]/x", "::ffff:169.254.169.254, link-local (169.254.169.254)"),
    ("git://[64:ff9b::a9fe:a9fe]/x", "64:ff9b::a9fe:a9fe, link-local (169.254.169.254)"),
    ("ssh://git@[fd00:ec2::254]/x", "fd00:ec2::254, a cloud metadata service"),
    ("https://2852039166/x", "2852039166, link-local (169.254.169.254)"),  # decimal
    ("https://0xa9fea9fe/x", "0xa9fea9fe, link-local (169.254.169.254)"),  # hex
    ("ssh://git@127.0.0.1:2375/x", "127.0.0.1, loopback"),  # the node's Docker API
    ("git@127.1:x", "127.1, loopback (127.0.0.1)"),
    ("ssh://git@[::1]/x", "::1, loopback"),
    ("git://[::127.0.0.1]/x", "::127.0.0.1, loopback (127.0.0.1)"),
    ("ssh://git@[fe80::1]/x", "fe80::1, link-local"),
    ("git://0.0.0.0/x", "0.0.0.0, unspecified"),
    ("git://[::]/x", "::, unspecified"),
    ("git://224.0.0.251/x", "224.0.0.251, multicast"),
    ("git://[ff02::1]/x", "ff02::1, multicast"),
    ("ssh://git@localhost:2375/x", "localhost, a loopback name"),
    ("git@LocalHost.:x", "LocalHost., a loopback name"),
    ("https://git.localhost/x", "git.localhost, a loopback name"),
    # a zone id: no NetworkPolicy can name one (it rendered an invalid CIDR)
    ("ssh://[fe80::1%25eth0]/x", "fe80::1%25eth0, a scoped address"),
    ("git://[2001:db8::1%25eth0]/x", "2001:db8::1%25eth0, a scoped address"),
])
@pytest.mark.parametrize("which", ["closed", "proxied"])
def test_a_remote_at_a_forbidden_address_is_one_line_before_any_object(
        tmp_path: Path, remote: str, names_what: str, which: str) -> None:
    agent = agents(tmp_path)[which]
    network = {"closed": "none", "proxied": "egress"}[which]  # the profiles' names too
    for refuse in (objs.check, k8s_net.remote_addresses):  # apply and render call both
        with pytest.raises(EngineError) as info:
            refuse(agent, remote)
        msg = str(info.value)
        assert "\n" not in msg
        assert msg.startswith(f"agent net/{which}: profile {network} (network: {network}): "
                              f"the git remote {remote} names {names_what}"), msg
        assert msg.endswith(REFUSED)
    # a caller that skipped check: the builders refuse it too, never an ipBlock or a list
    with pytest.raises(EngineError, match="never open a loopback"):
        objs.build(agent, pod_launch(agent, remote), {}, "t" * 43)


def test_network_egress_refuses_a_forbidden_https_remote_for_the_gateway_list(
        tmp_path: Path) -> None:
    """An https remote goes on the gateway's list (not in a NetworkPolicy): refused all the
    same, where it was `169.254.169.254:443` on the gateway's list."""
    agent = agents(tmp_path)["proxied"]
    assert objs.remote_via_gateway("https://169.254.169.254/x") == "169.254.169.254:443"
    with pytest.raises(EngineError, match=r"remote https://169\.254\.169\.254/x names "
                                          r"169\.254\.169\.254, link-local;"):
        objs.check(agent, "https://169.254.169.254/x")
    with pytest.raises(EngineError, match=r"names fe80::1%25eth0, a scoped address"):
        objs.check(agent, "https://[fe80::1%25eth0]:8443/x")
    with pytest.raises(EngineError, match="names localhost, a loopback name"):
        objs.check(agent, "https://localhost:2375/x")


@pytest.mark.parametrize(("host", "answer"), [
    ("loopback.example.test", "127.0.0.1, loopback"),
    # one forbidden address among public ones is refused: git may connect to any of them
    ("mixed.example.test", "169.254.169.254, 203.0.113.5, 2001:db8::5, of which "
                           "169.254.169.254 is link-local (one such address refuses the "
                           "name, also among others)"),
    ("metadata.example.test", "fd00:ec2::254, a cloud metadata service"),
])
def test_a_host_name_resolving_to_a_forbidden_address_is_refused(
        tmp_path: Path, names: dict[str, list[str]], host: str, answer: str) -> None:
    agent = agents(tmp_path)["closed"]
    remote = f"ssh://git@{host}/r.git"
    with pytest.raises(EngineError) as info:
        k8s_net.remote_addresses(agent, remote)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (f"agent net/closed: profile none (network: none): the git remote's host "
                   f"{host} ({remote}) resolves on this machine to {answer}{REFUSED}")
    # and addresses handed to the builder unchecked never become an ipBlock
    pl = replace(pod_launch(agent, remote), remote_addresses=tuple(names[host]))
    with pytest.raises(EngineError, match=r"resolves on this machine to"):
        objs.network_policy(agent, pl)


def test_the_real_resolver_answering_loopback_is_refused(tmp_path: Path) -> None:
    """No stand-in: what this machine's resolver answers for `localhost` (by the name's
    own rule `localhost` is refused before it is asked)."""
    agent = agents(tmp_path)["closed"]
    answer = k8s_net.resolve("localhost", 22)
    assert answer == tuple(localhost()) and "127.0.0.1" in answer
    with pytest.raises(EngineError, match=r"resolves on this machine to 127\.0\.0\.1.*loopback"):
        objs.refuse_resolved(agent, "git://localhost/r.git", "localhost", answer)


def test_a_forbidden_remote_is_not_refused_where_no_rule_would_open_it(tmp_path: Path
                                                                      ) -> None:
    """Another `network:` value gives no NetworkPolicy and no gateway list: the Pod network
    decides, and the engine opens nothing."""
    agent = replace(agents(tmp_path)["closed"], network="bridge")
    objs.check(agent, "https://169.254.169.254/x")
    assert k8s_net.remote_addresses(agent, "ssh://git@localhost/x") == ()
    assert objs.network_policy(agent, pod_launch(agent, "https://169.254.169.254/x")) is None


@pytest.fixture
def kube(repo: Path, api: FakeApiServer) -> Kube:
    return Kube(repo, api)


def commit_grove(kube: Kube, remote: str) -> None:
    write_grove(kube.repo, "kube", KUBE.format(
        remote=remote, namespace="agents", task=json.dumps("echo hi"),
        kubeconfig=kube.kubeconfig, extra="", restart="never"))
    git(kube.repo, "add", "-A")
    git(kube.repo, "commit", "-qm", "grove")


def test_apply_and_render_refuse_an_unresolvable_remote_and_apply_nothing(
        kube: Kube, engine: Any) -> None:
    commit_grove(kube, UNRESOLVABLE)
    res = engine("render", "-g", "kube")
    assert res.code == 1 and res.out == "" and "Traceback" not in res.err, res
    assert "cannot resolve the git remote's host no-such-host.invalid" in res.err
    res = engine("apply", "--auto-approve", "-g", "kube")
    assert res.code == 1 and "Traceback" not in res.err, res
    assert "agent kube/worker: profile pod (network: none): cannot resolve the git " \
           "remote's host no-such-host.invalid" in res.out + res.err
    assert kube.objects() == {}


@pytest.mark.parametrize("remote", ["ssh://git@localhost:2375/x", "https://169.254.169.254/x",
                                    "ssh://git@mixed.example.test/x"])
def test_apply_and_render_refuse_a_forbidden_remote_with_the_same_line(
        kube: Kube, engine: Any, names: dict[str, list[str]], remote: str) -> None:
    commit_grove(kube, remote)
    res = engine("render", "-g", "kube")
    assert res.code == 1 and res.out == "" and "Traceback" not in res.err, res
    [line] = [x for x in res.err.splitlines() if "agent kube/worker" in x]
    msg = line[line.index("agent kube/worker: "):]
    assert msg.startswith("agent kube/worker: profile pod (network: none): the git remote")
    assert msg.endswith(REFUSED)
    res = engine("apply", "--auto-approve", "-g", "kube")
    assert res.code == 1 and "Traceback" not in res.err, res
    assert [x for x in (res.out + res.err).splitlines() if x.endswith(" - " + msg)]
    assert kube.objects() == {}


# -- the client flow: a remote named by host name, pushed to for real --------------------

@pytest.fixture
def daemon(kube: Kube, names: dict[str, list[str]]) -> Iterator[str]:
    """`git daemon` on loopback serving the stand-in's bare remote, pushes enabled: a
    remote named by host name (HOST) that the engine really pushes to. The NetworkPolicy
    names what HOST resolves to (`names`); the engine's own git, on this host, reaches the
    daemon through `url.<base>.insteadOf` in the test HOME's git configuration."""
    port = free_port()
    proc = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack",
         f"--base-path={kube.remote.parent}", "--listen=127.0.0.1", f"--port={port}",
         str(kube.remote.parent)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        timeout=1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "git daemon"
            time.sleep(0.1)
        git(kube.repo, "config", "--global", f"url.git://127.0.0.1:{port}/.insteadOf",
            f"git://{HOST}:{port}/")
        yield f"git://{HOST}:{port}/{kube.remote.name}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_apply_sends_the_policy_render_prints_and_create_refreshes_it(
        kube: Kube, daemon: str, engine: Any, names: dict[str, list[str]]) -> None:
    commit_grove(kube, daemon)
    port = int(daemon.rsplit(":", 1)[1].split("/")[0])
    res = engine("render", "-g", "kube", "--format", "json")
    assert res.code == 0, res
    rendered = next(o for o in json.loads(res.out)["items"] if o["kind"] == "NetworkPolicy")
    validate(rendered)
    assert rendered["spec"]["egress"] == [tcp(port, *cidrs(list(HOST_ADDRS))), DNS]
    res = engine("apply", "--auto-approve", "-g", "kube")
    assert res.code == 0, res
    assert git(kube.remote, "rev-parse", "refs/heads/engine/kube/worker")  # pushed for real
    found = kube.objects()
    applied = found["NetworkPolicy/kube-worker"]
    assert applied["spec"] == rendered["spec"]
    assert {k: v for k, v in applied["metadata"]["labels"].items()
            if k != "engine.spec-hash"} == {k: v for k, v in rendered["metadata"][
                "labels"].items() if k != "engine.spec-hash"}

    # the remote's host now resolves elsewhere: the next create (the workload is live and
    # kept) re-applies the NetworkPolicy with the new address, and nothing else
    worker = load(kube.repo, "kube").agent("worker")
    kube.rt.create(kube.launch(worker))  # this test's secret key: its own spec hash
    job = kube.objects()["Job/kube-worker"]
    names[HOST] = ["192.0.2.11"]
    k8s_net._cache.clear()
    kube.rt.create(kube.launch(worker))
    found = kube.objects()
    assert found["NetworkPolicy/kube-worker"]["spec"]["egress"] == [
        tcp(port, "192.0.2.11/32"), DNS]
    assert found["Job/kube-worker"]["metadata"]["resourceVersion"] == \
        job["metadata"]["resourceVersion"]
    assert found["Job/kube-worker"]["metadata"]["labels"]["engine.spec-hash"] == \
        job["metadata"]["labels"]["engine.spec-hash"]
