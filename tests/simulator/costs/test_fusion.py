"""Bytes of the memory-bound kernels as eager and as fused kernels move them, the FP32 loss's bytes and what
selective recompute redoes: on the tiny MoE model, each figure worked out by hand from its tensor shapes."""

from __future__ import annotations

import pytest
import torch

from moeplan.simulator.costs.elementwise import (
    KERNEL_CLASSES,
    end_bytes_per_token,
    fp32_loss_bytes_per_token,
    layer_bytes_per_token,
    selective_recompute_bytes_per_token,
)
from moeplan.simulator.presets.models import deepseek_v2_lite, deepseek_v3, tiny_dense, tiny_moe

# tiny_moe: h 64, 4 heads, q latent 32, kv latent 16, RoPE dim 8, v head 16, expert width 32, top-4 of 16
# experts and 1 shared, vocabulary 512. FP8 tile: 1 byte + a 4-byte scale per 128 values.
TILE = 1 + 4 / 128
FP8_INPUTS = 2 * 64 + 32 + 16 + 4 * 16  # the FP8 linears' input widths: 240


def test_eager_bytes_are_the_classes_table():
    b = layer_bytes_per_token(tiny_moe(), True, "fp8", 4)
    assert (b["fp8_cast"].fwd_bytes, b["fp8_cast"].bwd_bytes) == (pytest.approx((2 + TILE) * 240),
                                                                  pytest.approx(2 * (2 + TILE) * 240))
    assert (b["swiglu"].fwd_bytes, b["swiglu"].bwd_bytes) == (6 * 32 * 5, 10 * 32 * 5)  # 4 routed + 1 shared rows
    assert (b["permute"].fwd_bytes, b["combine"].fwd_bytes, b["combine"].bwd_bytes) == (640, 640, 1152)
    assert b["rope"].fwd_bytes == 2 * 2 * 5 * 8 + 2 * 4 * 8 / 2  # 4 query heads + the shared key; cos, sin
    # q's and k's no-RoPE parts (4 heads x 16) read and written, the rotated key written to 3 more heads;
    # backward the same, and kv_b_proj's gradient (4 heads x (16 + 16)) put together from k's and v's
    assert (b["qk_cat"].fwd_bytes, b["qk_cat"].bwd_bytes) == (2 * (4 * 4 * 16 + 3 * 8),
                                                              2 * (4 * 4 * 16 + 3 * 8) + 2 * 2 * 4 * 32)
    assert (b["router"].fwd_bytes, b["router"].bwd_bytes) == (2 * 4 * 16 + 12 * 4, 2 * 4 * 16 + 4 * 4)
    assert layer_bytes_per_token(tiny_moe(), True, "fp8", 4, dispatch=True) == b  # eager: dispatch changes nothing


def test_fused_kernels_move_one_read_and_one_write_of_what_they_touch():
    m = tiny_moe()
    eager = layer_bytes_per_token(m, True, "fp8", 4)
    fused = layer_bytes_per_token(m, True, "fp8", 4, fusion="fused", dispatch=True)
    # cast with transpose: x (forward) and dy (backward) each read once, written as 1x128 and as 128x1
    # transposed tiles; eager casts x 1x128 forward, then dy 1x128 and x 128x1 again backward
    assert fused["fp8_cast"].bwd_bytes == pytest.approx((2 + 2 * TILE) * FP8_INPUTS)
    assert fused["fp8_cast"].fwd_bytes == pytest.approx((2 + 2 * TILE) * FP8_INPUTS)
    assert eager["fp8_cast"].fwd_bytes + eager["fp8_cast"].bwd_bytes == pytest.approx(3 * (2 + TILE) * FP8_INPUTS)
    # the routed experts' FP8 backward: both output gradients cast with transpose, the rows gathered again 128x1
    # (tiny_moe: hidden 64, expert width 32, 4 rows a token), whatever the fusion
    assert fused["expert_cast"] == eager["expert_cast"]
    assert (eager["expert_cast"].fwd_bytes, eager["expert_cast"].bwd_bytes) == (
        0.0, pytest.approx(4 * ((2 + 2 * TILE) * (64 + 2 * 32) + (2 + TILE) * 64)))
    assert "expert_cast" not in layer_bytes_per_token(m, True, "bf16", 4)
    assert "expert_cast" not in layer_bytes_per_token(m, False, "fp8", 0)
    # SwiGLU writes the down-projection's FP8 input: read gate and up (4 B), write e4m3 + scale
    assert fused["swiglu"].fwd_bytes == pytest.approx((4 + TILE) * 32 * 5)
    assert fused["swiglu"].bwd_bytes == eager["swiglu"].bwd_bytes
    # the permutation and the combine run inside the all-to-all kernels
    assert "permute" not in fused and "combine" not in fused
    for same in ("rms_norm", "latent_norm", "residual_add", "router"):
        assert fused[same] == eager[same], same
    # MLA's compiled RoPE kernel also puts the query and the key together: one class with both's bytes
    assert "qk_cat" not in fused
    assert fused["rope"].fwd_bytes == eager["rope"].fwd_bytes + eager["qk_cat"].fwd_bytes
    bf16 = layer_bytes_per_token(m, True, "bf16", 4, fusion="fused", dispatch=True)
    bf16_eager = layer_bytes_per_token(m, True, "bf16", 4)
    assert bf16["rope"].bwd_bytes == bf16_eager["rope"].bwd_bytes + bf16_eager["qk_cat"].bwd_bytes
    # with an FP8 backward the output gradients' casts read the attention's gradients where they lie
    # (kernels.mla_backward): left is the shared key's RoPE backward, its H = 4 heads' R = 8 channels of d k summed
    # (read 2 B each, write R in BF16) with cos and sin (4 B each, R / 2 of each)
    assert fused["rope"].bwd_bytes == pytest.approx(2 * (4 * 8 + 8) + 2 * 4 * 4)
    assert fused["rope"].bwd_bytes < eager["rope"].bwd_bytes


def test_without_a_dispatch_the_fused_run_still_permutes_and_a_bf16_swiglu_writes_bf16():
    m = tiny_moe()
    local = layer_bytes_per_token(m, True, "bf16", 4, fusion="fused", dispatch=False)
    eager = layer_bytes_per_token(m, True, "bf16", 4)
    assert local["permute"] == eager["permute"] and local["combine"] == eager["combine"]
    assert local["swiglu"] == eager["swiglu"] and "fp8_cast" not in local
    dense = layer_bytes_per_token(m, False, "fp8", 0, fusion="fused")
    assert dense["swiglu"].fwd_bytes == pytest.approx((4 + TILE) * 128)  # intermediate_size 128


@pytest.mark.parametrize("model", [deepseek_v3, deepseek_v2_lite, tiny_moe, tiny_dense])
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("moe", [False, True])
def test_fusion_never_moves_more_bytes(model, precision, moe):
    m = model()
    rows = m.num_experts_per_tok if moe else 0
    eager = layer_bytes_per_token(m, moe, precision, rows)
    assert set(eager) <= set(KERNEL_CLASSES)
    if "qk_cat" in eager:  # fused, one kernel does RoPE and MLA's assembly: compare with the two together
        cat = eager.pop("qk_cat")
        eager["rope"] = type(cat)(eager["rope"].fwd_bytes + cat.fwd_bytes, eager["rope"].bwd_bytes + cat.bwd_bytes)
    for dispatch in (False, True):
        fused = layer_bytes_per_token(m, moe, precision, rows, fusion="fused", dispatch=dispatch)
        assert set(fused) <= set(eager)
        for k, b in fused.items():
            if k == "fp8_cast":  # cast with transpose writes x's 128x1 copy in the forward, not the backward
                assert b.fwd_bytes + b.bwd_bytes < eager[k].fwd_bytes + eager[k].bwd_bytes, dispatch
                continue
            assert b.fwd_bytes <= eager[k].fwd_bytes and b.bwd_bytes <= eager[k].bwd_bytes, (k, dispatch)


def test_the_fp32_loss_moves_its_softmaxes_in_fp32():
    v = tiny_moe().vocab_size
    fp32, one_pass = fp32_loss_bytes_per_token(tiny_moe()), end_bytes_per_token(tiny_moe())["cross_entropy"]
    assert fp32.fwd_bytes == (2 + 4) * v  # log_softmax: read BF16, write FP32
    assert fp32.bwd_bytes == (2 + 4) * v + (4 + 2) * v  # softmax again; the scaled gradient written in BF16
    assert (one_pass.fwd_bytes, one_pass.bwd_bytes) == (2 * v, 4 * v)


def test_selective_recompute_redoes_only_what_is_not_stored():
    m = tiny_moe()
    layer = layer_bytes_per_token(m, True, "fp8", 4)
    redo = selective_recompute_bytes_per_token(m, layer, "fp8")
    assert redo == {
        "rms_norm": 4 * 64,  # the attention's input norm (the MLP's normed input is kept)
        "latent_norm": 4 * (32 + 16),
        "rope": 2 * 2 * 4 * 8 + 2 * 4 * 8 / 2,  # q's RoPE: the 4 query heads, cos and sin
        "qk_cat": 2 * 2 * 4 * 16,  # q's no-RoPE part copied beside it again
        "fp8_cast": pytest.approx((2 + TILE) * (32 + 16)),  # the up-projections' inputs
        "swiglu": 6 * 32 * 5,
    }
    fused = layer_bytes_per_token(m, True, "fp8", 4, fusion="fused", dispatch=True)
    fused_redo = selective_recompute_bytes_per_token(m, fused, "fp8")
    assert fused_redo["swiglu"] == pytest.approx((4 + TILE) * 160)
    assert "qk_cat" not in fused_redo and fused_redo["rope"] == redo["rope"] + redo["qk_cat"]  # one kernel
    gqa = selective_recompute_bytes_per_token(tiny_dense(), layer_bytes_per_token(tiny_dense(), False, "bf16", 0), "bf16")
    assert gqa == {"rms_norm": 4 * 64, "swiglu": 6 * 160}  # no latents, no up-projections


def test_the_adds_where_tensors_fork_and_the_router_casts_are_residual_add():
    """``residual_ops``: forward the 2 residuals and routed + shared; backward the 2 residual forks, MLA's normed
    input (q and kv), a MoE layer's normed input (router, routed, shared: 2 sums) and the shared expert's (gate,
    up), or a dense MLP's; the router's FP32 copy each way. 6 B a value each, h = 64 on the tiny model."""
    from moeplan.orchestrator.calibration.memory_cases import CASES
    from moeplan.simulator.costs.elementwise import residual_ops

    m = tiny_moe()
    assert residual_ops(m, True) == (3, 6, 1) and residual_ops(m, False) == (2, 4, 0)
    assert residual_ops(m.model_copy(update={"n_shared_experts": 0}), True) == (2, 4, 1)
    assert residual_ops(tiny_dense(), False) == (2, 3 + tiny_dense().is_mla, 0)
    for fusion in ("eager", "fused"):
        b = layer_bytes_per_token(m, True, "fp8", 4, fusion)["residual_add"]
        assert (b.fwd_bytes, b.bwd_bytes) == (4 * 6 * 64, 7 * 6 * 64)
    case = next(c for c in CASES if c.kernel == "residual_add")  # what calibrate times at these bytes
    fwd, bwd = case.build(m, 8, "cpu")
    (sums, casts), (grad_sums, back) = fwd(), bwd()
    assert (len(sums), len(casts), len(grad_sums), len(back)) == (3, 1, 6, 1)
    assert casts[0].dtype == torch.float32 and back[0].dtype == torch.bfloat16
