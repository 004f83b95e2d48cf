"""Attention efficiency by sequence length: read from the H200 measurement file, interpolated in log2."""

import math

import pytest

from moeplan.simulator.costs.kernels import attention_s
from moeplan.simulator.costs.tables import AttentionPoint, CostTables, attention_measurements, default_tables
from moeplan.simulator.presets.clusters import h800_gpu


def test_default_tables_carry_the_measured_points_exactly():
    t = default_tables("H800")
    rows = attention_measurements()["rows"]
    assert len(t.attention_by_seq) == len(rows) >= 5
    for row in rows:
        fwd, fwd_bwd = t.attention_fracs(row["seq"])
        assert fwd == pytest.approx(row["fwd_TFLOPs"] / 989.4) and fwd_bwd == pytest.approx(row["fwd_bwd_TFLOPs_3x"] / 989.4)
    assert (t.attention_fwd_frac, t.attention_fwd_bwd_frac) == t.attention_fracs(4096)


def test_interpolation_is_linear_in_log2_and_flat_past_the_ends():
    base = default_tables("H800")
    pts = (AttentionPoint(seq_len=1024, fwd_frac=0.2, fwd_bwd_frac=0.1),
           AttentionPoint(seq_len=4096, fwd_frac=0.6, fwd_bwd_frac=0.5))
    t = base.model_copy(update={"attention_by_seq": pts})
    assert t.attention_fracs(2048) == pytest.approx((0.4, 0.3))  # halfway in log2
    assert t.attention_fracs(512) == (0.2, 0.1) and t.attention_fracs(1 << 20) == (0.6, 0.5)
    empty = base.model_copy(update={"attention_by_seq": ()})
    assert empty.attention_fracs(123) == (base.attention_fwd_frac, base.attention_fwd_bwd_frac)


def test_attention_time_follows_the_sequence_lengths_efficiency():
    gpu = h800_gpu()
    t = default_tables("H800")
    flops = 1e15
    for seq in (1024, 4096, 131072):
        fwd, fwd_bwd = t.attention_fracs(seq)
        assert attention_s(t, gpu, flops, backward=False, seq_len=seq) == pytest.approx(flops / (gpu.bf16_flops_per_s * fwd))
        total = attention_s(t, gpu, flops, False, seq_len=seq) + attention_s(t, gpu, flops, True, seq_len=seq)
        assert total == pytest.approx(3 * flops / (gpu.bf16_flops_per_s * fwd_bwd))
    # short sequences are measured slower than 4K ones, so they must cost more per FLOP
    assert attention_s(t, gpu, flops, True, seq_len=1024) > attention_s(t, gpu, flops, True, seq_len=4096)


def test_a_calibration_file_without_the_table_still_loads(tmp_path):
    data = default_tables("H800").model_dump(mode="json")
    del data["attention_by_seq"]
    path = tmp_path / "calibration.json"
    path.write_text(__import__("json").dumps(data))
    loaded = CostTables.from_file(path)
    assert loaded.attention_by_seq == () and not math.isnan(loaded.attention_fracs(8192)[0])
