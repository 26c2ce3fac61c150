"""Docker runtime: every agent in its own hardened container, on the local engine or on the
Docker host its profile names.

Called through `engine.runtimes.get("docker", repo_root, host)` by observe, the executor
and the interaction commands, and by `engine image` (as an `images.ImageEngine`). The only
module that imports the Docker SDK. The container's configuration comes from
`docker_spec`, the host-side files from `docker_fs`; the harness runs in a tmux session
inside the container under images/base/entrypoint.sh, bind-mounted from the package. The
agent's home is a host directory (`docker_fs.home_dir`) that outlives its containers: a
restart or replacement finds the harness's sessions there, `delete` removes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from engine import egress, harness_install, images, paths
from engine.desired import DesiredAgent
from engine.errors import EngineError, PermanentError, RuntimeUnavailable, TemporaryError
from engine.runtimes import LABEL_AGENT, Launch, Observed, logfile
from engine.runtimes import docker_fs as fs
from engine.runtimes import docker_spec as spec

SCHEMES = ("unix://", "tcp://", "ssh://", "npipe://", "http://", "https://")
START_HINT = ("start it (sudo systemctl start docker, or dockerd --bridge=none "
              "--iptables=false as root) or fix the profile's host:")
STOP_GRACE = 5  # seconds a stopped container's harness has before it is killed
T = TypeVar("T")


def connect(host: str | None, engine: str = "docker engine", hint: str = START_HINT) -> Any:
    """A Docker client for `host` (None: DOCKER_HOST or the default socket), checked to
    answer. Raises RuntimeUnavailable with one line saying how to start the engine (`engine`
    and `hint`: what answers there, and how to start it; Podman's differ)."""
    where = _url(host)
    if not where.startswith(SCHEMES):
        raise EngineError(f"{engine.split()[0]} host {where}: unknown scheme (use unix://, "
                          "tcp:// or ssh://)")

    def client(version: str) -> Any:
        if host:
            return docker.DockerClient(base_url=host, version=version, timeout=120,
                                       use_ssh_client=host.startswith("ssh://"))
        return docker.from_env(version=version, timeout=120)

    if where.startswith("unix://"):
        _probe_unix(where, where.removeprefix("unix://"), engine, hint)
    # Probe first with a client that makes no request while being built, so a failed
    # connection leaves nothing open; then speak the highest API version both sides know.
    probe = client(docker.constants.MINIMUM_DOCKER_API_VERSION)
    try:
        server = str(probe.api.version(api_version=False)["ApiVersion"])
    except (DockerException, requests.RequestException) as e:
        raise RuntimeUnavailable(f"{engine} at {where}: not reachable; {hint}",
                                 detail=str(e)) from None
    finally:
        probe.close()
    ours = docker.constants.DEFAULT_DOCKER_API_VERSION
    return client(server if docker.utils.version_lt(server, ours) else ours)


def _url(host: str | None) -> str:
    """The URL a client for `host` connects to."""
    return host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _probe_unix(where: str, path: str, engine: str, hint: str) -> None:
    """docker-py leaks the socket of a failed unix connection: try it ourselves first."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(path)
        except OSError as e:
            raise RuntimeUnavailable(f"{engine} at {where}: not reachable "
                                     f"({e.strerror or e}); {hint}") from None


def _podman_permanent(text: str) -> bool:
    """Podman answers 500 where Docker answers 404 or 409: a network or object that does
    not exist, a container in the wrong state. Retrying cannot help those."""
    return any(s in text for s in ("not found", "no such container", "no such network",
                                   "no such image", "state improper"))


def _permanent(who: str, e: Exception) -> EngineError:
    """EngineErrors as they are; a 404 (a network or mount source that does not exist)
    as a PermanentError naming the agent."""
    if isinstance(e, EngineError):
        return e
    return PermanentError(f"{who}: {getattr(e, 'explanation', None) or e}")


def is_podman(client: Any) -> bool:
    """Whether the engine answering is Podman's Docker-compatible service (its version
    names a "Podman Engine" component); see engine/runtimes/podman.py for what differs."""
    try:
        info = client.api.version(api_version=False)
    except (DockerException, requests.RequestException):
        return False
    return any(c.get("Name") == "Podman Engine" for c in info.get("Components") or [])


def make(repo_root: Path, host: str | None) -> DockerRuntime:
    """The Docker runtime at `host`; where Podman answers there, the Podman runtime
    (named docker, as the profile says), so a docker profile on Podman's socket gets all
    Podman needs (rootless keep-id, the limit check, the tmpfs options)."""
    client = connect(host)
    if is_podman(client):
        from engine.runtimes import podman  # imports this module: at call time only

        return podman.adopt(repo_root, host, client, _url(host), name="docker")
    return DockerRuntime(repo_root.resolve(), host or "", client)


class DockerRuntime:
    """One Docker engine, as seen from one repository. With `podman`, the engine is
    Podman's Docker-compatible service (engine/runtimes/podman.py, a subclass): what it
    reports differently is read its way (`_podman_entry`), what it is sent says what
    Podman needs said to give the same sandbox (`docker_spec.create_kwargs(podman=)`)."""

    name = "docker"
    engine = "docker engine"  # what answers at the host, in messages
    hint = START_HINT
    cli = "docker"  # the command `attach` runs (`-H host exec -it ...`)
    cli_package = "docker.io"

    def __init__(self, repo_root: Path, host: str, client: Any, podman: bool = False,
                 where: str = "") -> None:
        self.repo_root = repo_root
        self.host = host
        self.where = where or host  # the URL connected to ("" : DOCKER_HOST or the default)
        self.podman = podman
        self.client = client
        self.api = client.api
        # pooled connections are closed when the runtime goes away, warning-free
        self._closer = weakref.finalize(self, client.close)

    def close(self) -> None:
        self._closer()

    def _where(self) -> str:
        return self.host or f"the local {self.engine}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one engine call, turning transport failures into runtime errors."""
        try:
            return fn()
        except NotFound:
            raise  # the caller decides what a missing object means
        except (requests.ConnectionError, requests.Timeout) as e:
            raise RuntimeUnavailable(f"{self.engine} at {self.host or 'default'}: lost "
                                     f"while {what}; {self.hint}", detail=str(e)) from None
        except APIError as e:
            if e.status_code is not None and e.status_code >= 500 \
                    and not (self.podman and _podman_permanent(str(e.explanation or e))):
                raise TemporaryError(f"{what}: {e.explanation or e}", delay=2.0) from None
            raise PermanentError(f"{what}: {e.explanation or e}") from None

    def _name(self, grove: str, agent: str) -> str:
        """The agent's container: the one named `spec.container_name`, else the one its
        owner labels find (made by an engine before that naming: an upgrade must not
        orphan a running agent, nor let a new create leave the old one running)."""
        name = spec.container_name(self.repo_root, grove, agent)
        owned = self._owned(grove, agent)
        return name if name in owned or not owned else owned[0]

    def _owned(self, grove: str, agent: str) -> list[str]:
        """Names of this repository's containers of one agent, found by owner labels
        (never by name, which an older engine spelled ambiguously)."""
        labels = spec.owner_filters(self.repo_root, grove)["label"]
        filters = {"label": [*labels, f"{LABEL_AGENT}={agent}"]}
        entries = self._call(f"agent {grove}/{agent}: listing its containers",
                             lambda: self.api.containers(all=True, filters=filters))
        return sorted(str(n).lstrip("/") for e in entries for n in (e.get("Names") or [])[:1])

    # -- the Runtime protocol ---------------------------------------------------------------

    def observe(self, grove: str) -> dict[str, Observed]:
        entries = self._call(f"listing containers of grove {grove}", lambda: self.api.containers(
            all=True, filters=spec.owner_filters(self.repo_root, grove)))
        out = {}
        for entry in entries:
            if self.podman:
                entry = self._podman_entry(entry)
            o = spec.observed(entry, self.host)
            if self.name != o.runtime:
                o = dataclasses.replace(o, runtime=self.name)
            if o.grove == grove and o.name:
                out[o.name] = o
        return dict(sorted(out.items()))

    def _podman_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A container list entry from Podman, as Docker would give it: Podman reports
        its own states where Docker has none ("stopped": exited, not yet cleaned up;
        "configured"/"initialized": created; "stopping": still running) and lists no
        Mounts, which the reason of a failed agent is found through (read by inspect)."""
        states = {"stopped": "exited", "configured": "created", "initialized": "created",
                  "stopping": "running"}
        entry = {**entry, "State": states.get(entry.get("State") or "", entry.get("State"))}
        if entry["State"] == "exited" and not entry.get("Mounts") and entry.get("Id"):
            info = self._inspect(str(entry["Id"])) or {}
            entry["Mounts"] = info.get("Mounts") or []
        return entry

    def create(self, launch: Launch) -> None:
        a = launch.agent
        who = f"agent {a.grove}/{a.name}"
        if not a.image:
            raise EngineError(f"{who}: runtime {self.name} needs an image")
        old = self._name(a.grove, a.name)
        self._stop_container(old)  # a running one saves its session first (a restart)
        self._remove(old)
        try:
            dirs = self._extras(launch, self._prepare(launch))
        except BaseException:
            fs.forget(launch.run_dir)  # never leave secret files behind a failed create
            raise
        try:
            kwargs = spec.create_kwargs(launch, dirs, a.image, podman=self.podman)
            host_config = self._host_config(launch, self.api.create_host_config(
                **{k: v for k, v in kwargs.items() if k in spec.HOST_CONFIG_KEYS}))
            config = {k: v for k, v in kwargs.items() if k not in spec.HOST_CONFIG_KEYS}
            cid = self._call(f"{who}: create", lambda: self.api.create_container(
                **config, host_config=host_config, detach=True, use_config_proxy=False)
            )["Id"]
        except ImageNotFound:
            fs.forget(launch.run_dir)
            raise self._no_image(a) from None
        except (EngineError, NotFound) as e:
            fs.forget(launch.run_dir)
            raise _permanent(who, e) from None
        try:
            self._call(f"{who}: start", lambda: self.api.start(cid))
        except (EngineError, NotFound) as e:
            self._remove(cid)
            fs.forget(launch.run_dir)
            raise _permanent(who, e) from None

    def _prepare(self, launch: Launch) -> spec.HostDirs:
        """The agent's host-side files (`docker_fs.prepare`), owned by its uid."""
        return fs.prepare(launch, images.entrypoint())

    def _host_config(self, launch: Launch, host_config: dict[str, Any]) -> dict[str, Any]:
        """The HostConfig the SDK built from `docker_spec`, with what the SDK cannot say
        (nothing, on Docker)."""
        return host_config

    def _local_engine(self) -> bool:
        """Whether the Docker engine runs on this machine (it can mount the engine's files
        and reach the gateway's sockets)."""
        where = self.where or os.environ.get("DOCKER_HOST") or "unix://"
        return where.startswith("unix://")

    def _program(self, a: DesiredAgent) -> harness_install.Installed | None:
        if a.program is None or not self._local_engine():
            return None
        return harness_install.installed(*a.program)

    def _no_image(self, a: DesiredAgent) -> EngineError:
        return EngineError(f"agent {a.grove}/{a.name}: image {a.image} not found on "
                           f"{self._where()}; {images.hint(a.image or '')}")

    def check_image(self, a: DesiredAgent) -> None:
        """The agent's image is on the Docker host (plan fails with the message create
        would give)."""
        if not a.image:
            return
        try:
            self._call(f"image {a.image}", lambda: self.api.inspect_image(a.image))
        except NotFound:  # ImageNotFound included
            raise self._no_image(a) from None

    def check_program(self, a: DesiredAgent) -> None:
        """The harness program is in the install cache (mounted read-only) or the image
        says it carries it (label engine.harness.<name>); else one error naming the
        install command."""
        if a.program is None or self._program(a) is not None or not a.image:
            return
        info = None
        with contextlib.suppress(EngineError, NotFound, ImageNotFound):
            info = self._call(f"image {a.image}", lambda: self.api.inspect_image(a.image))
        labels = ((info or {}).get("Config") or {}).get("Labels") or {}
        if f"engine.harness.{a.program[0]}" not in labels:
            raise EngineError(f"agent {a.grove}/{a.name}: "
                              f"{harness_install.missing_message(a.program[0])}")

    def _extras(self, launch: Launch, dirs: spec.HostDirs) -> spec.HostDirs:
        """What the agent mounts besides its own files: its installed harness program,
        and with `network: egress` its socket to the gateway (started if need be), whose
        allow list is written first."""
        a = launch.agent
        program = self._program(a)
        if a.network != "egress":
            return dataclasses.replace(dirs, harness=program.root if program else None)
        if not self._local_engine():
            raise EngineError(f"agent {a.grove}/{a.name}: network: egress needs the "
                              f"{self.engine} on this machine (the gateway's socket is "
                              f"mounted); profile host is {self.host}")
        egress.write_policy(self.repo_root, a.grove, a.name, list(a.egress))
        egress.ensure_running(self.repo_root)
        return dataclasses.replace(
            dirs, harness=program.root if program else None,
            egress=egress.socket_dir(self.repo_root, a.grove, a.name),
            forwarder=Path(egress.__file__).resolve().parent / "forwarder.py")

    def stop(self, grove: str, agent: str) -> None:
        """End the container (its harness gets STOP_GRACE seconds to save its session) and
        remove it with its secret files; the home, the log and the inbox stay."""
        egress.remove_policy(self.repo_root, grove, agent)
        for name in self._owned(grove, agent):  # by labels: old names and new alike
            info = self._inspect(name)
            if info is None:
                continue
            if (info.get("State") or {}).get("Running"):
                self._stop_container(name)
            self._remove(name)
            ctl = spec.ctl_dir({"Mounts": info.get("Mounts") or []})
            if ctl is not None:
                fs.forget(ctl.parent)

    def delete(self, grove: str, agent: str) -> None:
        self.stop(grove, agent)
        fs.remove_home(self.repo_root, grove, agent, sealed=True)

    def logs(self, grove: str, agent: str, follow: bool = False, tail: int | None = None,
             previous: bool = False) -> Iterator[str]:
        if previous:  # the run before this one (logfile.rotate, at `fs.prepare`)
            path = logfile.previous(paths.log_file(self.repo_root, grove, agent))
            if not path.is_file():
                raise EngineError(f"agent {grove}/{agent}: no previous run (its log is "
                                  "kept once it has run again)")
            return fs.read_log(path, False, lambda: False, tail)
        path = self._log_path(grove, agent)
        if not path.is_file():
            return iter(())
        return fs.read_log(path, follow, lambda: self._running(grove, agent), tail)

    def look(self, grove: str, agent: str) -> str:
        try:
            code, out = self._exec(grove, agent, ["tmux", "capture-pane", "-p", "-t",
                                                   spec.SESSION])
        except EngineError:
            code, out = 1, ""
        if code == 0:
            return out
        tail = list(self.logs(grove, agent, tail=50))  # ended: its last output instead
        return "\n".join(tail) + ("\n" if tail else "")

    def attach(self, grove: str, agent: str) -> int:
        cli = shutil.which(self.cli)
        if cli is None:
            raise EngineError(f"agent {grove}/{agent}: attach needs the {self.cli} command "
                              f"(apt-get install {self.cli_package})")
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise EngineError(f"agent {grove}/{agent}: attach needs a terminal")
        self._require_running(grove, agent)
        argv = [cli, *self._cli_host(), "exec", "-it",
                self._name(grove, agent), "tmux", "attach-session", "-t", spec.SESSION]
        return subprocess.call(argv)

    def _cli_host(self) -> list[str]:
        """The options that point `cli` at this runtime's engine."""
        return ["-H", self.host] if self.host else []

    def send(self, grove: str, agent: str, text: str) -> None:
        script = ('tmux set-buffer -b engine-msg -- "$1" && '
                  'tmux paste-buffer -p -d -b engine-msg -t "$2" && sleep 0.3 && '
                  'tmux send-keys -t "$2" Enter')
        code, out = self._exec(grove, agent, ["bash", "-c", script, "send", text,
                                               spec.SESSION])
        if code != 0:
            raise EngineError(f"agent {grove}/{agent}: cannot type into its session "
                              f"({out.strip() or 'it has ended'})")

    # -- images (engine.images.ImageEngine) ------------------------------------------------

    def has_image(self, tag: str) -> bool:
        try:
            self._call(f"image {tag}", lambda: self.api.inspect_image(tag))
        except ImageNotFound:
            return False
        return True

    def remove_image(self, tag: str) -> None:
        with contextlib.suppress(ImageNotFound):
            self._call(f"image {tag}: remove", lambda: self.api.remove_image(tag, force=True))

    def build_image(self, context: Path, tag: str, buildargs: dict[str, str],
                    network: str | None, output: Callable[[str], None]) -> None:
        """docker build, its output passed to `output` as it streams in."""
        def run() -> None:
            for chunk in self.api.build(path=str(context), tag=tag, buildargs=buildargs,
                                        network_mode=network, rm=True, forcerm=True,
                                        decode=True):
                if "error" in chunk:
                    raise EngineError(f"image {tag}: build failed: "
                                      f"{str(chunk['error']).strip()}")
                if chunk.get("stream"):
                    output(str(chunk["stream"]))
                elif chunk.get("status"):  # pulling a FROM image
                    output(f"{chunk['status']} {chunk.get('progress') or ''}".rstrip() + "\n")
        self._call(f"image {tag}: build", run)

    def import_image(self, chunks: Iterable[bytes], tag: str) -> None:
        repo, _, version = tag.rpartition(":")
        self._call(f"image {tag}: import", lambda: self.api.import_image(
            src=iter(chunks), repository=repo, tag=version, stream_src=True))

    # -- helpers ------------------------------------------------------------------------------

    def _inspect(self, name: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self._call(f"container {name}",
                                              lambda: self.api.inspect_container(name))
        except NotFound:
            return None
        return info

    def _stop_container(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(f"container {name}: stop",
                       lambda: self.api.stop(name, timeout=STOP_GRACE))

    def _remove(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(f"container {name}: remove",
                       lambda: self.api.remove_container(name, force=True))

    def _require_running(self, grove: str, agent: str) -> dict[str, Any]:
        info = self._inspect(self._name(grove, agent))
        if info is None:
            raise EngineError(f"agent {grove}/{agent}: no container on {self._where()}")
        if not (info.get("State") or {}).get("Running"):
            raise EngineError(f"agent {grove}/{agent}: its container is not running")
        return info

    def _exec(self, grove: str, agent: str, argv: list[str]) -> tuple[int, str]:
        """Run argv in the agent's running container as its user: (exit code, output)."""
        name = self._name(grove, agent)
        try:
            ex = self._call(f"agent {grove}/{agent}: exec",
                            lambda: self.api.exec_create(name, argv, stdout=True, stderr=True))
        except NotFound:
            raise EngineError(f"agent {grove}/{agent}: no container on {self._where()}"
                              ) from None
        except PermanentError as e:
            if "is not running" in e.summary or "container state improper" in e.summary:
                raise EngineError(f"agent {grove}/{agent}: its container is not running"
                                  ) from None
            raise
        out = self._call("exec", lambda: self.api.exec_start(ex["Id"]))
        code = self._call("exec", lambda: self.api.exec_inspect(ex["Id"]))["ExitCode"]
        return int(code or 0), bytes(out).decode(errors="replace")

    def _log_path(self, grove: str, agent: str) -> Path:
        info = self._inspect(self._name(grove, agent))
        for m in (info or {}).get("Mounts") or []:
            if m.get("Destination") == spec.LOG:
                return Path(m["Source"])
        return paths.state(self.repo_root) / "logs" / grove / f"{agent}.log"

    def _running(self, grove: str, agent: str) -> bool:
        info = self._inspect(self._name(grove, agent))
        return bool(info and (info.get("State") or {}).get("Running"))
