"""The optimizer step's bytes part by part (``simulator.costs.optimizer_step``) and the engine's price of them."""

from __future__ import annotations

import pytest

from moeplan.simulator.costs.elementwise import OPTIMIZER
from moeplan.simulator.costs.optimizer_step import (
    BIAS_UPDATE_BYTES_PER_EXPERT,
    OPTIMIZER_PARTS,
    OptimizerSet,
    one_shard_bytes_per_param,
    optimizer_bytes,
)
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.engine.build import rank_optimizer_bytes, step_inputs
from moeplan.simulator.engine.step import StepSimulation
from moeplan.simulator.presets.clusters import h200
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.presets.recipes import default_recipe
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import OptimizerSpec

V3 = OptimizerSpec()  # TR §3.3 storage: FP32 gradient and master, BF16 moments and weights


def test_v3_storage_on_a_group_of_one_is_30_bytes_a_parameter():
    # norm: read the FP32 gradient (4); update: kernels.adamw, 4 + 2 * 4 + 4 * 2 + 2 = 22; zero: write it (4)
    parts = optimizer_bytes(V3, [OptimizerSet(held_params=1e9, shard_params=1e9, scaled=False)], 0, 0)
    assert parts == {"norm": 4e9, "update": 22e9, "zero": 4e9, "other": 0.0}
    assert one_shard_bytes_per_param(V3) == 30.0


def test_a_shard_of_a_larger_group_adds_the_mean_and_the_gathered_copy_and_zeroes_the_whole_buffer():
    # 8 replicas: the shard is divided (read + write 4 B), its norm read (4 B); the update's 22 B a shard
    # parameter and the all-gathered BF16 weights copied into every held parameter (2 + 2); every held FP32 main
    # gradient zeroed; 3 MoE layers of 256 experts' bias update
    held = 8e6
    parts = optimizer_bytes(V3, [OptimizerSet(held, held / 8, scaled=True)], moe_layers=3, experts=256)
    assert parts == {"norm": 12 * held / 8, "update": 22 * held / 8 + 4 * held, "zero": 4 * held,
                     "other": BIAS_UPDATE_BYTES_PER_EXPERT * 3 * 256}


@pytest.mark.parametrize(("moment_bytes", "param_bytes", "update"), [(2, 2, 22), (4, 2, 30), (4, 4, 32)])
def test_the_update_counts_the_plans_moment_and_parameter_bytes(moment_bytes, param_bytes, update):
    opt = OptimizerSpec(moment_bytes=moment_bytes, param_bytes=param_bytes)
    assert optimizer_bytes(opt, [OptimizerSet(1.0, 1.0, scaled=False)], 0, 0)["update"] == update


def test_the_engine_prices_each_part_at_the_optimizer_class_and_runs_them_in_order():
    recipe = default_recipe()
    par = ParallelSpec(pp=2, schedule="1f1b", seq_len_tokens=64)
    inputs = PlanInputs(model=tiny_moe(), cluster=h200(1), parallel=par, training=recipe.training, budget=recipe.budget)
    tables = default_tables(inputs.cluster.gpu.name)
    si = step_inputs(inputs, 2, 2)
    frac = tables.memory_fracs(OPTIMIZER)[0]
    for part_bytes, tail in zip(rank_optimizer_bytes(inputs, 2), si.tails, strict=True):
        assert tuple(tail.optimizer_parts_s) == OPTIMIZER_PARTS
        for part, nbytes in part_bytes.items():
            assert tail.optimizer_parts_s[part] == pytest.approx(nbytes / (inputs.cluster.gpu.hbm_bytes_per_s * frac))
        # dp 2: per held parameter H, the norm (12 B) and update (22 B) of half of it, + 4 B gathered; 4 B zeroed
        held = part_bytes["zero"] / 4
        assert part_bytes["norm"] == pytest.approx(6 * held) and part_bytes["update"] == pytest.approx(15 * held)
    res = StepSimulation(si, trace=True).run()
    last = max(e.rank for e in res.events)
    names = [e.name for e in sorted(res.events, key=lambda e: e.start_s) if e.rank == last and
             e.name.startswith("optimizer")]
    assert names == [f"optimizer {p}" for p in OPTIMIZER_PARTS]
