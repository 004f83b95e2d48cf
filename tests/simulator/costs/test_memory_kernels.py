"""Memory-bound kernels priced class by class: the measurement file's loader, the fallback to memory_frac,
and what a class's fraction does to a unit's time and to the predicted step."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from moeplan.simulator.costs.elementwise import (
    LAYER_KERNELS,
    end_bytes_per_token,
    fp32_loss_bytes_per_token,
    layer_bytes_per_token,
)
from moeplan.simulator.costs.kernels import memory_s
from moeplan.simulator.costs.memory_kernels import (
    ELEMENTWISE_FILES,
    MemoryKernelPoint,
    elementwise_file,
    load_elementwise,
    memory_kernel_points,
)
from moeplan.simulator.costs.tables import CostTables, default_tables, named_tables
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.engine.expert_traffic import padded_rows
from moeplan.simulator.engine.unit_costs import CostContext, end_costs, unit_costs
from moeplan.simulator.planning.predict import predict_step
from moeplan.simulator.presets.clusters import h100_gpu, h200_gpu, h800_gpu
from moeplan.simulator.presets.models import deepseek_v3
from tests.simulator.planning.test_predict import _inputs


def _row(kernel: str, fwd: float | None, bwd: float | None = None, in_table: bool = True, skipped: str | None = None):
    def one(frac):  # a pass of 1 MB at ``frac`` of 4.8 TB/s (synthetic numbers, for the loader only)
        return None if frac is None else {"bytes": 1e6, "s": 1e6 / (frac * 4.8e12), "bytes_per_s": frac * 4.8e12,
                                           "hbm_frac": frac}
    return {"kernel": kernel, "implementation": f"impl of {kernel}", "in_table": in_table, "shape": "4096 x 7168",
            "fwd": one(fwd), "bwd": one(bwd), "skipped": skipped}


def _file(tmp_path, rows, name="h200-elementwise.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"what": "test", "command": "python benchmarks/elementwise_bench.py", "date": "today",
                                "device": "NVIDIA H200", "tokens": 4096, "kernels": rows}))
    return path


def _tables_with(points) -> CostTables:
    return default_tables("H800-SXM5").model_copy(update={"memory_kernels": tuple(points)})


def test_loader_takes_the_table_rows_with_their_sources(tmp_path):
    rows = [_row("rms_norm", 0.5, 0.25), _row("rms_norm", 0.1, 0.1, in_table=False), _row("embedding", 0.4),
            _row("swiglu", None, skipped="Triton kernel: needs a CUDA GPU")]
    pts = memory_kernel_points(load_elementwise(_file(tmp_path, rows)), "h200-elementwise.json")
    assert [(p.kernel, p.fwd_frac, p.bwd_frac) for p in pts] == [("rms_norm", 0.5, 0.25), ("embedding", 0.4, None)]
    assert all(p.source.startswith("[EW] h200-elementwise.json: impl of") and "NVIDIA H200" in p.source for p in pts)
    t = _tables_with(pts)
    assert t.memory_fracs("rms_norm") == (0.5, 0.25)
    assert t.memory_fracs("embedding") == (0.4, 0.4)  # no backward measured: the forward's
    assert t.memory_fracs("swiglu") == (t.memory_frac, t.memory_frac)  # skipped: the copy-bandwidth fallback
    assert t.memory_fracs("optimizer") == t.memory_fracs(None) == (t.memory_frac, t.memory_frac)


@pytest.mark.parametrize(("rows", "message"), [
    ([_row("rms_norm", 1.5)], "h200-elementwise.json: kernels.0.fwd.hbm_frac: Input should be less than or equal to 1"),
    ([_row("rms_norm", 0.5), _row("rope", 0.5, 0.5) | {"bwd": _row("rope", 0.5)["fwd"] | {"hbm_frac": 0.0}}],
     "kernels.1.bwd.hbm_frac: Input should be greater than 0"),
    ([_row("rmsnorm", 0.5)], "kernels.0.kernel: Input should be 'rms_norm'"),
    ([_row("rope", None)], "kernels.0: kernel='rope': give exactly one of fwd or bwd (measured) and skipped"),
    ([_row("rope", 0.5), _row("rope", 0.4)], "kernels: 2 rows of kernel='rope' have in_table=true"),
])
def test_a_malformed_measurement_file_is_one_line_naming_the_field(tmp_path, rows, message):
    with pytest.raises(ValueError) as err:
        load_elementwise(_file(tmp_path, rows))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_missing_field_is_named(tmp_path):
    row = _row("rope", 0.5)
    del row["fwd"]["hbm_frac"]
    with pytest.raises(ValueError, match=r"^h200-elementwise.json: kernels.0.fwd.hbm_frac: Field required$"):
        load_elementwise(_file(tmp_path, [row]))


def _packaged(name: str):
    return load_elementwise(str(files("moeplan.simulator.costs").joinpath(name)))


@pytest.mark.parametrize(("gpu", "memory_system"), [
    ("H800-SXM5", "h100"), ("H100-SXM5", "h100"), ("h800", "h100"), ("H200-SXM", "h200"), ("H200", "h200"),
    ("A100-SXM4", "h200"),  # a GPU no file measured: the H200's, as before per-GPU files
])
def test_each_gpu_takes_its_memory_systems_packaged_file(gpu, memory_system):
    name = elementwise_file(gpu)
    assert name == ELEMENTWISE_FILES[memory_system]
    data = _packaged(name)
    expect = memory_kernel_points(data, Path(name).name)
    for tables in (default_tables(gpu), named_tables("hopper-cutlass36-2024", gpu),
                   named_tables("hopper-bf16-fa2-2023", gpu)):
        assert tables.memory_kernels == expect
    combine = next(r for r in data.kernels if r.kernel == "combine" and r.in_table)
    assert default_tables(gpu).memory_fracs("combine") == (combine.fwd.hbm_frac, combine.bwd.hbm_frac)
    for p in expect:
        assert 0 < p.fwd_frac <= 1 and (p.bwd_frac is None or 0 < p.bwd_frac <= 1)
        assert p.source.startswith(f"[EW] {Path(name).name}: ") and data.device in p.source


def test_the_h100_and_h800_tables_price_memory_unlike_the_h200s():
    h100, h800, h200 = (default_tables(g).memory_fracs("combine") for g in ("H100-SXM5", "H800-SXM5", "H200-SXM"))
    assert h100 == h800 != h200
    assert "H100" in _packaged(elementwise_file("H800-SXM5")).device
    assert "H200" in _packaged(elementwise_file("H200-SXM")).device


def test_the_packaged_h100_file_is_of_the_h100_datasheet():
    data = _packaged(ELEMENTWISE_FILES["h100"])
    raw = json.loads(files("moeplan.simulator.costs").joinpath(ELEMENTWISE_FILES["h100"]).read_text())
    assert h100_gpu().hbm_bytes_per_s == h800_gpu().hbm_bytes_per_s == raw["hbm_bytes_per_s"] == 3.35e12
    assert raw["hbm_source"] == "simulator.presets.clusters.gpu_for_device (H100-SXM5 datasheet)" and raw["out"].endswith(
        ELEMENTWISE_FILES["h100"])
    passes = [p for r in data.kernels for p in (r.fwd, r.bwd) if p is not None]
    assert len(passes) > 20
    for p in passes:  # fitted at two sizes: the fixed seconds and the fraction of the rest give back the time
        assert p.bytes_per_s == pytest.approx(p.bytes / p.s, rel=1e-9)
        assert (p.fixed_s or 0.0) + p.bytes / (3.35e12 * p.hbm_frac) == pytest.approx(p.s, rel=1e-9)
    assert sum(p.fixed_s is not None for p in passes) > 20


def test_a_calibration_file_with_only_memory_frac_still_loads(tmp_path):
    data = default_tables("H800").model_dump(mode="json")
    del data["memory_kernels"]
    data["memory_frac"] = 0.5
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    loaded = CostTables.from_file(path)
    assert loaded.memory_kernels == () and all(loaded.memory_fracs(k) == (0.5, 0.5) for k in LAYER_KERNELS)


def test_a_calibration_file_round_trips_its_memory_kernels(tmp_path):
    t = _tables_with([MemoryKernelPoint(kernel="swiglu", fwd_frac=0.3, bwd_frac=0.2, source="a measurement")])
    path = tmp_path / "cal.json"
    path.write_text(t.model_dump_json())
    assert CostTables.from_file(path) == t
    data = json.loads(path.read_text())
    data["memory_kernels"].append(data["memory_kernels"][0])
    with pytest.raises(ValueError, match="kernel='swiglu' appears 2 times"):
        CostTables.model_validate(data)


def test_each_class_is_priced_at_its_own_fraction_of_its_own_gpus_bandwidth():
    t = _tables_with([MemoryKernelPoint(kernel="swiglu", fwd_frac=0.4, bwd_frac=0.2, source="s")])
    for gpu in (h800_gpu(), h200_gpu()):  # a fraction of each part's datasheet, as memory_frac is
        assert memory_s(t, gpu, 1e9, "swiglu") == pytest.approx(1e9 / (0.4 * gpu.hbm_bytes_per_s))
        assert memory_s(t, gpu, 1e9, "swiglu", backward=True) == pytest.approx(1e9 / (0.2 * gpu.hbm_bytes_per_s))
        assert memory_s(t, gpu, 1e9, "rope") == pytest.approx(1e9 / (t.memory_frac * gpu.hbm_bytes_per_s))


def _ctx(tables: CostTables) -> CostContext:
    return CostContext(tables=tables, gpu=h800_gpu(), precision="fp8", tokens=4096, seq_len_tokens=4096,
                       compute_frac=1.0, recompute="none")


def test_a_slower_class_adds_exactly_its_bytes_at_the_new_fraction():
    m, base = deepseek_v3(), _tables_with([])
    f = base.memory_frac
    slow = _tables_with([MemoryKernelPoint(kernel="swiglu", fwd_frac=f / 2, bwd_frac=f / 4, source="s")])
    a, b = unit_costs(_ctx(base), m, True, None), unit_costs(_ctx(slow), m, True, None)
    # the FP8 experts' SwiGLU runs over each expert's rows padded to 128 (V3: 128 rows an expert at 4096 tokens)
    padded = m.n_routed_experts * padded_rows(4096 * m.num_experts_per_tok / m.n_routed_experts) / 4096
    swiglu = layer_bytes_per_token(m, True, "fp8", m.num_experts_per_tok, padded_rows_per_token=padded)["swiglu"]
    bw = h800_gpu().hbm_bytes_per_s * f
    assert b.fwd_s - a.fwd_s == pytest.approx(4096 * swiglu.fwd_bytes / bw)  # 1/(f/2) - 1/f = 1/f
    assert b.dx_s - a.dx_s == pytest.approx(3 * 4096 * swiglu.bwd_bytes / bw)  # 1/(f/4) - 1/f = 3/f
    assert (b.attn_fwd_s - a.attn_fwd_s) == pytest.approx(b.mlp_fwd_s - a.mlp_fwd_s)  # half beside each
    assert b.dw_s == a.dw_s and b.experts_fwd_s == a.experts_fwd_s


def test_the_ends_are_priced_as_embedding_and_cross_entropy():
    m = deepseek_v3()
    t = _tables_with([MemoryKernelPoint(kernel="cross_entropy", fwd_frac=0.5, bwd_frac=0.25, source="s"),
                      MemoryKernelPoint(kernel="embedding", fwd_frac=0.1, source="s")])
    ends, gpu, ce = end_costs(_ctx(t), m), h800_gpu(), end_bytes_per_token(m)["cross_entropy"]
    assert ends.embed_fwd_s == pytest.approx(4096 * 4 * m.hidden_size / (0.1 * gpu.hbm_bytes_per_s))
    plain = end_costs(_ctx(t.model_copy(update={"memory_kernels": ()})), m)  # the FP32 loss's own bytes
    fp32, full_speed = fp32_loss_bytes_per_token(m), 1 / t.memory_frac
    assert ends.head_fwd_s - plain.head_fwd_s == pytest.approx(
        4096 * (ce.fwd_bytes * 2 - fp32.fwd_bytes * full_speed) / gpu.hbm_bytes_per_s)
    assert ends.head_dx_s - plain.head_dx_s == pytest.approx(
        4096 * (ce.bwd_bytes * 4 - fp32.bwd_bytes * full_speed) / gpu.hbm_bytes_per_s)


def test_a_slower_measured_class_slows_the_step_and_a_faster_one_speeds_it():
    inp = _inputs()
    base = default_tables("H200").model_copy(update={"memory_kernels": ()})
    f = base.memory_frac

    def step(kernel, frac):
        t = base.model_copy(update={"memory_kernels": (MemoryKernelPoint(kernel=kernel, fwd_frac=frac, source="s"),)})
        return predict_step(inp, 4, 16, opts=SimOptions(tables=t))[0].step_time_s

    reference = predict_step(inp, 4, 16, opts=SimOptions(tables=base))[0].step_time_s
    assert step("rms_norm", f / 4) > reference
    assert step("swiglu", f / 4) > reference
    assert step("rms_norm", 1.0) < reference
