"""Bytes the runtime's optimizer step moves through HBM, part by part (issue 19).

``model.runtime.rank.RankRuntime.optimizer_step`` times four parts, trace events ``"optimizer {part}"``,
and the engine prices the same four (``engine.build``), each at the tables' ``optimizer`` class fraction
of the HBM datasheet (``CostTables.memory_fracs``: measured by ``moeplan calibrate`` over this same
norm + update + zero at these bytes, else the tables' copy bandwidth ``memory_frac``). Bytes are ideal
(every tensor read or written once per pass), per set of main gradients (dense parameters; routed
experts), with ``g``, ``w``, ``m``, ``p`` the plan's ``training.optimizer`` bytes of the gradient, the
master weight, one moment and the parameter:

======= ========================================================================== ========================
part    what the runtime runs                                                       ideal bytes
======= ========================================================================== ========================
norm    ``ZeroAdamW._wait_and_scale``: the reduce-scatter's mean, ``div_`` of the   2g a shard parameter
        shard, where the divisor is not 1 (a group of more than one);               (where scaled), + g
        ``optimizer.squared_norm``: one read of the shard
update  ``kernels.adamw``: read the gradient, the master and the two moments,       g + 2w + 4m + p a shard
        write the master, the moments and the weight; over a group of more than     parameter, + 2p a held
        one, ``GradBucket.load_flat_params`` copies the all-gathered weights into   one (where gathered)
        the parameters
zero    ``MainGrads.zero_``: every main-gradient bucket, whole, not the shard       g a held parameter
other   ``balance_step``: the aux-loss-free bias update (TR §2.1.2), per MoE layer  24 an expert of a MoE
        and expert read the int64 load and the FP32 bias, write the bias, zero the  layer
        load (8 + 4 + 4 + 8)
======= ========================================================================== ========================

The runtime's storage is the plan's (``tests/model/runtime/test_optimizer_parts.py`` checks it): FP32
main gradients (``main_grad.attach_main_grads``, g = 4), FP32 master weights (``optimizer._Shard.master``,
w = 4), moments in ``optimizer.MOMENT_DTYPES[moment_bytes]`` (BF16, m = 2) and the weight written in the
parameters' dtype (BF16, p = 2). DeepSeek-V3's storage on a group of one: 4 + 22 + 4 = 30 bytes a
parameter (the plan priced 22, the update alone, until 2026-12-06). The collectives (reduce-scatter,
norm all-reduce, all-gather) are the engine's DP tail and barrier, not bytes here; in the runtime's trace
the ``norm`` event holds the reduce-scatter and the norm's all-reduce (a wait for the slowest rank), the
``update`` event the all-gather, and ``other`` the loads' all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeplan.simulator.spec.training import OptimizerSpec

OPTIMIZER_PARTS = ("norm", "update", "zero", "other")  # in the runtime's order
# ExpertBiasUpdater.step per expert of a MoE layer: int64 load read (8), FP32 bias read and written (4 + 4),
# the int64 counter zeroed (8): model/balance.py
BIAS_UPDATE_BYTES_PER_EXPERT = 8.0 + 4.0 + 4.0 + 8.0


@dataclass(frozen=True)
class OptimizerSet:
    """One main-gradient set of a rank (``model.runtime.optimizer.ShardedParams``)."""

    held_params: float  # parameters of the set on this rank (its main-gradient buckets)
    shard_params: float  # this rank's ZeRO-1 shard of them
    scaled: bool  # the reduced shard is divided by a divisor other than 1 (the mean over replicas)

    @property
    def gathered(self) -> bool:
        """The updated shard is all-gathered and copied into the parameters (a shard smaller than the set)."""
        return self.shard_params < self.held_params


def optimizer_bytes(opt: OptimizerSpec, sets: Sequence[OptimizerSet], moe_layers: int,
                    experts: int) -> dict[str, float]:
    """Per part (``OPTIMIZER_PARTS``), the bytes one rank's optimizer step moves (module docstring)."""
    g, w, m, p = opt.grad_bytes, opt.master_bytes, opt.moment_bytes, opt.param_bytes
    out = dict.fromkeys(OPTIMIZER_PARTS, 0.0)
    for s in sets:
        out["norm"] += (g + (2 * g if s.scaled else 0)) * s.shard_params
        out["update"] += (g + 2 * w + 4 * m + p) * s.shard_params + (2 * p * s.held_params if s.gathered else 0.0)
        out["zero"] += g * s.held_params
    out["other"] = BIAS_UPDATE_BYTES_PER_EXPERT * experts * moe_layers
    return out


def one_shard_bytes_per_param(opt: OptimizerSpec) -> float:
    """Bytes a parameter of the norm, update and zero on a group of one: what ``moeplan calibrate`` times (the
    runtime's step over one flat shard, ``orchestrator.calibration.compute``) to measure the ``optimizer`` class."""
    parts = optimizer_bytes(opt, [OptimizerSet(held_params=1.0, shard_params=1.0, scaled=False)], 0, 0)
    return parts["norm"] + parts["update"] + parts["zero"]
