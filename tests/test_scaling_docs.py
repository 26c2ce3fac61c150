"""docs/scaling.md's Kubernetes objects (priority level, flow schema, quota) are what a user
pastes into a cluster: each must validate against the official schemas of the versions the
page names (flowcontrol.apiserver.k8s.io/v1 from 1.29 on)."""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

PAGE = ROOT / "docs" / "scaling.md"
VERSIONS = [v for v in kubernetes_validate.utils.all_versions()
            if tuple(map(int, v.split(".")[:2])) >= (1, 29)]


def documents() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", PAGE.read_text(), flags=re.S)
    return [d for b in blocks for d in yaml.safe_load_all(b) if d]


def test_the_page_has_the_objects_it_describes() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["FlowSchema", "PriorityLevelConfiguration", "ResourceQuota"]


@pytest.mark.parametrize("version", [VERSIONS[0], VERSIONS[-1]])
def test_every_object_validates(version: str) -> None:
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_flow_schema_uses_the_priority_level_and_the_quota_counts_every_object() -> None:
    docs = {d["kind"]: d for d in documents()}
    level = docs["PriorityLevelConfiguration"]["metadata"]["name"]
    assert docs["FlowSchema"]["spec"]["priorityLevelConfiguration"]["name"] == level
    hard = docs["ResourceQuota"]["spec"]["hard"]
    for counted in ("count/pods", "count/jobs.batch", "count/configmaps", "count/secrets",
                    "count/networkpolicies.networking.k8s.io", "persistentvolumeclaims",
                    "requests.ephemeral-storage"):
        assert counted in hard
