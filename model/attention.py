"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 TR §2.1.1), training (non-absorbed) form.

Per token, with H heads:
- q: x -> [q_a_proj (d -> q_lora_rank) -> q_a_layernorm -> q_b_proj] or q_proj when q_lora_rank is null,
  giving H x (qk_nope + qk_rope);
- kv: x -> kv_a_proj_with_mqa (d -> kv_lora_rank + qk_rope): the latent c_kv (normalised by
  kv_a_layernorm, expanded by kv_b_proj to H x (qk_nope + v)) and ONE decoupled RoPE key shared by
  all heads;
- softmax scale 1/sqrt(qk_nope + qk_rope) with the YaRN correction (``rope.softmax_scale``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.model.fused import Fusable, mla_key_value, mla_query, run
from moeplan.model.norm import RMSNorm
from moeplan.model.rope import softmax_scale
from moeplan.simulator.spec.model import ModelSpec


class MLA(nn.Module, Fusable):
    """Causal MLA over a full sequence. HF/DeepSeek checkpoint names throughout."""

    def __init__(self, spec: ModelSpec, make_linear, dtype: torch.dtype) -> None:
        super().__init__()
        assert spec.is_mla, f"MLA needs kv_lora_rank, got {spec.kv_lora_rank=}"
        self.num_heads = spec.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        self.kv_lora_rank = spec.kv_lora_rank
        self.scale = softmax_scale(spec)
        qk_dim = self.nope_dim + self.rope_dim
        d, bias = spec.hidden_size, spec.attention_bias
        if spec.q_lora_rank is None:
            self.q_proj = make_linear(d, self.num_heads * qk_dim)
        else:
            self.q_a_proj = make_linear(d, spec.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, spec.rms_norm_eps, dtype)
            self.q_b_proj = make_linear(spec.q_lora_rank, self.num_heads * qk_dim)
        self.kv_a_proj_with_mqa = make_linear(d, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, spec.rms_norm_eps, dtype)
        self.kv_b_proj = make_linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim))
        self.o_proj = make_linear(self.num_heads * self.v_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(bsz, seqlen, self.num_heads, self.nope_dim + self.rope_dim)  # (B, T, H, Dqk)
        q = run(mla_query, self.fuse, q, cos, sin, self.nope_dim)

        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent))
        kv = kv.view(bsz, seqlen, self.num_heads, self.nope_dim + self.v_dim)  # (B, T, H, Dnope + Dv)
        k, v = run(mla_key_value, self.fuse, kv, k_rope, cos, sin, self.nope_dim)  # one RoPE key for all heads
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )  # (B, H, T, Dv)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, self.num_heads * self.v_dim))
