"""The training run: token phases, batch ramp, precision, the optimizer (storage and AdamW hyper-parameters,
learning-rate schedule), load balancing and MTP weights, and the budget."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.spec.hyperparams import MAX_TOKENS, BalanceSpec, LrSchedule
from moeplan.simulator.spec.numbers import Float, Int
from moeplan.simulator.spec.parallel import MAX_RANKS, MAX_SEQ_LEN_TOKENS

# Bounds far above any published run (DeepSeek-V3: 14.8T tokens, 15,360-sequence batches, 2.788M GPU-hours).
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

    def optimizer_steps(self, seq_len_tokens: int) -> float:
        """Optimizer steps of the phase at ``seq_len_tokens`` (its own length, if it has one): a ramp's
        batch grows linearly with tokens, so its steps are the integral of dtokens / (B(tokens) x seq)."""
        seq = self.seq_len_tokens or seq_len_tokens
        b1 = self.global_batch_seqs
        if self.steps is not None:
            return float(self.steps)
        if self.ramp is None or self.ramp.start_seqs >= b1:
            return self.tokens / (b1 * seq)
        b0, ramp_tokens = self.ramp.start_seqs, min(self.ramp.ramp_tokens, self.tokens)
        b_end = b0 + (b1 - b0) * ramp_tokens / self.ramp.ramp_tokens
        ramp_steps = math.log(b_end / b0) / (b1 - b0) * self.ramp.ramp_tokens / seq
        return ramp_steps + (self.tokens - ramp_tokens) / (b1 * seq)


class OptimizerSpec(BaseModel):
    """AdamW: storage per parameter, hyper-parameters and the learning-rate schedule.

    Storage defaults: DeepSeek-V3 TR §3.3 (BF16 weights and moments, FP32 master weights and gradient
    accumulation). Hyper-parameter defaults: TR §4.2 (reference §8): betas 0.9 / 0.95, weight decay 0.1,
    gradient clipping at norm 1.0; eps is not published (1e-8, PyTorch's). The class's learning rate is a
    constant 2.2e-4 (V3's peak); the recipes give the schedules (``presets.recipes``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    param_bytes: Int = Field(2, gt=0, le=64)
    grad_bytes: Int = Field(4, gt=0, le=64)
    master_bytes: Int = Field(4, ge=0, le=64)
    moment_bytes: Int = Field(2, gt=0, le=64, description="Per moment; AdamW keeps two.")
    lr: LrSchedule = LrSchedule(peak_lr=2.2e-4)
    beta1: Float = Field(0.9, ge=0, lt=1)
    beta2: Float = Field(0.95, ge=0, lt=1)
    eps: Float = Field(1e-8, gt=0, le=1)
    weight_decay: Float = Field(0.1, ge=0, le=1)
    grad_clip_norm: Float | None = Field(1.0, gt=0, le=1e6, description="Global gradient-norm bound; null = no clipping.")


Fusion = Literal["eager", "fused"]
LossKernel = Literal["fp32", "fused"]
# Micro-batches whose routed-expert FP8 Wgrads one launch can run: the segment tables ``fp8_wgrad_ws`` takes
# (kernels/fp8_gemm_ws.py MAX_SEGMENTS; tests/model/test_expert_wgrad_batch.py checks they agree).
MAX_EXPERT_WGRAD_BATCH = 4


class KernelSpec(BaseModel):
    """How the run builds its memory-bound kernels (priced by ``simulator.costs.elementwise``).

    ``fusion``: ``eager`` = one kernel per op class, as moeplan's runtime runs them; ``fused`` = DeepSeek's
    stack: token permutation inside the dispatch and combine kernels (DeepEP), FP8 cast with transpose,
    SwiGLU writing its FP8 output (TR §3.3), RoPE and the router as single kernels. ``loss``: ``fp32`` =
    ``model.losses.cross_entropy`` (an FP32 softmax of the BF16 logits, chunk by chunk, forward and backward);
    ``fused`` = one pass over the BF16 logits (Liger's or Megatron's fused cross-entropy).
    ``expert_wgrad_batch``: with an FP8 backward, the routed experts' weight gradients of this many consecutive
    micro-batches run as one K-grouped launch a weight, so that each expert's FP32 main gradient is read and written
    once for all of them (``model.weight_grad.ExpertWgradBatch``); their FP8 operands wait in a stash meanwhile,
    which the memory accounting counts. 1 = each micro-batch's own launch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fusion: Fusion = "eager"
    loss: LossKernel = "fp32"
    expert_wgrad_batch: Int = Field(1, ge=1, le=MAX_EXPERT_WGRAD_BATCH)  # hashed only when set (inputs.HASHED_WHEN_SET)


# Training phases a plan may have. Each is priced on its own (its context-parallel size, and a step simulated at
# its sequence length: ~0.34 s a phase for DeepSeek-V3 on 256 H800 nodes, measured on the project's 2-core box,
# whatever the phases repeat), so their count is what bounds `plan`'s time (1,500 took minutes) and the plan's
# size. Published recipes have a handful (DeepSeek-V3: pre-training, then two context extensions); 32 leaves
# room for a staged batch ramp and several extensions, and keeps such a plan within ~15 s.
MAX_PHASES = 32


class TrainingSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    phases: tuple[Phase, ...] = Field(..., min_length=1, max_length=MAX_PHASES)
    precision: Literal["bf16", "fp8"] = "bf16"
    kernels: KernelSpec = KernelSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    balance: BalanceSpec = BalanceSpec()

    @model_validator(mode="after")
    def _unique_names(self) -> TrainingSpec:
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return self

    def optimizer_steps(self, seq_len_tokens: int) -> float:
        """Optimizer steps of the whole run (phases without their own length at ``seq_len_tokens``)."""
        return sum(p.optimizer_steps(seq_len_tokens) for p in self.phases)


class BudgetSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_hours: Float | None = Field(None, gt=0, le=1e15)
    usd_per_gpu_hour: Float | None = Field(None, gt=0, le=1e6)
