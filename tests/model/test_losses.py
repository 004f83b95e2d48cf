"""model.losses.cross_entropy against F.cross_entropy over FP32 logits, in one chunk and in several."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeplan.model import losses
from moeplan.model.losses import IGNORE_INDEX, cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_chunked_loss_and_gradient_match_torch(monkeypatch, dtype, chunk_rows):
    vocab, seq = 97, 11
    monkeypatch.setattr(losses, "LOSS_CHUNK_ELEMENTS", chunk_rows * vocab)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, seq, vocab, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (2, seq), generator=g)
    targets[0, 4] = targets[1, 0] = IGNORE_INDEX
    ours = cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(1.7 * ours, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    (ref_grad,) = torch.autograd.grad(1.7 * ref, ref_logits)
    assert ours.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    assert torch.equal(grad[0, 4], torch.zeros(vocab, dtype=dtype))  # an ignored row gets no gradient


def test_fp32_logits_are_not_changed_in_place():
    logits = torch.randn(1, 5, 13, requires_grad=True)
    before = logits.detach().clone()
    cross_entropy(logits, torch.zeros(1, 5, dtype=torch.long)).backward()
    assert torch.equal(logits.detach(), before)
