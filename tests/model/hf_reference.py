"""Helpers shared by the model tests: random tiny specs and the transformers reference model."""

from __future__ import annotations

import torch

from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.spec.model import ModelSpec


def derived_spec(base: ModelSpec | None = None, **update) -> ModelSpec:
    base = base or tiny_moe()
    return ModelSpec.model_validate({**base.model_dump(), **update})


def hf_config(spec: ModelSpec):
    """``transformers.DeepseekV3Config`` with the same architecture, eager attention."""
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        s = spec.rope_scaling
        rope = {"rope_type": s.type, "rope_theta": spec.rope_theta, "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "mscale": s.mscale,
                "mscale_all_dim": s.mscale_all_dim}
    config = DeepseekV3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        moe_intermediate_size=spec.moe_intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_attention_heads,
        n_shared_experts=spec.n_shared_experts, n_routed_experts=spec.n_routed_experts,
        routed_scaling_factor=spec.routed_scaling_factor, kv_lora_rank=spec.kv_lora_rank,
        q_lora_rank=spec.q_lora_rank, qk_rope_head_dim=spec.qk_rope_head_dim, v_head_dim=spec.v_head_dim,
        qk_nope_head_dim=spec.qk_nope_head_dim, n_group=spec.n_group, topk_group=spec.topk_group,
        num_experts_per_tok=spec.num_experts_per_tok, first_k_dense_replace=spec.first_k_dense_replace,
        norm_topk_prob=spec.norm_topk_prob, max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range, rms_norm_eps=spec.rms_norm_eps, rope_parameters=rope,
        attention_bias=spec.attention_bias, tie_word_embeddings=False,
        num_mtp_layers=spec.num_nextn_predict_layers,
    )
    config._attn_implementation = "eager"
    return config


def hf_model(spec: ModelSpec, seed: int, bias_std: float = 0.0):
    """A randomly initialised fp32 ``DeepseekV3ForCausalLM``; non-zero selection bias if ``bias_std``."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)  # transformers initialises from the global RNG
    model = DeepseekV3ForCausalLM(hf_config(spec)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("norm.weight", "layernorm.weight")):
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=gen))  # exercise norm scales
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(bias_std * torch.randn(tensor.shape, generator=gen))
            elif name.endswith(".bias"):
                tensor.copy_(0.02 * torch.randn(tensor.shape, generator=gen))
    return model


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())
