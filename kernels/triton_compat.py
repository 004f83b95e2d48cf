"""Triton where it is missing or interpreted, so every module here imports on any machine.

* Without Triton (the CPU wheel of torch brings none) the torch references in each module still
  import and run; ``triton`` / ``tl`` are stand-ins whose kernels raise ``TritonUnavailable``.
* Under ``TRITON_INTERPRET=1`` (CPU CI) bf16 arithmetic is wrong, so kernels take an ``UPCAST``
  constexpr (``INTERPRET``) and move to fp32 right after ``tl.load``; on a GPU they keep bf16 for
  the tensor cores. And Triton 3.6's interpreter turns a scalar into an index with ``int()`` of a
  one-element array, which NumPy >= 2.4 refuses (``range(lo, hi)`` with run-time bounds fails):
  ``_fix_interpreter_index`` swaps in ``.item()``, only in the interpreter, only when it is on.
  Its fp32 -> bf16 cast truncates where a GPU rounds to nearest even; ``fp8_quant.cast_for_store``
  rounds first when ``INTERPRET_C``.
"""

import math
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonUnavailable(RuntimeError):
    """A kernel was launched on a machine without the ``triton`` package."""


class _MissingKernel:
    def __init__(self, fn):
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid):
        raise TritonUnavailable(f"{self.__name__} needs the 'triton' package, which is not installed")


class _MissingTriton:
    """Just enough of ``triton`` for the modules to import: decorators, Config, cdiv."""

    language = None

    @staticmethod
    def jit(fn=None, **kwargs):
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    @staticmethod
    def autotune(*args, **kwargs):
        return lambda fn: fn

    heuristics = autotune

    @staticmethod
    def Config(*args, **kwargs):  # noqa: N802 (mirrors triton.Config)
        return (args, kwargs)

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return cdiv(a, b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return next_power_of_2(n)


class _MissingLanguage:
    @staticmethod
    def constexpr(value):
        return value

    def __getattr__(self, name):
        return math.nan  # dtypes in annotations only; kernel bodies never run without Triton


def _fix_interpreter_index() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "_moeplan_index_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    interpreter._moeplan_index_fix = True


try:
    import triton
    import triton.language as tl
    import triton.testing  # noqa: F401 (benchmarks use triton.testing.do_bench)

    HAVE_TRITON = True
except ImportError:
    triton, tl = _MissingTriton(), _MissingLanguage()
    HAVE_TRITON = False

if HAVE_TRITON and INTERPRET:
    _fix_interpreter_index()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host: Triton 3.6's ``triton.cdiv`` is a ConstexprFunction whose call costs
    ~5 us of Python, several times per GEMM launch (measured on the CPU machine, 2026-12-01)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for the host (``triton.next_power_of_2`` is a
    ConstexprFunction too)."""
    return 1 << max(n - 1, 0).bit_length()


# For @triton.jit code: a global must be a constexpr to be read inside a kernel.
INTERPRET_C = tl.constexpr(INTERPRET)
