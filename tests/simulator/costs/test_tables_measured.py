"""The default cost tables carry the repo's H200 kernel measurements as measured (h200-kernels.json), and
the named tables carry what their sources publish."""

import pytest

from moeplan.simulator.costs.tables import (
    _DEEPGEMM_DENSE,
    _DEEPGEMM_GROUPED,
    TFLOPS,
    default_tables,
    kernel_measurements,
    named_tables,
)


def _points(tables):
    return {(p.precision, p.m, p.n, p.k, p.groups): p for p in tables.gemm}


def test_h200_fp8_points_are_what_auto_dispatch_runs():
    pts = _points(default_tables("H200-SXM"))
    expect: dict[tuple, list[float]] = {}
    for r in kernel_measurements()["dense"]:
        M, N, K = r["M"], r["N"], r["K"]
        for kind, shape in (("forward", (M, N, K)), ("dgrad", (M, K, N)), ("wgrad", (N, K, M))):
            runs = [v["tflops"] for name, v in r[kind].items() if name in ("ours", "gluon", "scaled_mm") and "tflops" in v]
            expect.setdefault(shape, []).append(max(runs))
    assert len(expect[(4096, 7168, 4096)]) == 2  # the 4096 x 7168 linear's dgrad and wgrad share a shape
    for shape, runs in expect.items():
        assert pts[("fp8", *shape, 1)].flops_per_s == pytest.approx(sum(runs) / len(runs) * TFLOPS)
    for g in kernel_measurements()["grouped"]:
        key = ("fp8", g["m_per_group"], g["N"], g["K"], g["groups"])
        assert pts[key].flops_per_s == pytest.approx(g["auto_fp8"]["tflops"] * TFLOPS)


def test_bf16_points_are_shared_by_every_hopper_and_one_per_shape():
    for gpu in ("H800-SXM5", "H200-SXM"):
        tables = default_tables(gpu)
        keys = [(p.precision, p.m, p.n, p.k, p.groups) for p in tables.gemm]
        assert len(keys) == len(set(keys))  # the newer measurement replaces the anchor at a shared shape
        pts = _points(tables)
        for g in kernel_measurements()["grouped"]:  # grouped BF16 with its real N x K
            key = ("bf16", g["m_per_group"], g["N"], g["K"], g["groups"])
            assert pts[key].flops_per_s == pytest.approx(g["grouped_mm_bf16"]["tflops"] * TFLOPS)
    # the H800 keeps DeepSeek's own FP8 table (DeepGEMM), not our H200 kernels
    assert all("DeepGEMM" in p.source for p in default_tables("H800-SXM5").gemm if p.precision == "fp8")


def test_cutlass36_points_are_deepgemm_over_its_published_speedup():
    old = _points(named_tables("hopper-cutlass36-2024", "H800-SXM5"))
    new = _points(default_tables("H800-SXM5"))
    # literal rows of reference §11.4 (TFLOPS, speedup over DeepSeek's internal CUTLASS-3.6 kernel)
    assert old[("fp8", 4096, 7168, 16384, 1)].flops_per_s == pytest.approx(1358 / 1.2 * TFLOPS)
    assert old[("fp8", 64, 2112, 7168, 1)].flops_per_s == pytest.approx(206 / 2.7 * TFLOPS)
    assert old[("fp8", 4096, 24576, 1536, 1)].flops_per_s == pytest.approx(990 * TFLOPS)  # 1.0x
    assert old[("fp8", 8192, 4096, 7168, 4)].flops_per_s == pytest.approx(1297 / 1.2 * TFLOPS)
    assert old[("fp8", 4096, 7168, 2048, 8)].flops_per_s == pytest.approx(1093 / 1.1 * TFLOPS)
    assert old[("fp8", 256, 4096, 7168, 4)].flops_per_s == pytest.approx(932 / 1.1 * TFLOPS)
    rows = {(m, n, k, 1): x for m, n, k, _, x in _DEEPGEMM_DENSE}
    rows |= {(m, n, k, g): x for g, m, n, k, _, x in _DEEPGEMM_GROUPED}
    assert len(rows) == 28 and old.keys() == new.keys()
    for key, p in old.items():
        if p.precision == "bf16":
            assert p == new[key]  # only the FP8 kernels differ
        else:
            assert p.flops_per_s == pytest.approx(new[key].flops_per_s / rows[key[1:]])
            assert "internal CUTLASS-3.6 kernel (TFLOPS / published speedup)" in p.source


def test_named_tables():
    assert named_tables("default", "H200-SXM") == default_tables("H200-SXM")
    assert named_tables("default", "H800-SXM5").name == "hopper-deepgemm-default"
    assert named_tables("hopper-cutlass36-2024", "H100-SXM").name == "hopper-cutlass36-2024"
    with pytest.raises(ValueError, match="cost tables 'cutlass': unknown"):
        named_tables("cutlass", "H800-SXM5")


def test_nearest_point_memo_is_per_tables_object():
    """The GEMM lookup is memoised by the tables' identity: a second tables object with other
    points (a calibration) gets its own answers, and the default tables are one shared object."""
    from moeplan.simulator.costs.kernels import gemm_efficiency
    from moeplan.simulator.presets.clusters import h800_gpu

    gpu = h800_gpu()
    base = default_tables(gpu.name)
    assert default_tables(gpu.name) is base
    halved = base.model_copy(update={"gemm": tuple(p.model_copy(update={"flops_per_s": p.flops_per_s / 2})
                                                   for p in base.gemm)})
    shape = ("fp8", 4096, 7168, 2048)
    full = gemm_efficiency(base, gpu, *shape)
    assert gemm_efficiency(halved, gpu, *shape) == pytest.approx(full / 2)
    assert gemm_efficiency(base, gpu, *shape) == full


def test_fp8_points_take_the_gluon_kernel_where_it_is_fastest(monkeypatch):
    """A kernels_bench record with the Gluon kernel (the JSON since 2026-12-01) prices the shape at
    the fastest backend the dispatch can choose, and a refusing one (an "error" entry) is ignored."""
    from moeplan.simulator.costs import tables

    record = {"M": 4096, "N": 7168, "K": 2048,
              "forward": {"ours": {"tflops": 850.0}, "gluon": {"tflops": 1200.0}, "scaled_mm": {"tflops": 1090.0}},
              "dgrad": {"ours": {"tflops": 800.0}, "gluon": {"error": "refused"}, "scaled_mm": {"tflops": 1150.0}},
              "wgrad": {"ours": {"tflops": 640.0}, "scaled_mm": {"tflops": 890.0}}}
    monkeypatch.setattr(tables, "kernel_measurements", lambda: {"dense": [record], "grouped": []})
    pts = {(p.m, p.n, p.k): p for p in tables._measured_fp8_points()}
    assert pts[(4096, 7168, 2048)].flops_per_s == pytest.approx(1200.0 * TFLOPS)
    assert pts[(4096, 2048, 7168)].flops_per_s == pytest.approx(1150.0 * TFLOPS)
    assert pts[(7168, 2048, 4096)].flops_per_s == pytest.approx(890.0 * TFLOPS)
