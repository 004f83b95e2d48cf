"""Turn plan inputs into a step simulation: per-stage sub-operation costs, links, DP tails.

With expert parallelism every unit is priced twice: on all of the GPU's SMs, and on the SMs left while an
all-to-all kernel holds ``comm_sms`` of them (TR §3.2.2); the engine runs a piece at the second rate only
while an all-to-all is in flight beside it (``engine/sm_share.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moeplan.simulator.accounting.context_parallel import cp_tokens, gather_bytes, kv_up_rows
from moeplan.simulator.accounting.layout import pipeline_stages
from moeplan.simulator.accounting.memory import rank_param_tensors, rank_params
from moeplan.simulator.accounting.tensor_parallel import tp_slice
from moeplan.simulator.costs.elementwise import OPTIMIZER
from moeplan.simulator.costs.kernels import memory_s, ring_s
from moeplan.simulator.costs.machine import POSTED_BATCHES
from moeplan.simulator.costs.measured_ops import PASS_OP, measured_optimizer_s, measured_s
from moeplan.simulator.costs.optimizer_step import OptimizerSet, optimizer_bytes
from moeplan.simulator.costs.tables import CostTables, default_tables
from moeplan.simulator.engine.expert_traffic import ExpertTraffic, expert_traffic
from moeplan.simulator.engine.host_term import optimizer_host_s, step_start_s, wake_points
from moeplan.simulator.engine.step import Links, RankTail, StageCosts, StepInputs, WakeCosts
from moeplan.simulator.engine.tensor_parallel import TpComm, collective_s, tp_comm, tp_ends, tp_unit_costs
from moeplan.simulator.engine.unit_costs import CostContext, EndCosts, UnitCosts, end_costs, fp8_weight_quant_s
from moeplan.simulator.schedules.registry import make_schedule, rank_stages, schedule_kind
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.traffic.all_to_all import BF16_BYTES_PER_ELEMENT, WirePayload

FP32_BYTES_PER_ELEMENT = 4


@dataclass(frozen=True)
class SimOptions:
    """Knobs of the simulation that are not part of the user's plan inputs."""

    tables: CostTables | None = None  # None: the defaults for the cluster's GPU
    redundant_experts: int = 0
    expert_load: tuple[float, ...] | None = None  # relative per-expert load; None = uniform routing
    layer_loads: tuple[tuple[int, tuple[float, ...]], ...] = ()  # (layer, per-expert load): overrides expert_load
    seed: int = 0
    coarse: bool = False  # merge each stage's layers into one unit: fewer events, for the search
    comm_sms_always: bool = False  # withhold comm_sms from all compute whenever ep > 1 (the model before issue 21)
    payload: WirePayload | None = None  # bytes per all-to-all row, for sensitivity studies; None = ``wire_payload``
    peer_wait: bool = True  # uniform routing: the slowest of ep random routings (``expert_traffic``); False = the mean


def comm_sms(inputs: PlanInputs, tables: CostTables) -> int:
    """SMs an all-to-all kernel holds while it runs (none without expert parallelism)."""
    return tables.comm_sms if inputs.parallel.ep > 1 and inputs.model.is_moe else 0


def cost_context(inputs: PlanInputs, tables: CostTables, seq_len_tokens: int, beside_comm: bool = False) -> CostContext:
    """Costs on all SMs, or (``beside_comm``) on those an all-to-all leaves."""
    par, gpu, m = inputs.parallel, inputs.cluster.gpu, inputs.model
    taken = comm_sms(inputs, tables) if beside_comm else 0
    mbs, cp = par.micro_batch_size, par.cp
    return CostContext(
        tables=tables, gpu=gpu, precision=inputs.training.precision,
        tokens=cp_tokens(mbs, seq_len_tokens, cp), seq_len_tokens=seq_len_tokens,
        compute_frac=(gpu.sm_count - taken) / gpu.sm_count, recompute=par.recompute,
        kv_rows=kv_up_rows(mbs, seq_len_tokens, cp, m), cp_gather_bytes=gather_bytes(m, mbs, seq_len_tokens, cp),
        fusion=inputs.training.kernels.fusion, loss=inputs.training.kernels.loss, ep_backend=par.ep_backend,
        expert_wgrad_batch=inputs.training.kernels.expert_wgrad_batch,
    )


def layer_load(opts: SimOptions, layer: int) -> tuple[float, ...] | None:
    """The per-expert load the simulation assumes for MoE layer ``layer`` (None: uniform)."""
    return dict(opts.layer_loads).get(layer, opts.expert_load)


def activation_bytes_per_element(tables: CostTables) -> int:
    """The element size of a non-FP8 run's activations: FP32 where the tables price ``bf16`` in FP32 (the cpu
    tables, whose runs train in FP32), else BF16."""
    fp32 = tables.machine is not None and tables.machine.dtype == "float32"
    return FP32_BYTES_PER_ELEMENT if fp32 else BF16_BYTES_PER_ELEMENT


def p2p_blocks(inputs: PlanInputs) -> bool:
    """Whether a stage-boundary message holds the hosts at both ends: the ``cpu`` cluster's processes talk over gloo
    (the runtime posts each point-to-point batch and waits for it; gloo's send and receive run on the caller's
    host): ``GpuSpec.is_cpu``."""
    return inputs.cluster.gpu.is_cpu


def posted_batches_s(tables: CostTables, p2p_bytes: float) -> tuple[float, float, float] | None:
    """The host's seconds of the runtime's blocking point-to-point batches at the boundary message's size, between
    two processes (``costs.machine.POSTED_BATCHES``: a send, a receive whose message is there, one of each; measured
    by ``calibrate`` on a CPU): ``Links.batch_s``; None where the tables lack any of them."""
    fits = {f.collective: f for f in tables.links if f.processes == 2 and f.collective in POSTED_BATCHES}
    if len(fits) < len(POSTED_BATCHES):
        return None
    send, recv, both = (fits[c].seconds(p2p_bytes) for c in POSTED_BATCHES)
    return send, recv, both


def wire_payload(inputs: PlanInputs, tables: CostTables) -> WirePayload:
    """Bytes per all-to-all row: the run's precision, the backend's routing metadata, and the element size
    of a non-FP8 run's activations (``activation_bytes_per_element``)."""
    m, par = inputs.model, inputs.parallel
    return WirePayload.of(m.hidden_size, m.num_experts_per_tok, inputs.training.precision, par.ep_backend,
                          activation_bytes_per_element(tables))


def _traffic(inputs: PlanInputs, ctx: CostContext, opts: SimOptions, load: tuple[float, ...] | None) -> ExpertTraffic | None:
    """A MoE layer's all-to-all for the tokens one GPU routes (its ``1/tp`` of the sequence under TP + SP)."""
    m, par = inputs.model, inputs.parallel
    if not m.is_moe or par.ep == 1:
        return None
    return expert_traffic(m, inputs.cluster, par.ep, ctx.tokens // par.tp, opts.redundant_experts, load, opts.seed,
                          opts.payload or wire_payload(inputs, ctx.tables), par.ep_backend, opts.peer_wait)


def merge_units(units: list[UnitCosts]) -> UnitCosts:
    """One unit whose every duration and byte count is the sum over ``units``."""
    fields = UnitCosts.__dataclass_fields__
    return UnitCosts(**{f: sum(getattr(u, f) for u in units) for f in fields})


def _stage_costs(inputs: PlanInputs, parallel: ParallelSpec, ctx: CostContext, opts: SimOptions,
                 microbatches: int) -> tuple[StageCosts, ...]:
    """Per stage, the costs of its layer units; MoE layers with the same load share one entry. An FP8 run's
    weight quantisation, once a step for each copy of a stage (``unit_costs.fp8_weight_quant_s``), is spread over
    the micro-batches that copy runs (the runtime does it in the first; the step's total is the same), on the
    first unit's forward."""
    m = inputs.model
    cache: dict[tuple, UnitCosts] = {}

    tp, sp, nvlink = parallel.tp, parallel.sp, inputs.cluster.node.nvlink_bytes_per_s

    def unit(u: int) -> UnitCosts:
        mtp = u >= m.num_hidden_layers
        moe = m.is_moe if mtp else m.is_moe_layer(u)
        load = layer_load(opts, u) if moe else None
        key = (mtp, moe, load)
        if key not in cache:
            traffic = _traffic(inputs, ctx, opts, load) if moe else None
            cache[key] = tp_unit_costs(ctx, m, moe=moe, traffic=traffic, mtp=mtp, tp=tp, sp=sp)
        return cache[key]

    def comm(u: int) -> TpComm:
        moe = m.is_moe if u >= m.num_hidden_layers else m.is_moe_layer(u)
        return tp_comm(ctx.tables, m, moe, ctx.tokens, tp, sp, nvlink)

    out = []
    share = microbatches / schedule_kind(parallel.schedule).directions(parallel.pp, parallel.virtual_stages)
    for stage in pipeline_stages(m, parallel):
        units = _with_pass([unit(u) for u in stage.layers], ctx)
        quant_s = fp8_weight_quant_s(ctx, m, stage.layers, parallel.ep, tp)
        if quant_s and units:
            units[0] = replace(units[0], attn_fwd_s=units[0].attn_fwd_s + quant_s / share)
        comms = [comm(u) for u in stage.layers] if tp > 1 else None
        if opts.coarse and len(units) > 1:
            units = [merge_units(units)]
            comms = [TpComm.merged(comms)] if comms else None
        mtp_units = sum(u >= m.num_hidden_layers for u in stage.layers)
        out.append(StageCosts(units=tuple(units), has_embedding=stage.has_embedding,
                              has_head=stage.has_head or mtp_units > 0, heads=int(stage.has_head) + mtp_units,
                              tp_comm=tuple(comms) if comms else None))
    return tuple(out)


def _with_pass(units: list[UnitCosts], ctx: CostContext) -> list[UnitCosts]:
    """``units`` with a stage pass's measured work outside its nodes (``costs.measured_ops.PASS_OP``) on the first
    unit: forward with its attention (before it, the RoPE tables and the input leaf), backward with its input
    gradient (the last node the backward runs). Unchanged where the tables measured none at this shape."""
    ops = ctx.tables.measured_ops
    if not ops or not units or ctx.cp_gather_bytes:
        return units
    f, b = (measured_s(ops, "ends", a, PASS_OP, ctx.tokens, ctx.seq_len_tokens) or 0.0 for a in ("F", "B"))
    first = replace(units[0], attn_fwd_s=units[0].attn_fwd_s + f, attn_dx_s=units[0].attn_dx_s + b)
    return [first, *units[1:]]


def _end_costs(inputs: PlanInputs, ctx: CostContext) -> EndCosts:
    """The embedding and one head on a TP rank: its share of the vocabulary."""
    return end_costs(ctx, tp_slice(inputs.model, inputs.parallel.tp))


def _is_moe_unit(m: ModelSpec, u: int) -> bool:
    return m.is_moe if u >= m.num_hidden_layers else m.is_moe_layer(u)


def _zero_groups(par: ParallelSpec, dp: int) -> tuple[int, int]:
    """(GPUs the dense ZeRO-1 shards span, GPUs the routed experts' shards span): dp * cp ranks hold the same TP
    shard; experts are sharded inside the stage's dp * cp * tp GPUs."""
    group = dp * par.cp
    return group, group * par.tp // par.ep


def rank_optimizer_bytes(inputs: PlanInputs, dp: int) -> tuple[dict[str, float], ...]:
    """Per pipeline rank, the bytes of its optimizer step by part (``costs.optimizer_step``): its ZeRO-1 shards
    of the dense parameters (over dp * cp) and of its routed experts (over the expert-data-parallel group)."""
    m, par = inputs.model, inputs.parallel
    group, edp = _zero_groups(par, dp)
    zero = par.zero_stage >= 1
    stages = pipeline_stages(m, par)
    out = []
    for r in range(par.pp):
        sets, moe_layers = [], 0
        for s in rank_stages(par, r):
            p = rank_params(m, [stages[s]], par.ep, par.tp)
            # both sets divide by dp * cp (model.runtime.rank._optimizer: the experts' grad_divisor is it too)
            sets += [OptimizerSet(p.dense, p.dense / (group if zero else 1), scaled=group > 1),
                     OptimizerSet(p.expert, p.expert / (edp if zero else 1), scaled=group > 1)]
            moe_layers += sum(_is_moe_unit(m, u) for u in stages[s].layers)
        out.append(optimizer_bytes(inputs.training.optimizer, sets, moe_layers, m.n_routed_experts if m.is_moe else 0))
    return tuple(out)


def optimizer_updates(inputs: PlanInputs, dp: int, pp_rank: int) -> int:
    """Calls of the runtime's AdamW update in one step of pipeline rank ``pp_rank`` (``model.runtime.optimizer``):
    a ZeRO group of one updates each parameter tensor apart, a larger one its one shard (dense, and experts')."""
    m, par = inputs.model, inputs.parallel
    group, edp = _zero_groups(par, dp)
    stages = pipeline_stages(m, par)
    dense, expert = rank_param_tensors(m, [stages[s] for s in rank_stages(par, pp_rank)])
    return (dense if group == 1 else 1) + (expert if edp == 1 else min(1, expert))


def rank_optimizer_set(inputs: PlanInputs, pp_rank: int) -> tuple[int, int]:
    """(parameters, tensors) of pipeline rank ``pp_rank``'s whole parameter set, as the runtime builds it: the
    shape of a measured optimizer step (``costs.measured_ops.measured_optimizer_s``)."""
    m, par = inputs.model, inputs.parallel
    stages = pipeline_stages(m, par)
    mine = [stages[s] for s in rank_stages(par, pp_rank)]
    p = rank_params(m, mine, par.ep, par.tp)
    return p.dense + p.expert, sum(rank_param_tensors(m, mine))


def _measured_parts(inputs: PlanInputs, dp: int, tables: CostTables, pp_rank: int) -> dict[str, float] | None:
    """The rank's optimizer parts as measured over its own tensors (``calibrate --plan``, ``check
    --recalibrate``), where its ZeRO groups have one rank (one process runs that step whole); else None."""
    if not tables.measured_ops or _zero_groups(inputs.parallel, dp) != (1, 1):
        return None
    return measured_optimizer_s(tables.measured_ops, *rank_optimizer_set(inputs, pp_rank))


def _tails(inputs: PlanInputs, dp: int, tables: CostTables) -> tuple[RankTail, ...]:
    m, par, cl = inputs.model, inputs.parallel, inputs.cluster
    opt = inputs.training.optimizer
    per_node, tp = cl.node.gpus_per_node, par.tp
    group, edp = _zero_groups(par, dp)
    dense_bw = cl.node.nic_bytes_per_s if group * tp > per_node else cl.node.nvlink_bytes_per_s
    expert_bw = cl.node.nic_bytes_per_s if par.ep >= per_node or group * tp > per_node else cl.node.nvlink_bytes_per_s
    stages = pipeline_stages(m, par)
    mirrored = schedule_kind(par.schedule).directions(par.pp, par.virtual_stages) > 1  # each stage on two ranks
    tails = []
    for r, part_bytes in enumerate(rank_optimizer_bytes(inputs, dp)):
        sync = {}
        updates = optimizer_updates(inputs, dp, r)
        for s in rank_stages(par, r):
            p = rank_params(m, [stages[s]], par.ep, tp)
            # under SP the whole (replicated) weights saw different tokens on each TP rank: their gradients are
            # all-reduced over the TP group first (Megatron's all-reduce of sequence-parallel parameters)
            tp_s = collective_s(tables, "all_reduce", p.tp_replicated * opt.grad_bytes, tp, cl.node.nvlink_bytes_per_s)
            seconds = (tp_s * par.sp + ring_s(tables, p.dense * opt.grad_bytes, group, dense_bw)
                       + ring_s(tables, p.dense * opt.param_bytes, group, dense_bw)
                       + ring_s(tables, p.expert * opt.grad_bytes, edp, expert_bw)
                       + ring_s(tables, p.expert * opt.param_bytes, edp, expert_bw))
            if mirrored:  # the mirrored copy's gradients meet their twin's
                seconds += tables.collective_latency_s + (p.dense + p.expert) * opt.grad_bytes / cl.node.nic_bytes_per_s
            sync[s] = seconds
        parts_s = _measured_parts(inputs, dp, tables, r)
        if parts_s is None:
            parts_s = {part: memory_s(tables, cl.gpu, nbytes, OPTIMIZER) for part, nbytes in part_bytes.items()}
            # the host's share (launches, the norm's host sync) with the last part, after the device work it adds to
            parts_s["other"] += optimizer_host_s(tables, sum(parts_s.values()), updates)
        tails.append(RankTail(dp_sync_s=sync, optimizer_parts_s=parts_s))
    return tuple(tails)


def step_inputs(
    inputs: PlanInputs, dp: int, microbatches: int, seq_len_tokens: int | None = None, opts: SimOptions = SimOptions()
) -> StepInputs:
    """Everything one step simulation needs, for ``microbatches`` per pipeline at ``seq_len_tokens``."""
    par, m, cl = inputs.parallel, inputs.model, inputs.cluster
    tables = opts.tables or default_tables(cl.gpu.name)
    seq = seq_len_tokens or par.seq_len_tokens
    ctx = cost_context(inputs, tables, seq, beside_comm=opts.comm_sms_always)
    # SP sends the rank's shard; a BF16 run's activations go as BF16 (FP8 only inside the experts' all-to-all)
    p2p_bytes = ctx.tokens * m.hidden_size * activation_bytes_per_element(tables) / (par.tp if par.sp else 1)
    links = Links(
        nic_bytes_per_s=cl.node.nic_bytes_per_s, nvlink_bytes_per_s=cl.node.nvlink_bytes_per_s,
        latency_s=tables.collective_latency_s, p2p_bytes=p2p_bytes,
        p2p_over_nvlink=dp * par.cp * par.tp < cl.node.gpus_per_node,  # pipeline neighbours are dp * cp * tp ranks apart
        cp_over_nvlink=par.cp <= cl.node.gpus_per_node,  # CP ranks are innermost: a group fits in a node
        p2p_blocks=p2p_blocks(inputs), batch_s=posted_batches_s(tables, p2p_bytes) if p2p_blocks(inputs) else None,
    )
    stages, slow_ends = _stage_costs(inputs, par, ctx, opts, microbatches), None
    if comm_sms(inputs, tables) and not opts.comm_sms_always:  # the same units on the SMs an all-to-all leaves
        slow_ctx = cost_context(inputs, tables, seq, beside_comm=True)
        slow = _stage_costs(inputs, par, slow_ctx, opts, microbatches)
        stages = tuple(replace(st, slow_units=v.units) for st, v in zip(stages, slow, strict=True))
        slow_ends = _end_costs(inputs, slow_ctx)
    return StepInputs(
        schedule=make_schedule(par.schedule, par.pp, microbatches, par.virtual_stages),
        stages=stages, ends=_end_costs(inputs, ctx), links=links, tails=_tails(inputs, dp, tables), slow_ends=slow_ends,
        optimizer_barrier=inputs.training.optimizer.grad_clip_norm is not None,
        tp_ends=tp_ends(tables, m, ctx.tokens, par.tp, par.sp, cl.node.nvlink_bytes_per_s),
        wake=WakeCosts(*(wake_points(tables.measured_ops or (), a, ctx.tokens, seq) for a in ("F", "B")),
                       step_start=step_start_s(tables.measured_ops or (), ctx.tokens, seq)),
    )


def compute_bound_s(inputs: PlanInputs, dp: int, microbatches: int, opts: SimOptions = SimOptions()) -> float:
    """The busiest rank's compute seconds in one step, without bubbles or communication: no
    schedule of this layout can take less. The search uses it to skip hopeless layouts."""
    par = inputs.parallel
    tables = opts.tables or default_tables(inputs.cluster.gpu.name)
    ctx = cost_context(inputs, tables, par.seq_len_tokens, beside_comm=opts.comm_sms_always)
    stages = _stage_costs(inputs, par, ctx, replace(opts, coarse=True), microbatches)
    ends = _end_costs(inputs, ctx)
    head_s = ends.head_fwd_s + ends.head_dx_s + ends.head_dw_s

    def stage_s(st: StageCosts) -> float:
        units = sum(u.fwd_s + u.dx_s + u.dw_s for u in st.units)
        return units + (ends.embed_fwd_s if st.has_embedding else 0.0) + (st.heads * head_s if st.has_head else 0.0)

    # Each copy of a stage runs the micro-batches of its direction (DualPipe: half of them).
    share = microbatches / schedule_kind(par.schedule).directions(par.pp, par.virtual_stages)
    tails = _tails(inputs, dp, tables)
    return max(share * sum(stage_s(stages[s]) for s in rank_stages(par, r)) + tails[r].optimizer_s
               for r in range(par.pp))
