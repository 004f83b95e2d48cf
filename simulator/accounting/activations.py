"""Activation bytes a layer keeps for backward, per token. Derivation: ``docs/design/accounting.md``.

What is stored is what backward needs: the input of every matmul (for the weight gradient),
the inputs of the norms, the SwiGLU inputs, the flash-attention inputs, output and log-sum-exp.
Precision ``fp8`` follows DeepSeek-V3 TR §3.3: inputs of FP8 GEMMs are cached in FP8 with one
fp32 scale per 1x128 tile (1 + 4/128 bytes per element); attention-output inputs use the
custom 12-bit E5M6 format (1.5 bytes); everything else stays BF16.
Recompute ``selective`` is DeepSeek's (TR §3.2.3): RMSNorm outputs, the MLA up-projections
(q, k, v) and the SwiGLU output are rebuilt in backward, so they are not stored.
"""

from __future__ import annotations

from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import RecomputeKind

BF16_BYTES = 2.0
FP32_BYTES = 4.0
FP8_TILE_BYTES = 1.0 + 4.0 / 128  # e4m3 value + fp32 scale per 1x128 tile (TR §3.3)
E5M6_BYTES = 1.5  # TR §3.3: attention-output Linear inputs


def _gemm_input_bytes(precision: str) -> float:
    return FP8_TILE_BYTES if precision == "fp8" else BF16_BYTES


def attention_activation_bytes(m: ModelSpec, precision: str, recompute: RecomputeKind) -> float:
    """Per token: one attention block with its input norm."""
    h, heads = m.hidden_size, m.num_attention_heads
    gemm_in = _gemm_input_bytes(precision)
    selective = recompute == "selective"
    out_in = E5M6_BYTES if precision == "fp8" else BF16_BYTES
    stored = BF16_BYTES * h  # norm input (residual stream)
    stored += FP32_BYTES * heads  # flash-attention log-sum-exp
    stored += out_in * heads * (m.v_head_dim if m.is_mla else m.gqa_head_dim)  # attention output = o_proj input
    if not selective:
        stored += gemm_in * h  # normed input: q/kv down-projection input
    if m.is_mla:
        assert m.kv_lora_rank is not None
        q_latent = m.q_lora_rank or 0
        # latent outputs (norm inputs) and the decoupled RoPE key
        stored += BF16_BYTES * (q_latent + m.kv_lora_rank + m.qk_rope_head_dim)
        if not selective:
            stored += gemm_in * (q_latent + m.kv_lora_rank)  # normed latents: up-projection inputs
            stored += BF16_BYTES * heads * (2 * m.qk_head_dim + m.v_head_dim)  # q, k, v for attention
    else:
        kv = m.kv_heads * m.gqa_head_dim
        stored += BF16_BYTES * (heads * m.gqa_head_dim + 2 * kv)  # q, k, v
    return stored


def mlp_activation_bytes(m: ModelSpec, moe: bool, precision: str, recompute: RecomputeKind) -> float:
    """Per token: the MLP half of a layer (dense SwiGLU or MoE) with its input norm."""
    h = m.hidden_size
    gemm_in = _gemm_input_bytes(precision)
    keep_swiglu_out = recompute != "selective"
    stored = BF16_BYTES * h + gemm_in * h  # norm input, normed input (router / experts input)

    # MoE SwiGLU inputs are cached in FP8 under the FP8 recipe (TR §3.3); dense ones in BF16.
    swiglu_in = gemm_in if moe else BF16_BYTES

    def swiglu(width: float) -> float:  # gate and up outputs, and the down-projection input
        return swiglu_in * 2 * width + (gemm_in * width if keep_swiglu_out else 0.0)

    if not moe:
        return stored + swiglu(m.intermediate_size)
    k = m.num_experts_per_tok
    stored += FP32_BYTES * m.n_routed_experts  # router scores (sigmoid / softmax backward)
    stored += k * (FP32_BYTES + 8)  # top-k weights and int64 indices
    stored += k * gemm_in * h  # dispatched token copies: expert up-projection inputs
    stored += k * swiglu(m.moe_intermediate_size)
    # Expert outputs are not kept: the gradient of combine weight w_i is <dy, W_down a_i> =
    # <W_down^T dy, a_i>, and W_down^T dy is formed anyway for the input gradient.
    stored += swiglu(m.n_shared_experts * m.moe_intermediate_size)
    return stored


def layer_activation_bytes_per_token(
    m: ModelSpec, unit: int, precision: str, recompute: RecomputeKind
) -> float:
    """Bytes per token one layer unit keeps for backward. ``unit >= num_hidden_layers`` is an MTP
    module (its projection input [h; emb] and the norms are added)."""
    if recompute == "full":
        return BF16_BYTES * m.hidden_size * (2 if unit >= m.num_hidden_layers else 1)  # layer input only
    moe = m.is_moe_layer(unit) if unit < m.num_hidden_layers else m.is_moe
    total = attention_activation_bytes(m, precision, recompute) + mlp_activation_bytes(m, moe, precision, recompute)
    if unit >= m.num_hidden_layers:
        total += BF16_BYTES * 4 * m.hidden_size  # hnorm/enorm inputs and the eh_proj input
    return total


def head_transient_bytes_per_token(m: ModelSpec) -> float:
    """Logits of one micro-batch while the loss and its gradient are formed: fp32 logits and
    their BF16 gradient (freed before the next micro-batch)."""
    return (FP32_BYTES + BF16_BYTES) * m.vocab_size
