"""Generated manifests for DeepSeek-V3 on 256 x 8 H800 and the tiny preset on 2 x 8 H200, both kinds,
compared byte for byte with reviewed copies under ``golden/<case>/<kind>/``. The ConfigMap's copy holds the
plan's SHA-256 in place of the plan itself (the plan file has a golden of its own); the test checks the
ConfigMap carries the plan byte for byte. After an intended change, regenerate and review the diff:

    MOEPLAN_REGEN_GOLDEN=1 python -P -m pytest tests/manifests/test_golden.py
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml

from moeplan.manifests.render import CONFIGMAP_FILE, dump, render
from moeplan.manifests.target import K8sTarget

GOLDEN = Path(__file__).parent / "golden"
# Options a user would give: a queue and a topology level (Kueue), an image with a version tag.
TARGET = K8sTarget(image="registry.example.com/moeplan:0.1.0", queue="training",
                   topology_preferred="example.com/block", exclusive_topology="example.com/block")


def _comparable(files: dict[str, str], plan_text: str) -> dict[str, str]:
    """The files as compared: the ConfigMap's plan replaced by its SHA-256, which must match ``plan_text``."""
    configmap = yaml.safe_load(files[CONFIGMAP_FILE])
    assert configmap["data"]["plan.json"] == plan_text
    configmap["data"]["plan.json"] = f"sha256:{hashlib.sha256(plan_text.encode()).hexdigest()}"
    return {**files, CONFIGMAP_FILE: dump(configmap)}


@pytest.mark.parametrize("kind", ["rayjob", "jobset"])
@pytest.mark.parametrize("case", ["v3", "tiny"])
def test_manifests_match_the_golden_files(case, kind, request) -> None:
    planned = request.getfixturevalue(case)
    got = _comparable(render(planned.plan, planned.text, TARGET, kind), planned.text)
    folder = GOLDEN / planned.name / kind
    if os.environ.get("MOEPLAN_REGEN_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in got.items():
            (folder / name).write_text(text)
    want = {p.name: p.read_text() for p in sorted(folder.glob("*.yaml"))}
    assert sorted(got) == sorted(want)
    for name in got:
        assert got[name] == want[name], f"{folder / name} changed (regenerate with MOEPLAN_REGEN_GOLDEN=1 if intended)"
