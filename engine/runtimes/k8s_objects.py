"""Kubernetes runtime, object building (pure): one resolved agent -> the API objects that run it.

Called by `engine.runtimes.kubernetes` (create) and by the tests (validation against the
official Kubernetes schemas). `build` returns plain dicts in apply order: ConfigMap (the
wrapper and clone scripts, the agent-side client), Secret (only this agent's credentials,
mounted as files), PersistentVolumeClaim (profile `persistence`), NetworkPolicy
(`network: none`), then the workload: a Job when `restart: never` (the cluster records
completion), else a Pod. No I/O and no `kubernetes` package here.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from engine.desired import DesiredAgent
from engine.errors import EngineError
from engine.runtimes import LABEL_AGENT, LABEL_GROVE, LABEL_HASH, LABEL_REPO, LABEL_VERSION

FIELD_MANAGER = "grove-engine"
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


@dataclass(frozen=True)
class PodLaunch:
    """What the runtime adds to a DesiredAgent to build its objects (no secret values)."""

    namespace: str
    remote: str  # git URL the init container clones from and the wrapper pushes to
    env: tuple[tuple[str, str], ...]  # non-secret environment of the agent
    version: str  # engine version, for the engine.version label
    repo: str  # engine.repo label: a digest of the remote, so two repositories never mix
    client: str = ""  # text of the agent-side `engine` client ("" leaves it out)


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


def repo_label(remote: str) -> str:
    return hashlib.sha256(remote.encode()).hexdigest()[:12]


def owner_labels(agent: DesiredAgent, pl: PodLaunch) -> dict[str, str]:
    return {LABEL_GROVE: agent.grove, LABEL_AGENT: agent.name, LABEL_HASH: agent.spec_hash,
            LABEL_VERSION: label_value(pl.version), LABEL_REPO: pl.repo}


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
    if not agent.image:
        raise EngineError(f"{who}: runtime kubernetes needs an image")
    if run_as(agent)[0] == 0:
        raise EngineError(f"{who}: user 0 is root; the kubernetes runtime runs agents as "
                          "non-root (set user: to a uid other than 0)")


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
                "ENGINE_WORKSPACE": WORKSPACE, "HOME": HOME})
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


def config_map(agent: DesiredAgent, pl: PodLaunch) -> dict[str, Any]:
    data = {"wrapper": script("wrapper"), "clone": script("clone")}
    if pl.client:
        data["engine"] = pl.client
    if agent.role:
        data["instructions"] = agent.role
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(agent, pl),
            "data": data}


def secret(agent: DesiredAgent, pl: PodLaunch, values: dict[str, str]) -> dict[str, Any]:
    """The agent's credentials. Holds values: never print or log what this returns."""
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


def network_policy(agent: DesiredAgent, pl: PodLaunch) -> dict[str, Any] | None:
    """`network: none`: no ingress, no egress except what git needs to reach the remote
    (DNS and the remote's port; the exact address when the remote names an IP)."""
    if agent.network != "none":
        return None
    egress: list[dict[str, Any]] = []
    end = remote_endpoint(pl.remote)
    if end:
        host, port = end
        rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port}]}
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
            rule["to"] = [{"ipBlock": {"cidr": f"{ip}/{ip.max_prefixlen}"}}]
        except ValueError:
            egress.append({"ports": [{"protocol": "UDP", "port": 53},
                                     {"protocol": "TCP", "port": 53}]})
        egress.insert(0, rule)
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": {LABEL_GROVE: agent.grove, LABEL_AGENT: agent.name}},
        "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": egress}
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


def _resources(agent: DesiredAgent) -> dict[str, Any]:
    """Requests equal limits (Guaranteed QoS): what a node admits is what agents may use.
    `pids` has no per-Pod field; the kubelet's --pod-max-pids enforces it (docs)."""
    limits = {}
    if agent.resources.cpus:
        limits["cpu"] = _quantity_cpu(agent.resources.cpus)
    if agent.resources.memory:
        limits["memory"] = _quantity_bytes(agent.resources.memory)
    return {"requests": dict(limits), "limits": limits} if limits else {}


def _container_security(agent: DesiredAgent) -> dict[str, Any]:
    if agent.privileged:  # refused by validation unless security.allowPrivileged is set
        return {"privileged": True, "readOnlyRootFilesystem": agent.read_only_root}
    return {"allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": agent.read_only_root,
            "runAsNonRoot": True}


def _volumes(agent: DesiredAgent, name: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Volumes, and where each is mounted in the agent container."""
    workspace: dict[str, Any] = ({"persistentVolumeClaim": {"claimName": name}}
                                 if agent.extra("persistence") else {"emptyDir": {}})
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
    env = [{"name": k, "value": v} for k, v in pl.env]
    common = {"image": agent.image, "env": env, "workingDir": WORKSPACE,
              "securityContext": _container_security(agent), "resources": _resources(agent)}
    if agent.extra("imagePullPolicy"):
        common["imagePullPolicy"] = agent.extra("imagePullPolicy")
    init = {"name": "workspace", **common, "command": ["/bin/sh", f"{BIN_DIR}/clone"],
            "volumeMounts": [{"name": v, "mountPath": p, "readOnly": v in ("engine-bin",
                                                                           "secrets")}
                             for v, p in mounts.items()]}
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
        "initContainers": [init], "containers": [main], "volumes": volumes}
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
    if agent.restart != "never":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    template = {"metadata": {"labels": meta["labels"]}, "spec": spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": 0, "template": template}}


def build(agent: DesiredAgent, pl: PodLaunch, values: dict[str, str]) -> list[dict[str, Any]]:
    """Every object of one agent, in apply order. The Secret holds `values`: never log."""
    check(agent, pl.remote)
    objs = [config_map(agent, pl)]
    if agent.credentials:
        objs.append(secret(agent, pl, values))
    objs += [o for o in (claim(agent, pl), network_policy(agent, pl)) if o]
    return [*objs, workload(agent, pl)]
