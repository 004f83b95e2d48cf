"""Run-time choices for building the PyTorch model that are not part of the architecture.

The architecture comes only from ``simulator.spec.model.ModelSpec`` (HF ``config.json`` fields).
Everything here changes *how* the same function is computed (precision, matmul backend) or which
optional parts are built (MTP), never the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ExpertBackend = Literal["auto", "grouped_mm", "reference", "fp8"]
LinearPrecision = Literal["bf16", "fp8"]
Fp8Kernel = Literal["reference", "kernels"]


@dataclass(frozen=True)
class ModelOptions:
    """How to build and run a ``ModelSpec``.

    - ``dtype``: parameter/activation dtype of the dense weights. Router weights and the
      selection bias always stay FP32 (as in DeepSeek's checkpoint and HF's ``_keep_in_fp32``).
    - ``linear_precision``: "bf16" = plain ``nn.Linear`` in ``dtype``; "fp8" = DeepSeek-V3 TR §3.3
      fine-grained quantisation (1x128 activation tiles, 128x128 weight blocks, E4M3).
    - ``expert_backend``: grouped matmul for routed experts. "auto" = ``torch._grouped_mm`` when the
      build has it and the widths are 16-byte aligned, else "reference" (padded batched matmul).
      "fp8" quantises like ``linear_precision="fp8"`` and calls ``fp8_kernel``.
    - ``fp8_kernel``: "reference" = quantise-dequantise then a high-precision matmul (bit-faithful
      to an FP8 GEMM with FP32 accumulation up to summation order); "kernels" = the FP8 GEMMs of the
      ``kernels`` package (see ``model/fp8.py`` for the expected signatures).
    - ``fp8_backward``: also run the backward GEMMs (Dgrad, Wgrad) of every FP8 linear and FP8
      expert layer in FP8, as TR §3.3 does; False = straight-through backward in ``dtype``.
    - ``fuse_memory_bound``: on CUDA, run RMSNorm, MLA's RoPE/concat and SwiGLU through ``torch.compile``
      (``model.fused``): one generated kernel each instead of eager chains. Same expression; last-bit
      rounding may differ from the eager path. Ignored on CPU.
    - ``with_mtp``: build the ``num_nextn_predict_layers`` MTP modules (training); inference may drop them.
    """

    dtype: torch.dtype = torch.bfloat16
    linear_precision: LinearPrecision = "bf16"
    expert_backend: ExpertBackend = "auto"
    fp8_kernel: Fp8Kernel = "reference"
    fp8_block_size: int = 128
    fp8_backward: bool = False
    with_mtp: bool = True
    fuse_memory_bound: bool = False

    def __post_init__(self) -> None:
        if self.linear_precision not in ("bf16", "fp8"):
            raise ValueError(f"linear_precision={self.linear_precision!r} must be 'bf16' or 'fp8'")
        if self.expert_backend not in ("auto", "grouped_mm", "reference", "fp8"):
            raise ValueError(f"expert_backend={self.expert_backend!r} must be auto|grouped_mm|reference|fp8")
        if self.fp8_kernel not in ("reference", "kernels"):
            raise ValueError(f"fp8_kernel={self.fp8_kernel!r} must be 'reference' or 'kernels'")
        if self.fp8_block_size <= 0:
            raise ValueError(f"fp8_block_size={self.fp8_block_size} must be > 0")
