"""Build a plan from its inputs (pure), and the flat summary ``moeplan show --json`` prints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moeplan.simulator.accounting.context_parallel import cp_tokens
from moeplan.simulator.accounting.flops import training_flops
from moeplan.simulator.accounting.layout import LayoutError, check_layout, pipeline_stages
from moeplan.simulator.accounting.memory import pipeline_memory
from moeplan.simulator.accounting.params import activated_params, param_counts
from moeplan.simulator.contracts.placement import ExpertPlacement
from moeplan.simulator.contracts.plan_file import (
    BudgetReport,
    FlopsReport,
    MemoryReport,
    ParamsReport,
    PlanFile,
    PlanInputs,
    Predictions,
    ResolvedLayout,
    StageRecord,
)
from moeplan.simulator.contracts.predictions import RunPrediction
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.contracts.versions import installed_version
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.engine.build import SimOptions, layer_load
from moeplan.simulator.engine.expert_traffic import group_placement
from moeplan.simulator.planning.predict import predict_step
from moeplan.simulator.planning.run_model import predict_run
from moeplan.simulator.schedules.registry import make_schedule, microbatch_error, rank_stages
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import TrainingSpec

if TYPE_CHECKING:  # search imports wgrad_batch, which imports this module
    from moeplan.simulator.planning.search import SearchResult

MFU_DEFINITION = (
    "model FLOPs per token (matmuls only, 3x forward, causal attention at (T+1)/2 keys, MTP included, "
    "recompute excluded) x tokens per second / (GPUs x dense BF16 peak of the GPU); see docs/design/accounting.md"
)


def _moeplan_version() -> str:
    return installed_version("moeplan") or "0+unknown"


def resolve_microbatches(parallel: ParallelSpec, training: TrainingSpec, dp: int) -> int:
    """Micro-batches per step per pipeline at the first phase's full global batch."""
    if parallel.microbatches is not None:
        m = parallel.microbatches
    else:
        batch = training.phases[0].global_batch_seqs
        per_mb = dp * parallel.micro_batch_size
        if batch % per_mb:
            raise LayoutError(
                f"global_batch_seqs={batch} is not a multiple of dp={dp} x micro_batch_size={parallel.micro_batch_size}"
            )
        m = batch // per_mb
    error = microbatch_error(parallel, m)  # the kind registry: what the schedule's generator admits
    if error:
        raise LayoutError(error)
    return m


def build_plan(inputs: PlanInputs, ignored_config_keys: tuple[str, ...] = ()) -> PlanFile:
    """Accounting and memory for the given layout. Raises ``LayoutError`` naming bad values."""
    m, par, tr = inputs.model, inputs.parallel, inputs.training
    dp = check_layout(m, inputs.cluster, par)
    microbatches = resolve_microbatches(par, tr, dp)
    schedule = make_schedule(par.schedule, par.pp, microbatches, par.virtual_stages)
    stages = pipeline_stages(m, par)
    layout = ResolvedLayout(
        world=inputs.cluster.num_gpus, pp=par.pp, dp=dp, cp=par.cp, ep=par.ep, tp=par.tp,
        expert_dp=dp * par.cp * par.tp // par.ep,
        stages=len(stages), stage_layers=tuple(s.layers for s in stages),
        stage_records=tuple(StageRecord.of(s, m.num_hidden_layers) for s in stages),
        rank_stages=tuple(rank_stages(par, r) for r in range(par.pp)),
        microbatches=microbatches, tokens_per_microbatch=par.micro_batch_size * par.seq_len_tokens,
        tokens_per_gpu_per_microbatch=cp_tokens(par.micro_batch_size, par.seq_len_tokens, par.cp),
    )
    counts = param_counts(m)
    params = ParamsReport(
        by_component={k: v for k, v in vars(counts).items()},
        total=counts.total, total_with_mtp=counts.total_with_mtp,
        activated=activated_params(m), activated_no_embedding=activated_params(m, include_embedding=False),
    )
    tf = training_flops(m, par.seq_len_tokens, par.recompute, par.cp)
    flops = FlopsReport(
        seq_len_tokens=par.seq_len_tokens, forward_by_component=dict(vars(tf.forward)),
        model_flops_per_token=tf.model_flops, model_flops_per_token_no_mtp=tf.model_flops_no_mtp,
        hardware_flops_per_token=tf.hardware_flops, mfu_definition=MFU_DEFINITION,
    )
    ranks = pipeline_memory(m, par, tr.optimizer, tr.precision, dp, microbatches, schedule, tr.kernels.fusion,
                            tr.kernels.expert_wgrad_batch)
    peak = max(ranks, key=lambda r: r.total_bytes)
    usable = inputs.cluster.usable_hbm_bytes
    memory = MemoryReport(
        per_rank=ranks,
        peak_bytes_per_gpu=peak.total_bytes, peak_rank=peak.rank, usable_hbm_bytes=usable,
        fits=peak.total_bytes <= usable,
    )
    return PlanFile(
        moeplan_version=_moeplan_version(), inputs_sha256=inputs.sha256(), inputs=inputs,
        ignored_config_keys=ignored_config_keys, layout=layout, params=params, flops=flops, memory=memory,
        schedule=schedule,
    )


GiB = 2**30


def check_memory(plan: PlanFile) -> None:
    """Reject a layout whose peak memory exceeds the usable HBM, with the numbers."""
    mem = plan.memory
    if mem.fits:
        return
    worst = mem.per_rank[mem.peak_rank]
    cl = plan.inputs.cluster
    raise LayoutError(
        f"peak memory {mem.peak_bytes_per_gpu / GiB:.1f} GiB on pipeline rank {mem.peak_rank} (params "
        f"{worst.param_bytes / GiB:.1f}, grads {worst.grad_bytes / GiB:.1f}, optimizer {worst.optimizer_bytes / GiB:.1f}, "
        f"activations {worst.activation_bytes / GiB:.1f} GiB) exceeds {mem.usable_hbm_bytes / GiB:.1f} GiB usable on "
        f"{cl.gpu.name} ({cl.gpu.hbm_bytes / GiB:.1f} GiB less {cl.node.memory_reserved_bytes / GiB:.1f} GiB reserved)"
    )


def budget_report(inputs: PlanInputs, run: RunPrediction) -> BudgetReport:
    budget = inputs.budget.gpu_hours
    return BudgetReport(
        gpu_hours_total=run.gpu_hours_total, budget_gpu_hours=budget, cost_usd=run.cost_usd,
        within_budget=None if budget is None else run.gpu_hours_total <= budget,
        margin_frac=None if budget is None else 1.0 - run.gpu_hours_total / budget,
    )


def plan_with_predictions(
    inputs: PlanInputs, ignored_config_keys: tuple[str, ...], layout_source: str,
    searched: SearchResult | None = None, opts: SimOptions = SimOptions(), fixed_fields: tuple[str, ...] = (),
) -> PlanFile:
    """Accounting, memory (rejected over HBM), one simulated step, the whole run and the budget."""
    plan, _ = plan_with_trace(inputs, ignored_config_keys, layout_source, searched, opts, fixed_fields, trace=False)
    return plan


def plan_with_trace(
    inputs: PlanInputs, ignored_config_keys: tuple[str, ...], layout_source: str,
    searched: SearchResult | None = None, opts: SimOptions = SimOptions(), fixed_fields: tuple[str, ...] = (),
    trace: bool = True,
) -> tuple[PlanFile, list[TraceEvent]]:
    """``plan_with_predictions`` and the trace events of the step it simulated (empty without ``trace``),
    so that drawing or exporting the step costs no second simulation."""
    plan = build_plan(inputs, ignored_config_keys)
    check_memory(plan)
    lay = plan.layout
    step, events = predict_step(inputs, lay.dp, lay.microbatches, opts=opts, trace=trace)
    run = predict_run(inputs, lay.dp, (lay.microbatches, step.step_time_s), opts)
    tables = opts.tables or default_tables(inputs.cluster.gpu.name)
    predictions = Predictions(
        step=step, run=run, layout_source=layout_source, cost_tables=tables.name, fixed_layout_fields=fixed_fields,
        candidates_evaluated=searched.evaluated if searched else 0,
        top_candidates=searched.ranked if searched else (),
    )
    return plan.model_copy(update={
        "predictions": predictions, "budget_report": budget_report(inputs, run),
        "placement": plan_placement(inputs, opts),
    }), events


def plan_placement(inputs: PlanInputs, opts: SimOptions) -> ExpertPlacement | None:
    """The placement the simulation assumed, for every MoE layer (and MTP module) of one EP group."""
    m, par = inputs.model, inputs.parallel
    if not m.is_moe or par.ep == 1:
        return None
    layers = [i for i in range(m.num_hidden_layers) if m.is_moe_layer(i)]
    layers += list(range(m.num_hidden_layers, m.num_hidden_layers + m.num_nextn_predict_layers))
    placements = [group_placement(m, inputs.cluster, par.ep, opts.redundant_experts, layer_load(opts, i)) for i in layers]
    first = placements[0]
    return ExpertPlacement(policy=first.policy, num_logical_experts=m.n_routed_experts, num_groups=m.n_group,
                           num_nodes=first.num_nodes, slots_per_gpu=[int(x) for x in first.slots_per_gpu],
                           layer_ids=layers, phy2log=[p.phy2log[0].tolist() for p in placements])


def summary(plan: PlanFile) -> dict[str, Any]:
    """The flat object ``moeplan show --json`` prints. Keys are a public contract; the simulator's
    are null in a plan made without it."""
    pred, budget, lay = plan.predictions, plan.budget_report, plan.layout
    step = pred.step if pred else None
    run = pred.run if pred else None
    return {
        "model": plan.inputs.model.name,
        "cluster": plan.inputs.cluster.name,
        "gpus": lay.world,
        "pp": lay.pp,
        "ep": lay.ep,
        "dp": lay.dp,
        "cp": lay.cp,
        "tp": plan.inputs.parallel.tp,
        "sp": plan.inputs.parallel.sp,
        "schedule": plan.inputs.parallel.schedule,
        "microbatches": lay.microbatches,
        "micro_batch_size": plan.inputs.parallel.micro_batch_size,
        "recompute": plan.inputs.parallel.recompute,
        "precision": plan.inputs.training.precision,
        "layout_source": pred.layout_source if pred else None,
        "cost_tables": pred.cost_tables if pred else None,
        "fixed_layout_fields": list(pred.fixed_layout_fields) if pred else None,
        "params_total": plan.params.total,
        "params_total_with_mtp": plan.params.total_with_mtp,
        "params_activated": plan.params.activated,
        "flops_per_token": plan.flops.model_flops_per_token,
        "hardware_flops_per_token": plan.flops.hardware_flops_per_token,
        "peak_memory_bytes_per_gpu": plan.memory.peak_bytes_per_gpu,
        "usable_memory_bytes_per_gpu": plan.memory.usable_hbm_bytes,
        "memory_fits": plan.memory.fits,
        "step_time_s": step.step_time_s if step else None,
        "bubble_frac": step.bubble_frac if step else None,
        "exposed_comm_frac": step.exposed_comm_frac if step else None,
        "mfu_frac": step.mfu_frac if step else None,
        "tokens_per_s_per_gpu": step.tokens_per_s_per_gpu if step else None,
        "tokens_per_day": run.tokens_per_day if run else None,
        "gpu_hours_per_trillion_tokens": run.gpu_hours_per_trillion_tokens if run else None,
        "wall_clock_days": run.wall_clock_days if run else None,
        "gpu_hours_total": budget.gpu_hours_total if budget else None,
        "cost_usd": budget.cost_usd if budget else None,
        "budget_gpu_hours": budget.budget_gpu_hours if budget else None,
        "within_budget": budget.within_budget if budget else None,
        "budget_margin_frac": budget.margin_frac if budget else None,
        "candidates_evaluated": pred.candidates_evaluated if pred else None,
        "phases": [{"name": p.name, "seq_len_tokens": p.seq_len_tokens, "layout_source": p.layout.source,
                    "cp": p.layout.cp, "dp": p.layout.dp, "micro_batch_size": p.layout.micro_batch_size,
                    "microbatches": p.layout.microbatches, "step_time_s": p.step_time_s, "gpu_hours": p.gpu_hours,
                    "memory_fits": plan.memory.fits if p.layout.fits is None else p.layout.fits}
                   for p in run.phases] if run else None,
        "inputs_sha256": plan.inputs_sha256,
    }
