"""Aux-loss-free balancing across ranks: whole-batch expert loads, then the same bias update everywhere.

TR §2.1.2 updates each bias from the load of the *whole* batch. Every rank counts the tokens it routed
(``tokens_per_expert`` of each MoE layer); ``balance_step`` sums those counts over the given group (the
stage's data-parallel group: every rank that routes tokens to the layer's experts) and then runs
``ExpertBiasUpdater.step`` with the plan's gamma at ``tokens_seen``, so every replica's bias moves
identically. The MTP loss weight for the same step is ``BalanceSchedule.mtp_weight(tokens_seen)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from moeplan.model.balance import BalanceSchedule, ExpertBiasUpdater


@torch.no_grad()
def balance_step(updater: ExpertBiasUpdater, schedule: BalanceSchedule, tokens_seen: float,
                 group: dist.ProcessGroup | None = None,
                 more_groups: Sequence[dist.ProcessGroup] = ()) -> dict[int, torch.Tensor]:
    """All-reduce (SUM) every MoE layer's ``tokens_per_expert`` over ``group``, then over each of
    ``more_groups`` in turn (orthogonal groups: DualPipe's mirror pair, whose two copies of a layer route
    the two directions' micro-batches), then update the biases with ``schedule.gamma(tokens_seen)``.
    Returns the whole-batch loads ``{layer_id: (E,) int64}`` it used."""
    for moe in updater.moe_layers.values():
        for g in (group, *more_groups):
            dist.all_reduce(moe.tokens_per_expert, group=g)
    return updater.step(schedule.gamma(tokens_seen))
