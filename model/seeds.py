"""Seeds derived from names, so that separate processes draw the same numbers for the same thing."""

from __future__ import annotations

import zlib


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from a run's seed and a name (a parameter's, a batch's): stable across processes and runs."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % (2**63)
