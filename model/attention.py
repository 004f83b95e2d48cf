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

from moeplan.model.fused import Fusable, mla_key_rope_backward, mla_key_value, mla_query, run
from moeplan.model.linear import Linear, LinearFn, fp8_backward_from_quantised, paired
from moeplan.model.norm import RMSNorm
from moeplan.model.rope import softmax_scale
from moeplan.simulator.spec.model import ModelSpec


# With the memory-bound work fused (``fuse``) and an FP8 backward whose ops provide them (``Fp8Ops.
# rope_backward_quant_both``, ``heads_quant_both``), the up-projections' output gradients are cast as the attention's
# backward glue is read (``QueryUpFn``, ``KeyValueUpFn``); False: autograd's glue, then ``LinearFn``'s cast. On since
# the Gluon cast's two MLA modes ran on an H100 (2026-12-07 22:27 UTC: tests/kernels/test_mla_backward.py's and
# tests/model/test_mla_glue_cast.py's ``gpu`` tests pass; in ``benchmarks/model_step.py``'s profiled FP8 step the two
# Inductor glue kernels, 0.98 + 0.69 ms a micro-batch, are gone and the casts that read the glue take 0.31 ms more:
# docs/results/model-step.md). The cost model prices the same (``simulator.costs.elementwise``, the fused FP8 ``rope``
# class's backward is ``_key_rope_backward``'s bytes).
GLUE_IN_CAST = True


class QueryUpFn(torch.autograd.Function):
    """q = RoPE on the last channels of each head of x W^T (``mla_query``), an FP8 ``LinearFn`` with an FP8 backward:
    the output gradient's cast applies RoPE's backward as it reads d q (``Fp8Ops.rope_backward_quant_both``), so
    neither the rotated-back d q nor the concatenation's gradient is stored in BF16."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, store, fp8, heads: int, nope: int, fuse: bool):
        out = LinearFn.forward(ctx, x, weight, store, fp8, True)
        ctx.rope = (cos, sin, nope)
        return run(mla_query, fuse, out.unflatten(-1, (heads, -1)), cos, sin, nope)

    @staticmethod
    def backward(ctx, dq):
        cos, sin, nope = ctx.rope
        dq2 = dq.reshape(-1, dq.shape[-2] * dq.shape[-1])  # (M, H (nope + R)): a view where the rows merge
        g, g_t = ctx.fp8.rope_backward_quant_both(dq2.contiguous(), cos, sin, dq.shape[-1], nope)
        return *fp8_backward_from_quantised(ctx, g, g_t), None, None, None, None, None, None, None


class KeyValueUpFn(torch.autograd.Function):
    """(keys, values) from the KV up-projection x W^T and the shared RoPE key (``mla_key_value``), an FP8 ``LinearFn``
    with an FP8 backward: the output gradient's cast reads each head's no-RoPE d k and its d v where they are
    (``Fp8Ops.heads_quant_both``), so the KV split's gradient is never put together in BF16; the shared key's
    gradient is ``mla_key_rope_backward``'s."""

    @staticmethod
    def forward(ctx, x, weight, k_rope, cos, sin, store, fp8, heads: int, nope: int, fuse: bool):
        out = LinearFn.forward(ctx, x, weight, store, fp8, True)
        ctx.mla = (cos, sin, nope, fuse)
        return run(mla_key_value, fuse, out.unflatten(-1, (heads, -1)), k_rope, cos, sin, nope)

    @staticmethod
    def backward(ctx, dk, dv):
        cos, sin, nope, fuse = ctx.mla
        d_rope = run(mla_key_rope_backward, fuse, dk, cos, sin, nope) if ctx.needs_input_grad[2] else None
        dk2 = dk.reshape(-1, dk.shape[-2] * dk.shape[-1]).contiguous()  # (M, H (nope + R))
        dv2 = dv.reshape(-1, dv.shape[-2] * dv.shape[-1]).contiguous()  # (M, H v)
        g, g_t = ctx.fp8.heads_quant_both(dk2, dv2, dk.shape[-1], nope)
        return *fp8_backward_from_quantised(ctx, g, g_t), d_rope, None, None, None, None, None, None, None


def _glue_in_cast(linear: Linear, fuse: bool) -> bool:
    """Whether ``linear``'s output gradient is cast by the attention's glue (``GLUE_IN_CAST``, above)."""
    fp8 = linear.fp8
    return (GLUE_IN_CAST and fuse and fp8 is not None and linear.fp8_backward and linear.bias is None
            and torch.is_grad_enabled() and fp8.rope_backward_quant_both is not None
            and fp8.heads_quant_both is not None)


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
            q_up, q_in = self.q_proj, x
            kv_a = self.kv_a_proj_with_mqa(x)
        else:
            q_a, kv_a = paired(x, self.q_a_proj, self.kv_a_proj_with_mqa)  # one Dgrad for the two (model.linear)
            q_up, q_in = self.q_b_proj, self.q_a_layernorm(q_a)
        if _glue_in_cast(q_up, self.fuse):  # (B, T, H, Dqk), RoPE applied
            q = QueryUpFn.apply(q_in, q_up.weight, cos, sin, q_up.weight_grad_store, q_up.fp8, self.num_heads,
                                self.nope_dim, self.fuse)
        else:
            q = q_up(q_in).view(bsz, seqlen, self.num_heads, self.nope_dim + self.rope_dim)  # (B, T, H, Dqk)
            q = run(mla_query, self.fuse, q, cos, sin, self.nope_dim)

        kv_latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_in, kv_up = self.kv_a_layernorm(kv_latent), self.kv_b_proj
        if _glue_in_cast(kv_up, self.fuse):
            k, v = KeyValueUpFn.apply(kv_in, kv_up.weight, k_rope, cos, sin, kv_up.weight_grad_store, kv_up.fp8,
                                      self.num_heads, self.nope_dim, self.fuse)
        else:
            kv = kv_up(kv_in).view(bsz, seqlen, self.num_heads, self.nope_dim + self.v_dim)  # (B, T, H, Dnope + Dv)
            k, v = run(mla_key_value, self.fuse, kv, k_rope, cos, sin, self.nope_dim)  # one RoPE key for all heads
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )  # (B, H, T, Dv)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, self.num_heads * self.v_dim))
