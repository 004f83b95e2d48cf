"""The optimizer step as the simulator prices it (``simulator.costs.optimizer_step``): the runtime stores what the
plan's bytes say, runs and times the same parts in the same order, and each part's event is memory-bound."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.main_grad import attach_main_grads
from moeplan.model.runtime.optimizer import ShardedParams, ZeroAdamW, part_marker
from moeplan.simulator.costs.optimizer_step import OPTIMIZER_PARTS
from moeplan.simulator.report.trace_analysis import op_class
from moeplan.simulator.spec.hyperparams import LrSchedule
from moeplan.simulator.spec.training import OptimizerSpec

V3 = OptimizerSpec()  # the plan's storage the cost model counts: 4 / 4 / 2 / 2 bytes


@pytest.fixture(scope="module")
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _optimizer(spec: OptimizerSpec) -> tuple[nn.Module, ZeroAdamW]:
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).to(torch.bfloat16)
    main_grads = attach_main_grads(model)
    for p in model.parameters():
        p.main_grad.normal_(generator=torch.Generator().manual_seed(p.numel()))
    return model, ZeroAdamW([ShardedParams(main_grads)], spec)


def test_the_runtime_stores_the_bytes_the_cost_model_counts(group):
    model, opt = _optimizer(V3)
    (shard,) = opt._shards[0]
    assert shard.grad.element_size() == V3.grad_bytes  # FP32 main gradient, read by the norm and the update
    assert shard.master.element_size() == V3.master_bytes
    assert shard.exp_avg.element_size() == shard.exp_avg_sq.element_size() == V3.moment_bytes
    assert next(model.parameters()).element_size() == V3.param_bytes  # the weight the update writes


def test_the_step_runs_the_parts_in_order_and_zeroes_the_main_gradients(group):
    model, opt = _optimizer(OptimizerSpec(lr=LrSchedule(peak_lr=0.1)))  # steps large enough to show in BF16
    seen = []

    def mark(part: str) -> None:
        seen.append((part, float(sum(p.main_grad.abs().sum() for p in model.parameters()))))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(tokens_seen=0.0, mark=mark)
    assert [part for part, _ in seen] == list(OPTIMIZER_PARTS[:3])  # "other" is the rank's (the bias update)
    assert seen[1][1] > 0 and seen[2][1] == 0, "the gradients are zeroed in the zero part, not before"
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "the update wrote the weights"


def test_part_marker_times_back_to_back_memory_bound_events():
    timeline = Timeline(rank=0, cuda=False)
    mark = part_marker(timeline, "optimizer")
    for part in OPTIMIZER_PARTS:
        mark(part)
    events = timeline.events()
    assert [e.name for e in events] == [f"optimizer {p}" for p in OPTIMIZER_PARTS]
    assert all(a.end_s == b.start_s for a, b in itertools.pairwise(events))
    assert {op_class(e.name) for e in events} == {"memory_bound"}
    part_marker(None, "optimizer")("norm")  # without a timeline: nothing recorded, nothing raised
