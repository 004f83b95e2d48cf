"""Local search over which experts get the redundant slots, after EPLB's steps 2 and 3.

EPLB gives each extra slot to the expert with the highest load per replica, then packs. With few slots
per GPU that can be the wrong expert: weights [403, 31, 375] on 2 GPUs x 2 slots replicate expert 0 and
leave a GPU at 375 + 201.5 = 576.5, while replicating expert 1 gives 403 + 15.5 = 418.5. This search
re-targets one redundant slot at a time (its expert keeps at least one replica), taking the change that
lowers the most loaded GPU the most, and re-runs the swap search between re-targets.
"""

from __future__ import annotations

import numpy as np

from simulator.packing import swap_search

_MAX_ROUNDS = 64
_REL_EPS = 1e-12


def improve_replicas(
    weight: np.ndarray, replica_of: np.ndarray, gpu: np.ndarray, num_gpus: int, spread: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Lower the most loaded GPU by re-targeting redundant slots and swapping slots between GPUs.

    Args:
        weight: ``[experts]`` load of each expert.
        replica_of: ``[slots]`` expert of each slot; every expert appears at least once.
        gpu: ``[slots]`` GPU of each slot, in ``0..num_gpus-1``.
        spread: keep at most one replica of an expert per GPU.

    Returns:
        ``(replica_of, gpu)`` with the same slot count per GPU and every expert still present.
    """
    replica_of, gpu = replica_of.copy(), gpu.copy()
    for _ in range(_MAX_ROUNDS):
        count = np.bincount(replica_of, minlength=weight.size)
        gpu = swap_search(weight[replica_of] / count[replica_of], gpu, num_gpus, replica_of if spread else None)
        move = _best_retarget(weight, replica_of, gpu, num_gpus, spread)
        if move is None:
            break
        slot, expert = move
        replica_of[slot] = expert
    return replica_of, gpu


def _best_retarget(weight, replica_of, gpu, num_gpus, spread) -> tuple[int, int] | None:
    """``(slot, new expert)`` lowering the max GPU load the most, or None. Candidates: a slot of the top
    GPU given to an expert absent from it, or a slot elsewhere given to an expert of the top GPU."""
    n = weight.size
    count = np.bincount(replica_of, minlength=n).astype(np.float64)
    on_gpu = np.zeros((num_gpus, n))  # [gpus, experts] replicas of each expert on each GPU
    np.add.at(on_gpu, (gpu, replica_of), 1.0)
    load = on_gpu @ (weight / count)
    top = int(np.argmax(load))
    best_max, best = load[top] * (1 - _REL_EPS), None
    # Per-replica load change of an expert losing (a) or gaining (b) one replica.
    with np.errstate(divide="ignore", invalid="ignore"):
        lose = np.where(count > 1, weight / (count - 1) - weight / count, np.inf)  # [experts]
    gain = weight / (count + 1) - weight / count  # [experts]
    on_top = on_gpu[top] > 0
    for slot in np.flatnonzero(count[replica_of] > 1):
        g, a = int(gpu[slot]), int(replica_of[slot])
        targets = ~on_top if g == top else on_top.copy()
        if spread:
            targets &= on_gpu[g] == 0
        targets[a] = False
        b = np.flatnonzero(targets)
        if b.size == 0:
            continue
        # [gpus, candidates] loads after slot `slot` moves from expert a to each b.
        new = load[:, None] + on_gpu[:, [a]] * lose[a] + on_gpu[:, b] * gain[b][None, :]
        new[g] += -(weight[a] / (count[a] - 1)) + weight[b] / (count[b] + 1)
        peak = new.max(axis=0)
        i = int(np.argmin(peak))
        if peak[i] < best_max:
            best_max, best = peak[i], (int(slot), int(b[i]))
    return best
