"""Kubernetes runtime: each agent a Job (restart: never) or Pod on a cluster, via the API.

Called through `engine.runtimes.get("kubernetes", repo_root, host)` (host = a kubeconfig
context, None for the current one) by observe, the executor and the interaction commands;
`pull_inbox`/`push_inbox` by the controller. The `kubernetes` package (an optional extra)
is imported only here, for kubeconfig loading and exec websockets. Objects come from
`k8s_objects`; every write is a server-side apply with field manager "grove-engine" and
force=false, so a re-apply changes nothing and a field another manager owns is reported,
never taken over. Observation is one label-selector list of Pods and one of Jobs per
namespace the grove uses; once `start_watching` (the controller) it is read from informers
(`k8s_watch`: a list, then a watch from its resourceVersion, a full list every 5 minutes),
so a pass that changes nothing makes no request.

Each agent's dependents (ConfigMap, Secret, workspace claim, NetworkPolicy) are applied
before its workload (Job or Pod), so its Pod never runs without its NetworkPolicy; the
ConfigMap, Secret and NetworkPolicy are then applied again naming the workload in
`ownerReferences` with the uid the server returned, so deleting the workload
(`kubectl delete job`) lets the garbage collector delete them. The workspace claim is
never owned: it holds the agent's work, which only the engine's own destroy (after
archiving) removes.

`network: egress` agents share their namespace's egress gateway (`k8s_objects.gateway_*`):
creating one applies the gateway's objects and writes its policy key; deleting the last
one removes them (one lock per runtime serializes this part of create and delete).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import certifi
import kubernetes.client
import kubernetes.config
import websocket
import yaml

from engine import __version__, fsutil, manifest, paths
from engine.desired import DesiredAgent
from engine.errors import EngineError, RuntimeUnavailable, TemporaryError
from engine.runtimes import (
    LABEL_AGENT,
    LABEL_GROVE,
    LABEL_REPO,
    Launch,
    Observed,
    k8s_git,
    k8s_net,
    k8s_watch,
)
from engine.runtimes import k8s_api as api
from engine.runtimes import k8s_inbox as inbox
from engine.runtimes import k8s_objects as objs
from engine.runtimes.k8s_api import Call, Cluster, NotFound
from engine.trust import reader

LIST_PAGE = 500  # objects per list call: 1,000 agents are 2 pages of Pods, 2 of Jobs
_DELETE_ORDER = ("Job", "Pod", "NetworkPolicy", "Secret", "ConfigMap")
# Objects an agent may stop needing while keeping its name; the PVC is kept (work on it).
_OPTIONAL = {"Job", "Pod", "NetworkPolicy", "Secret"}


@dataclass(frozen=True, order=True)
class Target:
    """Where an agent's objects live: kubeconfig ("" = $KUBECONFIG or ~/.kube/config),
    context ("" = the current one) and namespace."""

    kubeconfig: str
    context: str
    namespace: str


def make(repo_root: Path, host: str | None = None) -> KubernetesRuntime:
    return KubernetesRuntime(repo_root, host)


class KubernetesRuntime:
    name = "kubernetes"

    def __init__(self, repo_root: Path, context: str | None = None) -> None:
        self.repo_root = repo_root
        self.context = context or ""
        self._clusters: dict[tuple[str, str], Cluster] = {}
        self._where: dict[tuple[str, str], Target] = {}  # (grove, agent) -> target
        self._egress_lock = threading.Lock()  # the namespace gateways' policy keys
        # watching (start_watching): informers by (cluster, kind, namespace, selector), and
        # each grove's; None while observe lists (one-shot commands start no thread)
        self._informers: dict[tuple[Cluster, str, str, str], k8s_watch.Informer] = {}
        self._grove_informers: dict[str, set[tuple[Cluster, str, str, str]]] = {}
        self._watching: tuple[Callable[[], None], float] | None = None
        self._watch_lock = threading.Lock()

    # -- clusters and targets -----------------------------------------------------------

    def cluster(self, kubeconfig: str, context: str) -> Cluster:
        key = (kubeconfig, context or self.context)
        if key not in self._clusters:
            self._clusters[key] = _connect(kubeconfig, key[1])
        return self._clusters[key]

    def target(self, agent: DesiredAgent) -> Target:
        return self._resolve(agent.extra("kubeconfig"), agent.extra("context"),
                             agent.extra("namespace"))

    def _resolve(self, kubeconfig: str | None, context: str | None, namespace: str | None
                 ) -> Target:
        kc = str(kubeconfig or "")
        if kc and not Path(kc).expanduser().is_absolute():
            kc = str(self.repo_root / kc)
        ctx = str(context or self.context)
        return Target(kc, ctx, namespace or self.cluster(kc, ctx).namespace)

    def _state_file(self, grove: str) -> Path:
        return paths.state(self.repo_root) / "state" / "kubernetes" / f"{grove}.json"

    def _grove(self, grove: str) -> tuple[str, str, set[Target]]:
        """(remote, repo label, targets): targets named by the grove's kubernetes profiles
        plus every target the runtime created something in (so moved agents are found)."""
        remote, targets = "", set()
        state = self._state_file(grove)
        recorded = json.loads(state.read_text()) if state.is_file() else {}
        gdir = self.repo_root / manifest.GROVES_DIR / grove
        if gdir.is_dir():
            src = manifest.load_grove(gdir, self.repo_root)
            remote = str(src.spec.get("remote") or "")
            for entry in src.profiles.values():
                data = entry.data
                if data.get("runtime") == "kubernetes":
                    targets.add(self._resolve(data.get("kubeconfig"), data.get("context"),
                                              data.get("namespace")))
        targets |= {Target(*t) for t in recorded.get("targets", [])}
        repo = objs.repo_label(remote) if remote else str(recorded.get("repo", ""))
        return remote, repo, targets

    def _record(self, grove: str, target: Target, repo: str) -> None:
        path_ = self._state_file(grove)
        with fsutil.flock(path_.with_suffix(".lock")):
            old = json.loads(path_.read_text()) if path_.is_file() else {}
            targets = sorted({*map(tuple, old.get("targets", [])),
                              (target.kubeconfig, target.context, target.namespace)})
            data = {"repo": repo, "targets": targets}
            if data != old:
                fsutil.atomic_write(path_, json.dumps(data, indent=1).encode())

    # -- the Runtime protocol -----------------------------------------------------------

    def observe(self, grove: str) -> dict[str, Observed]:
        _, repo, targets = self._grove(grove)
        out: dict[str, Observed] = {}
        for t in sorted(targets):
            cl = self.cluster(t.kubeconfig, t.context)
            items = {kind: self._observed(grove, cl, kind, t.namespace,
                                          objs.selector(grove, repo))
                     for kind in ("Pod", "Job")}
            for name, obs in api.essence(grove, items["Pod"], items["Job"], t.context).items():
                self._where[(grove, name)] = t
                out[name] = obs
        self._forget_informers(grove, {(self.cluster(t.kubeconfig, t.context), kind,
                                        t.namespace, objs.selector(grove, repo))
                                       for t in targets for kind in ("Pod", "Job")})
        return dict(sorted(out.items()))

    # -- watching: observe from informers (k8s_watch) in long-lived processes ----------

    def start_watching(self, on_change: Callable[[], None] | None = None,
                       resync: float = k8s_watch.RESYNC) -> None:
        """From now on observe answers from watches (the controller calls this; one-shot
        commands never do): an informer per target, kind and grove, started on first use,
        listed again every `resync` seconds; `on_change` is called (from its thread)
        when what observe would see changes."""
        with self._watch_lock:
            self._watching = (on_change or (lambda: None), resync)

    def stop_watching(self) -> None:
        """Stop every informer; observe lists again."""
        with self._watch_lock:
            self._watching = None
            informers = list(self._informers.values())
            self._informers.clear()
            self._grove_informers.clear()
        for inf in informers:
            inf.stop()

    def _observed(self, grove: str, cl: Cluster, kind: str, ns: str, selector: str
                  ) -> list[dict[str, Any]]:
        """The objects observe reads: the informer's when watching and it is synced (and
        shows this process's own writes), else one LIST."""
        key = (cl, kind, ns, selector)
        with self._watch_lock:
            inf = self._informers.get(key)
            if inf is None and self._watching is not None:
                on_change, resync = self._watching
                inf = self._informers[key] = k8s_watch.Informer(
                    cl, kind, ns, selector, page=LIST_PAGE, resync=resync,
                    on_change=on_change).start()
            if inf is not None:
                self._grove_informers.setdefault(grove, set()).add(key)
        cached = inf.items() if inf is not None else None
        return cached if cached is not None else self._list(cl, kind, ns, selector)

    def _forget_informers(self, grove: str, used: set[tuple[Cluster, str, str, str]]
                          ) -> None:
        """Stop the grove's informers that its last observe did not use (a target it
        left, a selector that changed with its remote)."""
        with self._watch_lock:
            keys = self._grove_informers.get(grove, set())
            stale = keys - used
            dropped = [self._informers.pop(k) for k in stale if k in self._informers]
            keys -= stale
        for inf in dropped:
            inf.stop(wait=0)

    def _wrote(self, cl: Cluster, kind: str, ns: str, name: str,
               written: dict[str, Any] | None) -> None:
        """Tell the informers of (cluster, kind, namespace) what this process just wrote,
        so observe does not answer from a cache that does not show it yet."""
        with self._watch_lock:
            found = [inf for (c, k, n, _), inf in self._informers.items()
                     if (c, k, n) == (cl, kind, ns)]
        for inf in found:
            inf.expect(name, written)

    def create(self, launch: Launch) -> None:
        agent = launch.agent
        remote, repo, _ = self._grove(agent.grove)
        objs.check(agent, remote)
        addresses = k8s_net.remote_addresses(agent, remote)  # before anything is changed
        t = self.target(agent)
        cl = self.cluster(t.kubeconfig, t.context)
        k8s_git.push_branch(launch, remote)
        host_paths = tuple(str(p) for p in (self.repo_root.resolve(), self.repo_root))
        client = launch.client.read_text() if launch.client.is_file() else ""
        pl = objs.pod_launch(agent, t.namespace, remote, launch.env, host_paths, __version__,
                             client, addresses)
        name = objs.object_name(agent.grove, agent.name)
        self._record(agent.grove, t, repo)
        self._where[(agent.grove, agent.name)] = t
        self._delete_legacy(cl, t.namespace, agent.grove, agent.name)
        kept = self._clear_leftover(cl, objs.workload(agent, pl), repo)
        token = ""
        if agent.network == "egress":  # a live Pod keeps its token; a new one gets its own
            token = (self._egress_token(cl, t.namespace, name) if kept else ""
                     ) or secrets.token_urlsafe(32)
        built = objs.build(agent, pl, dict(launch.secrets), token)
        workload, deps = built[-1], built[:-1]
        mine = api.agent_labels(agent.grove, agent.name, repo)
        for kind in sorted(_OPTIONAL - {o["kind"] for o in built}):  # e.g. network: none
            self._delete_mine(cl, kind, t.namespace, name, mine)    # was dropped
        for obj in deps:  # never write into, adopt or take over what is not the agent's
            self._refuse_foreign(cl, obj, mine)
        with self._egress_lock:
            if agent.network == "egress":
                self._gateway_up(cl, agent, pl, token)
            else:
                self._gateway_forget(cl, t.namespace, agent.grove, agent.name)
        # every dependent exists before the Pod can start, its NetworkPolicy above all:
        # unowned until the workload exists (owned by a live one that is kept: a re-apply
        # then changes nothing), adopted once the server has given the workload its uid
        old = self._get(cl, workload["kind"], t.namespace, name) if kept else None

        def first(obj: dict[str, Any]) -> dict[str, Any]:
            owned = old is not None and obj["metadata"].get("ownerReferences")
            return objs.owned_by(obj, old) if owned and old else objs.unowned(obj)

        try:
            for obj in deps:
                self._apply(cl, first(obj))
            try:
                owner = self._apply(cl, workload)
            except api.Invalid:  # replaced: the old workload's deletion takes what it owned
                self._remove(cl, workload["kind"], t.namespace, workload["metadata"]["name"])
                old = None
                for obj in deps:
                    self._apply(cl, objs.unowned(obj))
                owner = self._apply(cl, workload)
        except EngineError:  # no workload to own them: the Secret must not linger, unless
            if old is None and not self._may_exist(cl, workload):  # the create went through
                self._drop_unowned(cl, t.namespace, deps, mine)   # unanswered
            raise
        if old is not None and old["metadata"].get("uid") == owner["metadata"].get("uid"):
            return
        for obj in deps:
            if obj["metadata"].get("ownerReferences"):
                self._apply(cl, objs.owned_by(obj, owner))

    def _drop_unowned(self, cl: Cluster, ns: str, deps: list[dict[str, Any]],
                      mine: dict[str, str]) -> None:
        """Delete the dependents a failed create left without an owner (never the claim:
        it holds the agent's work), best effort: the create's own error is the one said."""
        for obj in deps:
            if obj["metadata"].get("ownerReferences"):
                with contextlib.suppress(EngineError):
                    self._delete_mine(cl, obj["kind"], ns, obj["metadata"]["name"], mine)

    def _may_exist(self, cl: Cluster, obj: dict[str, Any]) -> bool:
        """Whether `obj` may be on the server (True when the server cannot say)."""
        meta = obj["metadata"]
        try:
            return self._get(cl, obj["kind"], meta["namespace"], meta["name"]) is not None
        except EngineError:
            return True

    def _refuse_foreign(self, cl: Cluster, obj: dict[str, Any], mine: dict[str, str]) -> None:
        meta = obj["metadata"]
        old = self._get(cl, obj["kind"], meta["namespace"], meta["name"])
        why = api.foreign(old, mine) if old is not None else ""
        if why:
            raise EngineError(f"kubernetes: {obj['kind'].lower()} {meta['namespace']}/"
                              f"{meta['name']} exists and is not this agent's ({why}); not "
                              "touching it (rename or delete it)")

    def _delete_mine(self, cl: Cluster, kind: str, ns: str, name: str,
                     mine: dict[str, str]) -> None:
        """Delete the agent's object of `kind`, if there is one and it is the agent's (by
        its labels and owner, checked by uid at deletion): never another's of that name."""
        old = self._get(cl, kind, ns, name)
        if old is None or api.foreign(old, mine):
            return
        with contextlib.suppress(NotFound):
            self._delete(cl, kind, ns, name, uid=str(old["metadata"].get("uid") or ""))

    def stop(self, grove: str, agent: str) -> None:
        """Delete the agent's workload (its Job or Pod), and with it (garbage collection)
        its Secret and ConfigMap. The workspace volume and the NetworkPolicy (never owned)
        stay for the next create: the policy keeps the terminating Pod isolated, and
        selects nothing once it is gone. Its home is the Pod's emptyDir: it does not
        outlive the Pod."""
        known = self._where.get((grove, agent))
        _, repo, all_targets = self._grove(grove)
        targets = [known] if known else sorted(all_targets)
        name, mine = objs.object_name(grove, agent), api.agent_labels(grove, agent, repo)
        for t in targets:
            cl = self.cluster(t.kubeconfig, t.context)
            for kind in ("Job", "Pod"):
                self._delete_mine(cl, kind, t.namespace, name, mine)

    def delete(self, grove: str, agent: str) -> None:
        known = self._where.get((grove, agent))
        _, repo, all_targets = self._grove(grove)
        targets = [known] if known else sorted(all_targets)
        name, mine = objs.object_name(grove, agent), api.agent_labels(grove, agent, repo)
        for t in targets:
            cl = self.cluster(t.kubeconfig, t.context)
            for kind in ("Job", "Pod"):
                self._delete_mine(cl, kind, t.namespace, name, mine)
            # the NetworkPolicy (and the gateway, whose Service its last push may go
            # through) stay until the Pod has ended: its grace period is no way out
            for kind in ("Job", "Pod"):
                left = self._get(cl, kind, t.namespace, name)
                if left is not None and not api.foreign(left, mine):
                    self._wait_gone(cl, kind, t.namespace, name)
            for kind in _DELETE_ORDER:
                self._delete_mine(cl, kind, t.namespace, name, mine)
            self._delete_legacy(cl, t.namespace, grove, agent)
            with self._egress_lock:
                self._gateway_forget(cl, t.namespace, grove, agent)
        self._where.pop((grove, agent), None)

    def _delete_legacy(self, cl: Cluster, ns: str, grove: str, agent: str) -> None:
        """Remove what an engine before `objs.object_name`'s escaping made for this agent
        under the old, ambiguous name: only objects whose owner labels say this
        repository's grove and agent (another grove may own that name)."""
        old = objs.legacy_object_name(grove, agent)
        if old == objs.object_name(grove, agent):
            return
        repo = self._grove(grove)[1]
        for kind in _DELETE_ORDER:
            labels = ((self._get(cl, kind, ns, old) or {}).get("metadata") or {}).get(
                "labels") or {}
            if (labels.get(LABEL_GROVE), labels.get(LABEL_AGENT)) == (grove, agent) \
                    and (not repo or labels.get(LABEL_REPO) == repo):
                with contextlib.suppress(NotFound):
                    self._delete(cl, kind, ns, old)

    def logs(self, grove: str, agent: str, follow: bool = False, tail: int | None = None,
             previous: bool = False) -> Iterator[str]:
        cl, ns, pod = self._pod(grove, agent)
        query = {"container": objs.CONTAINER,
                 **({"follow": "true"} if follow and not previous else {}),
                 **({"tailLines": str(max(tail, 0))} if tail is not None else {}),
                 **({"previous": "true"} if previous else {})}
        try:
            resp = cl.request("GET", api.path("Pod", ns, pod, "log"),
                              Call("get", "pods/log", ns, pod), query=query, stream=True)
        except EngineError as e:
            if not previous or isinstance(e, RuntimeUnavailable):
                raise
            raise EngineError(f"agent {grove}/{agent}: no previous run ({e.summary})"
                              ) from None
        try:
            yield from _lines(resp.stream(64 << 10))
        finally:
            resp.release_conn()

    def look(self, grove: str, agent: str) -> str:
        return self._exec(grove, agent, inbox.tmux("capture-pane", "-p", "-t", objs.SESSION))

    def send(self, grove: str, agent: str, text: str) -> None:
        self._exec(grove, agent, inbox.paste(text))

    def attach(self, grove: str, agent: str) -> int:
        cl, ns, pod = self._pod(grove, agent)
        flags = inbox.kubectl_flags(self._where[(grove, agent)].kubeconfig, cl.context)
        argv = ["kubectl", *flags, "-n", ns, "exec", "-it", f"pod/{pod}", "-c",
                objs.CONTAINER, "--", *inbox.tmux("attach", "-t", objs.SESSION)]
        if not shutil.which("kubectl"):
            raise EngineError(f"agent {grove}/{agent}: attach needs kubectl on PATH; "
                              f"or run: {' '.join(argv)}")
        return subprocess.call(argv)

    # -- agent-side inbox, carried over exec --------------------------------------------

    def pull_inbox(self, grove: str, agent: str, dest: Path) -> list[Path]:
        """Copy the agent's inbox (`/run/engine/inbox` in its Pod) into `dest`; returns the
        files written. The Pod side is `tar | base64` over pods/exec."""
        return inbox.pull(self._runner(grove, agent), dest)

    def push_inbox(self, grove: str, agent: str, files: dict[str, bytes]) -> None:
        """Write result files (name -> content) into the agent's inbox in its Pod."""
        inbox.push(self._runner(grove, agent), files)

    def sync_inbox(self, grove: str, agent: str, host_inbox: Path) -> list[Path]:
        """Pull the Pod's new requests into `host_inbox`, send back the host's answers
        (see k8s_inbox.sync); returns the request files pulled."""
        return inbox.sync(self._runner(grove, agent), host_inbox)

    def _runner(self, grove: str, agent: str) -> inbox.Run:
        return lambda argv: self._exec(grove, agent, argv)

    # -- helpers ------------------------------------------------------------------------

    def _apply(self, cl: Cluster, obj: dict[str, Any], manager: str = objs.FIELD_MANAGER
               ) -> dict[str, Any]:
        meta, kind = obj["metadata"], obj["kind"]
        result: dict[str, Any] = cl.request(
            "PATCH", api.path(kind, meta["namespace"], meta["name"]),
            Call("patch", api.plural(kind), meta["namespace"], meta["name"]),
            query={"fieldManager": manager, "force": "false"}, body=obj,
            content_type=api.APPLY)
        self._wrote(cl, kind, meta["namespace"], meta["name"], result)
        return result

    # -- network: egress: the namespace's gateway ---------------------------------------

    def _egress_token(self, cl: Cluster, ns: str, name: str) -> str:
        """The gateway token in the agent's Secret ("" if none): a live Pod uses it."""
        data = ((self._get(cl, "Secret", ns, name) or {}).get("data") or {})
        try:
            url = base64.b64decode(str(data.get(objs.EGRESS_PROXY_KEY) or "")).decode()
        except (ValueError, UnicodeDecodeError):
            return ""
        return objs.proxy_token(url)

    def _gateway_up(self, cl: Cluster, agent: DesiredAgent, pl: objs.PodLaunch,
                    token: str) -> None:
        """Apply the gateway's objects and the agent's policy key (by its own field
        manager); the gateway's NetworkPolicy opens the ports of every policy. An existing
        gateway keeps its image (another agent's profile does not roll it)."""
        ns = pl.namespace
        image = objs.GatewayImage.of_agent(agent)
        old = self._get(cl, "Deployment", ns, objs.GATEWAY)
        if old is not None:
            labels = old["metadata"].get("labels") or {}
            if labels.get(objs.EGRESS_LABEL) != "gateway":
                raise EngineError(f"kubernetes: deployment {ns}/{objs.GATEWAY} exists and is "
                                  "not the engine's egress gateway (no label "
                                  f"{objs.EGRESS_LABEL}=gateway); not touching it")
            image = objs.GatewayImage.of_deployment(old) or image
        code, policies, deployment, service, _ = objs.gateway_objects(agent, pl, token, image)
        self._apply(cl, code)
        current = self._apply(cl, policies, objs.policy_manager(agent.grove, agent.name))
        for obj in (deployment, service,
                    objs.gateway_network_policy(ns, objs.policy_ports(current))):
            self._apply(cl, obj)

    def _gateway_keys(self, cl: Cluster, ns: str, grove: str, agent: str) -> bool:
        """Whether the namespace's egress gateway serves this agent."""
        current = self._get(cl, "ConfigMap", ns, objs.GATEWAY_POLICIES)
        return current is not None and objs.policy_key(grove, agent) in (current.get("data")
                                                                          or {})

    def _gateway_forget(self, cl: Cluster, ns: str, grove: str, agent: str) -> None:
        """Remove the agent's policy key; then the gateway's objects if no key is left,
        else narrow its NetworkPolicy to the remaining agents' ports."""
        current = self._get(cl, "ConfigMap", ns, objs.GATEWAY_POLICIES)
        if current is None or objs.policy_key(grove, agent) not in (current.get("data")
                                                                     or {}):
            return
        current = self._apply(cl, objs.gateway_policies(ns), objs.policy_manager(grove, agent))
        if current.get("data"):
            self._apply(cl, objs.gateway_network_policy(ns, objs.policy_ports(current)))
            return
        for kind, name in (("Deployment", objs.GATEWAY), ("Service", objs.GATEWAY),
                           ("NetworkPolicy", objs.GATEWAY_NETPOL),
                           ("ConfigMap", objs.GATEWAY_CODE),
                           ("ConfigMap", objs.GATEWAY_POLICIES)):
            with contextlib.suppress(NotFound):
                self._delete(cl, kind, ns, name)

    def _list(self, cl: Cluster, kind: str, ns: str, selector: str) -> list[dict[str, Any]]:
        """Every object of `kind` matching `selector`, in pages of LIST_PAGE."""
        return k8s_watch.list_all(cl, kind, ns, selector, LIST_PAGE)[0]

    def _delete(self, cl: Cluster, kind: str, ns: str, name: str, uid: str = "") -> None:
        """Delete one object (only the object of `uid` when given); a Job in the
        foreground, so it is there until its Pods are gone (a replacement waits for
        that)."""
        query = {"propagationPolicy": "Foreground" if kind == "Job" else "Background"}
        body = {"kind": "DeleteOptions", "apiVersion": "v1",
                "preconditions": {"uid": uid}} if uid else None
        try:
            cl.request("DELETE", api.path(kind, ns, name),
                       Call("delete", api.plural(kind), ns, name), query=query, body=body)
        except NotFound:
            self._wrote(cl, kind, ns, name, None)  # gone: the cache must show it so
            raise
        self._wrote(cl, kind, ns, name, None)

    def _get(self, cl: Cluster, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = cl.request(
                "GET", api.path(kind, ns, name),
                Call("get", api.plural(kind), ns, name))
        except NotFound:
            return None
        return obj

    def _clear_leftover(self, cl: Cluster, workload: dict[str, Any], repo: str) -> bool:
        """Remove an earlier workload of this agent unless it is live with the same spec:
        create() starts the agent, so a finished or outdated one is replaced. True when
        one is kept."""
        meta, kind = workload["metadata"], workload["kind"]
        old = self._get(cl, kind, meta["namespace"], meta["name"])
        if old is None:
            return False
        if api.outdated(old, workload, repo):
            self._remove(cl, kind, meta["namespace"], meta["name"],
                         uid=str(old["metadata"].get("uid") or ""))
            return False
        return True

    def _remove(self, cl: Cluster, kind: str, ns: str, name: str, wait: float = 90,
                uid: str = "") -> None:
        """Delete and wait until it is gone (a new object takes the same name)."""
        try:
            self._delete(cl, kind, ns, name, uid)
        except NotFound:
            return
        self._wait_gone(cl, kind, ns, name, wait)

    def _wait_gone(self, cl: Cluster, kind: str, ns: str, name: str, wait: float = 90) -> None:
        deadline = time.monotonic() + wait
        while self._get(cl, kind, ns, name) is not None:
            if time.monotonic() > deadline:
                raise TemporaryError(f"kubernetes: {kind.lower()} {ns}/{name} is still "
                                     "terminating", delay=5.0)
            time.sleep(0.5)

    def _cached_pods(self, cl: Cluster, ns: str, grove: str, repo: str, agent: str
                     ) -> list[dict[str, Any]] | None:
        """The agent's Pods from the grove's synced Pod informer (watching), else None:
        syncing every running agent's inbox then costs no LIST per agent."""
        with self._watch_lock:
            inf = self._informers.get((cl, "Pod", ns, objs.selector(grove, repo)))
        cached = inf.items() if inf is not None else None
        if cached is None:
            return None
        return [p for p in cached if p["metadata"]["labels"].get(LABEL_AGENT) == agent]

    def _pod(self, grove: str, agent: str) -> tuple[Cluster, str, str]:
        """(cluster, namespace, name) of the agent's newest Pod."""
        known = self._where.get((grove, agent))
        _, repo, targets = self._grove(grove)
        for t in [known] if known else sorted(targets):
            cl = self.cluster(t.kubeconfig, t.context)
            items = self._cached_pods(cl, t.namespace, grove, repo, agent)
            if items is None:
                items = self._list(cl, "Pod", t.namespace, objs.selector(grove, repo, agent))
            base = objs.object_name(grove, agent)  # a Job's Pods: `<job name>-<suffix>`
            items = [p for p in items if _pod_name_ok(p["metadata"].get("name"), base)]
            live = [p for p in items if not p["metadata"].get("deletionTimestamp")] or items
            if live:
                self._where[(grove, agent)] = t
                newest = max(live, key=lambda p: p["metadata"].get("creationTimestamp", ""))
                return cl, t.namespace, str(newest["metadata"]["name"])
        raise EngineError(f"agent {grove}/{agent}: no pod on the cluster "
                          f"(searched {', '.join(t.namespace for t in sorted(targets))})")

    def _exec(self, grove: str, agent: str, argv: list[str], timeout: float = 60) -> str:
        cl, ns, pod = self._pod(grove, agent)
        who = f"agent {grove}/{agent}: {argv[0]} in pod {ns}/{pod}"
        try:
            conn = _open_exec(cl, ns, pod, argv)
        except websocket.WebSocketBadStatusException as e:
            http, why = e.status_code, _status_message(e.resp_body)
            if http == 403:
                raise EngineError(f"kubernetes: RBAC forbids create on pods/exec in namespace "
                                  f"{ns} (context {cl.context}): grant verb 'create' on "
                                  "resource 'pods/exec'") from None
            raise EngineError(f"agent {grove}/{agent}: exec in pod {ns}/{pod} failed: "
                              f"{why or f'HTTP {http}'}") from None
        except (websocket.WebSocketException, OSError, ValueError) as e:
            raise EngineError(f"agent {grove}/{agent}: exec in pod {ns}/{pod} failed: "
                              f"{reader.one_line(str(e)) or type(e).__name__}") from None
        try:
            out, err, status = _drain(conn, timeout, who)
        finally:  # a close frame, but no waiting for the pod's answer (it could trickle)
            with contextlib.suppress(websocket.WebSocketException, OSError, AttributeError):
                conn.settimeout(1)
                conn.send_close()
            conn.shutdown()  # type: ignore[no-untyped-call]
        code, why = _exit_code(status)
        if code is None:
            raise EngineError(f"{who} did not run: {reader.one_line(why)}")
        if code:
            raise EngineError(f"{who} exited {code}: {reader.one_line(err)}")
        return out


_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def _pod_name_ok(name: Any, base: str) -> bool:
    """Whether `name` (from the server) may be the agent's Pod: a DNS-1123 subdomain that is
    the agent's object name or starts with it and `-` (never, say, a kubectl flag)."""
    return isinstance(name, str) and len(name) <= 253 and bool(
        _DNS1123_SUBDOMAIN.fullmatch(name)) and (name == base or name.startswith(base + "-"))


MAX_EXEC_OUTPUT = 24 << 20  # what a pod may print to an exec: the inbox archive, base64
EXEC_CONNECT_TIMEOUT = 30.0  # seconds for the exec's websocket to open (its handshake)
_EXEC_PROTOCOLS = "v5.channel.k8s.io,v4.channel.k8s.io"
MAX_EXEC_ERRORS = 4096  # of its stderr, kept for the error message
MAX_EXEC_STDERR = 1 << 20  # of its stderr read at all (the rest is not kept)
MAX_EXEC_STATUS = 64 << 10  # of its exit Status
_ERROR_CHANNEL = 3  # the exec's exit Status (kubelet), a metav1.Status in JSON


def _open_exec(cl: Cluster, ns: str, pod: str, argv: list[str]) -> websocket.WebSocket:
    """The exec's websocket (v5.channel.k8s.io, else v4), opened with the kubeconfig's TLS
    and credentials as the kubernetes client would, but within EXEC_CONNECT_TIMEOUT: the
    client's own sets no timeout, so a server stuck in the handshake would hang it."""
    cfg = cl.api.configuration
    query = urlencode([*(("command", a) for a in argv), ("container", objs.CONTAINER),
                       ("stdout", "true"), ("stderr", "true")])
    base = cfg.host.rstrip("/")
    url = ("wss" + base[5:] if base.startswith("https") else "ws" + base[4:]) + \
        f"{api.path('Pod', ns, pod, 'exec')}?{query}"
    ssl_opts: dict[str, Any] = {"cert_reqs": ssl.CERT_NONE}
    if url.startswith("wss://") and cfg.verify_ssl:
        ssl_opts = {"cert_reqs": ssl.CERT_REQUIRED,
                    "ca_certs": cfg.ssl_ca_cert or certifi.where()}
        if cfg.assert_hostname is not None:
            ssl_opts["check_hostname"] = cfg.assert_hostname
    if cfg.cert_file:
        ssl_opts["certfile"] = cfg.cert_file
    if cfg.key_file:
        ssl_opts["keyfile"] = cfg.key_file
    if getattr(cfg, "tls_server_name", None):
        ssl_opts["server_hostname"] = cfg.tls_server_name
    headers = [f"{k}: {v}" for k, v in cl.headers().items()]
    headers.append(f"Sec-WebSocket-Protocol: {_EXEC_PROTOCOLS}")
    conn = websocket.WebSocket(sslopt=ssl_opts, skip_utf8_validation=True)
    options: dict[str, Any] = {"header": headers, "timeout": EXEC_CONNECT_TIMEOUT}
    if cfg.proxy:
        proxy = urlsplit(cfg.proxy)
        options |= {"http_proxy_host": proxy.hostname, "http_proxy_port": proxy.port,
                    "proxy_type": "http"}
        if cfg.no_proxy:
            options["http_no_proxy"] = cfg.no_proxy.split(",")
    conn.connect(url, **options)  # type: ignore[no-untyped-call]
    return conn


def _status_message(body: Any) -> str:
    """The message of the Status an API server refused an exec with, one line."""
    try:
        st = json.loads(body or b"null")
    except (ValueError, TypeError):
        return reader.one_line(str(body or "")[:300])
    return reader.one_line(str(st.get("message") or "")[:300]) if isinstance(st, dict) else ""


def _exit_code(status: Any) -> tuple[int | None, str]:
    """(exit code, message) from the exec's Status; None when the command did not run
    (not found in the image, or no status at all: the connection ended early)."""
    try:
        st = json.loads(status or "null")
    except ValueError:
        st = None
    if not isinstance(st, dict):
        return None, "the exec ended without an exit status"
    if st.get("status") == "Success":
        return 0, ""
    details = st.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    for cause in causes if isinstance(causes, list) else []:
        if st.get("reason") == "NonZeroExitCode" and isinstance(cause, dict) \
                and cause.get("reason") == "ExitCode":
            with contextlib.suppress(ValueError):
                return int(str(cause.get("message"))), ""
    return None, str(st.get("message") or st.get("reason") or "failed")[:300]


def _drain(ws: Any, timeout: float, who: str) -> tuple[str, str, bytes]:
    """(stdout, stderr, the exit Status) of an exec, read a frame at a time as they come:
    at most MAX_EXEC_OUTPUT and MAX_EXEC_ERRORS are kept, as the pod is the agent's. Each
    frame's length is judged from its header before its payload is read (a frame larger
    than what its channel may still send is refused unread), fragments are joined here
    (the client's own recv_data_frame joins them without limit), and a watchdog shuts the
    socket down at the deadline, so a pod that trickles a frame cannot outlast it. Text is
    decoded at the end: a character may span frames."""
    deadline = time.monotonic() + timeout
    conn = ws  # websocket-client's WebSocket
    conn.settimeout(timeout)
    sock = conn.sock
    expired = threading.Event()

    def watchdog() -> None:
        expired.set()
        with contextlib.suppress(OSError, ValueError):  # the fd only: not the TLS state
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
    timer = threading.Timer(timeout, watchdog)
    timer.daemon = True
    timer.start()
    got: dict[int, list[bytes]] = {1: [], 2: [], _ERROR_CHANNEL: []}
    size = dict.fromkeys(got, 0)
    may = {1: MAX_EXEC_OUTPUT, 2: MAX_EXEC_STDERR, _ERROR_CHANNEL: MAX_EXEC_STATUS}
    keep = {1: MAX_EXEC_OUTPUT, 2: MAX_EXEC_ERRORS, _ERROR_CHANNEL: MAX_EXEC_STATUS}
    ch: int | None = None  # the channel of the message being received (None: between)
    try:
        while True:
            if time.monotonic() > deadline or expired.is_set():
                raise TemporaryError(f"{who}: no answer within {timeout:g}s", delay=5.0)
            c = 1 if ch is None else ch  # a message's first frame: stdout may send most
            left = may[c] - size[c] if c in may else MAX_EXEC_STDERR
            frame = _frame(conn, left + (ch is None), f"{who}: printed more than "
                           f"{may.get(c, MAX_EXEC_STDERR)} bytes"
                           f"{'' if c == 1 else f' on channel {c}'}; refused")
            op = frame.opcode
            if op == websocket.ABNF.OPCODE_CLOSE:
                break
            if op == websocket.ABNF.OPCODE_PING:
                conn.pong(frame.data)
                continue
            if op == websocket.ABNF.OPCODE_PONG:
                continue
            if (op == websocket.ABNF.OPCODE_CONT) != (ch is not None):
                raise websocket.WebSocketProtocolException("unexpected continuation frame"
                                                           if ch is None else
                                                           "a message interrupted")
            data = frame.data if isinstance(frame.data, bytes) else frame.data.encode()
            if ch is None:
                ch, data = (data[0], data[1:]) if data else (0, b"")
            if ch in got:  # else e.g. v5's close of a channel (255)
                if size[ch] + len(data) > may[ch]:
                    raise EngineError(f"{who}: printed more than {may[ch]} bytes"
                                      f"{'' if ch == 1 else f' on channel {ch}'}; refused")
                got[ch].append(data[:max(keep[ch] - size[ch], 0)])
                size[ch] += len(data)
            if frame.fin:
                ch = None
    except (websocket.WebSocketException, OSError, ValueError) as e:
        if expired.is_set() or isinstance(e, (websocket.WebSocketTimeoutException,
                                              TimeoutError)):
            raise TemporaryError(f"{who}: no answer within {timeout:g}s", delay=5.0
                                 ) from None
        raise TemporaryError(f"{who}: the exec's connection broke "
                             f"({reader.one_line(str(e)) or type(e).__name__})", delay=5.0
                             ) from None
    finally:
        timer.cancel()
    return (b"".join(got[1]).decode("utf-8", "replace"),
            b"".join(got[2]).decode("utf-8", "replace"), b"".join(got[_ERROR_CHANNEL]))


def _frame(conn: Any, limit: int, refusal: str) -> Any:
    """The next frame (websocket-client's ABNF: one fragment or control frame), its length
    judged from its header before its payload is read: a data frame at most `limit` bytes
    (else EngineError `refusal`), a control frame 125 (RFC 6455 5.5)."""
    fb = conn.frame_buffer
    if fb.needs_header():
        fb.recv_header()
    if fb.needs_length():
        fb.recv_length()
    if fb.header[4] >= 8 and fb.length > 125:
        raise websocket.WebSocketProtocolException("a control frame longer than 125 bytes")
    if fb.length > max(limit, 0):
        raise EngineError(refusal)
    return fb.recv_frame()


MAX_LOG_LINE = 64 << 10  # bytes of one log line shown; the rest is cut


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """The text lines of a byte stream, in time linear in its length: a line longer than
    MAX_LOG_LINE is cut there (marked), and the rest of it is dropped unread into memory."""
    buf, cut = bytearray(), False
    for chunk in chunks:
        pos, start = len(buf), 0  # what is in buf already has no newline
        buf += chunk
        while (nl := buf.find(b"\n", pos)) >= 0:
            if not cut:
                yield buf[start:nl].decode(errors="replace")
            cut, start = False, nl + 1
            pos = start
        del buf[:start]
        if cut:
            buf.clear()
        elif len(buf) > MAX_LOG_LINE:
            yield (buf[:MAX_LOG_LINE].decode(errors="replace")
                   + f" [line cut at {MAX_LOG_LINE} bytes]")
            buf.clear()
            cut = True
    if buf and not cut:
        yield buf.decode(errors="replace")


def _connect(kubeconfig: str, context: str) -> Cluster:
    """A Cluster for a kubeconfig context; RuntimeUnavailable when there is none."""
    where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    files = [Path(p).expanduser() for p in where.split(os.pathsep) if p]
    cfg_mod: Any = kubernetes.config  # typed in some client versions, not in others
    if not any(f.is_file() for f in files):
        if not kubeconfig and not context and os.environ.get("KUBERNETES_SERVICE_HOST"):
            conf = kubernetes.client.Configuration()
            cfg_mod.load_incluster_config(client_configuration=conf)
            ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            ns = ns_file.read_text().strip() if ns_file.is_file() else "default"
            return Cluster(kubernetes.client.ApiClient(conf), "in-cluster", ns)
        raise RuntimeUnavailable(f"kubernetes: no kubeconfig at {where} (set KUBECONFIG or "
                                 "the profile's kubeconfig:)")
    try:
        contexts, active = cfg_mod.list_kube_config_contexts(
            os.pathsep.join(str(f) for f in files))
        api = cfg_mod.new_client_from_config(config_file=os.pathsep.join(map(str, files)),
                                             context=context or None, persist_config=False)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise RuntimeUnavailable(f"kubernetes: kubeconfig {where} is not valid YAML{at}: "
                                 f"{getattr(e, 'problem', None) or 'parse error'}") from None
    except (cfg_mod.ConfigException, OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeUnavailable(f"kubernetes: kubeconfig {where}: {first}") from None
    chosen = next((c for c in contexts if c.get("name") == (context or active.get("name"))),
                  active)
    ns = (chosen.get("context") or {}).get("namespace") or "default"
    return Cluster(api, str(chosen.get("name", context)), ns)
