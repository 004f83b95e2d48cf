"""FLOP accounting against torch's FlopCounterMode on real transformers forwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moeplan.simulator.accounting.flops import attention_core_flops, forward_flops, training_flops
from moeplan.simulator.accounting.params import activated_params
from moeplan.simulator.presets.models import deepseek_67b, deepseek_v3, tiny_dense, tiny_moe
from tests.simulator.hf_reference import hf_model


def _counted_forward_flops(spec, seq_len: int) -> int:
    import transformers

    meta = hf_model(spec)
    config = meta.config
    config._attn_implementation = "eager"  # plain matmuls, full T x T scores
    config._experts_implementation = "eager"  # one linear per expert: FlopCounterMode sees them
    torch.manual_seed(0)
    model = type(meta)(config).float().eval()
    ids = torch.randint(0, spec.vocab_size, (1, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert isinstance(model, transformers.PreTrainedModel)
    return counter.get_total_flops()


@pytest.mark.parametrize("make_spec", [tiny_moe, tiny_dense])
@pytest.mark.parametrize("seq_len", [7, 32])
def test_forward_flops_equal_torch_flop_counter(make_spec, seq_len):
    spec = make_spec()
    ours = forward_flops(spec, seq_len)
    # Eager attention multiplies the full T x T score matrix (masking after); our count is causal,
    # (T + 1) / 2 keys per token. Convert ours to the full-matrix convention to compare exactly.
    full_core = ours.attention_core * seq_len / ((seq_len + 1) / 2)
    expected = (ours.main - ours.attention_core + full_core) * seq_len
    assert _counted_forward_flops(spec, seq_len) == pytest.approx(expected, rel=1e-12)


def test_training_is_three_forwards_and_six_n_plus_attention():
    spec = deepseek_v3()
    t = training_flops(spec, 4096)
    assert t.model_flops == pytest.approx(3 * t.forward.total)
    # 6 x activated non-embedding parameters + 3 x the causal attention core (Kaplan-style 6N rule);
    # N also holds the norm weights (0.002%), which are no matmuls, so ours is a hair smaller.
    six_n = 6 * activated_params(spec, include_embedding=False)
    core = 3 * spec.num_hidden_layers * attention_core_flops(spec, 4096)
    assert t.model_flops_no_mtp < six_n + core
    assert t.model_flops_no_mtp == pytest.approx(six_n + core, rel=1e-4)
    # ISCA'25 (unverified secondary copies) quotes 250 GFLOPs per token for V3 at 4K without MTP.
    assert t.model_flops_no_mtp / 1e9 == pytest.approx(250.5, abs=0.1)


def test_attention_core_is_causal_mean():
    spec = tiny_dense()
    one = attention_core_flops(spec, 1)
    assert one == 2 * spec.num_attention_heads * 2 * spec.gqa_head_dim
    assert attention_core_flops(spec, 9) == pytest.approx(5 * one)


def test_recompute_orders_hardware_flops():
    spec = deepseek_v3()
    none, sel, full = (training_flops(spec, 4096, r) for r in ("none", "selective", "full"))
    assert none.recompute_flops == 0
    assert 0 < sel.recompute_flops < full.recompute_flops
    assert none.model_flops == sel.model_flops == full.model_flops  # recompute is never model FLOPs
    # full recompute re-runs every decoder layer (and MTP layer), never the heads:
    fwd = none.forward
    assert full.recompute_flops < fwd.total - fwd.head
    # GQA models have no MLA up-projections, so selective recompute adds no matmuls
    assert training_flops(deepseek_67b(), 4096, "selective").recompute_flops == 0
