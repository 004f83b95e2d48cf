"""Tensor and sequence parallelism in the accounting: parameters per TP rank, activations (Korthikanti et
al. 2022, Table 2), and the layout checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.accounting.activations import layer_activation_bytes_per_token
from moeplan.simulator.accounting.layout import LayoutError, Stage, check_layout
from moeplan.simulator.accounting.memory import rank_memory, rank_params
from moeplan.simulator.accounting.params import param_counts
from moeplan.simulator.accounting.tensor_parallel import layer_activation_bytes_per_token_tp, shard_rows
from moeplan.simulator.presets.clusters import h800
from moeplan.simulator.presets.models import deepseek_67b, deepseek_v2_lite, deepseek_v3, tiny_dense, tiny_moe
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import OptimizerSpec


def _whole(m: ModelSpec) -> list[Stage]:
    units = m.num_hidden_layers + m.num_nextn_predict_layers
    return [Stage(0, tuple(range(units)), has_embedding=True, has_head=True)]


def _dense_total(m: ModelSpec) -> int:
    """Every parameter but the routed experts, MTP included (one stage holds the whole model)."""
    c = param_counts(m)
    return c.total_with_mtp - c.routed_experts - c.mtp_routed_experts


def _sum_over_tp_ranks(m: ModelSpec, tp: int) -> int:
    """The TP group's parameters: each rank's split share, plus the replicated ones once."""
    ranks = [rank_params(m, _whole(m), ep=1, tp=tp, tp_rank=r) for r in range(tp)]
    assert len({r.tp_replicated for r in ranks}) == 1  # every rank holds the same whole weights
    return sum(r.dense - r.tp_replicated for r in ranks) + ranks[0].tp_replicated


@pytest.mark.parametrize("model", [deepseek_67b(), deepseek_v3(), deepseek_v2_lite(), tiny_dense(), tiny_moe()],
                         ids=lambda m: m.name)
@pytest.mark.parametrize("tp", [1, 2])
def test_presets_params_per_tp_rank_sum_back_to_the_total(model, tp):
    assert rank_params(model, _whole(model), ep=1).dense == _dense_total(model)
    assert _sum_over_tp_ranks(model, tp) == _dense_total(model)


@settings(max_examples=60, deadline=None)
@given(heads=st.sampled_from([8, 16, 32]), kv_div=st.sampled_from([1, 2, 4, 8]), tp=st.sampled_from([1, 2, 4, 8]),
       vocab=st.integers(100, 5000), inter=st.integers(1, 64), mla=st.booleans(), bias=st.booleans())
def test_params_per_tp_rank_sum_back_to_the_total(heads, kv_div, tp, vocab, inter, mla, bias):
    """Any head count, KV heads, vocabulary (padded unevenly) and MLA or GQA: the split parts of the TP ranks
    and the replicated part once add up to the model."""
    if mla:
        m = deepseek_v2_lite().model_copy(update={"num_attention_heads": heads, "vocab_size": vocab, "hidden_size": 64,
                                                  "intermediate_size": 8 * inter, "attention_bias": bias})
    else:
        m = tiny_dense().model_copy(update={"num_attention_heads": heads, "num_key_value_heads": max(1, heads // kv_div),
                                           "head_dim": 8, "vocab_size": vocab, "intermediate_size": 8 * inter,
                                           "attention_bias": bias})
    if not mla and m.kv_heads % tp:
        return
    assert _sum_over_tp_ranks(m, tp) == _dense_total(m)
    assert sum(shard_rows(vocab, tp, r) for r in range(tp)) == vocab


def test_67b_at_tp8_holds_an_eighth_of_its_split_matrices():
    m, tp = deepseek_67b(), 8
    whole = rank_params(m, _whole(m), ep=1)
    split = rank_params(m, _whole(m), ep=1, tp=tp)
    norms = m.num_hidden_layers * 2 * m.hidden_size + m.hidden_size  # the only whole weights of a Llama model
    assert split.tp_replicated == norms
    assert split.dense - norms == (whole.dense - norms) // tp


def _korthikanti_bytes_per_token(h: int, t: int, sp: bool, replicated: float, split: float) -> float:
    """Korthikanti et al. 2022, Table 2, per token (divide by ``sb``): tensor parallel without SP keeps
    ``h (c_rep + c_split / t)``, with SP ``h (c_rep + c_split) / t``. The paper's GPT layer has
    ``c_rep = 10`` (4 layer-norm input bytes, the QKV and MLP inputs, 2 dropout masks) and
    ``c_split = 24 + 5as/h``."""
    return h * (replicated + split) / t if sp else h * (replicated + split / t)


def test_paper_formula_with_the_papers_own_constants():
    """Table 2 for the paper's 22B model (h 6144, a 64, s 2048, t 8): 10 + 24/t + 5as/(ht) and (34 + 5as/h)/t."""
    h, a, s, t = 6144, 64, 2048, 8
    no_sp = _korthikanti_bytes_per_token(h, t, False, 10, 24 + 5 * a * s / h)
    sp = _korthikanti_bytes_per_token(h, t, True, 10, 24 + 5 * a * s / h)
    assert no_sp == pytest.approx(h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert sp == pytest.approx(h * (34 + 5 * a * s / h) / t)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
def test_activation_bytes_follow_table_2_for_a_known_case(tp, sp):
    """An MHA dense model in BF16 without recompute. Our layer keeps (accounting.activations) the two norm
    inputs and the two normed inputs of the first linears, 2h bytes each (the paper's ``10``, without its
    two 1-byte dropout masks: ``c_rep = 8``); split by heads or width: q, k, v (6h), the attention output
    (2h), the flash-attention log-sum-exp (4 bytes per head) and the SwiGLU gate, up and product (6I); no
    ``5as/h`` score term (flash attention)."""
    if sp and tp == 1:
        return
    h, a, inter = 64, 8, 160
    m = tiny_dense().model_copy(update={"hidden_size": h, "num_attention_heads": a, "num_key_value_heads": a,
                                       "head_dim": h // a, "intermediate_size": inter})
    expected = _korthikanti_bytes_per_token(h, tp, sp, 8, 8 + 6 * inter / h + 4 * a / h)
    assert layer_activation_bytes_per_token_tp(m, 0, "bf16", "none", tp, sp) == pytest.approx(expected, rel=1e-12)
    assert layer_activation_bytes_per_token(m, 0, "bf16", "none") == pytest.approx(h * (16 + 6 * inter / h + 4 * a / h))


def test_sp_divides_every_activation_and_no_sp_keeps_the_width_h_ones():
    m = deepseek_v3()
    for unit in (0, 5, m.num_hidden_layers):
        whole = layer_activation_bytes_per_token(m, unit, "fp8", "selective")
        assert layer_activation_bytes_per_token_tp(m, unit, "fp8", "selective", 8, True) == pytest.approx(whole / 8)
        no_sp = layer_activation_bytes_per_token_tp(m, unit, "fp8", "selective", 8, False)
        assert whole / 8 < no_sp < whole


def test_rank_memory_at_tp8_sp_is_smaller_on_every_count():
    m, opt = deepseek_67b(), OptimizerSpec()
    base = ParallelSpec(pp=8, schedule="1f1b", seq_len_tokens=4096, micro_batch_size=1)
    one = rank_memory(m, base, opt, "bf16", 64, 0, 64)
    tp8 = rank_memory(m, base.model_copy(update={"tp": 8, "sp": True}), opt, "bf16", 8, 0, 64)
    assert tp8.activation_bytes == pytest.approx(one.activation_bytes / 8)  # SP: every activation / t
    assert tp8.param_bytes < one.param_bytes / 7.9 and tp8.optimizer_bytes > one.optimizer_bytes / 8  # ZeRO over dp=8
    assert tp8.transient_bytes == pytest.approx(one.transient_bytes / 8, rel=1e-4)  # vocabulary-parallel logits


@pytest.mark.parametrize(("model", "update", "message"), [
    (tiny_dense(), {"tp": 4}, "tp=4 must divide num_key_value_heads=2"),
    (deepseek_67b(), {"tp": 8, "cp": 2}, "tp=8 with cp=2: tensor and context parallelism together are not modelled"),
    (deepseek_v3(), {"tp": 2, "ep": 64}, "tp=2 with routed experts needs sp=true"),
    (deepseek_67b(), {"tp": 8, "pp": 512}, "tp=8 does not divide the 1 GPUs left by pp=512"),
])
def test_layouts_tp_cannot_run_name_the_value(model, update, message):
    par = ParallelSpec(**{"seq_len_tokens": 4096, **update})
    with pytest.raises(LayoutError, match=message):
        check_layout(model, h800(64), par)


def test_tp_beyond_a_node_and_sp_without_tp_are_refused():
    small_nodes = h800(64).model_copy(update={"node": h800(64).node.model_copy(update={"gpus_per_node": 4})})
    with pytest.raises(LayoutError, match=r"tp=8 must divide the 4 GPUs of a node"):
        check_layout(deepseek_67b(), small_nodes, ParallelSpec(tp=8, sp=True))
    with pytest.raises(ValueError, match="sp=true needs tp > 1"):
        ParallelSpec(sp=True)


def test_ep_is_carved_out_of_dp_times_tp():
    par = ParallelSpec(pp=16, tp=8, sp=True, ep=64, schedule="dualpipe")
    assert check_layout(deepseek_v3(), h800(256), par) == 16  # 2048 / (16 x 8); EP64 inside the 128 GPUs of a stage
