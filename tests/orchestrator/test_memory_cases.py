"""The memory-bound cases of ``benchmarks/elementwise_bench.py`` and ``moeplan calibrate``: the fused router's and
the FP8 weights' quantisation's bytes are the ones the simulator prices them at; on a GPU both run."""

from __future__ import annotations

import pytest
import torch

from moeplan.orchestrator.calibration.memory_cases import CASES, weight_quant_params
from moeplan.orchestrator.calibration.memory_classes import case_bytes, class_bytes, measure
from moeplan.simulator.costs.elementwise import WEIGHT_QUANT, fp8_weight_quant_bytes
from moeplan.simulator.engine.unit_costs import fp8_weight_params
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe

TABLE = {c.kernel: c for c in CASES if c.in_table}


@pytest.mark.parametrize("model", [deepseek_v3, tiny_moe])
def test_the_weight_quantisation_case_is_one_moe_layer_on_one_gpu_whatever_the_tokens(model):
    m = model()
    moe_layer = next(i for i in range(m.num_hidden_layers) if m.is_moe_layer(i))
    experts = min(32, m.n_routed_experts)  # V3's 256 at EP = 8; tiny_moe's 16, all
    params = weight_quant_params(m)
    assert params == fp8_weight_params(m, [moe_layer], ep=m.n_routed_experts / experts)
    case = TABLE[WEIGHT_QUANT]
    for tokens in (64, 4096):
        nbytes = case_bytes(case, m, tokens)
        assert nbytes.fwd_bytes == fp8_weight_quant_bytes(params, transposed=True) and nbytes.bwd_bytes == 0.0


def test_the_fused_router_moves_the_routers_bytes_per_token():
    m = deepseek_v3()
    per_token = class_bytes(m)
    assert per_token["fused_router"] == per_token["router"]
    got, router = case_bytes(TABLE["fused_router"], m, 4096), per_token["router"]
    assert (got.fwd_bytes, got.bwd_bytes) == (4096 * router.fwd_bytes, 4096 * router.bwd_bytes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_compiled_router_and_the_weight_quantisation_are_timed():
    m, dev = tiny_moe(), torch.device("cuda")
    router = measure(TABLE["fused_router"], m, 64, dev, 3, 3.35e12)
    quant = measure(TABLE[WEIGHT_QUANT], m, 64, dev, 3, 3.35e12)
    assert router["skipped"] is None and router["fwd"]["s"] > 0 and router["bwd"]["s"] > 0
    assert quant["skipped"] is None and quant["fwd"]["s"] > 0 and quant["bwd"] is None
    assert quant["fwd"]["bytes"] == fp8_weight_quant_bytes(weight_quant_params(m), transposed=True)
    assert router["small_tokens"] == 16 and router["fwd"]["fixed_s"] is not None  # per token: two sizes
    assert quant["small_tokens"] is None and quant["fwd"]["fixed_s"] is None  # once a step: one


def test_the_dispatch_plan_case_makes_the_runtime_s_plan_at_its_class_bytes():
    """``dispatch_plan``: the per-expert counts and ``make_pair_plan`` over uniform top-k pairs, as the FP8 experts
    on Hopper plan them (worst-case rows, no host sync), forward only; 32 B a pair and 4 a token."""
    from moeplan.kernels.moe_permute import TILE, worst_case_rows
    from moeplan.orchestrator.calibration.memory_cases import CASES
    from moeplan.orchestrator.calibration.memory_classes import case_bytes
    from moeplan.simulator.presets.models import tiny_moe

    m = tiny_moe()
    case = next(c for c in CASES if c.kernel == "dispatch_plan")
    fwd, bwd = case.build(m, 64, "cpu")
    counts, plan = fwd()
    assert bwd is None and int(counts.sum()) == 64 * m.num_experts_per_tok and plan.rows_bound is not None
    assert plan.src_token.numel() == worst_case_rows(64 * m.num_experts_per_tok, m.n_routed_experts, TILE)
    assert case_bytes(case, m, 64).fwd_bytes == 64 * (32 * m.num_experts_per_tok + 4)
