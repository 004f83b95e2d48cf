"""``calibrate``'s pieces timed whole on a CPU (``host_ops.time_pieces``): the engine's op names for every layer
kind, the MoE half left out under expert parallelism, the pieces built with the model's own initialisation (a
piece built alone holds ``torch.empty`` weights), and tables that carry them as measured ops."""

from __future__ import annotations

import math

import torch

from moeplan.model.block import Block, LayerFactory
from moeplan.model.options import ModelOptions
from moeplan.orchestrator.calibration.host_ops import _initialised, time_pieces
from moeplan.simulator.costs.measured_ops import MEASURABLE_OPS
from moeplan.simulator.presets.models import tiny_moe


def test_every_piece_is_timed_under_the_engines_op_names():
    spec = tiny_moe()
    ops = time_pieces(spec, 1, 16, torch.float32, torch.device("cpu"), 2, "[T]")
    keys = {(o.layer_kind, o.action, o.op) for o in ops}
    assert {("dense", "F", "attn"), ("dense", "B", "attn-bwd"), ("dense", "F", "mlp"), ("dense", "B", "mlp-bwd"),
            ("moe", "F", "attn"), ("moe", "F", "experts"), ("moe", "B", "experts-bwd"), ("mtp", "F", "attn"),
            ("mtp", "F", "experts"), ("ends", "F", "head"), ("ends", "B", "head")} <= keys
    assert all(o.op in MEASURABLE_OPS[o.action] and o.tokens == 16 and o.seq_len == 16 for o in ops)
    timed = [o for o in ops if o.op not in ("shared", "shared-bwd")]  # the shared expert: inside the experts' time
    assert all(math.isfinite(o.s) and o.s > 0 for o in timed)
    assert all(o.s == 0.0 for o in ops if o.op in ("shared", "shared-bwd"))
    ep = time_pieces(spec, 1, 16, torch.float32, torch.device("cpu"), 2, "[T]", expert_parallel=True)
    assert not any(o.op.startswith("experts") for o in ep) and any(o.op == "attn" for o in ep)


def test_a_piece_built_alone_gets_the_models_initialisation():
    spec = tiny_moe()
    block = Block(1, LayerFactory.create(spec, ModelOptions(dtype=torch.float32)))
    _initialised(block, spec)
    for name, p in block.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.dim() >= 2:
            assert 0.5 * spec.initializer_range < float(p.std()) < 2 * spec.initializer_range, name
