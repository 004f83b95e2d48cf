"""fp32 → FP8 E4M3 inside a Triton kernel: the hardware's cvt where it is proven bit-exact, else integer emulation.

* ``e4m3_emulated``: clamp to ±448, round to nearest even by integer arithmetic on the fp32 bits. Right on
  every backend, ~20 integer instructions an element.
* ``e4m3_cast(q, HW_CAST=True)``: Triton's own ``.to(tl.float8e4nv)``, which Triton 3.6 lowers on sm_89+ to
  ``cvt.rn.satfinite.e4m3x2.f32`` (two elements an instruction; ``Fp32_to_Fp8E4M3Nv`` in
  third_party/nvidia/lib/TritonNVIDIAGPUToLLVM/ElementwiseOpToLLVM.cpp, and in the PTX of our sm_90
  compile): one rounding to nearest even, sign-preserving MAX_NORM (448) for any larger magnitude
  (PTX ISA, cvt, ``.satfinite``), so the same clamp-then-round as the emulation.
* ``hardware_cast(device)``: whether a device's quantisers take the hardware path. Once per process and
  device, a probe runs both paths on ``probe_values()`` (every E4M3 value and every rounding boundary) and
  compares the bits; a disagreement keeps the emulation and warns once. The interpreter never takes the
  hardware path: its fp8 cast is wrong (Triton 3.6.0's rounds 12,094 of the 87,100 probe values otherwise
  than torch, e.g. 0.0029296875 to code 1 for 2, a tie that goes to even; checked 2026-12-06), and neither
  does a GPU before sm_89.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .triton_compat import INTERPRET, cdiv, tl, triton

FP8_DTYPE = torch.float8_e4m3fn
MIN_HW_CAPABILITY = (8, 9)  # PTX ISA: cvt to .e4m3x2 needs sm_89 (Ada) or later
_PROBE_BLOCK = 1024


@triton.jit
def e4m3_emulated(q):
    """fp32 → E4M3: clamped to ±448, rounded to nearest even by integer arithmetic on the fp32 bits."""
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    exponent = mag >> 23  # fp32 biased exponent
    # Normal E4M3 (|q| >= 2**-6): rebias 127 -> 7, keep 3 of 23 mantissa bits, ties to even.
    v = mag - (120 << 23)
    normal = (v + 0x7FFFF + ((v >> 20) & 1)) >> 20
    # Subnormal E4M3: |q| in units of 2**-9, rounded to an integer, ties to even.
    m24 = (mag & 0x7FFFFF) | 0x800000
    shift = tl.minimum(141 - exponent, 31)
    sub = (m24 + (1 << (shift - 1)) - 1 + ((m24 >> shift) & 1)) >> shift
    code = tl.where(exponent >= 121, normal, sub) | sign
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def e4m3_cast(q, HW_CAST: tl.constexpr):
    """fp32 → E4M3, nearest even, ±448 beyond: the hardware's cvt (HW_CAST) or ``e4m3_emulated``."""
    if HW_CAST:
        return q.to(tl.float8e4nv)
    return e4m3_emulated(q)


@triton.jit
def _e4m3_probe_kernel(x_ptr, q_ptr, n, HW_CAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(q_ptr + offs, e4m3_cast(x, HW_CAST), mask=offs < n)


def probe_values(sweep_step_bits: int = 1 << 12) -> torch.Tensor:
    """fp32 (n,) on the CPU, both signs of: every finite E4M3 value, every midpoint between neighbours and
    the fp32 either side of it (ties to even, the subnormal steps, 2**-10 below the smallest subnormal),
    values past 448 up to inf (saturation), fp32 subnormals, and every ``sweep_step_bits``-th fp32 bit
    pattern from 2**-12 to 512 (all of E4M3's range, at 2**11 patterns a binade by default)."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = codes[~codes.isnan() & (codes >= 0)].sort().values  # 0, 2**-9, ..., 448
    mid = (grid[1:] + grid[:-1]) / 2
    up, down = torch.full_like(mid, float("inf")), torch.zeros_like(mid)
    extremes = torch.tensor([448.0, 464.0, 480.0, 1e4, torch.finfo(torch.float32).max, float("inf"),
                             2.0**-10, 2.0**-11, 2.0**-126, 2.0**-149, 1e-40])
    ties = torch.cat([grid, mid, mid.nextafter(up), mid.nextafter(down), extremes, extremes.nextafter(up[:1]),
                      extremes.nextafter(down[:1])])
    lo, hi = (torch.tensor([2.0**-12, 512.0]).view(torch.int32)).tolist()
    sweep = torch.arange(lo, hi, sweep_step_bits, dtype=torch.int32).view(torch.float32)
    positive = torch.cat([ties, sweep])
    return torch.cat([positive, -positive])


def cast_on_device(x: torch.Tensor, hw_cast: bool) -> torch.Tensor:
    """E4M3 bits (uint8, x's shape) of the fp32 tensor ``x`` through ``e4m3_cast``, on x's device."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    _e4m3_probe_kernel[(cdiv(x.numel(), _PROBE_BLOCK),)](x, q, x.numel(), HW_CAST=hw_cast, BLOCK=_PROBE_BLOCK)
    return q.view(torch.uint8)


def probe_mismatches(device: torch.device) -> int:
    """How many of ``probe_values()`` the hardware cast rounds differently from the emulation on ``device``."""
    x = probe_values().to(device)
    return int((cast_on_device(x, True) != cast_on_device(x, False)).sum())


def hardware_cast(device: torch.device | str) -> bool:
    """Whether the quantisers on ``device`` use the hardware E4M3 cast: a CUDA device of sm_89 or later,
    not the interpreter, whose probe gave the emulation's bits (run once per process and device)."""
    device = torch.device(device)
    if INTERPRET or device.type != "cuda":
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return _probe_passed(index)


@functools.cache
def _probe_passed(index: int) -> bool:
    if torch.cuda.get_device_capability(index) < MIN_HW_CAPABILITY:
        return False
    device = torch.device("cuda", index)
    try:
        bad = probe_mismatches(device)
    except Exception as exc:  # noqa: BLE001 (a compile or launch failure falls back the same way)
        warnings.warn(f"fp8 quantisers on {device}: the hardware E4M3 cast failed to run ({exc!r}); "
                      "using the integer emulation", RuntimeWarning, stacklevel=3)
        return False
    if bad:
        n = probe_values().numel()
        warnings.warn(f"fp8 quantisers on {device}: the hardware E4M3 cast differs from the integer emulation on "
                      f"{bad} of {n} probe values; using the emulation", RuntimeWarning, stacklevel=3)
        return False
    return True
