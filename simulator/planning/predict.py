"""Predict one step by simulation, and split each rank's idle time into bubble and exposed
communication.

A rank's idle time is step time less its compute. Its *bubble* is the idle time that remains when
the same step is simulated with free communication (zero-time transfers); the rest of the idle
time is *exposed communication*: time the rank waited on transfers that compute did not hide.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.accounting.flops import training_flops
from moeplan.simulator.contracts.predictions import RankPrediction, StepPrediction
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.engine.build import SimOptions, step_inputs
from moeplan.simulator.engine.step import StepResult, StepSimulation
from moeplan.simulator.schedules.registry import smallest_valid_microbatches
from moeplan.simulator.spec.inputs import PlanInputs


def simulate(inputs: PlanInputs, dp: int, microbatches: int, seq_len_tokens: int | None = None,
             opts: SimOptions = SimOptions(), trace: bool = False, free_comm: bool = False) -> StepResult:
    """One step at ``microbatches`` per pipeline (and ``seq_len_tokens``, default the layout's)."""
    return StepSimulation(step_inputs(inputs, dp, microbatches, seq_len_tokens, opts), trace=trace, free_comm=free_comm).run()


# Above this many micro-batches a step is simulated at two smaller counts and extrapolated along
# the line step(M) = a + b M (bubbles do not grow with M; see run_model.py); traces come from the
# larger of the two.
EXACT_MICROBATCHES = 256


@dataclass(frozen=True)
class _Sim:
    step_time_s: float
    compute_busy_s: list[float]
    nic_busy_s: list[float]
    events: list[TraceEvent]


def simulate_at(inputs: PlanInputs, dp: int, microbatches: int, seq_len_tokens: int, opts: SimOptions,
                trace: bool = False, free_comm: bool = False) -> _Sim:
    """Exact below ``EXACT_MICROBATCHES``, else extrapolated from two simulations."""
    if microbatches <= EXACT_MICROBATCHES:
        r = simulate(inputs, dp, microbatches, seq_len_tokens, opts, trace, free_comm)
        return _Sim(r.step_time_s, r.compute_busy_s, r.nic_busy_s, r.events)
    par = inputs.parallel
    m1 = smallest_valid_microbatches(par, EXACT_MICROBATCHES // 2)
    m2 = smallest_valid_microbatches(par, EXACT_MICROBATCHES)
    a = simulate(inputs, dp, m1, seq_len_tokens, opts, False, free_comm)
    b = simulate(inputs, dp, m2, seq_len_tokens, opts, trace, free_comm)

    def at(y1: float, y2: float) -> float:
        return y1 + (y2 - y1) * (microbatches - m1) / (m2 - m1)

    return _Sim(at(a.step_time_s, b.step_time_s), [at(x, y) for x, y in zip(a.compute_busy_s, b.compute_busy_s)],
                [at(x, y) for x, y in zip(a.nic_busy_s, b.nic_busy_s)], b.events)


def predict_step(
    inputs: PlanInputs, dp: int, microbatches: int, seq_len_tokens: int | None = None,
    opts: SimOptions = SimOptions(), trace: bool = False,
) -> tuple[StepPrediction, list[TraceEvent]]:
    seq = seq_len_tokens or inputs.parallel.seq_len_tokens
    real = simulate_at(inputs, dp, microbatches, seq, opts, trace=trace)
    free = simulate_at(inputs, dp, microbatches, seq, opts, free_comm=True)
    step = real.step_time_s
    ranks = []
    for r, busy in enumerate(real.compute_busy_s):
        bubble = max(0.0, free.step_time_s - free.compute_busy_s[r])
        exposed = max(0.0, step - busy - bubble)
        ranks.append(RankPrediction(rank=r, compute_s=busy, bubble_s=bubble, exposed_comm_s=exposed,
                                    nic_busy_s=real.nic_busy_s[r]))
    n = len(ranks)
    world = inputs.cluster.num_gpus
    tokens = microbatches * dp * inputs.parallel.micro_batch_size * seq
    flops = training_flops(inputs.model, seq, inputs.parallel.recompute, inputs.parallel.cp)
    peak = world * inputs.cluster.gpu.bf16_flops_per_s * step
    prediction = StepPrediction(
        microbatches=microbatches, seq_len_tokens=seq, step_time_s=step, tokens_per_step=tokens,
        bubble_frac=sum(r.bubble_s for r in ranks) / n / step,
        exposed_comm_frac=sum(r.exposed_comm_s for r in ranks) / n / step,
        compute_frac=sum(r.compute_s for r in ranks) / n / step,
        tokens_per_s_per_gpu=tokens / step / world,
        mfu_frac=tokens * flops.model_flops / peak, hfu_frac=tokens * flops.hardware_flops / peak,
        per_rank=tuple(ranks),
    )
    return prediction, real.events
