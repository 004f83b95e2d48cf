"""Fused SwiGLU for the MoE experts: ``act = silu(gate) * up`` with ``h = [gate | up]`` (M, 2I).

The forward can quantise its output to FP8 1×128 tiles in the same pass, which is what the FP8
down-projection reads: one read of ``h`` and an fp8 write, instead of a bf16 write, a bf16 read and
an fp8 write. DeepSeek caches the SwiGLU *input* and recomputes the output in backward (TR §3.3);
the backward kernel takes ``h`` and ``d act`` and writes ``d h`` in one pass.
"""

import torch

from .e4m3_cast import EMULATED, cast_for_device
from .fp8_quant import (
    AMAX_FLOOR,
    TILE,
    cast_for_store,
    check_row_bound,
    empty_cols_t_output,
    empty_rows_output,
    past_bound,
    quant_act_both,
    store_cols_t,
    store_rows,
)
from .triton_compat import cdiv, tl, triton


@triton.jit
def _load_gate_up(h_ptr, M, I, stride_hm, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (BLOCK_R, BLOCK_C) tiles of gate and up (fp32), with their rows, cols and mask."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < M) & (cols[None, :] < I)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    return gate, up, rows, cols, mask


@triton.jit
def _swiglu_fwd_kernel(
    # pointers: h (M, 2I), out (M, I) bf16 or fp8, out scales (M, I/128), the rows in use (1,) int32 or None
    h_ptr, out_ptr, scale_ptr, bound_ptr,
    # sizes
    M, I,
    # strides
    stride_hm, stride_om, stride_sm,
    # meta
    QUANT: tl.constexpr, POW2: tl.constexpr, FLOOR: tl.constexpr, CAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    if bound_ptr is not None:
        if past_bound(tl.program_id(0) * BLOCK_R, bound_ptr):
            return
    gate, up, rows, cols, mask = _load_gate_up(h_ptr, M, I, stride_hm, BLOCK_R, BLOCK_C)
    act = gate * tl.sigmoid(gate) * up  # (BLOCK_R, BLOCK_C)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    store_rows(out_ptrs, scale_ptr + rows * stride_sm + tl.program_id(1), act, mask, rows < M, QUANT, POW2,
               FLOOR, CAST)


@triton.jit
def _swiglu_quant_t_kernel(
    # pointers: h (M, 2I), out (I, M) fp8, out scales (I, ceil(M/128)), the rows in use (1,) int32 or None
    h_ptr, q_ptr, s_ptr, bound_ptr,
    # sizes
    M, I,
    # strides
    stride_hm, stride_qi, stride_si,
    # meta: BLOCK_R = 128, one 128x1 tile per column
    POW2: tl.constexpr, FLOOR: tl.constexpr, CAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    if bound_ptr is not None:
        if past_bound(tl.program_id(0) * BLOCK_R, bound_ptr):
            return
    gate, up, rows, cols, mask = _load_gate_up(h_ptr, M, I, stride_hm, BLOCK_R, BLOCK_C)
    act = gate * tl.sigmoid(gate) * up  # (BLOCK_R, BLOCK_C), as the forward kernel computes it
    store_cols_t(q_ptr, s_ptr, act, rows, cols, mask, cols < I, stride_qi, stride_si, tl.program_id(0), POW2, FLOOR,
                 CAST)


@triton.jit
def swiglu_grads(gate, up, dact):
    """(d gate, d up) in FP32 from gate, up and d act (FP32): the backward of ``silu(gate) * up``. One function for
    ``_swiglu_bwd_kernel`` and the Gluon cast that quantises it (``fp8_quant_gluon``), so both give the same bits."""
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dact * up * sig * (1.0 + gate * (1.0 - sig))  # d silu / d gate = sig (1 + g (1 - sig))
    dup = dact * silu
    return dgate, dup


@triton.jit
def _swiglu_bwd_kernel(
    # pointers: h (M, 2I), d act (M, I), d h (M, 2I), the rows in use (1,) int32 or None
    h_ptr, dact_ptr, dh_ptr, bound_ptr,
    # sizes
    M, I,
    # strides
    stride_hm, stride_dm, stride_dhm,
    # meta
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    if bound_ptr is not None:
        if past_bound(tl.program_id(0) * BLOCK_R, bound_ptr):
            return
    gate, up, rows, cols, mask = _load_gate_up(h_ptr, M, I, stride_hm, BLOCK_R, BLOCK_C)
    dact = tl.load(dact_ptr + rows[:, None].to(tl.int64) * stride_dm + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)
    dgate, dup = swiglu_grads(gate, up, dact)
    dh_ptrs = dh_ptr + rows[:, None].to(tl.int64) * stride_dhm + cols[None, :]
    tl.store(dh_ptrs, cast_for_store(dgate, dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptrs + I, cast_for_store(dup, dh_ptr.dtype.element_ty), mask=mask)


def _check_h(h: torch.Tensor) -> int:
    if h.dim() != 2 or h.shape[1] % 2 != 0 or h.stride(1) != 1:
        raise ValueError(f"h must be (M, 2I) with unit column stride, got shape={tuple(h.shape)} stride={h.stride()}")
    return h.shape[1] // 2


_BLOCK_R = 16
_BLOCK_C_T = 64  # columns per program of the 128-row transposed quantisation


def swiglu(h: torch.Tensor, quantize: bool = False, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR,
           out_dtype: torch.dtype | None = None, row_bound: torch.Tensor | None = None):
    """h (M, 2I) → silu(h[:, :I]) * h[:, I:] as out_dtype (h.dtype when None) (M, I), or (fp8 (M, I), scales
    (M, ceil(I/128))) quantised from the FP32 product, each tile's amax floored at ``amax_floor``.

    ``row_bound`` (each function here): (1,) int32 on h's device, the rows of h in use (a worst-case-sized
    buffer's, ``moe_permute.DispatchPlan.rows_bound``), read on the device; the outputs' rows after it (the
    transposed output's columns, and their scales) are left unwritten."""
    I = _check_h(h)
    M = h.shape[0]
    out, scale = empty_rows_output(M, I, out_dtype or h.dtype, quantize, h.device)
    check_row_bound(row_bound, h.device)
    grid = (cdiv(M, _BLOCK_R), cdiv(I, TILE))
    _swiglu_fwd_kernel[grid](h, out, scale, row_bound, M, I, h.stride(0), out.stride(0), scale.stride(0),
                             QUANT=quantize, POW2=pow2_scale, FLOOR=amax_floor,
                             CAST=cast_for_device(h.device) if quantize else EMULATED, BLOCK_R=_BLOCK_R, BLOCK_C=TILE)
    return (out, scale) if quantize else out


def swiglu_quant_t(h: torch.Tensor, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR,
                   row_bound: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """h (M, 2I) → the SwiGLU output quantised for a weight gradient, without storing it: (act^T fp8 (I, M),
    scales (I, ceil(M/128))) in 128x1 tiles (tiles of 128 tokens), what ``quant_act_128x1_t`` gives for
    ``swiglu(h, out_dtype=torch.float32)``. ``out``: the caller's buffers instead (``fp8_quant.check_out_t``,
    scales with unit stride along their rows), such as a micro-batch's columns of a wider stash."""
    I = _check_h(h)
    M = h.shape[0]
    q, scale = empty_cols_t_output(M, I, h.device, out)
    check_row_bound(row_bound, h.device)
    grid = (cdiv(M, TILE), cdiv(I, _BLOCK_C_T))
    _swiglu_quant_t_kernel[grid](h, q, scale, row_bound, M, I, h.stride(0), q.stride(0), scale.stride(0),
                                 POW2=pow2_scale, FLOOR=amax_floor, CAST=cast_for_device(h.device), BLOCK_R=TILE,
                                 BLOCK_C=_BLOCK_C_T)
    return q, scale


def swiglu_backward(h: torch.Tensor, dact: torch.Tensor, row_bound: torch.Tensor | None = None) -> torch.Tensor:
    """d h (M, 2I) from h (M, 2I) and d act (M, I); dtype of h."""
    I = _check_h(h)
    if tuple(dact.shape) != (h.shape[0], I) or dact.stride(1) != 1:
        raise ValueError(f"dact must be {(h.shape[0], I)} with unit column stride, got {tuple(dact.shape)}")
    dh = torch.empty_like(h)
    check_row_bound(row_bound, h.device)
    grid = (cdiv(h.shape[0], _BLOCK_R), cdiv(I, TILE))
    _swiglu_bwd_kernel[grid](h, dact, dh, row_bound, h.shape[0], I, h.stride(0), dact.stride(0), dh.stride(0),
                             BLOCK_R=_BLOCK_R, BLOCK_C=TILE)
    return dh


# Whether ``swiglu_backward_quant_both`` runs the Gluon kernel on a Hopper GPU (``fp8_quant_gluon``, its ``dact``
# mode): d h computed tile by tile and quantised both ways from shared memory, never stored in BF16. False: the
# backward, then ``quant_act_both`` (the same bits).
BACKWARD_BOTH = True


def swiglu_backward_quant_both(h: torch.Tensor, dact: torch.Tensor, pow2_scale: bool = False,
                               amax_floor: float = AMAX_FLOOR, row_bound: torch.Tensor | None = None,
                               out_t: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``quant_act_both(swiglu_backward(h, dact, row_bound), row_bound=row_bound)`` bit for bit: d h (M, 2I) in 1x128
    tiles for the gate_up Dgrad and, transposed, in 128x1 tiles for its Wgrad (the routed experts' backward,
    ``model.fused_experts``). Where ``BACKWARD_BOTH``, the Gluon kernel runs (``fp8_quant_gluon.runs_on``) and I is a
    multiple of 128, each 128x128 tile of d h is computed from h and d act and quantised both ways in one pass:
    d h is never stored in BF16 (one write and one read of (M, 2I) fewer); else the two passes. ``out_t``: the
    transposed pair into the caller's buffers (``fp8_quant.check_out_t``)."""
    I = _check_h(h)
    if tuple(dact.shape) != (h.shape[0], I) or dact.stride(1) != 1 or dact.dtype != h.dtype:
        raise ValueError(f"dact must be {(h.shape[0], I)} {h.dtype} with unit column stride, got "
                         f"{tuple(dact.shape)} {dact.dtype}")
    if BACKWARD_BOTH and I % TILE == 0:
        from . import fp8_quant_gluon  # imports the GEMMs: not at the top

        if fp8_quant_gluon.runs_on(h):
            return fp8_quant_gluon.quant_act_both_gluon(h, pow2_scale, amax_floor, row_bound=row_bound, dact=dact,
                                                        out_t=out_t)
    return quant_act_both(swiglu_backward(h, dact, row_bound), pow2_scale, amax_floor, row_bound=row_bound,
                          out_t=out_t)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd SwiGLU on h (M, 2I); saves h only."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return swiglu(h)

    @staticmethod
    def backward(ctx, dact: torch.Tensor):
        (h,) = ctx.saved_tensors
        return swiglu_backward(h, dact.contiguous())


def swiglu_ref(h: torch.Tensor) -> torch.Tensor:
    """Reference in float64."""
    gate, up = h.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def benchmark(M: int = 32768, I: int = 2048) -> dict[str, float]:
    """GB/s of the forward (bf16 and fused fp8) and backward on CUDA, bytes read plus written."""
    h = torch.randn(M, 2 * I, device="cuda", dtype=torch.bfloat16)
    dact = torch.randn(M, I, device="cuda", dtype=torch.bfloat16)
    runs = {
        "fwd_bf16": (lambda: swiglu(h), M * I * 6),
        "fwd_fp8_fused": (lambda: swiglu(h, quantize=True), M * I * 5),
        "bwd": (lambda: swiglu_backward(h, dact), M * I * 10),
    }
    return {name: nbytes / (triton.testing.do_bench(fn, return_mode="median") * 1e-3) / 1e9
            for name, (fn, nbytes) in runs.items()}
