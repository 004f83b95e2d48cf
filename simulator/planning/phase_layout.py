"""A layout for each training phase whose sequence length differs from the main layout's.

Long-context phases keep the main layout's pipeline, schedule, expert parallelism, recompute and
ZeRO stage, and choose the context-parallel size ``cp`` and the micro-batch size anew:

- ``cp`` from the powers of two that divide the ``world / pp`` GPUs of a stage and split the
  sequence into ``2 cp`` chunks, keeping at least the main layout's tokens per GPU per
  micro-batch (CP is there to fit long sequences, not to shrink micro-batches below what the
  main layout runs); a phase's own ``cp`` setting fixes it;
- micro-batch sizes from 1 up to the main layout's, by powers of two;
- the phase's global batch must map onto whole micro-batches that the schedule accepts
  (``dp = world / (pp cp)``, ``M = batch / (dp mbs)``), and the peak memory must fit.

Each candidate's step is simulated at its own ``M`` (``predict.simulate_at``) and the fastest
wins. When none qualifies the phase is priced on the main layout's step line, as before.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from moeplan.simulator.accounting.context_parallel import cp_tokens
from moeplan.simulator.accounting.layout import LayoutError, check_layout
from moeplan.simulator.accounting.memory import peak_bytes_per_gpu
from moeplan.simulator.contracts.predictions import PhaseLayout
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.planning.predict import simulate_at
from moeplan.simulator.schedules.registry import microbatch_error, smallest_valid_microbatches
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseChoice:
    layout: PhaseLayout
    inputs: PlanInputs  # with the phase's ParallelSpec
    step_time_s: float


def _powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(limit.bit_length()) if 2**k <= limit]


def phase_candidates(inputs: PlanInputs, phase: Phase, seq: int) -> list[tuple[ParallelSpec, int, int]]:
    """(layout, dp, micro-batches) for every cp and micro-batch size that runs the phase's batch."""
    main, world = inputs.parallel, inputs.cluster.num_gpus
    min_tokens = cp_tokens(main.micro_batch_size, main.seq_len_tokens, main.cp)
    per_stage = world // main.pp
    cps = [phase.cp] if phase.cp is not None else [c for c in _powers_of_two(per_stage) if per_stage % c == 0]
    out = []
    for cp in cps:
        for mbs in _powers_of_two(main.micro_batch_size):
            if phase.cp is None and (mbs * seq // cp < min_tokens):
                continue
            par = main.model_copy(update={"cp": cp, "dp": None, "micro_batch_size": mbs, "microbatches": None,
                                          "seq_len_tokens": seq})
            try:
                dp = check_layout(inputs.model, inputs.cluster, par)
            except LayoutError:
                continue
            batch = phase.global_batch_seqs
            if batch % (dp * mbs):
                continue
            m = batch // (dp * mbs)
            if microbatch_error(par, m) is None:
                out.append((par, dp, m))
    return out


def step_line_peak(inputs: PlanInputs, dp: int, seq: int, microbatches: float) -> float:
    """Peak bytes per GPU of the main layout at ``seq`` tokens, for the smallest micro-batch count
    its schedule runs that covers ``microbatches`` (what a step-line phase would need to hold)."""
    par = inputs.parallel.model_copy(update={"seq_len_tokens": seq, "microbatches": None})
    m = smallest_valid_microbatches(par, math.ceil(microbatches))
    tr = inputs.training
    return peak_bytes_per_gpu(inputs.model, par, tr.optimizer, tr.precision, dp, m, tr.kernels.fusion,
                              tr.kernels.expert_wgrad_batch)


def choose_phase_layout(inputs: PlanInputs, phase: Phase, seq: int, opts: SimOptions) -> PhaseChoice | None:
    """The fastest fitting candidate of ``phase_candidates``, simulated at its batch; None when
    none runs the batch or fits in memory."""
    best: PhaseChoice | None = None
    tr = inputs.training
    for par, dp, m in phase_candidates(inputs, phase, seq):
        peak = peak_bytes_per_gpu(inputs.model, par, tr.optimizer, tr.precision, dp, m, tr.kernels.fusion,
                                  tr.kernels.expert_wgrad_batch)
        if peak > inputs.cluster.usable_hbm_bytes:
            continue
        trial = inputs.model_copy(update={"parallel": par})
        step_s = simulate_at(trial, dp, m, seq, opts).step_time_s
        layout = PhaseLayout(source="chosen", cp=par.cp, dp=dp, micro_batch_size=par.micro_batch_size,
                             microbatches=m, tokens_per_gpu_per_microbatch=cp_tokens(par.micro_batch_size, seq, par.cp),
                             peak_memory_bytes_per_gpu=peak, fits=True)
        if best is None or step_s < best.step_time_s:
            best = PhaseChoice(layout=layout, inputs=trial, step_time_s=step_s)
    if best is None:
        logger.info("phase %s: no layout runs %d x %d tokens; priced on the step line", phase.name,
                    phase.global_batch_seqs, seq)
    return best
