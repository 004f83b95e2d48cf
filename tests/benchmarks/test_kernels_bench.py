"""benchmarks/kernels_bench.py's results table, rendered on the CPU from one dense and one grouped row."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_bench.py"
spec = importlib.util.spec_from_file_location("kernels_bench", BENCH)
kernels_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels_bench)


def _entry(tflops, graph=None, err=1.7e-3):
    entry = {"tflops": tflops, "ms": 1.0, "rel_err": err}
    if graph is not None:
        entry["tflops_graph"] = graph
    return entry


def _case(gluon, torch_, width):
    return {"ours": _entry(900.0), "gluon": gluon, "scaled_mm": torch_, "auto": "gluon", "gluon_width": width}


def test_render_reports_widths_graph_times_and_refusals():
    refused = {"error": "the Gluon kernel needs Hopper"}
    dense = [{"M": 4096, "N": 7168, "K": 16384,
              "forward": dict(_case(_entry(1166.0, 1153.0), _entry(1124.0, 1141.0), "256"), bf16_matmul=_entry(699.0),
                              auto_run=_entry(1120.0, 1150.0)),
              "dgrad": _case(_entry(1163.0, 1160.0), _entry(1144.0, 1140.0), "256"),
              "wgrad": _case(refused, _entry(871.0, 870.0), None)}]
    grouped = [{"groups": 4, "m_per_group": 8192, "N": 4096, "K": 7168, "ours_fp8": _entry(499.0),
                "gluon_fp8": _entry(1132.0), "scaled_mm_loop": _entry(1111.0), "auto_fp8": _entry(1122.0),
                "auto": "gluon", "ours_bf16": _entry(576.0), "grouped_mm_bf16": _entry(646.0),
                "scaled_mm_loop_sync": _entry(1057.0)}]
    memory = {"quant_gbps": {"act_1x128": 1450.0}, "permute_gbps": {}, "swiglu_gbps": {},
              "fused_us": {"swiglu+quant fused": 153.4}}
    meta = {"date": "2026-12-01 18:04 UTC", "device": "NVIDIA H200", "sms": 132, "torch": "2.11", "triton": "3.6",
            "command": "python benchmarks/kernels_bench.py"}
    text = kernels_bench.render(meta, dense, grouped, memory, [])
    assert "| 7168×16384 | 900 | 1166 [256] | 1.7e-03 | 1124 |" in text
    assert "| 7168×16384 | 1153 | 1141 | 1.01 | 1150 |" in text  # the CUDA-graph table: GPU time alone
    # the auto dispatch's own call, against the fastest backend of the row (Gluon's 1166)
    assert f"| 699 | 1120 (gluon) | {1120 / 1166:.2f} |" in text
    assert "| 4 × 8192 | 4096×7168 | 499 | 1132 | 1.7e-03 | 1111 | 1122 (gluon) |" in text
    assert f"{1122 / 646:.2f} |" in text
    assert kernels_bench._fmt(refused) == "n/a"
    del dense[0]["forward"]["auto_run"]  # a record from before the auto call was timed
    assert "| 699 | n/a (gluon) | nan |" in kernels_bench.render(meta, dense, grouped, memory, [])
