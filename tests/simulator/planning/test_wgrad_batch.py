"""The planner's expert Wgrad batch (``simulator.planning.wgrad_batch``): every size simulated, the fastest that fits
chosen, nothing chosen where the size does not matter or nothing fits."""

from __future__ import annotations

import pytest

from moeplan.simulator.accounting.layout import check_layout
from moeplan.simulator.accounting.memory import peak_bytes_per_gpu
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.planning.planner import resolve_microbatches
from moeplan.simulator.planning.predict import simulate_at
from moeplan.simulator.planning.wgrad_batch import applies, choose_wgrad_batch, with_wgrad_batch
from moeplan.simulator.presets.clusters import h200
from moeplan.simulator.presets.models import tiny_dense, tiny_moe
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import MAX_EXPERT_WGRAD_BATCH, Phase, TrainingSpec


def _inputs(precision: str = "fp8", model=None, hbm_bytes: int | None = None) -> PlanInputs:
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=64),), precision=precision)
    cluster = h200(1)
    if hbm_bytes is not None:
        cluster = cluster.model_copy(update={"gpu": cluster.gpu.model_copy(update={"hbm_bytes": int(hbm_bytes)})})
    return PlanInputs(model=model or tiny_moe(), cluster=cluster, training=training,
                      parallel=ParallelSpec(seq_len_tokens=256, pp=2, ep=4, schedule="1f1b"))


def _peak(inputs: PlanInputs) -> float:
    """The full replay's peak, computed here from the accounting (not through the planner's memory check)."""
    par, tr = inputs.parallel, inputs.training
    dp = check_layout(inputs.model, inputs.cluster, par)
    return peak_bytes_per_gpu(inputs.model, par, tr.optimizer, tr.precision, dp,
                              resolve_microbatches(par, tr, dp), tr.kernels.fusion, tr.kernels.expert_wgrad_batch)


def test_every_size_is_simulated_and_the_fastest_wins():
    inputs = _inputs()
    choice = choose_wgrad_batch(inputs)
    sizes = range(1, MAX_EXPERT_WGRAD_BATCH + 1)
    assert list(choice.step_s) == list(sizes)
    dp = check_layout(inputs.model, inputs.cluster, inputs.parallel)
    m = resolve_microbatches(inputs.parallel, inputs.training, dp)
    for size in sizes:
        trial = with_wgrad_batch(inputs, size)
        assert trial.training.kernels.expert_wgrad_batch == size
        assert choice.step_s[size] == simulate_at(trial, dp, m, inputs.parallel.seq_len_tokens, SimOptions()).step_time_s
        assert choice.peak_bytes[size] == pytest.approx(_peak(trial), rel=1e-12)
    # the stash grows with the size; the batched Wgrads never make the step longer
    peaks = [choice.peak_bytes[s] for s in sizes]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    assert choice.step_s[MAX_EXPERT_WGRAD_BATCH] <= choice.step_s[1]
    assert choice.chosen == min(sizes, key=lambda s: (choice.step_s[s], s))


def test_a_size_that_does_not_fit_is_not_chosen_and_with_none_fitting_nothing_is():
    full = choose_wgrad_batch(_inputs())
    reserved = h200(1).node.memory_reserved_bytes
    between = (full.peak_bytes[1] + full.peak_bytes[2]) / 2  # usable HBM that holds size 1 only
    choice = choose_wgrad_batch(_inputs(hbm_bytes=between + reserved))
    assert choice.chosen == 1 and choice.step_s[1] == full.step_s[1]
    assert all(choice.step_s[s] is None for s in range(2, MAX_EXPERT_WGRAD_BATCH + 1))
    assert choose_wgrad_batch(_inputs(hbm_bytes=full.peak_bytes[1] / 2 + reserved)) is None


def test_nothing_to_choose_in_bf16_or_without_routed_experts():
    assert not applies(_inputs("bf16")) and choose_wgrad_batch(_inputs("bf16")) is None
    dense = PlanInputs(model=tiny_dense(), cluster=h200(1), training=_inputs().training,
                       parallel=ParallelSpec(seq_len_tokens=256, pp=2))
    assert not applies(dense) and choose_wgrad_batch(dense) is None


def test_the_search_ranks_each_finalist_at_its_best_size():
    """``search(..., wgrad_batch=True)`` on an FP8 MoE: every finalist is simulated at each size that fits and ranked
    at the fastest (its ``Candidate`` records the size, step and peak of ``choose_wgrad_batch`` on that layout); the
    ranking is by that step; the result carries the best layout's choice. Without it (or in BF16) the candidates are
    the inputs' own size, recorded as None, and their steps are each layout's step at 1."""
    from moeplan.simulator.planning.search import search

    inputs = _inputs()
    fixed = {"pp": 2, "schedule": "1f1b"}
    chosen = search(inputs, fixed, wgrad_batch=True)
    plain = search(inputs, fixed)
    assert [c.parallel for c in plain.ranked] and all(c.expert_wgrad_batch is None for c in plain.ranked)
    assert plain.wgrad_batch is None
    for c in chosen.ranked:
        choice = choose_wgrad_batch(inputs.model_copy(update={"parallel": c.parallel}))
        assert c.expert_wgrad_batch == choice.chosen
        assert c.step_time_s == choice.step_s[choice.chosen] and c.peak_memory_bytes_per_gpu == choice.peak_bytes[
            choice.chosen]
        assert c.step_time_s <= choice.step_s[1]  # size 1 was among those tried
    steps = [c.step_time_s for c in chosen.ranked]
    assert steps == sorted(steps) and chosen.best == chosen.ranked[0].parallel
    assert chosen.wgrad_batch == choose_wgrad_batch(inputs.model_copy(update={"parallel": chosen.best}))
    assert any(c.expert_wgrad_batch > 1 for c in chosen.ranked)  # the sizes matter for tiny-moe in FP8 (see above)
    assert all(c.expert_wgrad_batch is None for c in search(_inputs("bf16"), fixed, wgrad_batch=True).ranked)


@pytest.mark.parametrize("hbm_between", [None, (1, 2), (2, 3)])
def test_the_searchs_first_stage_ranks_each_layout_at_its_largest_size_that_fits(monkeypatch, hbm_between):
    """Where the search chooses the size, each layout's bound and coarse step (the first stage, which picks the
    finalists) are at the largest size whose peak memory fits (the accounting's full replay, here), so a layout that
    gains from batching is not left out at size 1; without it they are at the inputs' size. With HBM between two
    sizes' peaks, the larger does not fit and the smaller is taken."""
    from moeplan.simulator.planning import search as search_module

    base = _inputs()
    hbm = None
    if hbm_between is not None:  # usable HBM between the two sizes' peaks of the pp=2 layout
        lo, hi = (_peak(with_wgrad_batch(base, s)) for s in hbm_between)
        hbm = (lo + hi) / 2 + base.cluster.node.memory_reserved_bytes
    inputs = _inputs(hbm_bytes=hbm)
    sizes = []
    real = search_module.step_line
    monkeypatch.setattr(search_module, "step_line", lambda trial, *a: sizes.append(
        (trial.parallel, trial.training.kernels.expert_wgrad_batch)) or real(trial, *a))
    search_module.search(inputs, {"pp": 2, "schedule": "1f1b"}, wgrad_batch=True)
    assert sizes
    usable = inputs.cluster.usable_hbm_bytes
    for par, size in sizes:
        at = inputs.model_copy(update={"parallel": par})
        fitting = [s for s in range(1, MAX_EXPERT_WGRAD_BATCH + 1) if _peak(with_wgrad_batch(at, s)) <= usable]
        assert size == max(fitting), par
    if hbm_between is not None:  # the layout whose peaks bracket the HBM is ranked at the smaller size
        assert any(size == hbm_between[0] for _, size in sizes)
    else:
        assert all(size == MAX_EXPERT_WGRAD_BATCH for _, size in sizes)  # tiny-moe on an H200: every size fits
    sizes.clear()
    search_module.search(inputs, {"pp": 2, "schedule": "1f1b"})
    assert sizes and all(size == inputs.training.kernels.expert_wgrad_batch for _, size in sizes)
