"""A unit's recompute, fusion and loss on the tiny MoE model, against figures worked out by hand: selective
recompute re-prices only the ops it names, full recompute the whole forward, the fused kernels and the loss
move the time their bytes say, and a plan records and toggles the settings (``training.kernels``)."""

from __future__ import annotations

import pytest

from moeplan.simulator.costs.kernels import gemm_s
from moeplan.simulator.costs.memory_kernels import MemoryKernelPoint
from moeplan.simulator.costs.tables import CostTables, default_tables
from moeplan.simulator.engine.build import SimOptions, step_inputs
from moeplan.simulator.engine.expert_traffic import ExpertTraffic
from moeplan.simulator.engine.unit_costs import CostContext, end_costs, unit_costs
from moeplan.simulator.planning.predict import predict_step
from moeplan.simulator.presets.clusters import h800_gpu
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.presets.recipes import deepseek_v3_recipe, default_recipe
from moeplan.simulator.spec.training import KernelSpec
from tests.simulator.planning.test_predict import _inputs

TOKENS = 256
TILE = 1 + 4 / 128
# tiny_moe's 4 routed rows a token over 16 experts, 64 rows an expert, each segment padded to 128 rows on the
# contiguous layout (FP8 or fused experts): 8 rows a token (``expert_traffic.padded_rows``)
PADDED = 8


def _tables(*points: MemoryKernelPoint) -> CostTables:
    """H800 tables with no host term or measured ops; classes not given run at memory_frac."""
    return default_tables("H800-SXM5").model_copy(update={"memory_kernels": points})


def _ctx(tables: CostTables, recompute: str = "none", **kw) -> CostContext:
    return CostContext(tables=tables, gpu=h800_gpu(), precision="fp8", tokens=TOKENS, seq_len_tokens=TOKENS,
                       compute_frac=1.0, recompute=recompute, **kw)


def _at_memory_frac(t: CostTables, nbytes: float) -> float:
    return TOKENS * nbytes / (h800_gpu().hbm_bytes_per_s * t.memory_frac)


def test_selective_recompute_is_the_up_projections_and_the_named_ops_forward_once_more():
    t, m = _tables(), tiny_moe()
    unit = unit_costs(_ctx(t, "selective"), m, moe=True, traffic=None)
    g = h800_gpu()
    # q_b: 32 -> 4 heads x 24 (nope 16 + rope 8); kv_b: 16 -> 4 x (16 + 16), forward GEMMs on 256 rows
    up_s = gemm_s(t, g, "fp8", TOKENS, 96, 32) + gemm_s(t, g, "fp8", TOKENS, 128, 16)
    named = (4 * 64  # the attention's input RMSNorm of h = 64
             + 4 * 48  # the q and kv latent norms
             + (2 * 2 * 4 * 8 + 2 * 4 * 8 / 2)  # RoPE of the 4 rebuilt query heads, cos and sin
             + 2 * 2 * 4 * 16  # the rebuilt query's no-RoPE part copied beside it (read and write, 4 heads x 16)
             + (2 + TILE) * 48  # FP8 casts of the up-projections' inputs
             + 6 * 32 * (PADDED + 1))  # SwiGLU over the 4 routed rows padded to 8, + 1 shared, of width 32
    assert unit.recompute_s == pytest.approx(up_s + _at_memory_frac(t, named))
    assert unit_costs(_ctx(t), m, moe=True, traffic=None).recompute_s == 0.0


def test_full_recompute_is_the_whole_forward():
    t, m = _tables(), tiny_moe()
    for moe in (False, True):
        none = unit_costs(_ctx(t), m, moe=moe, traffic=None)
        full = unit_costs(_ctx(t, "full"), m, moe=moe, traffic=None)
        assert full.recompute_s == pytest.approx(none.fwd_s)
        assert full.recompute_s > unit_costs(_ctx(t, "selective"), m, moe=moe, traffic=None).recompute_s


def test_only_the_named_ops_move_selective_recompute():
    m, base = tiny_moe(), _tables()
    f = base.memory_frac
    ref = unit_costs(_ctx(base, "selective"), m, moe=True, traffic=None).recompute_s
    for kernel in ("residual_add", "router", "permute", "combine"):  # not recomputed
        slow = _tables(MemoryKernelPoint(kernel=kernel, fwd_frac=f / 10, source="s"))
        assert unit_costs(_ctx(slow, "selective"), m, moe=True, traffic=None).recompute_s == pytest.approx(ref), kernel
    slow = _tables(MemoryKernelPoint(kernel="swiglu", fwd_frac=f / 2, source="s"))  # twice its forward time
    got = unit_costs(_ctx(slow, "selective"), m, moe=True, traffic=None).recompute_s
    assert got - ref == pytest.approx(_at_memory_frac(base, 6 * 32 * (PADDED + 1)))


def test_fused_rope_and_router_are_priced_at_their_fused_points():
    m, f = tiny_moe(), _tables().memory_frac
    eager_slow = [MemoryKernelPoint(kernel=k, fwd_frac=f / 4, source="eager composite") for k in ("rope", "router")]
    t = _tables(*eager_slow)
    eager = unit_costs(_ctx(t, "selective"), m, moe=True, traffic=None)
    fused = unit_costs(_ctx(t, "selective", fusion="fused"), m, moe=True, traffic=None)
    rope, q_rope = 2 * 2 * 5 * 8 + 32, 2 * 2 * 4 * 8 + 32
    router, router_bwd = 2 * 4 * 16 + 12 * 4, 2 * 4 * 16 + 4 * 4
    swiglu_saved = (6 - 4 - TILE) * 32 * (PADDED + 1)  # the FP8 output
    cast_bwd_saved = 2 * (2 + TILE) * 240 - (2 + 2 * TILE) * 240  # 2 casts -> 1 cast with transpose
    cast_fwd_added = TILE * 240  # the forward casts x with transpose: its 128x1 copy written there, not re-read later
    assert eager.fwd_s - fused.fwd_s == pytest.approx(_at_memory_frac(t, 3 * (rope + router) + swiglu_saved
                                                                      - cast_fwd_added))
    assert eager.recompute_s - fused.recompute_s == pytest.approx(_at_memory_frac(t, 3 * q_rope + swiglu_saved))
    # FP8 backward: the fused runtime's output-gradient casts also do RoPE's backward and the query's and key's
    # split (kernels.mla_backward); left is the shared key's gradient (4 heads' 8 channels of d k summed, cos/sin)
    cat_bwd, key_rope_bwd = 2 * (4 * 4 * 16 + 3 * 8) + 2 * 2 * 4 * (16 + 16), 2 * (4 * 8 + 8) + 32
    glue_in_casts = rope + cat_bwd - key_rope_bwd
    assert (eager.dx_s - eager.recompute_s) - (fused.dx_s - fused.recompute_s) == pytest.approx(
        _at_memory_frac(t, 3 * (rope + router_bwd) + cast_bwd_saved + glue_in_casts))


def test_fp8_weight_quantisation_at_its_measured_class_else_at_the_copy_bandwidth():
    """``WEIGHT_QUANT`` priced at its own point where the tables measured it; without one at ``memory_frac``, as
    before the class (the packaged tables), whatever ``fp8_cast`` measured (no stand-in)."""
    from moeplan.simulator.costs.elementwise import WEIGHT_QUANT, fp8_weight_quant_bytes
    from moeplan.simulator.engine.unit_costs import fp8_weight_params, fp8_weight_quant_s

    m, g = tiny_moe(), h800_gpu()
    nbytes = fp8_weight_quant_bytes(fp8_weight_params(m, [1], ep=2), transposed=True)
    bare = _tables(MemoryKernelPoint(kernel="fp8_cast", fwd_frac=0.1, source="casts"))
    at_copy = nbytes / (g.hbm_bytes_per_s * bare.memory_frac)
    assert fp8_weight_quant_s(_ctx(bare), m, [1], ep=2) == pytest.approx(at_copy)
    measured = _tables(MemoryKernelPoint(kernel=WEIGHT_QUANT, fwd_frac=0.5, source="quant_weight_128x128"))
    assert fp8_weight_quant_s(_ctx(measured), m, [1], ep=2) == pytest.approx(nbytes / (g.hbm_bytes_per_s * 0.5))


def test_the_loss_fp32_as_measured_or_by_its_bytes_and_fused_in_one_pass():
    m, g = tiny_moe(), h800_gpu()
    measured = _tables(MemoryKernelPoint(kernel="cross_entropy", fwd_frac=0.05, bwd_frac=0.1, source="fp32 loss"))
    v, hbm = m.vocab_size, g.hbm_bytes_per_s
    head = end_costs(_ctx(measured), m)
    fused = end_costs(_ctx(measured, loss="fused"), m)
    bare = end_costs(_ctx(_tables()), m)  # no measured loss: FP32 bytes at memory_frac
    f = measured.memory_frac
    assert head.head_fwd_s - fused.head_fwd_s == pytest.approx(TOKENS * 2 * v * (1 / 0.05 - 1 / f) / hbm)
    assert head.head_dx_s - fused.head_dx_s == pytest.approx(TOKENS * 4 * v * (1 / 0.1 - 1 / f) / hbm)
    assert bare.head_fwd_s - fused.head_fwd_s == pytest.approx(TOKENS * (6 - 2) * v / (f * hbm))
    assert bare.head_dx_s - fused.head_dx_s == pytest.approx(TOKENS * (12 - 4) * v / (f * hbm))
    assert head.head_dw_s == fused.head_dw_s and head.embed_fwd_s == fused.embed_fwd_s


def test_the_plan_toggles_fusion_and_loss_and_the_last_stage_pays_a_loss_per_head():
    inp = _inputs()  # tiny_moe: one MTP module on the last stage
    fused = inp.model_copy(update={"training": inp.training.model_copy(
        update={"kernels": KernelSpec(fusion="fused", loss="fused")})})
    eager_step = step_inputs(inp, 4, 16)
    assert eager_step.stages[-1].heads == 2  # the main head and the MTP module's
    fused_step = step_inputs(fused, 4, 16)
    assert fused_step.ends.head_fwd_s < eager_step.ends.head_fwd_s
    moe = next(u for st in eager_step.stages for u in st.units if u.moe)
    moe_fused = next(u for st in fused_step.stages for u in st.units if u.moe)
    assert moe_fused.fwd_s < moe.fwd_s and moe_fused.dx_s < moe.dx_s
    assert moe_fused.dw_s == moe.dw_s  # GEMMs untouched
    opts = SimOptions()
    assert predict_step(fused, 4, 16, opts=opts)[0].step_time_s < predict_step(inp, 4, 16, opts=opts)[0].step_time_s
    assert fused.training.model_dump()["kernels"] == {"fusion": "fused", "loss": "fused", "expert_wgrad_batch": 1}


def test_v3_s_recipe_fuses_and_a_model_without_one_runs_the_runtime_s_kernels():
    assert deepseek_v3_recipe().training.kernels == KernelSpec(fusion="fused", loss="fused")
    assert default_recipe().training.kernels == KernelSpec(fusion="eager", loss="fp32")



def test_only_deepep_s_dispatch_takes_the_permutation_in():
    """A fused run keeps permute, combine and the dispatch plan on the compute stream without a dispatch or when
    the all-to-all is NCCL's (flat); with DeepEP they are gone: exactly their eager bytes (k = 4 rows per token,
    the permutation writing them padded, ``PADDED``; the plan: 32 B a pair and a 4-byte pointer a token)."""
    t, m = _tables(), tiny_moe()
    traffic = ExpertTraffic(dispatch_ib_bytes=0.0, dispatch_nvlink_bytes=1e6, combine_ib_bytes=0.0,
                            combine_nvlink_bytes=1e6, routing_ib_bytes=0.0, routing_nvlink_bytes=0.0,
                            expert_rows_max=4.0 * TOKENS, expert_rows_mean=4.0 * TOKENS, experts_per_gpu=16,
                            nodes_per_token=1.0)
    deepep = unit_costs(_ctx(t, fusion="fused"), m, moe=True, traffic=traffic)
    flat = unit_costs(_ctx(t, fusion="fused", ep_backend="flat"), m, moe=True, traffic=traffic)
    local = unit_costs(_ctx(t, fusion="fused"), m, moe=True, traffic=None)
    permute_combine_fwd = 2 * 64 * (1 + PADDED) + 2 * 64 * 5 + (32 * 4 + 4)
    permute_combine_bwd = 2 * 64 * 5 + 2 * 64 * 9
    assert flat.fwd_s - deepep.fwd_s == pytest.approx(_at_memory_frac(t, permute_combine_fwd))
    assert flat.dx_s - deepep.dx_s == pytest.approx(_at_memory_frac(t, permute_combine_bwd))
    assert local.fwd_s - local.experts_fwd_s == pytest.approx(flat.fwd_s - flat.experts_fwd_s)


def test_every_experts_wgrad_pays_its_main_gradient_add_the_epilogue_or_the_hook():
    """The experts' Wgrads add into FP32 main gradients: in the GEMM's epilogue (FP8, and the fused BF16 experts'
    per-expert cuBLAS addmm: 6 bytes a parameter over the BF16 output) or by the hook after the eager BF16
    experts' torch._grouped_mm (10 bytes), each at the residual_add fraction; never free."""
    from moeplan.simulator.engine.unit_costs import MAIN_GRAD_ADD_BYTES, MAIN_GRAD_EPILOGUE_BYTES

    t, m = _tables(), tiny_moe()
    params = m.n_routed_experts * 3 * m.hidden_size * m.moe_intermediate_size

    def dw_less_gemms(precision: str, fusion: str) -> float:
        ctx = CostContext(tables=t, gpu=h800_gpu(), precision=precision, tokens=TOKENS, seq_len_tokens=TOKENS,
                          compute_frac=1.0, recompute="none", fusion=fusion)
        h, f, g = m.hidden_size, m.moe_intermediate_size, m.n_routed_experts
        per = 128 if precision == "fp8" or fusion == "fused" else 64  # 64 rows an expert, padded where laid out
        gemms = gemm_s(t, h800_gpu(), precision, 2 * f, h, per, g) + gemm_s(t, h800_gpu(), precision, h, f, per, g)
        return unit_costs(ctx, m, moe=True, traffic=None).experts_dw_s - gemms

    def add_s(per_param: float) -> float:
        return per_param * params / (h800_gpu().hbm_bytes_per_s * t.memory_frac)

    assert dw_less_gemms("bf16", "fused") == pytest.approx(add_s(MAIN_GRAD_EPILOGUE_BYTES))
    assert dw_less_gemms("fp8", "fused") == pytest.approx(add_s(MAIN_GRAD_EPILOGUE_BYTES))
    assert dw_less_gemms("fp8", "eager") == pytest.approx(add_s(MAIN_GRAD_EPILOGUE_BYTES))
    assert dw_less_gemms("bf16", "eager") == pytest.approx(add_s(MAIN_GRAD_ADD_BYTES))


def test_batched_fp8_expert_wgrads_pay_one_launch_over_s_micro_batches_and_one_main_gradient_pass():
    """``expert_wgrad_batch`` S: a micro-batch's FP8 expert Wgrads cost 1/S of one launch whose experts each have S
    segments of rows (the GEMM priced at S times the rows) and of one main-gradient add; BF16 ignores it."""
    from moeplan.simulator.engine.unit_costs import MAIN_GRAD_EPILOGUE_BYTES

    t, m, gpu = _tables(), tiny_moe(), h800_gpu()
    h, f, g = m.hidden_size, m.moe_intermediate_size, m.n_routed_experts
    params = g * 3 * h * f

    def dw(precision: str, batch: int) -> float:
        ctx = CostContext(tables=t, gpu=gpu, precision=precision, tokens=TOKENS, seq_len_tokens=TOKENS,
                          compute_frac=1.0, recompute="none", fusion="fused", expert_wgrad_batch=batch)
        return unit_costs(ctx, m, moe=True, traffic=None).experts_dw_s

    for s in (2, 4):
        gemms = gemm_s(t, gpu, "fp8", 2 * f, h, 128 * s, g) + gemm_s(t, gpu, "fp8", h, f, 128 * s, g)
        add = MAIN_GRAD_EPILOGUE_BYTES * params / (gpu.hbm_bytes_per_s * t.memory_frac)
        assert dw("fp8", s) == pytest.approx((gemms + add) / s)
        assert dw("fp8", s) < dw("fp8", 1)
    assert dw("bf16", 4) == dw("bf16", 1)


def test_fp8_weight_quantisation_once_a_step_per_stage_copy_over_its_micro_batches():
    """An FP8 run quantises each stage copy's FP8 weights once a step (W and W^T), spread over the micro-batches
    that copy runs (DualPipe: half of them) on its first unit's forward; a BF16 run pays nothing. The rank's
    parameters: the dense linears over tp, the routed experts over ep (tiny_moe: hidden 64, expert width 32)."""
    from dataclasses import replace

    from moeplan.simulator.accounting.layout import pipeline_stages
    from moeplan.simulator.engine.build import cost_context
    from moeplan.simulator.engine.unit_costs import attention_shapes, fp8_weight_params, fp8_weight_quant_s

    m = tiny_moe()
    attn, up = attention_shapes(m)
    moe_layer = [i for i in range(m.num_hidden_layers) if m.is_moe_layer(i)][0]
    proj = sum(i * o for i, o in attn + up)
    routed, shared = 3 * 64 * 32 * m.n_routed_experts, 3 * 64 * 32 * m.n_shared_experts
    assert fp8_weight_params(m, [moe_layer], ep=4, tp=2) == pytest.approx((proj + shared) / 2 + routed / 4)
    mtp = m.num_hidden_layers  # an MTP module adds eh_proj (2h -> h)
    assert fp8_weight_params(m, [mtp]) - fp8_weight_params(m, [moe_layer]) == 2 * 64 * 64
    inp = _inputs()  # fp8, pp 2, ep 4, DualPipe: each stage has two copies, each running half the micro-batches
    ctx = cost_context(inp, default_tables(inp.cluster.gpu.name), 256)
    few, many = step_inputs(inp, 4, 4), step_inputs(inp, 4, 16)
    for stage, a, b in zip(pipeline_stages(inp.model, inp.parallel), few.stages, many.stages, strict=True):
        quant = fp8_weight_quant_s(ctx, inp.model, stage.layers, ep=4)
        assert quant > 0 and a.units[1:] == b.units[1:]  # only the first unit's forward carries it
        assert a.units[0].attn_fwd_s - b.units[0].attn_fwd_s == pytest.approx(quant / 2 - quant / 8)
    bf16 = replace(ctx, precision="bf16")
    assert fp8_weight_quant_s(bf16, m, [moe_layer], ep=4) == 0.0


def test_the_fused_experts_redo_their_swiglu_in_backward_once_whatever_the_recompute():
    """model/fused_experts.py keeps gate/up and redoes SwiGLU's output in backward: under ``fused`` its 4 routed
    rows' (padded to 8: ``PADDED``) forward (FP8 out, 4 + TILE B a value) is recompute time with no recompute set, and selective recompute,
    which redoes every SwiGLU row already, prices them once, not twice; ``eager`` experts keep the output."""
    m, base = tiny_moe(), _tables()
    slow = _tables(MemoryKernelPoint(kernel="swiglu", fwd_frac=base.memory_frac / 2, source="s"))
    redo = (2 * 2 + TILE) * 32 * PADDED
    assert unit_costs(_ctx(base, fusion="fused"), m, moe=True, traffic=None).recompute_s == pytest.approx(
        _at_memory_frac(base, redo))
    assert unit_costs(_ctx(base, fusion="eager"), m, moe=True, traffic=None).recompute_s == 0.0
    assert unit_costs(_ctx(base, fusion="fused"), m, moe=False, traffic=None).recompute_s == 0.0
    for recompute, rows in (("none", PADDED), ("selective", PADDED + 1)):  # routed; selective: and the shared row
        ref, got = (unit_costs(_ctx(t, recompute, fusion="fused"), m, moe=True, traffic=None).recompute_s
                    for t in (base, slow))
        assert got - ref == pytest.approx(_at_memory_frac(base, (2 * 2 + TILE) * 32 * rows)), recompute


@pytest.mark.parametrize(("precision", "fusion", "eager_norms", "eager_experts"), [
    ("bf16", "eager", True, True), ("fp8", "eager", True, False), ("bf16", "fused", False, False)])
def test_an_eager_run_is_priced_at_the_op_by_op_code_it_runs(precision, fusion, eager_norms, eager_experts):
    """Under ``eager`` the runtime runs RMSNorm op by op and, in BF16, the routed experts op by op
    (``model/experts.py``); those classes take their op-by-op points (``elementwise.EAGER_CLASSES``) where the tables
    measured them; the FP8 experts and a fused run keep the kernels' points."""
    from moeplan.simulator.costs.elementwise import EAGER_CLASSES
    from moeplan.simulator.engine.unit_costs import _priced_as

    m, f = tiny_moe(), _tables().memory_frac
    slow = [MemoryKernelPoint(kernel=k, fwd_frac=f / 8, source="op by op") for k in EAGER_CLASSES.values()]
    ctx = _ctx(_tables(*slow), fusion=fusion)
    ctx = CostContext(**{**ctx.__dict__, "precision": precision})
    for kernel, cls in EAGER_CLASSES.items():
        expert = kernel in ("swiglu", "permute", "combine")
        want = cls if (eager_experts if expert else eager_norms) else kernel
        assert _priced_as(ctx, kernel) == want, kernel
    plain = CostContext(**{**_ctx(_tables(), fusion=fusion).__dict__, "precision": precision})
    # with no op-by-op point measured, an eager run is priced at the kernels' points, as before (STAND_INS)
    kernels = _tables(*(MemoryKernelPoint(kernel=k, fwd_frac=f / 3, source="kernel") for k in EAGER_CLASSES))
    assert all(kernels.memory_price(cls) == kernels.memory_price(k) == ((f / 3, f / 3), (0.0, 0.0))
               for k, cls in EAGER_CLASSES.items())
    slower = unit_costs(ctx, m, moe=True, traffic=None).fwd_s > unit_costs(plain, m, moe=True, traffic=None).fwd_s
    assert slower == (eager_norms or eager_experts)


def test_the_packaged_files_time_the_op_by_op_classes():
    from moeplan.simulator.costs.elementwise import EAGER_CLASSES

    for gpu in ("H100-SXM5", "H200-SXM"):
        t = default_tables(gpu)
        for kernel, cls in EAGER_CLASSES.items():
            assert t.memory_fracs(cls)[0] < t.memory_fracs(kernel)[0], (gpu, kernel)  # op by op: slower
