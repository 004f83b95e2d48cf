"""Techniques left out to reproduce an earlier setup (issue 21, capability 4): parsing, the schedules the search
may try, the settings held, conflicts in one line; and the 2023-24 kernel-era tables."""

from __future__ import annotations

import pytest

from moeplan.simulator.costs.era_tables import MAMF_H100_BF16_FLOPS_PER_S, fa2_attention_points
from moeplan.simulator.costs.kernels import attention_s
from moeplan.simulator.costs.tables import TFLOPS, default_tables, named_tables
from moeplan.simulator.planning.techniques import TECHNIQUES, Techniques
from moeplan.simulator.presets.clusters import h800_gpu
from moeplan.simulator.schedules.registry import SCHEDULE_KINDS


def test_parse_sorts_and_deduplicates_and_names_an_unknown_one():
    assert Techniques.parse("no-fp8, no-dualpipe,no-fp8").off == ("no-dualpipe", "no-fp8")
    assert Techniques.parse(None).off == Techniques.parse("").off == ()
    with pytest.raises(ValueError, match="--techniques 'no-pipelining': unknown"):
        Techniques.parse("no-dualpipe,no-pipelining")


def test_schedules_the_search_may_try():
    assert Techniques().schedules == SCHEDULE_KINDS
    assert set(Techniques.parse("no-dualpipe").schedules) == set(SCHEDULE_KINDS) - {"dualpipe", "dualpipev"}
    assert Techniques.parse("no-dualpipe,no-zero-bubble,no-interleaved").schedules == ("1f1b",)


def test_overrides_hold_the_settings():
    assert Techniques.parse("no-fp8,no-cp").overrides == ["parallel.cp=1", 'training.precision="bf16"']
    assert Techniques.parse("no-dualpipe").overrides == []


def test_conflicts_name_the_technique_and_the_value():
    t = Techniques.parse("no-dualpipe,no-fp8,no-ep")
    assert t.conflict("dualpipev", "bf16", 1, 1) == "--techniques no-dualpipe excludes schedule=dualpipev"
    assert t.conflict("1f1b", "fp8", 1, 1) == "--techniques no-fp8 contradicts precision=fp8"
    assert t.conflict(None, "bf16", 1, 8) == "--techniques no-ep contradicts ep=8"
    assert t.conflict(None, "bf16", 1, 1) is None
    assert set(TECHNIQUES) >= {"no-dualpipe", "no-fp8"}


def test_fa2_points_hand_computed():
    # 4K tokens: forward 319 TFLOPS; fwd+bwd at 3x forward FLOPs = 3 / (1/319 + 2.5/310) = 267.87 TFLOPS
    at_4k = next(p for p in fa2_attention_points(989.4 * TFLOPS) if p.seq_len == 4096)
    assert at_4k.fwd_frac == pytest.approx(319 / 989.4)
    assert at_4k.fwd_bwd_frac == pytest.approx(267.87 / 989.4, rel=1e-4)


def test_fa2_era_is_bf16_only_and_slower_in_attention_than_today():
    gpu = h800_gpu()
    era, today = named_tables("hopper-bf16-fa2-2023", "H800"), default_tables("H800")
    assert era.precisions == ("bf16",)
    assert era.precision_error("fp8") is not None
    assert "FlashAttention-2" in era.attention_source
    for seq in (1024, 4096, 16384):
        assert attention_s(era, gpu, 1e12, backward=True, seq_len=seq) > attention_s(today, gpu, 1e12, backward=True, seq_len=seq)


def test_era_bf16_gemms_are_not_faster_than_2024_cublas():
    era = named_tables("hopper-bf16-fa2-2023", "H800")
    assert all(p.flops_per_s <= MAMF_H100_BF16_FLOPS_PER_S for p in era.gemm)
    assert all(p.source for p in era.gemm)


def test_no_cp_holds_every_phase_and_names_one_that_is_not():
    t = Techniques.parse("no-cp")
    assert t.phase_overrides(2) == ["training.phases.0.cp=1", "training.phases.1.cp=1"]
    assert Techniques.parse("no-fp8").phase_overrides(2) == []
    assert t.conflict(None, "bf16", 1, 1, (None, 1)) is None
    assert t.conflict(None, "bf16", 1, 1, (1, 4)) == "--techniques no-cp contradicts training.phases.1.cp=4"
