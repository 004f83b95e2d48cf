"""calibrate's memory-class rows as table points: a class with backward bytes only (``expert_cast``: the routed
experts' FP8 backward casts) is kept, at its backward's fraction for both passes; fitted fixed seconds go along."""

from __future__ import annotations

from moeplan.orchestrator.calibration.tables_out import _memory_point
from moeplan.simulator.costs.memory_kernels import MemoryKernelPoint


def _pass(frac: float, s: float) -> dict:
    return {"bytes": 1e9, "s": s, "bytes_per_s": 1e9 / s, "hbm_frac": frac}


def test_a_backward_only_class_takes_its_backward_fraction():
    row = {"kernel": "expert_cast", "implementation": "quant_act_both", "shape": "8 rows", "fwd": None,
           "bwd": _pass(0.42, 7e-4)}
    point = MemoryKernelPoint.model_validate(_memory_point(row, "[cal]"))
    assert (point.fwd_frac, point.bwd_frac) == (0.42, 0.42)
    assert "700.0 us backward only" in point.source


def test_a_class_with_both_passes_keeps_each_and_caps_at_one():
    row = {"kernel": "rms_norm", "implementation": "F.rms_norm", "shape": "4096 x 7168", "fwd": _pass(1.3, 1e-4),
           "bwd": _pass(0.3, 2e-4)}
    point = MemoryKernelPoint.model_validate(_memory_point(row, "[cal]"))
    assert (point.fwd_frac, point.bwd_frac) == (1.0, 0.3) and "100.0 us forward" in point.source


def test_the_fitted_fixed_seconds_go_into_the_point():
    row = {"kernel": "router", "implementation": "Gate.route", "shape": "64 x 16", "small_tokens": 16,
           "fwd": _pass(0.01, 1e-4) | {"fixed_s": 6e-5}, "bwd": _pass(0.02, 2e-4) | {"fixed_s": 0.0}}
    point = MemoryKernelPoint.model_validate(_memory_point(row, "[cal]"))
    assert (point.fwd_fixed_s, point.bwd_fixed_s) == (6e-5, 0.0) and "fitted with 16 tokens" in point.source
