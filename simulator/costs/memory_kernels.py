"""Memory-bound kernel classes in the cost tables: one HBM fraction per class, and the measurement files.

``benchmarks/elementwise_bench.py`` writes one file per memory system (``ELEMENTWISE_FILES``):
``data/h100-elementwise.json`` (an H100 SXM5, HBM3 at 3.35 TB/s) and ``data/h200-elementwise.json`` (an
H200, HBM3e at 4.8 TB/s): per kernel class of ``simulator.costs.elementwise``, the ideal bytes, the median
seconds and their fraction of that GPU's datasheet HBM bandwidth, forward and backward.
``elementwise_file`` says which file a GPU of the cluster presets takes; ``packaged_memory_kernels`` turns
its rows the tables take (``in_table``, not skipped) into ``MemoryKernelPoint`` s, or none when the
package has no such file.
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
    source: str


class _Pass(BaseModel):
    bytes: float = Field(..., gt=0)
    s: float = Field(..., gt=0)
    bytes_per_s: float = Field(..., gt=0)
    hbm_frac: float = Field(..., gt=0, le=1)


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
    """[EW]: one point per class the file measured with the implementation the tables take (``in_table``)."""
    return tuple(
        MemoryKernelPoint(kernel=r.kernel, fwd_frac=(r.fwd or r.bwd).hbm_frac, bwd_frac=r.bwd.hbm_frac if r.bwd else None,
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
