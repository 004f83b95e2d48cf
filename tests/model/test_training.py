"""A tiny model learns the synthetic task on CPU; the bias update narrows the expert load.

Figures for docs/design/model.md: ``python -m tests.model.synthetic_task --steps 120`` (and ``--steps 400``).
Load imbalance is max/mean of the per-expert loads summed over the whole run (averaged over the two
MoE layers, MTP included): the per-step figure of a 256-token batch is dominated by sampling noise.
"""

from __future__ import annotations

import pytest

from tests.model.synthetic_task import train


def _check(steps: int, loss_below: float, balanced_below: float) -> None:
    without = train(steps=steps, gamma=0.0, batch=8)
    with_bias = train(steps=steps, gamma=0.01, batch=8)
    assert without.first_loss > 4.0  # ~ln(64): starts from chance
    assert with_bias.final_loss < loss_below, with_bias
    assert with_bias.final_mtp_loss < loss_below, with_bias  # MTP learns t_{i+2} too
    assert with_bias.run_max_over_mean < 0.9 * without.run_max_over_mean, (with_bias, without)
    assert with_bias.run_max_over_mean < balanced_below, with_bias


def test_learns_and_balances_fast() -> None:
    # measured: loss 0.0052; max/mean 1.281 without the bias update, 1.029 with gamma = 0.01
    _check(steps=120, loss_below=0.05, balanced_below=1.1)


@pytest.mark.slow
def test_learns_and_balances_long() -> None:
    # measured: loss 2.8e-6; max/mean 1.184 without, 1.015 with gamma = 0.01
    _check(steps=400, loss_below=1e-3, balanced_below=1.05)
