"""Pipeline stages compose to the full model; DualPipe ranks share the embedding; I/W split is exact."""

from __future__ import annotations

import copy

import pytest
import torch

from moeplan.model import (ModelOptions, StageSpec, Transformer, WeightGradStore, attach_weight_grad_store, build_rank,
                   load_hf_state_dict, training_loss)
from moeplan.model.hf_weights import from_internal
from moeplan.model.stage import even_layers_per_stage, mirrored_stage_ids, split_stages
from tests.model.hf_reference import derived_spec

F32 = ModelOptions(dtype=torch.float32)


def _full(seed: int = 0) -> Transformer:
    m = Transformer(derived_spec(), F32)
    m.init_weights(torch.Generator().manual_seed(seed))
    return m


def _batch(spec, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (2, 10), generator=gen)
    return ids, torch.randint(0, spec.vocab_size, (2, 10), generator=gen)


@pytest.mark.parametrize("layers_per_stage", [[1, 3], [2, 1, 1], [0, 4], [4, 0]])
def test_stages_chain_to_the_full_model(layers_per_stage) -> None:
    full = _full().eval()
    spec = full.spec
    published = from_internal(full.state_dict(), spec)
    ids, _ = _batch(spec)
    modules = []
    for stage in split_stages(spec, layers_per_stage):
        module = Transformer(spec, F32, stage).eval()
        load_hf_state_dict(module, published)
        modules.append(module)
    with torch.no_grad():
        hidden = ids
        for module in modules[:-1]:
            hidden = module(hidden)
        out = modules[-1](hidden, input_ids=ids)
        ref = full(ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.mtp_logits[0], ref.mtp_logits[0], rtol=0, atol=0)


def test_dualpipe_rank_shares_one_embedding() -> None:
    spec = derived_spec()
    stages = split_stages(spec, even_layers_per_stage(spec.num_hidden_layers, 4))
    assert [len(s.layers) for s in stages] == [1, 1, 1, 1]
    first, last = (stages[i] for i in mirrored_stage_ids(4, 0))
    head_stage, embed_stage = build_rank(spec, [last, first], F32)
    assert embed_stage.embed_tokens is head_stage.embed_tokens
    params = [p for m in (embed_stage, head_stage) for p in m.parameters()]
    assert len({id(p) for p in params}) == len(params) - 1  # exactly one shared tensor
    # a 1F1B last stage alone keeps its own copy for MTP
    (alone,) = build_rank(spec, [last], F32)
    assert alone.embed_tokens is not embed_stage.embed_tokens
    middle = build_rank(spec, [stages[i] for i in mirrored_stage_ids(4, 1)], F32)
    assert not any(hasattr(m, "embed_tokens") for m in middle)


def test_stage_spec_validation() -> None:
    spec = derived_spec()
    with pytest.raises(ValueError, match="has_embedding=True needs first_layer=0"):
        Transformer(spec, F32, StageSpec(1, 4, has_embedding=True, has_head=True))
    with pytest.raises(ValueError, match="must be >= 0 and sum to num_hidden_layers=4"):
        split_stages(spec, [2, 1])
    with pytest.raises(ValueError, match="must be even"):
        mirrored_stage_ids(3, 0)


def _grads(module):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


def test_weight_gradients_can_be_deferred_exactly() -> None:
    """I step (backward) yields the input gradient; W step (flush) the weight gradients; same numbers."""
    full = _full(seed=1).train()
    spec = full.spec
    stage = Transformer(spec, F32, StageSpec(2, 4, has_embedding=False, has_head=True)).train()
    load_hf_state_dict(stage, from_internal(full.state_dict(), spec))
    reference = copy.deepcopy(stage)
    ids, labels = _batch(spec, seed=1)
    hidden = torch.randn(2, 10, spec.hidden_size, generator=torch.Generator().manual_seed(2))

    h_ref = hidden.clone().requires_grad_(True)
    training_loss(reference(h_ref, input_ids=ids), labels, 0.3).total.backward()
    want = _grads(reference)

    store = WeightGradStore()
    assert attach_weight_grad_store(stage, store) > 0
    h = hidden.clone().requires_grad_(True)
    training_loss(stage(h, input_ids=ids), labels, 0.3).total.backward()  # I step
    torch.testing.assert_close(h.grad, h_ref.grad)
    after_i = _grads(stage)
    deferred = [n for n, g in after_i.items() if g is None and want[n] is not None]
    assert "layers.3.mlp.experts.gate_up_proj" in deferred and "layers.2.self_attn.kv_b_proj.weight" in deferred
    assert "mtp.0.eh_proj.weight" in deferred and "lm_head.weight" in deferred
    assert after_i["layers.2.input_layernorm.weight"] is not None  # small parameters: in the I step
    assert len(store) > 0
    store.flush()  # W step
    assert len(store) == 0
    got = _grads(stage)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, msg=name)
