"""The training run: token phases, batch ramp, precision, optimizer storage, and the budget."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.spec.numbers import Float, Int
from moeplan.simulator.spec.parallel import MAX_RANKS, MAX_SEQ_LEN_TOKENS

# Bounds far above any published run (DeepSeek-V3: 14.8T tokens, 15,360-sequence batches, 2.788M GPU-hours).
MAX_TOKENS = 1e18
MAX_BATCH_SEQS = 2**20


class BatchRamp(BaseModel):
    """Global batch grows linearly from ``start_seqs`` to the phase's batch over ``ramp_tokens``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start_seqs: Int = Field(..., gt=0, le=MAX_BATCH_SEQS)
    ramp_tokens: Float = Field(..., gt=0, le=MAX_TOKENS)


class Phase(BaseModel):
    """One stretch of training with a fixed sequence length and (ramped) global batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    tokens: Float | None = Field(None, gt=0, le=MAX_TOKENS, description="Tokens in this phase (or give steps).")
    steps: Int | None = Field(None, gt=0, le=2**40, description="Optimizer steps in this phase (or give tokens).")
    seq_len_tokens: Int | None = Field(None, gt=0, le=MAX_SEQ_LEN_TOKENS, description="null = the layout's seq_len_tokens.")
    global_batch_seqs: Int = Field(..., gt=0, le=MAX_BATCH_SEQS)
    ramp: BatchRamp | None = None
    cp: Int | None = Field(
        None, gt=0, le=MAX_RANKS, description="Context-parallel size for this phase; null = chosen by the planner when the "
        "sequence length differs from the layout's (simulator/planning/phase_layout.py), else the layout's.")

    @model_validator(mode="after")
    def _tokens_or_steps(self) -> Phase:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError(f"phase {self.name!r}: give exactly one of tokens={self.tokens} and steps={self.steps}")
        if self.ramp is not None and self.ramp.start_seqs > self.global_batch_seqs:
            raise ValueError(
                f"phase {self.name!r}: ramp.start_seqs={self.ramp.start_seqs} exceeds "
                f"global_batch_seqs={self.global_batch_seqs}"
            )
        return self


class OptimizerSpec(BaseModel):
    """AdamW storage per parameter. Defaults: DeepSeek-V3 TR §3.3 (BF16 weights and moments,
    FP32 master weights and gradient accumulation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    param_bytes: Int = Field(2, gt=0, le=64)
    grad_bytes: Int = Field(4, gt=0, le=64)
    master_bytes: Int = Field(4, ge=0, le=64)
    moment_bytes: Int = Field(2, gt=0, le=64, description="Per moment; AdamW keeps two.")


class TrainingSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    phases: tuple[Phase, ...] = Field(..., min_length=1)
    precision: Literal["bf16", "fp8"] = "bf16"
    optimizer: OptimizerSpec = OptimizerSpec()

    @model_validator(mode="after")
    def _unique_names(self) -> TrainingSpec:
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return self


class BudgetSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_hours: Float | None = Field(None, gt=0, le=1e15)
    usd_per_gpu_hour: Float | None = Field(None, gt=0, le=1e6)
