"""HTML tables of a plan: the summary, the training phases and the top candidate layouts.

Pure string building (no plotly); every cell is escaped. Display units (GiB, B params, GFLOP, %)
are chosen here only.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from moeplan.simulator.contracts.plan_file import Candidate
from moeplan.simulator.contracts.predictions import PhasePrediction

GiB = 2**30


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], css_class: str) -> str:
    """A ``<table>`` with one header row; cells are escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def pct(frac: float) -> str:
    return f"{100 * frac:.1f}%"


def count(n: float) -> str:
    """671e9 -> "671 B", 290e3 -> "290 K" (DeepSeek's "671B parameters")."""
    for scale, suffix in ((1e12, " T"), (1e9, " B"), (1e6, " M"), (1e3, " K")):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:.4g}"


def flops(n: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {prefix}FLOP"
    return f"{n:.4g} FLOP"


def size(n_bytes: float) -> str:
    for scale, unit in ((GiB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def budget_verdict(s: dict[str, Any]) -> str:
    """One line: within / over budget with the margin, or why there is no verdict."""
    if s["budget_gpu_hours"] is None:
        return "no budget set"
    used = f"{s['gpu_hours_total']:,.0f} of {s['budget_gpu_hours']:,.0f} GPU-hours"
    margin = s["budget_margin_frac"]
    if s["within_budget"]:
        return f"within budget: {used}, margin {100 * margin:.1f}%"
    return f"OVER budget: {used}, short by {-100 * margin:.1f}%"


def summary_rows(s: dict[str, Any], gpu_name: str) -> list[tuple[str, str]]:
    """(quantity, value) rows from ``simulator.planner.summary(plan)``."""
    cp = (f" x CP{s['cp']}" if s["cp"] > 1 else "") + (f" x TP{s['tp']}{' SP' if s['sp'] else ''}" if s["tp"] > 1 else "")
    layout = (
        f"PP{s['pp']} x EP{s['ep']} x DP{s['dp']}{cp}, {s['schedule']}, {s['microbatches']} micro-batches "
        f"of {s['micro_batch_size']} sequence(s), recompute {s['recompute']}, {s['precision']}"
    )
    if s["layout_source"] is not None:
        layout += f" (layout {s['layout_source']})"
    fits = "fits" if s["memory_fits"] else "DOES NOT FIT"
    rows = [
        ("Model", s["model"]),
        ("Cluster", f"{s['cluster']}: {s['gpus']} x {gpu_name}"),
        ("Layout", layout),
        ("Parameters", f"{count(s['params_total'])} total ({count(s['params_total_with_mtp'])} with MTP), "
                       f"{count(s['params_activated'])} activated per token"),
        ("FLOPs per token", f"{flops(s['flops_per_token'])} model "
                            f"({flops(s['hardware_flops_per_token'])} with recompute)"),
        ("Peak memory per GPU", f"{size(s['peak_memory_bytes_per_gpu'])} of "
                                f"{size(s['usable_memory_bytes_per_gpu'])} usable: {fits}"),
    ]
    if s["step_time_s"] is None:
        return rows + [("Simulation", "not run: accounting-only plan")]
    cost = s["cost_usd"]
    return rows + [
        ("Step time", f"{s['step_time_s']:.4g} s"),
        ("Pipeline bubble", pct(s["bubble_frac"])),
        ("Exposed communication", pct(s["exposed_comm_frac"])),
        ("MFU", pct(s["mfu_frac"])),
        ("Tokens / s / GPU", f"{s['tokens_per_s_per_gpu']:,.0f}"),
        ("GPU-hours per trillion tokens", f"{s['gpu_hours_per_trillion_tokens']:,.0f}"),
        ("Whole run", f"{s['gpu_hours_total']:,.0f} GPU-hours, {s['wall_clock_days']:.1f} days"),
        ("Cost", "no price set" if cost is None else f"${cost:,.0f}"),
        ("Budget", budget_verdict(s)),
    ]


def summary_table(s: dict[str, Any], gpu_name: str) -> str:
    return html_table(("quantity", "value"), summary_rows(s, gpu_name), "summary")


def phases_table(phases: Sequence[PhasePrediction]) -> str:
    rows = [
        (p.name, f"{p.seq_len_tokens:,}", p.layout.label, count(p.tokens), f"{p.steps:,.0f}", f"{p.step_time_s:.4g}",
         f"{p.hours:,.1f}", f"{p.gpu_hours:,.0f}")
        for p in phases
    ]
    header = ("phase", "sequence (tokens)", "layout", "tokens", "steps", "step time (s)", "hours", "GPU-hours")
    return html_table(header, rows, "phases")


def candidates_table(candidates: Sequence[Candidate], world: int) -> str:
    """Ranked layouts; ``world`` GPUs give the data-parallel degree a candidate left unset. The expert Wgrad batch
    each was ranked at, where the search chose it."""
    with_s = any(c.expert_wgrad_batch is not None for c in candidates)
    rows = [
        (str(i), f"PP{c.parallel.pp} EP{c.parallel.ep} DP"
         f"{c.parallel.dp or world // (c.parallel.pp * c.parallel.cp * c.parallel.tp)}"
         + (f" CP{c.parallel.cp}" if c.parallel.cp > 1 else "")
         + (f" TP{c.parallel.tp}{' SP' if c.parallel.sp else ''}" if c.parallel.tp > 1 else ""),
         c.parallel.schedule, str(c.parallel.micro_batch_size), c.parallel.recompute, str(c.microbatches),
         *([str(c.expert_wgrad_batch or "-")] if with_s else []),
         f"{c.step_time_s:.4g}", f"{c.tokens_per_s_per_gpu:,.0f}", pct(c.mfu_frac),
         size(c.peak_memory_bytes_per_gpu))
        for i, c in enumerate(candidates, start=1)
    ]
    header = ("#", "layout", "schedule", "micro-batch size", "recompute", "micro-batches",
              *(("expert Wgrad batch",) if with_s else ()), "step time (s)", "tokens/s/GPU", "MFU", "peak memory")
    return html_table(header, rows, "candidates")
