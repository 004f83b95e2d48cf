"""The one-pass AdamW kernel (``kernels.adamw``) against its torch reference and ``torch.optim.AdamW``:
FP32 and BF16 moments, sizes that end mid-block, clipping folded into the gradient read, the weight
written in its own dtype. In Triton's interpreter on CPU (tests/conftest.py), on the GPU where there is one."""

from __future__ import annotations

import pytest
import torch

from moeplan.kernels.adamw import BLOCK, adamw_, adamw_ref_
from tests.kernels import test_kernels

device = test_kernels.device
HYPER = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def _state(n: int, moments: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(n, generator=g)
    return [t.to(device) for t in (master, (torch.randn(n, generator=g) * 0.01).to(moments),
                                   (torch.rand(n, generator=g) * 1e-4).to(moments))]


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, BLOCK + 3])
def test_the_kernel_takes_the_references_steps(device, n, moments):
    kernel, ref = _state(n, moments, device), _state(n, moments, device)
    out_k, out_r = (torch.empty(n, dtype=torch.bfloat16, device=device) for _ in range(2))
    for step in (1, 2, 3):
        grad = torch.randn(n, generator=torch.Generator().manual_seed(10 + step)).to(device)
        kw = dict(lr=1e-3 * step, step=step, grad_scale=0.25 if step == 2 else 1.0, **HYPER)
        adamw_(grad, *kernel, out=out_k, **kw)
        adamw_ref_(grad, *ref, out=out_r, **kw)
    # the same formula in FP32; a fused multiply-add may round the last bit differently per step
    assert torch.allclose(kernel[0], ref[0], rtol=1e-6, atol=1e-7)
    for k, r in zip(kernel[1:], ref[1:]):
        assert k.dtype == moments and torch.allclose(k.float(), r.float(), rtol=2e-6 if moments == torch.float32
                                                     else 2**-7, atol=2e-8)
    assert torch.equal(out_k, kernel[0].to(torch.bfloat16)) and torch.equal(out_r, ref[0].to(torch.bfloat16))


def test_the_reference_is_torch_adamw(device):
    n = 300
    master, avg, sq = (torch.zeros(n, device=device) for _ in range(3))
    master.copy_(torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device))
    param = torch.nn.Parameter(master.clone())
    opt = torch.optim.AdamW([param], lr=1e-2, betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], foreach=False, fused=False)
    for step in (1, 2, 3):
        grad = torch.randn(n, generator=torch.Generator().manual_seed(step)).to(device)
        param.grad = grad.clone()
        opt.step()
        adamw_ref_(grad, master, avg, sq, lr=1e-2, step=step, **HYPER)
    assert torch.equal(master, param.detach())


def test_bad_operands_are_one_line_errors(device):
    master, avg, sq = _state(8, torch.float32, device)
    with pytest.raises(ValueError, match="grad must be 1-D contiguous with 8"):
        adamw_(torch.zeros(9, device=device), master, avg, sq, lr=1e-3, step=1, **HYPER)
    with pytest.raises(ValueError, match="moments must both be fp32 or bf16"):
        adamw_(torch.zeros(8, device=device), master, avg, sq.half(), lr=1e-3, step=1, **HYPER)
