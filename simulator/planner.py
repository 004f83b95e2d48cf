"""Build a plan from its inputs (pure), and the flat summary ``moeplan show --json`` prints."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from simulator.accounting.flops import training_flops
from simulator.accounting.layout import LayoutError, check_layout, pipeline_stages, rank_stages
from simulator.accounting.memory import pipeline_memory
from simulator.accounting.params import activated_params, param_counts
from simulator.plan import (
    FlopsReport,
    MemoryReport,
    ParamsReport,
    PlanFile,
    PlanInputs,
    RankMemoryReport,
    ResolvedLayout,
)
from simulator.spec.hardware import ClusterSpec
from simulator.spec.model import ModelSpec
from simulator.spec.parallel import ParallelSpec
from simulator.spec.training import TrainingSpec

MFU_DEFINITION = (
    "model FLOPs per token (matmuls only, 3x forward, causal attention at (T+1)/2 keys, MTP included, "
    "recompute excluded) x tokens per second / (GPUs x dense BF16 peak of the GPU); see docs/accounting.md"
)


def _moeplan_version() -> str:
    try:
        return version("moeplan")
    except PackageNotFoundError:
        return "0+unknown"


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
    if parallel.schedule == "dualpipe" and (m % 2 or m < 2 * parallel.pp):
        raise LayoutError(f"dualpipe needs an even microbatches >= 2 x pp={parallel.pp}, got microbatches={m}")
    if parallel.schedule == "dualpipev" and m < 2 * parallel.pp:
        raise LayoutError(f"dualpipev needs microbatches >= 2 x pp={parallel.pp} stages, got microbatches={m}")
    return m


def build_plan(inputs: PlanInputs, ignored_config_keys: tuple[str, ...] = ()) -> PlanFile:
    """Accounting and memory for the given layout. Raises ``LayoutError`` naming bad values."""
    m, par, tr = inputs.model, inputs.parallel, inputs.training
    dp = check_layout(m, inputs.cluster, par)
    microbatches = resolve_microbatches(par, tr, dp)
    stages = pipeline_stages(m, par)
    layout = ResolvedLayout(
        world=inputs.cluster.num_gpus, pp=par.pp, dp=dp, ep=par.ep, expert_dp=dp // par.ep,
        stages=len(stages), stage_layers=tuple(s.layers for s in stages),
        rank_stages=tuple(rank_stages(par, r) for r in range(par.pp)),
        microbatches=microbatches, tokens_per_microbatch=par.micro_batch_size * par.seq_len_tokens,
    )
    counts = param_counts(m)
    params = ParamsReport(
        by_component={k: v for k, v in vars(counts).items()},
        total=counts.total, total_with_mtp=counts.total_with_mtp,
        activated=activated_params(m), activated_no_embedding=activated_params(m, include_embedding=False),
    )
    tf = training_flops(m, par.seq_len_tokens, par.recompute)
    flops = FlopsReport(
        seq_len_tokens=par.seq_len_tokens, forward_by_component=dict(vars(tf.forward)),
        model_flops_per_token=tf.model_flops, model_flops_per_token_no_mtp=tf.model_flops_no_mtp,
        hardware_flops_per_token=tf.hardware_flops, mfu_definition=MFU_DEFINITION,
    )
    ranks = pipeline_memory(m, par, tr.optimizer, tr.precision, dp, microbatches)
    peak = max(ranks, key=lambda r: r.total_bytes)
    usable = inputs.cluster.usable_hbm_bytes
    memory = MemoryReport(
        per_rank=tuple(RankMemoryReport(**vars(r), total_bytes=r.total_bytes) for r in ranks),
        peak_bytes_per_gpu=peak.total_bytes, peak_rank=peak.rank, usable_hbm_bytes=usable,
        fits=peak.total_bytes <= usable,
    )
    return PlanFile(
        moeplan_version=_moeplan_version(), inputs_sha256=inputs.sha256(), inputs=inputs,
        ignored_config_keys=ignored_config_keys, layout=layout, params=params, flops=flops, memory=memory,
    )


def _largest_ep(model: ModelSpec, dp: int, cap: int = 64) -> int:
    """The largest expert-parallel size <= ``cap`` dividing both ``dp`` and the routed experts."""
    if not model.is_moe:
        return 1
    return max(e for e in range(1, min(cap, dp) + 1) if dp % e == 0 and model.n_routed_experts % e == 0)


def default_parallel(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec) -> ParallelSpec:
    """A memory-feasible layout when none is published or given: the fewest pipeline ranks
    (powers of two dividing the cluster) whose peak memory fits, 1F1B, ZeRO-1, DeepSeek's
    selective recompute (full recompute when that is what fits), and the largest expert-parallel size up to 64 (DeepSeek-V3's EP) that
    divides both the experts and dp. The simulator's search replaces this with a ranked search.
    Falls back to the lowest-memory candidate when none fits, so the plan reports the overflow."""
    world = cluster.num_gpus
    units = model.num_hidden_layers + model.num_nextn_predict_layers
    candidates = []
    for pp in (2**k for k in range(world.bit_length())):
        if pp > units or world % pp:
            continue
        dp = world // pp
        for recompute in ("selective", "full"):
            par = ParallelSpec(pp=pp, ep=_largest_ep(model, dp), schedule="1f1b", recompute=recompute, zero_stage=1)
            try:
                plan = build_plan(PlanInputs(model=model, cluster=cluster, parallel=par, training=training))
            except LayoutError:
                continue
            if plan.memory.fits:
                return par
            candidates.append((plan.memory.peak_bytes_per_gpu, par))
    if not candidates:
        raise LayoutError(f"no pipeline size fits {model.name} on {world} GPUs with global_batch_seqs={training.phases[0].global_batch_seqs}")
    return min(candidates, key=lambda c: c[0])[1]


def summary(plan: PlanFile) -> dict[str, Any]:
    """The flat object ``moeplan show --json`` prints. Keys are a public contract; the ones the
    simulator fills are null until it lands."""
    predictions = plan.predictions or {}
    budget = plan.budget_report or {}
    lay = plan.layout
    return {
        "model": plan.inputs.model.name,
        "cluster": plan.inputs.cluster.name,
        "gpus": lay.world,
        "pp": lay.pp,
        "ep": lay.ep,
        "dp": lay.dp,
        "schedule": plan.inputs.parallel.schedule,
        "microbatches": lay.microbatches,
        "precision": plan.inputs.training.precision,
        "params_total": plan.params.total,
        "params_total_with_mtp": plan.params.total_with_mtp,
        "params_activated": plan.params.activated,
        "flops_per_token": plan.flops.model_flops_per_token,
        "hardware_flops_per_token": plan.flops.hardware_flops_per_token,
        "peak_memory_bytes_per_gpu": plan.memory.peak_bytes_per_gpu,
        "usable_memory_bytes_per_gpu": plan.memory.usable_hbm_bytes,
        "memory_fits": plan.memory.fits,
        "step_time_s": predictions.get("step_time_s"),
        "bubble_frac": predictions.get("bubble_frac"),
        "mfu_frac": predictions.get("mfu_frac"),
        "tokens_per_s_per_gpu": predictions.get("tokens_per_s_per_gpu"),
        "gpu_hours_per_trillion_tokens": predictions.get("gpu_hours_per_trillion_tokens"),
        "gpu_hours_total": budget.get("gpu_hours_total"),
        "within_budget": budget.get("within_budget"),
        "candidates_evaluated": predictions.get("candidates_evaluated"),
        "inputs_sha256": plan.inputs_sha256,
    }
