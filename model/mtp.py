"""Multi-Token Prediction module (TR §2.2), one per prediction depth k = 1..D.

h^k_i = Block_k( eh_proj( [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)] ) ), logits = Head(shared_head.norm(h^k_i)).
The concatenation order (embedding first) is that of the released checkpoint as used by vLLM and
SGLang. The embedding and output head are *not* owned here: the caller passes the main model's
(shared parameters, TR §2.2 and §3.2.3). The block is an ordinary decoder layer whose layer id is
``num_hidden_layers + k - 1``, as in the checkpoint (``model.layers.61`` for V3).
"""

from __future__ import annotations

import torch
from torch import nn

from moeplan.model.block import Block, LayerFactory


class SharedHeadNorm(nn.Module):
    """Holds ``shared_head.norm``; ``shared_head.head`` is the main ``lm_head`` (shared, not stored)."""

    def __init__(self, factory: LayerFactory) -> None:
        super().__init__()
        self.norm = factory.norm()


class MTPModule(Block):
    """A ``Block`` plus ``enorm``, ``hnorm``, ``eh_proj`` (2d -> d) and ``shared_head.norm``."""

    def __init__(self, layer_id: int, factory: LayerFactory) -> None:
        super().__init__(layer_id, factory)
        dim = factory.spec.hidden_size
        self.enorm = factory.norm()
        self.hnorm = factory.norm()
        self.eh_proj = factory.make_linear(2 * dim, dim)
        self.shared_head = SharedHeadNorm(factory)

    def forward(self, prev_hidden: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """prev_hidden: h^{k-1} (B, T', d) at positions i; next_embeds: Emb(t_{i+k}) (B, T', d)."""
        h = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(prev_hidden)), dim=-1))  # (B, T', d)
        return super().forward(h, cos, sin)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.norm(hidden)
