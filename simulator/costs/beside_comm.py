"""A GEMM running while a communication kernel holds some of the GPU's SMs (issue 21, capability 7).

Two effects, kept apart so that each has its own evidence:

1. **Wave quantisation.** A Hopper GEMM kernel computes one output tile per SM at a time, so its time
   goes in waves of ``ceil(tiles / sms)``. With ``taken`` SMs held by a dispatch or combine kernel the
   same tiles run in ``ceil(tiles / (sms - taken))`` waves: a GEMM of fewer tiles than the SMs left loses
   nothing, a large one loses about the linear SM share, one just past a wave boundary loses a whole wave.
   ``wave_ratio`` is that ratio, applied to the time the tables give on all SMs. Tile: 128 x 128 output
   elements (``TILE_M``, ``TILE_N``): the tile shape of CUTLASS 3.x's Hopper warp-specialised GEMM
   examples (``TileShape = Shape<_128,_128,_64>``, example 48) and DeepGEMM's ``BLOCK_M = 128``
   (DeepGEMM README, 2025-02-25; ``shared/reference/deepseek-v3.md`` §11.4). Grouped GEMMs count tiles
   per group.
2. **Interference.** The communication kernel also moves bytes through HBM and L2 that the GEMM
   needs. ``BesidePoint`` is one measurement of it (``orchestrator/calibration/beside.py``: the GEMM
   timed alone and beside a kernel occupying ``comm_sms`` SMs); its ``interference_frac`` is the
   measured slowdown beyond what wave quantisation explains. Tables without measurements
   (every packaged GPU table, until a GPU run of ``moeplan calibrate`` writes them) price **no**
   interference: the term is 0 until measured, never a guessed factor.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from moeplan.simulator.spec.numbers import Float, Int

TILE_M = 128  # output rows per tile (CUTLASS 3.x Hopper examples, DeepGEMM BLOCK_M)
TILE_N = 128  # output columns per tile (CUTLASS 3.x Hopper examples)


def gemm_tiles(m: int, n: int, groups: int = 1) -> int:
    """Output tiles of ``groups`` products of (m x k) @ (k x n)."""
    return groups * math.ceil(m / TILE_M) * math.ceil(n / TILE_N)


def wave_ratio(tiles: int, sms: int, sms_left: int) -> float:
    """Time on ``sms_left`` SMs over time on all ``sms``: ``ceil(tiles / sms_left) / ceil(tiles / sms)``."""
    assert 0 < sms_left <= sms, f"{sms_left=} {sms=}"
    if tiles <= 0:
        return 1.0
    return math.ceil(tiles / sms_left) / math.ceil(tiles / sms)


class BesidePoint(BaseModel):
    """One GEMM timed alone and beside a communication kernel holding ``comm_sms`` of ``sm_count`` SMs
    (on a CPU: a matmul beside a gloo all-reduce, ``comm_sms`` = the cores its processes run on)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    m: Int = Field(..., gt=0)
    n: Int = Field(..., gt=0)
    k: Int = Field(..., gt=0)
    sm_count: Int = Field(..., gt=0, le=2**16, description="SMs (CPU: cores) of the device measured.")
    comm_sms: Int = Field(..., ge=0, le=2**16, description="SMs (CPU: cores) the communication kernel held.")
    alone_s: Float = Field(..., gt=0, le=3600, description="The GEMM alone, median seconds.")
    beside_s: Float = Field(..., gt=0, le=3600, description="The same GEMM beside the communication, median seconds.")
    source: str

    @property
    def interference_frac(self) -> float:
        """Slowdown beyond wave quantisation on the SMs left: ``beside / (alone x wave_ratio) - 1``."""
        left = max(1, self.sm_count - self.comm_sms)
        return self.beside_s / (self.alone_s * wave_ratio(gemm_tiles(self.m, self.n), self.sm_count, left)) - 1.0


def interference_frac(points: tuple[BesidePoint, ...], comm_sms: int) -> float:
    """Mean measured interference of the points nearest ``comm_sms``; 0 without measurements."""
    if not points:
        return 0.0
    nearest = min(abs(p.comm_sms - comm_sms) for p in points)
    chosen = [p.interference_frac for p in points if abs(p.comm_sms - comm_sms) == nearest]
    return sum(chosen) / len(chosen)


def beside_comm_factor(points: tuple[BesidePoint, ...], m: int, n: int, groups: int, sms: int, sms_left: int) -> float:
    """Time of a GEMM on ``sms_left`` of ``sms`` SMs beside communication over its time on all of them."""
    if sms_left >= sms:
        return 1.0
    return wave_ratio(gemm_tiles(m, n, groups), sms, sms_left) * (1.0 + interference_frac(points, sms - sms_left))
