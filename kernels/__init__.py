"""Triton FP8 kernels for DeepSeek-V3 training (issue 7). Imports nothing else of moeplan.

What the model calls (autograd): ``fp8_linear``, ``fp8_grouped_linear``, ``grouped_linear``,
``Fp8Linear``, ``MoEPermute`` / ``MoEUnpermute`` with ``make_dispatch_plan``, ``SwiGLUFunction``.
The raw ops (quantisers, GEMMs, permutation, SwiGLU) are in their own modules; docs/kernels.md.
Ops named like their module (``fp8_gemm``, ``moe_permute``, ``swiglu``) are imported from the module,
so that ``kernels.fp8_gemm`` stays the module.
"""

from .fp8_layers import Fp8Linear, fp8_grouped_linear, fp8_linear, grouped_linear
from .fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_weight_128x128
from .grouped_gemm import grouped_gemm_bf16, grouped_gemm_fp8, grouped_wgrad_bf16, grouped_wgrad_fp8
from .moe_permute import DispatchPlan, MoEPermute, MoEUnpermute, make_dispatch_plan, moe_unpermute
from .swiglu import SwiGLUFunction
from .triton_compat import HAVE_TRITON, TritonUnavailable

__all__ = [
    "HAVE_TRITON", "DispatchPlan", "Fp8Linear", "MoEPermute", "MoEUnpermute", "SwiGLUFunction",
    "TritonUnavailable", "fp8_grouped_linear", "fp8_linear", "grouped_gemm_bf16",
    "grouped_gemm_fp8", "grouped_linear", "grouped_wgrad_bf16", "grouped_wgrad_fp8", "make_dispatch_plan",
    "moe_unpermute", "quant_act_128x1_t", "quant_act_1x128", "quant_weight_128x128",
]
