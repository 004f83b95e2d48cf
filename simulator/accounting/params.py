"""Exact parameter counts by component, from a ``ModelSpec``.

Counts are trainable parameters as ``torch.nn.Module.parameters()`` reports them for the
transformers implementations (``DeepseekV3ForCausalLM``, ``DeepseekV2ForCausalLM``,
``LlamaForCausalLM``); the router's ``e_score_correction_bias`` is a buffer there and is
counted apart (``gate_bias_elements``). The MTP module (DeepSeek-V3 TR §2.2) is counted apart
too: transformers does not build it, the published checkpoint stores it as layer
``num_hidden_layers`` with its own copies of the embedding and head.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moeplan.simulator.spec.model import ModelSpec


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the main model by component (MTP apart)."""

    embedding: int
    head: int
    attention: int  # projections and the MLA latent norms
    norms: int  # per-layer input/post-attention norms and the final norm
    dense_mlp: int
    shared_experts: int
    routed_experts: int
    gates: int  # router weights
    mtp: int  # unique MTP parameters (embedding and head shared), all depths
    mtp_routed_experts: int  # the part of ``mtp`` that is routed experts
    gate_bias_elements: int  # e_score_correction_bias buffers (main model), not trainable

    @property
    def total(self) -> int:
        """Main model, without MTP: what transformers builds."""
        return sum(
            getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("mtp", "mtp_routed_experts", "gate_bias_elements")
        )

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp


def _linear(in_features: int, out_features: int, bias: bool) -> int:
    return in_features * out_features + (out_features if bias else 0)


def attention_params(m: ModelSpec) -> int:
    """One attention block: MLA (q/kv compression, latent norms) or GQA (q, k, v, o)."""
    h, heads, bias = m.hidden_size, m.num_attention_heads, m.attention_bias
    if m.is_mla:
        assert m.kv_lora_rank is not None
        if m.q_lora_rank is None:
            q = _linear(h, heads * m.qk_head_dim, False)
        else:
            q = _linear(h, m.q_lora_rank, bias) + _linear(m.q_lora_rank, heads * m.qk_head_dim, False)
        kv = _linear(h, m.kv_lora_rank + m.qk_rope_head_dim, bias) + _linear(
            m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), False
        )
        o = _linear(heads * m.v_head_dim, h, bias)
        return q + kv + o + attention_norm_params(m)
    hd, kvh = m.gqa_head_dim, m.kv_heads
    return (
        _linear(h, heads * hd, bias)
        + 2 * _linear(h, kvh * hd, bias)
        + _linear(heads * hd, h, bias)
    )


def attention_norm_params(m: ModelSpec) -> int:
    """The MLA latent norms inside an attention block (weights, not matmuls)."""
    if not m.is_mla:
        return 0
    return (m.q_lora_rank or 0) + (m.kv_lora_rank or 0)


def swiglu_params(hidden: int, intermediate: int) -> int:
    """gate, up and down projections, no bias."""
    return 3 * hidden * intermediate


def expert_params(m: ModelSpec) -> int:
    """One routed expert."""
    return swiglu_params(m.hidden_size, m.moe_intermediate_size)


def moe_layer_params(m: ModelSpec) -> dict[str, int]:
    """The MLP of one MoE layer by component."""
    return {
        "routed_experts": m.n_routed_experts * expert_params(m),
        "shared_experts": swiglu_params(m.hidden_size, m.moe_intermediate_size * m.n_shared_experts),
        "gates": m.n_routed_experts * m.hidden_size,
    }


def decoder_layer_params(m: ModelSpec, layer: int) -> dict[str, int]:
    """One decoder layer by component (keys as in ``ParamCounts``)."""
    counts = {
        "attention": attention_params(m),
        "norms": 2 * m.hidden_size,
        "dense_mlp": 0,
        "shared_experts": 0,
        "routed_experts": 0,
        "gates": 0,
    }
    if m.is_moe_layer(layer):
        counts.update(moe_layer_params(m))
    else:
        counts["dense_mlp"] = swiglu_params(m.hidden_size, m.intermediate_size)
    return counts


def mtp_module_params(m: ModelSpec) -> dict[str, int]:
    """One MTP depth, unique parameters: enorm, hnorm, eh_proj (2h -> h), a MoE decoder layer,
    and the shared head's norm. Its embedding and output head are the main model's."""
    layer = decoder_layer_params(m, m.num_hidden_layers)  # index past the last layer: an MoE layer
    return {
        "projection": 2 * m.hidden_size + _linear(2 * m.hidden_size, m.hidden_size, False) + m.hidden_size,
        **layer,
    }


def param_counts(m: ModelSpec) -> ParamCounts:
    """Exact parameters of ``m`` by component."""
    sums = {"attention": 0, "norms": m.hidden_size, "dense_mlp": 0, "shared_experts": 0, "routed_experts": 0, "gates": 0}
    for layer in range(m.num_hidden_layers):
        for key, value in decoder_layer_params(m, layer).items():
            sums[key] += value
    mtp = mtp_module_params(m) if m.num_nextn_predict_layers else {}
    return ParamCounts(
        embedding=m.vocab_size * m.hidden_size,
        head=0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size,
        mtp=m.num_nextn_predict_layers * sum(mtp.values()),
        mtp_routed_experts=m.num_nextn_predict_layers * mtp.get("routed_experts", 0),
        gate_bias_elements=m.num_moe_layers * m.n_routed_experts if m.topk_method == "noaux_tc" else 0,
        **sums,
    )


def activated_params(m: ModelSpec, include_embedding: bool = True) -> int:
    """Parameters one token touches in the main model: all but the routed experts, plus
    ``num_experts_per_tok`` of them per MoE layer. DeepSeek quotes 37B for V3 with the embedding
    and head included (``README_WEIGHTS``: 36.7B counting 0.9B each)."""
    c = param_counts(m)
    routed_active = m.num_moe_layers * m.num_experts_per_tok * expert_params(m) if m.is_moe else 0
    total = c.total - c.routed_experts + routed_active
    return total if include_embedding else total - c.embedding
