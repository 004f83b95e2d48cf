"""AdamW in one pass over a flat shard: FP32 master weights, FP32 gradient, moments in FP32 or BF16, and
optionally the updated weight written in the model's dtype.

``torch.optim.AdamW``'s single-tensor step runs each of its ~10 operations as its own kernel over the
whole shard (and, with BF16 moments, widens both to FP32 copies first): about 100 bytes of HBM traffic a
parameter. This kernel reads the gradient (4), the master (4) and the two moments (2 + 2 in BF16) and
writes the master, the moments and the weight (4 + 4 + 2): 22 bytes, what the simulator prices as the
step's ``update`` part (``simulator.costs.optimizer_step``). ``grad_scale`` folds a gradient divisor and the
clipping coefficient into the read.

The arithmetic is ``torch.optim.AdamW``'s (decoupled weight decay, bias correction, ``eps`` added after
the bias-corrected square root), in FP32, in its order, with IEEE square root and divisions:
``adamw_ref_`` is that order in torch ops. The compiler may fuse a multiply and an add, so the two can
differ in the last bit of a step.
"""

import math

import torch

from .fp8_quant import cast_for_store
from .triton_compat import cdiv, tl, triton

BLOCK = 2048


@triton.jit
def _adamw_kernel(
    # pointers: grad, master (n,) fp32; moments (n,) fp32 or bf16; out (n,) the weight's dtype (or unused)
    grad_ptr, master_ptr, avg_ptr, sq_ptr, out_ptr,
    # sizes and scalars (fp32)
    n, grad_scale, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias2_sqrt, eps,
    # meta
    WRITE_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0) * grad_scale
    master = tl.load(master_ptr + offs, mask=mask, other=0.0) * decay
    avg = tl.load(avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sq = tl.load(sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    avg = avg + one_minus_beta1 * (g - avg)  # lerp with weight < 0.5, as torch computes it
    sq = sq * beta2 + one_minus_beta2 * (g * g)
    denom = tl.math.div_rn(tl.sqrt_rn(sq), bias2_sqrt) + eps  # IEEE sqrt and divisions, as torch's
    master = master - step_size * tl.math.div_rn(avg, denom)
    tl.store(master_ptr + offs, master, mask=mask)
    tl.store(avg_ptr + offs, cast_for_store(avg, avg_ptr.dtype.element_ty), mask=mask)
    tl.store(sq_ptr + offs, cast_for_store(sq, sq_ptr.dtype.element_ty), mask=mask)
    if WRITE_OUT:
        tl.store(out_ptr + offs, cast_for_store(master, out_ptr.dtype.element_ty), mask=mask)


def _scalars(lr: float, step: int, beta1: float, beta2: float, weight_decay: float) -> tuple[float, float, float]:
    """(decay factor, step size, sqrt of the second bias correction) for 1-based ``step``."""
    return 1 - lr * weight_decay, lr / (1 - beta1**step), math.sqrt(1 - beta2**step)


def _check(grad, master, exp_avg, exp_avg_sq, out) -> None:
    n = master.numel()
    for name, t in (("grad", grad), ("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("out", out)):
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != n or not t.is_contiguous():
            raise ValueError(f"adamw: {name} must be 1-D contiguous with {n} elements, got {tuple(t.shape)}")
    if grad.dtype != torch.float32 or master.dtype != torch.float32:
        raise ValueError(f"adamw: grad and master must be fp32, got {grad.dtype} and {master.dtype}")
    if exp_avg.dtype not in (torch.float32, torch.bfloat16) or exp_avg_sq.dtype != exp_avg.dtype:
        raise ValueError(f"adamw: moments must both be fp32 or bf16, got {exp_avg.dtype} and {exp_avg_sq.dtype}")


def adamw_(grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
           lr: float, step: int, beta1: float, beta2: float, eps: float, weight_decay: float,
           grad_scale: float = 1.0, out: torch.Tensor | None = None) -> None:
    """One AdamW step in place on (master, exp_avg, exp_avg_sq) from ``grad * grad_scale``; ``step`` is
    1-based (after this update); ``out``, if given, receives the new master in its own dtype."""
    _check(grad, master, exp_avg, exp_avg_sq, out)
    decay, step_size, bias2_sqrt = _scalars(lr, step, beta1, beta2, weight_decay)
    n = master.numel()
    if n == 0:
        return
    _adamw_kernel[(cdiv(n, BLOCK),)](
        grad, master, exp_avg, exp_avg_sq, out if out is not None else master,
        n, grad_scale, decay, 1 - beta1, beta2, 1 - beta2, step_size, bias2_sqrt, eps,
        WRITE_OUT=out is not None, BLOCK=BLOCK, num_warps=4,
    )


def adamw_ref_(grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               lr: float, step: int, beta1: float, beta2: float, eps: float, weight_decay: float,
               grad_scale: float = 1.0, out: torch.Tensor | None = None) -> None:
    """The torch reference: ``torch.optim.AdamW``'s single-tensor update, op for op, moments widened to FP32
    for the math and stored back in their dtype. Temporaries are as large as the tensors: callers chunk."""
    _check(grad, master, exp_avg, exp_avg_sq, out)
    decay, step_size, bias2_sqrt = _scalars(lr, step, beta1, beta2, weight_decay)
    g = grad * grad_scale if grad_scale != 1.0 else grad
    avg, sq = exp_avg.float(), exp_avg_sq.float()  # no copy when FP32
    master.mul_(decay)
    avg.lerp_(g, 1 - beta1)
    sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (sq.sqrt() / bias2_sqrt).add_(eps)
    master.addcdiv_(avg, denom, value=-step_size)
    if exp_avg.dtype != torch.float32:
        exp_avg.copy_(avg)
        exp_avg_sq.copy_(sq)
    if out is not None:
        out.copy_(master)
