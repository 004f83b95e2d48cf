"""Pipeline stages come from the plan and are the ones priced; they compose to the full model; DualPipe ranks
share the embedding; I/W split is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moeplan.model import (
    ModelOptions,
    StageSpec,
    Transformer,
    WeightGradStore,
    attach_weight_grad_store,
    build_rank,
    load_hf_state_dict,
    training_loss,
)
from moeplan.model.hf_weights import from_internal
from moeplan.model.stage import rank_stages_from_plan, stages_from_plan
from moeplan.simulator.accounting.layout import pipeline_stages
from moeplan.simulator.contracts.plan_file import PlanFile, PlanInputs, StageRecord
from moeplan.simulator.engine.build import step_inputs
from moeplan.simulator.planning.planner import build_plan
from moeplan.simulator.presets.clusters import h200, h800
from moeplan.simulator.presets.models import deepseek_v3
from moeplan.simulator.presets.recipes import deepseek_v3_recipe, default_recipe
from moeplan.simulator.schedules import SCHEDULE_KINDS, schedule_kind
from moeplan.simulator.spec.parallel import ParallelSpec
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


def _plan(spec, **parallel) -> PlanFile:
    """A plan of ``spec`` on one 8-GPU node, at a small micro-batch count the schedule runs."""
    par = ParallelSpec(**parallel)
    m = schedule_kind(par.schedule).smallest_valid(par.pp, 2 * par.pp)
    r = default_recipe()
    return build_plan(PlanInputs(model=spec, cluster=h200(1), parallel=par.model_copy(update={"microbatches": m}),
                                 training=r.training, budget=r.budget))


def _check_built_as_priced(plan: PlanFile) -> None:
    """The stages the model builds from ``plan`` cover every decoder layer once, in order, and hold
    the layer units the simulator priced: per stage (memory and the step's costs) and per rank."""
    spec, lay = plan.inputs.model, plan.layout
    stages = stages_from_plan(lay.stage_records, spec)
    assert [layer for s in stages for layer in s.layers] == list(range(spec.num_hidden_layers))
    priced = pipeline_stages(spec, plan.inputs.parallel)
    costed = step_inputs(plan.inputs, lay.dp, lay.microbatches).stages  # one cost unit per layer unit
    mtp = spec.num_nextn_predict_layers
    for stage, units, costs in zip(stages, priced, costed, strict=True):
        assert len(stage.layers) + (mtp if stage.has_head else 0) == len(units.layers) == len(costs.units)
        assert tuple(stage.layers) == tuple(u for u in units.layers if u < spec.num_hidden_layers)
        assert (stage.has_embedding, stage.has_head) == (units.has_embedding, units.has_head)
    for rank, memory in enumerate(plan.memory.per_rank):
        built = rank_stages_from_plan(lay, spec, rank)
        assert built == [stages[s] for s in memory.stages]  # the stages whose memory was priced on this rank


def test_v3_pp16_builds_the_split_that_was_priced() -> None:
    r = deepseek_v3_recipe()
    plan = build_plan(PlanInputs(model=deepseek_v3(), cluster=h800(256), parallel=r.parallel, training=r.training,
                                 budget=r.budget))
    sizes = [len(s.layers) for s in stages_from_plan(plan.layout.stage_records, plan.inputs.model)]
    assert sizes == [3] + [4] * 14 + [2]  # 62 units as 3, 4 x 14, 3: the last stage's third unit is the MTP module
    _check_built_as_priced(plan)
    with torch.device("meta"):
        first, last = build_rank(plan.inputs.model, rank_stages_from_plan(plan.layout, plan.inputs.model, 0))
    assert list(first.layers) == ["0", "1", "2"] and list(last.layers) == ["59", "60"] and len(last.mtp) == 1
    assert first.embed_tokens is last.embed_tokens  # DualPipe: stage 0 and 15 on rank 0 share it


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_layouts_build_the_split_that_was_priced(data) -> None:
    layers, mtp = data.draw(st.integers(1, 8), "layers"), data.draw(st.integers(0, 2), "mtp")
    spec = derived_spec(num_hidden_layers=layers, num_nextn_predict_layers=mtp, first_k_dense_replace=min(1, layers))
    kind = data.draw(st.sampled_from(SCHEDULE_KINDS), "kind")
    pp = data.draw(st.sampled_from([1, 2, 4, 8]), "pp")
    v = data.draw(st.integers(1, 3), "virtual_stages")
    entry = schedule_kind(kind)
    stages = entry.num_stages(pp, v)
    assume(entry.pp_error(pp) is None and stages <= layers + min(mtp, 1))
    # cut the units anywhere, MTP modules after the last cut (they sit on the head stage)
    cuts = sorted(data.draw(st.sets(st.integers(1, layers), min_size=stages - 1, max_size=stages - 1), "cuts"))
    bounds = [0, *cuts, layers + mtp]
    sizes = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    assume(min(sizes) >= 1)
    plan = _plan(spec, pp=pp, schedule=kind, virtual_stages=v, stage_layers=sizes)
    _check_built_as_priced(plan)


@pytest.mark.parametrize("stage_layers", [(1, 4), (4, 1), (1, 1, 1, 2), (2, 1, 1, 1)])
def test_stages_chain_to_the_full_model(stage_layers) -> None:
    full = _full().eval()
    spec = full.spec
    published = from_internal(full.state_dict(), spec)
    ids, _ = _batch(spec)
    plan = _plan(spec, pp=len(stage_layers), stage_layers=stage_layers)  # 4 layers + MTP: (4, 1) is a head-only stage
    modules = []
    for stage in stages_from_plan(plan.layout.stage_records, spec):
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
    plan = _plan(spec, pp=4, schedule="dualpipe")
    assert plan.layout.rank_stages[0] == (0, 3) and plan.layout.rank_stages[1] == (1, 2)
    first, last = rank_stages_from_plan(plan.layout, spec, 0)
    head_stage, embed_stage = build_rank(spec, [last, first], F32)
    assert embed_stage.embed_tokens is head_stage.embed_tokens
    params = [p for m in (embed_stage, head_stage) for p in m.parameters()]
    assert len({id(p) for p in params}) == len(params) - 1  # exactly one shared tensor
    # a 1F1B last stage alone keeps its own copy for MTP
    (alone,) = build_rank(spec, [last], F32)
    assert alone.embed_tokens is not embed_stage.embed_tokens
    middle = build_rank(spec, rank_stages_from_plan(plan.layout, spec, 1), F32)
    assert not any(hasattr(m, "embed_tokens") for m in middle)


def test_stage_spec_validation() -> None:
    spec = derived_spec()
    with pytest.raises(ValueError, match="has_embedding=True needs first_layer=0"):
        Transformer(spec, F32, StageSpec(1, 4, has_embedding=True, has_head=True))
    records = _plan(spec, pp=2, stage_layers=(2, 3)).layout.stage_records
    gap = (records[0].model_copy(update={"end_layer": 1}), records[1])
    with pytest.raises(ValueError, match="starts at first_layer=2, expected index=1 and first_layer=1"):
        stages_from_plan(gap, spec)
    early_mtp = (StageRecord(index=0, first_layer=0, end_layer=4, mtp_layers=(4,), has_embedding=True, has_head=False),
                 StageRecord(index=1, first_layer=4, end_layer=4, mtp_layers=(), has_embedding=False, has_head=True))
    with pytest.raises(ValueError, match=r"stage 0 has mtp_layers=\(4,\) with has_head=False"):
        stages_from_plan(early_mtp, spec)
    with pytest.raises(ValueError, match="must cover every layer"):
        stages_from_plan(records[:1], spec)
    with pytest.raises(ValueError, match="rank=2 outside"):
        rank_stages_from_plan(_plan(spec, pp=2).layout, spec, 2)


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
