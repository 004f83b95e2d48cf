"""Training hyper-parameters as data: the learning-rate schedule, token-keyed step schedules, balancing.

Pure functions of (optimizer step, tokens trained so far) that the runtime calls every step and the
plan file carries (``TrainingSpec.optimizer.lr``, ``TrainingSpec.balance``); no torch here.

- ``LrSchedule``: a linear warmup over ``warmup_steps`` optimizer steps multiplying a piecewise
  schedule over tokens: it starts at ``peak_lr`` and each ``LrSegment`` runs to ``until_tokens``,
  either holding its ``lr`` (``constant``; a jump where it differs from the value before) or moving
  from the previous value to its ``lr`` (``linear``, ``cosine``: continuous at the joint). After the
  last segment its final value holds. DeepSeek-V3 (TR §4.2, ``shared/reference/deepseek-v3.md`` §8) is
  ``deepseek_v3_lr()``: 2K warmup steps to 2.2e-4, constant to 10T tokens, cosine to 2.2e-5 over 4.3T,
  2.2e-5 for 333B, 7.3e-6 for the last 167B (and the context-extension steps after them, TR §4.3).
- ``TokenSteps``: a piecewise-constant value over tokens (``values[i]`` while tokens < ``until_tokens[i]``),
  for the bias update speed gamma and the MTP loss weight lambda (TR §2.1.2, §2.2, §4.2).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.spec.numbers import Float, Int

MAX_TOKENS = 1e18  # as spec.training's bound on a phase
MAX_LR = 10.0  # far above any published learning rate; a typo such as 3e4 for 3e-4 is refused
MAX_WARMUP_STEPS = 2**40
MAX_SEGMENTS = 64


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LrSegment(_Frozen):
    """One stretch of the schedule after the segment before it (or tokens 0), up to ``until_tokens``."""

    kind: Literal["constant", "linear", "cosine"]
    until_tokens: Float = Field(..., gt=0, le=MAX_TOKENS, description="Tokens trained when the segment ends.")
    lr: Float = Field(..., ge=0, le=MAX_LR, description="constant: the value held; linear/cosine: the value at the end.")


class LrSchedule(_Frozen):
    """Warmup in optimizer steps times a piecewise schedule in tokens (see the module docstring)."""

    warmup_steps: Int = Field(0, ge=0, le=MAX_WARMUP_STEPS,
                              description="Linear warmup from 0: step s (0-based) gets (s + 1) / warmup_steps of the value.")
    peak_lr: Float = Field(..., gt=0, le=MAX_LR, description="The value at tokens 0, where the first segment starts.")
    segments: tuple[LrSegment, ...] = Field((), max_length=MAX_SEGMENTS)

    @model_validator(mode="after")
    def _increasing(self) -> LrSchedule:
        ends = [s.until_tokens for s in self.segments]
        for i in range(1, len(ends)):
            if ends[i] <= ends[i - 1]:
                raise ValueError(f"segments.{i}.until_tokens={ends[i]:g} must exceed segments.{i - 1}.until_tokens="
                                 f"{ends[i - 1]:g}")
        return self

    def joints_tokens(self) -> tuple[float, ...]:
        """Where the segments start and end: 0, then each ``until_tokens``."""
        return (0.0, *(s.until_tokens for s in self.segments))

    def base_lr(self, tokens_seen: float) -> float:
        """The schedule over tokens, without the warmup."""
        start_tokens, start_lr = 0.0, self.peak_lr
        for seg in self.segments:
            if tokens_seen < seg.until_tokens:
                frac = (tokens_seen - start_tokens) / (seg.until_tokens - start_tokens)
                return _interpolate(seg.kind, start_lr, seg.lr, frac)
            start_tokens, start_lr = seg.until_tokens, seg.lr
        return start_lr

    def lr_at(self, step: int, tokens_seen: float) -> float:
        """Learning rate of optimizer step ``step`` (0-based) taken after ``tokens_seen`` tokens."""
        warmup = 1.0 if step + 1 >= self.warmup_steps else (step + 1) / self.warmup_steps
        return warmup * self.base_lr(tokens_seen)


def _interpolate(kind: str, start: float, end: float, frac: float) -> float:
    """From ``start`` at frac 0 to ``end`` at frac 1 (``constant``: ``end`` throughout), never outside them."""
    if kind == "constant":
        return end
    frac = min(max(frac, 0.0), 1.0)
    weight = 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))  # of start
    value = start * weight + end * (1.0 - weight)
    return min(max(value, min(start, end)), max(start, end))  # a rounding never crosses the floor


class TokenSteps(_Frozen):
    """A value that changes at token milestones: ``values[i]`` while tokens < ``until_tokens[i]``, the last after."""

    values: tuple[Float, ...] = Field(..., min_length=1, max_length=MAX_SEGMENTS)
    until_tokens: tuple[Float, ...] = Field((), max_length=MAX_SEGMENTS - 1)

    @model_validator(mode="after")
    def _shape(self) -> TokenSteps:
        if len(self.until_tokens) != len(self.values) - 1:
            raise ValueError(f"until_tokens has {len(self.until_tokens)} milestones; {len(self.values)} values need "
                             f"{len(self.values) - 1}")
        ends = self.until_tokens
        if any(not 0 < e <= MAX_TOKENS for e in ends) or any(b <= a for a, b in itertools.pairwise(ends)):
            raise ValueError(f"until_tokens={ends} must increase, each in (0, {MAX_TOKENS:g}]")
        return self

    def at(self, tokens_seen: float) -> float:
        for value, end in zip(self.values, self.until_tokens):
            if tokens_seen < end:
                return value
        return self.values[-1]


class BalanceSpec(_Frozen):
    """Aux-loss-free balancing speed gamma and the MTP loss weight lambda, over tokens trained.

    Defaults (a run without a published recipe): gamma 0.001 and lambda 0.3 throughout, the TR's
    early values. ``deepseek_v3_balance()`` adds the TR's switches.
    """

    bias_update_speed: TokenSteps = TokenSteps(values=(0.001,))
    mtp_loss_weight: TokenSteps = TokenSteps(values=(0.3,))

    @model_validator(mode="after")
    def _bounded(self) -> BalanceSpec:
        for name in ("bias_update_speed", "mtp_loss_weight"):
            values = getattr(self, name).values
            if any(not 0 <= v <= 1 for v in values):
                raise ValueError(f"{name}.values={values} must lie in [0, 1]")
        return self

    def gamma(self, tokens_seen: float) -> float:
        return self.bias_update_speed.at(tokens_seen)

    def mtp_weight(self, tokens_seen: float) -> float:
        return self.mtp_loss_weight.at(tokens_seen)


def deepseek_v3_lr() -> LrSchedule:
    """TR §4.2 (reference §8): warmup 2K steps to 2.2e-4; 2.2e-4 until 10T tokens; cosine to 2.2e-5 over
    the next 4.3T; 2.2e-5 for 333B; 7.3e-6 for the last 167B (held through context extension, TR §4.3)."""
    return LrSchedule(warmup_steps=2000, peak_lr=2.2e-4, segments=(
        LrSegment(kind="constant", until_tokens=10e12, lr=2.2e-4),
        LrSegment(kind="cosine", until_tokens=14.3e12, lr=2.2e-5),
        LrSegment(kind="constant", until_tokens=14.633e12, lr=2.2e-5),
        LrSegment(kind="constant", until_tokens=14.8e12, lr=7.3e-6),
    ))


def deepseek_v3_balance() -> BalanceSpec:
    """TR §2.1.2 / §4.2 (reference §3): gamma 0.001 for the first 14.3T tokens, then 0; TR §4.2: lambda 0.3
    for the first 10T tokens, then 0.1."""
    return BalanceSpec(bias_update_speed=TokenSteps(values=(0.001, 0.0), until_tokens=(14.3e12,)),
                       mtp_loss_weight=TokenSteps(values=(0.3, 0.1), until_tokens=(10e12,)))


def warmup_cosine_lr(peak_lr: float, floor_lr: float, warmup_steps: int, decay_tokens: float) -> LrSchedule:
    """A plain schedule: warmup to ``peak_lr``, then cosine to ``floor_lr`` at ``decay_tokens``, held after."""
    return LrSchedule(warmup_steps=warmup_steps, peak_lr=peak_lr,
                      segments=(LrSegment(kind="cosine", until_tokens=decay_tokens, lr=floor_lr),))
