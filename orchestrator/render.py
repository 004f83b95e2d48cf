"""Rich tables for the CLI: presets, plan summaries, schedule reports. Units are converted only here.

Names that come from the user or a file (a model's, a phase's, a GPU's, a cost table's) pass through
``shown``: rich would read ``[/x]`` in them as markup, and a terminal would obey escape sequences."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from moeplan.orchestrator.errors import one_line
from moeplan.simulator.accounting.params import activated_params, param_counts
from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.presets.clusters import CLUSTER_PRESETS
from moeplan.simulator.presets.models import MODEL_PRESETS
from moeplan.simulator.schedules.registry import schedule_kind

GiB = 2**30


def shown(name: str) -> str:
    """A name from the user or a file, safe to print: control characters (a terminal's escape sequences)
    spelled out, on one line, and rich's markup escaped."""
    return escape(one_line(name))


def _b(n: float) -> str:
    """A parameter count for people: 671.03B, 2.40M, 9,216."""
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:,.2f}{suffix}"
    return f"{n:,.0f}"


def _flops(x: float) -> str:
    for scale, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x:,.0f} FLOP"


def _gib(x: float) -> str:
    return f"{x / GiB:,.1f} GiB" if x >= 0.1 * GiB else f"{x / 2**20:,.1f} MiB"


def presets_table() -> Group:
    models = Table(title="Model presets", title_justify="left")
    for col in ("name", "type", "layers", "hidden", "experts (top-k)", "params", "activated"):
        models.add_column(col, justify="left" if col in ("name", "type") else "right")
    for name, fn in MODEL_PRESETS.items():
        m = fn()
        experts = f"{m.n_routed_experts}+{m.n_shared_experts} ({m.num_experts_per_tok})" if m.is_moe else "dense"
        attn = "MLA" if m.is_mla else f"GQA {m.kv_heads}kv"
        models.add_row(name, f"{m.model_type}, {attn}", str(m.num_hidden_layers), str(m.hidden_size), experts,
                       _b(param_counts(m).total), _b(activated_params(m)))
    clusters = Table(title="Cluster presets (per GPU; nodes of 8)", title_justify="left")
    for col in ("name", "GPU", "SMs", "HBM GiB", "HBM TB/s", "BF16 TFLOPS", "FP8 TFLOPS", "NVLink GB/s (spec)", "NIC GB/s", "default nodes"):
        clusters.add_column(col, justify="left" if col in ("name", "GPU") else "right")
    for name, fn in CLUSTER_PRESETS.items():
        c = fn()
        g, n = c.gpu, c.node
        clusters.add_row(name, g.name, str(g.sm_count), f"{g.hbm_bytes / GiB:.1f}", f"{g.hbm_bytes_per_s / 1e12:.2f}",
                         f"{g.bf16_flops_per_s / 1e12:.0f}", f"{g.fp8_flops_per_s / 1e12:.0f}",
                         f"{n.nvlink_bytes_per_s / 1e9:.0f} ({n.nvlink_spec_bytes_per_s / 1e9:.0f})",
                         f"{n.nic_bytes_per_s / 1e9:.0f}", str(c.nodes))
    return Group(models, clusters)


def plan_tables(plan: PlanFile) -> Group:
    inp, lay = plan.inputs, plan.layout
    head = Table(title=f"moeplan: {shown(inp.model.name)} on {lay.world} x {shown(inp.cluster.gpu.name)}",
                 title_justify="left", show_header=False)
    head.add_column("what")
    head.add_column("value", justify="right")
    par = inp.parallel
    rows = [
        ("layout", f"PP{lay.pp} ({par.schedule}, {lay.stages} stage{'s' if lay.stages != 1 else ''}) x EP{lay.ep} x DP{lay.dp}"
                   + (f" x CP{lay.cp}" if lay.cp > 1 else "")
                   + (f" x TP{par.tp}{' SP' if par.sp else ''}" if par.tp > 1 else "") + f", ZeRO-{par.zero_stage}"),
        ("micro-batches / step", f"{lay.microbatches} x {par.micro_batch_size} seq x {par.seq_len_tokens} tokens"),
        ("precision / recompute", f"{inp.training.precision} / {par.recompute}"),
        ("params total (no MTP)", f"{plan.params.total:,} ({_b(plan.params.total)})"),
        ("params with MTP", f"{plan.params.total_with_mtp:,} ({_b(plan.params.total_with_mtp)})"),
        ("params activated / token", f"{plan.params.activated:,} ({_b(plan.params.activated)})"),
        ("training FLOPs / token", f"{_flops(plan.flops.model_flops_per_token)} (no MTP: "
                                   f"{_flops(plan.flops.model_flops_per_token_no_mtp)}; with recompute: "
                                   f"{_flops(plan.flops.hardware_flops_per_token)})"),
        ("peak memory / GPU", f"{_gib(plan.memory.peak_bytes_per_gpu)} of {_gib(plan.memory.usable_hbm_bytes)} "
                              f"usable (rank {plan.memory.peak_rank}): {'fits' if plan.memory.fits else 'DOES NOT FIT'}"),
    ]
    for k, v in rows:
        head.add_row(k, v)
    scale, unit = (GiB, "GiB") if plan.memory.peak_bytes_per_gpu >= GiB else (2**20, "MiB")
    mem = Table(title=f"Memory per pipeline rank ({unit})", title_justify="left")
    for col in ("rank", "stages", "layers", "params", "grads", "optimizer", "activations", "transient", "total"):
        mem.add_column(col, justify="right")
    for r in plan.memory.per_rank:
        layers = sum(len(lay.stage_layers[s]) for s in r.stages)
        mem.add_row(str(r.rank), ",".join(map(str, r.stages)), str(layers),
                    *(f"{x / scale:.1f}" for x in (r.param_bytes, r.grad_bytes, r.optimizer_bytes,
                                                 r.activation_bytes, r.transient_bytes, r.total_bytes)))
    if plan.predictions is None:
        return Group(head, mem)
    return Group(head, mem, *prediction_tables(plan))


def prediction_tables(plan: PlanFile) -> list[Table | str]:
    pred, budget = plan.predictions, plan.budget_report
    assert pred is not None and budget is not None
    step, run = pred.step, pred.run
    fixed = f"; fixed: {', '.join(pred.fixed_layout_fields)}" if pred.fixed_layout_fields else ""
    left_out = f"; without {', '.join(pred.techniques)}" if pred.techniques else ""
    t = Table(title=shown(f"Simulated step ({pred.layout_source} layout{fixed}; cost tables {pred.cost_tables}"
                          f"{left_out})"),
              title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("step time", f"{step.step_time_s:.2f} s for {step.tokens_per_step / 1e6:,.1f}M tokens"),
        ("compute / bubble / exposed comm", f"{step.compute_frac:.1%} / {step.bubble_frac:.1%} / {step.exposed_comm_frac:.1%}"),
        ("tokens/s per GPU", f"{step.tokens_per_s_per_gpu:,.0f}"),
        ("MFU (HFU), of dense BF16 peak", f"{step.mfu_frac:.1%} ({step.hfu_frac:.1%})"),
        ("GPU-hours per trillion tokens", f"{run.gpu_hours_per_trillion_tokens:,.0f}"),
        ("whole run", f"{run.tokens_total / 1e12:,.2f}T tokens, {run.wall_clock_days:,.1f} days, "
                      f"{run.gpu_hours_total:,.0f} GPU-hours" + (f", ${run.cost_usd:,.0f}" if run.cost_usd else "")),
    ]
    if budget.within_budget is not None:
        verdict = "within budget" if budget.within_budget else "OVER BUDGET"
        rows.append(("budget", f"{budget.budget_gpu_hours:,.0f} GPU-hours: {verdict} (margin {budget.margin_frac:+.1%})"))
    if pred.candidates_evaluated:
        rows.append(("search", f"{pred.candidates_evaluated} layouts fit in memory and were ranked"))
    for k, v in rows:
        t.add_row(k, v)
    phases = Table(title="Phases", title_justify="left")
    for col in ("phase", "seq len", "layout", "tokens", "steps", "step time s", "days", "GPU-hours"):
        phases.add_column(col, justify="left" if col in ("phase", "layout") else "right")
    for p in run.phases:
        phases.add_row(shown(p.name), f"{p.seq_len_tokens:,}", p.layout.label, f"{p.tokens / 1e9:,.1f}B",
                       f"{p.steps:,.0f}", f"{p.step_time_s:.2f}", f"{p.hours / 24:,.2f}", f"{p.gpu_hours:,.0f}")
    out = [t, phases]
    for i, p in enumerate(run.phases):
        if p.layout.fits is False:
            out.append(f"[yellow]warning:[/] phase {shown(p.name)}: no layout was found that runs its batch, and the main "
                       f"layout needs {p.layout.peak_memory_bytes_per_gpu / GiB:.1f} GiB per GPU at "
                       f"{p.seq_len_tokens:,} tokens ({plan.inputs.cluster.usable_hbm_bytes / GiB:.1f} GiB usable); its time is priced on the "
                       f"main layout's step line regardless (try another: --set training.phases.{i}.cp=N)")
    if pred.top_candidates:
        top = Table(title="Best layouts found (simulated in detail)", title_justify="left")
        with_cp = any(c.parallel.cp > 1 for c in pred.top_candidates)
        with_tp = any(c.parallel.tp > 1 for c in pred.top_candidates)
        with_s = any(c.expert_wgrad_batch is not None for c in pred.top_candidates)  # chosen by the search
        cols = ("#", "pp", "schedule", "ep", "dp") + (("cp",) if with_cp else ()) + (("tp",) if with_tp else ()) + (
            "mbs x M", "recompute") + (("Wgrad S",) if with_s else ()) + ("step s", "tok/s/GPU", "MFU", "mem GiB")
        for col in cols:
            top.add_column(col, justify="right")
        for i, c in enumerate(pred.top_candidates, 1):
            par = c.parallel
            chunks = schedule_kind(par.schedule).uses_virtual_stages
            sched = f"{par.schedule} x{par.virtual_stages}" if chunks else par.schedule
            tp = [f"{par.tp}{' SP' if par.sp else ''}"] if with_tp else []
            top.add_row(str(i), str(par.pp), sched, str(par.ep), str(par.dp), *([str(par.cp)] if with_cp else []), *tp,
                        f"{par.micro_batch_size} x {c.microbatches}", par.recompute,
                        *([str(c.expert_wgrad_batch or "-")] if with_s else []), f"{c.step_time_s:.2f}",
                        f"{c.tokens_per_s_per_gpu:,.0f}", f"{c.mfu_frac:.1%}", f"{c.peak_memory_bytes_per_gpu / GiB:.1f}")
        out.append(top)
    return out


def schedule_view(report: dict[str, Any]) -> Group:
    """``moeplan schedule``'s report (its ``--json`` object): a headline, then a row per rank."""
    closed = report["closed_form"]
    headline = (
        f"[bold]{report['kind']}[/]: pp={report['pp']} ranks, {report['stages']} stages, "
        f"{report['microbatches']} micro-batches; makespan {report['makespan_s']:.6g} s, "
        f"bubble {report['bubble_s']:.6g} s ({100 * report['bubble_frac']:.2f}%); closed form "
        f"{closed['formula']} = {closed['bubble_s']:.6g} s "
        f"({'holds' if closed['holds'] else 'conditions not met: ' + closed['condition']})"
    )
    table = Table("rank", "idle (s)", "peak activations", "parameter copies", "F", "B", "I", "W", "F&B")
    for rank, idle_s in enumerate(report["idle_s_per_rank"]):
        counts = report["action_counts_per_rank"][rank]
        table.add_row(
            str(rank),
            f"{idle_s:.6g}",
            str(report["peak_activations_per_rank"][rank]),
            str(report["parameter_copies_per_rank"][rank]),
            *(str(counts[k]) for k in ("F", "B", "I", "W", "FB")),
        )
    return Group(headline, table)
