"""Context parallelism (CP): what one GPU of a CP group holds, computes and exchanges.

A CP group of ``cp`` GPUs splits every sequence of a micro-batch. The split is the load-balanced
causal ("zig-zag") one: the sequence is cut into ``2 cp`` equal chunks and GPU ``i`` holds chunks
``i`` and ``2cp-1-i``. Queries of chunk ``j`` (positions ``jc .. jc+c-1``, ``c = T / 2cp``) attend to
``sum (p+1) = c jc + c(c+1)/2`` keys, so a pair ``(i, 2cp-1-i)`` sums to ``c^2 (2cp-1) + c(c+1)``
whatever ``i`` is: every GPU does exactly ``1/cp`` of the causal attention core, and holds
``T / cp`` tokens.

What is exchanged, per layer and micro-batch: before its attention core each GPU needs the keys
and values of the whole sequence. For MLA it gathers the *compressed* KV latent and the decoupled
RoPE key (``kv_lora_rank + qk_rope_head_dim`` values per token, BF16, the tensors that feed
``kv_b_proj`` and RoPE: 576 values for V3, versus ``n_h (d_qk + d_v)`` = 40,960 for the
up-projected K and V) and up-projects the gathered latents itself, so ``kv_b_proj`` runs on all
``T`` rows on every GPU of the group. For GQA it gathers the projected K and V
(``2 n_kv d`` values). The gathered copy is working memory of one layer at a time; backward
gathers it again (the re-gather stands for recompute, since it is not stored), recomputes the
remote rows' K and V from it, and returns the gradient of the gathered tensor to its owners with
a reduce-scatter. Collectives are rings over the CP group (NVLink when the group fits in a node,
else the NIC). Everything here is per GPU.
"""

from __future__ import annotations

from moeplan.simulator.spec.model import ModelSpec

BF16_BYTES = 2.0
FP32_BYTES = 4.0


class ContextParallelError(ValueError):
    """A context-parallel size that cannot split the sequence."""


def check_cp(seq_len_tokens: int, cp: int) -> None:
    """The zig-zag split needs ``2 cp`` equal chunks (no constraint at cp = 1)."""
    if cp > 1 and seq_len_tokens % (2 * cp):
        raise ContextParallelError(
            f"cp={cp} must split seq_len_tokens={seq_len_tokens} into 2 x cp = {2 * cp} equal chunks"
        )


def zigzag_chunks(cp: int) -> tuple[tuple[int, int], ...]:
    """Per CP rank, the two of the ``2 cp`` sequence chunks it holds: ``(i, 2cp-1-i)``."""
    return tuple((i, 2 * cp - 1 - i) for i in range(cp))


def cp_tokens(micro_batch_size: int, seq_len_tokens: int, cp: int) -> int:
    """Tokens of one micro-batch that one GPU of the CP group holds."""
    assert cp == 1 or seq_len_tokens % (2 * cp) == 0, f"{seq_len_tokens=} {cp=}"
    return micro_batch_size * seq_len_tokens // cp


def gathered_values_per_token(m: ModelSpec) -> int:
    """Values per token and layer that CP gathers: MLA's KV latent + RoPE key, or GQA's K and V."""
    if m.is_mla:
        assert m.kv_lora_rank is not None
        return m.kv_lora_rank + m.qk_rope_head_dim
    return 2 * m.kv_heads * m.gqa_head_dim


def gather_bytes(m: ModelSpec, micro_batch_size: int, seq_len_tokens: int, cp: int) -> float:
    """Bytes one GPU receives in the all-gather of one layer and micro-batch (ring: the other
    ``cp - 1`` GPUs' shares of the BF16 tensor); the reduce-scatter of its gradient sends as many."""
    if cp == 1:
        return 0.0
    full = micro_batch_size * seq_len_tokens * gathered_values_per_token(m) * BF16_BYTES
    return full * (cp - 1) / cp


def kv_up_rows(micro_batch_size: int, seq_len_tokens: int, cp: int, m: ModelSpec) -> int:
    """Rows ``kv_b_proj`` runs on per GPU: the whole sequence under CP for MLA (it up-projects the
    gathered latents), else the GPU's own tokens."""
    if m.is_mla and cp > 1:
        return micro_batch_size * seq_len_tokens
    return cp_tokens(micro_batch_size, seq_len_tokens, cp)


def redundant_flops_per_token(m: ModelSpec, cp: int) -> float:
    """Hardware FLOPs per trained token that CP adds (never model FLOPs): each GPU up-projects the
    ``cp - 1`` remote tokens per own token through ``kv_b_proj`` in forward, again in backward
    (from the re-gathered latent), and takes the input and weight gradients of those rows:
    4 x ``2 d_c n_h (d_n + d_v)`` per remote row, per MLA layer (MTP included). GQA gathers
    projected K and V: nothing extra."""
    if cp == 1 or not m.is_mla:
        return 0.0
    assert m.kv_lora_rank is not None
    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    kv_up = 2.0 * m.kv_lora_rank * m.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim)
    return layers * 4.0 * kv_up * (cp - 1)


def working_bytes(m: ModelSpec, micro_batch_size: int, seq_len_tokens: int, cp: int) -> float:
    """Transient bytes of one layer's attention under CP: the gathered tensor (BF16) and, in
    backward, its FP32 gradient before the reduce-scatter, plus one chunk (``T / cp`` keys) of
    up-projected K and V and their gradients (BF16), since the core walks the gathered keys chunk
    by chunk. Zero at cp = 1."""
    if cp == 1:
        return 0.0
    seq = micro_batch_size * seq_len_tokens
    gathered = seq * gathered_values_per_token(m) * (BF16_BYTES + FP32_BYTES)
    if m.is_mla:
        kv_width = m.num_attention_heads * (m.qk_head_dim + m.v_head_dim)
    else:
        kv_width = 2 * m.kv_heads * m.gqa_head_dim
    return gathered + 2 * BF16_BYTES * kv_width * seq / cp
