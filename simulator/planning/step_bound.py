"""The search's lower bound on a layout's step: its compute bound plus the tensor-parallel collectives
that no schedule of it can hide.

``engine.build.compute_bound_s`` counts the busiest rank's compute only. With TP the engine also makes
compute wait for the forward collectives of every TP region and the embedding, the head's (the input
gather, the loss's all-reduces, the input gradient's reduction) and, in each backward, the output
gradient's all-gather (``engine.step``: ``_tp_wait``; ``engine.tensor_parallel`` says which are exposed).
A wait lasts at least the collective's seconds (it queues on the rank's NVLink lane). Where a rank runs
one op at a time (no ``F&B`` pair in its schedule: 1F1B, interleaved, ZB1P) nothing else computes during
the wait, so every rank's step is at least its compute plus these waits, and the step at least the
largest compute plus the smallest rank's waits. Under DualPipe's ``F&B`` pairs the other op may compute
while one waits, and the bound stays the compute bound.

Coarse ranking (``SimOptions.coarse``) merges a stage's layers into one unit, which runs as a MoE block if
any layer is; the dense MLP's collectives are then not waited for, so they count only for a model without
routed experts. The input-gradient reductions run beside the weight gradient and count nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeplan.simulator.accounting.context_parallel import cp_tokens
from moeplan.simulator.accounting.layout import pipeline_stages
from moeplan.simulator.costs.tables import CostTables, default_tables
from moeplan.simulator.engine.build import SimOptions, compute_bound_s
from moeplan.simulator.engine.tensor_parallel import TpComm, tp_comm, tp_ends
from moeplan.simulator.schedules.registry import make_schedule, rank_stages, schedule_kind
from moeplan.simulator.schedules.schedule import Schedule
from moeplan.simulator.spec.inputs import PlanInputs


@dataclass
class BoundMemo:
    """What one search asks many times: whether a schedule pairs ops, and a stage split's TP waits (they
    do not depend on recompute, ep or dp)."""

    overlaps: dict[tuple[str, int, int, int], bool] = field(default_factory=dict)  # (kind, pp, M, chunks)
    waits: dict[tuple, list[float]] = field(default_factory=dict)


def runs_one_op_at_a_time(schedule: Schedule) -> bool:
    """Whether no action of ``schedule`` overlaps two ops (``F&B``)."""
    return all(len(action.ops) == 1 for actions in schedule.ranks for action in actions)


def exposed_tp_s(inputs: PlanInputs, tables: CostTables) -> list[float]:
    """Per stage, seconds of TP collectives one micro-batch's forward and backward wait for (above), at
    the engine's sizes (``engine.build.step_inputs``)."""
    m, par, cl = inputs.model, inputs.parallel, inputs.cluster
    tokens, nvlink = cp_tokens(par.micro_batch_size, par.seq_len_tokens, par.cp), cl.node.nvlink_bytes_per_s
    ends = tp_ends(tables, m, tokens, par.tp, par.sp, nvlink)
    out = []
    for stage in pipeline_stages(m, par):
        heads = int(stage.has_head) + sum(u >= m.num_hidden_layers for u in stage.layers)
        seconds = (ends.embed_fwd_s if stage.has_embedding else 0.0) + heads * (ends.head_fwd_s + ends.head_bwd_s)
        for u in stage.layers:
            c = tp_comm(tables, m, m.is_moe_layer(u) if u < m.num_hidden_layers else m.is_moe, tokens, par.tp,
                        par.sp, nvlink)
            seconds += _waited(c, dense_mlp=not m.is_moe)
        out.append(seconds)
    return out


def _waited(c: TpComm, dense_mlp: bool) -> float:
    attention = c.attn_in_fwd_s + c.attn_out_fwd_s + c.attn_out_bwd_s
    return attention + (c.mlp_in_fwd_s + c.mlp_out_fwd_s + c.mlp_out_bwd_s if dense_mlp else 0.0)


def step_bound_s(inputs: PlanInputs, dp: int, microbatches: int, opts: SimOptions, memo: BoundMemo) -> float:
    """A lower bound on the layout's simulated step (``compute_bound_s``, plus the TP waits above
    where its schedule runs one op at a time)."""
    par = inputs.parallel
    bound = compute_bound_s(inputs, dp, microbatches, opts)
    if par.tp == 1:
        return bound
    key = (par.schedule, par.pp, microbatches, par.virtual_stages)
    if key not in memo.overlaps:
        memo.overlaps[key] = not runs_one_op_at_a_time(make_schedule(*key))
    if memo.overlaps[key]:
        return bound
    share = microbatches / schedule_kind(par.schedule).directions(par.pp, par.virtual_stages)
    split = (par.schedule, par.pp, par.virtual_stages, par.micro_batch_size, par.seq_len_tokens, par.cp, par.tp, par.sp)
    if split not in memo.waits:
        memo.waits[split] = exposed_tp_s(inputs, opts.tables or default_tables(inputs.cluster.gpu.name))
    stages = memo.waits[split]
    return bound + share * min(sum(stages[s] for s in rank_stages(par, r)) for r in range(par.pp))
