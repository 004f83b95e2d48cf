"""The runtime builds the model the plan's precision asks for (``rank.model_options_for``)."""

from __future__ import annotations

import torch

from moeplan.model.runtime.rank import RuntimeOptions, model_options_for
from tests.model.runtime.harness import tiny_plan


def _with_precision(plan, precision: str):
    training = plan.inputs.training.model_copy(update={"precision": precision})
    return plan.model_copy(update={"inputs": plan.inputs.model_copy(update={"training": training})})


def test_an_fp8_plan_runs_fp8_forward_and_backward_on_the_kernels_on_a_gpu_and_the_reference_on_cpu():
    plan = _with_precision(tiny_plan("1f1b", 1), "fp8")
    gpu = model_options_for(plan, RuntimeOptions(), torch.device("cuda", 0))
    assert (gpu.linear_precision, gpu.expert_backend, gpu.fp8_kernel, gpu.fp8_backward) == ("fp8", "fp8", "kernels", True)
    cpu = model_options_for(plan, RuntimeOptions(), torch.device("cpu"))
    assert (cpu.linear_precision, cpu.fp8_kernel, cpu.fp8_backward) == ("fp8", "reference", True)
    exact = model_options_for(plan, RuntimeOptions(dtype=torch.float32), torch.device("cpu"))
    assert exact.linear_precision == "bf16" and exact.dtype == torch.float32  # fp32 rehearsals stay exact


def test_a_bf16_plan_runs_bf16():
    plan = tiny_plan("1f1b", 1)
    assert plan.inputs.training.precision == "bf16"
    opts = model_options_for(plan, RuntimeOptions(fuse_memory_bound=True), torch.device("cuda", 0))
    assert opts.linear_precision == "bf16" and opts.expert_backend == "auto" and opts.fuse_memory_bound


def test_a_plan_that_priced_fused_kernels_runs_them_and_an_eager_plan_does_not():
    plan = tiny_plan("1f1b", 1)
    assert plan.inputs.training.kernels.fusion == "eager"
    assert not model_options_for(plan, RuntimeOptions(), torch.device("cuda", 0)).fuse_memory_bound
    kernels = plan.inputs.training.kernels.model_copy(update={"fusion": "fused"})
    training = plan.inputs.training.model_copy(update={"kernels": kernels})
    fused = plan.model_copy(update={"inputs": plan.inputs.model_copy(update={"training": training})})
    for precision in ("bf16", "fp8"):
        opts = model_options_for(_with_precision(fused, precision), RuntimeOptions(), torch.device("cuda", 0))
        assert opts.fuse_memory_bound, precision
