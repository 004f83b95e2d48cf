"""What the simulator predicts, as the plan file stores it: a step (per rank: compute, bubble, exposed
communication), each training phase (the layout it was priced on, its step line) and the whole run.

Data only; ``planning.predict``, ``planning.phase_layout`` and ``planning.run_model`` compute them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RankPrediction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int
    compute_s: float
    bubble_s: float
    exposed_comm_s: float
    nic_busy_s: float


class StepPrediction(BaseModel):
    """One simulated step at the layout's micro-batch count and sequence length."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    microbatches: int
    seq_len_tokens: int
    step_time_s: float
    tokens_per_step: int
    bubble_frac: float = Field(..., description="Mean over ranks of bubble / step time.")
    exposed_comm_frac: float = Field(..., description="Mean over ranks of exposed communication / step time.")
    compute_frac: float = Field(..., description="Mean over ranks of compute / step time.")
    tokens_per_s_per_gpu: float
    mfu_frac: float
    hfu_frac: float
    per_rank: tuple[RankPrediction, ...]


class PhaseLayout(BaseModel):
    """The layout a phase's steps were priced on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Literal["main", "chosen", "step-line"] = Field(
        ..., description="main: the main layout at its own sequence length; chosen: cp and micro-batching chosen "
        "for this phase, simulated at its batch; step-line: the main layout's step line (no layout ran the batch).")
    cp: int
    dp: int
    micro_batch_size: int
    microbatches: float = Field(..., description="Per pipeline per step; fractional on the step line.")
    tokens_per_gpu_per_microbatch: float
    peak_memory_bytes_per_gpu: float | None = Field(
        None, description="Peak per GPU: of the chosen layout, or for the step line of the main layout at this "
        "sequence length and the smallest micro-batch count its schedule runs; None on the main layout.")
    fits: bool | None = Field(None, description="Whether that peak fits in usable HBM; a step-line phase that does "
                              "not is priced anyway and the summary says so.")

    @property
    def label(self) -> str:
        """E.g. ``CP32 DP4, 1 x 120 (chosen)``: parallel sizes, micro-batch size x micro-batches."""
        return f"CP{self.cp} DP{self.dp}, {self.micro_batch_size} x {self.microbatches:g} ({self.source})"


class StepLine(BaseModel):
    """step_time_s = intercept_s + per_microbatch_s * microbatches, at one sequence length."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq_len_tokens: int
    intercept_s: float
    per_microbatch_s: float
    fitted_at: tuple[int, int]

    def step_s(self, microbatches: float) -> float:
        return self.intercept_s + self.per_microbatch_s * microbatches


class PhasePrediction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    seq_len_tokens: int
    tokens: float
    steps: float
    step_time_s: float = Field(..., description="At the phase's full global batch.")
    hours: float
    gpu_hours: float
    layout: PhaseLayout
    line: StepLine | None = Field(None, description="Fitted where the phase needs it (a ramp, or no layout ran its batch).")


class RunPrediction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    phases: tuple[PhasePrediction, ...]
    tokens_total: float
    gpu_hours_total: float
    wall_clock_days: float
    tokens_per_day: float = Field(..., description="First phase at full batch.")
    gpu_hours_per_trillion_tokens: float = Field(..., description="First phase at full batch.")
    cost_usd: float | None
