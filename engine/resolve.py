"""Stage 2, layering one agent: which layers apply to it, merged, with provenance.

Called by `desired` (every agent, through `resolve` with the shared lower layers cached)
and by `engine explain` (with provenance). The layers, lowest first: built-in defaults,
user config, grove defaults, the grove's `spec.limits`, the profile, the harness (its
built-in base, then the grove's definition), the agent, `--set`. Returns plain merged
settings, not yet rendered; an unknown profile or harness is an `InvalidManifests`
located where it was chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from engine import harnesses, layers
from engine.errors import Diagnostic, InvalidManifests
from engine.manifest import Entry, GroveSource
from engine.schema import did_you_mean


@dataclass(frozen=True)
class Options:
    """How to build desired state: user config, --set overrides, secret handling.
    `host_env` False: templates see no value of the engine's environment (each name the
    profile allows reads as the placeholder `${NAME}`), for commands that check
    manifests a pull request may have written (`validate --no-secrets`, `plan --base`)."""

    user: layers.UserConfig = field(default_factory=lambda: layers.UserConfig(
        layers.fixed("user config", {})))
    sets: dict[str, Any] = field(default_factory=dict)
    resolve_secrets: bool = True
    secret_key: bytes = b""
    repo_root: Path | None = None
    host_env: bool = True


class _Choice(NamedTuple):
    """The profile or harness an agent uses, where that choice was made (file:line,
    "--set" or "built-in"; worked out only when asked), and a diagnostic maker for it."""

    name: str
    where_at: Callable[[], str]
    diag: Callable[[str], Diagnostic]

    @property
    def where(self) -> str:
        return self.where_at()


def _selection(src: GroveSource, entry: Entry, key: str, opts: Options) -> _Choice:
    if key in opts.sets:
        value = opts.sets[key]
        return _Choice(str(value), lambda: "--set",
                       lambda m: Diagnostic("--set", 0, 0, f"{m} (from --set {key}={value})"))
    if key in entry.data:
        return _Choice(str(entry.data[key]), lambda: entry.where(key),
                       lambda m: entry.diag(m, key))
    defaults = src.spec.get("defaults") or {}
    if key in defaults:
        return _Choice(str(defaults[key]), lambda: src.grove.where("spec", "defaults", key),
                       lambda m: src.grove.diag(m, "spec", "defaults", key))
    user = opts.user.defaults
    if key in user.data:
        return _Choice(str(user.data[key]), lambda: user.where((key,)),
                       lambda m: user.diag((key,), m))
    return _Choice("local" if key == "profile" else "shell", lambda: "built-in",
                   lambda m: entry.diag(m))


def harness_layers(src: GroveSource, name: str) -> list[layers.Layer] | None:
    """Layers of a harness: its built-in base (if any), then the grove's definition."""
    entry = src.harnesses.get(name)
    base_name = (entry.data.get("builtin") if entry else None) or (None if entry else name)
    out = []
    if base_name:
        doc = harnesses.builtin(base_name)
        if doc is None:
            return None
        out.append(layers.from_document(f"builtin harness {base_name}", doc, ("spec",),
                                        doc.data["spec"]))
    if entry:
        out.append(layers.from_document(f"harness {name}", entry.doc, entry.path, entry.data))
    return out


def profile_layer(src: GroveSource, name: str) -> layers.Layer | None:
    entry = src.profiles.get(name)
    if entry is None:
        return layers.fixed("built-in profile local", {}) if name == "local" else None
    return layers.from_document(f"profile {name}", entry.doc, entry.path, entry.data)


def agent_layers(src: GroveSource, entry: Entry, opts: Options) -> list[layers.Layer]:
    """All layers of one agent, lowest first. Raises InvalidManifests (one diagnostic, at
    the place the profile or harness was chosen) on an unknown profile or harness."""
    return [*lower_layers(src, entry, opts), *upper_layers(src, entry, opts)]


def upper_layers(src: GroveSource, entry: Entry, opts: Options) -> list[layers.Layer]:
    """The agent's own layer and those above it."""
    return [
        layers.from_document(f"agent {entry.name}", entry.doc, entry.path, entry.data),
        layers.fixed("--set", opts.sets),
        layers.fixed("selection", {"profile": _selection(src, entry, "profile", opts).name,
                                   "harness": _selection(src, entry, "harness", opts).name}),
    ]


def lower_layers(src: GroveSource, entry: Entry, opts: Options) -> list[layers.Layer]:
    """The layers below the agent's own (built-in ... harness). They are the same for
    every agent that uses the same profile and harness, so `build` merges them once."""
    pname, _, pdiag = _selection(src, entry, "profile", opts)
    hname, _, hdiag = _selection(src, entry, "harness", opts)
    prof = profile_layer(src, pname)
    if prof is None:
        raise InvalidManifests([pdiag(
            f"agent {entry.name}: unknown profile {pname!r}"
            f"{did_you_mean(pname, set(src.profiles) | {'local'})} "
            f"(profiles: {', '.join(sorted(set(src.profiles) | {'local'}))})")])
    hl = harness_layers(src, hname)
    if hl is None:
        known = sorted(set(src.harnesses) | set(harnesses.names()))
        raise InvalidManifests([hdiag(f"agent {entry.name}: unknown harness {hname!r}"
                                      f"{did_you_mean(hname, known)} "
                                      f"(harnesses: {', '.join(known)})")])
    # A harness's image is only a default: any image the user config, profile or agent
    # names wins, so it sits right above the built-in defaults.
    himage = [layers.Layer(h.name, {"image": h.data["image"]}, h.where)
              for h in hl if "image" in h.data]
    hl = [layers.Layer(h.name, {k: v for k, v in h.data.items() if k != "image"}, h.where)
          for h in hl]
    defaults = src.spec.get("defaults") or {}
    return [
        layers.fixed("built-in", {**layers.BUILTIN_DEFAULTS,
                                  "workspace": src.spec.get("workspace", "worktree")}),
        *himage,
        opts.user.defaults,
        layers.from_document("grove defaults", src.grove.doc, ("spec", "defaults"), defaults),
        *grove_limits(src),
        prof, *hl,
    ]


def grove_limits(src: GroveSource) -> list[layers.Layer]:
    """`spec.limits`, the budgets of every agent of the grove, as a layer right above the
    grove defaults: a profile's or an agent's `limits` override it field by field."""
    limits = src.spec.get("limits")
    if not isinstance(limits, dict) or not limits:
        return []
    return [layers.from_document("grove limits", src.grove.doc, ("spec",),
                                 {"limits": limits})]


def resolve(src: GroveSource, name: str, opts: Options, provenance: bool = False,
            bases: dict[tuple[str, str], dict[str, Any]] | None = None,
            ) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The merged (unrendered) settings of one agent, optionally with provenance. `bases`
    caches the merged lower layers per (profile, harness) across the agents of a grove."""
    entry = src.agents[name]
    if bases is None or provenance:
        merged, prov = layers.merge(agent_layers(src, entry, opts), provenance)
    else:  # upper_layers, merged without building Layer objects: once per agent
        key = (_selection(src, entry, "profile", opts).name,
               _selection(src, entry, "harness", opts).name)
        if key not in bases:
            bases[key] = layers.merge(lower_layers(src, entry, opts))[0]
        merged, prov = layers.overlay(bases[key], entry.data), {}
        if opts.sets:
            merged = layers.overlay(merged, opts.sets)
        merged["profile"], merged["harness"] = key
    for k in ("profile", "harness"):
        if provenance:
            prov[(k,)] = _selection(src, entry, k, opts).where
    merged.pop("builtin", None)
    merged.pop("description", None)
    prov.pop(("builtin",), None)
    return merged, prov
