"""Cost tables of earlier kernel eras, beside ``tables``' default and ``hopper-cutlass36-2024`` (issue 21,
capability 4): ``hopper-bf16-fa2-2023``, a BF16 Hopper run of 2023-24 with FlashAttention-2. Sources [FA] and
[MAMF] are described in ``costs.tables``' docstring; every entry names its own.
"""

from __future__ import annotations

from functools import lru_cache

from moeplan.simulator.costs.tables import (
    _BF16_PEAK_FLOPS_PER_S,
    TFLOPS,
    AttentionPoint,
    CostTables,
    _anchor_points,
    _common,
    _measured_bf16_points,
    _merge,
)

# [FA] FlashAttention-2 on H100 SXM5, BF16, head dim 128: (tokens, forward causal TFLOPS, backward TFLOPS)
_FA2_H100 = ((512, 191, 214), (1024, 260, 260), (2048, 298, 291), (4096, 319, 310), (8192, 333, 318),
             (16384, 335, 322))
FA2_SOURCE = ("[FA] Shah et al. 2024 (FlashAttention-3) Fig. 5-6: FlashAttention-2 on H100 SXM5, BF16, head dim 128, "
              "causal forward, backward without mask; fwd+bwd as 3x fwd")
MAMF_H100_BF16_FLOPS_PER_S = 792.1 * TFLOPS  # [MAMF] H100 SXM, CUDA 12.1


def fa2_attention_points(bf16_peak_flops_per_s: float) -> tuple[AttentionPoint, ...]:
    """[FA] as fractions of the BF16 peak; forward + backward at 3x forward FLOPs (the tables' convention):
    ``3 / (1 / fwd + 2.5 / bwd)`` TFLOPS, the backward doing 2.5 forwards' FLOPs at its own rate."""
    return tuple(AttentionPoint(seq_len=n, fwd_frac=fwd * TFLOPS / bf16_peak_flops_per_s,
                                fwd_bwd_frac=3 / (1 / fwd + 2.5 / bwd) * TFLOPS / bf16_peak_flops_per_s)
                 for n, fwd, bwd in _FA2_H100)


@lru_cache(maxsize=None)
def hopper_bf16_fa2(gpu_name: str) -> CostTables:
    """``hopper-bf16-fa2-2023``: BF16 only, FlashAttention-2 attention, [A]/[K] BF16 GEMMs (below [MAMF]);
    the memory-bound classes from the [EW] file of ``gpu_name``."""
    bf16 = _merge(_anchor_points(), _measured_bf16_points())
    base = _common("hopper-bf16-fa2-2023", bf16, _BF16_PEAK_FLOPS_PER_S, gpu_name, precisions=("bf16",))
    attention = fa2_attention_points(_BF16_PEAK_FLOPS_PER_S)
    at_4k = next(p for p in attention if p.seq_len == 4096)
    return base.model_copy(update={"attention_by_seq": attention, "attention_fwd_frac": at_4k.fwd_frac,
                                   "attention_fwd_bwd_frac": at_4k.fwd_bwd_frac, "attention_source": FA2_SOURCE})
