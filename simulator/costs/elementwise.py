"""Bytes moved by the memory-bound kernels of one layer and of the model's two ends, by kernel class.

One definition, read by the simulator (``engine.unit_costs`` prices each class's bytes at its own
fraction of HBM bandwidth, ``CostTables.memory_fracs``) and by ``benchmarks/elementwise_bench.py``
(which times each class at these bytes, so a measured fraction times these bytes gives back the
measured seconds). Bytes are *ideal*: every input read once, every output written once; what a real
kernel moves beyond that (a second pass for statistics, an FP32 round trip, re-reads a cache misses)
shows as a lower measured fraction, not as more bytes. Per token; BF16 activations.

Per layer (``h`` hidden, ``q``/``c`` the MLA query/KV latent widths, ``H`` heads, ``R`` RoPE dim,
``f`` expert width, ``k`` expert rows per token, ``s`` shared experts, ``E`` routed experts):

=============== ============================================ ============================================
class           forward                                      backward
=============== ============================================ ============================================
rms_norm        2 norms of h: read x, write y (4 B each)     read x and dy, write dx (6 B each)
latent_norm     norms of q and c: as rms_norm                as rms_norm
residual_add    2 adds of h: read two, write one (6 B)       the gradient sum where x forks (6 B)
rope            (H + 1) R rotated values (4 B) + cos/sin     the same
fp8_cast        1x128 casts of the FP8 linears' inputs:      1x128 of dy and 128x1 (transposed, for the
                2h + q + c + H v_head, 2 + 1 + 4/128 B each  weight gradient) of x: twice the forward
swiglu          (k + s) rows: read gate, up, write act (6f)  read gate, up, d act, write d gate, d up (10f)
router          sigmoid scores over E (fp32, read logits,    read d weights and scores, write d logits
                write scores) and top-k ids and weights      (8 E + 4 k)
permute         read x once, write k copies (2h + 2kh)       the sum of the copies' gradients (2kh + 2h)
combine         read k expert rows, write one (2kh + 2h)     read dy and the k rows (for the weights'
                                                             gradient), write k row gradients (4kh + 2h)
=============== ============================================ ============================================

Ends: ``embedding`` (gather a row of h: read and write 4h; its backward is not modelled) and
``cross_entropy`` over the vocabulary ``V`` (forward reads the BF16 logits, 2V; backward reads them
and writes their gradient, 4V).

Not counted: the weights of norms (read once per micro-batch, not per token), the concatenations and
transposes around the attention core, and the optimizer (its own class, ``OPTIMIZER``, priced by the
engine at 22 B per parameter).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.spec.model import ModelSpec

BF16_BYTES = 2.0
FP32_BYTES = 4.0
INDEX_BYTES = 8.0  # int64 expert ids (torch.topk)
FP8_CAST_BYTES = BF16_BYTES + 1.0 + FP32_BYTES / 128  # read BF16, write e4m3 and a 1x128 tile's scale

LAYER_KERNELS = ("rms_norm", "latent_norm", "residual_add", "rope", "fp8_cast", "swiglu", "router", "permute",
                 "combine")
END_KERNELS = ("embedding", "cross_entropy")
OPTIMIZER = "optimizer"
KERNEL_CLASSES = LAYER_KERNELS + END_KERNELS + (OPTIMIZER,)


@dataclass(frozen=True)
class KernelBytes:
    """Ideal bytes of one kernel class per token: forward and backward."""

    fwd_bytes: float
    bwd_bytes: float


def _norm(width: float) -> KernelBytes:
    return KernelBytes(2 * BF16_BYTES * width, 3 * BF16_BYTES * width)


def layer_bytes_per_token(m: ModelSpec, moe: bool, precision: str, expert_rows_per_token: float) -> dict[str, KernelBytes]:
    """Per class, the bytes one layer's memory-bound kernels move per token (classes with none are left out)."""
    h = m.hidden_size
    out = {"rms_norm": _norm(2 * h), "residual_add": KernelBytes(2 * 3 * BF16_BYTES * h, 2 * 3 * BF16_BYTES * h)}
    if m.is_mla:
        out["latent_norm"] = _norm((m.q_lora_rank or 0) + (m.kv_lora_rank or 0))
        r = m.qk_rope_head_dim
        rope = 2 * BF16_BYTES * (m.num_attention_heads + 1) * r + 2 * FP32_BYTES * r / 2  # values, cos and sin
        out["rope"] = KernelBytes(rope, rope)
    if precision == "fp8":
        cast = FP8_CAST_BYTES * (2 * h + (m.q_lora_rank or 0) + (m.kv_lora_rank or 0)
                                 + m.num_attention_heads * (m.v_head_dim or m.gqa_head_dim))
        out["fp8_cast"] = KernelBytes(cast, 2 * cast)
    if not moe:
        out["swiglu"] = KernelBytes(3 * BF16_BYTES * m.intermediate_size, 5 * BF16_BYTES * m.intermediate_size)
        return out
    f, k, e = m.moe_intermediate_size, expert_rows_per_token, m.n_routed_experts
    rows = k + m.n_shared_experts
    out["swiglu"] = KernelBytes(3 * BF16_BYTES * f * rows, 5 * BF16_BYTES * f * rows)
    topk = m.num_experts_per_tok
    out["router"] = KernelBytes(2 * FP32_BYTES * e + (INDEX_BYTES + FP32_BYTES) * topk,
                                2 * FP32_BYTES * e + FP32_BYTES * topk)
    out["permute"] = KernelBytes(BF16_BYTES * h * (1 + k), BF16_BYTES * h * (1 + k))
    out["combine"] = KernelBytes(BF16_BYTES * h * (topk + 1), BF16_BYTES * h * (2 * topk + 1))
    return out


def end_bytes_per_token(m: ModelSpec) -> dict[str, KernelBytes]:
    """The embedding gather (first stage) and the softmax cross-entropy over the vocabulary (last stage)."""
    v = m.vocab_size
    return {"embedding": KernelBytes(2 * BF16_BYTES * m.hidden_size, 0.0),
            "cross_entropy": KernelBytes(BF16_BYTES * v, 2 * BF16_BYTES * v)}
