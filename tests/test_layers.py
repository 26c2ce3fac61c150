"""Layers: built-in < user config < grove defaults < profile < harness < agent < --set.
Maps merge deeply, lists replace, null deletes; `engine explain` names where each value
came from. Property tests state what merging promises for any layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import layers
from tests.conftest import write_grove

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata:
  name: g
spec:
  defaults:
    profile: box
    env: {A: grove, B: grove}
    resources: {memory: 1Gi}
  profiles:
    box:
      runtime: local
      env: {B: profile, C: profile}
      allowEnv: [HOME, USER]
      resources: {cpus: 2}
  harnesses:
    sh:
      builtin: shell
      env: {H: harness}
  agents:
    - name: a
      harness: sh
      task: do it
      env: {C: null, D: agent}
      resources: {pids: 100}
"""
LINE = {text.strip(): n for n, text in enumerate(GROVE.splitlines(), 1)}


def explain(engine: Any, *args: str) -> dict[str, Any]:
    r = engine("explain", "a", "--json", *args)
    assert r.code == 0, r
    doc: dict[str, Any] = json.loads(r.out)
    return doc


def at(key: str) -> str:
    return f"groves/g/grove.yaml:{LINE[key]}"


def test_maps_merge_deeply_lists_replace_null_deletes(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", GROVE)
    doc = explain(engine)
    s, src = doc["settings"], doc["sources"]
    assert s["env"] == {"A": "grove", "B": "profile", "D": "agent", "H": "harness"}
    assert s["resources"] == {"cpus": 2, "memory": "1Gi", "pids": 100}
    assert s["allowEnv"] == ["HOME", "USER"]
    assert (s["profile"], s["harness"], s["runtime"]) == ("box", "sh", "local")
    assert src["env.A"] == at("env: {A: grove, B: grove}")
    assert src["env.B"] == at("env: {B: profile, C: profile}")
    assert src["env.D"] == at("env: {C: null, D: agent}")
    assert src["env.H"] == at("env: {H: harness}")
    assert src["resources.cpus"] == at("resources: {cpus: 2}")
    assert src["resources.memory"] == at("resources: {memory: 1Gi}")
    assert src["resources.pids"] == at("resources: {pids: 100}")
    assert src["profile"] == at("profile: box")
    assert src["harness"] == at("harness: sh")
    assert src["task"] == at("task: do it")
    assert src["network"] == "built-in"
    assert "env.C" not in src  # deleted by the agent's null
    assert set(src) == {k for k in src if k.split(".")[0] in s}


def test_list_from_a_higher_layer_replaces_not_appends(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", GROVE.replace("      task: do it\n",
                                         "      task: do it\n      dependsOn: [b]\n")
                + "    - name: b\n      task: first\n")
    doc = explain(engine, "--set", "allowEnv=[LANG]")
    assert doc["settings"]["dependsOn"] == ["b"]
    assert doc["settings"]["allowEnv"] == ["LANG"]
    assert doc["sources"]["allowEnv"] == "--set"
    assert explain(engine)["settings"]["allowEnv"] == ["HOME", "USER"]


def test_explain_text_names_every_source(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", GROVE)
    r = engine("explain", "a", "--set", "resources.memory=4Gi")
    assert r.code == 0, r
    rows = {line.split()[0]: line.rsplit("# ", 1)[1] for line in r.out.splitlines()[1:]}
    assert r.out.splitlines()[0].startswith("agent g/a  (spec ")
    assert r.out.splitlines()[0].endswith(f"defined at {at('- name: a')})")
    assert rows["resources.memory"] == "--set"
    assert rows["resources.cpus"] == at("resources: {cpus: 2}")
    assert rows["access"] == "built-in"
    assert rows["command"].startswith("builtin:shell:")


def test_user_config_layer_and_its_path(engine: Any, repo: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    cfg = xdg / "engine" / "config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("defaults:\n  restart: on-failure\n  env: {U: user, A: user}\n"
                   "  network: host\nsecurity:\n  allowPrivileged: false\n")
    write_grove(repo, "g", GROVE)
    doc = explain(engine)
    s, src = doc["settings"], doc["sources"]
    assert (s["restart"], src["restart"]) == ("on-failure", f"{cfg}:2")
    assert (s["env"]["U"], src["env.U"]) == ("user", f"{cfg}:3")
    assert (s["env"]["A"], src["env.A"]) == ("grove", at("env: {A: grove, B: grove}"))
    assert (s["network"], src["network"]) == ("host", f"{cfg}:4")


def test_user_config_problems_are_located(engine: Any, repo: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    cfg = tmp_path / "engine" / "config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("defaults:\n  restart: sometimes\n  gpus: 3\nsecurity:\n"
                   "  allowPrivileged: 'no'\n  allowAll: true\n")
    write_grove(repo, "g", GROVE)
    r = engine("validate")
    assert r.code == 1
    assert r.err.splitlines() == [
        f"error: {cfg}:2:3: user config: defaults.restart: 'sometimes' is not one of never, "
        "on-failure, always",
        f"error: {cfg}:3:3: user config: defaults.gpus: unknown setting",
        f"error: {cfg}:5:3: user config: security.allowPrivileged: expected true or false",
        f"error: {cfg}:6:3: user config: unknown security key 'allowAll' (keys: "
        "allowPrivileged, allowHostMounts, allowRootAgents)",
        "4 problems found"]
    j = engine("validate", "--json")
    assert j.code == 1
    assert [(e["file"], e["line"]) for e in json.loads(j.out)["errors"]] == [
        (str(cfg), 2), (str(cfg), 3), (str(cfg), 5), (str(cfg), 6)]


def test_security_switches_come_from_user_config_only(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    assert layers.load_user_config(cfg).allow_privileged is False  # no file: all refused
    cfg.write_text("security: {allowPrivileged: true, allowHostMounts: false}\n")
    user = layers.load_user_config(cfg)
    assert (user.allow_privileged, user.allow_host_mounts) == (True, False)


def test_set_with_dotted_keys_wins_over_everything(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", GROVE)
    doc = explain(engine, "--set", "resources.memory=4Gi", "--set", "env.D=cli",
                  "--set", "restart=always", "--set", "env.B=null")
    s, src = doc["settings"], doc["sources"]
    assert s["resources"] == {"cpus": 2, "memory": "4Gi", "pids": 100}
    assert s["env"] == {"A": "grove", "D": "cli", "H": "harness"}
    assert s["restart"] == "always"
    assert src["resources.memory"] == src["env.D"] == src["restart"] == "--set"
    assert src["resources.cpus"] == at("resources: {cpus: 2}")


def test_set_chooses_the_profile_and_says_so(engine: Any, repo: Path) -> None:
    write_grove(repo, "g", GROVE.replace("  harnesses:", "    other: {runtime: local}\n"
                                                        "  harnesses:"))
    doc = explain(engine, "--set", "profile=other")
    assert (doc["settings"]["profile"], doc["sources"]["profile"]) == ("other", "--set")
    assert doc["settings"]["resources"]["cpus"] == 1  # box's 2 is not used
    assert doc["sources"]["resources.cpus"] == "built-in"


@pytest.mark.parametrize(("arg", "message"), [
    ("memory", "error: --set 'memory': expected KEY=VALUE (KEY may be dotted: "
               "resources.memory=4Gi)"),
    ("a..b=1", "error: --set 'a..b=1': expected KEY=VALUE (KEY may be dotted: "
               "resources.memory=4Gi)"),
    ("bogus=1", "error: --set bogus: unknown setting"),
    ("restart=sometimes", "error: --set restart: 'sometimes' is not one of never, on-failure, "
                          "always"),
    ("resources.memory=lots", "error: --set resources.memory: 'lots' is not valid (memory "
                              "limit, e.g. 512Mi, 2Gi (binary suffixes) or bytes)"),
])
def test_bad_set_is_a_usage_error(engine: Any, repo: Path, arg: str, message: str) -> None:
    write_grove(repo, "g", GROVE)
    r = engine("explain", "a", "--set", arg)
    assert (r.code, r.out, r.err) == (2, "", message + "\n")


def test_parse_sets_values_are_yaml_scalars() -> None:
    assert layers.parse_sets(["resources.cpus=0.5", "env.X=true", "restart=null",
                              "env.Y=", "task=a=b"]) == {
        "resources": {"cpus": 0.5}, "env": {"X": True, "Y": ""}, "restart": None,
        "task": "a=b"}
    assert layers.parse_sets(["allowEnv=[A, B]", "task={x: 1}"]) == {
        "allowEnv": ["A", "B"], "task": "{x: 1}"}


# -- properties of merge ----------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "env", "resources"])
LEAVES = st.one_of(st.integers(-2, 2), st.text("xy", max_size=2), st.booleans(),
                   st.lists(st.integers(0, 3), max_size=2))
TREES = st.recursive(st.dictionaries(KEYS, st.one_of(LEAVES, st.none()), max_size=3),
                     lambda inner: st.dictionaries(KEYS, st.one_of(LEAVES, st.none(), inner),
                                                   max_size=3), max_leaves=10)


def layer(name: str, data: dict[str, Any]) -> layers.Layer:
    return layers.fixed(name, data)


def leaves(data: dict[str, Any], base: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for k, v in data.items():
        out |= leaves(v, (*base, k)) if isinstance(v, dict) else {(*base, k)}
    return out


def scalars(data: dict[str, Any], base: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(scalars(v, (*base, k)))
        elif v is not None:
            out[(*base, k)] = v
    return out


def get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        data = data[p]
    return data


@settings(max_examples=300, deadline=None)
@given(st.lists(TREES, min_size=1, max_size=4))
def test_merging_a_layer_onto_itself_changes_nothing(datas: list[dict[str, Any]]) -> None:
    once, _ = layers.merge([layer(str(i), d) for i, d in enumerate(datas)])
    top = datas[-1]
    twice, _ = layers.merge([*(layer(str(i), d) for i, d in enumerate(datas)),
                             layer("again", top)])
    assert twice == once


@settings(max_examples=300, deadline=None)
@given(st.lists(TREES, min_size=1, max_size=4))
def test_a_later_layers_scalar_always_wins(datas: list[dict[str, Any]]) -> None:
    merged, _ = layers.merge([layer(str(i), d) for i, d in enumerate(datas)])
    for path, value in scalars(datas[-1]).items():
        assert get(merged, path) == value


@settings(max_examples=300, deadline=None)
@given(st.lists(TREES, min_size=1, max_size=4))
def test_provenance_names_exactly_the_leaves(datas: list[dict[str, Any]]) -> None:
    merged, prov = layers.merge([layer(f"layer{i}", d) for i, d in enumerate(datas)],
                                provenance=True)
    assert set(prov) == leaves(merged)
    for path, source in prov.items():  # and each names a layer that set that very value
        i = int(source.removeprefix("layer"))
        assert scalars(datas[i]).get(path) == get(merged, path)


@settings(max_examples=200, deadline=None)
@given(st.lists(TREES, min_size=2, max_size=4))
def test_merging_lower_layers_first_gives_the_same_result(datas: list[dict[str, Any]]) -> None:
    """What `desired` relies on when it merges the layers shared by many agents once."""
    ls = [layer(str(i), d) for i, d in enumerate(datas)]
    whole, _ = layers.merge(ls)
    lower, _ = layers.merge(ls[:-1])
    start_copy = json.loads(json.dumps(lower))
    split, _ = layers.merge(ls[-1:], start=lower)
    assert split == whole
    assert lower == start_copy  # the shared start is never changed


@settings(max_examples=200, deadline=None)
@given(TREES, TREES)
def test_overlay_equals_merging_onto_a_copy(base: dict[str, Any], top: dict[str, Any]) -> None:
    """`overlay` (what every agent's own layer goes through) shares untouched maps with the
    base instead of copying them, and must give the same map and leave the base alone."""
    frozen = json.dumps(base, sort_keys=True)
    expected, _ = layers.merge([layer("top", top)], start=base)
    assert layers.overlay(base, top) == expected
    assert json.dumps(base, sort_keys=True) == frozen
