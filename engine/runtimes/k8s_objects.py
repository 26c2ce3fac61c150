"""Kubernetes runtime, object building (pure): one resolved agent -> the API objects that run it.

Called by `engine.runtimes.kubernetes` (create), by `engine render` (the same objects,
offline) and by the tests (validation against the official Kubernetes schemas). `build`
returns plain dicts in apply order: the agent's other objects, then its workload last (a
Job when `restart: never`, the cluster records completion; else a Pod). Owned by the
workload, with an `ownerReferences` entry whose uid is `OWNER_UID` until apply knows the
owner's: ConfigMap (the wrapper and clone scripts, the agent-side client) and Secret (only
this agent's credentials, mounted as files, and with `network: egress` its proxy URL).
Never owned: PersistentVolumeClaim (profile `persistence`) and NetworkPolicy
(`network: none` or `egress`;
the git remote's addresses come resolved in `PodLaunch.remote_addresses`, see `k8s_net`).
Every object carries the engine's owner labels and the recommended `app.kubernetes.io/*`
labels.

`network: egress` also needs the namespace's egress gateway (`gateway_*`, shared by every
egress agent of the namespace): a ConfigMap with the gateway's code, one with the agents'
policies (each agent's key written by a field manager of its own), a Deployment, a
Service and the gateway's NetworkPolicy. No I/O and no `kubernetes` package here.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from engine import egress
from engine.desired import DesiredAgent, parse_memory
from engine.errors import EngineError
from engine.runtimes import LABEL_AGENT, LABEL_GROVE, LABEL_HASH, LABEL_REPO, LABEL_VERSION

FIELD_MANAGER = "grove-engine"
# The recommended labels (kubernetes.io/docs/concepts/overview/working-with-objects/
# common-labels): name and managed-by are fixed, instance and part-of name the agent.
APP_NAME = "grove-engine-agent"
L_NAME, L_INSTANCE, L_PART_OF, L_MANAGED_BY = (
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by")
# What `engine render` shows where only apply can know the value: the owner's uid (the
# server assigns it when the Job or Pod is created) and the digest of a gateway token.
OWNER_UID = "<uid of the owner, set at apply>"
TOKEN_AT_APPLY = "<set at apply>"
# ... and the spec-hash label of an agent with credentials: the hash digests their values,
# which render never reads (a valid label value: kubectl diff accepts it).
SPEC_HASH_AT_APPLY = "set-at-apply"
CONTAINER = "agent"
WORKSPACE = "/workspace"
SECRETS_DIR = "/run/secrets"
ENGINE_DIR = "/run/engine"
BIN_DIR = f"{ENGINE_DIR}/bin"
INBOX = f"{ENGINE_DIR}/inbox"
TMUX_SOCKET = f"{ENGINE_DIR}/tmux.sock"
SESSION = "agent"
HOME = "/home/engine"
GRACE_SECONDS = 60  # SIGTERM -> the wrapper pushes the branch before the kill
# Credentials with a meaning for git inside the Pod (see docs/kubernetes.md).
GIT_TOKEN, GIT_SSH_KEY = "GIT_TOKEN", "GIT_SSH_KEY"
_TOKEN_HELPER = ('!f() { test "$1" = get || exit 0; echo "username=${GIT_USERNAME:-x-access-'
                 f'token}}"; printf "password=%s\\n" "$(cat {SECRETS_DIR}/{GIT_TOKEN})"; }}; f')
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")
_VALID_LABEL = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")

# -- network: egress: the namespace's gateway (docs/kubernetes.md, "network: egress") --
# Names the agents' `object_name` never produces (it has one single `-`, or `---`).
GATEWAY = "engine-egress"  # Deployment and Service
GATEWAY_CODE = "engine-egress-code"  # ConfigMap: the gateway's Python modules
GATEWAY_POLICIES = "engine-egress-policies"  # ConfigMap: <grove>.<agent>.json per agent
GATEWAY_NETPOL = "engine-egress-gateway"  # the gateway Pods' NetworkPolicy
EGRESS_LABEL = "engine.egress"  # "gateway" on the gateway's objects, "client" on agents
GATEWAY_PORT = egress.PROXY_PORT
GATEWAY_UID = 65532
GATEWAY_ROOT = "/run/engine-egress"  # emptyDir: the gateway's state and log.jsonl
GATEWAY_CODE_DIR = "/opt/engine-egress"
GATEWAY_POLICY_DIR = "/etc/engine-egress/policies"
GATEWAY_LOG = f"{GATEWAY_ROOT}/.engine/egress/{egress.LOG_NAME}"
# The gateway's modules: standard library only, shipped in GATEWAY_CODE.
GATEWAY_FILES = ("engine/__init__.py", "engine/errors.py", "engine/fsutil.py", "engine/paths.py",
                 "engine/inventory.py", "engine/events.py", "engine/egress/__init__.py",
                 "engine/egress/gateway.py")
EGRESS_PROXY_KEY = "ENGINE_EGRESS_PROXY"  # the agent's Secret: its proxy URL (and token)
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
EGRESS_WAIT_SECONDS = 300
# The egress init container: waits until the gateway knows this agent (the kubelet
# refreshes the policies ConfigMap in the gateway Pod within a minute or two). A probe
# `CONNECT engine.invalid:9` answered 403 (not on the list) means: authenticated.
EGRESS_WAIT = """\
import base64, os, socket, sys, time
from urllib.parse import unquote, urlsplit
url = urlsplit(os.environ["HTTPS_PROXY"])
cred = f"{unquote(url.username or '')}:{unquote(url.password or '')}"
probe = ("CONNECT engine.invalid:9 HTTP/1.1\\r\\nHost: engine.invalid:9\\r\\n"
         "Proxy-Authorization: Basic " + base64.b64encode(cred.encode()).decode()
         + "\\r\\n\\r\\n").encode()
deadline = time.monotonic() + float(sys.argv[1] if len(sys.argv) > 1 else 300)
why = "no answer"
while True:
    try:
        with socket.create_connection((url.hostname, url.port or 3128), timeout=5) as s:
            s.sendall(probe)
            status = s.recv(64).split(b" ")[1:2]
        if status == [b"403"]:
            print(f"engine: egress gateway {url.hostname} is ready")
            sys.exit(0)
        why = "answered " + (status[0].decode(errors="replace") if status else "nothing")
    except OSError as e:
        why = e.strerror or type(e).__name__
    if time.monotonic() > deadline:
        print(f"engine: egress gateway {url.hostname} not ready for this agent: {why}",
              file=sys.stderr)
        sys.exit(1)
    time.sleep(2)
"""


@dataclass(frozen=True)
class PodLaunch:
    """What the runtime adds to a DesiredAgent to build its objects (no secret values)."""

    namespace: str
    remote: str  # git URL the init container clones from and the wrapper pushes to
    env: tuple[tuple[str, str], ...]  # non-secret environment of the agent
    version: str  # engine version, for the engine.version label
    repo: str  # engine.repo label: a digest of the remote, so two repositories never mix
    client: str = ""  # text of the agent-side `engine` client ("" leaves it out)
    # The addresses of the remote's host as the engine's host resolved them
    # (`k8s_net.remote_addresses`), when git reaches a remote named by host name directly
    # (`resolve_target`): its NetworkPolicy allows exactly these. Not in the spec hash, so
    # a DNS change never restarts an agent; () where nothing needs them.
    remote_addresses: tuple[str, ...] = ()


def pod_launch(agent: DesiredAgent, namespace: str, remote: str, launch_env: dict[str, str],
               host_prefixes: tuple[str, ...], version: str, client: str,
               remote_addresses: tuple[str, ...] = ()) -> PodLaunch:
    """The PodLaunch of an agent: what apply sends it with, and what `engine render`
    prints."""
    return PodLaunch(namespace, remote, pod_env(agent, launch_env, host_prefixes, remote),
                     version, repo_label(remote), client, remote_addresses)


def object_name(grove: str, agent: str) -> str:
    """The name every object of one agent shares: unique per (grove, agent) and short
    enough for a Job's Pod hostname (52 characters). A `-` inside either name is doubled,
    so the one single `-` separates them (`a` + `b-c` is `a-b--c`, `a-b` + `c` is
    `a--b-c`; names without `-` read as before: `demo-coder`). A longer name is a prefix,
    then `---` (a run of dashes the short form never has: its runs are even, or the one
    separator) and a digest of both names. The repository is the remote (two clones of
    it manage the same agents); two remotes whose groves and agents are named alike in
    one namespace meet at one name, and `k8s_api.outdated` refuses to take over the
    other's object."""
    base = f"{grove.replace('-', '--')}-{agent.replace('-', '--')}"
    if len(base) <= 52:
        return base
    digest = hashlib.sha256(f"{grove}\0{agent}".encode()).hexdigest()[:16]
    return base[:33].rstrip("-") + "---" + digest


def legacy_object_name(grove: str, agent: str) -> str:
    """The name engines before `object_name`'s escaping gave an agent's objects (ambiguous:
    `a` + `b-c` and `a-b` + `c` shared it); only to find and remove what they made."""
    base = f"{grove}-{agent}"
    if len(base) <= 52:
        return base
    return base[:43].rstrip("-") + "-" + hashlib.sha256(base.encode()).hexdigest()[:8]


def label_value(text: str) -> str:
    value = _LABEL_VALUE.sub("-", text)[:63].strip("-_.")
    return value or "unknown"


def safe_label(text: str) -> str:
    """`text` as a valid label value (at most 63 characters, alphanumeric at both ends):
    as it is when it is one, else its first characters made valid, `-` and a digest of
    the whole text (so two long values never meet)."""
    if _VALID_LABEL.fullmatch(text):
        return text
    head = _LABEL_VALUE.sub("-", text)[:50].strip("-_.")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{head}-{digest}" if head else digest


def repo_label(remote: str) -> str:
    return hashlib.sha256(remote.encode()).hexdigest()[:12]


def owner_labels(agent: DesiredAgent, pl: PodLaunch) -> dict[str, str]:
    """The engine's own labels (what observe selects on) and the recommended ones."""
    return {LABEL_GROVE: agent.grove, LABEL_AGENT: agent.name, LABEL_HASH: agent.spec_hash,
            LABEL_VERSION: label_value(pl.version), LABEL_REPO: pl.repo,
            L_NAME: APP_NAME, L_INSTANCE: object_name(agent.grove, agent.name),
            L_PART_OF: safe_label(agent.grove), L_MANAGED_BY: FIELD_MANAGER}


def selector(grove: str, repo: str, agent: str | None = None) -> str:
    """The label selector of a grove's objects (or of one agent's)."""
    parts = [f"{LABEL_GROVE}={grove}", *([f"{LABEL_REPO}={repo}"] if repo else []),
             *([f"{LABEL_AGENT}={agent}"] if agent else [])]
    return ",".join(parts)


def check(agent: DesiredAgent, remote: str) -> None:
    """Refuse what this runtime cannot honour, before anything reaches the cluster."""
    who = f"agent {agent.grove}/{agent.name}"
    if agent.mounts:
        raise EngineError(f"{who}: profile {agent.profile} has mounts, which the kubernetes "
                          "runtime refuses (host paths do not exist on cluster nodes); the "
                          "workspace is cloned from spec.remote")
    if not remote:
        raise EngineError(f"{who}: the kubernetes runtime needs spec.remote in grove "
                          f"{agent.grove} (a git URL the cluster can reach)")
    parts = urlsplit(remote)
    if parts.password or (parts.scheme in ("http", "https") and parts.username):
        raise EngineError(f"grove {agent.grove}: spec.remote must not embed a password or "
                          f"token; give the profile a {GIT_TOKEN} credential instead")
    try:
        remote_endpoint(remote)
    except ValueError as e:  # urlsplit's port check: a NetworkPolicy needs the port
        raise EngineError(f"grove {agent.grove}: spec.remote {remote!r:.200}: {e}") from None
    refuse_local_remote(agent, remote)
    if not agent.image:
        raise EngineError(f"{who}: runtime kubernetes needs an image")
    if run_as(agent)[0] == 0:
        raise EngineError(f"{who}: user 0 is root; the kubernetes runtime runs agents as "
                          "non-root (set user: to a uid other than 0)")
    loopback = [e for e in agent.egress if egress.is_loopback(egress.parse_endpoint(e)[0])]
    if agent.network == "egress" and loopback:
        raise EngineError(f"{who}: egress endpoint {loopback[0]} is a loopback address: on "
                          "docker it is the engine's host; a Pod has no such host (name a "
                          "Service or host the gateway can reach)")
    if agent.network == "egress" and (via := remote_via_gateway(remote)):
        try:
            egress.parse_endpoint(via)
        except ValueError:
            raise EngineError(f"{who}: the git remote's host {via} is not a host:port the "
                              "egress gateway accepts (network: egress sends git through "
                              "it)") from None


def run_as(agent: DesiredAgent) -> tuple[int, int]:
    uid, _, gid = agent.user.partition(":")
    return int(uid), int(gid or uid)


def remote_endpoint(remote: str) -> tuple[str, int] | None:
    """(host, port) the Pod connects to for git, or None for a remote without a network."""
    scp = re.fullmatch(r"(?:[^@/]+@)?([^:/]+):(?!//).*", remote)
    if scp and "://" not in remote:
        return scp.group(1), 22
    parts = urlsplit(remote)
    ports = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
    if parts.scheme not in ports or not parts.hostname:
        return None
    return parts.hostname, parts.port or ports[parts.scheme]


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a remote's host names literally (`10.0.0.7`, `[fd00::7]`), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


# -- addresses a git remote must never open ----------------------------------------------
# spec.remote comes from the grove manifest, which a pull request can change: the rule that
# lets git reach it (NetworkPolicy ipBlock, egress gateway list) must never open the node
# itself (loopback: on a node, the Docker or kubelet API), the cloud's metadata service
# (link-local 169.254.169.254), or what no remote can be (unspecified, multicast, a zone).
# Private ranges stay allowed: self-hosted git servers live there.
REFUSED = "loopback, link-local, unspecified or multicast"
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # "this host" to the kernel, not a remote
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in its low bits
_METADATA = (ipaddress.IPv6Address("fd00:ec2::254"),  # AWS (IPv6), inside fc00::/7
             ipaddress.IPv4Address("100.100.100.200"))  # Alibaba Cloud, inside 100.64/10
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_address(host: str) -> Address | None:
    """The address a remote's host denotes without a resolver: an IP literal, or one of
    the old IPv4 spellings the C resolver also takes (`2852039166`, `0xa9fea9fe`,
    `0251.0376.0251.0376`, `127.1`); None for a host name."""
    ip = ip_literal(host)
    if ip is not None:
        return ip
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to an IPv4 host: mapped (`::ffff:a.b.c.d`),
    translated (`::ffff:0:a.b.c.d`), compatible (`::a.b.c.d`, deprecated) or NAT64."""
    n = int(ip)
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if n >> 32 in (0xFFFF, 0xFFFF0000) or (n >> 32 == 0 and n > 1) or ip in _NAT64:
        return low
    return None


def forbidden_address(ip: Address) -> str:
    """Why no rule may open `ip` to an agent (`loopback`, `link-local (169.254.169.254)`,
    ...); "" when one may."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped (a zone id names a host's own interface)"
        inner = _embedded_ipv4(ip)
        if inner is not None:
            why = forbidden_address(inner)
            return f"{why} ({inner})" if why else ""
    if ip in _METADATA:
        return "a cloud metadata service"
    for why, hit in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                     ("unspecified", ip.is_unspecified or ip in _THIS_NETWORK),
                     ("multicast", ip.is_multicast)):
        if hit:
            return why
    return ""


def _refusal(agent: DesiredAgent, what: str) -> EngineError:
    return EngineError(f"agent {agent.grove}/{agent.name}: profile {agent.profile} (network: "
                       f"{agent.network}): {what}; an agent's NetworkPolicy and egress "
                       f"gateway never open a {REFUSED} address to it (private ranges are "
                       "fine)")


def refuse_local_remote(agent: DesiredAgent, remote: str) -> None:
    """Refuse a remote whose host is, by itself, what `forbidden_address` refuses: an
    address (any spelling), a zone, or a loopback name (`localhost`, `*.localhost`). Only
    where a rule would open it (`network: none` or `egress`); a name's resolved addresses
    are `refuse_resolved`'s."""
    end = remote_endpoint(remote) if agent.network in ("none", "egress") else None
    if end is None:
        return
    host = end[0].strip("[]").rstrip(".").lower()
    shown = f"the git remote {remote:.200} names {end[0]}"
    if "%" in host:
        raise _refusal(agent, f"{shown}, a scoped address (a zone id names a host's own "
                              "interface; no NetworkPolicy can name one)")
    if host == "localhost" or host.endswith(".localhost"):
        raise _refusal(agent, f"{shown}, a loopback name")
    ip = host_address(host)
    why = forbidden_address(ip) if ip is not None else ""
    if why:
        odd = isinstance(ip, ipaddress.IPv4Address) and str(ip) != host  # 2852039166
        raise _refusal(agent, f"{shown}, {why}" + (f" ({ip})" if odd else ""))


def refuse_resolved(agent: DesiredAgent, remote: str, host: str,
                    addresses: tuple[str, ...]) -> None:
    """Refuse a remote's host name when any address it resolves to is forbidden, also
    among allowed ones: git may connect to any of them (and a name that answers both is
    how a rebinding attack looks)."""
    for text in addresses:
        why = forbidden_address(ipaddress.ip_address(text))
        if why:
            shown = f"the git remote's host {host} ({remote:.200}) resolves on this machine to"
            if len(addresses) == 1:
                raise _refusal(agent, f"{shown} {text}, {why}")
            raise _refusal(agent, f"{shown} {', '.join(addresses)}, of which {text} is {why} "
                                  "(one such address refuses the name, also among others)")


def remote_via_gateway(remote: str) -> str:
    """With `network: egress`, the endpoint (`host:port`) through which git reaches the
    remote: an https remote goes through the egress gateway (git honours HTTPS_PROXY, the
    gateway tunnels CONNECT), so the remote is on the agent's gateway list and its Pod
    reaches only the gateway. "" for any other remote: ssh and git:// speak no HTTP proxy,
    and the gateway carries no plain http, so git reaches those directly."""
    end = remote_endpoint(remote)
    if end is None or urlsplit(remote).scheme != "https":
        return ""
    ip = ip_literal(end[0])
    return egress.format_endpoint(str(ip) if ip else end[0].lower(), end[1])


def direct_remote(agent: DesiredAgent, remote: str) -> tuple[str, int] | None:
    """(host, port) git connects to itself, through the agent's NetworkPolicy; None when
    it needs no network, goes through the gateway, or no NetworkPolicy applies."""
    if agent.network not in ("none", "egress"):
        return None
    if agent.network == "egress" and remote_via_gateway(remote):
        return None
    return remote_endpoint(remote)


def resolve_target(agent: DesiredAgent, remote: str) -> tuple[str, int] | None:
    """(host, port) whose addresses `PodLaunch.remote_addresses` must hold: a remote
    that git reaches directly, named by host name (an IP address needs no resolution)."""
    end = direct_remote(agent, remote)
    return end if end and ip_literal(end[0]) is None else None


def script(name: str) -> str:
    return resources.files("engine.runtimes").joinpath(f"k8s_{name}.sh").read_text()


def pod_env(agent: DesiredAgent, launch_env: dict[str, str], host_prefixes: tuple[str, ...],
            remote: str) -> tuple[tuple[str, str], ...]:
    """The agent's non-secret environment inside the Pod: the launch environment without
    host paths, then the engine's own variables pointing at Pod paths."""
    env = dict(agent.env)
    env.update({k: v for k, v in launch_env.items()
                if not any(v.startswith(p) for p in host_prefixes)})
    env.update({"ENGINE_GROVE": agent.grove, "ENGINE_AGENT": agent.name,
                "ENGINE_INBOX": INBOX, "ENGINE_RUNTIME": "kubernetes",
                "ENGINE_BRANCH": agent.branch, "ENGINE_REMOTE": remote,
                "ENGINE_WORKSPACE": WORKSPACE, "HOME": HOME, "ENGINE_OWN_HOME": "1"})
    if agent.instructions_file:
        env["ENGINE_INSTRUCTIONS_FILE"] = agent.instructions_file
    names = {c.name for c in agent.credentials}
    if GIT_TOKEN in names:
        env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "credential.helper",
                    "GIT_CONFIG_VALUE_0": _TOKEN_HELPER})
    if GIT_SSH_KEY in names:
        env["GIT_SSH_COMMAND"] = (f"ssh -i {SECRETS_DIR}/{GIT_SSH_KEY} -o IdentitiesOnly=yes "
                                  "-o StrictHostKeyChecking=accept-new")
    env["GIT_TERMINAL_PROMPT"] = "0"
    return tuple(sorted(env.items()))


# -- objects ----------------------------------------------------------------------------

def _meta(agent: DesiredAgent, pl: PodLaunch) -> dict[str, Any]:
    return {"name": object_name(agent.grove, agent.name), "namespace": pl.namespace,
            "labels": owner_labels(agent, pl)}


def owner_reference(owner: dict[str, Any], uid: str = OWNER_UID) -> dict[str, Any]:
    """The reference that makes an object the dependent of `owner` (the agent's Job or
    Pod): the garbage collector deletes it with its owner."""
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"],
            "name": owner["metadata"]["name"], "uid": uid, "controller": True,
            "blockOwnerDeletion": True}


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its owner reference's uid set to the uid `owner` (as the server returned
    it) has."""
    meta = {**obj["metadata"], "ownerReferences": [
        owner_reference(owner, str(owner["metadata"]["uid"]))]}
    return {**obj, "metadata": meta}


def config_map(agent: DesiredAgent, pl: PodLaunch) -> dict[str, Any]:
    data = {"wrapper": script("wrapper"), "clone": script("clone")}
    if pl.client:
        data["engine"] = pl.client
    if agent.role:
        data["instructions"] = agent.role
    if agent.network == "egress":
        data["egress-wait"] = EGRESS_WAIT
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(agent, pl),
            "data": data}


def secret(agent: DesiredAgent, pl: PodLaunch, values: dict[str, str],
           egress_token: str = "") -> dict[str, Any]:
    """The agent's credentials, and with `network: egress` its proxy URL (which holds its
    gateway token). Holds values: never print or log what this returns."""
    values = dict(values)
    if agent.network == "egress":
        values[EGRESS_PROXY_KEY] = proxy_url(agent, pl.namespace, egress_token)
    data = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(agent, pl),
            "type": "Opaque", "data": data}


def claim(agent: DesiredAgent, pl: PodLaunch) -> dict[str, Any] | None:
    size = agent.extra("persistence")
    if not size:
        return None
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(agent, pl),
            "spec": {"accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": size}}}}


def _dns_ports() -> list[dict[str, Any]]:
    return [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def _kube_dns() -> dict[str, Any]:
    """Egress to the cluster DNS only: kube-dns (CoreDNS keeps that label) in kube-system."""
    return {"to": [{"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": _dns_ports()}


def _remote_rules(agent: DesiredAgent, pl: PodLaunch) -> tuple[list[dict[str, Any]], bool]:
    """The egress rule git needs for a remote it reaches directly: the remote's TCP port
    on exactly its addresses (the one a remote names literally, else those the engine's
    host resolved: `pl.remote_addresses`), and whether the Pod needs DNS to find them.
    Unresolved addresses give no rule (git cannot reach the remote; never a wider one)."""
    end = direct_remote(agent, pl.remote)
    if not end:
        return [], False
    host, port = end
    ip = ip_literal(host)
    addrs = [ip] if ip else [ipaddress.ip_address(a) for a in pl.remote_addresses]
    if not addrs:
        return [], True
    refuse_local_remote(agent, pl.remote)  # as check and k8s_net do: never in a rule
    refuse_resolved(agent, pl.remote, host, tuple(str(a) for a in addrs))
    blocks = [{"ipBlock": {"cidr": f"{a}/{a.max_prefixlen}"}}
              for a in sorted(set(addrs), key=lambda a: (a.version, int(a)))]
    return [{"to": blocks, "ports": [{"protocol": "TCP", "port": port}]}], ip is None


def network_policy(agent: DesiredAgent, pl: PodLaunch) -> dict[str, Any] | None:
    """`network: none`: no ingress; egress only to the git remote's port on exactly its
    addresses, and DNS to the cluster DNS (kube-dns in kube-system) when the remote is
    named by host name; nothing at all for a remote without a network (a path).
    `network: egress`: only the gateway's Pods (TCP 3128) and the cluster DNS; git goes
    through the gateway for an https remote, else directly as for `none`."""
    if agent.network not in ("none", "egress"):
        return None
    rules, dns = _remote_rules(agent, pl)
    if agent.network == "egress":
        rules = [{"to": [{"podSelector": {"matchLabels": {EGRESS_LABEL: "gateway"}}}],
                  "ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]},
                 _kube_dns(), *rules]
    elif dns:
        rules.append(_kube_dns())
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": {LABEL_GROVE: agent.grove, LABEL_AGENT: agent.name}},
        "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": rules}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(agent, pl), "spec": spec}


def _quantity_cpu(cpus: float) -> str:
    milli = max(1, round(cpus * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _quantity_bytes(n: int) -> str:
    for suffix, unit in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def disk(agent: DesiredAgent) -> str | None:
    """`resources.disk` as a Kubernetes quantity, None when not set."""
    value = (agent.settings_map().get("resources") or {}).get("disk")
    size = parse_memory(value) if value is not None else None
    return _quantity_bytes(size) if size else None


def _resources(agent: DesiredAgent) -> dict[str, Any]:
    """Requests equal limits (Guaranteed QoS): what a node admits is what agents may use.
    `pids` has no per-Pod field; the kubelet's --pod-max-pids enforces it (docs).
    `disk` is ephemeral-storage: the writable layer, logs and the emptyDirs together."""
    limits = {}
    if agent.resources.cpus:
        limits["cpu"] = _quantity_cpu(agent.resources.cpus)
    if agent.resources.memory:
        limits["memory"] = _quantity_bytes(agent.resources.memory)
    if size := disk(agent):
        limits["ephemeral-storage"] = size
    return {"requests": dict(limits), "limits": limits} if limits else {}


def _container_security(agent: DesiredAgent) -> dict[str, Any]:
    if agent.privileged:  # refused by validation unless security.allowPrivileged is set
        return {"privileged": True, "readOnlyRootFilesystem": agent.read_only_root}
    return {"allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": agent.read_only_root,
            "runAsNonRoot": True}


def _volumes(agent: DesiredAgent, name: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Volumes, and where each is mounted in the agent container."""
    size = disk(agent)
    workspace: dict[str, Any] = ({"persistentVolumeClaim": {"claimName": name}}
                                 if agent.extra("persistence") else
                                 {"emptyDir": {"sizeLimit": size} if size else {}})
    vols = [{"name": "workspace", **workspace},
            {"name": "engine", "emptyDir": {}},
            {"name": "engine-bin", "configMap": {"name": name, "defaultMode": 0o555}},
            {"name": "home", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    mounts = {"workspace": WORKSPACE, "engine": ENGINE_DIR, "engine-bin": BIN_DIR,
              "home": HOME, "tmp": "/tmp"}
    if agent.credentials:
        vols.append({"name": "secrets", "secret": {"secretName": name, "defaultMode": 0o400}})
        mounts["secrets"] = SECRETS_DIR
    return vols, mounts


def pod_spec(agent: DesiredAgent, pl: PodLaunch) -> dict[str, Any]:
    name = object_name(agent.grove, agent.name)
    uid, gid = run_as(agent)
    volumes, mounts = _volumes(agent, name)
    ro = {"engine-bin", "secrets"} | ({"workspace"} if agent.access == "read-only" else set())
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in pl.env]
    if agent.network == "egress":
        env = [e for e in env if e["name"] not in (*PROXY_VARS, "NO_PROXY", "no_proxy")]
        env += egress_env(object_name(agent.grove, agent.name), pl.remote)
    common = {"image": agent.image, "env": env, "workingDir": WORKSPACE,
              "securityContext": _container_security(agent), "resources": _resources(agent)}
    if agent.extra("imagePullPolicy"):
        common["imagePullPolicy"] = agent.extra("imagePullPolicy")
    init = {"name": "workspace", **common, "command": ["/bin/sh", f"{BIN_DIR}/clone"],
            "volumeMounts": [{"name": v, "mountPath": p, "readOnly": v in ("engine-bin",
                                                                           "secrets")}
                             for v, p in mounts.items()]}
    inits = [init]
    if agent.network == "egress":  # before the clone: git may go through the gateway
        inits.insert(0, {"name": "egress", **common,
                         "command": ["python3", "-I", f"{BIN_DIR}/egress-wait",
                                     str(EGRESS_WAIT_SECONDS)],
                         "volumeMounts": [{"name": v, "mountPath": p, "readOnly": True}
                                          for v, p in mounts.items()]})
    main = {"name": CONTAINER, **common, "command": ["/bin/bash", f"{BIN_DIR}/wrapper"],
            "args": list(agent.command),
            "volumeMounts": [{"name": v, "mountPath": p, "readOnly": v in ro}
                             for v, p in mounts.items()]}
    spec: dict[str, Any] = {
        "restartPolicy": {"never": "Never", "on-failure": "OnFailure"}.get(agent.restart,
                                                                           "Always"),
        "automountServiceAccountToken": False, "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid,
                            "fsGroup": gid, "fsGroupChangePolicy": "OnRootMismatch",
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": inits, "containers": [main], "volumes": volumes}
    if agent.max_duration:
        spec["activeDeadlineSeconds"] = agent.max_duration
    for key in ("runtimeClassName", "serviceAccountName", "nodeSelector", "tolerations"):
        if agent.extra(key) is not None:
            spec[key] = agent.extra(key)
    if agent.extra("imagePullSecrets"):
        spec["imagePullSecrets"] = [{"name": n} for n in agent.extra("imagePullSecrets")]
    return spec


def workload(agent: DesiredAgent, pl: PodLaunch) -> dict[str, Any]:
    meta, spec = _meta(agent, pl), pod_spec(agent, pl)
    if agent.network == "egress":  # the gateway's NetworkPolicy admits these Pods
        meta["labels"][EGRESS_LABEL] = "client"
    if agent.restart != "never":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    # the Job's spec-hash label is what observe reads; the template (immutable) has none
    template = {"metadata": {"labels": {k: v for k, v in meta["labels"].items()
                                        if k != LABEL_HASH}}, "spec": spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": 0, "template": template}}


def build(agent: DesiredAgent, pl: PodLaunch, values: dict[str, str],
          egress_token: str = "") -> list[dict[str, Any]]:
    """Every object of one agent, in apply order: its dependents, then the workload last,
    so its NetworkPolicy (and Secret, ConfigMap, claim) exist before its Pod can start.
    The ConfigMap and Secret are owned by the workload (uid `OWNER_UID`: apply sets the
    real one once the workload exists, `owned_by`). Never owned: the workspace claim (it
    holds the agent's work, which no deletion outside the engine may take with it) and
    the NetworkPolicy (the garbage collector would delete it while the agent's Pod is
    still terminating, its grace period open to any address; `engine delete` removes it
    once the Pod is gone, and one left by a stop selects no Pod). With `network: egress`
    the gateway's objects come before all of them (`gateway_objects`). The Secret holds
    `values` and the egress token: never log."""
    check(agent, pl.remote)
    if agent.network == "egress" and not egress_token:
        raise ValueError("an agent with network: egress needs its gateway token")
    owner = workload(agent, pl)
    objs = [config_map(agent, pl)]
    if agent.credentials or agent.network == "egress":
        objs.append(secret(agent, pl, values, egress_token))
    for o in objs:
        o["metadata"]["ownerReferences"] = [owner_reference(owner)]
    if (c := claim(agent, pl)) is not None:
        objs.append(c)
    if (n := network_policy(agent, pl)) is not None:
        objs.append(n)
    return [*objs, owner]


def unowned(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without owner references (applied so before its owner exists)."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}
    return {**obj, "metadata": meta}


SECRET_PLACEHOLDER = "<secret value, not rendered>"


def redacted(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` for printing: a Secret's values (data and stringData) each replaced by
    SECRET_PLACEHOLDER (base64 in data), its keys kept; any other object as it is."""
    if obj.get("kind") != "Secret":
        return obj
    out = dict(obj)
    b64 = base64.b64encode(SECRET_PLACEHOLDER.encode()).decode()
    for field, value in (("data", b64), ("stringData", SECRET_PLACEHOLDER)):
        if field in obj:
            out[field] = {k: value for k in obj[field] or {}}
    return out


# -- network: egress: the agent's side --------------------------------------------------

def proxy_url(agent: DesiredAgent, namespace: str, token: str) -> str:
    """http://<grove>%2F<agent>:<token>@engine-egress.<ns>.svc:3128: the gateway reads the
    agent id and token from Proxy-Authorization. Holds the token: the Secret only."""
    ident = quote(f"{agent.grove}/{agent.name}", safe="")
    return f"http://{ident}:{quote(token, safe='')}@{GATEWAY}.{namespace}.svc:{GATEWAY_PORT}"


def proxy_token(url: str) -> str:
    """The token in a `proxy_url` ("" if none)."""
    try:
        return unquote(urlsplit(url).password or "")
    except ValueError:
        return ""


def egress_env(secret_name: str, remote: str) -> list[dict[str, Any]]:
    """The proxy variables (both spellings) from the agent's Secret, and NO_PROXY: the
    Pod's loopback, and the git remote's host when git reaches it directly (not https:
    `remote_via_gateway`)."""
    ref = {"secretKeyRef": {"name": secret_name, "key": EGRESS_PROXY_KEY}}
    direct = ["localhost", "127.0.0.1"]
    end = None if remote_via_gateway(remote) else remote_endpoint(remote)
    if end and end[0].strip("[]") not in direct:
        direct.append(end[0].strip("[]"))
    no_proxy = ",".join(direct)
    return [*({"name": n, "valueFrom": ref} for n in PROXY_VARS),
            {"name": "NO_PROXY", "value": no_proxy}, {"name": "no_proxy", "value": no_proxy}]


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def policy_key(grove: str, agent: str) -> str:
    """The agent's key in GATEWAY_POLICIES, and its file name in the gateway Pod."""
    return f"{grove}.{agent}.json"


def policy_manager(grove: str, agent: str) -> str:
    """The field manager that writes (only) this agent's key of GATEWAY_POLICIES, so
    agents created and deleted at the same time never overwrite each other's keys."""
    name = f"{FIELD_MANAGER}:{grove}/{agent}"
    if len(name) <= 128:
        return name
    return f"{FIELD_MANAGER}:" + hashlib.sha256(f"{grove}\0{agent}".encode()).hexdigest()


def allowed(agent: DesiredAgent, remote: str) -> list[str]:
    """The endpoints the gateway lets the agent reach: its `egress` list, then the git
    remote when git goes through the gateway (`remote_via_gateway`)."""
    via = remote_via_gateway(remote)
    return [*agent.egress, *([via] if via and via not in agent.egress else [])]


def policy(agent: DesiredAgent, token: str, remote: str = "") -> str:
    """The agent's gateway policy: its endpoints (`allowed`) and the SHA-256 of its token
    (never the token: a ConfigMap is not a secret)."""
    digest = TOKEN_AT_APPLY if token == TOKEN_AT_APPLY else token_sha256(token)
    return json.dumps({"grove": agent.grove, "agent": agent.name,
                       "allow": allowed(agent, remote), "tokenSha256": digest},
                      indent=1, sort_keys=True) + "\n"


GATEWAY_APP = "grove-engine-egress-gateway"


def gateway_labels() -> dict[str, str]:
    """What the gateway's selectors match (the Deployment's selector is immutable: never
    more than this)."""
    return {EGRESS_LABEL: "gateway"}


def gateway_object_labels() -> dict[str, str]:
    """The labels every gateway object and its Pods carry: `gateway_labels` and the
    recommended ones (the gateway serves every grove of its namespace: part of the
    engine, not of one grove)."""
    return {**gateway_labels(), L_NAME: GATEWAY_APP, L_INSTANCE: GATEWAY,
            L_PART_OF: FIELD_MANAGER, L_MANAGED_BY: FIELD_MANAGER}


def _gateway_meta(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": gateway_object_labels()}


def gateway_policies(namespace: str, agent: DesiredAgent | None = None, token: str = "",
                     remote: str = "") -> dict[str, Any]:
    """GATEWAY_POLICIES as `policy_manager(agent)` applies it: with only that agent's key,
    or (agent None) with none, which removes the key that manager wrote."""
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": _gateway_meta(GATEWAY_POLICIES, namespace)}
    if agent is not None:
        obj["data"] = {policy_key(agent.grove, agent.name): policy(agent, token, remote)}
    return obj


def policy_ports(policies: dict[str, Any] | None) -> list[int]:
    """The union of the endpoint ports of every policy in GATEWAY_POLICIES as read back."""
    ports: set[int] = set()
    for text in ((policies or {}).get("data") or {}).values():
        try:
            allow = json.loads(text).get("allow") or []
            ports |= {egress.parse_endpoint(e)[1] for e in allow}
        except (ValueError, TypeError, AttributeError):
            continue
    return sorted(ports)


def gateway_code() -> dict[str, str]:
    """The gateway's modules: path in the package tree -> text."""
    out = {}
    for p in GATEWAY_FILES:
        node = resources.files("engine")
        for part in p.split("/")[1:]:
            node = node.joinpath(part)
        out[p] = node.read_text()
    return out


def gateway_code_map(namespace: str, code: dict[str, str]) -> dict[str, Any]:
    """GATEWAY_CODE: one key per module (`engine.egress.gateway.py`); the Deployment's
    volume puts each back at its path."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _gateway_meta(GATEWAY_CODE, namespace),
            "data": {p.replace("/", "."): text for p, text in sorted(code.items())}}


@dataclass(frozen=True)
class GatewayImage:
    """Where the gateway's image comes from: the first egress agent's profile, then the
    Deployment as it is (another agent's image never rolls the gateway)."""

    image: str
    pull_policy: str = ""
    pull_secrets: tuple[str, ...] = ()

    @classmethod
    def of_agent(cls, agent: DesiredAgent) -> GatewayImage:
        return cls(agent.image or "", str(agent.extra("imagePullPolicy") or ""),
                   tuple(agent.extra("imagePullSecrets") or ()))

    @classmethod
    def of_deployment(cls, obj: dict[str, Any]) -> GatewayImage | None:
        spec = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {})
        main = next((c for c in spec.get("containers") or [] if c.get("name") == "gateway"),
                    None)
        if not main or not main.get("image"):
            return None
        return cls(str(main["image"]), str(main.get("imagePullPolicy") or ""),
                   tuple(str(s.get("name")) for s in spec.get("imagePullSecrets") or []))


def gateway_deployment(namespace: str, image: GatewayImage, code: dict[str, str]
                       ) -> dict[str, Any]:
    """One replica running `python3 -m engine.egress.gateway` in TCP mode from the code
    ConfigMap, hardened like an agent Pod, and a `log` container printing every connection
    record (log.jsonl) to its own log. A new code digest rolls it."""
    digest = hashlib.sha256(json.dumps(code, sort_keys=True).encode()).hexdigest()[:16]
    security = {"allowPrivilegeEscalation": False, "privileged": False,
                "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
                "runAsNonRoot": True}
    pull = {"imagePullPolicy": image.pull_policy} if image.pull_policy else {}
    gateway = {
        "name": "gateway", "image": image.image, **pull,
        "command": ["python3", "-s", "-m", "engine.egress.gateway", "--root", GATEWAY_ROOT,
                    "--listen", f"0.0.0.0:{GATEWAY_PORT}", "--policies", GATEWAY_POLICY_DIR],
        "workingDir": GATEWAY_CODE_DIR,
        "env": [{"name": "PYTHONPATH", "value": GATEWAY_CODE_DIR},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
                {"name": "ENGINE_EGRESS_IDLE_EXIT", "value": "31536000"},
                {"name": "ENGINE_EGRESS_EVENTS", "value": "0"}],  # log.jsonl rotates
        "ports": [{"name": "proxy", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": GATEWAY_PORT}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"cpu": "1", "memory": "512Mi"}},
        "securityContext": security,
        "volumeMounts": [{"name": "code", "mountPath": GATEWAY_CODE_DIR, "readOnly": True},
                         {"name": "policies", "mountPath": GATEWAY_POLICY_DIR,
                          "readOnly": True},
                         {"name": "state", "mountPath": GATEWAY_ROOT}]}
    log = {"name": "log", "image": image.image, **pull,
           "command": ["tail", "-n", "+1", "-F", GATEWAY_LOG],
           "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                         "limits": {"cpu": "100m", "memory": "64Mi"}},
           "securityContext": security,
           "volumeMounts": [{"name": "state", "mountPath": GATEWAY_ROOT, "readOnly": True}]}
    items = [{"key": p.replace("/", "."), "path": p} for p in sorted(code)]
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False, "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        "securityContext": {"runAsNonRoot": True, "runAsUser": GATEWAY_UID,
                            "runAsGroup": GATEWAY_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [gateway, log],
        "volumes": [{"name": "code", "configMap": {"name": GATEWAY_CODE, "items": items,
                                                   "defaultMode": 0o444}},
                    {"name": "policies", "configMap": {"name": GATEWAY_POLICIES,
                                                       "defaultMode": 0o444}},
                    {"name": "state", "emptyDir": {"sizeLimit": "1Gi"}}]}
    if image.pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in image.pull_secrets]
    template = {"metadata": {"labels": gateway_object_labels(),
                             "annotations": {"engine.egress-code": digest}},
                "spec": spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _gateway_meta(GATEWAY, namespace),
            "spec": {"replicas": 1, "selector": {"matchLabels": gateway_labels()},
                     "template": template}}


def gateway_service(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _gateway_meta(GATEWAY, namespace),
            "spec": {"type": "ClusterIP", "selector": gateway_labels(),
                     "ports": [{"name": "proxy", "port": GATEWAY_PORT,
                                "targetPort": GATEWAY_PORT, "protocol": "TCP"}]}}


def gateway_network_policy(namespace: str, ports: list[int]) -> dict[str, Any]:
    """The gateway Pods: ingress only from egress agents' Pods of this namespace on 3128;
    egress to DNS and to any address on the endpoints' ports (the gateway itself allows
    only each agent's hosts)."""
    out: list[dict[str, Any]] = [_kube_dns()]
    if ports:
        out.append({"ports": [{"protocol": "TCP", "port": p} for p in ports]})
    spec = {"podSelector": {"matchLabels": gateway_labels()},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {EGRESS_LABEL: "client"}}}],
                         "ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]}],
            "egress": out}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _gateway_meta(GATEWAY_NETPOL, namespace), "spec": spec}


def gateway_for(agents: list[tuple[DesiredAgent, PodLaunch, str]]) -> list[dict[str, Any]]:
    """The gateway's objects as they stand once each (agent, launch, token) of one
    namespace is applied: the first one's image, every agent's policy key and port."""
    first, pl, token = agents[0]
    ports = sorted({egress.parse_endpoint(e)[1] for a, p, _ in agents
                    for e in allowed(a, p.remote)})
    out = gateway_objects(first, pl, token, ports=ports)
    out[1]["data"] = dict(sorted(
        (k, v) for a, p, t in agents
        for k, v in gateway_policies(pl.namespace, a, t, p.remote)["data"].items()))
    return out


def gateway_objects(agent: DesiredAgent, pl: PodLaunch, token: str,
                    image: GatewayImage | None = None, ports: list[int] | None = None
                    ) -> list[dict[str, Any]]:
    """The gateway's objects for one egress agent, in apply order: code, policies (this
    agent's key only), Deployment, Service, NetworkPolicy (`ports`: every agent's; by
    default this agent's). Holds no token: only its digest."""
    code = gateway_code()
    mine = sorted({egress.parse_endpoint(e)[1] for e in allowed(agent, pl.remote)})
    return [gateway_code_map(pl.namespace, code),
            gateway_policies(pl.namespace, agent, token, pl.remote),
            gateway_deployment(pl.namespace, image or GatewayImage.of_agent(agent), code),
            gateway_service(pl.namespace),
            gateway_network_policy(pl.namespace, mine if ports is None else ports)]
