"""`engine render -g G [AGENT...]`: the Kubernetes objects apply would send, printed offline.

For the selected groves' agents on the kubernetes runtime: each agent's objects from
`k8s_objects.build` (the builder apply uses), preceded once per namespace by the egress
gateway's objects when agents there use `network: egress`. No cluster and no kubeconfig are
needed (a kubeconfig file is read only for the namespace of its context, when a profile names
none); credentials are named, never resolved: each Secret value is
`k8s_objects.SECRET_PLACEHOLDER`, and what only apply can know is shown by a placeholder
(`OWNER_UID`, `TOKEN_AT_APPLY`, and `SPEC_HASH_AT_APPLY` for the spec-hash label of an
agent with credentials: that hash digests their values). Output: a YAML stream (`---`
between objects), or with `--format json` a `v1` List.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from engine import __version__, ui, yamlio
from engine.commands import _common
from engine.desired import HOME_FILE_PREFIX, DesiredAgent, DesiredGrove
from engine.errors import EngineError
from engine.executor import client_path
from engine.runtimes import LABEL_HASH, k8s_net
from engine.runtimes import k8s_objects as objs

DEFAULT_NAMESPACE = "default"  # what kubectl uses when the context names none


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "render", help="print the Kubernetes objects apply would send (offline)",
        description="Print the Kubernetes objects apply would send for the agents on the "
                    "kubernetes runtime, without a cluster; secret values are left out. "
                    "Review them, or pipe them: engine render -g G | kubectl diff -f -")
    p.add_argument("agents", nargs="*", metavar="AGENT",
                   help="NAME or GROVE/NAME (default: every agent of the selected groves)")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("--format", choices=["yaml", "json"], default="yaml",
                   help="yaml: a multi-document stream (default); json: a v1 List")
    return p


def _kubeconfig_namespace(root: Path, kubeconfig: str, context: str) -> str:
    """The namespace of a kubeconfig context, read from the file (nothing is contacted);
    DEFAULT_NAMESPACE when there is no such file, context or namespace."""
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        files = [path if path.is_absolute() else root / path]
    else:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        files = [Path(p).expanduser() for p in where.split(os.pathsep) if p]
    for f in files:
        try:  # a kubeconfig a manifest names is the repository's: never a FIFO, never huge,
            docs = yamlio.load_file(f)  # no alias bombs (the manifests' own loader)
        except (yamlio.YamlError, OSError):
            continue
        doc = docs[0].data if len(docs) == 1 else None
        if not isinstance(doc, dict):
            continue
        name = context or doc.get("current-context")
        entries = doc.get("contexts")
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("name") == name:
                ctx = entry.get("context")
                ns = (ctx.get("namespace") if isinstance(ctx, dict) else None
                      ) or DEFAULT_NAMESPACE
                if not isinstance(ns, str) or not _NAMESPACE.fullmatch(ns):
                    raise EngineError(f"{f}: context {name}: namespace {str(ns)[:80]!r} is not "
                                      "a valid namespace name")
                return ns
    return DEFAULT_NAMESPACE


_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _launch_env(agent: DesiredAgent) -> dict[str, str]:
    """The non-secret environment apply starts the agent with (executor.launch_for), as
    far as it reaches the Pod (host paths and the branch are set by `pod_env`)."""
    ident = {"GIT_AUTHOR_NAME": f"{agent.name} ({agent.grove})",
             "GIT_AUTHOR_EMAIL": f"{agent.name}@{agent.grove}.agents.invalid"}
    ident |= {"GIT_COMMITTER_NAME": ident["GIT_AUTHOR_NAME"],
              "GIT_COMMITTER_EMAIL": ident["GIT_AUTHOR_EMAIL"]}
    return {**ident, **dict(agent.env), "ENGINE_GROVE": agent.grove, "ENGINE_AGENT": agent.name,
            "ENGINE_PARENT": agent.spawned_by or "", "ENGINE_PROFILE": agent.profile}


def objects(root: Path, selected: list[tuple[DesiredGrove, DesiredAgent]]
            ) -> list[dict[str, Any]]:
    """The objects apply would send for the selected (grove, kubernetes agent) pairs, in
    apply order, Secret values redacted."""
    client = client_path().read_text()
    host_paths = (str(root.resolve()), str(root))
    gateways: dict[str, list[tuple[DesiredAgent, objs.PodLaunch, str]]] = {}
    out: list[dict[str, Any]] = []
    for grove, agent in selected:
        ns = agent.extra("namespace") or _kubeconfig_namespace(
            root, str(agent.extra("kubeconfig") or ""),
            str(agent.extra("context") or agent.host or ""))
        pl = objs.pod_launch(agent, ns, grove.remote, _launch_env(agent), host_paths,
                             __version__, client, k8s_net.remote_addresses(agent, grove.remote))
        names = [c.name for c in agent.credentials]
        names += [f"{HOME_FILE_PREFIX}{i}" for i in range(len(agent.home_files))]
        token = objs.TOKEN_AT_APPLY if agent.network == "egress" else ""
        built = objs.build(agent, pl, dict.fromkeys(names, objs.SECRET_PLACEHOLDER), token)
        if agent.credentials:  # its spec hash digests their values, which are not read
            for o in built:
                o["metadata"]["labels"][LABEL_HASH] = objs.SPEC_HASH_AT_APPLY
        out += built
        if agent.network == "egress":
            gateways.setdefault(ns, []).append((agent, pl, token))
    first = [o for ns in sorted(gateways) for o in objs.gateway_for(gateways[ns])]
    return [objs.redacted(o) for o in [*first, *out]]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the scripts, the client) as literal blocks, for reading and
    diffing; YAML falls back to a quoted string where a block cannot hold the text."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if args.agents and not args.groves and all("/" in a for a in args.agents):
        args.groves = sorted({a.split("/", 1)[0] for a in args.agents})  # only those load
    groves = _common.load(r, args, resolve_secrets=False)
    selected: list[tuple[DesiredGrove, DesiredAgent]] = []
    for ref in args.agents:
        pair = _common.find_agent(groves, ref)
        if pair not in selected:
            selected.append(pair)
    if not args.agents:
        selected = [(g, a) for g in groves for a in g.agents]
    kube = [(g, a) for g, a in selected if a.runtime == "kubernetes"]
    if not kube:
        names = ", ".join(f"{g.name}/{a.name}" for g, a in selected) or "none"
        raise EngineError(f"nothing to render: no selected agent runs on the kubernetes "
                          f"runtime (selected: {names})")
    for g, a in selected:
        if a.runtime != "kubernetes":
            ui.err(f"note: skipping {g.name}/{a.name}: runtime {a.runtime}, not kubernetes")
    items = objects(r.root, kube)
    if args.format == "json":
        sys.stdout.write(json.dumps({"apiVersion": "v1", "kind": "List", "items": items},
                                    indent=2) + "\n")
    else:
        sys.stdout.write(yaml.dump_all(items, Dumper=_Dumper, sort_keys=False,
                                       explicit_start=True, width=100))
    return 0
