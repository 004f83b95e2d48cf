"""The plan file of one small preset, compared field by field with a reviewed copy (``golden/plan-tiny-moe.json``).

Any change to what ``moeplan plan`` writes shows up here as a list of changed fields, and in review as a diff
of the golden file. After an intended change, regenerate it and commit the diff with the change:

    MOEPLAN_REGEN_GOLDEN=1 python -P -m pytest tests/orchestrator/test_plan_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from typer.testing import CliRunner

from moeplan.orchestrator.cli import app

GOLDEN = Path(__file__).parent / "golden" / "plan-tiny-moe.json"
# Every section filled: a searched-free DualPipeV layout, a skewed load with redundant experts (placement),
# the whole run and a budget.
ARGS = ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--pp", "2", "--ep", "4",
        "--schedule", "dualpipev", "--zipf", "1.2", "--redundant-experts", "2", "--tokens", "1T",
        "--budget-gpu-hours", "50", "--price-per-gpu-hour", "2.0"]
REL_TOL = 1e-12  # the simulator is deterministic; only the last bit of a float may differ across platforms


def _differences(got, want, path: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}.{k}: missing" for k in want if k not in got]
        out += [f"{path}.{k}: new field" for k in got if k not in want]
        for key in want.keys() & got.keys():
            out += _differences(got[key], want[key], f"{path}.{key}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, golden has {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _differences(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, float | int) and not isinstance(got, bool):
        return [] if math.isclose(got, want, rel_tol=REL_TOL, abs_tol=0.0) else [f"{path}: {got!r} != golden {want!r}"]
    return [] if got == want and type(got) is type(want) else [f"{path}: {got!r} != golden {want!r}"]


def test_tiny_moe_plan_matches_the_golden_file(tmp_path) -> None:
    result = CliRunner().invoke(app, [*ARGS, "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "plan.json").read_text())
    if os.environ.get("MOEPLAN_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    differences = _differences(got, json.loads(GOLDEN.read_text()))
    assert differences == [], "plan output changed (regenerate the golden file if intended):\n" + "\n".join(differences)


def test_the_comparison_catches_changes() -> None:
    golden = json.loads(GOLDEN.read_text())
    changed = json.loads(GOLDEN.read_text())
    changed["layout"]["pp"] += 1
    changed["predictions"]["step"]["step_time_s"] *= 1 + 1e-9
    del changed["inputs_sha256"]
    assert sorted(_differences(changed, golden)) == [
        ".inputs_sha256: missing",
        f".layout.pp: {golden['layout']['pp'] + 1} != golden {golden['layout']['pp']}",
        f".predictions.step.step_time_s: {changed['predictions']['step']['step_time_s']!r} != golden "
        f"{golden['predictions']['step']['step_time_s']!r}",
    ]
