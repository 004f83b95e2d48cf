"""Cost tables: what a GEMM, an attention kernel, a memory-bound kernel or a transfer costs on a GPU,
from measured or published points, each naming its source (``data/`` holds the measurement files).

May import: ``spec`` and ``presets``.
"""
