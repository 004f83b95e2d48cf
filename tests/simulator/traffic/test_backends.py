"""EP backends (``flat`` vs ``deepep``) and the payload rule: hand cases, one-node equality, recorded routings,
and the plan inputs that choose them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.engine.build import step_inputs, wire_payload
from moeplan.simulator.placement.maps import contiguous_placement
from moeplan.simulator.presets.clusters import h800
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec
from moeplan.simulator.traffic.all_to_all import WirePayload, recorded_layer, traffic_from_hits

MODEL = tiny_moe()  # 16 experts in 4 groups, top-2 groups, top-4 experts, hidden 64


def test_flat_sends_every_copy_straight_to_its_gpu() -> None:
    # 2 nodes x 2 GPUs; only node 0 sends (the deepep hand case of test_all_to_all)
    gpu_hits = np.array([[5, 3, 4, 2], [1, 6, 7, 0], [0] * 4, [0] * 4], dtype=float)
    node_hits = np.array([[6, 5], [6, 7], [0, 0], [0, 0]], dtype=float)
    nvlink, ib = traffic_from_hits(gpu_hits, node_hits, gpus_per_node=2, backend="flat")
    expected_ib = np.zeros((4, 4))
    expected_ib[0, 2:] = (4, 2)  # once per target GPU on node 1, no forwarder
    expected_ib[1, 2:] = (7, 0)
    expected_nvlink = np.zeros((4, 4))
    expected_nvlink[0, 1], expected_nvlink[1, 0] = 3, 1
    np.testing.assert_array_equal(ib, expected_ib)
    np.testing.assert_array_equal(nvlink, expected_nvlink)
    _, deepep_ib = traffic_from_hits(gpu_hits, node_hits, gpus_per_node=2)
    assert deepep_ib.sum() == 12 < ib.sum() == 13  # GPU 0's 5 tokens for node 1 would cross IB 6 times flat


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_on_one_node_both_backends_move_the_same_tokens(gpus, seed) -> None:
    rng = np.random.default_rng(seed)
    gpu_hits = rng.integers(0, 50, (gpus, gpus)).astype(float)
    node_hits = gpu_hits.max(axis=1, keepdims=True)
    flat = traffic_from_hits(gpu_hits, node_hits, gpus, "flat")
    deepep = traffic_from_hits(gpu_hits, node_hits, gpus, "deepep")
    for a, b in zip(flat, deepep, strict=True):
        np.testing.assert_array_equal(a, b)
    assert flat[1].sum() == 0


def test_payload_follows_precision_backend_and_element_size() -> None:
    h, k = 7168, 8
    fp8 = WirePayload.of(h, k, "fp8", "deepep")
    assert (fp8.dispatch_bytes, fp8.combine_bytes, fp8.routing_bytes) == (7168 + 56 * 4, 2 * 7168, 0)
    bf16 = WirePayload.of(h, k, "bf16", "deepep")
    assert bf16.dispatch_bytes == bf16.combine_bytes == 2 * 7168  # a BF16 run dispatches BF16 (issue 21, 2)
    flat = WirePayload.of(h, k, "bf16", "flat", activation_bytes=4)
    assert (flat.dispatch_bytes, flat.combine_bytes, flat.routing_bytes) == (4 * 7168, 4 * 7168, 2 * 8 * 4)


def test_recorded_routing_counts_each_gpu_once_per_token() -> None:
    placement = contiguous_placement(1, 16, 1, 2)  # experts 0-7 on GPU 0, 8-15 on GPU 1
    cluster = h800(1).model_copy(update={"node": h800(1).node.model_copy(update={"gpus_per_node": 2})})
    experts = [np.array([[0, 1, 2, 3], [0, 1, 8, 9]]), np.array([[8, 9, 10, 11], [12, 13, 14, 15]])]
    pay = WirePayload.of(64, 4, "bf16", "flat")
    layer = recorded_layer(experts, placement, 0, MODEL, cluster, pay, "flat")
    np.testing.assert_array_equal(layer.nvlink_tokens, [[0, 1], [0, 0]])  # GPU 0's second token, once
    np.testing.assert_array_equal(layer.expert_tokens, [6, 10])
    assert layer.bytes_per_gpu()["routing_nvlink_send"].tolist() == [32, 0]


def _v3_inputs(**parallel) -> PlanInputs:
    par = ParallelSpec(pp=16, ep=64, schedule="dualpipe", seq_len_tokens=4096, **parallel)
    return PlanInputs(model=deepseek_v3(), cluster=h800(256), parallel=par,
                      training=TrainingSpec(phases=(Phase(name="p", tokens=1e12, global_batch_seqs=15360),),
                                            precision="fp8"))


def test_the_plan_inputs_choose_backend_and_payload() -> None:
    tables = default_tables("H800-SXM5")
    deepep, flat = _v3_inputs(), _v3_inputs(ep_backend="flat")
    assert deepep.parallel.ep_backend == "deepep"  # the default keeps DeepSeek's hierarchical path
    assert wire_payload(deepep, tables).dispatch_bytes == 7168 + 56 * 4
    bf16 = deepep.model_copy(update={"training": deepep.training.model_copy(update={"precision": "bf16"})})
    assert wire_payload(bf16, tables).dispatch_bytes == 2 * 7168
    units = {name: next(u for u in step_inputs(inp, 128, 120).stages[1].units if u.moe)
             for name, inp in (("deepep", deepep), ("flat", flat))}
    # EP64 over 8 nodes: each token reaches ~3.4 nodes but ~7 GPUs off its node's 8
    ratio = units["flat"].dispatch_ib_bytes / units["deepep"].dispatch_ib_bytes
    assert 1.5 < ratio < 2.5, ratio
    assert units["flat"].routing_ib_bytes > 0 == units["deepep"].routing_ib_bytes
    with pytest.raises(ValidationError, match="ep_backend"):
        ParallelSpec(ep_backend="nccl")
