"""Validation of the simulator against DeepSeek-V3's published training cost; writes docs/results/validation.md.

    python benchmarks/validate_v3.py

Runs the issue's command in-process, `moeplan plan --model deepseek-v3 --cluster h800 --nodes 256
--pp 16 --ep 64 --schedule dualpipe --precision fp8 --seq-len 4096 --global-batch 15360 --tokens 14.8T`,
and compares with TR Table 1 and §9 (180K H800 GPU-hours per trillion tokens; 2664K pre-training,
119K context extension), once as is (DeepGEMM's 2025 FP8 GEMMs) and once with `--cost-tables
hopper-cutlass36-2024` (the FP8 GEMMs of the run's time). No cost-model entry is derived from these
published results.
It also checks the schedule formulas: with free communication and constant action times the
simulated bubbles equal the DualPipe README table (the same check runs in tests/simulator/engine/test_step.py).
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from moeplan.orchestrator.inputs import build_request  # noqa: E402
from moeplan.simulator.accounting.layout import LayoutError  # noqa: E402
from moeplan.simulator.costs.elementwise import end_bytes_per_token, layer_bytes_per_token  # noqa: E402
from moeplan.simulator.costs.kernels import memory_s  # noqa: E402
from moeplan.simulator.costs.memory_kernels import (  # noqa: E402
    MemoryKernelPoint,
    elementwise_file,
    packaged_elementwise,
)
from moeplan.simulator.costs.tables import CostTables, default_tables, named_tables  # noqa: E402
from moeplan.simulator.engine.build import SimOptions, step_inputs  # noqa: E402
from moeplan.simulator.engine.step import Links, RankTail, StageCosts, StepInputs, StepSimulation  # noqa: E402
from moeplan.simulator.engine.unit_costs import EndCosts, UnitCosts  # noqa: E402
from moeplan.simulator.planning.planner import plan_with_predictions  # noqa: E402
from moeplan.simulator.planning.predict import predict_step  # noqa: E402
from moeplan.simulator.planning.run_model import predict_phase  # noqa: E402
from moeplan.simulator.presets.clusters import h800_gpu  # noqa: E402
from moeplan.simulator.presets.models import deepseek_v3  # noqa: E402
from moeplan.simulator.schedules import Durations, closed_form_bubble, make_schedule  # noqa: E402
from moeplan.simulator.traffic.all_to_all import WirePayload  # noqa: E402

TR_GPU_HOURS_PER_T = 180e3  # TR §9 / Table 1
TR_PRETRAIN_GPU_HOURS = 2664e3
TR_CONTEXT_GPU_HOURS = 119e3
CUTLASS36 = "hopper-cutlass36-2024"
ERA_2023 = "hopper-bf16-fa2-2023"
EW_FILE = elementwise_file(h800_gpu().name)  # the memory-bound kernels' measurement file the H800's tables take
SETS = ["parallel.pp=16", "parallel.ep=64", 'parallel.schedule="dualpipe"', 'training.precision="fp8"',
        "parallel.seq_len_tokens=4096", "training.phases.0.global_batch_seqs=15360", "training.phases.0.tokens=14.8e12"]


def v3_plan(extra: tuple[str, ...] = (), opts: SimOptions = SimOptions()):
    req = build_request("deepseek-v3", "h800", 256, SETS + list(extra))
    return plan_with_predictions(req.inputs, (), "given", opts=opts, fixed_fields=tuple(sorted(req.fixed)))


def sensitivity() -> list[str]:
    """How the headline moves under other published or plausible inputs (none of them fitted)."""
    tables = default_tables("H800-SXM5")
    zipf = tuple(float(x) for x in 1 / np.arange(1, 257) ** 0.5)
    cases = [
        ("as above", (), SimOptions()),
        ("FP8 GEMMs at DeepSeek's internal CUTLASS-3.6 kernel, the 2024 run's (DeepGEMM's TFLOPS / its published "
         f"speedup; `{CUTLASS36}`)", (), SimOptions(tables=named_tables(CUTLASS36, "H800-SXM5"))),
        ("IB at DeepEP's first EP64 figures, 45 GB/s (README 2025-02-24, reference §11.1)",
         ("cluster.node.nic_bytes_per_s=45e9",), SimOptions()),
        ("24 SMs for communication (DeepEP V1 example) instead of 20", (),
         SimOptions(tables=tables.model_copy(update={"comm_sms": 24}))),
        ("the 20 communication SMs withheld from all compute whenever EP > 1 (the model before issue 21) instead of "
         "only while an all-to-all runs beside it", (), SimOptions(comm_sms_always=True)),
        ("every EP peer at uniform routing's expectation (a perfectly balanced load: no wait for the slowest of the "
         "64 random routings of a micro-batch; the all-to-all before issue 21's capability 3)", (),
         SimOptions(peer_wait=False)),
        ("GEMMs beside an all-to-all at the linear SM share (before capability 7) instead of in waves of 128 x 128 "
         "tiles on the SMs left (the HBM interference term is 0 in both: not measured until a GPU `moeplan calibrate`)",
         (), SimOptions(tables=tables.model_copy(update={"gemm_sm_share": "linear"}))),
        ("attention at FlashAttention-2's H100 figures (FA3 paper, Fig. 5-6: the attention of `hopper-bf16-fa2-2023`) "
         "instead of our SDPA measurements", (), SimOptions(tables=tables.model_copy(update=_fa2_attention()))),
        ("DualPipe left out (`--techniques no-dualpipe`), 1F1B at the same layout", ('parallel.schedule="1f1b"',),
         SimOptions()),
        ("full recompute (the reference for the next row: a BF16 run needs it to fit at this layout)",
         ('parallel.recompute="full"',), SimOptions()),
        ("a 2023-24 BF16 setup: `--techniques no-fp8 --cost-tables hopper-bf16-fa2-2023` (cuBLAS BF16 GEMMs, "
         "FlashAttention-2), full recompute to fit", ('training.precision="bf16"', 'parallel.recompute="full"'),
         SimOptions(tables=named_tables(ERA_2023, "H800-SXM5"))),
        ("flat all-to-all (`parallel.ep_backend=\"flat\"`: IB once per target GPU, no NVLink forwarding, k weights "
         "and k slot ids per row, as the runtime's `all_to_all_single`) instead of DeepEP's once per node",
         ('parallel.ep_backend="flat"',), SimOptions()),
        ("dispatch in BF16 (2 B per element, as a BF16 run sends) instead of FP8 with its 1x128 scales", (),
         SimOptions(payload=WirePayload.of(7168, 8, "bf16", "deepep"))),
        ("flat all-to-all with BF16 dispatch (what the runtime's `ExpertParallelMoE` sends today in an FP8 run)",
         ('parallel.ep_backend="flat"',), SimOptions(payload=WirePayload.of(7168, 8, "bf16", "flat"))),
        ("uniform routing sampled per micro-batch (Monte Carlo, 4096 tokens per GPU) instead of the closed form's "
         "slowest of 64 peers (capability 3: Poisson counts at Blom's order statistic)", (),
         SimOptions(expert_load=(1.0,) * 256, redundant_experts=0)),
        ("expert load Zipf 0.5, balanced with 32 redundant experts", (),
         SimOptions(expert_load=zipf, redundant_experts=32)),
        (f"memory-bound kernels all at the copy bandwidth ({tables.memory_frac:.0%} of HBM, the single fraction before "
         "the per-class table; the same ideal bytes) instead of each class's measured fraction", (),
         SimOptions(tables=tables.model_copy(update={"memory_kernels": ()}))),
        ("memory-bound kernels eager, as our runtime runs them (`training.kernels.fusion=\"eager\"`: permutation "
         "and combine on the compute stream, separate FP8 casts and transposes, RoPE and the router as chains of "
         "small kernels) instead of the fused kernels of DeepSeek's recipe", ('training.kernels.fusion="eager"',),
         SimOptions()),
        ("the loss as our runtime computes it, FP32 cross-entropy over upcast logits (`training.kernels.loss="
         "\"fp32\"`) instead of one fused pass over the BF16 logits (the recipe's: an assumption, DeepSeek has not "
         "published its loss kernel)", ('training.kernels.loss="fp32"',), SimOptions()),
        ("the casts with transpose and the routed experts' FP8 backward casts (`expert_cast`) at the copy bandwidth "
         f"instead of the measured `fp8_cast` fraction ({tables.memory_fracs('fp8_cast')[1]:.1%} backward: our "
         "quantisers one at a time, `elementwise.STAND_INS`, until a table times them)", (),
         SimOptions(tables=tables.model_copy(update={"memory_kernels": tables.memory_kernels + tuple(
             MemoryKernelPoint(kernel=k, fwd_frac=tables.memory_frac, source="copy bandwidth")
             for k in ("fused_fp8_cast", "expert_cast"))}))),
        ("router scores and top-k at the copy bandwidth instead of their measured "
         f"{tables.memory_fracs('router')[0]:.1%} (a dozen small eager kernels on 4096 x 256 FP32, timed one call at "
         "a time)", (),
         SimOptions(tables=tables.model_copy(update={"memory_kernels": tuple(
             p for p in tables.memory_kernels if p.kernel != "router")}))),
    ]
    rows = []
    for name, extra, opts in cases:
        try:
            per_t = v3_plan(extra, opts).predictions.run.gpu_hours_per_trillion_tokens
        except LayoutError as exc:  # a variant that does not fit at the published layout says so
            rows.append(f"| {name} | does not fit: {str(exc).split(' (')[0]} | - |")
            continue
        rows.append(f"| {name} | {per_t:,.0f} | {per_t / TR_GPU_HOURS_PER_T - 1:+.1%} |")
    return rows


def _fa2_attention() -> dict:
    """The attention entries of the ``hopper-bf16-fa2-2023`` tables, to put into the default ones."""
    era = named_tables(ERA_2023, "H800-SXM5")
    return {k: getattr(era, k) for k in ("attention_by_seq", "attention_fwd_frac", "attention_fwd_bwd_frac",
                                         "attention_source")}


def _with_alternative(tables: CostTables, kernel: str) -> CostTables:
    """``tables`` with ``kernel`` at the fractions of the implementation measured beside the table's."""
    data = packaged_elementwise(h800_gpu().name)  # the file the validated GPU's tables take
    row = next(r for r in data.kernels if r.kernel == kernel and not r.in_table and r.fwd is not None)
    alt = MemoryKernelPoint(kernel=kernel, **row.point_fields(), source=row.implementation)
    return tables.model_copy(update={"memory_kernels": tuple(
        alt if p.kernel == kernel else p for p in tables.memory_kernels)})


def memory_bound() -> list[str]:
    """Per class, the memory-bound kernels of one MoE layer and 4096-token micro-batch on the H800."""
    tables, m, gpu = default_tables("H800-SXM5"), deepseek_v3(), h800_gpu()
    tokens, per_token = 4096, layer_bytes_per_token(m, True, "fp8", m.num_experts_per_tok)
    per_token |= end_bytes_per_token(m)

    def ms(t: CostTables, kernel: str) -> float:
        b = per_token[kernel]
        return 1e3 * (memory_s(t, gpu, tokens * b.fwd_bytes, kernel) + memory_s(t, gpu, tokens * b.bwd_bytes, kernel, True))

    copy = tables.model_copy(update={"memory_kernels": ()})
    rows = ["| class | ideal MB (fwd + bwd) | HBM fraction, fwd / bwd | ms at it | ms at the copy bandwidth |",
            "|---|---|---|---|---|"]
    for kernel, b in per_token.items():
        fwd, bwd = tables.memory_fracs(kernel)
        bwd_text = f"{bwd:.1%}" if b.bwd_bytes else "— (not modelled)"
        rows.append(f"| {kernel} | {tokens * (b.fwd_bytes + b.bwd_bytes) / 1e6:,.0f} | {fwd:.1%} / {bwd_text} | "
                    f"{ms(tables, kernel):.2f} | {ms(copy, kernel):.2f} |")
    layer = [k for k in per_token if k not in ("embedding", "cross_entropy")]
    rows.append(f"| one MoE layer | | | {sum(ms(tables, k) for k in layer):.2f} | {sum(ms(copy, k) for k in layer):.2f} |")
    return rows


def comm_ratio() -> list[str]:
    """TR §3.2.2: cross-node expert parallelism gives a computation-to-communication ratio of about 1:1."""
    req = build_request("deepseek-v3", "h800", 256, SETS)
    inputs = step_inputs(req.inputs, 128, 120)
    u = next(u for st in inputs.stages for u in st.units if u.moe)
    links = inputs.links
    fwd_comm = 2 * links.latency_s + (u.dispatch_ib_bytes + u.combine_ib_bytes) / links.nic_bytes_per_s
    fwd = u.attn_fwd_s + u.mlp_fwd_s + u.experts_fwd_s
    bwd = u.dx_s + u.dw_s  # attention, MLP and experts, input and weight gradients, and the recompute
    return [
        "TR §3.2.2: \"the cross-node expert parallelism introduces an inefficient computation-to-communication "
        "ratio of approximately 1:1\". The simulator's ratio for one MoE layer and one micro-batch of the "
        "published layout, from the same cost tables (communication = the all-to-all's IB bytes over the "
        "NIC plus one collective latency per all-to-all, as the engine charges them):",
        "",
        "| | computation | IB all-to-all | ratio |",
        "|---|---|---|---|",
        f"| forward | {fwd * 1e3:.2f} ms | {fwd_comm * 1e3:.2f} ms | 1 : {fwd_comm / fwd:.2f} |",
        f"| forward + backward | {(fwd + bwd) * 1e3:.2f} ms | {2 * fwd_comm * 1e3:.2f} ms | "
        f"1 : {2 * fwd_comm / (fwd + bwd):.2f} |",
        "",
        f"The backward's compute is {bwd / fwd:.1f}x the forward's while its all-to-all moves the same bytes. "
        "If the TR's ratio refers to the forward, the simulator's all-to-all is "
        f"{1 - fwd_comm / fwd:.0%} cheaper relative to compute than DeepSeek's; DualPipe hides most of it either "
        "way (exposed communication above).",
    ]


def own_runs() -> list[str]:
    """Our own measured runs (``measured_runs.json``, each copied from its results page) against the predictions."""
    doc = json.loads((Path(__file__).with_name("measured_runs.json")).read_text())

    def err(predicted, measured) -> str:
        return "—" if predicted is None else f"{predicted:.4g} ({predicted / measured - 1:+.1%})"  # as model_step

    rows = ["| run | machine, date, tree | measured s | packaged tables | calibrated there | recalibrated from "
            "the run | page |", "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        rows.append(f"| {r['run']} | {r['machine']}, {r['date']}, {r['tree']} | {r['measured_s']:.4g} | "
                    f"{err(r['packaged_s'], r['measured_s'])} | {err(r['calibrated_s'], r['measured_s'])} | "
                    f"{err(r.get('recalibrated_s'), r['measured_s'])} | `{r['page']}` |")
    calibrated = [r["calibrated_s"] / r["measured_s"] - 1 for r in doc["runs"] if r["calibrated_s"] is not None]
    worst = max(calibrated, key=abs)
    return [doc["about"] + " In brackets: predicted / measured - 1 (`moeplan check` prints measured against "
            "predicted, the other way round).", "", *rows, "",
            f"Target (issue 21): each calibrated prediction within 5% of the measured step (10% at most). Largest "
            f"calibrated error here: {worst:+.1%}: {'met' if abs(worst) <= 0.05 else 'not met'}. The packaged "
            "tables are the repository's (the H100's and the `cpu` cluster's generic ones); `model_step` predicts "
            "from the packaged tables only."]


def schedule_check() -> list[str]:
    f, b, w = 1.0, 2.0, 1.0
    unit = UnitCosts(attn_fwd_s=f, attn_dx_s=b - w, attn_dw_s=w, mlp_fwd_s=0, mlp_dx_s=0, mlp_dw_s=0,
                     experts_fwd_s=0, experts_dx_s=0, experts_dw_s=0, recompute_s=0)
    rows = []
    for kind in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        for pp in (4, 8, 16):
            sched = make_schedule(kind, pp, 4 * pp)
            inp = StepInputs(
                schedule=sched, stages=tuple(StageCosts((unit,), False, False, 0) for _ in range(sched.num_stages)),
                ends=EndCosts(0, 0, 0, 0), links=Links(1, 1, 0, 0, False),
                tails=tuple(RankTail({}, {}) for _ in range(pp)))
            res = StepSimulation(inp, free_comm=True).run()
            form = closed_form_bubble(kind, pp, 4 * pp, Durations(f_s=f, b_s=b, w_s=w, fb_s=f + b))
            sim = res.step_time_s - min(res.compute_busy_s)
            rows.append(f"| {kind} | {pp} | {form.formula} | {form.bubble_s:g} | {sim:g} |")
    return rows


def _gib(layout, main: float) -> str:
    peak = layout.peak_memory_bytes_per_gpu
    text = f"{(peak if peak is not None else main) / 2**30:.1f} GiB"
    return text + " (does not fit)" if layout.fits is False else text


def forced_cp1(plan) -> tuple[float, float, float]:
    """The context-extension phases priced on the pre-training layout's step line (cp = 1)."""
    inputs, lay = plan.inputs, plan.layout
    out = [predict_phase(inputs, lay.dp, p.model_copy(update={"cp": 1}), None) for p in inputs.training.phases[1:]]
    return out[0].step_time_s, out[1].step_time_s, sum(p.gpu_hours for p in out)


def phase_breakdown(plan) -> list[str]:
    """Where the time of each context-extension step goes, on its chosen layout."""
    rows = ["| phase | compute | bubble | exposed communication | MFU (HFU) |", "|---|---|---|---|---|"]
    for p in plan.predictions.run.phases[1:]:
        lay = p.layout
        if lay.source != "chosen":
            continue
        par = plan.inputs.parallel.model_copy(update={"cp": lay.cp, "dp": None, "micro_batch_size": lay.micro_batch_size,
                                                      "seq_len_tokens": p.seq_len_tokens})
        step, _ = predict_step(plan.inputs.model_copy(update={"parallel": par}), lay.dp, int(lay.microbatches))
        rows.append(f"| {p.name} | {step.compute_frac:.1%} | {step.bubble_frac:.1%} | {step.exposed_comm_frac:.1%} | "
                    f"{step.mfu_frac:.1%} ({step.hfu_frac:.1%}) |")
    return rows


def headline(plans) -> list[str]:
    """Predicted vs TR for each plan of ``plans`` (cost-table label -> plan), one column pair per plan."""
    def row(name: str, tr: float, tr_text: str, value) -> str:
        cells = "".join(f" {value(p):,.0f} | {value(p) / tr - 1:+.1%} |" for p in plans.values())
        return f"| {name} |{cells} {tr_text} |"

    return [
        "| quantity |" + "".join(f" predicted, {label} | error |" for label in plans) + " DeepSeek-V3 TR |",
        "|---|" + "---|---|" * len(plans) + "---|",
        row("H800 GPU-hours per trillion tokens", TR_GPU_HOURS_PER_T, "180,000",
            lambda p: p.predictions.run.gpu_hours_per_trillion_tokens),
        row("pre-training GPU-hours (14.8T, with the 3072 -> 15360 batch ramp)", TR_PRETRAIN_GPU_HOURS, "2,664,000",
            lambda p: p.predictions.run.phases[0].gpu_hours),
        row("context extension GPU-hours (32K and 128K, 1000 steps each)", TR_CONTEXT_GPU_HOURS, "119,000",
            lambda p: sum(ph.gpu_hours for ph in p.predictions.run.phases[1:])),
        row("tokens/s per GPU at full batch", 1543, "1,543 (derived)", lambda p: p.predictions.step.tokens_per_s_per_gpu),
    ]


def _step_gap(step_s: float, per_t: float) -> str:
    """The rest of the sentence comparing a simulated step with the one the TR's figure implies."""
    gap = step_s * (TR_GPU_HOURS_PER_T / per_t - 1)
    if gap >= 0:
        return (f", so {gap:.2f} s of every step is something the model does not contain (the omissions below are "
                "candidates; none is quantified by a public source).")
    return (f": the simulation is {-gap:.2f} s per step slower than the TR's figure implies (the omissions and "
            "caveats below cut both ways).")


def _verdict(per_t: float) -> str:
    met = abs(per_t / TR_GPU_HOURS_PER_T - 1) <= 0.10
    side = "optimistic" if per_t < TR_GPU_HOURS_PER_T else "pessimistic"
    return f"{'met' if met else 'not met'} ({side} by {abs(1 - per_t / TR_GPU_HOURS_PER_T):.1%})"


def main() -> None:
    plan = v3_plan()
    then = v3_plan(opts=SimOptions(tables=named_tables(CUTLASS36, "H800-SXM5")))
    forced = forced_cp1(plan)
    step, run = plan.predictions.step, plan.predictions.run
    per_t, per_t_then = run.gpu_hours_per_trillion_tokens, then.predictions.run.gpu_hours_per_trillion_tokens
    step_then = then.predictions.step
    copy_tables = default_tables("H800-SXM5").model_copy(update={"memory_kernels": ()})
    copy_per_t = v3_plan(opts=SimOptions(tables=copy_tables)).predictions.run.gpu_hours_per_trillion_tokens
    r1 = step.per_rank[1]
    always_per_t = v3_plan(opts=SimOptions(comm_sms_always=True)).predictions.run.gpu_hours_per_trillion_tokens
    lines = [
        "# Simulator validation: DeepSeek-V3 on 2048 H800",
        "",
        f"Generated by `python benchmarks/validate_v3.py` on {datetime.date.today()} ({platform.machine()}, "
        f"Python {platform.python_version()}). Cost tables: `{plan.predictions.cost_tables}`, the default "
        "(DeepGEMM's published H800 FP8 GEMM table, the repo's H200 measurements for BF16 GEMM, attention, "
        "each class of memory-bound kernel and collective latency; DeepEP-measured link bandwidths in the `h800` "
        "preset), and "
        f"`{then.predictions.cost_tables}` (the same but for the FP8 GEMMs, see below). "
        "Nothing in them is fitted to the numbers below.",
        "",
        "Command: `moeplan plan --model deepseek-v3 --cluster h800 --nodes 256 --pp 16 --ep 64 --schedule dualpipe "
        "--precision fp8 --seq-len 4096 --global-batch 15360 --tokens 14.8T`, as is and with "
        f"`--cost-tables {CUTLASS36}`.",
        "",
        *headline({"DeepGEMM (2025)": plan, "CUTLASS-3.6 (2024)": then}),
        "",
        "DeepSeek-V3 was trained in 2024; DeepGEMM, whose table the default FP8 GEMMs come from, was published "
        "in February 2025, and its README gives for every shape its speedup over \"DeepSeek's internal "
        "CUTLASS-3.6 kernel\" (1.0x to 2.7x; 1.1x to 1.2x at the grouped expert GEMMs). The like-for-like "
        f"comparison with the TR's 2024 run is therefore `{CUTLASS36}`: each DeepGEMM point divided by its "
        "published speedup (reference §11.4). The speedups are published, not fitted: the prediction is not "
        "used to derive them.",
        "",
        "Target: within 10% on GPU-hours per trillion tokens. With the FP8 kernels of the run's time (CUTLASS-3.6): "
        f"**{_verdict(per_t_then)}**; as is, with DeepGEMM's 2025 kernels: **{_verdict(per_t)}**. In time per "
        f"step (CUTLASS-3.6): the TR's figure implies {step_then.step_time_s * TR_GPU_HOURS_PER_T / per_t_then:.2f} s "
        f"per full-batch step against the simulated {step_then.step_time_s:.2f} s{_step_gap(step_then.step_time_s, per_t_then)}",
        "",
        "The memory-bound kernels are priced class by class at the fractions measured for our own implementations "
        f"(`simulator/costs/{EW_FILE}`); at the single copy-bandwidth fraction used before, with the "
        f"same bytes, the default would predict {copy_per_t:,.0f} ({copy_per_t / TR_GPU_HOURS_PER_T - 1:+.1%}). "
        "V3's recipe is priced with the kernels DeepSeek describes (issue 21, capabilities 6 and 8; "
        "`training.kernels`): permutation and combine inside the all-to-all, FP8 casts with their transposes, "
        "SwiGLU writing FP8, RoPE and the router as single kernels, selective recompute of the named ops only, "
        "and a fused cross-entropy (an assumption: the loss kernel is unpublished); the bytes come from tensor "
        "shapes, priced at the copy bandwidth where the packaged H200 tables time no fused kernel (our runtime "
        "has a fused loss and compiled RoPE kernels since 2026-12-06, which `moeplan calibrate` times on the "
        "user's GPU); the casts with transpose, and the routed experts' backward casts, at the measured fraction of "
        "our FP8 quantisers (`elementwise.STAND_INS`) until the tables time them. Priced as our own runtime runs them eagerly (eager kernels, FP32 "
        "loss), see the sensitivity table's two rows for them. The earlier, closer figures (-10.2%, -1.7%) leaned on "
        "eager kernels slower than DeepSeek's; the gap now left is what the model does not contain.",
        "",
        "Communication SMs (issue 21, capability 1): DeepEP's kernels hold their 20 SMs (TR §3.2.2) only while "
        "they run, so compute now loses them only while an all-to-all is in flight beside it "
        "(docs/design/simulator.md, *Expert traffic*). Withheld from all compute whenever EP > 1, as before, "
        f"the default predicts {always_per_t:,.0f} ({always_per_t / TR_GPU_HOURS_PER_T - 1:+.1%}: the way this page "
        "priced it until then, with today's other costs); the change is the model's, not a fit, and it moves the prediction below the TR's "
        "figure. Issue 21 found the earlier agreement to be partly a cancellation of components (GEMMs priced faster "
        "than in training, elementwise kernels slower than DeepSeek's fused ones, a less busy communication stream); "
        "removing one error of the set moves the sum. The all-to-all payload follows the run's precision (capability 2); V3 runs FP8, so "
        "its bytes are unchanged. The sensitivity table gives the flat all-to-all our runtime sends, and BF16 "
        "dispatch.",
        "",
        f"The rest of this page is the command as is (`{plan.predictions.cost_tables}`).",
        "",
        "## Breakdown of the step",
        "",
        f"One step: {step.microbatches} micro-batches of one 4K sequence per pipeline, "
        f"{step.tokens_per_step / 1e6:.1f}M tokens, **{step.step_time_s:.2f} s**; MFU {step.mfu_frac:.1%} of the dense "
        f"BF16 peak (HFU {step.hfu_frac:.1%}). Averaged over the 16 ranks: compute {step.compute_frac:.1%}, "
        f"pipeline bubble {step.bubble_frac:.1%}, exposed communication {step.exposed_comm_frac:.1%}.",
        "",
        f"Rank 1 (stages 1 and 14, 8 MoE layers): compute {r1.compute_s:.2f} s, bubble {r1.bubble_s:.2f} s, "
        f"exposed communication {r1.exposed_comm_s:.2f} s, NIC busy {r1.nic_busy_s:.2f} s.",
        "",
        "| phase | seq | layout (cp, dp, micro-batch size x micro-batches) | tokens/GPU/micro-batch | peak memory | "
        "tokens | steps | step s | GPU-hours |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {p.name} | {p.seq_len_tokens:,} | {p.layout.label} | {p.layout.tokens_per_gpu_per_microbatch:,.0f} | "
          f"{_gib(p.layout, plan.memory.peak_bytes_per_gpu)} | "
          f"{p.tokens / 1e9:,.1f}B | {p.steps:,.0f} | {p.step_time_s:.2f} | {p.gpu_hours:,.0f} |" for p in run.phases],
        "",
        "The pre-training phase runs the published layout (PP16 DualPipe, EP64, DP128, cp = 1). Each "
        "context-extension phase keeps PP16 DualPipe and EP64 and chooses its context-parallel size and "
        "micro-batching (docs/design/simulator.md, *Context parallelism*): the fastest simulated candidate among those "
        "whose batch is whole DualPipe micro-batches, with at least 4096 tokens per GPU per micro-batch, "
        "that fit in memory. "
        f"Forced onto the pre-training layout (cp = 1, priced on its step line, as before context parallelism "
        f"was modelled) the two phases would take {forced[0]:.2f} s and {forced[1]:.2f} s per step, "
        f"{forced[2]:,.0f} GPU-hours.",
        "",
        *phase_breakdown(plan),
        "",
        "## Known omissions and caveats (none corrected for)",
        "",
        "- Routing is taken as uniform (expected per-GPU load); real routing under auxiliary-loss-free "
        "balancing keeps some imbalance, and the busiest GPU sets the pace. `--zipf` / a recorded load file "
        "show the sensitivity.",
        "- Kernel launch, synchronisation and host overheads are not modelled; every kernel runs at its "
        "table efficiency back to back.",
        "- The context-extension layouts are the planner's choice; DeepSeek's real long-context layout is "
        "unpublished. Context parallelism is modelled as an all-gather of the MLA KV latent before each "
        "layer's attention (re-gathered in backward, gradient reduce-scattered), with no ring-attention style "
        "overlap of chunk transfers with the core, and YaRN's own overheads are not modelled. The attention "
        "core runs at the efficiency measured for its sequence length (torch SDPA on the H200, 1K to 128K, "
        "`simulator/costs/data/h200-attention.json`); DeepSeek's own attention kernels are unpublished.",
        "- Memory-bound kernels run at the fraction of HBM bandwidth measured, class by class, for *our* "
        f"implementations on one {packaged_elementwise(h800_gpu().name).device} (`simulator/costs/{EW_FILE}`; "
        f"fractions of its datasheet, applied to the H800's {h800_gpu().hbm_bytes_per_s / 1e12:.2f} TB/s). DeepSeek's "
        "are unpublished. Several of ours "
        "are eager PyTorch where a fused kernel would be faster: RoPE (`model.rope.apply_rotary`, FP32 "
        "intermediates), the router's scores and top-k, the cross-entropy, which upcasts the logits to FP32, and "
        "the combine's backward, whose top-k weights' gradient is an einsum over the gathered rows in FP32; the "
        "FP8 casts are our Triton quantiser. Against the single copy-bandwidth fraction used before, "
        "they are the larger part of the step's increase (table below). The benchmark times one call at a "
        "time after an L2 flush, so a class made of many small kernels (the router: 4096 x 256 FP32) also "
        "pays per-kernel launch overhead that a running step may partly hide. Not measured (priced at the "
        "copy bandwidth, or not at all): MLA's query and key assembly around the attention core (`qk_cat`, counted "
        "since 2026-12-06, when the one-GPU loop measured it), the transposes there (not counted), the "
        "embedding's backward (not counted) and the optimizer step.",
        "",
        "Memory-bound kernels of one MoE layer and one 4096-token micro-batch (k = 8 expert rows per token; "
        "the embedding and the cross-entropy are the first and last stages'), forward + backward, on the H800:",
        "",
        *memory_bound(),
        "",
        "## A published ratio the prediction should agree with",
        "",
        *comm_ratio(),
        "",
        "## Our own measured runs",
        "",
        *own_runs(),
        "",
        "## Sensitivity (GPU-hours per trillion tokens)",
        "",
        "| change | predicted | vs 180K |",
        "|---|---|---|",
        *sensitivity(),
        "",
        "## Schedule formulas (free communication, F=1, B=2, W=1, F&B=F+B, micro-batches = 4 pp)",
        "",
        "| kind | pp | closed form | formula | simulated |",
        "|---|---|---|---|---|",
        *schedule_check(),
        "",
    ]
    out = ROOT / "docs" / "results" / "validation.md"
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main()
