"""What the simulator predicts, as the plan file stores it: a step (per rank: compute, bubble, exposed
communication), each training phase (the layout it was priced on, its step line) and the whole run.

Data only; ``planning.predict``, ``planning.phase_layout`` and ``planning.run_model`` compute them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.spec.numbers import Bool, Float, Int


class RankPrediction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: Int = Field(..., ge=0)
    compute_s: Float = Field(..., ge=0)
    bubble_s: Float = Field(..., ge=0)
    exposed_comm_s: Float = Field(..., ge=0)
    nic_busy_s: Float = Field(..., ge=0)


class StepPrediction(BaseModel):
    """One simulated step at the layout's micro-batch count and sequence length."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    microbatches: Int = Field(..., gt=0)
    seq_len_tokens: Int = Field(..., gt=0)
    step_time_s: Float = Field(..., gt=0)
    tokens_per_step: Int = Field(..., gt=0)
    bubble_frac: Float = Field(..., ge=0, description="Mean over ranks of bubble / step time.")
    exposed_comm_frac: Float = Field(..., ge=0, description="Mean over ranks of exposed communication / step time.")
    compute_frac: Float = Field(..., ge=0, description="Mean over ranks of compute / step time.")
    tokens_per_s_per_gpu: Float = Field(..., gt=0)
    mfu_frac: Float = Field(..., ge=0)
    hfu_frac: Float = Field(..., ge=0)
    per_rank: tuple[RankPrediction, ...]


class PhaseLayout(BaseModel):
    """The layout a phase's steps were priced on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Literal["main", "chosen", "step-line"] = Field(
        ..., description="main: the main layout at its own sequence length; chosen: cp and micro-batching chosen "
        "for this phase, simulated at its batch; step-line: the main layout's step line (no layout ran the batch).")
    cp: Int = Field(..., gt=0)
    dp: Int = Field(..., gt=0)
    micro_batch_size: Int = Field(..., gt=0)
    microbatches: Float = Field(..., gt=0, description="Per pipeline per step; fractional on the step line.")
    tokens_per_gpu_per_microbatch: Float = Field(..., gt=0)
    peak_memory_bytes_per_gpu: Float | None = Field(
        None, description="Peak per GPU: of the chosen layout, or for the step line of the main layout at this "
        "sequence length and the smallest micro-batch count its schedule runs; None on the main layout.")
    fits: Bool | None = Field(None, description="Whether that peak fits in usable HBM; a step-line phase that does "
                              "not is priced anyway and the summary says so.")

    @model_validator(mode="after")
    def _peak_with_verdict(self) -> PhaseLayout:
        if (self.peak_memory_bytes_per_gpu is None) != (self.fits is None):
            raise ValueError("peak_memory_bytes_per_gpu and fits must be given together or both be null")
        if self.peak_memory_bytes_per_gpu is not None and self.peak_memory_bytes_per_gpu < 0:
            raise ValueError(f"peak_memory_bytes_per_gpu={self.peak_memory_bytes_per_gpu} must be >= 0")
        return self

    @property
    def label(self) -> str:
        """E.g. ``CP32 DP4, 1 x 120 (chosen)``: parallel sizes, micro-batch size x micro-batches."""
        return f"CP{self.cp} DP{self.dp}, {self.micro_batch_size} x {self.microbatches:g} ({self.source})"


class StepLine(BaseModel):
    """step_time_s = intercept_s + per_microbatch_s * microbatches, at one sequence length."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq_len_tokens: Int = Field(..., gt=0)
    intercept_s: Float
    per_microbatch_s: Float
    fitted_at: tuple[Int, Int]

    def step_s(self, microbatches: float) -> float:
        return self.intercept_s + self.per_microbatch_s * microbatches


class PhasePrediction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    seq_len_tokens: Int = Field(..., gt=0)
    tokens: Float = Field(..., gt=0)
    steps: Float = Field(..., gt=0)
    step_time_s: Float = Field(..., gt=0, description="At the phase's full global batch.")
    hours: Float = Field(..., ge=0)
    gpu_hours: Float = Field(..., ge=0)
    layout: PhaseLayout
    line: StepLine | None = Field(None, description="Fitted where the phase needs it (a ramp, or no layout ran its batch).")


class RunPrediction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    phases: tuple[PhasePrediction, ...]
    tokens_total: Float = Field(..., gt=0)
    gpu_hours_total: Float = Field(..., ge=0)
    wall_clock_days: Float = Field(..., ge=0)
    tokens_per_day: Float = Field(..., gt=0, description="First phase at full batch.")
    gpu_hours_per_trillion_tokens: Float = Field(..., ge=0, description="First phase at full batch.")
    cost_usd: Float | None = Field(..., ge=0)
