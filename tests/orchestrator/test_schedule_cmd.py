"""``moeplan schedule`` in-process with typer's CliRunner, through the ``moeplan`` app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.schedules import make_schedule, schedule_to_torch_csv

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["schedule", *args])


def test_json_report_keys_and_values() -> None:
    result = _run("--kind", "dualpipev", "--pp", "4", "--microbatches", "10", "--fb-s", "2.5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "dualpipev"
    assert (report["pp"], report["stages"], report["microbatches"]) == (4, 8, 10)
    assert report["bubble_s"] == pytest.approx(3 * (2.5 + 2 - 3))  # (pp-1)(F&B+B-3W), defaults F=1 B=2 W=1
    assert report["closed_form"]["holds"] is True
    assert report["closed_form"]["bubble_s"] == pytest.approx(report["bubble_s"])
    assert report["bubble_frac"] == pytest.approx(report["bubble_s"] / report["makespan_s"])
    assert report["peak_activations_per_rank"] == [9, 9, 9, 9]
    assert report["parameter_copies_per_rank"] == [2, 2, 2, 2]
    assert report["action_counts_per_rank"][0]["FB"] > 0


@pytest.mark.parametrize(("kind", "stages"), [("1f1b", 4), ("zb1p", 4), ("dualpipe", 4), ("interleaved", 8), ("dualpipev", 8)])
def test_pp_counts_ranks_for_every_kind(kind: str, stages: int) -> None:
    report = json.loads(_run("--kind", kind, "--pp", "4", "--microbatches", "8", "--json").stdout)
    assert report["pp"] == 4 and len(report["idle_s_per_rank"]) == 4
    assert report["stages"] == stages


def test_interleaved_virtual_stages_option() -> None:
    result = _run("--kind", "interleaved", "--pp", "2", "--microbatches", "4", "--virtual-stages", "3", "--json")
    assert json.loads(result.stdout)["stages"] == 6


def test_table_output_mentions_stages_and_closed_form() -> None:
    result = _run("--kind", "1f1b", "--pp", "4", "--microbatches", "8")
    assert result.exit_code == 0, result.output
    assert "4 stages" in result.stdout and "(pp-1)(F+B)" in result.stdout


def test_html_is_self_contained(tmp_path: Path) -> None:
    out = tmp_path / "timeline.html"
    result = _run("--kind", "dualpipe", "--pp", "4", "--microbatches", "8", "--out", str(out))
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<html>" in html[:100] and "Plotly.newPlot" in html
    assert '<script src="http' not in html and len(html) > 1_000_000  # plotly.js inlined
    for name in ("F forward", "B full backward", "I backward (input)", "W backward (weights)", "F&B overlapped"):
        assert f'"name":"{name}"' in html  # one trace per action kind
    assert '"rank 3"' in html and '"rank 4"' not in html  # one row per rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline.html"]


def test_csv_is_the_torch_csv(tmp_path: Path) -> None:
    out = tmp_path / "order.csv"
    result = _run("--kind", "zb1p", "--pp", "3", "--microbatches", "5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text() == schedule_to_torch_csv(make_schedule("zb1p", 3, 5))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "gpipe", "--pp", "4", "--microbatches", "8"], "kind: Input should be '1f1b', 'interleaved'"),
        (["--kind", "gpipe", "--pp", "4", "--microbatches", "8"], "(got 'gpipe')"),
        (["--kind", "dualpipe", "--pp", "3", "--microbatches", "8"], "pp=3 must be even"),
        (["--kind", "dualpipev", "--pp", "4", "--microbatches", "6"], "microbatches=6 must be >= 2*pp=8"),
        (["--kind", "1f1b", "--pp", "0", "--microbatches", "8"], "pp: Input should be greater than 0 (got 0)"),
        (["--kind", "1f1b", "--pp", "2", "--microbatches", "8", "--w-s", "5"], "error: w_s=5.0 must be < b_s=2.0"),
        (["--kind", "1f1b", "--pp", "2", "--microbatches", "8", "--f-s", "-1"], "f_s: Input should be greater than 0 (got -1.0)"),
        (["--kind", "dualpipe", "--pp", "4", "--microbatches", "8", "--out", "{dir}/x.csv"], "kind=dualpipe has 2"),
        (["--kind", "1f1b", "--pp", "2", "--microbatches", "8", "--out", "{dir}/x.png"], "--out {dir}/x.png: must end in .html or .csv"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(args: list[str], message: str, tmp_path: Path) -> None:
    result = _run(*(a.format(dir=tmp_path) for a in args))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplan: error: ") and message.format(dir=tmp_path) in lines[0]
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    result = _run("--kind", "1f1b", "--pp", "2", "--microbatches", "2", "--out", str(blocker / "x.csv"))
    assert result.exit_code == 2
    assert result.stderr == f"moeplan: error: --out {blocker / 'x.csv'}: {blocker} is a file, not a directory\n"
    assert list(tmp_path.iterdir()) == [blocker]


def test_bad_input_leaves_an_existing_out_untouched(tmp_path: Path) -> None:
    out = tmp_path / "order.csv"
    out.write_text("old\n")
    result = _run("--kind", "dualpipev", "--pp", "4", "--microbatches", "3", "--out", str(out))
    assert result.exit_code == 2
    assert out.read_text() == "old\n" and list(tmp_path.iterdir()) == [out]
