"""Parameter accounting against transformers' own models, built on the meta device."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.accounting.params import activated_params, param_counts
from moeplan.simulator.presets.models import MODEL_PRESETS, deepseek_v3
from moeplan.simulator.spec.model import ModelSpec
from tests.simulator.hf_reference import hf_counts

COMPONENTS = ("embedding", "head", "attention", "norms", "dense_mlp", "shared_experts", "routed_experts", "gates")


def _ours(spec: ModelSpec) -> dict[str, int]:
    c = param_counts(spec)
    return {k: getattr(c, k) for k in COMPONENTS}


def test_deepseek_v3_total_is_the_published_671b():
    c = param_counts(deepseek_v3())
    assert c.total == 671_026_404_352
    # The MTP module: 11.6B unique (TR: "11.5B"); the checkpoint's 685B adds its embedding and head copies.
    assert 11.5e9 < c.mtp < 11.7e9
    # (684.49B here; the checkpoint also stores FP8 block scales and router biases.)
    assert 684e9 < c.total_with_mtp + c.embedding + c.head < 686e9
    # TR: 37B activated; README_WEIGHTS: 36.7B counting 0.9B embedding and 0.9B head.
    assert activated_params(deepseek_v3()) == 37_552_282_624


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_every_preset_matches_transformers_by_component(name):
    spec = MODEL_PRESETS[name]()
    reference = hf_counts(spec)
    assert _ours(spec) == {k: reference.get(k, 0) for k in COMPONENTS}


@st.composite
def tiny_specs(draw) -> ModelSpec:
    moe = draw(st.booleans())
    mla = draw(st.booleans()) or moe  # transformers' DeepSeek classes are MLA; dense GQA goes to Llama
    heads = draw(st.sampled_from([2, 4, 8]))
    hidden = heads * draw(st.sampled_from([8, 16]))
    data: dict = dict(
        vocab_size=draw(st.integers(16, 300)), hidden_size=hidden,
        num_hidden_layers=draw(st.integers(1, 5)), intermediate_size=draw(st.integers(8, 96)),
        num_attention_heads=heads, attention_bias=draw(st.booleans()),
        tie_word_embeddings=False,
    )
    if mla:
        data.update(
            model_type="deepseek_v3", num_key_value_heads=heads,
            q_lora_rank=draw(st.sampled_from([None, 8, 24])), kv_lora_rank=draw(st.sampled_from([4, 16])),
            qk_nope_head_dim=draw(st.sampled_from([4, 8])), qk_rope_head_dim=draw(st.sampled_from([2, 4])),
            v_head_dim=draw(st.sampled_from([4, 8, 12])),
            # transformers builds an MoE block from layer first_k_dense_replace on, experts or not
            first_k_dense_replace=data["num_hidden_layers"],
        )
    else:
        data.update(model_type="llama", num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, heads) if heads % k == 0])))
    if moe:
        groups = draw(st.sampled_from([1, 2, 4]))
        experts = groups * draw(st.integers(1, 4))
        data.update(
            n_routed_experts=experts, n_shared_experts=draw(st.integers(0, 2)),
            num_experts_per_tok=draw(st.integers(1, experts)), moe_intermediate_size=draw(st.integers(4, 40)),
            first_k_dense_replace=draw(st.integers(0, data["num_hidden_layers"])), n_group=groups, topk_group=groups,
        )
    return ModelSpec.model_validate(data)


@settings(max_examples=25, deadline=None)
@given(tiny_specs())
def test_random_tiny_configs_match_transformers(spec):
    reference = hf_counts(spec)
    assert _ours(spec) == {k: reference.get(k, 0) for k in COMPONENTS}
    assert param_counts(spec).total == sum(reference.values())


def test_activated_counts_only_top_k_routed_experts():
    spec = deepseek_v3()
    c = param_counts(spec)
    per_expert = c.routed_experts // (spec.n_routed_experts * spec.num_moe_layers)
    inactive = spec.num_moe_layers * (spec.n_routed_experts - spec.num_experts_per_tok) * per_expert
    assert activated_params(spec) == c.total - inactive
    assert activated_params(spec, include_embedding=False) == c.total - inactive - c.embedding


def test_dense_model_activates_everything():
    spec = MODEL_PRESETS["deepseek-67b"]()
    assert activated_params(spec) == param_counts(spec).total
    assert param_counts(spec).routed_experts == 0
