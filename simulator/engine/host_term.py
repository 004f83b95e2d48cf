"""The host term and measured sub-operations applied to a unit's and the ends' computed costs.

``with_host``: each piece of a unit (its attention half and its FFN half, forward and backward; the
embedding; each head) gains what the host adds to it (``costs.host.HostCosts.extra_s``: the whole host
time on a CPU, the excess over the device time on a GPU). The attention half's host time goes to the
attention fields, the FFN half's to ``mlp_*`` (beside the dispatch), the backward's to the input-gradient
fields (``dx``), where autograd runs it; the embedding's backward ops are charged with its forward (the
engine has no embedding backward slot).

``with_measured``: an op the tables' ``measured_ops`` hold at this shape replaces the computed price of
the same op (forward, backward or input-gradient), never more than its own fields; a weight-gradient part
the event also holds (``B`` events run ``dw`` too) is kept as computed and taken off. Not applied under
context parallelism, whose attention events the engine splits around the collectives.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from moeplan.simulator.costs.measured_ops import LayerKind, MeasuredOp, measured_s
from moeplan.simulator.costs.tables import CostTables

if TYPE_CHECKING:
    from moeplan.simulator.engine.unit_costs import CostContext, EndCosts, UnitCosts



# A stage pass that starts after its process blocked (a receive, a barrier) runs slower on a CPU: caches and clocks
# go cold while the process sleeps (tiny-moe on a 2-vCPU VM, 2026-12-06: a pass 0.1 ms slower after 3 ms asleep,
# 0.3 after 6, 0.6-0.7 after 12). ``calibrate`` times each pass again after sleeping a few waits and enters its
# extra seconds over the same pass back to back as layer kind ``ends``, action F or B, op ``wake_op(wait)``; the
# engine adds them, interpolated on the wait, to a pass its rank waited before (``engine.step.WakeCosts``).
WAKE_OP_PREFIX = "after-wait "
# A rank's first pass of a step, begun at once, shares the host with the runtime's data thread, which makes the next
# step's micro-batches beside it (``model.runtime.rank.RankRuntime.prefetch``; tiny-moe on 2 vCPUs, 2026-12-06: the
# first forward 1.3-1.7 ms slower). ``calibrate`` times the first pass of its steps with that thread and without,
# and enters the difference as layer kind ``ends``, the pass's kind, op ``STEP_START_OP``.
STEP_START_OP = "step-start"


def wake_op(wait_s: float) -> str:
    """The measured op name of a pass's extra after sleeping ``wait_s`` (``"after-wait 0.004 s"``)."""
    return f"{WAKE_OP_PREFIX}{wait_s:g} s"


def wake_points(ops: tuple[MeasuredOp, ...], action: str, tokens: int, seq_len: int) -> tuple[tuple[float, float], ...]:
    """(wait s, extra s) of the ``wake_op`` entries of pass kind ``action`` at this shape, by wait; () if none."""
    return tuple(sorted((float(m.op.removeprefix(WAKE_OP_PREFIX).removesuffix(" s")), m.s) for m in ops
                        if m.layer_kind == "ends" and m.action == action and m.op.startswith(WAKE_OP_PREFIX)
                        and (m.tokens, m.seq_len) == (tokens, seq_len)))


def step_start_s(ops: tuple[MeasuredOp, ...], tokens: int, seq_len: int) -> tuple[tuple[str, float], ...]:
    """(pass kind, extra s) of the ``STEP_START_OP`` entries at this shape; () if none."""
    return tuple(sorted((m.action, m.s) for m in ops if m.layer_kind == "ends" and m.op == STEP_START_OP
                        and (m.tokens, m.seq_len) == (tokens, seq_len)))


def layer_kind(moe: bool, mtp: bool) -> LayerKind:
    return "mtp" if mtp else "moe" if moe else "dense"


def with_host(tables: CostTables, u: UnitCosts, kind: LayerKind, full_recompute: bool) -> UnitCosts:
    host = tables.host
    if host is None:
        return u
    a_f, a_b = host.seconds(f"{kind}_attn")  # type: ignore[arg-type]
    f_f, f_b = host.seconds(f"{kind}_ffn")  # type: ignore[arg-type]
    return replace(
        u,
        attn_fwd_s=u.attn_fwd_s + host.extra_s(u.attn_fwd_s, a_f),
        attn_dx_s=u.attn_dx_s + host.extra_s(u.attn_dx_s + u.attn_dw_s, a_b),
        mlp_fwd_s=u.mlp_fwd_s + host.extra_s(u.mlp_fwd_s + u.experts_fwd_s, f_f),
        mlp_dx_s=u.mlp_dx_s + host.extra_s(u.mlp_dx_s + u.mlp_dw_s + u.experts_dx_s + u.experts_dw_s, f_b),
        recompute_s=u.recompute_s + (host.extra_s(u.recompute_s, a_f + f_f) if full_recompute else 0.0),
    )


def _replaced(tables: CostTables, ctx: CostContext, kind: LayerKind, op: str, fwd_only: bool) -> float | None:
    """The measured seconds of ``op``: the ``I`` measurement (input gradient alone) before the ``B`` one."""
    actions = ("F",) if fwd_only else ("I", "B")
    for action in actions:
        s = measured_s(tables.measured_ops, kind, action, op, ctx.tokens, ctx.seq_len_tokens)
        if s is not None:
            return s if action != "B" else -s  # negative: a B event, whose weight-gradient part is taken off
    return None


def _bwd(measured: float, dw_s: float, recompute_s: float = 0.0) -> float:
    """The input-gradient seconds from a measured I (positive) or B (negative: dw included) event."""
    return max(0.0, (measured if measured >= 0 else -measured - dw_s) - recompute_s)


def with_measured(ctx: CostContext, u: UnitCosts, kind: LayerKind) -> UnitCosts:
    tables = ctx.tables
    if not tables.measured_ops or ctx.cp_gather_bytes:
        return u
    out = {}
    for op, field in (("attn", "attn_fwd_s"), ("mlp", "mlp_fwd_s"), ("shared", "mlp_fwd_s"),
                      ("experts", "experts_fwd_s")):
        s = _replaced(tables, ctx, kind, op, fwd_only=True)
        if s is not None:
            out[field] = s
    for op, field, dw, rec in (("attn-bwd", "attn_dx_s", u.attn_dw_s, u.recompute_s),
                               ("mlp-bwd", "mlp_dx_s", u.mlp_dw_s, 0.0), ("shared-bwd", "mlp_dx_s", u.mlp_dw_s, 0.0),
                               ("experts-bwd", "experts_dx_s", u.experts_dw_s, 0.0)):
        s = _replaced(tables, ctx, kind, op, fwd_only=False)
        if s is not None:
            out[field] = _bwd(s, dw, rec)
    return replace(u, **out) if out else u


def ends_with_host_and_measured(ctx: CostContext, e: EndCosts) -> EndCosts:
    """The embedding and one head: host term first, then any measured op at this shape in its place."""
    tables, host = ctx.tables, ctx.tables.host
    if host is not None:
        emb_f, emb_b = host.seconds("embedding")
        head_f, head_b = host.seconds("head")
        e = replace(e, embed_fwd_s=e.embed_fwd_s + host.extra_s(e.embed_fwd_s, emb_f + emb_b),
                    head_fwd_s=e.head_fwd_s + host.extra_s(e.head_fwd_s, head_f),
                    head_dx_s=e.head_dx_s + host.extra_s(e.head_dx_s + e.head_dw_s, head_b))
    if not tables.measured_ops:
        return e
    out = {}
    for op, field in (("embed", "embed_fwd_s"), ("head", "head_fwd_s")):
        s = _replaced(tables, ctx, "ends", op, fwd_only=True)
        if s is not None:
            out[field] = s
    s = _replaced(tables, ctx, "ends", "head", fwd_only=False)
    if s is not None:
        out["head_dx_s"] = _bwd(s, e.head_dw_s)
    return replace(e, **out) if out else e


def optimizer_host_s(tables: CostTables, device_s: float, updates: int) -> float:
    """What the host adds to one rank's optimizer step of ``device_s``: ``updates`` calls of the runtime's AdamW
    update (``model.runtime.optimizer.adamw_update``: one a parameter where the ZeRO group has one rank, else
    one a shard; ``engine.build``), each the ``optimizer`` piece's counted ops."""
    if tables.host is None:
        return 0.0
    fwd, _ = tables.host.seconds("optimizer")
    return tables.host.extra_s(device_s, fwd * updates)
