"""Logits equal transformers' ``DeepseekV3ForCausalLM`` given the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from moeplan.model import ModelOptions, Transformer, load_hf_state_dict
from moeplan.model.hf_weights import fused_to_published
from moeplan.simulator.spec.model import RopeScaling
from tests.model.hf_reference import derived_spec, hf_model, relative_error

pytest.importorskip("transformers")

YARN = RopeScaling(type="yarn", factor=4, original_max_position_embeddings=16, beta_fast=32, beta_slow=1,
                   mscale=1.0, mscale_all_dim=1.0)
YARN_V2 = RopeScaling(type="yarn", factor=8, original_max_position_embeddings=8, beta_fast=16, beta_slow=2,
                      mscale=0.707, mscale_all_dim=0.707)

# Each config stresses something different; all have group-limited routing with a non-zero bias.
CONFIGS = {
    "tiny_moe": {},
    "no_q_lora": dict(q_lora_rank=None, n_group=2, topk_group=1, num_experts_per_tok=2),
    "yarn_all_dim_0": dict(rope_scaling=RopeScaling(type="yarn", factor=2, original_max_position_embeddings=8,
                                                    mscale=1.0, mscale_all_dim=0.0)),
    "yarn_mscale_0707_two_shared": dict(rope_scaling=YARN_V2, n_shared_experts=2, routed_scaling_factor=1.7),
    "no_rope_scaling_unnormed": dict(rope_scaling=None, norm_topk_prob=False, first_k_dense_replace=2,
                                     n_group=8, topk_group=3, num_experts_per_tok=3),
    "attention_bias_no_shared": dict(attention_bias=True, n_shared_experts=0, rope_scaling=YARN,
                                     num_hidden_layers=3, first_k_dense_replace=0, hidden_size=48,
                                     num_attention_heads=3, qk_nope_head_dim=12, qk_rope_head_dim=6),
}


def _compare(name: str, update: dict, seed: int, layout: str) -> float:
    spec = derived_spec(**update)
    ref = hf_model(spec, seed=seed, bias_std=0.05)
    ours = Transformer(spec, ModelOptions(dtype=torch.float32, with_mtp=False)).eval()
    state = ref.state_dict()
    if layout == "published":
        state = fused_to_published(state)
    load_hf_state_dict(ours, state)
    ids = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(ids).logits
        for moe in ours.moe_layers().values():  # the selection bias must matter in this comparison
            moe.gate.e_score_correction_bias.zero_()
        assert relative_error(ours(ids).logits, expected) > 1e-4, f"{name}: bias changed no routing decision"
    return relative_error(got, expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name: str) -> None:
    err = _compare(name, CONFIGS[name], seed=sorted(CONFIGS).index(name), layout="fused")
    assert err < 1e-5, f"{name}: max relative error {err:.3e}"


def test_published_layout_loads_the_same_model() -> None:
    assert _compare("tiny_moe", {}, seed=11, layout="published") < 1e-5


def test_bias_changes_selection_so_the_comparison_can_fail() -> None:
    """Guard: with a large selection bias on our side only, logits must differ."""
    spec = derived_spec()
    ref = hf_model(spec, seed=3, bias_std=0.0)
    ours = Transformer(spec, ModelOptions(dtype=torch.float32, with_mtp=False)).eval()
    load_hf_state_dict(ours, ref.state_dict())
    with torch.no_grad():
        for moe in ours.moe_layers().values():
            moe.gate.e_score_correction_bias.copy_(torch.linspace(-1, 1, spec.n_routed_experts))
        ids = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
        assert relative_error(ours(ids).logits, ref(input_ids=ids).logits) > 1e-3
