"""The hardware E4M3 casts of the FP8 quantisers (kernels/e4m3_cast.py) against the integer emulation.

On the CPU (Triton interpreter): the probe's values cover every E4M3 code and rounding boundary, the emulation
gives torch's bits on all of them, rounding to odd through fp16 is rounding once (in torch), the interpreter
never takes a hardware path, a probe that disagrees falls back with one warning, and the power-of-two scales'
reciprocal multiply is the division at extreme exponents. On CUDA (sm_89+): the fp16 path (exact by theorem)
and the path the probe chose pass the probe, and every autotune candidate of every quantiser gives the same
bits with them as with the emulation, on the probe's values and on random tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from moeplan.kernels import e4m3_cast, fp8_quant
from moeplan.kernels.fp8_quant import (
    quant_act_1x128,
    quant_act_1x128_ref,
    quant_act_128x1_t_ref,
    quant_weight_128x128,
    quant_weight_128x128_ref,
)

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
HW_GPU = ON_GPU and torch.cuda.get_device_capability() >= e4m3_cast.MIN_HW_CAPABILITY
needs_hw = pytest.mark.skipif(not HW_GPU, reason="needs a CUDA GPU of sm_89 or later")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def torch_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The reference cast (clamp, then torch's round to nearest even), as uint8 codes."""
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)


@pytest.fixture
def fresh_probe_cache():
    e4m3_cast._probed_cast.cache_clear()
    yield
    e4m3_cast._probed_cast.cache_clear()


@pytest.fixture
def fake_gpu(monkeypatch, fresh_probe_cache):
    """No interpreter, and CUDA devices of the capability the test sets (``fake_gpu[0]``, sm_90 unless told);
    the probe itself is the test's."""
    capability = [(9, 0)]
    monkeypatch.setattr(e4m3_cast, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[0])
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    return capability


def test_probe_values_reach_every_code_tie_and_saturation():
    x = e4m3_cast.probe_values()
    assert x.dtype == torch.float32 and not x.isnan().any()
    assert set(torch_e4m3(x).tolist()) == set(range(256)) - {0x7F, 0xFF}  # every code but the two NaNs
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[~codes.isnan() & (codes >= 0)].sort().values
    ties = set(((grid[1:] + grid[:-1]) / 2).tolist())
    assert ties <= set(x.tolist()) and {-t for t in ties} <= set(x.tolist())
    assert {float("inf"), -float("inf"), 464.0, 2.0**-10, 2.0**-149} <= set(x.tolist())


def test_emulation_is_torch_on_every_probe_value():
    """The emulated cast (what the interpreter and the fallback run) against torch's round to nearest even."""
    x = e4m3_cast.probe_values()
    device = "cuda" if ON_GPU else "cpu"
    assert torch.equal(e4m3_cast.cast_on_device(x.to(device), e4m3_cast.EMULATED).cpu(), torch_e4m3(x))


def test_rounding_to_odd_through_fp16_is_rounding_once():
    """``e4m3_via_f16``'s recipe in torch (fp16 truncated, its last bit set where inexact, then torch's fp16 ->
    E4M3 round to nearest even) gives the direct rounding's bits on every probe value; plain fp16 rounding
    to nearest first does not (double rounding), so the probe values would catch a cvt that did that."""
    x = e4m3_cast.probe_values().clamp(-448.0, 448.0)
    nearest = x.to(torch.float16)
    bits = nearest.view(torch.int16)
    truncated = torch.where(nearest.float().abs() > x.abs(), bits - 1, bits)  # sign-magnitude: one step to zero
    odd = truncated | (truncated.view(torch.float16).float() != x).to(torch.int16)
    assert torch.equal(odd.view(torch.float16).to(torch.float8_e4m3fn).view(torch.uint8), torch_e4m3(x))
    assert not torch.equal(nearest.to(torch.float8_e4m3fn).view(torch.uint8), torch_e4m3(x))


@pytest.mark.skipif(ON_GPU, reason="the interpreter's own verdict")
def test_interpreter_keeps_the_emulation():
    assert e4m3_cast.cast_for_device("cpu") == e4m3_cast.cast_for_device("cuda:0") == e4m3_cast.EMULATED
    with pytest.raises(ValueError, match="cast='hardware' needs a CUDA device"):
        quant_act_1x128(torch.ones(2, 128), cast="hardware")
    with pytest.raises(ValueError, match="cast='fast' must be one of"):
        quant_act_1x128(torch.ones(2, 128), cast="fast")


@pytest.mark.parametrize("outcomes, chosen, says", [
    ((5, 7), e4m3_cast.EMULATED, ["hardware differs from the emulation on 5 of", "hardware_f16 differs", "using emulated"]),
    ((RuntimeError("ptxas died"), 0), e4m3_cast.HARDWARE_F16, ["hardware failed to run (RuntimeError: ptxas died)",
                                                                "using hardware_f16"]),
])
def test_a_probe_that_disagrees_falls_back_and_warns_once(monkeypatch, fake_gpu, outcomes, chosen, says):
    calls = []

    def probe(device, cast):
        outcome = outcomes[len(calls)]
        calls.append(cast)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(e4m3_cast, "probe_mismatches", probe)
    with pytest.warns(RuntimeWarning) as record:
        assert e4m3_cast.cast_for_device("cuda:0") == chosen
    assert e4m3_cast.cast_for_device("cuda:0") == chosen  # cached: no second probe, no second warning
    assert calls == [e4m3_cast.HARDWARE, e4m3_cast.HARDWARE_F16] and len(record) == 1
    assert all(part in str(record[0].message) for part in says), str(record[0].message)


def test_a_probe_that_passes_says_nothing(monkeypatch, fake_gpu, recwarn):
    monkeypatch.setattr(e4m3_cast, "probe_mismatches", lambda device, cast: 0)
    assert e4m3_cast.cast_for_device("cuda:0") == e4m3_cast.HARDWARE
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_old_gpus_never_probe(monkeypatch, fake_gpu):
    fake_gpu[0] = (8, 0)
    monkeypatch.setattr(e4m3_cast, "probe_mismatches", lambda device, cast: pytest.fail("probed an sm_80"))
    assert e4m3_cast.cast_for_device("cuda:1") == e4m3_cast.EMULATED


def test_power_of_two_reciprocal_is_the_division():
    """The claim quantize_e4m3's POW2 path rests on, in IEEE fp32 (torch's CPU math, no flush to zero):
    x * 2**-k == x / 2**k, bit for bit, for every k a pow2 scale takes, subnormal results included."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    for k in range(-126, 128):
        scale = torch.tensor(2.0**k, dtype=torch.float32)
        recip = torch.ones(()) / scale
        assert same_bits(x * recip, x / scale), k


@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e37])
def test_pow2_quantisers_match_the_reference_at_extreme_exponents(magnitude):
    """Tiles whose power-of-two scale (hence its reciprocal) sits near either end of fp32's exponents."""
    device = "cuda" if ON_GPU else "cpu"
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(130, 257, generator=g) * magnitude).to(device)
    q, s = quant_act_1x128(x, pow2_scale=True, amax_floor=1e-35)
    q_ref, s_ref = quant_act_1x128_ref(x, pow2_scale=True, amax_floor=1e-35)
    assert torch.equal(s, s_ref) and same_bits(q, q_ref)
    q, s, qt = quant_weight_128x128(x, pow2_scale=True, transposed=True, amax_floor=1e-35)
    q_ref, s_ref = quant_weight_128x128_ref(x, pow2_scale=True, amax_floor=1e-35)
    assert torch.equal(s, s_ref) and same_bits(q, q_ref) and same_bits(qt, q_ref.mT)


# ----------------------------------------------------------------------------- CUDA, sm_89+


def _rows_candidate(view, config, cast, pow2):
    R, C = view.shape
    q = torch.empty((R, C), dtype=torch.float8_e4m3fn, device=view.device)
    s = torch.empty((R, -(-C // 128)), dtype=torch.float32, device=view.device)
    block_r = config.kwargs["BLOCK_R"]
    fp8_quant._quant_rows_kernel.fn[(-(-R // block_r), -(-C // 128))](
        view, q, s, R, C, 0, *view.stride(), *q.stride(), *s.stride(), POW2=pow2, FLOOR=fp8_quant.AMAX_FLOOR,
        ROW_MAJOR=view.stride(1) == 1, CAST=cast, BLOCK_C=128, num_warps=config.num_warps, **config.kwargs)
    return q, s


def _blocks_candidate(w, config, cast, pow2):
    E, N, K = w.shape
    q = torch.empty((E, N, K), dtype=torch.float8_e4m3fn, device=w.device)
    qt = torch.empty((E, K, N), dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((E, -(-N // 128), -(-K // 128)), dtype=torch.float32, device=w.device)
    fp8_quant._quant_blocks_kernel.fn[(-(-N // 128), -(-K // 128), E)](
        w, q, qt, s, N, K, *w.stride(), *q.stride(), *qt.transpose(1, 2).stride(), *s.stride(), POW2=pow2,
        FLOOR=fp8_quant.AMAX_FLOOR, BLOCK=128, WRITE_Q=True, WRITE_T=True, CAST=cast, num_warps=config.num_warps,
        **config.kwargs)
    return q, qt, s


def _probe_rows() -> torch.Tensor:
    """The probe's values |x| <= 448 as rows of 127 behind a 448: every tile's scale is exactly 1, so the
    quantisers cast the values themselves (the saturating ones are the probe kernel's)."""
    x = e4m3_cast.probe_values()
    x = x[x.abs() <= 448.0]
    x = torch.nn.functional.pad(x, (0, -x.numel() % 127)).view(-1, 127)
    x = torch.cat([torch.full((x.shape[0], 1), 448.0), x], dim=1)  # (rows, 128)
    return torch.nn.functional.pad(x, (0, 0, 0, -x.shape[0] % 128)).cuda()  # whole 128-row tiles


def _hardware_casts() -> list[int]:
    """The fp16 path (exact by theorem) and the path the probe chose, where that is another."""
    return sorted({e4m3_cast.HARDWARE_F16, e4m3_cast.cast_for_device("cuda")})


@pytest.mark.gpu
@needs_hw
def test_the_fp16_path_and_the_chosen_one_pass_the_probe(fresh_probe_cache):
    chosen = e4m3_cast.cast_for_device("cuda")
    assert chosen in (e4m3_cast.HARDWARE, e4m3_cast.HARDWARE_F16)
    for cast in _hardware_casts():
        assert e4m3_cast.probe_mismatches(torch.device("cuda"), cast) == 0, cast


def _inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = torch.randn(4096, 2048, generator=g, device="cuda") * 3
    return {"probe": _probe_rows(), "randn_bf16": rand.bfloat16(), "randn_odd": rand[:1000, :1300].contiguous()}


@pytest.mark.gpu
@needs_hw
@pytest.mark.parametrize("pow2", [False, True])
def test_every_rows_candidate_gives_the_emulations_bits(pow2):
    for name, x in _inputs().items():
        for view, ref in ((x, quant_act_1x128_ref(x, pow2)), (x.t(), quant_act_128x1_t_ref(x, pow2))):
            for config in fp8_quant._quant_rows_kernel.configs:
                emulated = _rows_candidate(view, config, e4m3_cast.EMULATED, pow2)
                assert same_bits(emulated[0], ref[0]) and torch.equal(emulated[1], ref[1]), (name, config)
                for cast in _hardware_casts():
                    hardware = _rows_candidate(view, config, cast, pow2)
                    assert all(same_bits(a, b) for a, b in zip(emulated, hardware)), (name, view.stride(), config, cast)


@pytest.mark.gpu
@needs_hw
@pytest.mark.parametrize("pow2", [False, True])
def test_every_blocks_candidate_gives_the_emulations_bits(pow2):
    for name, x in _inputs().items():
        w = x.unsqueeze(0)
        q_ref, s_ref = quant_weight_128x128_ref(w, pow2)
        for config in fp8_quant._quant_blocks_kernel.configs:
            emulated = _blocks_candidate(w, config, e4m3_cast.EMULATED, pow2)
            assert same_bits(emulated[0], q_ref) and same_bits(emulated[1], q_ref.mT), (name, config)
            assert torch.equal(emulated[2], s_ref), (name, config)
            for cast in _hardware_casts():
                hardware = _blocks_candidate(w, config, cast, pow2)
                assert all(same_bits(a, b) for a, b in zip(emulated, hardware)), (name, config, cast)


# ----------------------------------------------------------------------------- offline compile (CPU)

_LOWERING_SCRIPT = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moeplan.kernels import e4m3_cast, fp8_quant

def ptx(fn, sig, consts, warps=4):
    src = ASTSource(fn, sig | {k: "constexpr" for k in consts}, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]

probe = {"x_ptr": "*fp32", "q_ptr": "*fp8e4nv", "n": "i32"}
rows = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"} | {n: "i32" for n in (
    "R", "C", "size_key", "stride_xr", "stride_xc", "stride_qr", "stride_qc", "stride_sr", "stride_sc")}
out = {f"probe{cast}": ptx(e4m3_cast._e4m3_probe_kernel, probe, {"CAST": cast, "BLOCK": 1024}) for cast in (0, 1, 2)}
for pow2 in (False, True):
    out[f"rows_pow2={pow2}"] = ptx(fp8_quant._quant_rows_kernel.fn, rows, {
        "POW2": pow2, "FLOOR": 1e-4, "ROW_MAJOR": True, "CAST": 1, "BLOCK_R": 32, "BLOCK_C": 128})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_lowering_facts_hold_offline(tmp_path):
    """What e4m3_cast's and quantize_e4m3's docstrings say Triton 3.6 emits for sm_90, from an offline compile
    (a process without the interpreter): the fp32 and fp16 E4M3 cvts, rz to fp16, and pow2 scales dividing
    once per row (the reciprocal) where other scales divide every element."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-P", "-c", _LOWERING_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    ptx = json.loads(res.stdout)
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx["probe1"] and "e4m3x2" not in ptx["probe0"]
    assert "cvt.rz.f16.f32" in ptx["probe2"] and "cvt.rn.satfinite.e4m3x2.f16x2" in ptx["probe2"]
    per_element, per_row = (ptx[f"rows_pow2={p}"].count("div.rn.f32") for p in (False, True))
    assert per_element >= 32 and per_row <= 2, (per_element, per_row)  # 32 elements a thread here
