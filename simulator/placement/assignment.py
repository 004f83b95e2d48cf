"""Minimum-cost perfect matching of a square cost matrix (the Hungarian method with potentials).

numpy has no ``linear_sum_assignment`` and scipy is not a dependency, so this is the O(n^3) shortest
augmenting path method (Kuhn-Munkres with Jonker-Volgenant style potentials), with the inner scan over
columns vectorised.
"""

from __future__ import annotations

import numpy as np


def min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """``[n]`` column matched to each row of the square ``cost`` ``[n, n]``, minimising the summed cost."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    assert cost.shape == (n, n), f"{cost.shape=}"
    # 1-based arrays with a virtual column 0, as in the textbook formulation.
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    row_of_col = np.zeros(n + 1, dtype=np.int64)  # row matched to each column (0 = none)
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        row_of_col[0] = row
        col = 0
        min_slack = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while row_of_col[col] != 0:
            used[col] = True
            i = row_of_col[col]
            slack = cost[i - 1] - u[i] - v[1:]  # [n] reduced costs of row i
            free = ~used[1:]
            better = free & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            way[1:][better] = col
            candidates = np.where(free, min_slack[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[row_of_col[used]] += delta
            v[used] -= delta
            min_slack[1:][free] -= delta
            col = nxt
        while col:  # augment along the alternating path
            prev = way[col]
            row_of_col[col] = row_of_col[prev]
            col = prev
    match = np.empty(n, dtype=np.int64)
    match[row_of_col[1:] - 1] = np.arange(n)
    return match
