"""GEMMs beside communication (issue 21, capability 7): wave quantisation on the SMs left, and the
measured interference term, 0 until measured."""

from __future__ import annotations

import pytest

from moeplan.simulator.costs.beside_comm import (
    BesidePoint,
    beside_comm_factor,
    gemm_tiles,
    interference_frac,
    wave_ratio,
)
from moeplan.simulator.costs.kernels import gemm_s
from moeplan.simulator.costs.tables import NAMED_TABLES, default_tables, named_tables
from moeplan.simulator.presets.clusters import h800_gpu


def test_tiles_hand_computed():
    assert gemm_tiles(4096, 7168) == 32 * 56
    assert gemm_tiles(100, 129) == 1 * 2
    assert gemm_tiles(512, 4096, groups=4) == 4 * 4 * 32


def test_wave_ratio_hand_computed():
    # 1792 tiles: 14 waves on 132 SMs (13.58), 16 on 112 (16.0): 16 / 14, less than the linear 132 / 112
    assert wave_ratio(1792, 132, 112) == pytest.approx(16 / 14)
    assert wave_ratio(100, 132, 112) == 1.0  # one wave either way: nothing lost
    assert wave_ratio(120, 132, 112) == 2.0  # just past the SMs left: a second wave
    assert wave_ratio(1792, 132, 132) == 1.0


def test_big_gemm_tends_to_the_linear_share():
    assert wave_ratio(10**6, 132, 112) == pytest.approx(132 / 112, rel=1e-3)


def test_gemm_s_uses_waves_not_the_linear_share():
    gpu, t = h800_gpu(), default_tables("H800")
    frac = 112 / 132
    full = gemm_s(t, gpu, "fp8", 4096, 7168, 16384)
    assert gemm_s(t, gpu, "fp8", 4096, 7168, 16384, compute_frac=frac) == pytest.approx(full * 16 / 14)
    small = gemm_s(t, gpu, "bf16", 128, 4096, 7168)  # 32 tiles: fits the 112 SMs left
    assert gemm_s(t, gpu, "bf16", 128, 4096, 7168, compute_frac=frac) == pytest.approx(small)


def _point(beside_s: float, comm_sms: int = 20) -> BesidePoint:
    return BesidePoint(m=4096, n=7168, k=7168, sm_count=132, comm_sms=comm_sms, alone_s=1.0, beside_s=beside_s,
                       source="test")


def test_interference_is_the_slowdown_beyond_waves():
    assert _point(16 / 14).interference_frac == pytest.approx(0.0)
    assert _point(16 / 14 * 1.1).interference_frac == pytest.approx(0.1)


def test_no_measurement_no_interference():
    assert interference_frac((), 20) == 0.0
    for name in NAMED_TABLES:
        assert named_tables(name, "H800").compute_beside_comm == ()  # packaged tables: nothing measured yet


def test_measured_interference_slows_the_gemm():
    pts = (_point(16 / 14 * 1.1), _point(20 / 14 * 1.3, comm_sms=40))  # 1792 tiles: 20 waves on 92 SMs
    assert interference_frac(pts, 20) == pytest.approx(0.1)  # the nearest comm_sms only
    assert interference_frac(pts, 30) == pytest.approx(0.2)  # equally near: their mean
    assert beside_comm_factor(pts, 4096, 7168, 1, 132, 112) == pytest.approx(16 / 14 * 1.1)
    gpu = h800_gpu()
    t = default_tables("H800")
    measured = t.model_copy(update={"compute_beside_comm": pts})
    assert (gemm_s(measured, gpu, "fp8", 4096, 7168, 16384, compute_frac=112 / 132)
            == pytest.approx(1.1 * gemm_s(t, gpu, "fp8", 4096, 7168, 16384, compute_frac=112 / 132)))


def test_linear_share_is_kept_for_sensitivity_studies():
    gpu = h800_gpu()
    t = default_tables("H800")
    linear = t.model_copy(update={"gemm_sm_share": "linear"})
    full = gemm_s(t, gpu, "bf16", 128, 4096, 7168)
    assert gemm_s(linear, gpu, "bf16", 128, 4096, 7168, compute_frac=112 / 132) == pytest.approx(full * 132 / 112)
