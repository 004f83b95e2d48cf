"""A tiny model learns the synthetic task on CPU; the bias update narrows the expert load.

Figures for docs/model.md: ``python -m tests.model.synthetic_task`` (and the slow test below).
"""

from __future__ import annotations

import pytest

from tests.model.synthetic_task import train


def _check(steps: int, loss_below: float, load_ratio_below: float) -> None:
    without = train(steps=steps, gamma=0.0, batch=8)
    with_bias = train(steps=steps, gamma=0.01, batch=8)
    assert without.first_loss > 4.0  # ~ln(64): starts from chance
    assert with_bias.final_loss < loss_below, with_bias
    assert with_bias.final_mtp_loss < loss_below, with_bias  # MTP learns t_{i+2} too
    # max/mean of the load summed over the last 50 steps: the bias pulls it towards 1
    assert with_bias.window_max_over_mean < load_ratio_below * without.window_max_over_mean, (with_bias, without)
    assert with_bias.window_max_over_mean < 1.15, with_bias


def test_learns_and_balances_fast() -> None:
    _check(steps=120, loss_below=0.1, load_ratio_below=0.9)


@pytest.mark.slow
def test_learns_and_balances_long() -> None:
    _check(steps=400, loss_below=0.01, load_ratio_below=0.85)
