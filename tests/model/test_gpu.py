"""CUDA checks: torch._grouped_mm experts and the kernels' FP8 GEMMs inside the model (skip without CUDA)."""

from __future__ import annotations

import pytest
import torch

from moeplan.model import ModelOptions, Transformer

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tests.model.hf_reference import derived_spec  # noqa: E402

# widths multiple of 128 so the FP8 kernels see whole tiles; 16-byte rows for _grouped_mm
SPEC = derived_spec(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
                    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def _pair(options_a: ModelOptions, options_b: ModelOptions):
    a = Transformer(SPEC, options_a).cuda()
    a.init_weights(torch.Generator().manual_seed(0))
    b = Transformer(SPEC, options_b).cuda()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, SPEC.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()
    return a, b, ids


def _rel(x, y) -> float:
    return float((x.detach().float() - y.detach().float()).norm() / y.detach().float().norm())


def test_grouped_mm_matches_reference_on_cuda() -> None:
    a, b, ids = _pair(ModelOptions(dtype=torch.bfloat16, expert_backend="grouped_mm"),
                      ModelOptions(dtype=torch.bfloat16, expert_backend="reference"))
    out_a, out_b = a(ids), b(ids)
    assert _rel(out_a.logits, out_b.logits) < 1e-2
    out_a.logits.float().square().mean().backward()
    out_b.logits.float().square().mean().backward()
    ga, gb = a.layers["1"].mlp.experts.down_proj.grad, b.layers["1"].mlp.experts.down_proj.grad
    assert _rel(ga, gb) < 2e-2


def test_kernels_gemms_match_the_reference_gemms() -> None:
    pytest.importorskip("triton")
    from moeplan.model.fp8 import (
        kernel_ops,
        quantize_blocks,
        quantize_tiles,
        reference_fp8_gemm,
        reference_fp8_grouped_gemm,
    )

    ops = kernel_ops()
    dense, grouped = ops.gemm, ops.grouped
    gen = torch.Generator().manual_seed(3)
    a, w = torch.randn(200, 256, generator=gen).cuda(), torch.randn(384, 256, generator=gen).cuda()
    aq, sa = quantize_tiles(a, 128)
    wq, sw = quantize_blocks(w, 128)
    assert _rel(dense(aq, sa, wq, sw, out_dtype=torch.float32), reference_fp8_gemm(aq, sa, wq, sw, torch.float32)) < 1e-3
    we = torch.randn(4, 384, 256, generator=gen).cuda()
    weq, swe = quantize_blocks(we, 128)
    offs = torch.tensor([50, 50, 170, 200], dtype=torch.int32, device="cuda")
    got = grouped(aq, sa, weq, swe, offs, out_dtype=torch.float32)
    assert _rel(got, reference_fp8_grouped_gemm(aq, sa, weq, swe, offs, torch.float32)) < 1e-3


def test_kernels_fp8_matches_reference_fp8() -> None:
    pytest.importorskip("triton")
    fp8 = dict(dtype=torch.bfloat16, linear_precision="fp8", expert_backend="fp8")
    a, b, ids = _pair(ModelOptions(**fp8, fp8_kernel="kernels"), ModelOptions(**fp8, fp8_kernel="reference"))
    bf16, _, _ = _pair(ModelOptions(dtype=torch.bfloat16), ModelOptions(dtype=torch.bfloat16))
    bf16.load_state_dict(a.state_dict())
    with torch.no_grad():
        la, lb, lref = a(ids).logits, b(ids).logits, bf16(ids).logits
    # same quantisation, different GEMM (summation order, bf16 rounding): the GEMMs agree to ~1e-4 above;
    # through 4 layers of bf16 activations and top-k routing (a few flipped choices) the logits drift more
    assert _rel(la, lb) < 0.05
    assert _rel(la, lref) < 0.1


def test_fp8_step_on_the_kernels_syncs_once_per_moe_layer() -> None:
    """A forward and backward on our kernels (FP8 forward and backward) waits for the GPU only where
    planned: once per MoE layer, for the experts' row counts. Counted with torch's sync debug mode
    after a warm-up step (the first call of each GEMM shape times its backends)."""
    pytest.importorskip("triton")
    import warnings

    options = ModelOptions(dtype=torch.bfloat16, linear_precision="fp8", expert_backend="fp8", fp8_kernel="kernels",
                           fp8_backward=True)
    model, _, ids = _pair(options, options)
    from moeplan.model.moe import MoE

    moe_layers = sum(isinstance(module, MoE) for module in model.modules())  # MTP's included

    def step() -> None:
        model(ids).logits.float().square().mean().backward()

    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch 2.11 also warns, once, that the debug mode is a prototype: count only the syncs it reports
    syncs = [str(w.message) for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert moe_layers >= 1 and len(syncs) <= moe_layers, syncs
