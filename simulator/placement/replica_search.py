"""Steps 2 and 3 of the placement for one node (or the whole cluster in global mode): which experts get
the redundant slots, and which GPU each slot goes to.

EPLB gives each extra slot to the expert with the highest load per replica, then packs. With few slots
per GPU that can be the wrong expert: weights [403, 31, 375] on 2 GPUs x 2 slots replicate expert 0 and
leave a GPU at 375 + 201.5 = 576.5, while replicating expert 1 gives 403 + 15.5 = 418.5. And when hot
experts have more replicas together than there are GPUs, two of them must share a GPU, where holding a
few slots back would have kept them apart. So, with ``refine``:

1. for a few counts ``d`` of held-back slots, replicate with EPLB's rule into ``slots - d`` slots and pack
   them together with ``d`` empty (zero-load) slots, so the packing puts the empty slots on hot GPUs;
2. local search: re-target one slot at a time (a redundant replica, or an empty slot) to another expert,
   taking the change that lowers the most loaded GPU the most, with the swap search of
   ``simulator/placement/packing.py`` in between; empty slots left at the end get the least harmful expert;
3. keep the start with the lowest most-loaded GPU.
"""

from __future__ import annotations

import numpy as np

from moeplan.simulator.placement.packing import balanced_packing, swap_search

_MAX_ROUNDS = 64
_REL_EPS = 1e-12
_HELD_BACK = (0, 1, 2, 4, 8)  # empty-slot counts tried as starts
_GOOD_ENOUGH_FRAC = 1e-3  # stop trying starts within this of the lower bound


def replicate_and_pack(
    weight: np.ndarray, slots_per_gpu: np.ndarray, spread: bool, refine: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Replicas and GPUs for experts ``weight`` ``[n]`` on GPUs with ``slots_per_gpu`` ``[gpus]`` slots.

    Returns:
        replica_of ``[slots]`` expert of each slot (every expert at least once),
        gpu ``[slots]`` GPU of each slot (``slots_per_gpu[g]`` slots on GPU ``g``).
    """
    num_gpus, num_slots, n = slots_per_gpu.size, int(slots_per_gpu.sum()), weight.size
    cap = num_gpus if spread else None
    extra = num_slots - n
    held_back = [0] if not refine else sorted({min(extra, d, num_gpus) for d in _HELD_BACK})
    # No GPU can be below the mean, nor below an expert's load split over every GPU it may use.
    bound = max(weight.sum() / num_gpus, weight.max() / min(cap or num_slots, num_slots - n + 1))
    best, best_peak = None, np.inf
    for hold in held_back:
        if best_peak <= bound * (1 + _GOOD_ENOUGH_FRAC):
            break
        replica_of, count = replicate_experts(weight, num_slots - hold, cap)
        items = np.concatenate([replica_of, np.full(hold, n)])  # expert n = an empty slot
        per_item = np.concatenate([weight[replica_of] / count[replica_of], np.zeros(hold)])
        gpu = balanced_packing(per_item, slots_per_gpu, key=_keys(items, n) if spread else None, refine=refine)
        if refine:
            items, gpu = improve_replicas(weight, items, gpu, num_gpus, spread)
        peak = _gpu_loads(weight, items, gpu, num_gpus).max()
        if peak < best_peak * (1 - _REL_EPS):
            best, best_peak = (items, gpu), peak
    return best


def replicate_experts(weight: np.ndarray, num_slots: int, max_count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's step 2: give ``num_slots >= weight.size`` slots to the experts of ``weight`` ``[n]``: one each,
    then each extra slot to the expert with the highest weight per replica (which minimises the largest
    weight per replica), skipping experts that already have ``max_count`` replicas.

    Returns:
        replica_of ``[num_slots]`` expert index of each slot (the first ``n`` are ``0..n-1``),
        count ``[n]`` replicas per expert.
    """
    n = weight.size
    cap = np.inf if max_count is None else max_count
    assert num_slots <= n * cap, f"{num_slots=} {n=} {max_count=}"
    count = np.ones(n, dtype=np.int64)
    replica_of = list(range(n))
    for _ in range(num_slots - n):
        best = int(np.argmax(np.where(count < cap, weight / count, -np.inf)))
        replica_of.append(best)
        count[best] += 1
    return np.asarray(replica_of, dtype=np.int64), count


def improve_replicas(
    weight: np.ndarray, replica_of: np.ndarray, gpu: np.ndarray, num_gpus: int, spread: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Lower the most loaded GPU by re-targeting slots and swapping slots between GPUs.

    Args:
        weight: ``[n]`` load of each expert.
        replica_of: ``[slots]`` expert of each slot, ``n`` for an empty slot; each expert appears at least once.
        gpu: ``[slots]`` GPU of each slot, in ``0..num_gpus-1``.
        spread: keep at most one replica of an expert per GPU.

    Returns:
        ``(replica_of, gpu)`` without empty slots, the same slot count per GPU, every expert present.
    """
    n = weight.size
    replica_of, gpu = replica_of.copy(), gpu.copy()
    for _ in range(_MAX_ROUNDS + int((replica_of == n).sum())):
        loads = _slot_loads(weight, replica_of)
        gpu = swap_search(loads, gpu, num_gpus, _keys(replica_of, n) if spread else None)
        move = _best_retarget(weight, replica_of, gpu, num_gpus, spread, force=False)
        if move is None:
            if not (replica_of == n).any():
                break
            move = _best_retarget(weight, replica_of, gpu, num_gpus, spread, force=True)
        replica_of[move[0]] = move[1]
    assert not (replica_of == n).any(), "an empty slot was left unfilled"
    return replica_of, gpu


def _keys(replica_of: np.ndarray, n: int) -> np.ndarray:
    """Spread keys: the expert id, and a distinct key per empty slot (empty slots may share a GPU)."""
    empty = replica_of == n
    keys = replica_of.copy()
    keys[empty] = n + np.arange(int(empty.sum()))
    return keys


def _slot_loads(weight: np.ndarray, replica_of: np.ndarray) -> np.ndarray:
    n = weight.size
    count = np.bincount(replica_of, minlength=n + 1)[:n]
    padded = np.append(weight / np.maximum(count, 1), 0.0)  # empty slots weigh nothing
    return padded[replica_of]


def _gpu_loads(weight, replica_of, gpu, num_gpus) -> np.ndarray:
    return np.bincount(gpu, weights=_slot_loads(weight, replica_of), minlength=num_gpus)


def _best_retarget(weight, replica_of, gpu, num_gpus, spread, force) -> tuple[int, int] | None:
    """``(slot, new expert)`` lowering the max GPU load the most, or None. Candidates: a slot of the top
    GPU given to an expert absent from it, or a slot elsewhere given to an expert of the top GPU; with
    ``force``, any empty slot given to any expert, taking the lowest resulting max."""
    n = weight.size
    count = np.bincount(replica_of, minlength=n + 1).astype(np.float64)[:n]
    on_gpu = np.zeros((num_gpus, n + 1))  # [gpus, experts + empty] slots of each expert on each GPU
    np.add.at(on_gpu, (gpu, replica_of), 1.0)
    on_gpu = on_gpu[:, :n]
    load = on_gpu @ (weight / count)
    top = int(np.argmax(load))
    best_max, best = (np.inf if force else load[top] * (1 - _REL_EPS)), None
    # Per-replica load change of an expert losing (a) or gaining (b) one replica.
    with np.errstate(divide="ignore", invalid="ignore"):
        lose = np.where(count > 1, weight / (count - 1) - weight / count, np.inf)  # [experts]
    gain = weight / (count + 1) - weight / count  # [experts]
    on_top = on_gpu[top] > 0
    empty = replica_of == n
    movable = empty if force else empty | (count[np.minimum(replica_of, n - 1)] > 1)
    for slot in np.flatnonzero(movable):
        g, a = int(gpu[slot]), int(replica_of[slot])
        targets = np.ones(n, dtype=bool) if force else (~on_top if g == top else on_top.copy())
        if spread:
            targets &= on_gpu[g] == 0
        if a < n:
            targets[a] = False
        b = np.flatnonzero(targets)
        if b.size == 0:
            continue
        # [gpus, candidates] loads after the slot moves from expert a (or empty) to each b.
        new = load[:, None] + on_gpu[:, b] * gain[b][None, :]
        new[g] += weight[b] / (count[b] + 1)
        if a < n:
            new += on_gpu[:, [a]] * lose[a]
            new[g] -= weight[a] / (count[a] - 1)
        peak = new.max(axis=0)
        i = int(np.argmin(peak))
        if peak[i] < best_max:
            best_max, best = peak[i], (int(slot), int(b[i]))
    return best
