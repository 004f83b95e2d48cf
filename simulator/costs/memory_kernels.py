"""Memory-bound kernel classes in the cost tables: one HBM fraction per class, and the measurement files.

``benchmarks/elementwise_bench.py`` writes one file per memory system (``ELEMENTWISE_FILES``):
``data/h100-elementwise.json`` (an H100 SXM5, HBM3 at 3.35 TB/s) and ``data/h200-elementwise.json`` (an
H200, HBM3e at 4.8 TB/s): per kernel class of ``simulator.costs.elementwise``, the ideal bytes, the median
seconds and their fraction of that GPU's datasheet HBM bandwidth, forward and backward.
``elementwise_file`` says which file a GPU of the cluster presets takes; ``packaged_memory_kernels`` turns
its rows the tables take (``in_table``, not skipped) into ``MemoryKernelPoint`` s, or none when the
package has no such file.

A class's price is affine in its bytes, per pass and per call (``costs.kernels.memory_s``):
t = fixed_s + bytes / (datasheet HBM x frac). The fixed term is what a call costs whatever its size (launches,
and the small latency-bound kernels of e.g. the router's top-k and sorts over tokens x experts FP32), which a
fraction at one size cannot tell from bandwidth: priced by bytes alone, a model with 32 routed experts pays an
eighth of V3's router time, where the kernels take about as long. ``orchestrator.calibration.memory_classes``
times each per-token class at two token counts (the run's and a quarter of it), takes the line's intercept as
``fixed_s`` (clamped at 0, and at what leaves the bytes at most the datasheet; a clamp is recorded) and sets the
fraction so that the two give back the main point's seconds exactly; a once-a-step class (``Case.step_bytes``)
keeps one size and no fixed term. A file or point without ``fixed_s`` (the H200 file, and the H100 file before
2026-12-07 05:52 UTC) prices as before: bytes at the fraction alone.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeplan.simulator.costs.elementwise import KERNEL_CLASSES
from moeplan.simulator.spec.errors import first_error_line

MemoryKernel = Literal[KERNEL_CLASSES]


class MemoryKernelPoint(BaseModel):
    """Achieved / datasheet HBM bandwidth of one memory-bound kernel class, at its ideal bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel: MemoryKernel
    fwd_frac: float = Field(..., gt=0, le=1, description="A class with backward bytes only: the backward's.")
    bwd_frac: float | None = Field(None, gt=0, le=1, description="None = the forward's.")
    fwd_fixed_s: float | None = Field(None, ge=0, description="Seconds a call costs beside its bytes (module "
                                      "docstring); None = 0 (a fraction at one size). A class with backward "
                                      "bytes only: the backward's.")
    bwd_fixed_s: float | None = Field(None, ge=0, description="None = the forward's (as bwd_frac).")
    source: str


class _Pass(BaseModel):
    """One pass of a class as ``memory_classes.measure`` writes it: the main point (``bytes``, ``s``; ``bytes_per_s``
    their quotient) and, where fitted, the second point (``small_bytes``, ``small_s``), the line's intercept and
    the ``fixed_s`` taken from it (``fixed_clamped``: not the intercept); ``hbm_frac`` prices the bytes beside
    ``fixed_s`` (None = 0): together they give back ``s``."""

    bytes: float = Field(..., gt=0)
    s: float = Field(..., gt=0)
    bytes_per_s: float = Field(..., gt=0)
    hbm_frac: float = Field(..., gt=0, le=1)
    small_bytes: float | None = Field(None, gt=0)
    small_s: float | None = Field(None, gt=0)
    intercept_s: float | None = None
    fixed_s: float | None = Field(None, ge=0)
    fixed_clamped: bool | None = None


class _ElementwiseRow(BaseModel):
    kernel: MemoryKernel
    implementation: str
    in_table: bool
    shape: str
    fwd: _Pass | None
    bwd: _Pass | None
    skipped: str | None

    @model_validator(mode="after")
    def _measured_or_skipped(self) -> _ElementwiseRow:
        if (self.fwd is None and self.bwd is None) == (self.skipped is None):
            raise ValueError(f"kernel={self.kernel!r}: give exactly one of fwd or bwd (measured) and skipped (why not)")
        return self

    def point_fields(self) -> dict:
        """The fields of its ``MemoryKernelPoint`` but kernel and source (``point_fields``)."""
        return point_fields(*(p.model_dump() if p else None for p in (self.fwd, self.bwd)))


def point_fields(fwd: dict | None, bwd: dict | None) -> dict:
    """A measured class's ``MemoryKernelPoint`` fractions and fixed seconds from its passes (dicts with
    ``hbm_frac`` and, where fitted, ``fixed_s``; at least one given): a class with backward bytes only takes its
    backward's for both; a fraction above 1 (a point above its peak) reads as 1."""
    first = fwd if fwd is not None else bwd
    return {"fwd_frac": min(1.0, first["hbm_frac"]), "bwd_frac": min(1.0, bwd["hbm_frac"]) if bwd else None,
            "fwd_fixed_s": first.get("fixed_s"), "bwd_fixed_s": bwd.get("fixed_s") if bwd else None}


class ElementwiseMeasurements(BaseModel):
    """The file ``benchmarks/elementwise_bench.py`` writes (the fields the tables read)."""

    command: str
    date: str
    device: str
    tokens: int = Field(..., gt=0)
    kernels: tuple[_ElementwiseRow, ...]

    @model_validator(mode="after")
    def _one_table_row_per_kernel(self) -> ElementwiseMeasurements:
        rows = [r.kernel for r in self.kernels if r.in_table]
        dup = next((k for k in rows if rows.count(k) > 1), None)
        if dup is not None:
            raise ValueError(f"kernels: {rows.count(dup)} rows of kernel={dup!r} have in_table=true (one at most)")
        return self


# Memory system -> its packaged measurement file. The H800 SXM5 is the H100 SXM5 with NVLink cut: the
# same 80 GB of HBM3 at 3.35 TB/s (``presets.clusters``: [H100-DS], [H800]; ``h800_gpu().hbm_bytes_per_s``).
ELEMENTWISE_FILES = {"h100": "data/h100-elementwise.json", "h200": "data/h200-elementwise.json"}


def elementwise_file(gpu_name: str) -> str:
    """The measurement file (a value of ``ELEMENTWISE_FILES``) for a GPU name of the cluster presets: an
    H100's or H800's (``H100-SXM5``, ``H800-SXM5``) the H100 file, any other (H200, or a GPU no file
    measured) the H200 file."""
    return ELEMENTWISE_FILES["h100" if gpu_name.upper().startswith(("H100", "H800")) else "h200"]


def load_elementwise(path: str | Path) -> ElementwiseMeasurements:
    """A measurement file of ``benchmarks/elementwise_bench.py``; a malformed one raises ValueError with
    one line naming the file and the field."""
    try:
        return ElementwiseMeasurements.model_validate_json(Path(path).read_text())
    except ValidationError as exc:
        raise ValueError(first_error_line(exc, Path(path).name)) from exc


def memory_kernel_points(data: ElementwiseMeasurements, label: str) -> tuple[MemoryKernelPoint, ...]:
    """[EW]: one point per class the file measured with the implementation the tables take (``in_table``), its
    fixed seconds too where the file fitted them."""
    return tuple(
        MemoryKernelPoint(kernel=r.kernel, **r.point_fields(),
                          source=f"[EW] {label}: {r.implementation} at {r.shape} ({data.device}, {data.date})")
        for r in data.kernels if r.in_table and (r.fwd or r.bwd) is not None)


def packaged_elementwise(gpu_name: str) -> ElementwiseMeasurements | None:
    """The package's measurement file for a GPU name (``elementwise_file``); None when the package lacks it."""
    resource = files("moeplan.simulator.costs").joinpath(elementwise_file(gpu_name))
    return load_elementwise(Path(str(resource))) if resource.is_file() else None


@lru_cache(maxsize=None)
def packaged_memory_kernels(gpu_name: str) -> tuple[MemoryKernelPoint, ...]:
    """[EW] from the package's measurement file for a GPU name (``elementwise_file``); none (``memory_frac``
    everywhere) when the package lacks it."""
    data = packaged_elementwise(gpu_name)
    return () if data is None else memory_kernel_points(data, Path(elementwise_file(gpu_name)).name)
