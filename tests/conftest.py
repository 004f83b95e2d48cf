"""Process-wide test state, set once before any test module is imported.

Without a GPU, every Triton kernel runs in Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when
``moeplan.kernels`` is first imported, so it is set here, before collection imports any test module;
no test file sets it itself, and any file runs alone or in any order.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton.language as tl
except ImportError:  # the CPU torch wheel ships no triton; the kernel tests skip
    tl = None

# Triton 3.6's interpreter swaps triton.language's builtins for its own while a kernel runs, and a
# @triton.jit helper called from a kernel swaps them again without swapping back
# (InterpretedFunction.__call__): after most interpreted kernel tests the language modules stay patched
# (seen by comparing them before and after each test). A Gluon kernel compiled offline later in the same
# process (the SASS tests) must see the real ones; once, on one xdist worker, it failed with the
# interpreter's code run on IR values. Each test therefore ends by restoring the real language modules.
_LANGUAGE = () if tl is None else (tl, tl.core, tl.math, tl.core.tensor)
_REAL = {module: dict(vars(module)) for module in _LANGUAGE}


@pytest.fixture(autouse=True)
def _real_triton_language():
    yield
    for module, names in _REAL.items():
        for name, value in names.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
