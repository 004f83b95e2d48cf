"""Synthetic expert loads: ``[layers, logical_experts]`` token counts that feed ``rebalance_experts``.

Uniform, power-law (Zipf with exponent ``s``, experts ranked at random per layer), and per-layer drift
(each layer's popularity is the previous layer's times log-normal noise). Every synthetic load sums to
``num_tokens * top_k`` per layer (one count per token-expert pair). Recorded loads come as an
``ExpertLoadRecord`` (``simulator.contracts.expert_load``).
"""

from __future__ import annotations

import numpy as np


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
