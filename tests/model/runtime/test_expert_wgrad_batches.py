"""A plan's ``training.kernels.expert_wgrad_batch`` reaches the runtime: every routed-experts module of the rank gets
its ``ExpertWgradBatch`` of that size, and the executor flushes each one at the end of every step, before anything
reads the main gradients (one real gloo process)."""

from __future__ import annotations

import torch

from moeplan.model.runtime.rank import RankRuntime, RuntimeOptions
from moeplan.simulator.planning.planner import build_plan
from moeplan.simulator.spec.training import KernelSpec
from tests.model.runtime.harness import run_ranks, tiny_plan


def _step(rank: int, plan) -> dict:
    rt = RankRuntime.create(plan, rank, RuntimeOptions(dtype=torch.float32))
    experts = [m for module in rt.unique_modules() for m in module.modules() if hasattr(m, "wgrad_batch")]
    flushed = []
    for e in experts:
        if e.wgrad_batch is not None:
            e.wgrad_batch.flush = lambda _e=e: flushed.append(id(_e)) or 0
    rt.forward_backward(step=0)
    rt.forward_backward(step=1)
    return {"experts": len(experts), "sizes": [getattr(e.wgrad_batch, "size", None) for e in experts],
            "flushed": sorted(flushed), "want": sorted(2 * [id(e) for e in experts])}


def test_the_plans_batch_size_is_attached_and_flushed_every_step(tmp_path):
    plain = tiny_plan("1f1b", 1)
    training = plain.inputs.training.model_copy(update={"kernels": KernelSpec(expert_wgrad_batch=2)})
    plan = build_plan(plain.inputs.model_copy(update={"training": training}))
    (got,) = run_ranks(1, _step, plan, tmp=tmp_path)
    assert got["experts"] > 0 and got["sizes"] == [2] * got["experts"]
    assert got["flushed"] == got["want"]  # each module's batch, once a step
    (got,) = run_ranks(1, _step, plain, tmp=tmp_path / "plain")
    assert got["sizes"] == [None] * got["experts"] and got["flushed"] == []
