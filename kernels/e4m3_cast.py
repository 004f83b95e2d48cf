"""fp32 → FP8 E4M3 inside a Triton kernel: the hardware's cvt where it is proven bit-exact, else integer emulation.

``CAST`` (a constexpr of every quantiser; names in ``CASTS``) picks one of three paths, all rounding to nearest
even and giving ±448 beyond:

* ``EMULATED``: clamp, then round by integer arithmetic on the fp32 bits (``e4m3_emulated``). Right on every
  backend; ~24 SASS instructions an element more than ``HARDWARE`` (60 against 36 in the rows quantiser's
  32x128 tile compiled for sm_90a, 2026-12-06; 43 with ``HARDWARE_F16``).
* ``HARDWARE``: Triton's own ``.to(tl.float8e4nv)``, which Triton 3.6 lowers on sm_89+ to
  ``cvt.rn.satfinite.e4m3x2.f32`` (two elements an instruction; ``Fp32_to_Fp8E4M3Nv`` in
  third_party/nvidia/lib/TritonNVIDIAGPUToLLVM/ElementwiseOpToLLVM.cpp, and in the PTX of our sm_90
  compile): one rounding to nearest even, sign-preserving MAX_NORM (448) for any larger magnitude
  (PTX ISA, cvt, ``.satfinite``), so the same clamp-then-round as the emulation.
* ``HARDWARE_F16``: in case the fp32 cvt rounds twice (through fp16; this file's earlier note said a GPU cast
  "may"): fp32 → fp16 rounded to odd (``cvt.rz`` plus a sticky bit), then the hardware's fp16 → E4M3 cvt.
  Rounding to odd with 2+ more bits than the target, then to nearest, is rounding to nearest once (Boldo &
  Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC
  2008); fp16 keeps 11 bits to E4M3's 4, and its subnormal step 2**-24 is far below E4M3's 2**-9.

``cast_for_device(device)`` picks the path once per process and device: a probe runs ``HARDWARE``, then
``HARDWARE_F16``, against the emulation on ``probe_values()`` (every E4M3 value and rounding boundary) and
keeps the first that gives the same bits, with one warning when it is not ``HARDWARE``. The interpreter
always emulates: its fp8 cast is wrong (Triton 3.6.0's rounds 12,094 of the 87,100 probe values otherwise than
torch, e.g. 0.0029296875 to code 1 for 2, a tie that goes to even; checked 2026-12-06), and so does a GPU
before sm_89 (no E4M3 cvt).
"""

from __future__ import annotations

import functools
import warnings

import torch

from .triton_compat import INTERPRET, cdiv, tl, triton

FP8_DTYPE = torch.float8_e4m3fn
MIN_HW_CAPABILITY = (8, 9)  # PTX ISA: cvt to .e4m3x2 needs sm_89 (Ada) or later
EMULATED, HARDWARE, HARDWARE_F16 = 0, 1, 2
CASTS = {"emulated": EMULATED, "hardware": HARDWARE, "hardware_f16": HARDWARE_F16}
_HARDWARE_C, _HARDWARE_F16_C = tl.constexpr(HARDWARE), tl.constexpr(HARDWARE_F16)  # readable inside kernels
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
def e4m3_via_f16(q):
    """fp32 → E4M3 by the hardware's fp16 → E4M3 cvt, after rounding to fp16 by odd (exact: module docstring)."""
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    h = q.to(tl.float16, fp_downcast_rounding="rtz")  # cvt.rz.f16.f32
    sticky = (h.to(tl.float32) != q).to(tl.int16)  # inexact: the odd neighbour is rz(q) with its last bit set
    h = (h.to(tl.int16, bitcast=True) | sticky).to(tl.float16, bitcast=True)
    return h.to(tl.float8e4nv)  # cvt.rn.satfinite.e4m3x2.f16x2


@triton.jit
def e4m3_cast(q, CAST: tl.constexpr):
    """fp32 → E4M3, nearest even, ±448 beyond, by the path ``CAST`` names (module docstring)."""
    if CAST == _HARDWARE_C:
        return q.to(tl.float8e4nv)
    elif CAST == _HARDWARE_F16_C:
        return e4m3_via_f16(q)
    else:
        return e4m3_emulated(q)


@triton.jit
def _e4m3_probe_kernel(x_ptr, q_ptr, n, CAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(q_ptr + offs, e4m3_cast(x, CAST), mask=offs < n)


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


def cast_on_device(x: torch.Tensor, cast: int) -> torch.Tensor:
    """E4M3 bits (uint8, x's shape) of the fp32 tensor ``x`` by the path ``cast``, on x's device."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    _e4m3_probe_kernel[(cdiv(x.numel(), _PROBE_BLOCK),)](x, q, x.numel(), CAST=cast, BLOCK=_PROBE_BLOCK)
    return q.view(torch.uint8)


def probe_mismatches(device: torch.device, cast: int) -> int:
    """How many of ``probe_values()`` the path ``cast`` rounds otherwise than the emulation on ``device``."""
    x = probe_values().to(device)
    return int((cast_on_device(x, cast) != cast_on_device(x, EMULATED)).sum())


def cast_for_device(device: torch.device | str) -> int:
    """The E4M3 path of the quantisers on ``device``: ``HARDWARE`` or ``HARDWARE_F16`` on a CUDA device of sm_89
    or later whose probe gave the emulation's bits with it (run once per process and device), else ``EMULATED``.
    The probe synchronises the device, so the first quantiser call (like the autotuner's) comes before any
    CUDA-graph capture."""
    device = torch.device(device)
    if INTERPRET or device.type != "cuda":
        return EMULATED
    return _probed_cast(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _probed_cast(index: int) -> int:
    if torch.cuda.get_device_capability(index) < MIN_HW_CAPABILITY:
        return EMULATED
    device, n = torch.device("cuda", index), probe_values().numel()
    failures = []
    for name in ("hardware", "hardware_f16"):
        try:
            with torch.cuda.device(index):  # Triton launches on the current device
                bad = probe_mismatches(device, CASTS[name])
        except Exception as exc:  # noqa: BLE001 (a compile or launch failure falls back the same way)
            first_line = str(exc).partition("\n")[0][:120]
            failures.append(f"{name} failed to run ({type(exc).__name__}: {first_line})")
            continue
        if not bad:
            break
        failures.append(f"{name} differs from the emulation on {bad} of {n} probe values")
    else:
        name = "emulated"
    if failures:
        warnings.warn(f"fp8 quantisers on {device}: the E4M3 cast {'; '.join(failures)}; using {name}",
                      RuntimeWarning, stacklevel=3)
    return CASTS[name]
