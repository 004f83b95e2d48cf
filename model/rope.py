"""Rotary position embedding on the decoupled MLA key/query (TR §2.1.1) with YaRN (TR §4.3).

YaRN (Peng et al. 2023, arXiv 2309.00071) as in DeepSeek's checkpoints:
- frequencies: dimensions rotating fewer than ``beta_slow`` times over the original context are
  interpolated by ``factor``, those rotating more than ``beta_fast`` times are kept, a linear ramp
  in between (correction range rounded outwards);
- cos/sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim);
- the attention softmax scale is multiplied by mscale(factor, mscale_all_dim)^2 (``softmax_scale``),
  with mscale(s, m) = 0.1 m ln s + 1 for s > 1, else 1 (TR: sqrt(t) = 0.1 ln s + 1).

Everything is computed from the spec on the fly (a few dozen numbers), so a module built on the
``meta`` device needs no buffers re-initialised when it is materialised.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeplan.model.fused import apply_rotary  # noqa: F401  (re-exported: RoPE lives in one place)
from moeplan.simulator.spec.model import ModelSpec


def yarn_mscale(factor: float, mscale: float) -> float:
    """The YaRN attention temperature correction 0.1·m·ln(s) + 1 (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """Dimension index whose wavelength completes ``num_rotations`` turns over ``max_pos`` positions."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(spec: ModelSpec, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies, shape ``[qk_rope_head_dim // 2]``, FP32."""
    dim = spec.qk_rope_head_dim
    base = spec.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    scaling = spec.rope_scaling
    if scaling is None or scaling.type != "yarn":
        if scaling is not None and scaling.type == "linear":
            return inv_freq / scaling.factor
        return inv_freq
    low = max(math.floor(_correction_dim(scaling.beta_fast, dim, base, scaling.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, base, scaling.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    # ramp = 0: high-frequency dims, kept (extrapolated); ramp = 1: low-frequency dims, interpolated.
    return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(spec: ModelSpec) -> float:
    """Multiplier on cos/sin (1 for DeepSeek-V3, where mscale == mscale_all_dim)."""
    s = spec.rope_scaling
    if s is None or s.type != "yarn":
        return 1.0
    return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)


def softmax_scale(spec: ModelSpec) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = spec.qk_head_dim ** -0.5
    s = spec.rope_scaling
    if s is not None and s.type == "yarn" and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Positions -> (cos, sin), each ``[T, rope_dim // 2]`` FP32, shared by all layers of a stage."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.attention_factor = rope_attention_factor(spec)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_inv_freq(self.spec, device=positions.device)
        angles = positions.float()[:, None] * inv_freq[None, :]  # (T, R/2)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
