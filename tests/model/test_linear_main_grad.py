"""Gradient-accumulation fusion: on a GPU a BF16 ``Linear`` whose weight has a main gradient adds its weight
gradient into it inside the GEMM (FP32, beta = 1); elsewhere the hook adds the BF16 gradient. Both give the FP32
sum of the micro-batches' gradients."""

import pytest
import torch

from moeplan.model.linear import Linear
from moeplan.model.runtime.main_grad import attach_main_grads
from moeplan.model.weight_grad import WeightGradStore, attach_weight_grad_store, fused_main_grad_mm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deferred", [False, True])
def test_main_grad_is_the_fp32_sum_of_the_micro_batches(device, deferred):
    torch.manual_seed(0)
    layer = Linear(256, 128, dtype=torch.bfloat16).to(device)
    attach_main_grads(layer)
    store = WeightGradStore() if deferred else None
    attach_weight_grad_store(layer, store)
    want = torch.zeros(128, 256, dtype=torch.float64, device=device)
    for mb in range(3):
        x = torch.randn(4, 32, 256, device=device, dtype=torch.bfloat16)
        g = torch.randn(4, 32, 128, device=device, dtype=torch.bfloat16)
        layer(x).backward(g)
        if store is not None:
            store.flush()
        want += g.reshape(-1, 128).double().t() @ x.reshape(-1, 256).double()
    assert layer.weight.grad is None
    err = (layer.weight.main_grad.double() - want).norm() / want.norm()
    # fused: FP32 accumulation of exact BF16 products; unfused: each micro-batch's gradient rounded to BF16
    assert err < (1e-5 if device == "cuda" else 5e-3), err


def test_no_fusion_without_a_gpu_or_a_main_grad():
    w = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
    a = torch.ones(4, 4, dtype=torch.bfloat16)
    assert not fused_main_grad_mm(w, a, a)  # no main gradient
    w.main_grad = torch.zeros(4, 4)
    assert not fused_main_grad_mm(w, a, a)  # on the CPU the hook adds the BF16 gradient
    assert not w.main_grad.any()
