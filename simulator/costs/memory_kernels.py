"""Memory-bound kernel classes in the cost tables: one HBM fraction per class, and the measurement file.

``benchmarks/elementwise_bench.py`` writes ``data/h200-elementwise.json``: per kernel class of
``simulator.costs.elementwise``, the ideal bytes, the median seconds and their fraction of the H200's
datasheet HBM bandwidth, forward and backward. ``packaged_memory_kernels`` turns the rows the tables
take (``in_table``, not skipped) into ``MemoryKernelPoint`` s, or none when the package has no file.
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


ELEMENTWISE_FILE = "data/h200-elementwise.json"


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


@lru_cache(maxsize=1)
def packaged_memory_kernels() -> tuple[MemoryKernelPoint, ...]:
    """[EW] from the package's measurement file; none (``memory_frac`` everywhere) when it has none."""
    resource = files("moeplan.simulator.costs").joinpath(ELEMENTWISE_FILE)
    if not resource.is_file():
        return ()
    return memory_kernel_points(load_elementwise(Path(str(resource))), Path(ELEMENTWISE_FILE).name)
