"""The token embedding, whose training backward adds straight into the FP32 main gradient.

``nn.Embedding``'s backward builds a dense (V, d) gradient for every micro-batch (V = 129,280 rows at V3's
width: 1.85 GB in BF16, zeroed, written, then read again by the main-grad hook, which reads and writes the
3.7 GB FP32 sum: ~5 ms a micro-batch on an H100, 20 ms of a 4-micro-batch step measured in
``docs/results/one-gpu.md``). Only the rows of the micro-batch's tokens are non-zero. When the weight has a
``main_grad`` (``model.runtime.main_grad``) the backward here accumulates those rows into it, in FP32, with
``index_put_(accumulate=True)`` (sort-based and deterministic on CUDA), and returns no weight gradient.
Without one it is ``nn.Embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Embedding):
    """``nn.Embedding`` (same parameter, same forward) with the sparse main-grad backward described above."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if hasattr(self.weight, "main_grad") and self.weight.requires_grad and torch.is_grad_enabled():
            return MainGradEmbeddingFn.apply(input_ids, self.weight)
        return super().forward(input_ids)


class MainGradEmbeddingFn(torch.autograd.Function):
    """weight[ids]; backward: ``weight.main_grad[ids] += grad`` (FP32), nothing returned for the weight."""

    @staticmethod
    def forward(ctx, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(input_ids)
        ctx.weight = weight
        return F.embedding(input_ids, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (input_ids,) = ctx.saved_tensors
        main_grad = ctx.weight.main_grad
        rows = grad_out.reshape(-1, grad_out.shape[-1]).to(main_grad.dtype)
        main_grad.index_put_((input_ids.reshape(-1),), rows, accumulate=True)
        return None, None
