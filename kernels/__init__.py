"""Triton FP8 kernels for DeepSeek-V3 training (issue 7). Imports nothing else of moeplan.

Ops, not layers: quantisers, GEMMs (dense and grouped, FP8 and BF16), permutation and SwiGLU,
each in its own module with its torch reference (``*_ref``); docs/design/kernels.md. The model's FP8
layers (``model.linear``, ``model.grouped_linear``) call the GEMMs and own the autograd, so that
their weight gradient can be deferred for zero-bubble schedules. ``MoEPermute`` / ``MoEUnpermute``
and ``SwiGLUFunction`` are autograd wrappers of single ops.
Ops named like their module (``fp8_gemm``, ``moe_permute``, ``swiglu``) are imported from the module,
so that ``kernels.fp8_gemm`` stays the module.
"""

from .fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_weight_128x128
from .grouped_gemm import grouped_gemm_bf16, grouped_gemm_fp8, grouped_wgrad_bf16, grouped_wgrad_fp8
from .moe_permute import DispatchPlan, MoEPermute, MoEUnpermute, make_dispatch_plan, moe_unpermute
from .swiglu import SwiGLUFunction
from .triton_compat import HAVE_TRITON, TritonUnavailable

__all__ = [
    "HAVE_TRITON",
    "DispatchPlan",
    "MoEPermute",
    "MoEUnpermute",
    "SwiGLUFunction",
    "TritonUnavailable",
    "grouped_gemm_bf16",
    "grouped_gemm_fp8",
    "grouped_wgrad_bf16",
    "grouped_wgrad_fp8",
    "make_dispatch_plan",
    "moe_unpermute",
    "quant_act_1x128",
    "quant_act_128x1_t",
    "quant_weight_128x128",
]
