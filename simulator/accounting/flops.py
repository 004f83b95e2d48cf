"""Training FLOPs per token, by component. Derivation and conventions: ``docs/design/accounting.md``.

Conventions (the usual "model FLOPs" of Kaplan et al. 2020 and PaLM, Chowdhery et al. 2022, App. B):
- only matrix multiplications count, 2 FLOPs per multiply-add; norms, softmax, SwiGLU and RoPE
  elementwise work is left out;
- a token's forward touches each activated weight once: 2 * params FLOPs;
- backward costs twice the forward (input gradient + weight gradient), so training is 3x forward;
- causal attention: the token at position i (0-based) attends to i + 1 keys, so the mean over a
  sequence of T tokens is (T + 1) / 2 keys; QK^T costs 2 * heads * qk_dim and PV
  2 * heads * v_dim FLOPs per key;
- recompute adds forward FLOPs that are not model FLOPs: they count in hardware FLOPs (HFU),
  never in MFU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moeplan.simulator.accounting.context_parallel import redundant_flops_per_token
from moeplan.simulator.accounting.params import (
    attention_norm_params,
    attention_params,
    expert_params,
    moe_layer_params,
    swiglu_params,
)
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import RecomputeKind


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token by component (main model, then the MTP modules)."""

    attention_proj: float
    attention_core: float  # QK^T and PV, causal
    dense_mlp: float
    shared_experts: float
    routed_experts: float
    gates: float
    head: float
    mtp: float  # all MTP depths: projection, decoder layer (incl. its attention core) and head

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def main(self) -> float:
        return self.total - self.mtp


def attention_core_flops(m: ModelSpec, seq_len_tokens: int) -> float:
    """Forward QK^T + PV FLOPs per token of one causal attention layer."""
    mean_keys = (seq_len_tokens + 1) / 2
    v_dim = m.v_head_dim if m.is_mla else m.gqa_head_dim
    return 2 * m.num_attention_heads * (m.qk_head_dim + v_dim) * mean_keys


def _layer_forward(m: ModelSpec, layer: int, seq_len_tokens: int) -> dict[str, float]:
    out = {
        "attention_proj": 2.0 * (attention_params(m) - attention_norm_params(m)),
        "attention_core": attention_core_flops(m, seq_len_tokens),
        "dense_mlp": 0.0,
        "shared_experts": 0.0,
        "routed_experts": 0.0,
        "gates": 0.0,
    }
    if m.is_moe_layer(layer):
        moe = moe_layer_params(m)
        out["shared_experts"] = 2.0 * moe["shared_experts"]
        out["routed_experts"] = 2.0 * m.num_experts_per_tok * expert_params(m)
        out["gates"] = 2.0 * moe["gates"]
    else:
        out["dense_mlp"] = 2.0 * swiglu_params(m.hidden_size, m.intermediate_size)
    return out


def forward_flops(m: ModelSpec, seq_len_tokens: int) -> ForwardFlops:
    """Forward FLOPs per token at sequence length ``seq_len_tokens``."""
    sums = dict.fromkeys(("attention_proj", "attention_core", "dense_mlp", "shared_experts", "routed_experts", "gates"), 0.0)
    for layer in range(m.num_hidden_layers):
        for key, value in _layer_forward(m, layer, seq_len_tokens).items():
            sums[key] += value
    head = 2.0 * m.vocab_size * m.hidden_size
    mtp_layer = _layer_forward(m, m.num_hidden_layers, seq_len_tokens)
    mtp_depth = 2.0 * (2 * m.hidden_size * m.hidden_size) + sum(mtp_layer.values()) + head
    return ForwardFlops(head=head, mtp=m.num_nextn_predict_layers * mtp_depth, **sums)


def recompute_flops(m: ModelSpec, seq_len_tokens: int, recompute: RecomputeKind) -> float:
    """Extra forward FLOPs per token that backward spends re-creating activations.

    - ``none``: 0.
    - ``selective`` (DeepSeek-V3 TR §3.2.3): RMSNorm, SwiGLU and the MLA up-projections
      (``q_b_proj``, ``kv_b_proj``) are recomputed; only the up-projections are matmuls. For GQA
      models nothing selective is a matmul.
    - ``full``: every decoder layer's forward again (the MTP modules' too), not the head.
    """
    if recompute == "none":
        return 0.0
    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    if recompute == "selective":
        if not (m.is_mla and m.kv_lora_rank):
            return 0.0
        heads = m.num_attention_heads
        q_up = (m.q_lora_rank or 0) * heads * m.qk_head_dim
        kv_up = m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        return layers * 2.0 * (q_up + kv_up)
    fwd = forward_flops(m, seq_len_tokens)
    mtp_head = m.num_nextn_predict_layers * fwd.head
    mtp_proj = m.num_nextn_predict_layers * 2.0 * (2 * m.hidden_size * m.hidden_size)
    return fwd.total - fwd.head - mtp_head - mtp_proj


@dataclass(frozen=True)
class TrainingFlops:
    """Per-token training FLOPs: model FLOPs (MFU) and hardware FLOPs with recompute (HFU)."""

    forward: ForwardFlops
    model_flops: float  # 3 x forward, main model + MTP
    model_flops_no_mtp: float
    recompute_flops: float
    context_parallel_flops: float = 0.0  # remote rows' K/V up-projections under CP (hardware only)

    @property
    def hardware_flops(self) -> float:
        return self.model_flops + self.recompute_flops + self.context_parallel_flops


def training_flops(m: ModelSpec, seq_len_tokens: int, recompute: RecomputeKind = "none", cp: int = 1) -> TrainingFlops:
    """Forward + backward FLOPs per trained token (``cp``: context-parallel size, which adds
    hardware FLOPs only; ``accounting.context_parallel``)."""
    fwd = forward_flops(m, seq_len_tokens)
    return TrainingFlops(
        forward=fwd,
        model_flops=3.0 * fwd.total,
        model_flops_no_mtp=3.0 * fwd.main,
        recompute_flops=recompute_flops(m, seq_len_tokens, recompute),
        context_parallel_flops=redundant_flops_per_token(m, cp),
    )
