"""The host term (``costs.host``) and measured ops (``costs.measured_ops``) in the engine's unit costs: closed forms.

Sum mode adds count x cost to exactly the piece's fields; max mode adds only what the host exceeds the device
by; a measured op replaces its own field and no other; tables without either price as before."""

from __future__ import annotations

from dataclasses import fields

import pytest
from pydantic import ValidationError

from moeplan.simulator.costs.host import HostCosts, HostOpCost, HostOpCount
from moeplan.simulator.costs.measured_ops import MeasuredOp
from moeplan.simulator.costs.tables import named_tables
from moeplan.simulator.engine.unit_costs import CostContext, end_costs, unit_costs
from moeplan.simulator.presets.clusters import cpu_process
from moeplan.simulator.presets.models import tiny_moe

TOKENS, SEQ = 64, 64
COST = {"fwd_compute": 2e-6, "fwd_view": 1e-6, "bwd": 3e-6}


def _host(mode: str, scale: float = 1.0) -> HostCosts:
    costs = [HostOpCost(op=c, op_class=c, s=s * scale, source="test") for c, s in COST.items()]
    counts = [HostOpCount(piece=p, fwd_compute=10, fwd_view=5, bwd=20, tokens=TOKENS, seq_len=SEQ, source="test")
              for p in ("moe_attn", "moe_ffn", "embedding", "head")]
    return HostCosts(mode=mode, costs=tuple(costs), counts=tuple(counts))


def _ctx(**update) -> CostContext:
    tables = named_tables("cpu", "CPU-process").model_copy(update=update)
    return CostContext(tables=tables, gpu=cpu_process(), precision="bf16", tokens=TOKENS, seq_len_tokens=SEQ,
                       compute_frac=1.0, recompute="none")


FWD_S = 10 * COST["fwd_compute"] + 5 * COST["fwd_view"]
BWD_S = 20 * COST["bwd"]


def test_sum_mode_adds_count_times_cost_to_the_pieces_fields_only():
    base = unit_costs(_ctx(), tiny_moe(), moe=True, traffic=None)
    got = unit_costs(_ctx(host=_host("sum")), tiny_moe(), moe=True, traffic=None)
    expected = {"attn_fwd_s": FWD_S, "mlp_fwd_s": FWD_S, "attn_dx_s": BWD_S, "mlp_dx_s": BWD_S}
    for f in fields(base):
        assert getattr(got, f.name) == pytest.approx(getattr(base, f.name) + expected.get(f.name, 0.0)), f.name
    dense = unit_costs(_ctx(host=_host("sum")), tiny_moe(), moe=False, traffic=None)
    assert dense == unit_costs(_ctx(), tiny_moe(), moe=False, traffic=None), "no dense piece counted: unchanged"


def test_max_mode_adds_only_what_the_host_exceeds_the_device_by():
    base = unit_costs(_ctx(), tiny_moe(), moe=True, traffic=None)
    small = unit_costs(_ctx(host=_host("max", 1e-6)), tiny_moe(), moe=True, traffic=None)
    assert small == base, "a host faster than the device adds nothing"
    big = unit_costs(_ctx(host=_host("max", 1e3)), tiny_moe(), moe=True, traffic=None)
    assert big.attn_fwd_s == pytest.approx(FWD_S * 1e3)  # the host sets the piece's time
    assert big.mlp_dx_s + big.mlp_dw_s + big.experts_dx_s + big.experts_dw_s == pytest.approx(BWD_S * 1e3)


def test_the_ends_gain_their_host_time():
    base, got = end_costs(_ctx(), tiny_moe()), end_costs(_ctx(host=_host("sum")), tiny_moe())
    assert got.embed_fwd_s == pytest.approx(base.embed_fwd_s + FWD_S + BWD_S)
    assert got.head_fwd_s == pytest.approx(base.head_fwd_s + FWD_S)
    assert got.head_dx_s == pytest.approx(base.head_dx_s + BWD_S) and got.head_dw_s == base.head_dw_s


def _op(action: str, op: str, s: float, kind: str = "moe", tokens: int = TOKENS) -> MeasuredOp:
    return MeasuredOp(layer_kind=kind, action=action, op=op, tokens=tokens, seq_len=SEQ, s=s, samples=3, source="t")


def test_a_measured_op_replaces_its_own_field_at_its_shape_only():
    base = unit_costs(_ctx(), tiny_moe(), moe=True, traffic=None)
    ops = (_op("F", "attn", 0.125), _op("B", "experts-bwd", base.experts_dw_s + 0.5), _op("F", "mlp", 9.0, "dense"),
           _op("F", "shared", 7.0, tokens=2 * TOKENS))
    got = unit_costs(_ctx(measured_ops=ops), tiny_moe(), moe=True, traffic=None)
    assert got.attn_fwd_s == 0.125
    assert got.experts_dx_s == pytest.approx(0.5), "a B event's computed weight-gradient part is taken off"
    assert got.mlp_fwd_s == base.mlp_fwd_s, "other kinds and other shapes do not apply"
    changed = {f.name for f in fields(base) if getattr(base, f.name) != getattr(got, f.name)}
    assert changed == {"attn_fwd_s", "experts_dx_s"}
    ends = end_costs(_ctx(measured_ops=(_op("F", "head", 0.25, "ends"), _op("I", "head", 0.0625, "ends"))), tiny_moe())
    assert (ends.head_fwd_s, ends.head_dx_s) == (0.25, 0.0625)


def test_host_costs_refuse_a_missing_class_and_a_piece_counted_twice():
    good = _host("sum")
    with pytest.raises(ValidationError, match="no op of class 'bwd'"):
        HostCosts(mode="sum", costs=tuple(c for c in good.costs if c.op_class != "bwd"), counts=good.counts)
    with pytest.raises(ValidationError, match="piece='head' appears 2 times"):
        HostCosts(mode="sum", costs=good.costs, counts=good.counts + good.counts[-1:])
    assert good.op_s("fwd_view") == COST["fwd_view"] and good.seconds("dense_ffn") == (0.0, 0.0)
