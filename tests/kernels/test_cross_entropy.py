"""The fused cross-entropy kernels (``kernels.cross_entropy``) against float64 ``F.cross_entropy`` and against
``model.losses.cross_entropy``: rows that end mid-block, rows shorter than a block, ignored targets, a scaled
gradient, BF16 and FP32 logits, large logits. In Triton's interpreter on CPU (tests/conftest.py), on the GPU where
there is one."""

from __future__ import annotations

import pytest
import torch

from moeplan.kernels import cross_entropy as ce
from moeplan.model.losses import IGNORE_INDEX, cross_entropy
from tests.kernels import test_kernels

device = test_kernels.device


def _case(n: int, v: int, dtype: torch.dtype, device: str, seed: int = 0, spread: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * spread).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v", [37, ce._BLOCK_FWD + ce._BLOCK_BWD + 5])  # shorter than a block; ends mid-block
def test_loss_and_gradient_match_float64(device, v, dtype):
    logits, targets = _case(5, v, dtype, device)
    targets[2] = IGNORE_INDEX
    x = logits.detach().requires_grad_()
    loss = ce.fused_cross_entropy(x, targets)
    (loss * 0.5).backward()
    ref_x = logits.detach().double().requires_grad_()
    ref = ce.cross_entropy_ref(ref_x, targets)
    (ref * 0.5).backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert x.grad.dtype == dtype
    ulp = 2**-8 if dtype == torch.bfloat16 else 1e-6  # the gradient is rounded once to its dtype
    assert torch.allclose(x.grad.double(), ref_x.grad, rtol=ulp, atol=1e-7)
    assert torch.equal(x.grad[2], torch.zeros_like(x.grad[2]))  # an ignored row gets none


def test_the_same_loss_as_the_chunked_one(device):
    logits, targets = _case(6, 1000, torch.bfloat16, device, seed=3)
    a, b = logits.detach().requires_grad_(), logits.detach().requires_grad_()
    fused = ce.fused_cross_entropy(a, targets)
    chunked = cross_entropy(b[None], targets[None])
    fused.backward()
    chunked.backward()
    assert torch.allclose(fused, chunked.float(), rtol=1e-6)
    assert torch.allclose(a.grad.float(), b.grad.float(), rtol=2**-8, atol=1e-8)


def test_large_logits_stay_finite(device):
    logits, targets = _case(3, 500, torch.float32, device, seed=1, spread=1.0)
    logits[0] += 8e4  # a shifted row: exp(x) overflows FP32 unless the maximum is taken out first
    logits[1, 7] = 3e4
    loss, lse = ce.cross_entropy_fwd(logits, targets)
    ref = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    # FP32 sums: at 8e4 one ulp is 2^-7, so lse - x[target] is exact to about 1e-2 there
    assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=2e-2)
    assert abs(loss[2].item() - ref[2].item()) < 1e-5  # an ordinary row beside them is unaffected


def test_every_row_ignored_is_nan_with_zero_gradient(device):
    logits, _ = _case(2, 50, torch.float32, device)
    targets = torch.full((2,), IGNORE_INDEX, device=device)
    x = logits.requires_grad_()
    loss = ce.fused_cross_entropy(x, targets)
    assert torch.isnan(loss)  # 0/0, as model.losses.cross_entropy and F.cross_entropy give
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_a_target_outside_the_vocabulary_is_nan_not_a_stray_read(device):
    logits, targets = _case(3, 40, torch.float32, device)
    targets[1] = 40  # one past the last word
    x = logits.requires_grad_()
    loss = ce.fused_cross_entropy(x, targets)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


def test_bad_operands_are_one_line_errors(device):
    logits, targets = _case(4, 10, torch.float32, device)
    with pytest.raises(ValueError, match="unit column stride"):
        ce.cross_entropy_fwd(logits.t(), targets)
    with pytest.raises(ValueError, match=r"targets must be \(4,\)"):
        ce.cross_entropy_fwd(logits, targets[:3])
