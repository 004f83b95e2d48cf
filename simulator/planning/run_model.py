"""The whole training run: every phase's steps and hours, the batch ramp, GPU-hours, cost, budget.

Per phase, step time is linear in the micro-batch count: ``step(M) = a + b M``, since the
schedules' bubbles do not grow with ``M`` (DualPipe README) and every extra micro-batch adds the
same steady-state work. ``a`` and ``b`` come from two simulated steps at valid steady-state counts
(the layout's own count where known, and twice the stage count, or twice that), so batches the schedule cannot run as such
(ramp starts) are priced on the same line. A batch ramp from ``B0`` to ``B1``
sequences over ``R`` tokens, linear in tokens, then integrates in closed form:
time = ``∫ step(M(B)) / (B T) dτ`` with ``M = B / (dp mbs)``.

A phase at another sequence length gets its own layout (``phase_layout``: context parallelism and
micro-batching chosen so its batch runs as whole micro-batches) and its step is simulated at that
batch; only when no layout runs it is the phase priced on the main layout's step line.
"""

from __future__ import annotations

import math

from moeplan.simulator.accounting.context_parallel import ContextParallelError, check_cp
from moeplan.simulator.accounting.layout import LayoutError
from moeplan.simulator.contracts.predictions import PhaseLayout, PhasePrediction, RunPrediction, StepLine
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.planning.phase_layout import choose_phase_layout, step_line_peak
from moeplan.simulator.planning.predict import simulate
from moeplan.simulator.schedules.registry import num_stages, smallest_valid_microbatches
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase

SECONDS_PER_HOUR = 3600.0


def steady_microbatches(par: ParallelSpec) -> int:
    """A valid micro-batch count in every schedule's steady state: twice the stage count (warm-up
    and cool-down then no longer overlap, so each further micro-batch adds the same work)."""
    return smallest_valid_microbatches(par, 2 * num_stages(par))


def step_line(inputs: PlanInputs, dp: int, seq: int, known: tuple[int, float] | None, opts: SimOptions) -> StepLine:
    """Fit ``a + b M`` through two simulated steps in the steady state (``known`` = an already
    simulated (M, step) pair, used as one of them)."""
    par = inputs.parallel
    base = steady_microbatches(par)
    if known is None:
        first = (base, simulate(inputs, dp, base, seq, opts).step_time_s)
        m2 = smallest_valid_microbatches(par, 2 * base)
    else:
        first = known
        m2 = base if known[0] >= 2 * base else smallest_valid_microbatches(par, 2 * max(base, known[0]))
    second = (m2, simulate(inputs, dp, m2, seq, opts).step_time_s)
    (x1, y1), (x2, y2) = sorted((first, second))
    slope = (y2 - y1) / (x2 - x1)
    return StepLine(seq_len_tokens=seq, intercept_s=y1 - slope * x1, per_microbatch_s=slope, fitted_at=(x1, x2))


def _phase(phase: Phase, seq: int, full_step: float, line: StepLine | None, seqs_per_mb: int, layout: PhaseLayout,
           world: int) -> PhasePrediction:
    """Steps, tokens and hours of one phase: ``full_step`` at the full batch, ``line`` (needed
    for a ramp) over micro-batches of ``seqs_per_mb`` sequences."""
    b1 = phase.global_batch_seqs
    if phase.steps is not None:
        tokens, steps, seconds = float(phase.steps * b1 * seq), float(phase.steps), phase.steps * full_step
    else:
        tokens = float(phase.tokens)
        ramp_tokens, ramp_s, ramp_steps = 0.0, 0.0, 0.0
        if phase.ramp is not None and phase.ramp.start_seqs < b1:
            assert line is not None, f"phase {phase.name!r}: a ramp needs a step line"
            b0, ramp_tokens = phase.ramp.start_seqs, min(phase.ramp.ramp_tokens, tokens)
            b_end = b0 + (b1 - b0) * ramp_tokens / phase.ramp.ramp_tokens
            log_term = math.log(b_end / b0) / (b1 - b0) * phase.ramp.ramp_tokens  # ∫ dτ / B(τ)
            ramp_steps = log_term / seq
            ramp_s = line.intercept_s * ramp_steps + line.per_microbatch_s * ramp_tokens / (seq * seqs_per_mb)
        rest = tokens - ramp_tokens
        steps = ramp_steps + rest / (b1 * seq)
        seconds = ramp_s + rest / (b1 * seq) * full_step
    hours = seconds / SECONDS_PER_HOUR
    return PhasePrediction(name=phase.name, seq_len_tokens=seq, tokens=tokens, steps=steps, step_time_s=full_step,
                           hours=hours, gpu_hours=hours * world, layout=layout, line=line)


def _main_layout(inputs: PlanInputs, dp: int, seq: int, microbatches: float, source: str) -> PhaseLayout:
    par = inputs.parallel
    return PhaseLayout(source=source, cp=par.cp, dp=dp, micro_batch_size=par.micro_batch_size,
                       microbatches=microbatches, tokens_per_gpu_per_microbatch=par.micro_batch_size * seq / par.cp)


def predict_phase(inputs: PlanInputs, dp: int, phase: Phase, main_step: tuple[int, float] | None,
                  opts: SimOptions = SimOptions()) -> PhasePrediction:
    """One phase: on the main layout at its own sequence length (``main_step`` = its simulated
    (micro-batches, step seconds)), else on the phase's own layout, else on the step line."""
    par, world = inputs.parallel, inputs.cluster.num_gpus
    seq = phase.seq_len_tokens or par.seq_len_tokens
    b1 = phase.global_batch_seqs
    if seq == par.seq_len_tokens and phase.cp in (None, par.cp):
        line = step_line(inputs, dp, seq, main_step, opts)
        m = b1 / (dp * par.micro_batch_size)
        return _phase(phase, seq, line.step_s(m), line, dp * par.micro_batch_size,
                      _main_layout(inputs, dp, seq, m, "main"), world)
    choice = choose_phase_layout(inputs, phase, seq, opts)
    if choice is not None:
        lay = choice.layout
        line = None
        if phase.ramp is not None:
            line = step_line(choice.inputs, lay.dp, seq, (int(lay.microbatches), choice.step_time_s), opts)
        return _phase(phase, seq, choice.step_time_s, line, lay.dp * lay.micro_batch_size, lay, world)
    if phase.cp is not None and phase.cp != par.cp:
        raise LayoutError(
            f"phase {phase.name!r}: cp={phase.cp} runs no layout for global_batch_seqs={b1} at seq_len_tokens={seq} "
            f"(it must divide the {world // par.pp} GPUs of a stage, split the sequence into 2 x cp chunks, give whole "
            f"micro-batches the {par.schedule} schedule accepts, and fit in memory)"
        )
    try:
        check_cp(seq, par.cp)  # the main layout's cp must split this sequence too
    except ContextParallelError as exc:
        raise LayoutError(f"phase {phase.name!r}: {exc}") from exc
    line = step_line(inputs, dp, seq, None, opts)
    m = b1 / (dp * par.micro_batch_size)
    peak = step_line_peak(inputs, dp, seq, m)
    layout = _main_layout(inputs, dp, seq, m, "step-line").model_copy(
        update={"peak_memory_bytes_per_gpu": peak, "fits": peak <= inputs.cluster.usable_hbm_bytes})
    return _phase(phase, seq, line.step_s(m), line, dp * par.micro_batch_size, layout, world)


def predict_run(inputs: PlanInputs, dp: int, main_step: tuple[int, float], opts: SimOptions = SimOptions()) -> RunPrediction:
    """All phases; ``main_step`` = (micro-batches, step seconds) already simulated for the layout."""
    phases = [predict_phase(inputs, dp, phase, main_step, opts) for phase in inputs.training.phases]
    return _run(inputs, phases)


def project_run(inputs: PlanInputs, run: RunPrediction, step_time_ratio: float) -> RunPrediction:
    """The whole run again with every phase's step, and step line, ``step_time_ratio`` times the
    predicted one: the run a measured step (measured / predicted) projects, on the same phases,
    layouts and ramps. The ratio measured at the main layout is assumed for every phase."""
    assert step_time_ratio > 0, f"{step_time_ratio=}"
    r, world = step_time_ratio, inputs.cluster.num_gpus
    phases = []
    for phase, pred in zip(inputs.training.phases, run.phases, strict=True):
        line = pred.line and pred.line.model_copy(
            update={"intercept_s": pred.line.intercept_s * r, "per_microbatch_s": pred.line.per_microbatch_s * r})
        lay = pred.layout
        phases.append(_phase(phase, pred.seq_len_tokens, pred.step_time_s * r, line, lay.dp * lay.micro_batch_size,
                             lay, world))
    return _run(inputs, phases)


def _run(inputs: PlanInputs, phases: list[PhasePrediction]) -> RunPrediction:
    """Totals over the phases; throughput from the first phase at its full batch."""
    world = inputs.cluster.num_gpus
    first = phases[0]
    tokens_per_s = first.seq_len_tokens * inputs.training.phases[0].global_batch_seqs / first.step_time_s
    gpu_hours = sum(p.gpu_hours for p in phases)
    price = inputs.budget.usd_per_gpu_hour
    return RunPrediction(
        phases=tuple(phases), tokens_total=sum(p.tokens for p in phases), gpu_hours_total=gpu_hours,
        wall_clock_days=sum(p.hours for p in phases) / 24, tokens_per_day=tokens_per_s * 86400,
        gpu_hours_per_trillion_tokens=world * 1e12 / tokens_per_s / SECONDS_PER_HOUR,
        cost_usd=gpu_hours * price if price else None,
    )
