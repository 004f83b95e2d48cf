"""The expert-load record: per-layer, per-expert routed token counts over a window of training steps.

The training runtime writes it (``moeplan.model.load_record``), the placement planner reads it
(``moeplan placement --load``, ``moeplan plan --load``). One schema for both; ``schema_version``
changes whenever a field changes meaning.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.model import MAX_EXPERTS, MAX_LAYERS
from moeplan.simulator.spec.numbers import Int

LOAD_SCHEMA_VERSION = 1


class LayerLoad(BaseModel):
    """Token counts of one MoE layer over a measurement window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: Int = Field(..., ge=0, le=2 * MAX_LAYERS, description="Model layer index (HF numbering: dense layers count too).")
    tokens_per_expert: list[Int] = Field(..., description="[n_routed_experts] token-expert pairs per expert.")

    @model_validator(mode="after")
    def _non_negative(self) -> LayerLoad:
        for expert, count in enumerate(self.tokens_per_expert):
            if count < 0:
                raise ValueError(f"layer {self.layer}: tokens_per_expert[{expert}]={count} must be >= 0")
        if not any(self.tokens_per_expert):
            raise ValueError(f"layer {self.layer}: tokens_per_expert are all 0 (no token was routed)")
        return self


class ExpertLoadRecord(BaseModel):
    """The load file the training runtime writes: per-layer, per-expert routed token counts.

    ``schema_version`` changes whenever a field changes meaning; readers reject versions they do not know.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = LOAD_SCHEMA_VERSION
    model: str = Field(..., description="Model preset or HF name the counts come from.")
    n_routed_experts: Int = Field(..., gt=0, le=MAX_EXPERTS)
    num_experts_per_tok: Int = Field(..., gt=0, le=MAX_EXPERTS, description="top-k of the router.")
    window_tokens: Int = Field(..., gt=0, description="Tokens routed in the window the counts cover.")
    step_start: Int = Field(0, ge=0, description="First training step of the window.")
    step_end: Int = Field(0, ge=0, description="Last training step of the window.")
    layers: list[LayerLoad] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ExpertLoadRecord:
        seen: set[int] = set()
        for entry in self.layers:
            if len(entry.tokens_per_expert) != self.n_routed_experts:
                raise ValueError(
                    f"layer {entry.layer}: len(tokens_per_expert)={len(entry.tokens_per_expert)} "
                    f"!= n_routed_experts={self.n_routed_experts}"
                )
            if entry.layer in seen:
                raise ValueError(f"layer={entry.layer} appears twice")
            seen.add(entry.layer)
        if self.step_end < self.step_start:
            raise ValueError(f"step_end={self.step_end} must be >= step_start={self.step_start}")
        return self

    def weight(self) -> np.ndarray:
        """``[layers, experts]`` counts in file order, as float64."""
        return np.array([entry.tokens_per_expert for entry in self.layers], dtype=np.float64)

    @property
    def layer_ids(self) -> list[int]:
        return [entry.layer for entry in self.layers]


def one_line_error(exc: ValidationError) -> str:
    """The first pydantic error as ``field.path: message (got value)`` ("file" when it is about the whole file)."""
    return first_error_line(exc, whole="file")