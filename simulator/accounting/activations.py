"""Activation bytes a layer keeps for backward, per token. Derivation: ``docs/design/accounting.md``.

What is stored is what backward needs: the input of every matmul (for the weight gradient),
the inputs of the norms, the SwiGLU inputs, the flash-attention inputs, output and log-sum-exp.
Precision ``fp8`` follows DeepSeek-V3 TR §3.3: inputs of FP8 GEMMs are cached in FP8 with one
fp32 scale per 1x128 tile (1 + 4/128 bytes per element); attention-output inputs use the
custom 12-bit E5M6 format (1.5 bytes); everything else stays BF16.
Recompute ``selective`` is DeepSeek's (TR §3.2.3): RMSNorm outputs, the MLA up-projections
(q, k, v) and the SwiGLU output are rebuilt in backward, so they are not stored.

Beyond that minimum (Korthikanti et al. 2022, Table 2, with flash attention), the terms below count what
moeplan's runtime really keeps, each naming the code that allocates it; CPU tests count the storages the
model saves for backward (``tests/simulator/accounting/test_saved_activations.py``):
- MLA's value is a copy of the last channels of ``kv_b_proj``'s output (``model.fused.mla_key_value``), so that
  output itself is not kept (until 2026-12-07 the value was a view of it, and its key half stayed too);
- the router multiplies an FP32 copy of its input (``model/gate.py``), which backward keeps;
- the BF16 routed experts op by op (``model/experts.py forward_pairs``, ``fusion="eager"``) keep ``silu(gate)``,
  each pair's output row in BF16 for the weighted combine's backward (``WeightedCombineFn``), and the pair order
  (two int64) and weight (FP32); fused (``model/fused_experts.py``, on a GPU) they keep per pair only the gate/up
  output and the expert output in BF16, the weight and the dispatch plan's int32 maps (the permuted rows are
  gathered again in backward, the SwiGLU output recomputed);
- ``fusion="eager"`` (``training.kernels.fusion``): ``model/fused.py``'s RMSNorm run op by op keeps its
  input in FP32 and its normed value in BF16 (6 B per element), SwiGLU keeps ``silu(gate)``; compiled,
  they keep only their inputs (and 4 B of per-row statistics, not counted: under 0.01% of a V3 layer);
- the head keeps the final norm's output and the logits in their own dtype, with the target and its mask
  (``model/losses.py _CrossEntropyFn``); its backward holds their gradient (``head_transient_bytes``).
"""

from __future__ import annotations

from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import RecomputeKind

BF16_BYTES = 2.0
FP32_BYTES = 4.0
FP8_TILE_BYTES = 1.0 + 4.0 / 128  # e4m3 value + fp32 scale per 1x128 tile (TR §3.3)
E5M6_BYTES = 1.5  # TR §3.3: attention-output Linear inputs
INT64_BYTES = 8.0
INT32_BYTES = 4.0
EAGER_NORM_BYTES = FP32_BYTES + BF16_BYTES  # model/fused.py rms_norm op by op: x.float() and normed.to(x.dtype)
# model/losses.py LOSS_CHUNK_ELEMENTS: FP32 logits one chunk of the loss holds at a time (a test checks they agree)
LOSS_CHUNK_ELEMENTS = 1 << 25


def _gemm_input_bytes(precision: str) -> float:
    return FP8_TILE_BYTES if precision == "fp8" else BF16_BYTES


def attention_activation_bytes(m: ModelSpec, precision: str, recompute: RecomputeKind,
                               fusion: str = "fused") -> float:
    """Per token: one attention block with its input norm (``fusion`` as ``training.kernels.fusion``)."""
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
        if fusion == "eager":  # q_a_layernorm, kv_a_layernorm op by op keep their FP32 input copy and BF16 normed
            # value, not their input; nothing else keeps q_a_proj's or kv_a_proj's output (RoPE reads a copy)
            stored += EAGER_NORM_BYTES * (q_latent + m.kv_lora_rank)
        else:  # latent outputs (compiled norms' inputs) and the decoupled RoPE key in kv_a_proj's output
            stored += BF16_BYTES * (q_latent + m.kv_lora_rank + m.qk_rope_head_dim)
        if not selective:
            stored += gemm_in * (q_latent + m.kv_lora_rank)  # normed latents: up-projection inputs
            stored += BF16_BYTES * heads * (2 * m.qk_head_dim + m.v_head_dim)  # q, k, v for attention
    else:
        kv = m.kv_heads * m.gqa_head_dim
        stored += BF16_BYTES * (heads * m.gqa_head_dim + 2 * kv)  # q, k, v
    if fusion == "eager":
        stored += EAGER_NORM_BYTES * h  # input_layernorm
    return stored


def mlp_activation_bytes(m: ModelSpec, moe: bool, precision: str, recompute: RecomputeKind,
                         fusion: str = "fused") -> float:
    """Per token: the MLP half of a layer (dense SwiGLU or MoE) with its input norm."""
    h = m.hidden_size
    gemm_in = _gemm_input_bytes(precision)
    keep_swiglu_out = recompute != "selective"
    eager = fusion == "eager"
    stored = BF16_BYTES * h + gemm_in * h  # norm input, normed input (router / experts input)
    stored += EAGER_NORM_BYTES * h if eager else 0.0  # post_attention_layernorm op by op

    # MoE SwiGLU inputs are cached in FP8 under the FP8 recipe (TR §3.3); dense ones in BF16.
    swiglu_in = gemm_in if moe else BF16_BYTES

    def swiglu(width: float, op_by_op: bool = eager) -> float:  # gate and up outputs, the down-projection input
        kept = swiglu_in * 2 * width + (gemm_in * width if keep_swiglu_out else 0.0)
        return kept + (BF16_BYTES * width if op_by_op else 0.0)  # F.silu(gate) * up keeps silu(gate)

    if not moe:
        return stored + swiglu(m.intermediate_size)
    k = m.num_experts_per_tok
    if precision != "fp8":  # model/gate.py: F.linear(x.float(), weight) keeps the FP32 copy (the FP8 recipe is
        stored += FP32_BYTES * h  # priced as TR §3.3 describes it: measured here is the BF16 runtime)
    stored += FP32_BYTES * m.n_routed_experts  # router scores (sigmoid / softmax backward)
    stored += k * (FP32_BYTES + INT64_BYTES)  # top-k weights and int64 indices
    stored += FP32_BYTES * (m.norm_topk_prob + (m.seq_aux and m.aux_loss_alpha > 0))  # per-row sums divided by
    if m.topk_method == "noaux_tc" and m.n_group > 1:  # model.fused._limit_groups: top-2 per group, mask
        stored += m.n_group * (2 * INT64_BYTES + 1)
    if precision != "fp8" and not eager:  # model/fused_experts.py, BF16: per pair the gate/up output h and the
        # expert output y (BF16), the pair weight (FP32) and the plan's four int32 row maps; a token's pair pointer
        return stored + k * (BF16_BYTES * (2 * m.moe_intermediate_size + h) + FP32_BYTES + 4 * INT32_BYTES) \
            + INT32_BYTES + swiglu(m.n_shared_experts * m.moe_intermediate_size)
    stored += k * gemm_in * h  # dispatched token copies: expert up-projection inputs
    if precision == "fp8":  # the FP8 recipe's experts (TR §3.3): expert outputs are not kept, since the
        # gradient of combine weight w_i is <dy, W_down a_i> = <W_down^T dy, a_i>, formed for the input gradient
        stored += k * swiglu(m.moe_intermediate_size)
    else:  # model/experts.py forward_pairs, SwiGLU always op by op; per pair: WeightedCombineFn keeps the BF16
        # output row; the sort order, source row (int64), weight
        stored += k * (swiglu(m.moe_intermediate_size, op_by_op=True) + BF16_BYTES * h
                       + 2 * INT64_BYTES + FP32_BYTES)
    stored += swiglu(m.n_shared_experts * m.moe_intermediate_size)
    return stored


def layer_activation_bytes_per_token(
    m: ModelSpec, unit: int, precision: str, recompute: RecomputeKind, fusion: str = "fused"
) -> float:
    """Bytes per token one layer unit keeps for backward. ``unit >= num_hidden_layers`` is an MTP
    module (its projection input [h; emb] and the norms are added)."""
    if recompute == "full":
        return BF16_BYTES * m.hidden_size * (2 if unit >= m.num_hidden_layers else 1)  # layer input only
    moe = m.is_moe_layer(unit) if unit < m.num_hidden_layers else m.is_moe
    total = (attention_activation_bytes(m, precision, recompute, fusion)
             + mlp_activation_bytes(m, moe, precision, recompute, fusion))
    if unit >= m.num_hidden_layers:
        total += BF16_BYTES * 4 * m.hidden_size  # hnorm/enorm inputs and the eh_proj input
    return total


def head_activation_bytes_per_token(m: ModelSpec, fusion: str = "fused") -> float:
    """Per token, one output head (the main one or an MTP depth's) from its forward to its backward: the
    final norm's output (``lm_head``'s input; op by op the norm keeps 6 B more per element), the BF16 logits,
    the int64 target and its bool mask (``model/losses.py _CrossEntropyFn``)."""
    h = m.hidden_size
    norm = BF16_BYTES * h + (EAGER_NORM_BYTES * h if fusion == "eager" else 0.0)
    return norm + BF16_BYTES * m.vocab_size + INT64_BYTES + 1


def head_transient_bytes(m: ModelSpec, tokens: int) -> float:
    """Working memory of one head's backward over ``tokens`` tokens, beyond ``head_activation_bytes_per_token``:
    the larger of (1) the loss's backward: the BF16 logits' gradient and one FP32 chunk of rows
    (``model/losses.py``), and (2) ``lm_head``'s backward, after the loss freed the logits it kept: the same
    gradient, freed as ``lm_head``'s BF16 weight gradient (V x h) and input gradient are made; the weight's
    is folded into its FP32 main gradient only after (``model/runtime/main_grad.py``)."""
    v, h = m.vocab_size, m.hidden_size
    chunk_rows = min(tokens, max(1, LOSS_CHUNK_ELEMENTS // v))
    loss_backward = tokens * BF16_BYTES * v + FP32_BYTES * chunk_rows * v
    head_backward = BF16_BYTES * v * h + tokens * BF16_BYTES * h
    return max(loss_backward, head_backward)
