"""Aux-loss-free bias update, schedules, the sequence-wise balance loss and the load file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeplan.model import BalanceSchedule, ExpertBiasUpdater, ModelOptions, Transformer
from moeplan.model.balance import bias_step, max_over_mean
from moeplan.model.gate import Routing
from moeplan.model.load_record import LoadAccumulator, load_record, write_load_file
from moeplan.model.moe import sequence_balance_loss
from moeplan.simulator.contracts.expert_load import ExpertLoadRecord
from moeplan.simulator.presets.recipes import deepseek_v3_recipe
from tests.model.hf_reference import derived_spec


def test_bias_step_signs() -> None:
    bias = torch.zeros(4)
    new = bias_step(bias, torch.tensor([10, 2, 4, 4]), gamma=0.001)  # mean 5
    torch.testing.assert_close(new, torch.tensor([-0.001, 0.001, 0.001, 0.001]))
    torch.testing.assert_close(bias_step(bias, torch.tensor([3, 3, 3, 3]), 0.1), bias)  # balanced: unchanged
    assert max_over_mean(torch.tensor([10, 2, 4, 4])) == 2.0


def test_schedule_matches_the_report() -> None:
    s = BalanceSchedule.from_training(deepseek_v3_recipe().training)
    assert s.gamma(0) == 0.001 and s.gamma(14.29e12) == 0.001 and s.gamma(14.3e12) == 0.0
    assert s.mtp_weight(0) == 0.3 and s.mtp_weight(9.9e12) == 0.3 and s.mtp_weight(10e12) == 0.1


def test_updater_counts_whole_batch_and_resets() -> None:
    spec = derived_spec()
    model = Transformer(spec, ModelOptions(dtype=torch.float32)).train()
    model.init_weights(torch.Generator().manual_seed(0))
    updater = ExpertBiasUpdater(model.moe_layers())
    assert sorted(updater.moe_layers) == [1, 2, 3, 4]  # 4 = the MTP layer (checkpoint numbering)
    ids = torch.randint(0, spec.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    model(ids)
    model(ids)
    loads = updater.step(gamma=0.01)
    assert loads[1].sum() == 2 * 3 * 8 * spec.num_experts_per_tok  # two forwards of 24 tokens, k each
    assert loads[4].sum() == 2 * 3 * 7 * spec.num_experts_per_tok  # MTP depth 1 sees T-1 positions
    bias = model.layers["1"].mlp.gate.e_score_correction_bias
    torch.testing.assert_close(bias, 0.01 * torch.sign(loads[1].float().mean() - loads[1].float()))
    assert all(int(m.tokens_per_expert.sum()) == 0 for m in updater.moe_layers.values())
    assert all(p.grad is None for p in model.parameters())  # bias is not a gradient-trained parameter
    assert "layers.1.mlp.gate.e_score_correction_bias" not in dict(model.named_parameters())


def _routing(indices: list[list[int]], scores: torch.Tensor) -> Routing:
    idx = torch.tensor(indices)
    return Routing(weights=scores.gather(1, idx), indices=idx, scores=scores)


def test_sequence_balance_loss_closed_forms() -> None:
    # Uniform affinities, each expert chosen equally often: f_i = 1, P_i = 1/E -> sum = 1.
    scores = torch.full((4, 4), 0.5)
    assert math.isclose(float(sequence_balance_loss(_routing([[0, 1], [2, 3], [0, 1], [2, 3]], scores), 1, 4, 4, 2)), 1.0)
    # All tokens on experts 0 and 1 whose normalised affinity is 0.5 each: f = (2, 2, 0, 0), P = (.5, .5, 0, 0) -> 2.
    skew = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4)
    assert math.isclose(float(sequence_balance_loss(_routing([[0, 1]] * 4, skew), 1, 4, 4, 2)), 2.0)


def test_balance_loss_reaches_the_router_through_the_output_gradient() -> None:
    spec = derived_spec(aux_loss_alpha=0.5)
    model = Transformer(spec, ModelOptions(dtype=torch.float32, with_mtp=False)).train()
    model.init_weights(torch.Generator().manual_seed(2))
    ids = torch.randint(0, spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    out = model(ids)
    (out.logits * 0).sum().backward()  # the LM term contributes nothing: only L_Bal drives the gate
    grad = model.layers["1"].mlp.gate.weight.grad
    assert grad is not None and grad.abs().max() > 0
    assert model.layers["1"].mlp.last_balance_loss > 0


def test_load_file_is_the_simulators_format(tmp_path) -> None:
    loads = {1: torch.tensor([5, 3, 0, 8]), 61: torch.tensor([4, 4, 4, 4])}
    acc = LoadAccumulator()
    acc.add(10, loads)
    acc.add(11, loads)
    record = load_record("tiny", acc.totals, top_k=2, step_start=acc.step_start, step_end=acc.step_end)
    path = tmp_path / "load.json"
    write_load_file(path, record)
    parsed = ExpertLoadRecord.model_validate_json(path.read_text())  # the placement schema
    assert parsed.schema_version == 1 and parsed.layer_ids == [1, 61] and parsed.window_tokens == 16
    assert parsed.weight().tolist() == [[10, 6, 0, 16], [8, 8, 8, 8]]
    assert (parsed.step_start, parsed.step_end) == (10, 11)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ValueError, match="different expert counts"):
        load_record("tiny", {1: torch.zeros(4), 2: torch.zeros(5)}, top_k=2)
    assert json.loads(path.read_text())["layers"][0]["tokens_per_expert"] == [10, 6, 0, 16]
