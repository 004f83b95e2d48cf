"""benchmarks/gpu_gaps.py on a hand-built trace: every idle gap inside a step is charged to the host op whose
launch released the kernel after it, with its module; blocking host calls are listed with their op."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "gpu_gaps.py"
spec = importlib.util.spec_from_file_location("gpu_gaps", BENCH)
gpu_gaps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_gaps)


def X(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def trace():
    # a step of 100 us; the GPU runs [10, 30), [30, 50) (no gap), [80, 90); the host syncs in the expert module
    return {"traceEvents": [
        X("user_annotation", "moeplan::step", 0, 100),
        X("cpu_op", "nn.Module: Attention_0", 1, 20),
        X("cpu_op", "aten::mm", 2, 5),
        X("cuda_runtime", "cudaLaunchKernel", 3, 2, correlation=1),
        X("cpu_op", "aten::add", 8, 2),
        X("cuda_runtime", "cudaLaunchKernel", 8.5, 1, correlation=2),
        X("cpu_op", "nn.Module: GroupedExperts_0", 30, 60),
        X("cpu_op", "aten::item", 31, 40),
        X("cuda_runtime", "cudaStreamSynchronize", 32, 38),
        X("cuda_runtime", "cudaMemcpyAsync", 72, 1),  # a copy's call that returns at once: not blocking
        X("cpu_op", "moe_gemm", 75, 4),
        X("cuda_driver", "cuLaunchKernelEx", 76, 1, correlation=3),
        X("kernel", "gemm", 10, 20, tid=7, correlation=1),
        X("kernel", "add", 30, 20, tid=7, correlation=2),
        X("kernel", "triton_moe", 80, 10, tid=7, correlation=3),
    ]}


def test_gaps_are_charged_to_the_launching_op_and_its_module():
    s = gpu_gaps.gap_summary(trace(), min_us=2)
    assert s["windows"] == 1 and s["wall_us"] == 100 and s["busy_us"] == 50 and s["idle_us"] == 50
    by = {r["op"]: r["us"] for r in s["idle_by_op_us"]}
    assert by == {"(step start) aten::mm [Attention_0]": 10, "moe_gemm [GroupedExperts_0]": 30, "(step end)": 10}
    assert s["blocking_host_calls_us"] == [{"call": "cudaStreamSynchronize in aten::item [GroupedExperts_0]",
                                            "us": 38.0, "calls": 1}]
    assert s["idle_by_size_us"] == {"<20us": 10, "<100us": 30}


def test_small_gaps_are_not_charged_and_a_trace_without_steps_fails():
    assert gpu_gaps.gap_summary(trace(), min_us=40)["idle_by_op_us"] == []
    with pytest.raises(ValueError, match="moeplan::step"):
        gpu_gaps.gap_summary({"traceEvents": trace()["traceEvents"][1:]})


def test_command_line_prints_the_summary_and_rejects_a_bad_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace()))
    res = subprocess.run([sys.executable, "-P", str(BENCH), str(path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "moe_gemm [GroupedExperts_0]" in res.stdout and "idle 0.05 ms" in res.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    res = subprocess.run([sys.executable, "-P", str(BENCH), str(bad)], capture_output=True, text=True, check=False)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "bad.json" in res.stderr
