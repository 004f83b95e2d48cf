"""A worst-case plan's row bound (``DispatchPlan.rows_bound``): each memory-bound kernel of the experts (permute and
its quantisations, the row dots, SwiGLU forward, transposed quantisation and backward, the activation quantisers)
writes the rows before the bound exactly as without it, and leaves the rows from it on untouched: they keep the
poison that ``test_kernels.poisoned`` fills every new output with (NaN, E4M3 NaN). On the GPU or, tiny, the
interpreter (tests/kernels/test_kernels.py)."""

import json
from dataclasses import replace

import pytest
import torch

from moeplan.kernels import fp8_quant
from moeplan.kernels.fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_act_both
from moeplan.kernels.moe_permute import (
    make_dispatch_plan,
    make_pair_plan,
    moe_permute,
    pair_weight_grad,
    row_dots,
    worst_case_rows,
)
from moeplan.kernels.swiglu import swiglu, swiglu_backward, swiglu_quant_t
from tests.kernels import test_kernels
from tests.kernels.test_kernels import rand

device, poisoned = test_kernels.device, test_kernels.poisoned

E, T, H = 6, 12, 136  # experts 0, 2 and 3 routed to: 384 rows in use of 768 (H: a ragged second column tile)


def _pairs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, expert) of each pair: 0 to 3 pairs a token, experts 1, 4 and 5 unused."""
    g = torch.Generator().manual_seed(61)
    token = torch.arange(T).repeat_interleave(torch.randint(0, 4, (T,), generator=g))
    expert = torch.tensor([0, 2, 3])[torch.randint(0, 3, (token.numel(),), generator=g)]
    return token.to(device), expert.to(device)


def _worst_case_plan(device: str):
    """A pair plan without host counts: 768 rows, the bound at 384."""
    return make_pair_plan(*_pairs(device), T, E)


def untouched(t: torch.Tensor) -> bool:
    """Whether every element still holds the poison of a fresh output (never written)."""
    if t.dtype == torch.float8_e4m3fn:
        return bool((t.view(torch.uint8) == 0x7F).all())
    return bool(torch.isnan(t).all())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _check_split(got, want, bound: int, num_rows: int, transposed: bool = False) -> None:
    """``got`` (a tensor or a (values, scales) pair) equals ``want`` in the ``num_rows``-row buffer's rows before
    ``bound`` and is untouched from it on. Transposed: the rows are the columns, (K, M) values and (K, M/128)
    scales (a scale a tile of 128 rows)."""
    for g, w in zip(got, want) if isinstance(got, tuple) else ((got, want),):
        g, w = (g.t(), w.t()) if transposed else (g, w)  # (rows or tiles of rows, ...)
        assert g.shape[0] in (num_rows, num_rows // 128), (g.shape, num_rows)
        edge = bound if g.shape[0] == num_rows else bound // 128
        assert _same(g[:edge], w[:edge]), "rows before the bound differ"
        assert untouched(g[edge:]), "rows from the bound on were written"
        assert not untouched(w[edge:]), "without the bound the kernel writes every row"  # what the check would see


def test_only_a_worst_case_plan_has_a_bound(device):
    """``rows_bound`` is ``seg_offsets[-1:]`` itself (a view: no copy, nothing read on the host) where the plan takes
    the worst case; a plan sized exactly (host counts, no padding, a top-k plan) has none."""
    token, expert = _pairs(device)
    plan = make_pair_plan(token, expert, T, E)
    assert plan.num_rows == worst_case_rows(token.numel(), E, 128) == 768
    assert plan.rows_bound.shape == (1,) and plan.rows_bound.dtype == torch.int32
    assert plan.rows_bound.data_ptr() == plan.seg_offsets[-1:].data_ptr() and int(plan.rows_bound) == 384
    counts = torch.bincount(expert.cpu(), minlength=E).tolist()
    assert make_pair_plan(token, expert, T, counts).rows_bound is None
    assert make_pair_plan(token, expert, T, E, align=1).rows_bound is None
    assert make_dispatch_plan(expert.view(-1, 1), E).rows_bound is None


@pytest.mark.parametrize("mode", ["bf16", "weighted", "1x128", "128x1_t"])
def test_permute_stops_at_the_bound(device, mode):
    """Plain, weighted (the combine's backward), quantised 1x128 (the forward) and 128x1 transposed (the Wgrad)."""
    plan = _worst_case_plan(device)
    x = rand(T, H, seed=62, device=device, dtype=torch.bfloat16)
    kwargs = {"bf16": {}, "weighted": {"row_weights": rand(plan.num_rows, seed=63, device=device)},
              "1x128": {"quantize": True}, "128x1_t": {"quantize": "128x1_t"}}[mode]
    got = moe_permute(x, plan, amax_floor=1e-12, **kwargs)
    want = moe_permute(x, replace(plan, rows_bound=None), amax_floor=1e-12, **kwargs)
    _check_split(got, want, 384, plan.num_rows, transposed=mode == "128x1_t")


def test_row_dots_stop_at_the_bound(device):
    """The combine's weight gradient: the rows' dots, and so each pair's, as without the bound."""
    plan = _worst_case_plan(device)
    grad = rand(T, H, seed=64, device=device, dtype=torch.bfloat16)
    y = rand(plan.num_rows, H, seed=65, device=device, dtype=torch.bfloat16)
    unbounded = replace(plan, rows_bound=None)
    _check_split(row_dots(grad, y, plan), row_dots(grad, y, unbounded), 384, plan.num_rows)
    assert torch.equal(pair_weight_grad(grad, y, plan), pair_weight_grad(grad, y, unbounded))


def test_swiglu_stops_at_the_bound(device):
    """Forward (plain and quantised 1x128), the Wgrad's transposed quantisation, backward."""
    M, inter = 384, 136
    h = rand(M, 2 * inter, seed=66, device=device, dtype=torch.bfloat16, scale=2.0)
    dact = rand(M, inter, seed=67, device=device, dtype=torch.bfloat16)
    bound = torch.tensor([256], dtype=torch.int32, device=device)
    for run, transposed in ((lambda b: swiglu(h, row_bound=b), False),
                            (lambda b: swiglu(h, quantize=True, amax_floor=1e-12, row_bound=b), False),
                            (lambda b: swiglu_quant_t(h, amax_floor=1e-12, row_bound=b), True),
                            (lambda b: swiglu_backward(h, dact, row_bound=b), False)):
        _check_split(run(bound), run(None), 256, M, transposed)


@pytest.mark.parametrize("one_read", [False, True, "gluon"])
@pytest.mark.parametrize("bound", [0, 256])
def test_activation_quantisers_stop_at_the_bound(device, monkeypatch, one_read, bound):
    """``quant_act_both`` (the two quantisers, or the one-read kernel) and each single quantiser: 1x128 tiles of
    the rows before the bound, 128x1 tiles of its columns; nothing from the bound on (none at all for bound 0)."""
    monkeypatch.setattr(fp8_quant, "ONE_READ", one_read)
    M, K = 384, 200
    x = rand(M, K, seed=68, device=device, dtype=torch.bfloat16, scale=3.0)
    b = torch.tensor([bound], dtype=torch.int32, device=device)
    (rows, t), (want_rows, want_t) = quant_act_both(x, row_bound=b), quant_act_both(x)
    _check_split(rows, want_rows, bound, M)
    _check_split(t, want_t, bound, M, transposed=True)
    if not one_read:
        _check_split(quant_act_1x128(x, row_bound=b), quant_act_1x128(x), bound, M)
        _check_split(quant_act_128x1_t(x, row_bound=b), quant_act_128x1_t(x), bound, M, transposed=True)


def test_a_bound_must_be_one_int32_on_the_device(device):
    h = rand(128, 256, seed=69, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="row_bound must be"):
        swiglu(h, row_bound=torch.tensor([128], device=device))  # int64
    with pytest.raises(ValueError, match="row_bound must be"):
        quant_act_1x128(h, row_bound=torch.tensor([128, 256], dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------- offline compile (CPU)

_COMPILE_SCRIPT = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moeplan.kernels import fp8_quant, moe_permute, swiglu

def ptx(fn, types, consts):
    sig = {p.name: "constexpr" if p.is_constexpr or p.name in consts else types.get(p.name, "i32") for p in fn.params}
    src = ASTSource(fn, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]

f32, bf16, fp8, i32 = "*fp32", "*bf16", "*fp8e4nv", "*i32"
rows = {"POW2": False, "FLOOR": 1e-12, "ROW_MAJOR": True, "CAST": 2, "BLOCK_R": 32, "BLOCK_C": 128}
kernels = {
    "permute_1x128": (moe_permute._permute_kernel, {"x_ptr": bf16, "out_ptr": fp8, "scale_ptr": f32, "src_ptr": i32,
        "weight_ptr": i32}, {"QUANT": True, "WEIGHTED": False, "POW2": False, "FLOOR": 1e-12, "TRANSPOSED": False,
        "CAST": 2, "BLOCK_R": 16, "BLOCK_H": 128}),
    "permute_128x1_t": (moe_permute._permute_kernel, {"x_ptr": bf16, "out_ptr": fp8, "scale_ptr": f32,
        "src_ptr": i32, "weight_ptr": i32}, {"QUANT": True, "WEIGHTED": False, "POW2": False, "FLOOR": 1e-12,
        "TRANSPOSED": True, "CAST": 2, "BLOCK_R": 128, "BLOCK_H": 64}),
    "permute_weighted": (moe_permute._permute_kernel, {"x_ptr": bf16, "out_ptr": bf16, "scale_ptr": bf16,
        "src_ptr": i32, "weight_ptr": f32}, {"QUANT": False, "WEIGHTED": True, "POW2": False, "FLOOR": 1e-12,
        "TRANSPOSED": False, "CAST": 0, "BLOCK_R": 16, "BLOCK_H": 128}),
    "row_dot": (moe_permute._row_dot_kernel, {"g_ptr": bf16, "y_ptr": bf16, "out_ptr": f32, "src_ptr": i32},
        {"BLOCK_R": 16, "BLOCK_H": 256}),
    "swiglu_fwd": (swiglu._swiglu_fwd_kernel, {"h_ptr": bf16, "out_ptr": fp8, "scale_ptr": f32},
        {"QUANT": True, "POW2": False, "FLOOR": 1e-12, "CAST": 2, "BLOCK_R": 16, "BLOCK_C": 128}),
    "swiglu_quant_t": (swiglu._swiglu_quant_t_kernel, {"h_ptr": bf16, "q_ptr": fp8, "s_ptr": f32},
        {"POW2": False, "FLOOR": 1e-12, "CAST": 2, "BLOCK_R": 128, "BLOCK_C": 64}),
    "swiglu_bwd": (swiglu._swiglu_bwd_kernel, {"h_ptr": bf16, "dact_ptr": bf16, "dh_ptr": bf16},
        {"BLOCK_R": 16, "BLOCK_C": 128}),
    "quant_rows": (fp8_quant._quant_rows_kernel.fn, {"x_ptr": bf16, "q_ptr": fp8, "s_ptr": f32},
        rows | {"BOUND_COLS": False}),
    "quant_rows_t": (fp8_quant._quant_rows_kernel.fn, {"x_ptr": bf16, "q_ptr": fp8, "s_ptr": f32},
        rows | {"ROW_MAJOR": False, "BOUND_COLS": True}),
    "quant_both": (fp8_quant._quant_both_kernel.fn, {"x_ptr": bf16, "q_ptr": fp8, "s_ptr": f32, "qt_ptr": fp8,
        "st_ptr": f32}, {"POW2": False, "FLOOR": 1e-12, "ROW_MAJOR": True, "CAST": 2, "BLOCK": 128, "SUB": 32}),
}
out = {}
for name, (fn, types, consts) in kernels.items():
    out[name] = [ptx(fn, types | {"bound_ptr": i32}, consts), ptx(fn, types, consts | {"bound_ptr": None})]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_bounded_kernel_compiles_for_sm90(tmp_path):
    """Offline (a process without the interpreter): each kernel compiles with a bound and without one (the check
    compiled out), and the bound adds one load of it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-P", "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    for name, (bounded, unbounded) in json.loads(res.stdout).items():
        assert bounded.count("ld.global") == unbounded.count("ld.global") + 1, name
