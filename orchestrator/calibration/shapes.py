"""The shapes a plan needs measured: what ``moeplan calibrate`` benchmarks, derived from the plan's inputs.

Pure: takes ``PlanInputs`` (and the data-parallel size), returns ``PlanShapes``. Each shape is one the engine
prices for this plan (``simulator.engine.unit_costs``, ``build``):

- ``gemms``: every dense linear in forward, input- and weight-gradient form at the tokens one GPU runs per
  micro-batch (``calibration.compute.gemm_shapes``), and the routed experts' grouped products at the rows
  per local expert slot the engine assumes (uniform routing over ``n_routed_experts``, or the busiest
  GPU's rows from ``engine.expert_traffic`` under expert parallelism);
- ``wgrads``: the BF16 weight gradients a GPU run adds into FP32 main gradients inside the GEMM, timed that way
  on a GPU (``GemmPoint.main_grad``): every dense linear's (``fused_main_grad_mm``) and, with the fused experts
  (``training.kernels.fusion``), the routed experts' (``fused_main_grad_grouped_mm``, an addmm an expert);
- ``seq_len``: attention's sequence length; ``tokens``/``mbs``: one micro-batch on one GPU;
- ``links``: per collective, the group span and the buffer sizes the step moves (the activation at a
  stage boundary, the rank's dense gradients for the data-parallel reduce-scatter and all-gather, the
  all-to-all buffer of one MoE layer, the all-reduces of an optimizer step's norm part where it is timed in
  one process), with a 1 KiB point so a line through them has its latency;
- ``inputs``/``dp``: the plan itself, for what is measured over a pipeline rank's own modules (the optimizer
  step over its tensors: ``calibration.optimizer_ranks``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.orchestrator.calibration.compute import gemm_shapes, linear_wgrads
from moeplan.orchestrator.calibration.optimizer_ranks import norm_collectives
from moeplan.simulator.accounting.context_parallel import cp_tokens
from moeplan.simulator.accounting.layout import pipeline_stages
from moeplan.simulator.accounting.memory import rank_params
from moeplan.simulator.costs.machine import Collective
from moeplan.simulator.engine.expert_traffic import expert_traffic, padded_rows
from moeplan.simulator.engine.unit_costs import pads_expert_segments
from moeplan.simulator.schedules.registry import rank_stages
from moeplan.simulator.spec.inputs import PlanInputs

LATENCY_BYTES = 1024  # the small point of every collective: its fixed cost


@dataclass(frozen=True)
class LinkShape:
    collective: Collective
    processes: int
    sizes: tuple[int, ...]  # buffer bytes, ascending


@dataclass(frozen=True)
class PlanShapes:
    mbs: int
    seq_len: int
    tokens: int
    gemms: tuple[tuple[int, int, int, int], ...]  # (m, n, k, groups)
    links: tuple[LinkShape, ...]
    wgrads: tuple[tuple[int, int, int, int], ...] = ()  # (m, n, k, groups), each added into FP32 by the GEMM
    ep: int = 1  # the plan's expert-parallel size: a MoE half timed alone runs every expert only when it is 1
    inputs: PlanInputs | None = None
    dp: int = 1


def _expert_gemms(inputs: PlanInputs, tokens: int) -> tuple[set[tuple[int, int, int, int]], set[tuple[int, int, int, int]]]:
    """The routed experts' grouped products at the rows per local slot ``unit_costs._experts`` prices (each
    expert's segment padded to 128 rows where the experts run on the contiguous layout, ``expert_segment_rows``):
    (all of them, their two weight gradients)."""
    m, par = inputs.model, inputs.parallel
    if not m.is_moe:
        return set(), set()
    if par.ep == 1:
        groups, rows = m.n_routed_experts, tokens * m.num_experts_per_tok
    else:
        traffic = expert_traffic(m, inputs.cluster, par.ep, tokens)
        groups, rows = traffic.experts_per_gpu, traffic.expert_rows_max
    laid_out = pads_expert_segments(inputs.training.precision, inputs.training.kernels.fusion)
    per = max(1, round(padded_rows(rows / groups) if laid_out else rows / groups))
    h, f = m.hidden_size, m.moe_intermediate_size
    wgrads = {(2 * f, h, per, groups), (h, f, per, groups)}
    return {(per, 2 * f, h, groups), (per, h, f, groups), (per, h, 2 * f, groups), (per, f, h, groups)} | wgrads, wgrads


def _sizes(*nbytes: float) -> tuple[int, ...]:
    return tuple(sorted({LATENCY_BYTES, *(max(LATENCY_BYTES, int(b)) for b in nbytes if b > 0)}))


def _links(inputs: PlanInputs, dp: int, tokens: int, max_processes: int) -> tuple[LinkShape, ...]:
    m, par, opt = inputs.model, inputs.parallel, inputs.training.optimizer
    out = []
    if par.pp > 1:
        out.append(LinkShape("send_recv", 2, _sizes(tokens * m.hidden_size * 2.0)))  # engine.build's p2p bytes
    group = dp * par.cp
    if group > 1:
        stages = pipeline_stages(m, par)
        dense = max(rank_params(m, [stages[s] for s in rank_stages(par, r)], par.ep).dense for r in range(par.pp))
        span = min(group, max_processes)
        out += [LinkShape("reduce_scatter", span, _sizes(dense * opt.grad_bytes)),
                LinkShape("all_gather", span, _sizes(dense * opt.param_bytes))]
    # the norm part of an optimizer step timed in one process (ZeRO groups of one: ``calibration.optimizer_ranks``)
    # runs these across processes: the embedding's two copies summed, the squared norm's all-reduce
    reduced: dict[int, set[int]] = {}
    timed_alone = group == 1 and par.ep == 1
    for _, nbytes, processes in {c for r in range(par.pp) if timed_alone for c in norm_collectives(inputs, dp, r)}:
        reduced.setdefault(min(processes, max_processes), set()).add(nbytes)
    out += [LinkShape("all_reduce", processes, _sizes(*nbytes)) for processes, nbytes in sorted(reduced.items())]
    if m.is_moe and par.ep > 1:
        rows = tokens * m.num_experts_per_tok
        out.append(LinkShape("all_to_all", min(par.ep, max_processes), _sizes(rows * m.hidden_size * 2.0)))
    return tuple(out)


def plan_shapes(inputs: PlanInputs, dp: int, max_processes: int) -> PlanShapes:
    """Every shape the plan's step prices (see module docstring); collectives over at most ``max_processes``."""
    par = inputs.parallel
    tokens = cp_tokens(par.micro_batch_size, par.seq_len_tokens, par.cp)
    dense = gemm_shapes(inputs.model, [tokens], eps=[])  # no EP sizes: the linears alone
    experts, expert_wgrads = _expert_gemms(inputs, tokens)
    gemms = tuple(sorted(set(dense) | experts))
    wgrads = set(linear_wgrads(inputs.model, tokens))
    if inputs.training.kernels.fusion == "fused":
        wgrads |= expert_wgrads
    return PlanShapes(mbs=par.micro_batch_size, seq_len=par.seq_len_tokens, tokens=tokens, gemms=gemms,
                      links=_links(inputs, dp, tokens, max_processes), ep=par.ep, inputs=inputs, dp=dp,
                      wgrads=tuple(sorted(wgrads)))
