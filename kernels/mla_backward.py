"""MLA's attention backward glue quantised as it is read: the FP8 output gradients of the two up-projections.

In MLA's training form (``model.attention``) the query up-projection's output q (M, H x HEAD) has RoPE applied to
the last HEAD - NOPE channels of each head, and the KV up-projection's output (M, H x (NOPE + V)) is split into the
keys' no-RoPE part and the values. Backward, the attention kernel hands back d q (the rotated queries' gradient),
d k (M, H x HEAD) and d v (M, H x V); the up-projections' FP8 Dgrad and Wgrad (``model.linear``) multiply their
output gradients cast with transpose (``fp8_quant.quant_act_both``):

- the query's: d q with RoPE's backward applied to each head's rotated channels (``rope_backward``);
- the KV's: each head's no-RoPE channels of d k, then its d v (``assemble_heads``).

Done as separate kernels, each of these is written in BF16 and read again at once by the cast (Inductor's
``triton_poi_fused_..._cat_..._backward`` and ``triton_poi_fused_cat_slice``: 1.02 and 0.69 ms a 4096-token
micro-batch of 4 V3-shaped layers on an H100, docs/results/model-step.md's 18:09 reading). ``rope_backward_quant_both``
and ``heads_quant_both`` give ``quant_act_both`` of them bit for bit where ``FUSED`` and the Gluon cast runs
(``fp8_quant_gluon.runs_on``): each 128x128 tile computed or gathered from d q, or d k and d v, as the cast loads it,
never stored in BF16. Elsewhere (CPU, other GPUs, ``FUSED`` off) the torch references below, then the cast.

RoPE's backward: the forward rotates interleaved pairs, (y0, y1) = (x0 c - x1 s, x1 c + x0 s) (``model.fused.
apply_rotary``), so (d x0, d x1) = (d y0 c + d y1 s, d y1 c - d y0 s): the same rotation by -sin, in FP32 and rounded
to d q's dtype, as autograd's backward of ``apply_rotary`` computes it (its products summed in another order, which
addition does not see; a GPU kernel may fuse a product into the sum, a last-bit difference before the rounding).
"""

from __future__ import annotations

import torch

from .fp8_quant import AMAX_FLOOR, TILE, quant_act_both

FUSED = True  # the Gluon cast computes the glue where it runs (benchmarks' switch: False, the references then the cast)


def _check_rope(dq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head: int, nope: int) -> int:
    """The number of heads; raises on shapes ``rope_backward`` cannot take."""
    if dq.dim() != 2 or not dq.is_floating_point() or dq.stride(1) != 1:
        raise ValueError(f"dq must be a 2-D float tensor with unit column stride, got {tuple(dq.shape)} {dq.dtype}")
    rope = head - nope
    if rope <= 0 or rope % 2 or nope % 2 or dq.shape[1] % head:
        raise ValueError(f"head={head} and nope={nope} must leave an even number of RoPE channels, nope even, "
                         f"and divide dq's {dq.shape[1]} columns")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != rope // 2 or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32 (T, {rope // 2}), got {tuple(t.shape)} {t.dtype}")
    if cos.shape != sin.shape or cos.shape[0] == 0 or dq.shape[0] % cos.shape[0]:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same T, dividing dq's "
                         f"{dq.shape[0]} rows")
    return dq.shape[1] // head


def rope_backward(dq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head: int, nope: int) -> torch.Tensor:
    """d q (M, H x HEAD), rows in (batch, position) order, cos/sin (T, (HEAD - NOPE)/2) FP32 -> the same with each
    head's channels from NOPE on rotated back (module docstring), in d q's dtype: the up-projection's output
    gradient."""
    heads = _check_rope(dq, cos, sin, head, nope)
    g = dq.reshape(-1, cos.shape[0], heads, head)  # (B, T, H, HEAD)
    pairs = g[..., nope:].float().unflatten(-1, (-1, 2))  # (B, T, H, R/2, 2)
    y0, y1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((y0 * c + y1 * s, y1 * c - y0 * s), dim=-1).flatten(-2).to(dq.dtype)
    return torch.cat((g[..., :nope], rotated), dim=-1).reshape(dq.shape)


def _check_heads(dk: torch.Tensor, dv: torch.Tensor, head: int, nope: int) -> tuple[int, int]:
    """(H, V): the heads and the values' channels a head; raises on shapes ``assemble_heads`` cannot take."""
    heads = dk.shape[1] // head if dk.dim() == 2 and 0 < nope < head else 0
    if not heads or dk.shape[1] % head or dv.dim() != 2 or dv.shape[0] != dk.shape[0] or dv.shape[1] % heads:
        raise ValueError(f"dk {tuple(dk.shape)} must be (M, H x {head}) and dv {tuple(dv.shape)} (M, H x V)")
    return heads, dv.shape[1] // heads


def assemble_heads(dk: torch.Tensor, dv: torch.Tensor, head: int, nope: int) -> torch.Tensor:
    """d k (M, H x HEAD), d v (M, H x V) -> (M, H x (NOPE + V)): each head's first NOPE channels of d k, then its
    d v (the KV up-projection's output gradient)."""
    heads, _ = _check_heads(dk, dv, head, nope)
    k = dk.reshape(dk.shape[0], heads, head)[..., :nope]
    return torch.cat((k, dv.reshape(dv.shape[0], heads, -1)), dim=-1).reshape(dk.shape[0], -1)


def rope_backward_quant_both(dq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head: int, nope: int,
                             pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR):
    """``quant_act_both(rope_backward(dq, cos, sin, head, nope))`` bit for bit (up to the last-bit note in the module
    docstring): the query up-projection's output gradient in 1x128 tiles and, transposed, in 128x1 tiles, from one
    read of d q where the Gluon cast runs."""
    _check_rope(dq, cos, sin, head, nope)
    if FUSED and dq.dtype == torch.bfloat16:
        from . import fp8_quant_gluon  # imports the GEMMs: not at the top

        if fp8_quant_gluon.runs_on(dq) and cos.device == dq.device:
            return fp8_quant_gluon.quant_act_both_gluon(dq, pow2_scale, amax_floor, rope=(cos, sin, head, nope))
    return quant_act_both(rope_backward(dq, cos, sin, head, nope), pow2_scale, amax_floor)


def heads_quant_both(dk: torch.Tensor, dv: torch.Tensor, head: int, nope: int, pow2_scale: bool = False,
                     amax_floor: float = AMAX_FLOOR):
    """``quant_act_both(assemble_heads(dk, dv, head, nope))`` bit for bit: the KV up-projection's output gradient
    cast with transpose, each tile read from d k or d v where the Gluon cast runs (NOPE and V multiples of 128: a
    tile lies in one of them)."""
    _, v = _check_heads(dk, dv, head, nope)
    if FUSED and nope % TILE == 0 and v % TILE == 0 and dk.dtype == dv.dtype == torch.bfloat16:
        from . import fp8_quant_gluon

        if fp8_quant_gluon.runs_on(dk) and fp8_quant_gluon.runs_on(dv) and dk.device == dv.device:
            return fp8_quant_gluon.quant_act_both_gluon(dk, pow2_scale, amax_floor, heads=(dv, head, nope))
    return quant_act_both(assemble_heads(dk, dv, head, nope), pow2_scale, amax_floor)
