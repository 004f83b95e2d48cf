"""A small model that exercises every gradient path of the real one, for the main-grad and ZeRO-1 tests.

- ``embed`` (autograd), ``scale`` (an FP32 parameter beside BF16 ones, like the router), ``up`` and
  ``head`` (``model.linear.Linear``: ``LinearFn``, W deferrable, ``up`` with an autograd bias);
- ``experts``: two (1, dim, hidden) expert weights through ``GroupedLinearFn`` (W deferrable). The
  forward of data-parallel rank ``r`` sends its tokens to expert ``r % 2``: what expert parallelism
  over 2 ranks looks like to the optimizer (rank r holds expert r % 2; replicas in ranks r % 2 + 2k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.model.grouped_linear import GroupedLinearFn
from moeplan.model.linear import Linear
from moeplan.model.weight_grad import WeightGradStore

VOCAB, DIM, HIDDEN, EXPERTS = 64, 32, 48, 2


class TinyMlp(nn.Module):
    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM, dtype=dtype)
        self.scale = nn.Parameter(torch.ones(DIM))  # FP32 whatever dtype is
        self.up = Linear(DIM, HIDDEN, bias=True, dtype=dtype)
        self.experts = nn.ParameterList(nn.Parameter(torch.empty(1, DIM, HIDDEN, dtype=dtype)) for _ in range(EXPERTS))
        self.head = Linear(DIM, VOCAB, dtype=dtype)
        self.weight_grad_store: WeightGradStore | None = None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p is self.scale else 0.0))

    def dense_params(self) -> list[nn.Parameter]:
        experts = {id(p) for p in self.experts}
        return [p for p in self.parameters() if id(p) not in experts]

    def loss(self, ids: torch.Tensor, expert: int) -> torch.Tensor:
        x = self.embed(ids) * self.scale.to(self.embed.weight.dtype)  # (B, T, D)
        h = F.silu(self.up(x)).flatten(0, 1)  # (B*T, H)
        offs = torch.tensor([h.shape[0]], dtype=torch.int32)
        y = GroupedLinearFn.apply(h, self.experts[expert], offs, False, self.weight_grad_store, None)  # (B*T, D)
        logits = self.head(x + y.view_as(x))
        return F.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, dims=1).flatten())


def batches(rank: int, count: int, seed: int = 1) -> list[torch.Tensor]:
    """Rank ``rank``'s ``count`` micro-batches of token ids (the same on every process that asks)."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    return [torch.randint(0, VOCAB, (4, 8), generator=gen) for _ in range(count)]
