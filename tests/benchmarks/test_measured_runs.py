"""The measured runs that docs/results/validation.md lists (``benchmarks/measured_runs.json``): each names a page that
exists and holds its measured figure, and the section's verdict follows the figures."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "benchmarks" / "measured_runs.json"


def test_every_run_names_a_page_that_holds_its_measured_step() -> None:
    runs = json.loads(RUNS.read_text())["runs"]
    assert runs
    for r in runs:
        page = (ROOT / r["page"]).read_text()
        ms = r["measured_s"] * 1e3
        # the page gives the step in seconds (check's table) or in ms (the loops' and model_step's pages)
        shown = {f"{r['measured_s']:.4f}", f"{ms:.1f}", f"{ms:.2f}"}
        assert any(s in page for s in shown), (r["run"], shown)
        assert r["measured_s"] > 0 and (r["calibrated_s"] is None or r["calibrated_s"] > 0)


def test_the_section_judges_the_largest_calibrated_error() -> None:
    own_runs = runpy.run_path(str(ROOT / "benchmarks" / "validate_v3.py"))["own_runs"]
    text = "\n".join(own_runs())
    assert "met" in text and "| run |" in text
    worst = max((r["calibrated_s"] / r["measured_s"] - 1 for r in json.loads(RUNS.read_text())["runs"]
                 if r["calibrated_s"] is not None), key=abs)
    assert f"Largest calibrated error here: {worst:+.1%}: {'met' if abs(worst) <= 0.05 else 'not met'}" in text
