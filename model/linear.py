"""The linear layer every dense matmul of the model uses: BF16 or FP8, fused or deferred weight grad.

Forward: y = x W^T (+ b). With an FP8 GEMM both operands are quantised (1x128 activation tiles,
128x128 weight blocks) and multiplied by it. Backward is straight-through by default: gradients
in the high-precision dtype against the *unquantised* tensors. With ``fp8_backward`` the two
backward GEMMs run in FP8 as in TR §3.3 (Figure 6): Dgrad quantises the output gradient in 1x128
tiles along N and multiplies the 128x128-block weight; Wgrad quantises both the output gradient and
the input in tiles of 128 tokens (the reduction runs over tokens) and accumulates in FP32. Where the
ops have ``quant_act_both``, each of x and the output gradient is read once for both of its tilings: x's
128-token tiles are made in the forward pass and saved for Wgrad instead of x (DeepSeek-V3 keeps FP8
activations for the backward pass), and the output gradient's in the Dgrad's pass. Layers fed the very same
tensor (MLA's ``q_a_proj`` and ``kv_a_proj_with_mqa``, an MLP's ``gate_proj`` and ``up_proj``) quantise it
once (``Fp8InputCache``).

``LinearFn`` and its grouped twin ``model.grouped_linear.GroupedLinearFn`` are the model's one
autograd stack for FP8 layers: the kernels package provides GEMMs, not layers, so the weight
gradient can be deferred (``WeightGradStore``) whichever GEMM runs.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.model.fp8 import Fp8Ops, quant_weight_fwd, storage_owner, tensor_key
from moeplan.model.weight_grad import (
    WeightGradStore,
    fused_main_grad_fp8,
    fused_main_grad_mm,
    weight_grad_now_or_later,
    wgrad_dtype,
)

QuantPair = tuple[torch.Tensor, torch.Tensor]  # E4M3 values and their FP32 scales


class _InputEntry(NamedTuple):
    ref: weakref.ref  # the input (its base for a view)
    version: int
    ops: Fp8Ops
    rows: QuantPair  # (M, K) in 1 x block tiles
    t: QuantPair | None  # x^T (K, M) in tiles of block tokens, or None


class Fp8InputCache:
    """The FP8 copies of the last few layer inputs, so that layers fed the very same tensor quantise it once: MLA's
    ``q_a_proj`` and ``kv_a_proj_with_mqa`` (both read the normed hidden states), an MLP's ``gate_proj`` and
    ``up_proj``.

    An entry is keyed by the input's storage, dtype, shape and strides and belongs to the ``Fp8Ops`` that made it;
    as ``Fp8WeightCache``'s, it is valid while the input is alive and its version counter unchanged. It is dropped
    when the input is freed, and the oldest beyond ``capacity`` is dropped, so the cache holds at most ``capacity``
    FP8 copies that autograd does not hold anyway. ``q_b_proj`` runs between MLA's two readers of one input: 2.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, _InputEntry] = OrderedDict()
        self.misses = 0

    def __call__(self, ops: Fp8Ops, x: torch.Tensor, with_t: bool) -> tuple[QuantPair, QuantPair | None]:
        """x (..., K) -> (x as (M, K) in 1 x block tiles, x^T (K, M) in tiles of block tokens or None). The latter
        with ``with_t`` only, from ``ops.quant_act_both`` (one read of x)."""
        cacheable = self.capacity > 0 and not x.is_inference()  # inference tensors have no version counter
        key, base = tensor_key(x), storage_owner(x)
        hit = self._entries.get(key) if cacheable else None
        if (hit is not None and hit.ref() is base and hit.version == x._version and hit.ops is ops
                and (hit.t is not None or not with_t)):
            return hit.rows, hit.t if with_t else None
        self.misses += 1
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        rows, t = ops.quant_act_both(x2) if with_t else (ops.quant_act(x2), None)
        if cacheable:
            self._store(key, base, _InputEntry(None, x._version, ops, rows, t))
        return rows, t

    def _store(self, key: tuple, base: torch.Tensor, entry: _InputEntry) -> None:
        def drop(ref: weakref.ref) -> None:  # the input is freed, and with it its FP8 copy
            if getattr(self._entries.get(key), "ref", None) is ref:
                self._entries.pop(key, None)

        self._entries.pop(key, None)
        self._entries[key] = entry._replace(ref=weakref.ref(base, drop))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


# The inputs' FP8 copies, for every FP8 ``Linear`` (entries belong to one ``Fp8Ops`` each).
FP8_INPUT_CACHE = Fp8InputCache()


def _quant_t(fp8: Fp8Ops, operand: QuantPair | torch.Tensor) -> QuantPair:
    """A Wgrad operand in tiles of block tokens, (C, M): made already, or quantised now from a (..., C) tensor."""
    return operand if isinstance(operand, tuple) else fp8.quant_act_t(operand.reshape(-1, operand.shape[-1]))


def _fp8_weight_grad(fp8: Fp8Ops, weight: torch.Tensor, g: QuantPair | torch.Tensor,
                     x: QuantPair | torch.Tensor) -> Callable[[], torch.Tensor | None]:
    """Wgrad (N, K) = g^T x with both operands in tiles of block tokens (``_quant_t``), FP32 accumulation, or None
    once added into ``weight.main_grad`` in the GEMM's epilogue (``fused_main_grad_fp8``). The closure holds only
    what it multiplies: FP8 copies where made already (less memory while deferred)."""

    def weight_grad() -> torch.Tensor | None:
        operands = (*_quant_t(fp8, g), *_quant_t(fp8, x))
        if fused_main_grad_fp8(weight, *operands):
            return None
        return fp8.gemm(*operands, out_dtype=wgrad_dtype(weight))

    return weight_grad


def _straight_through_weight_grad(param: torch.Tensor, g2: torch.Tensor,
                                  x: torch.Tensor) -> Callable[[], torch.Tensor | None]:
    """Wgrad (N, K) = g2^T x in the high-precision dtype, or None once added into ``param.main_grad``."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    return lambda: None if fused_main_grad_mm(param, g2.t(), x2) else g2.t() @ x2


class LinearFn(torch.autograd.Function):
    """y = x W^T with an optional FP8 forward and an optional deferred weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, store: WeightGradStore | None, fp8: Fp8Ops | None, fp8_backward: bool = False):
        ctx.store, ctx.weight, ctx.x_shape, ctx.out_dtype = store, weight, x.shape, x.dtype
        ctx.fp8 = fp8 if fp8_backward else None
        ctx.x_t_saved = False
        if fp8 is None:
            ctx.save_for_backward(weight, x)
            return F.linear(x, weight)
        # An FP8 Wgrad multiplies x in tiles of 128 tokens: made in the forward's pass over x and saved instead of x.
        with_t = ctx.fp8 is not None and ctx.needs_input_grad[1] and fp8.quant_act_both is not None
        (xq, xs), x_t = FP8_INPUT_CACHE(fp8, x, with_t)
        if x_t is not None:
            ctx.x_t_saved = True
            ctx.save_for_backward(weight, *x_t)
        elif ctx.needs_input_grad[1]:  # the Wgrad multiplies x: straight-through, or FP8 quantising it then
            ctx.save_for_backward(weight, x)
        else:  # the Dgrad needs only the weight
            ctx.save_for_backward(weight)
        wq, ws = quant_weight_fwd(fp8, weight, fp8_backward)
        out = fp8.gemm(xq, xs, wq, ws, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        weight, *saved = ctx.saved_tensors
        fp8, needs_wgrad = ctx.fp8, ctx.needs_input_grad[1]
        grad_out = grad_out.contiguous()
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        grad_x = None
        none = (None,) * 3  # store, fp8, fp8_backward
        if fp8 is not None and needs_wgrad and ctx.needs_input_grad[0] and fp8.quant_act_both is not None:
            # Dgrad: (M, N) tiles x W^T (K, N) blocks; the Wgrad's tiles of g2 from the same pass
            return *fp8_backward_from_quantised(ctx, *fp8.quant_act_both(g2)), *none
        if ctx.needs_input_grad[0]:
            if fp8 is None:
                grad_x = grad_out @ weight  # (..., K)
            else:
                wt, wt_scale = fp8.quant_weight(weight.t())
                grad_x = fp8.gemm(*fp8.quant_act(g2), wt, wt_scale, out_dtype=grad_out.dtype).reshape(ctx.x_shape)
        if not needs_wgrad:
            return grad_x, None, *none
        if fp8 is None:
            weight_grad = _straight_through_weight_grad(ctx.weight, g2, saved[0])
        else:
            weight_grad = _fp8_weight_grad(fp8, ctx.weight, g2, tuple(saved) if ctx.x_t_saved else saved[0])
        return grad_x, weight_grad_now_or_later(ctx.store, ctx.weight, weight_grad), *none


def fp8_backward_from_quantised(ctx, g: QuantPair, g_t: QuantPair) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad x, grad W or None once added or deferred) of a ``LinearFn.forward`` run on ``ctx`` with an FP8 backward,
    from its output gradient already cast both ways: ``g`` (M, N) in 1 x block tiles for the Dgrad, ``g_t`` (N, M) in
    tiles of block tokens for the Wgrad. ``LinearFn.backward`` casts it with ``quant_act_both``; MLA's up-projections
    (``model.attention``) have their output gradients cast as the attention's backward glue is read."""
    weight, *saved = ctx.saved_tensors
    fp8, grad_x = ctx.fp8, None
    if ctx.needs_input_grad[0]:
        wt, wt_scale = fp8.quant_weight(weight.t())
        grad_x = fp8.gemm(*g, wt, wt_scale, out_dtype=ctx.out_dtype).reshape(ctx.x_shape)
    if not ctx.needs_input_grad[1]:
        return grad_x, None
    weight_grad = _fp8_weight_grad(fp8, ctx.weight, g_t, tuple(saved) if ctx.x_t_saved else saved[0])
    return grad_x, weight_grad_now_or_later(ctx.store, ctx.weight, weight_grad)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) routed through ``LinearFn``.

    ``fp8`` None = plain matmul in the parameter dtype; an ``Fp8Ops`` = FP8 block quantisation.
    ``weight_grad_store`` is set by ``attach_weight_grad_store`` for zero-bubble schedules.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        fp8: Fp8Ops | None = None,
        fp8_backward: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.fp8 = fp8
        self.fp8_backward = fp8_backward
        self.weight_grad_store: WeightGradStore | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fuse_main_grad = x.is_cuda and hasattr(self.weight, "main_grad")  # LinearFn adds the Wgrad into it
        if self.fp8 is None and self.weight_grad_store is None and not fuse_main_grad:
            return F.linear(x, self.weight, self.bias)
        fp8_backward = self.fp8_backward and torch.is_grad_enabled()  # no graph: nothing made for a backward
        y = LinearFn.apply(x, self.weight, self.weight_grad_store, self.fp8, fp8_backward)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fp8" if self.fp8 is not None else "")


# Two linears that read one input (MLA's q_a and kv_a projections, an MLP's gate and up) run as a pair
# (``paired``): their output gradients cast in one call and one Dgrad, instead of two of each and a sum. Off until its
# GPU run: the kernels' path (the side-by-side W^T blocks, the Wgrads from row slices of the cast) has been run on the
# CPU's reference ops only (tests/model/test_paired_linear.py; its Hopper test and the model_step arm
# ``@paired-linears=on`` are the measurements to take). The simulator prices the layers one by one, as off.
PAIRED = False


def paired(x: torch.Tensor, a: nn.Module, b: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a(x), b(x))`` for two ``Linear`` layers that read the same input, the same values (the forward's GEMMs as
    the layers run them); their backward is one (``PairedLinearFn``): with an FP8 backward the two output gradients
    side by side (Na + Nb columns) cast with transpose in one call and multiplied by [Wa Wb]^T in one Dgrad GEMM
    (one 2,112-column cast for V3's q_a and kv_a, 44 and 45 us apart on an H200 below ~4K columns,
    docs/results/mla-glue/h200-casts.json), and in BF16 the second Dgrad added into the first inside its GEMM
    (``addmm_``), where autograd would sum the two input gradients in a kernel of its own. Each weight's Wgrad is its
    own, as the layer's. Layers that cannot pair (biases, other classes, different precision or W store), or with
    ``PAIRED`` off, run one after the other; so do FP8 layers whose first one's outputs are not whole tiles (a tile
    of the side-by-side gradient would then hold both layers' columns under one scale)."""
    if not (PAIRED and type(a) is Linear and type(b) is Linear and a.bias is None and b.bias is None
            and a.fp8 is b.fp8 and a.fp8_backward == b.fp8_backward and a.weight_grad_store is b.weight_grad_store
            and a.weight.dtype == b.weight.dtype and (a.fp8 is None or not a.fp8_backward or (
                a.fp8.quant_act_both is not None and a.out_features % a.fp8.block == 0))):
        return a(x), b(x)
    fp8_backward = a.fp8_backward and torch.is_grad_enabled()
    return PairedLinearFn.apply(x, a.weight, b.weight, a.weight_grad_store, a.fp8, fp8_backward)


class PairedLinearFn(torch.autograd.Function):
    """(x Wa^T, x Wb^T) with one backward (``paired``)."""

    @staticmethod
    def forward(ctx, x, wa, wb, store: WeightGradStore | None, fp8: Fp8Ops | None, fp8_backward: bool = False):
        ctx.store, ctx.x_shape, ctx.out_dtype = store, x.shape, x.dtype
        ctx.fp8 = fp8 if fp8_backward else None
        ctx.x_t_saved = False
        if fp8 is None:
            ctx.save_for_backward(wa, wb, x)
            return F.linear(x, wa), F.linear(x, wb)
        with_t = ctx.fp8 is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        (xq, xs), x_t = FP8_INPUT_CACHE(fp8, x, with_t)
        if x_t is not None:
            ctx.x_t_saved = True
            ctx.save_for_backward(wa, wb, *x_t)
        else:
            ctx.save_for_backward(wa, wb, x)
        outs = []
        for w in (wa, wb):
            wq, ws = quant_weight_fwd(fp8, w, fp8_backward)
            outs.append(fp8.gemm(xq, xs, wq, ws, out_dtype=x.dtype).reshape(*x.shape[:-1], w.shape[0]))
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        wa, wb, *saved = ctx.saved_tensors
        fp8, needs = ctx.fp8, ctx.needs_input_grad
        ga = grad_a.contiguous().reshape(-1, grad_a.shape[-1])  # (M, Na)
        gb = grad_b.contiguous().reshape(-1, grad_b.shape[-1])  # (M, Nb)
        none = (None,) * 3  # store, fp8, fp8_backward
        grad_x = None
        if fp8 is None:  # BF16 (or straight-through after an FP8 forward): x saved as it is
            x = saved[0]
            if needs[0]:
                grad_x = torch.mm(ga, wa).addmm_(gb, wb).reshape(ctx.x_shape)
            grads = [weight_grad_now_or_later(ctx.store, w, _straight_through_weight_grad(w, g, x)) if need
                     else None for w, g, need in ((wa, ga, needs[1]), (wb, gb, needs[2]))]
            return grad_x, *grads, *none
        (gq, gs), (gt, gts) = fp8.quant_act_both(torch.cat([ga, gb], dim=1))  # (M, Na + Nb), one read, both tilings
        if needs[0]:
            wt, wt_scale = _paired_weight_t(fp8, wa, wb)  # (K, Na + Nb) in 128x128 blocks
            grad_x = fp8.gemm(gq, gs, wt, wt_scale, out_dtype=ctx.out_dtype).reshape(ctx.x_shape)
        x_op = tuple(saved) if ctx.x_t_saved else saved[0]
        split = wa.shape[0]
        grads = [weight_grad_now_or_later(ctx.store, w, _fp8_weight_grad(fp8, w, g, x_op)) if need else None
                 for w, g, need in ((wa, (gt[:split], gts[:split]), needs[1]), (wb, (gt[split:], gts[split:]), needs[2]))]
        return grad_x, *grads, *none


_PAIRED_T: dict[tuple, tuple] = {}  # (the two W^T copies' addresses) -> (their weakrefs, [Wa Wb]^T and its scales)


def _paired_weight_t(fp8: Fp8Ops, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Wa Wb]^T (K, Na + Nb) in FP8 128x128 blocks with its scales: the two layers' cached W^T copies side by side
    (Na a multiple of the block, ``paired``, so each block is the layer's own), made once while both copies live (once
    per optimizer step: ``Fp8WeightCache``), so that the pair's Dgrad is one GEMM."""
    (qa, sa), (qb, sb) = fp8.quant_weight(wa.t()), fp8.quant_weight(wb.t())
    key = (qa.data_ptr(), qb.data_ptr(), tuple(qa.shape), tuple(qb.shape))
    hit = _PAIRED_T.get(key)
    if hit is None or hit[0]() is not qa or hit[1]() is not qb:
        for k in [k for k, v in _PAIRED_T.items() if v[0]() is None or v[1]() is None]:
            del _PAIRED_T[k]  # copies of weights quantised afresh since
        both = torch.cat([qa.view(torch.uint8), qb.view(torch.uint8)], dim=1).view(qa.dtype)
        hit = _PAIRED_T[key] = (weakref.ref(qa), weakref.ref(qb), (both, torch.cat([sa, sb], dim=1)))
    return hit[2]


@dataclass(frozen=True)
class LinearFactory:
    """Builds every dense ``Linear`` of a model with one dtype and one precision choice."""

    dtype: torch.dtype
    fp8: Fp8Ops | None = None
    fp8_backward: bool = False

    def __call__(self, in_features: int, out_features: int, bias: bool = False) -> Linear:
        return Linear(in_features, out_features, bias=bias, dtype=self.dtype, fp8=self.fp8,
                      fp8_backward=self.fp8_backward)
