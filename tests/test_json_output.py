"""The JSON documents of plan, apply and status are checked against their schemas in
schemas/ (the documented, stable shapes CI jobs rely on)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import ROOT, write_grove

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: j}
spec:
  agents:
    - {name: a, task: 'true'}
    - {name: b, task: 'exit 3', dependsOn: [a]}
"""


def check(name: str, doc: dict) -> None:
    schema = json.loads((ROOT / "schemas" / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)


def test_plan_apply_status_json_match_their_schemas(repo: Path, engine, tmp_path: Path) -> None:
    write_grove(repo, "j", GROVE)
    res = engine("plan", "--json", "--out", str(tmp_path / "p.json"))
    plan = json.loads(res.out)
    check("plan.json", plan)
    assert plan["changes"] is True and plan["summary"]["create"] == 2
    assert json.loads((tmp_path / "p.json").read_text()) == plan
    res = engine("apply", "--auto-approve", "--wait", "--json")
    assert res.code == 1  # b exits 3
    result = json.loads(res.out)
    check("apply-result.json", result)
    assert result["ok"] is False
    assert result["groves"][0]["phases"] == {"a": "Succeeded", "b": "Failed"}
    status = json.loads(engine("status", "--json").out)
    check("status.json", status)
    assert {a["name"]: a["exitCode"] for a in status["groves"][0]["agents"]} == {"a": 0, "b": 3}
    res = engine("apply", "--auto-approve", "--json-stream")
    for line in res.out.splitlines():
        assert json.loads(line)["event"] in ("started", "finished")


@pytest.mark.parametrize("name", ["plan.json", "apply-result.json", "status.json",
                                  "topology-diff.json"])
def test_schemas_have_stable_ids(name: str) -> None:
    schema = json.loads((ROOT / "schemas" / name).read_text())
    assert schema["$id"] == f"https://grove-engine.dev/schemas/{name}"
