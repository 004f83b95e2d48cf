"""The layout search in a pool of processes (``planning.search``: the first stage in chunks, the coarse simulations
ahead of the one awaited, the finalists side by side) finds what the search in one process finds: the same ranked
finalists, as many layouts fitted and simulated (the stop where the serial loop puts it)."""

from __future__ import annotations

import pytest

from moeplan.simulator.planning import search as search_module
from moeplan.simulator.planning.search import WORKERS_ENV, search, search_workers
from moeplan.simulator.presets.clusters import h200, h800
from moeplan.simulator.presets.models import deepseek_v2_lite, tiny_dense, tiny_moe
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec


def _inputs(model, cluster, batch: int = 64, seq: int = 256) -> PlanInputs:
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=batch),))
    return PlanInputs(model=model, cluster=cluster, training=training, parallel=ParallelSpec(seq_len_tokens=seq))


def _same(a, b) -> None:
    assert (a.ranked, a.best, a.enumerated, a.evaluated, a.simulated, a.wgrad_batch) == (
        b.ranked, b.best, b.enumerated, b.evaluated, b.simulated, b.wgrad_batch)


@pytest.mark.parametrize(("model", "cluster", "fixed", "seq"), [
    (tiny_moe(), h200(2), {"recompute": "selective"}, 256),
    (tiny_dense(), h800(1), {}, 256),
    (deepseek_v2_lite(), h200(1), {"micro_batch_size": 1, "recompute": "selective"}, 1024),
])
def test_a_search_in_a_pool_finds_what_one_process_finds(model, cluster, fixed, seq, monkeypatch):
    monkeypatch.setattr(search_module, "PARALLEL_MIN_LAYOUTS", 0)  # these searches are small: pool them anyway
    inputs = _inputs(model, cluster, seq=seq)
    done = []
    serial, pooled = search(inputs, fixed, workers=1), search(inputs, fixed, workers=2,
                                                             progress=lambda d, n: done.append((d, n)))
    _same(serial, pooled)
    assert serial.simulated < serial.evaluated  # the bound pruned, and the pool stopped at the same layout
    assert done[-1][0] == done[-1][1] == serial.enumerated and len(done) > 1  # progress by chunk, to the end
    _same(search(inputs, fixed, workers=1, exhaustive=True), search(inputs, fixed, workers=3, exhaustive=True))


def test_the_finalists_wgrad_batch_is_chosen_the_same_in_a_pool(monkeypatch):
    monkeypatch.setattr(search_module, "PARALLEL_MIN_LAYOUTS", 0)
    inputs = _inputs(tiny_moe(), h200(2))
    inputs = inputs.model_copy(update={"training": inputs.training.model_copy(update={"precision": "fp8"})})
    fixed = {"recompute": "selective", "micro_batch_size": 1}
    _same(search(inputs, fixed, workers=1, wgrad_batch=True), search(inputs, fixed, workers=2, wgrad_batch=True))


def test_small_searches_stay_in_this_process(monkeypatch):
    monkeypatch.setattr(search_module, "_pool", lambda workers: pytest.fail("a pool for a small search"))
    search(_inputs(tiny_moe(), h200(1)), {"recompute": "selective"}, workers=8)  # 516 layouts


def test_the_workers_come_from_the_environment_or_the_cpus(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert search_workers() == 3
    for bad in ("0", "-2", "two", ""):
        monkeypatch.setenv(WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=f"{WORKERS_ENV}={bad!r}: must be a positive integer"):
            search_workers()
    monkeypatch.delenv(WORKERS_ENV)
    assert search_workers() >= 1
