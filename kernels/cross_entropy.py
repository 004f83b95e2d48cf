"""Fused cross-entropy of BF16 logits: the loss in one read of the logits, its gradient in one read and one write.

The output head's logits are the largest activation of a V3 step (4096 tokens x 129,280 words: 1.06 GB in
BF16). ``model.losses``' chunked loss runs a softmax kernel per chunk of rows that writes FP32 (6 bytes a logit
forward, 12 backward, and the softmax kernels run far below copy bandwidth at this width: 4.6 and 7.2 ms a
4096-token micro-batch on an H100, measured in the one-GPU loop, `docs/results/one-gpu.md`). Here:

- forward: one program per row keeps a running maximum and sum of exponentials per lane over the row's
  vocabulary blocks, then the row's log-sum-exp ``lse`` and loss ``lse - x[target]``: reads 2 bytes a logit and
  keeps 4 bytes a row (``lse``) for backward;
- backward: ``d x = (exp(x - lse) - [col == target]) * scale[row]``, one (row, block) tile per program, read
  2 bytes and written 2 bytes a logit in the logits' dtype.

These are the one-pass bytes ``simulator.costs.elementwise`` gives the ``cross_entropy`` class (2 + 4 a logit),
priced at the ``fused_cross_entropy`` point when ``training.kernels.loss`` is ``fused``. The sums are FP32, as
Liger's and Megatron's fused cross-entropies keep them; rows whose target is ``ignore_index`` add nothing and
get a zero gradient. A target outside [0, V) makes its row's loss and gradient NaN (so the mean is NaN), where
``F.cross_entropy`` stops on a device-side assert: never a read outside the row, and never a quiet number.
"""

from __future__ import annotations

import torch

from .fp8_quant import cast_for_store
from .triton_compat import cdiv, tl, triton

# Finite stand-in for -inf in masked lanes: exp(NEG - m) is 0 for any real row maximum m, and a lane that never
# saw a logit (a row shorter than the block) is cancelled by exp(NEG - max) = 0 in the final reduction, where
# -inf - -inf would be NaN.
NEG = -1.0e30
_BLOCK_FWD = 2048  # vocabulary lanes per step of a forward row
_BLOCK_BWD = 4096  # logits per backward tile


@triton.jit
def _ce_fwd_kernel(x_ptr, t_ptr, lse_ptr, loss_ptr, V, stride_x, IGNORE: tl.constexpr, NEG_: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_x
    m = tl.full((BLOCK,), NEG_, tl.float32)  # running maximum per lane
    s = tl.zeros((BLOCK,), tl.float32)  # sum of exp(x - m) per lane
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=NEG_).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
    target = tl.load(t_ptr + row)
    valid = target != IGNORE
    in_range = (target >= 0) & (target < V)  # else NaN, never a read outside the row (F.cross_entropy asserts)
    picked = tl.load(base + tl.where(valid & in_range, target, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, tl.where(in_range, lse - picked, float("nan")), 0.0))


@triton.jit
def _ce_bwd_kernel(x_ptr, t_ptr, lse_ptr, scale_ptr, dx_ptr, V, stride_x, stride_dx, IGNORE: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    target = tl.load(t_ptr + row)
    p = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
    in_range = (target >= 0) & (target < V)
    grad = tl.where(target != IGNORE, tl.where(in_range, p * scale, float("nan")), 0.0)
    tl.store(dx_ptr + row.to(tl.int64) * stride_dx + cols, cast_for_store(grad, dx_ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (N, V) with unit column stride, got shape={tuple(logits.shape)} "
                         f"stride={logits.stride()}")
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must be ({logits.shape[0]},), got {tuple(targets.shape)}")


def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss (N,) FP32, 0 where ignored; log-sum-exp (N,) FP32) of logits (N, V) and targets (N,)."""
    _check(logits, targets)
    n, v = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _ce_fwd_kernel[(n,)](logits, targets.contiguous(), lse, loss, v, logits.stride(0), IGNORE=ignore_index,
                             NEG_=NEG, BLOCK=_BLOCK_FWD, num_warps=8)
    return loss, lse


def cross_entropy_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                      ignore_index: int = -100) -> torch.Tensor:
    """d loss / d logits (N, V) in the logits' dtype, for a loss sum(scale[r] * row_loss[r])."""
    _check(logits, targets)
    n, v = logits.shape
    grad = torch.empty_like(logits)
    if n:
        grid = (n, cdiv(v, _BLOCK_BWD))
        _ce_bwd_kernel[grid](logits, targets.contiguous(), lse.contiguous(), scale.float().contiguous(), grad, v,
                             logits.stride(0), grad.stride(0), IGNORE=ignore_index, BLOCK=_BLOCK_BWD, num_warps=8)
    return grad


class FusedCrossEntropyFn(torch.autograd.Function):
    """Mean over rows whose target is not ``ignore_index`` of ``-log_softmax(x)[target]`` (NaN with no such row,
    0/0, as ``model.losses.cross_entropy``; the gradient is then zero). Saves the logits, the targets and the FP32
    log-sum-exp per row."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        loss, lse = cross_entropy_fwd(logits, targets, ignore_index)
        count = (targets != ignore_index).sum()
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.ignore_index = ignore_index
        return loss.sum() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, lse, count = ctx.saved_tensors
        scale = (grad_loss.float() / count).expand(logits.shape[0])  # d loss / d row loss, one per row
        return cross_entropy_bwd(logits, targets, lse, scale, ctx.ignore_index), None, None


def fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,) through the Triton kernels above."""
    return FusedCrossEntropyFn.apply(logits, targets, ignore_index)


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Reference in float64."""
    return torch.nn.functional.cross_entropy(logits.double(), targets, ignore_index=ignore_index)


def benchmark(n: int = 4096, v: int = 129280) -> dict[str, float]:
    """GB/s of the forward (2 bytes a logit read) and backward (2 read + 2 written) on CUDA."""
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    _, lse = cross_entropy_fwd(logits, targets)
    scale = torch.full((n,), 1.0 / n, device="cuda")
    runs = {"fwd": (lambda: cross_entropy_fwd(logits, targets), 2 * n * v),
            "bwd": (lambda: cross_entropy_bwd(logits, targets, lse, scale), 4 * n * v)}
    return {name: nbytes / (triton.testing.do_bench(fn, return_mode="median") * 1e-3) / 1e9
            for name, (fn, nbytes) in runs.items()}
