"""Exhaustive optimum of the placement problem on tiny inputs (test oracle)."""

from __future__ import annotations

import itertools

import numpy as np


def _compositions(total: int, parts: int, cap: int):
    """Replica counts: ``parts`` integers in 1..cap summing to ``total``."""
    if parts == 1:
        if 1 <= total <= cap:
            yield (total,)
        return
    for first in range(1, min(cap, total - parts + 1) + 1):
        for rest in _compositions(total - first, parts - 1, cap):
            yield (first, *rest)


def _best_split(items: list[int], load: np.ndarray, num_gpus: int, slots: int, best: float) -> float:
    """Smallest max GPU load over splits of ``items`` (expert ids) into GPUs of ``slots`` distinct experts."""
    if num_gpus == 1:
        return max(float(load[items].sum()), 0.0) if len(set(items)) == len(items) else np.inf
    first, rest = items[0], items[1:]
    result = best
    for others in set(itertools.combinations(rest, slots - 1)):
        gpu = (first, *others)
        if len(set(gpu)) < slots:
            continue
        here = float(load[list(gpu)].sum())
        if here >= result:
            continue
        remaining = list(rest)
        for e in others:
            remaining.remove(e)
        result = min(result, max(here, _best_split(remaining, load, num_gpus - 1, slots, result)))
    return result


def optimal_max_gpu_load(weight: np.ndarray, num_replicas: int, num_gpus: int) -> float:
    """Global policy optimum for one layer ``weight`` ``[experts]``: replica counts and an equal-slot
    packing with at most one replica of an expert per GPU, minimising the most loaded GPU."""
    n = weight.size
    slots = num_replicas // num_gpus
    best = np.inf
    for counts in _compositions(num_replicas, n, num_gpus):
        load = weight / np.asarray(counts)
        if load.max() >= best:
            continue
        items = [e for e, c in enumerate(counts) for _ in range(c)]
        best = min(best, _best_split(items, load, num_gpus, slots, best))
    return best
