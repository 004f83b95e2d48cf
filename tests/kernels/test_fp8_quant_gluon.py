"""``quant_act_both_gluon`` (kernels/fp8_quant_gluon.py): the cast with transpose from one read, the tile in shared
memory.

On the CPU machine: the kernel compiled offline for sm_90a (in a process without the Triton interpreter, since it calls
``fp8_quant``'s jit functions) and read through ptxas and its PTX: no spills, the tile through shared memory, each
element of x loaded from global memory once in 16-byte vectors, no byte-wide stores, and the swizzle's compile-time
bank-conflict check failing for a swizzle that conflicts. Off a Hopper GPU the call falls back to ``quant_act_both``.
On a Hopper GPU: bit for bit ``quant_act_1x128`` and ``quant_act_128x1_t`` at V3's shapes and ragged ones, bf16 and
fp32, power-of-two scales on and off, outputs poisoned before every launch.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from moeplan.kernels import fp8_quant, fp8_quant_gluon
from moeplan.kernels.fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_act_both
from moeplan.kernels.fp8_quant_gluon import quant_act_both_gluon
from tests.kernels import test_kernels
from tests.kernels.test_fp8_gemm_ws import _sass
from tests.kernels.test_fp8_quant_both import _assert_same, _input
from tests.kernels.test_moe_permute_bound import _check_split

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(not fp8_quant_gluon.HAVE_GLUON, reason="needs triton with Gluon")
on_hopper = pytest.mark.skipif(not (ON_HOPPER and fp8_quant_gluon.HAVE_GLUON), reason="needs Gluon and a Hopper GPU")
poisoned = test_kernels.poisoned  # autouse: every new output NaN (E4M3 NaN) until written
device = test_kernels.device

# (dtype, pow2_scale, cast, config, row_bound) compiled offline: both input widths, both scale kinds, the emulated and
# both hardware casts, every config (one program a tile and persistent), with and without a row bound
VARIANTS = [("bf16", False, 0, (8, 32, 0), False), ("bf16", True, 1, (4, 32, 0), False),
            ("fp32", False, 2, (8, 64, 0), False), ("fp32", True, 0, (4, 32, 0), False),
            ("bf16", False, 1, (8, 64, 0), True), ("bf16", False, 1, (8, 32, 2), True),
            ("fp32", True, 1, (4, 32, 3), False)]
_COMPILE_SCRIPT = """
import json, sys
import torch
from moeplan.kernels import fp8_quant_gluon
dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
out = {}
for dtype, pow2, cast, config, bound in json.loads(sys.argv[1]):
    kernel = fp8_quant_gluon.compile_offline(dtypes[dtype], pow2, cast, tuple(config), row_bound=bound)
    out[f"{dtype},{int(pow2)},{cast},{config},{int(bound)}"] = kernel.asm["ptx"]
try:
    fp8_quant_gluon.compile_offline(swizzle_rows=1)
    out["conflicting swizzle"] = "compiled"
except Exception as exc:
    out["conflicting swizzle"] = str(exc)
print(json.dumps(out))
"""


@functools.cache
def _compiled(tmp_dir: str) -> dict[str, str]:
    """PTX of each of VARIANTS, and what compiling with a swizzle of 1 row a phase said, from one process without
    TRITON_INTERPRET (~10 s)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": tmp_dir}
    res = subprocess.run([sys.executable, "-P", "-c", _COMPILE_SCRIPT, json.dumps(VARIANTS)], capture_output=True,
                         text=True, env=env, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, str]:
    return _compiled(str(tmp_path_factory.mktemp("triton-cache")))


def _count(pattern: str, ptx: str) -> int:
    return len(re.findall(pattern, ptx))


@needs_gluon
@pytest.mark.parametrize("variant", VARIANTS,
                         ids=lambda v: f"{v[0]}-pow2{int(v[1])}-cast{v[2]}-{'-'.join(map(str, v[3]))}{'-bound' * v[4]}")
def test_compiles_for_hopper_reading_x_once_without_spills(compiled, variant, tmp_path):
    dtype, pow2, cast, config, bound = variant
    ptx = compiled[f"{dtype},{int(pow2)},{cast},{list(config)},{int(bound)}"]
    num_warps, persistent = config[0], config[2] > 0
    report, sass = _sass(ptx, tmp_path)
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
    assert not re.search(r"\b(LDL|STL)\b", sass), "registers went to local memory"
    # Each thread's share of the 128x128 tile, in 16-byte vectors: loaded from global memory once (persistent: the
    # first tile's before the loop, each next one's in it), stored into shared memory once, read from it twice (the
    # rows' pass and the columns'), one barrier between (persistent: and one before the next tile's store); and the
    # row bound.
    vectors = 128 * 128 * {"bf16": 2, "fp32": 4}[dtype] // 16 // (32 * num_warps)
    assert _count(r"ld\.global\.v4\.b32", ptx) == vectors * (1 + persistent), "x read more than once"
    assert _count(r"ld\.global", ptx) == vectors * (1 + persistent) + bound
    assert _count(r"st\.shared", ptx) == _count(r"st\.shared\.v4\.b32", ptx) == vectors
    assert _count(r"ld\.shared", ptx) == _count(r"ld\.shared\.v4\.b32", ptx) == 2 * vectors
    assert _count(r"bar\.sync", ptx) == 1 + persistent
    # coalesced stores: at least 4 bytes a thread (the copy's 1x128 rows 8 bytes from bf16, x^T's 4 along M)
    assert not re.search(r"st\.global(\.v\d)?\.b(8|16)\b", ptx), "byte-wide global stores"
    if dtype == "bf16":
        assert _count(r"st\.global\.v2\.b32", ptx) == vectors
    assert ("cvt.rn.satfinite.e4m3x2" in ptx) == bool(cast)  # the hardware casts; 0 the integer emulation


@needs_gluon
def test_the_swizzle_check_fails_for_a_conflicting_swizzle(compiled):
    """One swizzle phase a row (the usual one) puts the columns' read of rows 0, 4, 8, ... on 2 of 8 banks: the
    kernel's compile-time check refuses it (the default, 4 rows a phase, compiled above)."""
    assert "the columns' read has bank conflicts" in compiled["conflicting swizzle"]


def test_configs_are_checked():
    with pytest.raises(ValueError, match=r"config=\(8, 16, 0\)"):
        fp8_quant_gluon._config((8, 16, 0))
    assert fp8_quant_gluon._config(None) == fp8_quant_gluon.CONFIGS[0]


def test_resident_programs_by_registers_and_shared_memory():
    """sm_90's limits: 64K registers (256 a warp at a time), 228 KiB of shared memory (1 KiB more a program), 2048
    threads, 32 programs. The numbers are what the configs compiled to (ptxas, sm_90a, Triton 3.6)."""
    assert fp8_quant_gluon.resident(64, 32768, 8) == 4  # a program a tile, bf16, hardware cast: by registers
    assert fp8_quant_gluon.resident(64, 32768, 4) == 6  # 4 warps: by shared memory
    assert fp8_quant_gluon.resident(128, 32768, 8) == 2  # persistent, bf16
    assert fp8_quant_gluon.resident(166, 32768, 4) == 3  # persistent, bf16, 4 warps (168 registers allocated)
    assert fp8_quant_gluon.resident(254, 65536, 4) == 2  # persistent, fp32, 4 warps: 3 asked for, 2 fit
    assert fp8_quant_gluon.resident(32, 1024, 1) == 32  # at most 32 programs (64 by registers and by threads)
    assert fp8_quant_gluon.resident(255, 240000, 32) == 1  # never fewer than one


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback off a GPU")
def test_falls_back_to_quant_act_both_off_a_gpu():
    pytest.importorskip("triton")
    x = _input((130, 257), torch.bfloat16, "cpu")
    assert not fp8_quant_gluon.runs_on(x)
    got, want = quant_act_both_gluon(x, True), quant_act_both(x, True)
    for g, w in zip(got, want):
        _assert_same(g, w, "fallback")


# ----------------------------------------------------------------------------- on a Hopper GPU

V3_SHAPES = [(4096, 7168), (4096, 2048), (34560, 7168)]
RAGGED_SHAPES = [(200, 300), (129, 7168), (4096, 130), (1, 128), (37, 300), (130, 257), (129, 1)]


@functools.lru_cache(maxsize=4)
def _gpu_input(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return _input(shape, dtype, "cuda")


def _check(x: torch.Tensor, pow2_scale: bool = False, amax_floor: float = fp8_quant.AMAX_FLOOR, config=None) -> None:
    assert fp8_quant_gluon.runs_on(x), "the Gluon kernel must run, not the fallback"
    rows, cols_t = quant_act_both_gluon(x, pow2_scale, amax_floor, config=config)
    what = f"{tuple(x.shape)} {x.dtype} {pow2_scale=} {amax_floor=} {config=}"
    _assert_same(rows, quant_act_1x128(x, pow2_scale, amax_floor), f"1x128 {what}")
    _assert_same(cols_t, quant_act_128x1_t(x, pow2_scale, amax_floor), f"128x1_t {what}")
    assert cols_t[0].is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2_scale", [False, True])
@pytest.mark.parametrize("shape", V3_SHAPES + RAGGED_SHAPES)
@pytest.mark.gpu
@on_hopper
def test_is_the_single_quantisers_bit_for_bit(shape, pow2_scale, dtype):
    x = _gpu_input(shape, dtype)
    for amax_floor in (fp8_quant.AMAX_FLOOR, 1e-12):  # the kernels' floor and the model's
        _check(x, pow2_scale, amax_floor)


@pytest.mark.parametrize("config", fp8_quant_gluon.CONFIGS)
@pytest.mark.parametrize("shape,dtype", [((4096, 2048), torch.bfloat16), ((200, 300), torch.float32),
                                         ((4096, 130), torch.bfloat16), ((129, 1), torch.bfloat16),
                                         ((1, 128), torch.float32), ((34560, 7168), torch.bfloat16)])
@pytest.mark.gpu
@on_hopper
def test_every_config_is_bit_exact(shape, dtype, config):
    _check(_gpu_input(shape, dtype), config=config)


@pytest.mark.parametrize("pow2_scale", [False, True])
@pytest.mark.gpu
@on_hopper
def test_infinities_and_strided_rows(pow2_scale):
    """An infinite element (its row's and column's scale infinite), and x a slice: rows at an odd pitch, the first
    element not 16-byte aligned (the loads are then not vectorised, the bits the same)."""
    x = _input((130, 257), torch.float32, "cuda")
    x[5, 7], x[100, 200] = float("inf"), -float("inf")
    _check(x, pow2_scale)
    base = _input((260, 301), torch.bfloat16, "cuda")
    _check(base[3:200, 10:290], pow2_scale)


@pytest.mark.parametrize("config", fp8_quant_gluon.CONFIGS)
@pytest.mark.parametrize("bound", [0, 256])
@pytest.mark.gpu
@on_hopper
def test_stops_at_the_row_bound(bound, config):
    """As ``quant_act_both``: 1x128 tiles of the rows before the bound, 128x1 tiles of its columns, nothing from the
    bound on (tests/kernels/test_moe_permute_bound.py checks the Triton kernels the same way)."""
    M = 384
    x = _gpu_input((M, 200), torch.bfloat16)
    b = torch.tensor([bound], dtype=torch.int32, device="cuda")
    rows, t = quant_act_both_gluon(x, row_bound=b, config=config)
    want_rows, want_t = quant_act_both_gluon(x, config=config)
    _check_split(rows, want_rows, bound, M)
    _check_split(t, want_t, bound, M, transposed=True)


@pytest.mark.gpu
@on_hopper
def test_a_column_major_input_falls_back():
    x = _input((260, 300), torch.bfloat16, "cuda").t()
    assert not fp8_quant_gluon.runs_on(x)
    rows, cols_t = quant_act_both_gluon(x)
    _assert_same(rows, quant_act_1x128(x), "1x128")
    _assert_same(cols_t, quant_act_128x1_t(x), "128x1_t")


_GATHER_SCRIPT = """
import json, sys
import torch
from moeplan.kernels import fp8_quant_gluon
out = {}
for config, weighted in json.loads(sys.argv[1]):
    kernel = fp8_quant_gluon.compile_offline(torch.bfloat16, config=tuple(config), row_bound=True, gather=True,
                                             weighted=weighted)
    out[f"{config},{int(weighted)}"] = kernel.asm["ptx"]
print(json.dumps(out))
"""
GATHERS = [((8, 32, 0), False), ((8, 32, 0), True), ((8, 32, 2), True)]


@needs_gluon
def test_the_gather_reads_each_permuted_row_once_without_spills(tmp_path):
    """``quant_act_both_gluon(x, gather=..., row_weights=...)`` compiled for sm_90a (one program a tile and
    persistent; weighted or not; with a row bound): each thread's share of the tile loaded from global memory once
    (the persistent grid: the first tile's before the loop, each next one's in it) beside its rows' source indices
    and weights; the weighted rows rounded to bf16 (``cvt.rn``) before shared memory, as ``moe_permute`` stores
    them; no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-P", "-c", _GATHER_SCRIPT, json.dumps(GATHERS)], capture_output=True,
                         text=True, env=env, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    ptxs = json.loads(res.stdout)
    for config, weighted in GATHERS:
        ptx = ptxs[f"{list(config)},{int(weighted)}"]
        num_warps, persistent = config[0], config[2] > 0
        report, sass = _sass(ptx, tmp_path)
        assert "0 bytes spill stores, 0 bytes spill loads" in report, report
        assert not re.search(r"\b(LDL|STL)\b", sass), "registers went to local memory"
        vectors = 128 * 128 * 2 // 16 // (32 * num_warps)
        assert _count(r"ld\.global\.v4\.b32", ptx) == vectors * (1 + persistent), "x read more than once"
        # beside x: the bound, and a source row index (and weight) per row a thread covers, each tile
        scalars = _count(r"ld\.global", ptx) - _count(r"ld\.global\.v4\.b32", ptx)
        assert scalars == 1 + vectors * (1 + persistent) * (1 + weighted), scalars
        assert ("cvt.rn.bf16x2.f32" in ptx) == weighted
        assert _count(r"st\.shared\.v4\.b32", ptx) == vectors


def _same_both(got, want, bound: int, num_rows: int) -> None:
    """Two ``quant_act_both`` results of a ``num_rows``-row buffer: the same bits before ``bound``, nothing
    written from it on in ``got``."""
    from tests.kernels.test_moe_permute_bound import _same, untouched

    for pair, w_pair, transposed in ((got[0], want[0], False), (got[1], want[1], True)):
        for g, w in zip(pair, w_pair):
            g, w = (g.t(), w.t()) if transposed else (g, w)  # (rows or tiles of 128 rows, ...)
            edge = bound if g.shape[0] == num_rows else bound // 128
            assert _same(g[:edge], w[:edge]), "rows before the bound differ"
            assert untouched(g[edge:]), "rows from the bound on were written"


def test_permute_quant_both_is_the_permute_then_the_cast_and_checks_its_weights(device):
    """``moe_permute_quant_both`` (the fallback here, and wherever the Gluon gather does not run) is the weighted
    permute, then ``quant_act_both`` with the plan's bound; weights of another length or dtype are one error."""
    from moeplan.kernels.moe_permute import make_pair_plan, moe_permute, moe_permute_quant_both, pair_row_weights

    g = torch.Generator().manual_seed(7)
    tokens, experts, d = 12, 4, 136
    token = torch.arange(tokens).repeat_interleave(2).to(device)
    expert = torch.randint(0, experts, (token.numel(),), generator=g).to(device)
    plan = make_pair_plan(token, expert, tokens, experts)  # worst case: a row bound
    x = test_kernels.rand(tokens, d, seed=8, device=device, dtype=torch.bfloat16)
    weights = pair_row_weights(plan, torch.rand(token.numel(), generator=g).to(device))
    for w in (None, weights):
        got = moe_permute_quant_both(x, plan, row_weights=w, amax_floor=1e-12)
        want = quant_act_both(moe_permute(x, plan, row_weights=w), amax_floor=1e-12, row_bound=plan.rows_bound)
        _same_both(got, want, int(plan.rows_bound), plan.num_rows)
    with pytest.raises(ValueError, match="row_weights must be"):
        moe_permute_quant_both(x, plan, row_weights=weights[:-1])
    with pytest.raises(ValueError, match="row_weights must be"):
        moe_permute_quant_both(x, plan, row_weights=weights.double())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("config", fp8_quant_gluon.CONFIGS)
@pytest.mark.gpu
@on_hopper
def test_the_gather_is_the_permute_then_the_cast_bit_for_bit(weighted, config, monkeypatch):
    """On the GPU, the Gluon gather (``moe_permute.PERMUTE_BOTH``) against the permute then ``quant_act_both``:
    V3's rows (7168) and ragged ones (200), exact and worst-case plans (the tail past the bound untouched)."""
    from moeplan.kernels import moe_permute as mp

    g = torch.Generator().manual_seed(9)
    for tokens, experts, d, exact in ((4096, 32, 7168, False), (300, 6, 200, True), (300, 6, 200, False)):
        token = torch.arange(tokens).repeat_interleave(8 if d == 7168 else 2).cuda()
        expert = torch.randint(0, experts, (token.numel(),), generator=g).cuda()
        counts = torch.bincount(expert.cpu(), minlength=experts).tolist() if exact else experts
        plan = mp.make_pair_plan(token, expert, tokens, counts)
        x = test_kernels.rand(tokens, d, seed=10, device="cuda", dtype=torch.bfloat16)
        w = mp.pair_row_weights(plan, torch.rand(token.numel(), generator=g).cuda()) if weighted else None
        monkeypatch.setattr(mp, "PERMUTE_BOTH", False)
        want = mp.moe_permute_quant_both(x, plan, row_weights=w, amax_floor=1e-12)
        monkeypatch.setattr(mp, "PERMUTE_BOTH", True)
        monkeypatch.setattr(fp8_quant_gluon, "CONFIGS", [config, *fp8_quant_gluon.CONFIGS])  # the kernel's default
        got = mp.moe_permute_quant_both(x, plan, row_weights=w, amax_floor=1e-12)
        _same_both(got, want, plan.num_rows if plan.rows_bound is None else int(plan.rows_bound), plan.num_rows)


_DH_SCRIPT = """
import json, sys
import torch
from moeplan.kernels import fp8_quant_gluon
out = {}
for bound in (False, True):
    out[str(int(bound))] = fp8_quant_gluon.compile_offline(torch.bfloat16, row_bound=bound, dact=True).asm["ptx"]
print(json.dumps(out))
"""


@needs_gluon
def test_the_swiglu_backward_reads_h_and_dact_once_without_spills(tmp_path):
    """``quant_act_both_gluon(h, dact=...)`` (SwiGLU's backward quantised both ways) compiled for sm_90a, with and
    without a row bound: each thread's share of the tile's gate, up and d act columns loaded once (three 16-byte
    vectors for each of the tile's 16-byte pieces), the sigmoid's exponential once an element, d h rounded to bf16
    (``cvt.rn``) before shared memory as ``swiglu_backward`` stores it, each piece stored into shared memory once;
    no spills, and few enough registers for two programs an SM."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-P", "-c", _DH_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    for bound, ptx in json.loads(res.stdout).items():
        report, sass = _sass(ptx, tmp_path)
        assert "0 bytes spill stores, 0 bytes spill loads" in report, report
        regs = int(re.search(r"Used (\d+) registers", report).group(1))
        assert fp8_quant_gluon.resident(regs, 32768, 8) >= 2, regs
        vectors = 128 * 128 * 2 // 16 // (32 * 8)  # 16-byte pieces of the tile a thread
        assert _count(r"ld\.global\.v4\.b32", ptx) == 3 * vectors, "h or d act read more than once"
        assert _count(r"ex2\.approx", ptx) == 128 * 128 // (32 * 8), "one exponential an element"
        assert "cvt.rn.bf16x2.f32" in ptx
        assert _count(r"st\.shared\.v4\.b32", ptx) == vectors


def test_swiglu_backward_quant_both_is_the_backward_then_the_cast(device):
    """``swiglu_backward_quant_both`` (the fallback here, and wherever the Gluon kernel does not run) is
    ``swiglu_backward``, then ``quant_act_both`` with the same bound; a d act of another shape or dtype is one
    error."""
    from moeplan.kernels.swiglu import swiglu_backward, swiglu_backward_quant_both

    M, inner = 300, 128
    h = test_kernels.rand(M, 2 * inner, seed=81, device=device, dtype=torch.bfloat16)
    dact = test_kernels.rand(M, inner, seed=82, device=device, dtype=torch.bfloat16)
    bound = torch.tensor([256], dtype=torch.int32, device=device)  # a plan's bound: whole 128-row tiles
    got = swiglu_backward_quant_both(h, dact, amax_floor=1e-12, row_bound=bound)
    want = quant_act_both(swiglu_backward(h, dact, bound), amax_floor=1e-12, row_bound=bound)
    _same_both(got, want, 256, M)
    with pytest.raises(ValueError, match="dact must be"):
        swiglu_backward_quant_both(h, dact[:, :-1])
    with pytest.raises(ValueError, match="dact must be"):
        swiglu_backward_quant_both(h, dact.float())


@pytest.mark.gpu
@on_hopper
def test_the_swiglu_backward_is_the_backward_then_the_cast_bit_for_bit(monkeypatch):
    """On the GPU, the Gluon kernel's SwiGLU backward (``swiglu.BACKWARD_BOTH``) against ``swiglu_backward`` then
    ``quant_act_both``: V3's expert rows (34,560 x 2 x 2048), ragged rows (300) with and without a row bound (the
    tail past it untouched), and the transposed pair written into a wider stash's columns."""
    from moeplan.kernels import swiglu as sw

    for M, inner, bound in ((34560, 2048, None), (300, 256, None), (300, 256, 256)):
        h = test_kernels.rand(M, 2 * inner, seed=83, device="cuda", dtype=torch.bfloat16) * 4
        dact = test_kernels.rand(M, inner, seed=84, device="cuda", dtype=torch.bfloat16)
        row_bound = None if bound is None else torch.tensor([bound], dtype=torch.int32, device="cuda")
        monkeypatch.setattr(sw, "BACKWARD_BOTH", False)
        want = sw.swiglu_backward_quant_both(h, dact, amax_floor=1e-12, row_bound=row_bound)
        monkeypatch.setattr(sw, "BACKWARD_BOTH", True)
        got = sw.swiglu_backward_quant_both(h, dact, amax_floor=1e-12, row_bound=row_bound)
        _same_both(got, want, -(-M // 128) * 128 if bound is None else bound, M)
    pitch = M + 512  # a stash of two slots: this one's columns start at 384
    stash_q = torch.full((2 * inner, pitch), 7, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    stash_s = torch.full((2 * inner, pitch // 128 + 1), -1.0, device="cuda")
    cols = slice(384, 384 + M)
    out_t = (stash_q[:, cols], stash_s[:, 3:3 + -(-M // 128)])
    got = sw.swiglu_backward_quant_both(h, dact, amax_floor=1e-12, out_t=out_t)
    monkeypatch.setattr(sw, "BACKWARD_BOTH", False)
    want = sw.swiglu_backward_quant_both(h, dact, amax_floor=1e-12)
    assert torch.equal(got[1][0].view(torch.uint8), want[1][0].view(torch.uint8))
    assert torch.equal(got[1][1], want[1][1])
    assert bool((stash_q.view(torch.uint8)[:, :384] == 7).all()) and bool((stash_s[:, :3] == -1).all())
