"""What measured a set of cost tables, and its links: optional sections of the cost-table JSON.

``benchmarks/cpu_tables.py`` writes them into ``data/cpu-*.json`` (the ``cpu`` cluster preset reads its
device and link figures from there): ``Machine`` names the machine, the software and the thread count the
tables were measured at, with the two peaks the tables' fractions are of; each ``LinkFit`` is one
collective at one process count, fitted as ``latency_s + bytes / bytes_per_s`` over the measured points
(``bytes`` counted as each collective moves them per process, see ``BYTES_MOVED``). Tables without
them (the GPU ones) leave both out.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moeplan.simulator.spec.numbers import Float, Int

Collective = Literal["send_recv", "all_to_all", "all_reduce", "reduce_scatter", "all_gather", "post_send", "post_recv",
                     "post_both", "all_reduce_once"]
# A point-to-point batch as the runtime posts and waits for it on a CPU (gloo holds the host): one send whose receiver
# waits, one receive whose message is there, one of each (``calibration.links``; ``engine.step.Links.batch_s``)
POSTED_BATCHES: tuple[Collective, ...] = ("post_send", "post_recv", "post_both")

BYTES_MOVED = {
    "send_recv": "the message (one way; timed as half a ping-pong)",
    **{c: "the message (the host's time of the batch that posts it, on the side that times it)" for c in POSTED_BATCHES},
    # an all-reduce called once between compute, as a CPU step's optimizer norm calls it (``calibration.links``)
    "all_reduce_once": "2 (n-1)/n of the buffer (as all_reduce)",
    "all_to_all": "(n-1)/n of each process's buffer (what leaves it)",
    "all_reduce": "2 (n-1)/n of the buffer (a ring's reduce-scatter then all-gather)",
    "reduce_scatter": "(n-1)/n of the full buffer (ring)",
    "all_gather": "(n-1)/n of the full buffer (ring)",
}


def bytes_moved(collective: Collective, buffer_bytes: float, processes: int) -> float:
    """Bytes one process moves in ``collective`` over a buffer of ``buffer_bytes`` (see ``BYTES_MOVED``)."""
    share = (processes - 1) / processes
    if collective in POSTED_BATCHES:
        return buffer_bytes
    return {"send_recv": buffer_bytes, "all_to_all": share * buffer_bytes, "all_reduce": 2 * share * buffer_bytes,
            "reduce_scatter": share * buffer_bytes, "all_gather": share * buffer_bytes,
            "all_reduce_once": 2 * share * buffer_bytes}[collective]


class LinkPoint(BaseModel):
    """One measured size: the buffer and the median seconds (slowest process's median)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    buffer_bytes: Int = Field(..., gt=0)
    s: Float = Field(..., gt=0, le=3600)


class LinkFit(BaseModel):
    """One collective among ``processes`` local processes: latency and bandwidth fitted to ``points``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    collective: Collective
    processes: Int = Field(..., ge=2, le=1024)
    latency_s: Float = Field(..., ge=0, le=3600)
    bytes_per_s: Float = Field(..., ge=1, le=1e18)
    points: tuple[LinkPoint, ...] = Field(..., min_length=1)
    source: str

    def seconds(self, buffer_bytes: float) -> float:
        """The fit's time for a buffer of ``buffer_bytes``."""
        return self.latency_s + bytes_moved(self.collective, buffer_bytes, self.processes) / self.bytes_per_s


class Machine(BaseModel):
    """The machine and software the tables were measured on, and the peaks their fractions are of."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu: str = Field(..., description="Processor model name (/proc/cpuinfo), or the GPU's name.")
    cores: Int = Field(..., gt=0, le=2**16, description="Logical CPUs the OS reports.")
    threads_per_process: Int = Field(..., gt=0, le=2**16, description="torch.set_num_threads during the runs.")
    memory_bytes: Int = Field(..., gt=0, le=2**50, description="The machine's RAM (MemTotal).")
    process_rss_bytes: Int = Field(..., ge=0, le=2**50, description="Resident memory of a process after importing "
                                                                     "torch and joining a gloo group.")
    dtype: str = Field(..., description="torch dtype of the GEMMs, attention and activations the tables price as "
                                        "the plan's non-FP8 precision.")
    peak_flops_per_s: Float = Field(..., ge=1, le=1e18, description="The fastest GEMM measured, any dtype.")
    memory_bytes_per_s: Float = Field(..., ge=1, le=1e18, description="The fastest copy measured (read + write).")
    load_average: str = Field("", description="/proc/loadavg (1, 5, 15 minutes) before and after the run: other "
                                               "work on a shared machine slows what was measured.")
    torch: str
    python: str
    date: str
    command: str
