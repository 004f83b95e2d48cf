"""Model presets: functions returning a ``ModelSpec``, each citing its source.

Sources:
- V3: DeepSeek-V3 TR §4.2 and ``deepseek-ai/DeepSeek-V3`` ``inference/configs/config_671B.json``
  (see ``shared/reference/deepseek-v3.md`` §1.1).
- V2 / V2-Lite: the Hugging Face ``config.json`` of ``deepseek-ai/DeepSeek-V2`` and
  ``deepseek-ai/DeepSeek-V2-Lite`` (also ``config_236B.json`` / ``config_16B.json`` in the V3 repo).
- DeepSeek LLM 67B: its Hugging Face ``config.json`` (95 layers, hidden 8192, 64 heads, 8 KV heads,
  intermediate 22016, vocab 102400, max positions 4096, rope_theta 10000).
"""

from __future__ import annotations

from collections.abc import Callable

from moeplan.simulator.spec.model import ModelSpec, RopeScaling


def _derived(base: ModelSpec, update: dict) -> ModelSpec:
    """A validated copy of ``base`` with ``update`` applied (``model_copy`` would skip validation)."""
    return ModelSpec.model_validate({**base.model_dump(), **update})


def deepseek_v3() -> ModelSpec:
    """DeepSeek-V3 671B (37B activated) with its one MTP module."""
    return ModelSpec(
        name="deepseek-v3",
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        intermediate_size=18432,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        moe_intermediate_size=2048,
        first_k_dense_replace=3,
        moe_layer_freq=1,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        aux_loss_alpha=0.0001,  # TR §3 (the HF config carries 0.001, see reference §1.1)
        num_nextn_predict_layers=1,
        max_position_embeddings=163840,
        rope_theta=10000.0,
        rope_scaling=RopeScaling(
            type="yarn", factor=40, original_max_position_embeddings=4096,
            beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
        ),
        rms_norm_eps=1e-6,
        initializer_range=0.006,  # TR §4.2: the init std actually used
    )


def deepseek_v2() -> ModelSpec:
    """DeepSeek-V2 236B (21B activated): softmax router, group-limited greedy top-6 of 160."""
    return ModelSpec(
        name="deepseek-v2",
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=5120,
        num_hidden_layers=60,
        intermediate_size=12288,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=160,
        n_shared_experts=2,
        num_experts_per_tok=6,
        moe_intermediate_size=1536,
        first_k_dense_replace=1,
        n_group=8,
        topk_group=3,
        routed_scaling_factor=16.0,
        scoring_func="softmax",
        topk_method="group_limited_greedy",
        norm_topk_prob=False,
        aux_loss_alpha=0.003,
        max_position_embeddings=163840,
        rope_scaling=RopeScaling(
            type="yarn", factor=40, original_max_position_embeddings=4096,
            beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707,
        ),
    )


def deepseek_v2_lite() -> ModelSpec:
    """DeepSeek-V2-Lite 16B (2.4B activated): V2's design without q compression, greedy top-6 of 64."""
    return _derived(
        deepseek_v2(),
        dict(
            name="deepseek-v2-lite", hidden_size=2048, num_hidden_layers=27, intermediate_size=10944,
            num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64,
            moe_intermediate_size=1408, n_group=1, topk_group=1, routed_scaling_factor=1.0,
            topk_method="greedy", aux_loss_alpha=0.001,
        ),
    )


def deepseek_67b() -> ModelSpec:
    """DeepSeek LLM 67B: a dense Llama-style model with GQA (8 KV heads)."""
    return ModelSpec(
        name="deepseek-67b",
        model_type="llama",
        vocab_size=102400,
        hidden_size=8192,
        num_hidden_layers=95,
        intermediate_size=22016,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
    )


def tiny_moe() -> ModelSpec:
    """A 4-layer DeepSeek-V3-shaped model for tests: every V3 feature (MLA, YaRN,
    group-limited sigmoid routing, shared expert, MTP, a dense first layer) at tiny sizes."""
    return _derived(
        deepseek_v3(),
        dict(
            name="tiny-moe", vocab_size=512, hidden_size=64, num_hidden_layers=4, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
            n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=32, first_k_dense_replace=1,
            n_group=4, topk_group=2, max_position_embeddings=1024,
            rope_scaling=RopeScaling(
                type="yarn", factor=4, original_max_position_embeddings=256,
                beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
            ),
        )
    )


def tiny_dense() -> ModelSpec:
    """A 2-layer Llama-style GQA model for tests."""
    return _derived(
        deepseek_67b(),
        dict(
            name="tiny-dense", vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=160,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        )
    )


MODEL_PRESETS: dict[str, Callable[[], ModelSpec]] = {
    "deepseek-v3": deepseek_v3,
    "deepseek-v2": deepseek_v2,
    "deepseek-v2-lite": deepseek_v2_lite,
    "deepseek-67b": deepseek_67b,
    "tiny-moe": tiny_moe,
    "tiny-dense": tiny_dense,
}
