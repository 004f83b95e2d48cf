"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

from __future__ import annotations

from torch import nn

from moeplan.model.fused import Fusable, run, swiglu


class MLP(nn.Module, Fusable):
    """HF names: ``gate_proj``, ``up_proj``, ``down_proj``."""

    def __init__(self, dim: int, inter_dim: int, make_linear) -> None:
        super().__init__()
        self.gate_proj = make_linear(dim, inter_dim)
        self.up_proj = make_linear(dim, inter_dim)
        self.down_proj = make_linear(inter_dim, dim)

    def forward(self, x):
        return self.down_proj(run(swiglu, self.fuse, self.gate_proj(x), self.up_proj(x)))

