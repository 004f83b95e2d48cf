"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

from __future__ import annotations

from torch import nn

from moeplan.model.fused import Fusable, run, swiglu
from moeplan.model.linear import paired


class MLP(nn.Module, Fusable):
    """HF names: ``gate_proj``, ``up_proj``, ``down_proj``."""

    def __init__(self, dim: int, inter_dim: int, make_linear) -> None:
        super().__init__()
        self.gate_proj = make_linear(dim, inter_dim)
        self.up_proj = make_linear(dim, inter_dim)
        self.down_proj = make_linear(inter_dim, dim)

    def forward(self, x):
        gate, up = paired(x, self.gate_proj, self.up_proj)  # one Dgrad for the two (model.linear)
        return self.down_proj(run(swiglu, self.fuse, gate, up))

