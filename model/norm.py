"""RMSNorm (Zhang & Sennrich 2019), computed in FP32 as DeepSeek and HF do."""

from __future__ import annotations

import torch
from torch import nn

from moeplan.model.fused import Fusable, rms_norm, run


class RMSNorm(nn.Module, Fusable):
    """y = w * x / sqrt(mean(x^2) + eps); statistics in FP32, the scale applied in the input dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(rms_norm, self.fuse, x, self.weight, self.eps)
