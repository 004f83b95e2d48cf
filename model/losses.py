"""Training objective (TR §2.2): L = L_main + lambda / D * sum_k L_MTP^k.

The sequence-wise balance loss (alpha) is not added here: each MoE layer attaches it to its own
output's gradient (``model.moe.AuxLossToGradient``); ``balance_loss_value`` reports its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.kernels.cross_entropy import fused_cross_entropy
from moeplan.model.transformer import ModelOutput

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    lm: torch.Tensor
    mtp: torch.Tensor  # mean over depths (0 without MTP)


# FP32 logits one chunk of rows of the loss holds at a time (128 MiB, as the optimizer step's chunks):
# simulator.accounting.activations.LOSS_CHUNK_ELEMENTS prices the same temporary.
LOSS_CHUNK_ELEMENTS = 1 << 25


class _CrossEntropyFn(torch.autograd.Function):
    """Mean over rows whose target is not ``IGNORE_INDEX`` of ``-log_softmax(x)[target]``, in FP32 one chunk of
    rows at a time. It keeps only the logits in their own dtype for backward (``F.cross_entropy(logits.float())``
    kept FP32 log-probabilities, 4 B per logit, and its backward held three FP32 logit-sized tensors at once).
    Each chunk is one softmax kernel reading the BF16 logits and writing FP32 (forward: ``log_softmax``, the
    targets' entries gathered; backward: ``softmax`` again, minus one at the target, scaled and written in the
    logits' dtype by one multiply): 6 bytes a logit forward and 12 backward (``simulator.costs.elementwise``)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, V), (N,)
        rows = max(1, LOSS_CHUNK_ELEMENTS // max(1, logits.shape[1]))
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # log p[target]
        for start in range(0, logits.shape[0], rows):
            log_p = F.log_softmax(logits[start:start + rows], dim=-1, dtype=torch.float32)  # the chunk's temporary
            picked[start:start + rows] = log_p.gather(1, safe[start:start + rows, None]).squeeze(1)
        count = valid.sum()
        ctx.save_for_backward(logits, safe, valid, count)
        return torch.where(valid, -picked, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe, valid, count = ctx.saved_tensors
        rows = max(1, LOSS_CHUNK_ELEMENTS // max(1, logits.shape[1]))
        grad = torch.empty_like(logits)
        scale = torch.where(valid, grad_loss.float() / count, 0.0)  # (N,) d loss / d (-log p[target]) per row
        for start in range(0, logits.shape[0], rows):
            end = min(start + rows, logits.shape[0])
            p = F.softmax(logits[start:end], dim=-1, dtype=torch.float32)  # (n, V) FP32
            p[torch.arange(end - start, device=p.device), safe[start:end]] -= 1.0
            torch.mul(p, scale[start:end, None], out=grad[start:end])  # cast to the logits' dtype on the way
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T), ``IGNORE_INDEX``
    rows skipped: ``F.cross_entropy(logits.float(), ...)``'s value, computed chunk by chunk (``_CrossEntropyFn``),
    or, ``fused`` (``training.kernels.loss = "fused"``; Triton, so a GPU's), by ``kernels.cross_entropy`` in one
    read of the logits forward and one read and write backward."""
    if fused:
        return fused_cross_entropy(logits.flatten(0, 1), targets.flatten(), IGNORE_INDEX)
    return _CrossEntropyFn.apply(logits.flatten(0, 1), targets.flatten())


def training_loss(output: ModelOutput, labels: torch.Tensor, mtp_weight: float, fused: bool = False) -> LossTerms:
    """``labels[b, i]`` = t_{i+1} (the next token; ``IGNORE_INDEX`` to skip). Depth k predicts t_{i+k+1},
    i.e. ``labels[:, k:]`` aligned with ``mtp_logits[k-1]``. ``fused``: ``cross_entropy``'s Triton kernels."""
    lm = cross_entropy(output.logits, labels, fused)
    if not output.mtp_logits:
        return LossTerms(total=lm, lm=lm, mtp=lm.new_zeros(()))
    mtp = torch.stack([cross_entropy(lg, labels[:, k:], fused) for k, lg in enumerate(output.mtp_logits, start=1)]).mean()
    return LossTerms(total=lm + mtp_weight * mtp, lm=lm, mtp=mtp)


def balance_loss_value(model: nn.Module) -> float:
    """Sum over MoE layers of the last attached alpha * L_Bal (0 when none was attached)."""
    return float(sum(m.last_balance_loss for m in model.modules()
                     if getattr(m, "last_balance_loss", None) is not None))
