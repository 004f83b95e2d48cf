"""Process-wide test state, set once before any test module is imported.

Without a GPU, every Triton kernel runs in Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when
``moeplan.kernels`` is first imported, so it is set here, before collection imports any test module;
no test file sets it itself, and any file runs alone or in any order.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
