"""Expert load models: ``[layers, logical_experts]`` token counts that feed ``rebalance_experts``.

Synthetic: uniform, power-law (Zipf with exponent ``s``, experts ranked at random per layer), and per-layer
drift (each layer's popularity is the previous layer's times log-normal noise). Recorded: per-layer,
per-expert token counts written by the training runtime as an ``ExpertLoadRecord`` JSON file.

Every synthetic load sums to ``num_tokens * top_k`` per layer (one count per token-expert pair).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeplan.simulator.spec.errors import first_error_line

LOAD_SCHEMA_VERSION = 1


def uniform_load(num_layers: int, num_experts: int, num_tokens: int, top_k: int) -> np.ndarray:
    """``[layers, experts]`` the same count for every expert."""
    _check_positive(num_layers=num_layers, num_experts=num_experts, num_tokens=num_tokens, top_k=top_k)
    return np.full((num_layers, num_experts), num_tokens * top_k / num_experts)


def zipf_load(
    num_layers: int, num_experts: int, num_tokens: int, top_k: int, exponent: float, rng: np.random.Generator
) -> np.ndarray:
    """``[layers, experts]`` power-law load: the expert of rank ``r`` (1-based) gets ``r**-exponent``;
    ranks are a fresh random permutation per layer. ``exponent=0`` is uniform."""
    _check_positive(num_layers=num_layers, num_experts=num_experts, num_tokens=num_tokens, top_k=top_k)
    if not np.isfinite(exponent) or exponent < 0:
        raise ValueError(f"zipf exponent={exponent} must be a finite number >= 0")
    share = np.arange(1, num_experts + 1, dtype=np.float64) ** -exponent
    share /= share.sum()
    ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1)  # [layers, experts] rank of expert
    return share[ranks] * (num_tokens * top_k)


def drifting_load(base: np.ndarray, num_layers: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``[layers, experts]`` from ``base`` ``[experts]``: layer ``l`` is layer ``l-1`` times
    ``exp(sigma * N(0, 1))`` per expert, renormalised to ``base``'s total. Also models drift over time
    when the "layers" are successive measurement windows."""
    base = np.asarray(base, dtype=np.float64)
    if base.ndim != 1 or (base < 0).any() or not np.isfinite(base).all():
        raise ValueError("base load must be a finite, non-negative [experts] array")
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"drift sigma={sigma} must be >= 0")
    log_factor = np.cumsum(sigma * rng.standard_normal((num_layers, base.size)), axis=0)
    log_factor[0] = 0.0
    load = base[None, :] * np.exp(log_factor)
    return load * (base.sum() / np.maximum(load.sum(axis=1, keepdims=True), 1e-300))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name}={value} must be > 0")


class LayerLoad(BaseModel):
    """Token counts of one MoE layer over a measurement window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int = Field(..., ge=0, description="Model layer index (HF numbering: dense layers count too).")
    tokens_per_expert: list[int] = Field(..., description="[n_routed_experts] token-expert pairs per expert.")

    @model_validator(mode="after")
    def _non_negative(self) -> LayerLoad:
        for expert, count in enumerate(self.tokens_per_expert):
            if count < 0:
                raise ValueError(f"layer {self.layer}: tokens_per_expert[{expert}]={count} must be >= 0")
        return self


class ExpertLoadRecord(BaseModel):
    """The load file the training runtime writes: per-layer, per-expert routed token counts.

    ``schema_version`` changes whenever a field changes meaning; readers reject versions they do not know.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = LOAD_SCHEMA_VERSION
    model: str = Field(..., description="Model preset or HF name the counts come from.")
    n_routed_experts: int = Field(..., gt=0)
    num_experts_per_tok: int = Field(..., gt=0, description="top-k of the router.")
    window_tokens: int = Field(..., gt=0, description="Tokens routed in the window the counts cover.")
    step_start: int = Field(0, ge=0, description="First training step of the window.")
    step_end: int = Field(0, ge=0, description="Last training step of the window.")
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