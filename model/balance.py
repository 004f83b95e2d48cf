"""Auxiliary-loss-free load balancing (TR §2.1.2) and the plan's gamma / lambda schedules.

After each optimizer step, for every MoE layer, with c_i the tokens routed to expert i during the
step (whole batch; all-reduced over data/expert-parallel ranks by the runtime *before* the update):
    b_i <- b_i - gamma  if c_i > mean(c)   (overloaded)
    b_i <- b_i + gamma  if c_i < mean(c)   (underloaded)
The bias only shifts top-k *selection* (``model.gate``); gating weights use the unbiased scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeplan.simulator.spec.hyperparams import BalanceSpec
from moeplan.simulator.spec.training import TrainingSpec


@dataclass(frozen=True)
class BalanceSchedule:
    """gamma (bias update speed) and lambda (MTP loss weight) as functions of tokens trained so far, read
    from the plan's ``training.balance`` (``simulator.spec.hyperparams.BalanceSpec``, where the values and
    their TR sources live: ``deepseek_v3_balance()``). alpha (sequence-wise balance loss) is
    ``ModelSpec.aux_loss_alpha``.
    """

    spec: BalanceSpec = field(default_factory=BalanceSpec)

    @classmethod
    def from_training(cls, training: TrainingSpec) -> BalanceSchedule:
        return cls(training.balance)

    def gamma(self, tokens_seen: float) -> float:
        return self.spec.gamma(tokens_seen)

    def mtp_weight(self, tokens_seen: float) -> float:
        return self.spec.mtp_weight(tokens_seen)


def bias_step(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """New bias (E,) from the load (E,) of one step: b + gamma * sign(mean(load) - load)."""
    load = load.float()
    return bias + gamma * torch.sign(load.mean() - load)


def max_over_mean(load: torch.Tensor) -> float:
    """Imbalance of one layer's load (E,): max / mean (1 = perfectly balanced)."""
    load = load.float()
    return float(load.max() / load.mean().clamp_min(1e-12))


class ExpertBiasUpdater:
    """Reads and resets the ``tokens_per_expert`` counters of every MoE layer; updates the biases.

    ``step(gamma)`` returns the per-layer loads it consumed, ``{layer_id: (E,) int64}`` (layer ids
    as in checkpoint names, MTP included), so the caller can also record them (``model.load_record``).
    ``gamma=0`` keeps the bias fixed but still collects and resets the loads.
    """

    def __init__(self, moe_layers: dict[int, nn.Module]) -> None:
        self.moe_layers = moe_layers

    @torch.no_grad()
    def step(self, gamma: float) -> dict[int, torch.Tensor]:
        loads = {}
        for layer_id, moe in self.moe_layers.items():
            load = moe.tokens_per_expert.clone()
            bias = moe.gate.e_score_correction_bias
            if bias is not None and gamma > 0:
                bias.copy_(bias_step(bias, load, gamma))
            moe.tokens_per_expert.zero_()
            loads[layer_id] = load
        return loads
