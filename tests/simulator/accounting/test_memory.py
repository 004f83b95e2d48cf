"""Layout resolution and the per-GPU memory model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeplan.simulator.accounting.layout import LayoutError, balanced_stage_sizes, pipeline_stages
from moeplan.simulator.accounting.memory import pipeline_memory, rank_params
from moeplan.simulator.accounting.params import param_counts
from moeplan.simulator.presets.models import deepseek_67b, deepseek_v2_lite, deepseek_v3, tiny_moe
from moeplan.simulator.schedules.registry import in_flight_microbatches, num_stages, rank_stages
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import OptimizerSpec

GiB = 2**30
V3_LAYOUT = dict(pp=16, ep=64, schedule="dualpipe", seq_len_tokens=4096, zero_stage=1)


def test_v3_stage_split_puts_the_short_stages_at_the_ends():
    assert balanced_stage_sizes(62, 16) == (3,) + (4,) * 14 + (3,)
    stages = pipeline_stages(deepseek_v3(), ParallelSpec(**V3_LAYOUT))
    assert stages[-1].layers == (59, 60, 61)  # unit 61 is the MTP module
    assert stages[0].has_embedding and stages[-1].has_head


@given(st.integers(1, 200), st.integers(1, 64))
def test_balanced_sizes_sum_and_differ_by_at_most_one(units, stages):
    if stages > units:
        with pytest.raises(LayoutError, match=f"stages={stages}"):
            balanced_stage_sizes(units, stages)
        return
    sizes = balanced_stage_sizes(units, stages)
    assert sum(sizes) == units and len(sizes) == stages
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sizes[::-1] or sizes[0] <= sizes[len(sizes) // 2]


@pytest.mark.parametrize(
    ("schedule", "pp", "expected"),
    [("1f1b", 4, [(0,), (1,), (2,), (3,)]), ("dualpipe", 4, [(0, 3), (1, 2), (1, 2), (0, 3)]),
     ("dualpipev", 2, [(0, 3), (1, 2)]), ("interleaved", 2, [(0, 2), (1, 3)])],
)
def test_rank_stages(schedule, pp, expected):
    par = ParallelSpec(pp=pp, schedule=schedule, virtual_stages=2)
    assert [rank_stages(par, r) for r in range(pp)] == expected


@pytest.mark.parametrize("schedule,copies", [("1f1b", 1), ("dualpipe", 2), ("dualpipev", 1), ("interleaved", 1)])
def test_parameters_over_ranks_add_up_to_the_model(schedule, copies):
    spec = deepseek_v2_lite()  # no MTP: every parameter lives on exactly `copies` ranks
    par = ParallelSpec(pp=3 if schedule == "1f1b" else 2, ep=1, schedule=schedule)
    stages = pipeline_stages(spec, par)
    total = 0
    for r in range(par.pp):
        p = rank_params(spec, [stages[i] for i in rank_stages(par, r)], ep=1)
        total += p.dense + p.expert
    assert total == copies * param_counts(spec).total


def test_zero_stages_shard_what_they_should():
    spec, par = deepseek_v3(), ParallelSpec(**V3_LAYOUT)
    mem = {z: pipeline_memory(spec, par.model_copy(update={"zero_stage": z}), OptimizerSpec(), "fp8", 128, 120)[1]
           for z in (0, 1, 2, 3)}
    assert mem[0].optimizer_bytes > mem[1].optimizer_bytes == mem[2].optimizer_bytes
    assert mem[1].grad_bytes > mem[2].grad_bytes
    assert mem[2].param_bytes > mem[3].param_bytes
    # ZeRO-1: optimizer state of dense weights / dp + experts / (dp / ep); FP32 master + 2 BF16 moments = 8 B
    r = mem[1]
    assert r.optimizer_bytes == pytest.approx(8 * (r.params_dense / 128 + r.params_expert / 2))


def test_deepseek_v3_recipe_fits_an_h800_and_plain_bf16_does_not():
    spec = deepseek_v3()
    fp8 = pipeline_memory(spec, ParallelSpec(**V3_LAYOUT, recompute="selective"), OptimizerSpec(), "fp8", 128, 120)
    bf16 = pipeline_memory(spec, ParallelSpec(**V3_LAYOUT, recompute="none"), OptimizerSpec(), "bf16", 128, 120)
    usable = 78 * GiB  # 80 GiB H800 less 2 GiB reserved
    body = [r for r in fp8 if 0 not in r.stages]  # the ranks without the embedding and head stages
    assert max(r.total_bytes for r in body) < usable < min(r.total_bytes for r in bf16)
    # The head rank also keeps, per in-flight micro-batch of the head stage, the BF16 logits of the main and
    # the MTP head (model/losses.py; 2 x 129,280 x 2 B per token): at this layout (ZeRO-1) that rank is over.
    head = max(fp8, key=lambda r: r.total_bytes)
    assert 0 in head.stages and usable < head.total_bytes < usable + 2 * 2.0 * 129280 * 4096 * 2


def test_recompute_lowers_activation_memory():
    spec = deepseek_67b()
    act = {rc: pipeline_memory(spec, ParallelSpec(pp=8, recompute=rc), OptimizerSpec(), "bf16", 4, 64)[0].activation_bytes
           for rc in ("none", "selective", "full")}
    assert act["none"] > act["full"]
    assert act["none"] >= act["selective"] > act["full"]


def test_in_flight_microbatches_follow_the_schedule_tables():
    assert in_flight_microbatches(ParallelSpec(pp=8), 0, 64) == 8  # 1F1B: PP
    assert in_flight_microbatches(ParallelSpec(pp=8), 7, 64) == 1
    assert in_flight_microbatches(ParallelSpec(pp=8), 0, 3) == 3  # capped by the micro-batches
    assert in_flight_microbatches(ParallelSpec(pp=8, schedule="dualpipe"), 0, 64) == 9 / 2  # PP+1 over 2 stages
    assert in_flight_microbatches(ParallelSpec(pp=4, schedule="dualpipev"), 0, 64) == 9 / 2  # 2N+1 chunks


def test_layout_errors_name_the_values():
    from moeplan.simulator.accounting.layout import check_layout
    from moeplan.simulator.presets.clusters import h800

    with pytest.raises(LayoutError, match="ep=48 does not divide n_routed_experts=256"):
        check_layout(deepseek_v3(), h800(256), ParallelSpec(pp=16, ep=48))
    with pytest.raises(LayoutError, match="pp=3 does not divide"):
        check_layout(deepseek_v3(), h800(256), ParallelSpec(pp=3))
    with pytest.raises(LayoutError, match="is dense"):
        check_layout(deepseek_67b(), h800(1), ParallelSpec(ep=2))
    with pytest.raises(LayoutError, match="stage_layers"):
        pipeline_stages(deepseek_v3(), ParallelSpec(pp=2, stage_layers=(30, 30)))


def test_mtp_modules_sit_on_the_last_stage():
    two_mtp = tiny_moe().model_copy(update={"num_nextn_predict_layers": 2})  # 4 layers + 2 MTP units
    assert pipeline_stages(two_mtp, ParallelSpec(pp=2, stage_layers=(3, 3)))[-1].layers == (3, 4, 5)
    with pytest.raises(LayoutError, match=r"stage_layers=\[5, 1\] .* puts an MTP module before the last stage"):
        pipeline_stages(two_mtp, ParallelSpec(pp=2, stage_layers=(5, 1)))


@pytest.mark.parametrize(("kind", "pp"), [("1f1b", 4), ("zb1p", 4), ("dualpipe", 4), ("dualpipev", 2), ("dualpipe", 8)])
def test_schedule_replay_matches_the_closed_forms_on_equal_stages(kind, pp):
    from moeplan.simulator.schedules import make_schedule

    # 48 layers: equal stages for every pp here; a vocabulary of 8 makes the head's logits negligible beside them
    spec = deepseek_67b().model_copy(update={"num_hidden_layers": 48, "vocab_size": 8})
    par = ParallelSpec(pp=pp, schedule=kind)
    m = 4 * num_stages(par)
    closed = pipeline_memory(spec, par, OptimizerSpec(), "bf16", 8, m)
    exact = pipeline_memory(spec, par, OptimizerSpec(), "bf16", 8, m, make_schedule(kind, pp, m))
    for c, e in zip(closed, exact, strict=True):
        # the head stage still keeps its norm output (2h bytes per token) beside its layers (under 1% of a stage)
        assert e.activation_bytes == pytest.approx(c.activation_bytes, rel=1e-2 if len(c.stages) > 1 else 1e-6)


def test_schedule_replay_weights_unequal_stages():
    from moeplan.simulator.accounting.memory import activation_peak_bytes
    from moeplan.simulator.schedules import Action

    acts = [Action.model_validate(t) for t in ("0F0", "1F0", "1B0", "0F1", "0B0", "0B1")]
    # stage 0 holds 1 unit, stage 1 holds 10: the peak is when both forwards of mb 0 are live
    assert activation_peak_bytes(acts, [1.0, 10.0]) == 11.0


@pytest.mark.parametrize("preset", ["tiny-moe", "deepseek-v2-lite", "deepseek-v3"])
def test_rank_param_tensors_counts_what_the_model_builds(preset):
    """The trainable tensors of a stage (the runtime's optimizer updates each one apart on a ZeRO group of one)
    are those ``model.build_rank`` makes: a first stage, and a last one with the MTP modules and the head."""
    import torch

    from moeplan.model import ModelOptions, StageSpec, build_rank
    from moeplan.simulator.accounting.layout import Stage
    from moeplan.simulator.accounting.memory import rank_param_tensors
    from moeplan.simulator.presets.models import MODEL_PRESETS

    spec = MODEL_PRESETS[preset]()
    layers, units = spec.num_hidden_layers, spec.num_hidden_layers + spec.num_nextn_predict_layers
    for lo, hi, embedding, head in ((0, 2, True, False), (2, units, False, True), (0, units, True, True)):
        with torch.device("meta"):
            built = build_rank(spec, [StageSpec(lo, min(hi, layers), embedding, head)], ModelOptions())[0]
        dense, expert = rank_param_tensors(spec, [Stage(0, tuple(range(lo, hi)), embedding, head)])
        assert dense + expert == sum(p.requires_grad for p in built.parameters()), (lo, hi)
        assert expert == 2 * sum(spec.is_moe_layer(u) for u in range(lo, min(hi, layers))) + 2 * (hi - min(hi, layers))


def test_the_fp8_expert_wgrad_stash_is_counted_where_it_is_kept():
    """``expert_wgrad_batch`` S > 1 keeps S micro-batches' FP8 Wgrad operands of every MoE layer on a GPU: on V3's
    layout (EP 64: 4 local experts) a body rank's transient bytes grow by S x its MoE layers x rows x (3I + 2d)
    x 33/32, rows = 4096 tokens x top-8 + 4 x 127 padding; nothing for BF16, nothing at S = 1."""
    spec, par = deepseek_v3(), ParallelSpec(**V3_LAYOUT, recompute="selective")
    plain = pipeline_memory(spec, par, OptimizerSpec(), "fp8", 128, 120)
    batched = pipeline_memory(spec, par, OptimizerSpec(), "fp8", 128, 120, expert_wgrad_batch=2)
    rows = 4096 * 8 + (256 // par.ep) * 127
    per_layer = 2 * rows * (3 * 2048 + 2 * 7168) * (1 + 4 / 128)
    for a, b in zip(plain, batched, strict=True):
        moe_layers = sum(1 for s in pipeline_stages(spec, par) if s.index in a.stages for u in s.layers
                         if spec.is_moe_layer(u))
        assert b.transient_bytes - a.transient_bytes == pytest.approx(moe_layers * per_layer)
        assert b.activation_bytes == a.activation_bytes
    bf16 = ParallelSpec(**V3_LAYOUT, recompute="none")
    assert (pipeline_memory(spec, bf16, OptimizerSpec(), "bf16", 128, 120, expert_wgrad_batch=4)
            == pipeline_memory(spec, bf16, OptimizerSpec(), "bf16", 128, 120))
