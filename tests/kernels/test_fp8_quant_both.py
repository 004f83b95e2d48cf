"""``quant_act_both``: the 1x128 and the transposed 128x1 quantisation of one tensor from one read (``ONE_READ``; by
default two, which measured faster), bit for bit
``quant_act_1x128`` and ``quant_act_128x1_t`` (values, scales and their MN-major layouts). On the GPU, or tiny
through the Triton interpreter (tests/conftest.py); outputs poisoned before every launch (``poisoned``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from moeplan.kernels import fp8_quant
from moeplan.kernels.fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_act_both
from tests.kernels import test_kernels
from tests.kernels.test_fp8_gemm_ws import _tools
from tests.kernels.test_kernels import ON_GPU, rand, same_bits

device, poisoned = test_kernels.device, test_kernels.poisoned


@pytest.fixture(autouse=True, params=[True, False, "gluon"], ids=["one-read", "two-reads", "gluon"])
def one_read(request, monkeypatch):
    """Each test runs on every path of ``quant_act_both``: the one-read Triton kernel, the two single quantisers and
    the one-read Gluon kernel (on a Hopper GPU; elsewhere the two quantisers it falls back to)."""
    monkeypatch.setattr(fp8_quant, "ONE_READ", request.param)
    return request.param

# Ragged in M, in K, in both, a single row and a single column; the GPU adds V3's sizes.
SHAPES = [(1, 128), (37, 300), (130, 257), (256, 128), (129, 1)] + ([(4096, 7168), (1000, 1536)] if ON_GPU else [])


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    (q, s), (q_ref, s_ref) = got, want
    assert q.shape == q_ref.shape and q.stride() == q_ref.stride(), what
    assert s.shape == s_ref.shape and s.stride() == s_ref.stride(), what  # MN-major, padded pitch
    assert same_bits(q, q_ref), what
    assert torch.equal(s, s_ref), what


def _input(shape, dtype, device) -> torch.Tensor:
    """Random values over many binades, with an all-zero 1x128 tile and an all-zero 128x1 tile (the floor)."""
    x = rand(*shape, seed=sum(shape), device=device, scale=3.0)
    x = x * torch.exp2(rand(*shape, seed=1, device=device, scale=4.0).round())
    x[0, : min(128, shape[1])] = 0.0
    x[: min(128, shape[0]), -1] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2_scale", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_tilings_are_the_single_quantisers_bit_for_bit(device, shape, pow2_scale, dtype):
    x = _input(shape, dtype, device)
    for amax_floor in (fp8_quant.AMAX_FLOOR, 1e-12):  # the kernels' floor and the model's
        rows, cols_t = quant_act_both(x, pow2_scale, amax_floor)
        _assert_same(rows, quant_act_1x128(x, pow2_scale, amax_floor), f"1x128 {amax_floor=}")
        _assert_same(cols_t, quant_act_128x1_t(x, pow2_scale, amax_floor), f"128x1_t {amax_floor=}")
        assert cols_t[0].is_contiguous()


@pytest.mark.parametrize("pow2_scale", [False, True])
def test_infinities_give_the_single_quantisers_bits(device, pow2_scale):
    """An infinite element makes its row's and its column's scale infinite; both copies still match."""
    x = _input((130, 257), torch.float32, device)
    x[5, 7], x[100, 200] = float("inf"), -float("inf")
    rows, cols_t = quant_act_both(x, pow2_scale)
    _assert_same(rows, quant_act_1x128(x, pow2_scale), "1x128")
    _assert_same(cols_t, quant_act_128x1_t(x, pow2_scale), "128x1_t")
    assert rows[1].isinf().sum() == 2 and cols_t[1].isinf().sum() == 2


def test_a_strided_input_reads_its_own_layout(device):
    """x given as a transposed view (column-major) or a slice: the same bits as the single quantisers."""
    base = _input((260, 300), torch.bfloat16, device)
    for x in (base.t(), base[3:200, 10:290]):
        rows, cols_t = quant_act_both(x)
        _assert_same(rows, quant_act_1x128(x), "1x128")
        _assert_same(cols_t, quant_act_128x1_t(x), "128x1_t")


# (SUB, num_warps): the autotuner's candidates on the GPU; in the interpreter the whole tile and chunks
CANDIDATES = ([(c.kwargs["SUB"], c.num_warps) for c in fp8_quant._both_configs()] if ON_GPU
              else [(128, 4), (32, 4), (16, 4)])


@pytest.mark.parametrize("shape", [(130, 257), *([(4096, 2048)] if ON_GPU else [])])
def test_every_autotune_candidate_is_bit_exact(device, shape):
    """The autotuner keeps whichever candidate runs fastest, so each one must give the single quantisers' bits."""
    x = _input(shape, torch.bfloat16, device)
    want_rows, want_t = quant_act_1x128(x, amax_floor=1e-12), quant_act_128x1_t(x, amax_floor=1e-12)
    M, K = shape
    for sub, warps in CANDIDATES:
        q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=device)
        qt = torch.empty((K, M), dtype=torch.float8_e4m3fn, device=device)
        s, st = fp8_quant._empty_mn_major_scales(M, K, device), fp8_quant._empty_mn_major_scales(K, M, device)
        fp8_quant._quant_both_kernel.fn[(-(-M // 128), -(-K // 128))](
            x, q, s, qt, st, M, K, 0, *x.stride(), *q.stride(), *s.stride(), qt.stride(0), *st.stride(),
            POW2=False, FLOOR=1e-12, ROW_MAJOR=True, CAST=fp8_quant._cast(x.device, None), BLOCK=128, SUB=sub,
            num_warps=warps)
        _assert_same((q, s), want_rows, f"1x128 {sub=} {warps=}")
        _assert_same((qt, st), want_t, f"128x1_t {sub=} {warps=}")


def test_refuses_what_the_single_quantisers_refuse(device):
    with pytest.raises(ValueError, match="2-D float tensor"):
        quant_act_both(torch.zeros(2, 3, 128, device=device))
    with pytest.raises(ValueError, match="2-D float tensor"):
        quant_act_both(torch.zeros(4, 128, dtype=torch.int32, device=device))


_COMPILE_SCRIPT = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moeplan.kernels import fp8_quant

sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "qt_ptr": "*fp8e4nv", "st_ptr": "*fp32"} | {
    n: "i32" for n in ("M", "K", "size_key", "stride_xm", "stride_xk", "stride_qm", "stride_qk", "stride_sm",
                       "stride_sk", "stride_qt", "stride_stk", "stride_stm")}
out = {}
for config in fp8_quant._both_configs():
    for cast in (0, 2):
        consts = {"POW2": False, "FLOOR": 1e-12, "ROW_MAJOR": True, "CAST": cast, "BLOCK": 128, **config.kwargs}
        src = ASTSource(fp8_quant._quant_both_kernel.fn, sig | {k: "constexpr" for k in consts}, consts)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
        out[f"{config.kwargs['SUB']},{config.num_warps},{cast}"] = kernel.asm["ptx"]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_candidate_compiles_for_sm90_and_chunks_never_spill(tmp_path):
    """Offline (a process without the interpreter, then ptxas -arch=sm_90a): every autotune candidate compiles,
    with the emulated cast and the fp16 hardware one, and the chunked ones (SUB <= 32) spill no registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-P", "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    ptxs = json.loads(res.stdout)
    assert len(ptxs) == 12
    for name, ptx in ptxs.items():
        (tmp_path / "k.ptx").write_text(ptx)
        report = subprocess.run([str(_tools() / "ptxas"), "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o",
                                 str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
        spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
        if int(name.split(",")[0]) <= 32:
            assert spills == 0, (name, report)
