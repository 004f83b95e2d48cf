"""The model's FP8 layers (``LinearFn``, ``GroupedLinearFn``) on the kernels' GEMMs
(``ModelOptions.fp8_kernel="kernels"``): on a GPU, or tiny through the Triton interpreter
(tests/conftest.py turns it on without CUDA). Tolerances: docs/design/kernels.md."""

from __future__ import annotations

import pytest
import torch

from moeplan.kernels.fp8_quant import (
    dequant_blocks,
    dequant_rows,
    quant_act_1x128_ref,
    quant_act_128x1_t_ref,
    quant_weight_128x128_ref,
)
from moeplan.kernels.grouped_gemm import grouped_gemm_ref, grouped_wgrad_ref
from moeplan.model.fp8 import kernel_ops, reference_ops
from moeplan.model.grouped_linear import GroupedLinearFn
from moeplan.model.linear import Linear
from tests.kernels import test_kernels
from tests.kernels.test_kernels import ON_GPU, TOL_FP32_OUT, _contiguous_layout, rand, rel_err

# the kernels tests' fixtures: the device (the GPU, else the interpreter) and NaN-poisoned outputs (autouse)
device, poisoned = test_kernels.device, test_kernels.poisoned

TOL_FP8_PIPELINE = 1e-2  # the FP8 layer against the same recipe emulated in float64
TOL_VS_EXACT = 0.1  # the FP8 layer against an unquantised float64 layer (two E4M3 roundings)


def _emulated_fp8_linear(x, w, dy, m_indices, offsets):
    """The DeepSeek-V3 recipe in float64 from the kernels' torch references: (y, dx, dw).

    Grouped (``m_indices`` given): x and dy in the contiguous layout, so the 128-token Wgrad tiles
    restart at every expert, as the model's own padding does."""
    a = dequant_rows(*quant_act_1x128_ref(x.float())).double()
    wq = dequant_blocks(*quant_weight_128x128_ref(w)).double()
    d = dequant_rows(*quant_act_1x128_ref(dy)).double()
    dyt = dequant_rows(*quant_act_128x1_t_ref(dy)).double()
    xt = dequant_rows(*quant_act_128x1_t_ref(x)).double()
    if m_indices is None:
        return a @ wq.t(), d @ wq, dyt @ xt.t()
    return grouped_gemm_ref(a, wq, m_indices), grouped_gemm_ref(d, wq.mT, m_indices), grouped_wgrad_ref(dyt, xt, offsets)


@pytest.mark.parametrize("grouped", [False, True])
def test_fp8_layer_on_the_kernels_is_the_recipe(device, grouped):
    """Forward, Dgrad and Wgrad of the model's FP8 layer (``fp8_backward``) on the kernels equal the
    recipe emulated in float64; the dense forward is also near the unquantised product."""
    K, N = (136, 200) if not ON_GPU else (2048, 7168)
    counts = [70, 0, 130] if not ON_GPU else [1000, 3, 0, 4096]
    m_indices, offsets = _contiguous_layout(counts, device)
    real = m_indices >= 0  # the model's rows: no padding, expert by expert (``offs``)
    M = m_indices.numel()
    x = rand(M, K, seed=17, device=device, dtype=torch.bfloat16)
    x = x.masked_fill(~real[:, None], 0) if grouped else x
    w = rand(len(counts), N, K, seed=18, device=device) if grouped else rand(N, K, seed=18, device=device)
    dy = rand(M, N, seed=19, device=device, dtype=torch.bfloat16).masked_fill(~real[:, None], 0)
    ops = kernel_ops()
    if grouped:
        offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        xr, wr = x[real].clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = GroupedLinearFn.apply(xr, wr, offs, False, None, ops, True, counts)
        y.backward(dy[real])
        dx, dw = xr.grad, wr.grad
    else:
        layer = Linear(K, N, fp8=ops, fp8_backward=True).to(device)
        with torch.no_grad():
            layer.weight.copy_(w)
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.backward(dy)
        dx, dw = xr.grad, layer.weight.grad
    y64, dx64, dw64 = _emulated_fp8_linear(x, w, dy, m_indices if grouped else None, offsets)
    rows = real if grouped else slice(None)
    assert rel_err(y, y64[rows]) < TOL_FP8_PIPELINE
    assert rel_err(dx, dx64[rows]) < TOL_FP8_PIPELINE
    assert rel_err(dw, dw64) < TOL_FP8_PIPELINE
    if not grouped:  # and against the unquantised layer
        assert rel_err(y, x.double() @ w.double().t()) < TOL_VS_EXACT


def test_model_fp8_backward_through_the_kernels(device):
    """The model's FP8 backward (ModelOptions.fp8_backward) on our kernels equals it on the model's
    float reference: dense Dgrad/Wgrad (TMA path: sizes multiples of 16) and grouped Wgrad, with and
    without the experts' row counts on the host."""
    x0 = rand(320, 256, seed=21, device=device)
    w0 = rand(144, 256, seed=22, device=device)
    dy = rand(320, 144, seed=23, device=device)
    results = []
    for ops in (kernel_ops(), reference_ops(128)):
        layer = Linear(256, 144, fp8=ops, fp8_backward=True).to(device)
        with torch.no_grad():
            layer.weight.copy_(w0)
        x = x0.clone().requires_grad_(True)
        layer(x).backward(dy)
        results.append((x.grad, layer.weight.grad))
    (dx_k, dw_k), (dx_r, dw_r) = results
    assert rel_err(dx_k, dx_r) < TOL_FP32_OUT and rel_err(dw_k, dw_r) < TOL_FP32_OUT

    offs = torch.tensor([130, 130, 256], dtype=torch.int32, device=device)
    w = rand(3, 144, 256, seed=24, device=device).requires_grad_(True)
    out = []
    for ops, host_counts in ((kernel_ops(), [130, 0, 126]), (kernel_ops(), None), (reference_ops(128), None)):
        a = x0[:256].clone().requires_grad_(True)
        w.grad = None
        GroupedLinearFn.apply(a, w, offs, False, None, ops, True, host_counts).backward(dy[:256])
        out.append((a.grad, w.grad.clone()))
    for got in out[:2]:
        assert rel_err(got[0], out[2][0]) < TOL_FP32_OUT and rel_err(got[1], out[2][1]) < TOL_FP32_OUT
