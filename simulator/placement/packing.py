"""Balanced packing of weighted items into packs of fixed capacity (the core of EPLB's steps 1 and 3).

``balanced_packing`` is EPLB's greedy (heaviest item first, to the lightest pack that still has room)
followed by a swap search that lowers the heaviest pack. It optionally forbids two items with the same
key in one pack: with keys = logical expert ids this keeps two replicas of one expert off one GPU
(deepseek-ai/EPLB issue 22), which EPLB's greedy can do.
"""

from __future__ import annotations

import numpy as np

_MAX_SWAP_ROUNDS_PER_ITEM = 8  # bound on improving swaps; each one strictly lowers the sum of squared pack loads


def balanced_packing(
    weight: np.ndarray,
    capacity: np.ndarray,
    key: np.ndarray | None = None,
    refine: bool = True,
) -> np.ndarray:
    """Assign every item to a pack; pack ``p`` receives exactly ``capacity[p]`` items.

    Args:
        weight: ``[n]`` non-negative item weights.
        capacity: ``[packs]`` item counts, summing to ``n``.
        key: ``[n]`` optional ints; two items with one key never share a pack.
        refine: run the swap search after the greedy.

    Returns:
        pack: ``[n]`` pack index of each item.
    """
    weight = np.asarray(weight, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    assert capacity.sum() == weight.size, f"{capacity.sum()=} {weight.size=}"
    keys = np.arange(weight.size) if key is None else np.asarray(key)
    pack = _greedy(weight, capacity, keys)
    if refine:
        pack = swap_search(weight, pack, capacity.size, None if key is None else keys)
    return pack


def _greedy(weight: np.ndarray, capacity: np.ndarray, key: np.ndarray) -> np.ndarray:
    """EPLB's greedy: heaviest first, to the lightest pack with room (and without the item's key)."""
    num_packs = capacity.size
    pack = np.full(weight.size, -1, dtype=np.int64)
    load = np.zeros(num_packs)
    count = np.zeros(num_packs, dtype=np.int64)
    keys_in = [set() for _ in range(num_packs)]
    for item in np.argsort(-weight, kind="stable"):
        open_packs = [p for p in range(num_packs) if count[p] < capacity[p] and key[item] not in keys_in[p]]
        if not open_packs:
            _repair(item, pack, capacity, count, key, keys_in)
            placed = pack >= 0
            load = np.bincount(pack[placed], weights=weight[placed], minlength=num_packs)
            continue
        target = min(open_packs, key=lambda p: (load[p], p))
        pack[item] = target
        count[target] += 1
        load[target] += weight[item]
        keys_in[target].add(key[item])
    return pack


def _repair(item, pack, capacity, count, key, keys_in) -> None:
    """Place ``item`` when every pack with room already holds its key: move a placed item ``x`` from a
    pack ``h`` lacking the key into the pack ``g`` with room, then put ``item`` in ``x``'s place."""
    for g in np.flatnonzero(count < capacity):
        for x in np.flatnonzero(pack >= 0):
            h = pack[x]
            if h != g and key[item] not in keys_in[h] and key[x] not in keys_in[g]:
                keys_in[h].discard(key[x])
                keys_in[g].add(key[x])
                keys_in[h].add(key[item])
                pack[x], pack[item] = g, h
                count[g] += 1
                return
    raise ValueError(f"cannot place item with key={key[item]} without two of that key in one pack")


def swap_search(weight: np.ndarray, pack: np.ndarray, num_packs: int, key: np.ndarray | None) -> np.ndarray:
    """``[n]`` packs after swapping an item of the heaviest pack with a lighter item elsewhere while that
    lowers the heaviest pack without making the other pack reach its old load; best swap first. Each
    swap lowers the sum of squared pack loads, so the search ends. ``key`` as in ``balanced_packing``."""
    pack = pack.copy()
    for _ in range(_MAX_SWAP_ROUNDS_PER_ITEM * weight.size):
        load = np.bincount(pack, weights=weight, minlength=num_packs)
        top = int(np.argmax(load))
        inside = np.flatnonzero(pack == top)
        outside = np.flatnonzero(pack != top)
        delta = weight[inside][:, None] - weight[outside][None, :]  # [in, out] load leaving the top pack
        other_after = load[pack[outside]][None, :] + delta
        ok = (delta > 1e-12 * max(load[top], 1.0)) & (other_after < load[top] - 1e-12 * max(load[top], 1.0))
        if key is not None:
            ok &= _keys_allow_swap(key, pack, inside, outside, top)
        if not ok.any():
            break
        score = np.where(ok, np.maximum(load[top] - delta, other_after), np.inf)
        a, b = np.unravel_index(np.argmin(score), score.shape)
        i, j = inside[a], outside[b]
        pack[i], pack[j] = pack[j], pack[i]
    return pack


def _keys_allow_swap(key, pack, inside, outside, top) -> np.ndarray:
    """``[in, out]`` True where swapping keeps at most one item per key in each pack."""
    num_packs = int(pack.max()) + 1
    present = np.zeros((num_packs, int(key.max()) + 1), dtype=np.int64)  # [pack, key] item counts
    np.add.at(present, (pack, key), 1)
    ki, ko = key[inside][:, None], key[outside][None, :]
    same = ki == ko
    # The outside item's key must be absent from the top pack, the inside item's absent from the other.
    out_free_in_top = present[top, key[outside]][None, :] == 0
    in_free_in_other = present[pack[outside][None, :], ki] == 0
    return same | (out_free_in_top & in_free_in_other)


def sticky_packing(
    weight: np.ndarray, capacity: np.ndarray, key: np.ndarray | None, preferred: np.ndarray, limit: float
) -> np.ndarray | None:
    """Pack like ``balanced_packing`` but put each item, heaviest first, on a ``preferred`` pack (e.g. one
    that already holds its expert, so nothing moves) whenever that keeps the pack within ``limit``; else on
    the lightest pack with room. Returns ``[n]`` packs, or None when no packing within ``limit`` was found.

    Args:
        weight: ``[n]``; capacity: ``[packs]``; key: ``[n]`` or None, as in ``balanced_packing``.
        preferred: ``[n, packs]`` booleans.
        limit: the largest pack load allowed.
    """
    num_packs = capacity.size
    keys = np.arange(weight.size) if key is None else np.asarray(key)
    pack = np.full(weight.size, -1, dtype=np.int64)
    load = np.zeros(num_packs)
    count = np.zeros(num_packs, dtype=np.int64)
    keys_in = [set() for _ in range(num_packs)]
    for item in np.argsort(-weight, kind="stable"):
        legal = np.array([count[p] < capacity[p] and keys[item] not in keys_in[p] for p in range(num_packs)])
        if not legal.any():
            return None
        sticky = legal & preferred[item] & (load + weight[item] <= limit)
        choices = np.flatnonzero(sticky if sticky.any() else legal)
        target = int(choices[np.argmin(load[choices])])
        pack[item] = target
        load[target] += weight[item]
        count[target] += 1
        keys_in[target].add(keys[item])
    if load.max() > limit:
        pack = swap_search(weight, pack, num_packs, None if key is None else keys)
    return pack if np.bincount(pack, weights=weight, minlength=num_packs).max() <= limit else None
