"""The fixed seconds a call of a memory-bound class, fitted over two sizes (``memory_classes.fit_pass``,
``measure``) on synthetic timings: the exact intercept recovered, a negative one clamped at 0 (and recorded), the
fraction always giving back the main point's seconds; once-a-step cases keep one size; calibrate's host time
comes off both sizes."""

from __future__ import annotations

import pytest
import torch

from moeplan.orchestrator.calibration import memory_classes
from moeplan.orchestrator.calibration.measure import _net
from moeplan.orchestrator.calibration.memory_cases import Case
from moeplan.orchestrator.calibration.memory_classes import FIT_DIVISOR, class_bytes, fit_pass, measure
from moeplan.simulator.costs.elementwise import KernelBytes
from moeplan.simulator.presets.models import tiny_moe

HBM = 3.35e12


def _line(fixed_s: float, frac: float):
    return lambda nbytes: fixed_s + nbytes / (HBM * frac)


def _gives_back(entry: dict) -> float:
    return (entry["fixed_s"] or 0.0) + entry["bytes"] / (HBM * entry["hbm_frac"])


def test_two_points_on_a_line_give_back_its_intercept_and_fraction():
    t = _line(25e-6, 0.6)
    e = fit_pass(8e8, t(8e8), HBM, (2e8, t(2e8)))
    assert e["fixed_s"] == pytest.approx(25e-6, rel=1e-9) and e["intercept_s"] == pytest.approx(25e-6, rel=1e-9)
    assert e["hbm_frac"] == pytest.approx(0.6, rel=1e-9) and e["fixed_clamped"] is False
    assert e["bytes_per_s"] == 8e8 / t(8e8) and (e["small_bytes"], e["small_s"]) == (2e8, t(2e8))
    assert _gives_back(e) == pytest.approx(e["s"], rel=1e-12)


def test_a_negative_intercept_is_clamped_at_zero_and_the_fraction_still_gives_back_the_main_point():
    e = fit_pass(8e8, 1e-3, HBM, (2e8, 0.2e-3))  # the small point faster than in proportion: intercept -67 us
    assert e["intercept_s"] == pytest.approx(-1e-3 / 15, rel=1e-9) and e["fixed_s"] == 0.0 and e["fixed_clamped"]
    assert e["hbm_frac"] == pytest.approx(8e8 / 1e-3 / HBM) and _gives_back(e) == pytest.approx(1e-3, rel=1e-12)


def test_a_call_as_slow_at_a_quarter_is_all_fixed_seconds_its_bytes_at_the_datasheet():
    e = fit_pass(8e8, 1e-3, HBM, (2e8, 1.1e-3))  # latency-bound: the line falls, its intercept past the point
    assert e["fixed_clamped"] and e["intercept_s"] > 1e-3
    assert e["fixed_s"] == pytest.approx(1e-3 - 8e8 / HBM) and e["hbm_frac"] == pytest.approx(1.0)
    assert _gives_back(e) == pytest.approx(1e-3, rel=1e-12)


def test_one_point_is_the_fraction_alone_as_before():
    e = fit_pass(8e8, 1e-3, HBM)
    assert e["hbm_frac"] == 8e8 / 1e-3 / HBM and e["fixed_s"] is None and e["small_s"] is None


def _fake_case(kernel: str, step_bytes=None) -> Case:
    """Thunks that name their pass and tokens, for a ``median_s`` that times them off a line."""
    return Case(kernel, "synthetic", True, False, lambda m, t: f"{t} tokens",
                lambda m, t, dev: (("fwd", t), ("bwd", t)), step_bytes)


def test_measure_times_a_per_token_case_at_a_quarter_of_the_tokens_and_fits_each_pass(monkeypatch):
    m, tokens = tiny_moe(), 64
    per_token = class_bytes(m)["router"]
    lines = {"fwd": _line(40e-6, 0.05), "bwd": _line(10e-6, 0.1)}
    per_pass = {"fwd": per_token.fwd_bytes, "bwd": per_token.bwd_bytes}
    monkeypatch.setattr(memory_classes, "median_s", lambda thunk, dev, reps: lines[thunk[0]](per_pass[thunk[0]] * thunk[1]))
    e = measure(_fake_case("router"), m, tokens, torch.device("cpu"), 1, HBM)
    assert e["small_tokens"] == tokens // FIT_DIVISOR == 16
    for key, fixed_s, frac in (("fwd", 40e-6, 0.05), ("bwd", 10e-6, 0.1)):
        p = e[key]
        assert p["small_bytes"] == pytest.approx(16 * per_pass[key]) and p["bytes"] == pytest.approx(64 * per_pass[key])
        assert p["fixed_s"] == pytest.approx(fixed_s, rel=1e-9) and p["hbm_frac"] == pytest.approx(frac, rel=1e-9)


def test_a_once_a_step_case_keeps_one_size(monkeypatch):
    monkeypatch.setattr(memory_classes, "median_s", lambda thunk, dev, reps: 1e-3)
    e = measure(_fake_case("fp8_weight_quant", lambda m: KernelBytes(1e9, 0.0)), tiny_moe(), 64,
                torch.device("cpu"), 1, HBM)
    assert e["small_tokens"] is None and e["bwd"] is None
    assert e["fwd"]["fixed_s"] is None and e["fwd"]["hbm_frac"] == 1e9 / 1e-3 / HBM


def test_calibrate_takes_the_host_time_off_both_sizes_so_off_the_fixed_seconds():
    t = _line(25e-6, 0.6)
    row = {"fwd": fit_pass(8e8, t(8e8), HBM, (2e8, t(2e8))), "bwd": None}
    p = _net(row, 5e-6, 0.0, copy_peak=HBM, hbm=HBM)["fwd"]
    assert p["fixed_s"] == pytest.approx(20e-6, rel=1e-9) and p["hbm_frac"] == pytest.approx(0.6, rel=1e-9)
    assert (p["measured_s"], p["measured_small_s"], p["host_s"]) == (t(8e8), t(2e8), 5e-6)
    assert _gives_back(p) == pytest.approx(t(8e8) - 5e-6, rel=1e-12)
