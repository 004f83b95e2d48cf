"""ZeRO-1 AdamW on real gloo processes equals ``torch.optim.AdamW`` on one process with the averaged gradient
(clipping, the plan's LR schedule, FP32 and BF16 parameters, BF16 moments, a dense and an expert buffer over
different groups, a restart from the saved shard); the all-reduced bias update equals the single-process one
on the concatenated batch. The workers (``optimizer_worker.py``) compute both sides; see its docstring."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.model.runtime.spawn import run_workers

CASES = {1: ["fp32", "bf16", "bf16-moments"], 2: ["fp32", "fp32-resumed", "bf16", "bf16-moments"], 4: ["fp32-experts", "bf16-experts"]}
CHECKS = ["masters", "params", "grad_norm", "clipped", "moment_dtype"]


@functools.cache
def _results(world: int, base: Path) -> list[dict]:
    out = base / f"optimizer-{world}"
    out.mkdir(exist_ok=True)
    return run_workers("optimizer_worker.py", world, out)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("optimizer")


@pytest.mark.parametrize(("world", "case"), [(w, c) for w, cases in CASES.items() for c in cases])
def test_zero1_adamw_equals_torch_adamw_on_one_process(base, world, case) -> None:
    for rank, result in enumerate(_results(world, base)):
        failed = {k: v for k, v in result[case].items() if not v[0]}
        assert set(result[case]) == set(CHECKS) and not failed, f"rank {rank} {case}: {failed}"


def test_bias_update_with_all_reduced_counts_equals_one_process(base) -> None:
    for rank, result in enumerate(_results(2, base)):
        assert set(result["bias"]) == {"bias_step0", "bias_step1"}
        assert all(ok for ok, _ in result["bias"].values()), f"rank {rank}: {result['bias']}"


def test_on_a_group_of_one_the_reduced_gradient_is_the_main_gradient_buffer(base) -> None:
    (result,) = _results(1, base)
    assert result["memory"]["aliased"][0], result["memory"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA: the multi-tensor norm is the GPU's path"))])
def test_squared_norm_of_many_gradients_is_the_sum_of_their_parts(device, monkeypatch):
    import torch

    from moeplan.model.runtime import optimizer

    monkeypatch.setattr(optimizer, "CHUNK", 7)  # several parts a gradient, one ending short
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g).to(device) for n in (30, 1, 14)]
    want = sum(float(x.double().square().sum()) for x in grads)
    got = optimizer.squared_norm(*grads)
    assert got.dtype == torch.float64 and got.device.type == device
    assert abs(float(got) - want) <= 1e-6 * want
    assert float(optimizer.squared_norm(device=torch.device(device))) == 0.0  # no gradient: zero, on the device
