"""The planner's choice of ``training.kernels.expert_wgrad_batch`` for a searched FP8 layout.

With an FP8 backward the routed experts' weight gradients of S consecutive micro-batches can run as one K-grouped
launch a weight (``model.weight_grad.ExpertWgradBatch``): each expert's FP32 main gradient is read and written once
for all S, at the price of a stash that holds the S micro-batches' FP8 operands until then
(``accounting.memory.expert_wgrad_stash_bytes``). The engine prices both sides (``engine.unit_costs._experts``: a
micro-batch's share is 1/S of the launch and of the main gradient's pass; the stash in the memory replay), so the
choice is the cost model's: every S from 1 to ``MAX_EXPERT_WGRAD_BATCH`` whose peak memory fits is simulated on the
layout, and the shortest step wins (the smaller S on a tie). Nothing here is a constant of its own.

Where it chooses the size (``search(..., wgrad_batch=True)``: ``moeplan plan`` for a searched layout whose S the user
did not set; a given or published layout is planned as given), the layout search ranks its first stage at each
layout's largest size that fits and its finalists at each one's best size, found here.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.accounting.layout import check_layout
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.planning import memory_check
from moeplan.simulator.planning.planner import resolve_microbatches
from moeplan.simulator.planning.predict import simulate_at
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.training import MAX_EXPERT_WGRAD_BATCH


@dataclass(frozen=True)
class WgradBatchChoice:
    """The size chosen and what each size gave: its simulated step (s), or None where its peak memory does not
    fit the GPU's usable HBM; ``peak_bytes`` the peak memory of each size."""

    chosen: int
    step_s: dict[int, float | None]
    peak_bytes: dict[int, float]


def applies(inputs: PlanInputs) -> bool:
    """Whether the size matters: an FP8 run (its Wgrads in FP8, ``training.precision``) of a model with routed
    experts."""
    return inputs.training.precision == "fp8" and bool(inputs.model.n_routed_experts)


def with_wgrad_batch(inputs: PlanInputs, size: int) -> PlanInputs:
    """``inputs`` with ``training.kernels.expert_wgrad_batch = size``."""
    kernels = inputs.training.kernels.model_copy(update={"expert_wgrad_batch": size})
    return inputs.model_copy(update={"training": inputs.training.model_copy(update={"kernels": kernels})})


def choose_wgrad_batch(inputs: PlanInputs, opts: SimOptions = SimOptions(), dp: int | None = None,
                       microbatches: int | None = None) -> WgradBatchChoice | None:
    """The size of 1..``MAX_EXPERT_WGRAD_BATCH`` whose simulated step on ``inputs``' layout is the shortest of those
    that fit in memory (module docstring); None where the size does not matter (``applies``) or none fits (the
    plan's own memory check then says why). ``dp`` and ``microbatches``: the layout's, where the caller has them
    (the search); else resolved from ``inputs``."""
    if not applies(inputs):
        return None
    par, usable = inputs.parallel, inputs.cluster.usable_hbm_bytes
    dp = check_layout(inputs.model, inputs.cluster, par) if dp is None else dp
    if microbatches is None:
        microbatches = resolve_microbatches(par, inputs.training, dp)
    steps: dict[int, float | None] = {}
    peaks: dict[int, float] = {}
    for size in range(1, MAX_EXPERT_WGRAD_BATCH + 1):
        trial = with_wgrad_batch(inputs, size)
        peaks[size] = memory_check.peak_bytes(trial, par, dp, microbatches)
        steps[size] = (simulate_at(trial, dp, microbatches, par.seq_len_tokens, opts).step_time_s
                       if peaks[size] <= usable else None)
    fitting = [size for size, step in steps.items() if step is not None]
    if not fitting:
        return None
    return WgradBatchChoice(chosen=min(fitting, key=lambda size: (steps[size], size)), step_s=steps,
                            peak_bytes=peaks)
