"""Training objective (TR §2.2): L = L_main + lambda / D * sum_k L_MTP^k.

The sequence-wise balance loss (alpha) is not added here: each MoE layer attaches it to its own
output's gradient (``model.moe.AuxLossToGradient``); ``balance_loss_value`` reports its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.model.transformer import ModelOutput

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    lm: torch.Tensor
    mtp: torch.Tensor  # mean over depths (0 without MTP)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def training_loss(output: ModelOutput, labels: torch.Tensor, mtp_weight: float) -> LossTerms:
    """``labels[b, i]`` = t_{i+1} (the next token; ``IGNORE_INDEX`` to skip). Depth k predicts t_{i+k+1},
    i.e. ``labels[:, k:]`` aligned with ``mtp_logits[k-1]``."""
    lm = cross_entropy(output.logits, labels)
    if not output.mtp_logits:
        return LossTerms(total=lm, lm=lm, mtp=lm.new_zeros(()))
    mtp = torch.stack([cross_entropy(lg, labels[:, k:]) for k, lg in enumerate(output.mtp_logits, start=1)]).mean()
    return LossTerms(total=lm + mtp_weight * mtp, lm=lm, mtp=mtp)


def balance_loss_value(model: nn.Module) -> float:
    """Sum over MoE layers of the last attached alpha * L_Bal (0 when none was attached)."""
    return float(sum(m.last_balance_loss for m in model.modules()
                     if getattr(m, "last_balance_loss", None) is not None))
