"""``moeplan placement`` in-process through the ``moeplan`` app: outputs, --current round trip, bad input
(exit 2, nothing written)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.placement import ExpertPlacement

BASE = ["placement", "--model", "tiny-moe", "--cluster", "h800", "--nodes", "2", "--tokens-per-gpu", "128"]


def _run(*args: str):
    return CliRunner().invoke(app, [*BASE, *args])


def test_writes_maps_summary_and_self_contained_figures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run("--zipf", "1.0", "--redundant", "16", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["placement.html", "placement.json", "summary.json", "traffic.html"]
    placement = ExpertPlacement.model_validate_json((out / "placement.json").read_text())
    assert placement.slots_per_gpu == [2] * 16 and placement.layer_ids == [1, 2, 3]  # tiny-moe: layer 0 is dense
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["gpu_max_over_mean"] < summary["before"]["gpu_max_over_mean"]
    assert summary["traffic_after"]["all_to_all_s"] < summary["traffic_before"]["all_to_all_s"]
    for name in ("placement.html", "traffic.html"):
        html = (out / name).read_text()
        assert not re.search(r"<script[^>]*src=", html) and "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js inlined


def test_same_seed_same_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert _run("--zipf", "0.8", "--redundant", "16", "--seed", "4", "--out", str(tmp_path / name)).exit_code == 0
    for name in ("placement.json", "summary.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_load_file_and_current_placement_round_trip(tmp_path: Path) -> None:
    load = tmp_path / "load.json"
    counts = [[(7 * layer + 3 * e) % 11 + (40 if e == layer else 0) for e in range(16)] for layer in (1, 2, 3)]
    load.write_text(json.dumps({
        "schema_version": 1, "model": "tiny-moe", "n_routed_experts": 16, "num_experts_per_tok": 4,
        "window_tokens": 1000, "layers": [{"layer": i, "tokens_per_expert": c} for i, c in zip((1, 2, 3), counts)],
    }))
    first = tmp_path / "first"
    assert _run("--load", str(load), "--redundant", "16", "--out", str(first)).exit_code == 0
    second = tmp_path / "second"
    result = _run("--load", str(load), "--redundant", "16", "--current", str(first / "placement.json"), "--out", str(second))
    assert result.exit_code == 0, result.output
    migration = json.loads((second / "summary.json").read_text())["migration"]
    assert migration["intra_node_moves"] + migration["cross_node_moves"] == 0  # already balanced: nothing moves


def _bad_load(tmp_path: Path) -> str:
    path = tmp_path / "bad-load.json"
    path.write_text(json.dumps({
        "schema_version": 1, "model": "tiny-moe", "n_routed_experts": 16, "num_experts_per_tok": 4,
        "window_tokens": 10, "layers": [{"layer": 1, "tokens_per_expert": [1] * 15 + [-5]}],
    }))
    return str(path)


def _malformed(tmp_path: Path) -> str:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    return str(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "tiny-moe", "--zipf", "-1"], "--zipf -1.0: must be a finite exponent in 0..50"),
        (["--zipf", "nan"], "Invalid value for '--zipf': 'nan' is not a finite number"),
        (["--zipf", "1e309"], "Invalid value for '--zipf': '1e309' is not a finite number"),
        (["--tolerance", "inf"], "Invalid value for '--tolerance': 'inf' is not a finite number"),
        (["--redundant", "1000000"], "--redundant 1000000: must be >= 0 and at most 16384"),
        (["--tokens-per-gpu", "99999999999999"], "--tokens-per-gpu 99999999999999: must be in 1..65536"),
        (["--seed", "-1"], "--seed -1: must be in 0..2"),
        (["--redundant", "-3"], "--redundant -3: must be >= 0"),
        (["--redundant", "200"], "slots per GPU=14 exceed the 8 experts"),
        (["--nodes", "3"], "num_gpus=24 exceeds num_logical_experts=16"),
        (["--model", "gpt-5"], "--model 'gpt-5': unknown preset"),
        (["--model", "tiny-dense"], "has no routed experts"),
        (["--cluster", "tpu"], "--cluster 'tpu': unknown preset"),
        (["--policy", "nodes"], "policy='nodes' must be one of"),
        (["--zipf", "1", "--load", "x.json"], "--load and --zipf: give one expert-load source, not both"),
        (["--nodes", "0"], "--nodes 0: must be a positive number of nodes"),
        (["--tokens-per-gpu", "0"], "--tokens-per-gpu 0: must be in 1..65536"),
        (["LOAD_BAD"], r"tokens_per_expert\[15\]=-5 must be >= 0"),
        (["LOAD_MALFORMED"], "malformed JSON"),
        (["--load", "missing.json"], "--load missing.json: cannot read"),
        (["--current", "missing.json"], "--current missing.json: cannot read"),
        (["--tolerance", "-0.5", "--current", "CURRENT"], "--tolerance -0.5: must be a fraction >= 0"),
    ],
)
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(tmp_path: Path, args, message) -> None:
    if args == ["LOAD_BAD"]:
        args = ["--load", _bad_load(tmp_path)]
    if args == ["LOAD_MALFORMED"]:
        args = ["--load", _malformed(tmp_path)]
    if "CURRENT" in args:
        assert _run("--out", str(tmp_path / "first")).exit_code == 0
        args = [str(tmp_path / "first" / "placement.json") if a == "CURRENT" else a for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*BASE, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeplan: error: "), result.output
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()
