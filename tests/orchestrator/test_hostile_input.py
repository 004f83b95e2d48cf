"""The cases of issue 23, one by one: each is refused with one line naming the field and the value, exit
code 2, within two seconds, nothing written; or accepted with a note saying what was assumed.
(``test_fuzz.py`` drives the same promises with random input.)"""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.orchestrator.inputs import MAX_PHASES
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.presets.models import tiny_moe
from tests.orchestrator.fuzz_inputs import gc_paused

TINY = ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--out", "{d}/o"]
CONFIG = json.dumps(tiny_moe().to_hf_config())
CALIBRATION = default_tables("H200-SXM").model_dump(mode="json")


def _config(**update) -> str:
    return json.dumps({**json.loads(CONFIG), **update})


def _calibration(**update) -> str:
    return json.dumps({**CALIBRATION, **update})


def _phases(count: int) -> str:
    """``count`` training phases as JSON, at three sequence lengths."""
    return json.dumps([{"name": f"p{i}", "steps": 100, "global_batch_seqs": 64, "seq_len_tokens": 512 << i % 3}
                       for i in range(count)])


BINARY, LATIN1, DEEP = bytes(range(256)), '{"name": "café"}'.encode("latin-1"), "[" * 100_000 + "]" * 100_000

# (arguments with {d} for the test's folder, files made first, a fragment of the one line)
CASES = {
    # output paths
    "--out too long": ([*TINY[:-1], "{d}/" + "x" * 300], {}, "cannot use (File name too long)"),
    "--trace a device": ([*TINY, "--trace", "/dev/null"], {}, "--trace /dev/null: is not a regular file"),
    # where nothing can be made (root ignores modes; /proc and /sys refuse): refused before the work (2026-12-06:
    # `check --recalibrate /proc/x/out` compared the run and drew its page first)
    "--out in /proc": ([*TINY[:-1], "/proc/moeplan-hostile/o"], {}, "--out /proc/moeplan-hostile/o: cannot write in /proc"),
    "--trace in /sys": ([*TINY, "--trace", "/sys/kernel/t.json"], {}, "--trace /sys/kernel/t.json: cannot write in /sys"),
    "--out 2,000 folders deep": ([*TINY[:-1], "{d}/" + "d/" * 2000 + "o"], {}, "needs 2001 new folders; at most 64"),
    "--out with a NUL byte": ([*TINY[:-1], "{d}/o\x00", "--no-search"], {}, "o\\x00': a path cannot hold a NUL byte"),
    "--trace 2,000 folders deep": ([*TINY, "--trace", "{d}/" + "d/" * 2000 + "t.json"], {}, "needs 2000 new folders"),
    "check --recalibrate-from before the run": (  # was read after the traces and torch's import (2.6 s CPU)
        ["check", "{d}/no-run", "--recalibrate", "{d}/n.json", "--recalibrate-from", "{d}/f.json"], {"f.json": "{}"},
        "--recalibrate-from {d}/f.json: "),
    "schedule --out in /proc": (["schedule", "--kind", "1f1b", "--pp", "2", "--microbatches", "4", "--out",
                                 "/proc/moeplan-hostile/s.csv"], {}, "cannot write in /proc"),
    "schedule --out too long": (["schedule", "--kind", "1f1b", "--pp", "2", "--microbatches", "4", "--out",
                                 "{d}/" + "y" * 300 + ".csv"], {}, "cannot use (File name too long)"),
    # unreadable files
    "binary config": ([*TINY[:2], "{d}/m/config.json", *TINY[3:]], {"m/config.json": BINARY}, "not UTF-8 text"),
    "latin-1 config": ([*TINY[:2], "{d}/m/config.json", *TINY[3:]], {"m/config.json": LATIN1}, "not UTF-8 text"),
    "deep config": ([*TINY[:2], "{d}/m/config.json", *TINY[3:]], {"m/config.json": DEEP}, "nested deeper than 32"),
    "binary plan": (["show", "{d}/plan.json"], {"plan.json": BINARY}, "{d}/plan.json: not UTF-8 text"),
    "deep plan": (["show", "{d}"], {"plan.json": DEEP}, "{d}/plan.json: nested deeper than 32 levels"),
    "endless plan": (["show", "/dev/zero"], {}, "/dev/zero: larger than 64 MiB"),
    "binary load": ([*TINY, "--load", "{d}/l.json"], {"l.json": BINARY}, "--load {d}/l.json: not UTF-8 text"),
    "deep load": ([*TINY, "--load", "{d}/l.json"], {"l.json": DEEP}, "--load {d}/l.json: nested deeper than 32"),
    "latin-1 calibration": ([*TINY, "--calibration", "{d}/c.json"], {"c.json": LATIN1}, "--calibration {d}/c.json: not"),
    "deep calibration": ([*TINY, "--calibration", "{d}/c.json"], {"c.json": DEEP}, "nested deeper than 32 levels"),
    # numbers
    "--tokens 1.2.3": ([*TINY, "--tokens", "1.2.3"], {}, "--tokens '1.2.3': expected a number such as 14.8T"),
    "--tokens .": ([*TINY, "--tokens", "."], {}, "--tokens '.': expected a number"),
    "--budget-gpu-hours 1.2.3": ([*TINY, "--budget-gpu-hours", "1.2.3"], {}, "--budget-gpu-hours '1.2.3': expected"),
    "--tokens huge": ([*TINY, "--tokens", "9" * 400], {}, "--tokens '999"),
    "--budget-gpu-hours 1e999": ([*TINY, "--budget-gpu-hours", "1e999"], {}, "--budget-gpu-hours '1e999': too large"),
    "--virtual-stages huge": (["schedule", "--kind", "interleaved", "--pp", "2", "--microbatches", "4",
                               "--virtual-stages", "99999999999"], {}, "virtual_stages: Input should be less than"),
    "--tokens-per-gpu huge": (["placement", "--model", "tiny-moe", "--cluster", "h800", "--nodes", "1",
                               "--tokens-per-gpu", "99999999999999", "--out", "{d}/p"], {}, "--tokens-per-gpu 9999"),
    "--zipf nan": ([*TINY, "--zipf", "nan"], {}, "Invalid value for '--zipf': 'nan' is not a finite number"),
    "--zipf inf": ([*TINY, "--zipf", "inf"], {}, "Invalid value for '--zipf': 'inf' is not a finite number"),
    "--zipf 1e309": ([*TINY, "--zipf", "1e309"], {}, "'1e309' is not a finite number"),
    "--zipf nan with EP": ([*TINY, "--zipf", "nan", "--ep", "8"], {}, "'nan' is not a finite number"),
    "--price-per-gpu-hour inf": ([*TINY, "--price-per-gpu-hour", "inf"], {}, "'inf' is not a finite number"),
    "--f-s nan": (["schedule", "--kind", "1f1b", "--pp", "2", "--microbatches", "4", "--f-s", "nan"], {},
                  "Invalid value for '--f-s': 'nan' is not a finite number"),
    "--w-s 1e309": (["schedule", "--kind", "1f1b", "--pp", "2", "--microbatches", "4", "--w-s", "1e309"], {},
                    "'1e309' is not a finite number"),
    "--b-s huge": (["schedule", "--kind", "1f1b", "--pp", "2", "--microbatches", "4", "--b-s", "1e300"], {},
                   "--b-s 1e+300: must be at most 1e+06 seconds"),
    "--redundant-experts 1000000": ([*TINY, "--redundant-experts", "1000000"], {}, "--redundant-experts 1000000: must be"),
    "--redundant-experts too many for the EP group": (
        [*TINY, "--no-search", "--ep", "2", "--redundant-experts", "17"], {},
        "--redundant-experts 17 at ep=2: slots per GPU=17 exceed the 16 experts a node holds"),
    # meaning
    "tp past a micro-batch's tokens": ([*TINY, "--no-search", "--tp", "2", "--sp", "--seq-len", "1"], {},
                                       "tp=2 exceeds the 1 token(s) of a micro-batch (micro_batch_size=1 x seq_len"),
    "--tokens 1e-30": ([*TINY, "--tokens", "1e-30"], {}, "training.phases.0.tokens=1e-30 is less than one step"),
    "redundant experts on a dense model": (
        ["plan", "--model", "deepseek-67b", "--cluster", "h100", "--nodes", "4", "--redundant-experts", "4",
         "--out", "{d}/o"], {}, "--redundant-experts 4: deepseek-67b has no routed experts"),
    # types
    "hidden_size true": ([*TINY[:2], "{d}/m/config.json", *TINY[3:]], {"m/config.json": _config(hidden_size=True)},
                         "hidden_size: Input should be a valid integer (got True)"),
    "rope_scaling a string": ([*TINY[:2], "{d}/m/config.json", *TINY[3:]],
                              {"m/config.json": _config(rope_scaling="yarn")},
                              "rope_scaling: Input should be a valid dictionary or instance of RopeScaling (got 'yarn')"),
    "--set parallel={...}": ([*TINY, "--set", 'parallel={{"pp": 3}}'], {}, "pp=3 does not divide the cluster's 8 GPUs"),
    "--set NaN": ([*TINY, "--set", "budget.gpu_hours=NaN"], {}, "budget.gpu_hours: Input should be a valid number"),
    "comm_sms of every SM": ([*TINY, "--no-search", "--ep", "8", "--calibration", "{d}/c.json"],
                             {"c.json": _calibration(comm_sms=132)}, "comm_sms=132 must leave compute at least one"),
    "comm_sms beyond the GPU": ([*TINY, "--calibration", "{d}/c.json"], {"c.json": _calibration(comm_sms=1000)},
                                "comm_sms=1000 must leave compute at least one of the GPU's sm_count=132 SMs"),
    "calibration without FP8 GEMMs": ([*TINY, "--calibration", "{d}/c.json"],
                                      {"c.json": _calibration(gemm=[g for g in CALIBRATION["gemm"]
                                                                    if g["precision"] == "bf16"])},
                                      "gemm: has no fp8 point; the tables need GEMM throughput for bf16 and fp8"),
    "placement groups that do not divide the experts": (
        ["placement", "--model", "tiny-moe", "--cluster", "h800", "--nodes", "1", "--current", "{d}/p.json",
         "--out", "{d}/o"], {"p.json": json.dumps({"policy": "global", "num_logical_experts": 16, "num_groups": 3,
                                                   "num_nodes": 1, "slots_per_gpu": [2] * 8, "layer_ids": [1],
                                                   "phy2log": [list(range(16))]})},
        "num_groups=3 must divide num_logical_experts=16"),
    "a GPU with no SM left for compute": ([*TINY, "--set", "cluster.gpu.sm_count=20"], {},
                                          "cost tables 'h200-default': comm_sms=20 must leave compute at least one"),
    "reserved memory beyond the GPU's": ([*TINY, "--set", "cluster.gpu.hbm_bytes=1"], {},
                                         "node.memory_reserved_bytes=2147483648 leaves none of gpu.hbm_bytes=1"),
    "NaN in a calibration": ([*TINY, "--calibration", "{d}/c.json"],
                             {"c.json": _calibration(memory_frac="@").replace('"@"', "NaN")}, "NaN is not a JSON number"),
    # slow paths
    "--microbatches huge": ([*TINY, "--microbatches", "99999999999999999999999"], {}, "parallel.microbatches"),
    "schedule of 6.4e9 passes": (["schedule", "--kind", "1f1b", "--pp", "64", "--microbatches", "99999999"], {},
                                 "microbatches: Input should be less than or equal to 131072 (got 99999999)"),
    "more training phases than a plan holds": (  # each is planned on its own: 1,500 took minutes (2026-12-06)
        [*TINY, "--set", "training.phases=" + _phases(MAX_PHASES + 1).replace("{", "{{").replace("}", "}}")], {},
        f"training.phases: {MAX_PHASES + 1} phases; at most {MAX_PHASES} (each phase is planned on its own)"),
    "more training phases through training={...}": (
        ["calibrate", "--model", "tiny-moe", "--cluster", "cpu", "--out", "{d}/c.json", "--set",
         ('training={"phases": ' + _phases(1000) + "}").replace("{", "{{").replace("}", "}}")], {},
        f"training.phases: 1,000 phases; at most {MAX_PHASES}"),
    "schedule past the size bound": (["schedule", "--kind", "interleaved", "--pp", "64", "--virtual-stages", "64",
                                      "--microbatches", "128"], {}, "more than the 131,072 a schedule may hold"),
}


@pytest.mark.parametrize("case", CASES)
def test_issue_23_case(tmp_path, case):
    args, files, message = CASES[case]
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with gc_paused():
        start = time.perf_counter()
        res = CliRunner().invoke(app, [a.format(d=tmp_path) for a in args])
        seconds = time.perf_counter() - start
    assert res.exit_code == 2 and res.stdout == "", res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplan: error: "), res.stderr
    assert message.format(d=tmp_path) in lines[0], lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert seconds < 2.0, f"refused after {seconds:.1f} s"


def test_what_was_assumed_is_a_note(tmp_path):
    """Inputs that disagree without being unusable: the plan is made, and stderr says what it assumed."""
    res = CliRunner().invoke(app, ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search",
                                   "--pp", "2", "--microbatches", "4", "--global-batch", "64", "--seq-len", "2048",
                                   "--redundant-experts", "2", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.stderr
    json.loads(res.stdout)
    assert res.stderr.splitlines() == [
        ("moeplan: note: microbatches=4 x dp=4 x micro_batch_size=1 = 16 sequences per step, not global_batch_seqs=64: "
         "the step shown is simulated at 4 micro-batches; the run is priced at 64 sequences per step on its step line"),
        ("moeplan: note: sequences of 2,048 tokens exceed tiny-moe's max_position_embeddings=1,024: planned as given "
         "(as if its positions were extended)"),
        "moeplan: note: --redundant-experts 2 has no effect at ep=1 (no expert parallelism)",
    ]


def test_fused_kernels_on_a_cpu_cluster_are_a_note(tmp_path):
    """The plan prices what the inputs say; on a CPU the runtime runs the eager kernels and the chunked loss."""
    args = ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--no-search", "--pp", "2", "--seq-len", "64"]
    res = CliRunner().invoke(app, [*args, "--set", "training.kernels.fusion=fused", "--set",
                                   "training.kernels.loss=fused", "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.stderr
    assert res.stderr.splitlines() == [
        ("moeplan: note: training.kernels.fusion=fused and training.kernels.loss=fused on a cpu cluster: priced as "
         "fused kernels, but the runtime runs the eager ones there (compiled and Triton kernels are for GPUs), so a "
         "launch is slower than planned")]
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "e")])
    assert plain.exit_code == 0 and plain.stderr == ""
    on_gpu = CliRunner().invoke(app, ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search",
                                      "--pp", "2", "--seq-len", "64", "--set", "training.kernels.loss=fused", "--out",
                                      str(tmp_path / "g")])
    assert on_gpu.exit_code == 0 and on_gpu.stderr == ""


def test_as_many_phases_as_the_bound_are_planned(tmp_path):
    res = CliRunner().invoke(app, [*TINY[:-1], str(tmp_path / "o"), "--no-search", "--json", "--set",
                                   "training.phases=" + _phases(MAX_PHASES)])
    assert res.exit_code == 0, res.stderr
    assert len(json.loads((tmp_path / "o" / "plan.json").read_text())["inputs"]["training"]["phases"]) == MAX_PHASES


def test_a_one_token_sequence_is_planned(tmp_path):
    """The search skips TP layouts whose ranks would route no token (it ended in a ValueError, exit 3, from the
    all-to-all model: found by a generated hostile set, 2026-12-06)."""
    res = CliRunner().invoke(app, ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--seq-len", "1",
                                   "--global-batch", "1", "--tokens", "100M", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["tp"] == 1


def test_names_from_files_cannot_drive_the_terminal(tmp_path):
    """A name with rich markup or a terminal escape sequence is printed spelled out, not obeyed."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(_config(name="x[/b]\x1b[2J\x1b]0;title\x07"))
    res = CliRunner().invoke(app, ["plan", "--model", str(tmp_path / "m" / "config.json"), "--cluster", "h200",
                                   "--nodes", "1", "--no-search", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.stderr
    assert "\x1b" not in res.stdout + res.stderr and "x[/b]\\x1b[2J\\x1b]0;title\\x07 on 8 x H200-SXM" in res.stdout


# Every option that names where a command writes, given an empty value (typer alone reads it as the current folder:
# `plan --out ''` wrote plan.json there; `schedule` and `calibrate` refused it for another reason, as `.`).
EMPTY_OUT = {
    "plan --out": ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--out", ""],
    "plan --trace": ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--out", "o", "--trace", ""],
    "schedule --out": ["schedule", "--kind", "1f1b", "--pp", "2", "--microbatches", "4", "--out", ""],
    "placement --out": ["placement", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--out", ""],
    "manifests --out": ["manifests", "plan.json", "--out", ""],
    "calibrate --out": ["calibrate", "--model", "tiny-moe", "--cluster", "cpu", "--out", ""],
    "launch --run-dir": ["launch", "plan.json", "--run-dir", ""],
    "launch --resume": ["launch", "--resume", ""],
    "check --recalibrate": ["check", "run", "--recalibrate", ""],
}


@pytest.mark.parametrize("case", EMPTY_OUT)
def test_an_empty_output_path_is_refused(tmp_path, monkeypatch, case):
    """``--out ''`` is refused by every command, one line naming the option (``--out .`` is the current folder)."""
    monkeypatch.chdir(tmp_path)  # where an empty path would have written
    res = CliRunner().invoke(app, EMPTY_OUT[case])
    assert res.exit_code == 2 and res.stdout == "", res.output
    option = case.split()[1]
    line = f"moeplan: error: moeplan {case.split()[0]}: Invalid value for '{option}': '' is an empty path"
    assert res.stderr.splitlines() == [line + " (for the current folder, give .)"], res.stderr
    assert list(tmp_path.iterdir()) == []
