"""The search's memory check against the full replay (``accounting.memory.peak_bytes_per_gpu``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeplan.simulator.accounting.layout import LayoutError, check_layout
from moeplan.simulator.accounting.memory import activation_peak_bytes, peak_bytes_per_gpu
from moeplan.simulator.planning import memory_check
from moeplan.simulator.planning.search import _microbatches, enumerate_layouts, search
from moeplan.simulator.presets.clusters import h200, h800
from moeplan.simulator.presets.models import deepseek_v2_lite, tiny_moe
from moeplan.simulator.schedules.registry import SCHEDULE_KINDS, make_schedule
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec


def _inputs(model, cluster, batch: int = 64, seq: int = 256) -> PlanInputs:
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=batch),))
    return PlanInputs(model=model, cluster=cluster, training=training, parallel=ParallelSpec(seq_len_tokens=seq))


def _running(inputs: PlanInputs) -> list[tuple[ParallelSpec, int, int]]:
    """(layout, dp, micro-batches) of every enumerated layout that runs."""
    out = []
    for par in enumerate_layouts(inputs, {}):
        try:
            dp = check_layout(inputs.model, inputs.cluster, par)
        except LayoutError:
            continue
        m = _microbatches(inputs, par, dp)
        if m is not None:
            out.append((par, dp, m))
    return out


def _full_peak(inputs: PlanInputs, par: ParallelSpec, dp: int, m: int) -> float:
    tr = inputs.training
    return peak_bytes_per_gpu(inputs.model, par, tr.optimizer, tr.precision, dp, m, tr.kernels.fusion)


def test_maximal_counts_keep_only_counts_no_other_covers():
    counts = [(0, 0), (1, 0), (2, 0), (2, 1), (1, 2), (0, 2), (2, 1), (1, 1)]
    assert memory_check.maximal_counts(counts) == [(1, 2), (2, 1)]


SIZES = [(1, 6, 2), (2, 8, 2), (4, 16, 2), (4, 32, 4), (8, 64, 2)]  # (pp, micro-batches, chunks per rank)


@pytest.mark.parametrize(("kind", "pp", "microbatches", "chunks"),
                         [(k, *size) for k in SCHEDULE_KINDS for size in SIZES if k != "dualpipe" or size[0] > 1])
def test_the_short_lists_replay_to_the_schedules_peak_for_any_stage_bytes(kind, pp, microbatches, chunks):
    schedule = make_schedule(kind, pp, microbatches, chunks)
    rng = np.random.default_rng(0)
    for actions in schedule.ranks:
        counts = memory_check.held_counts(actions, schedule.num_stages)
        short = memory_check.climb_actions(memory_check.maximal_counts(counts))
        if microbatches >= 32 and kind != "interleaved":  # the point: the profile does not grow with the count
            assert len(short) < len(actions) / 2, f"{kind=} {len(short)=} {len(actions)=}"
        for _ in range(20):
            stage_bytes = list(rng.uniform(0.0, 1e9, schedule.num_stages) * (rng.random(schedule.num_stages) < 0.8))
            assert activation_peak_bytes(short, stage_bytes) == pytest.approx(
                activation_peak_bytes(actions, stage_bytes), rel=1e-12, abs=0.0)


@pytest.mark.parametrize(("model", "cluster", "seq"), [(tiny_moe(), h200(1), 256), (deepseek_v2_lite(), h800(1), 4096)])
def test_the_verdict_is_the_full_replays_on_every_layout(model, cluster, seq):
    inputs = _inputs(model, cluster, seq=seq)
    profiles: memory_check.Profiles = {}
    verdicts = set()
    for par, dp, m in _running(inputs):
        peak = _full_peak(inputs, par, dp, m)
        fit, estimate = memory_check.fits(inputs, par, dp, m, profiles)
        verdicts.add(fit)
        assert fit == (peak <= cluster.usable_hbm_bytes), f"{par=} {peak=} {estimate=}"
        assert estimate <= peak * (1 + 1e-12), f"{par=} {peak=} {estimate=}"  # a bound or the same peak
    if model.name == "deepseek-v2-lite":
        assert verdicts == {True, False}  # both ways decided, so the case tests something


def test_a_peak_at_the_edge_of_the_hbm_is_decided_by_the_full_replay():
    inputs = _inputs(tiny_moe(), h200(1))
    par, dp, m = _running(inputs)[-1]
    peak = _full_peak(inputs, par, dp, m)
    node = inputs.cluster.node
    for usable in (math.ceil(peak), math.ceil(peak) - 1):
        reserved = node.memory_reserved_bytes + inputs.cluster.usable_hbm_bytes - usable
        node_at_edge = node.model_copy(update={"memory_reserved_bytes": reserved})
        edge = inputs.model_copy(update={"cluster": inputs.cluster.model_copy(update={"node": node_at_edge})})
        assert edge.cluster.usable_hbm_bytes == usable
        assert memory_check.fits(edge, par, dp, m, {}) == (peak <= usable, peak)


def test_the_search_counts_and_records_what_the_full_replay_gives():
    inputs = _inputs(deepseek_v2_lite(), h800(1), seq=4096)
    fixed = {"micro_batch_size": 1}
    result = search(inputs, fixed)
    runs = [(p, dp, m) for p, dp, m in _running(inputs) if p.micro_batch_size == 1]
    assert result.evaluated == sum(_full_peak(inputs, p, dp, m) <= inputs.cluster.usable_hbm_bytes for p, dp, m in runs)
    for c in result.ranked:
        dp = check_layout(inputs.model, inputs.cluster, c.parallel)
        assert c.peak_memory_bytes_per_gpu == _full_peak(inputs, c.parallel, dp, c.microbatches)


def test_when_nothing_fits_the_message_names_the_smallest_full_peak():
    inputs = _inputs(deepseek_v2_lite(), h800(1), seq=4096)
    small = inputs.cluster.model_copy(update={"gpu": inputs.cluster.gpu.model_copy(update={"hbm_bytes": 20 * 2**30})})
    starved = inputs.model_copy(update={"cluster": small})
    lowest = min(_full_peak(starved, p, dp, m) for p, dp, m in _running(starved))
    with pytest.raises(LayoutError, match=rf"the smallest peak is {lowest / 2**30:,.1f} GiB of 18.0 usable"):
        search(starved, {})
