"""NVML telemetry of one process's GPU: a sampler thread at a given rate plus reads at step boundaries.

Samples power (W), the total-energy counter (J, as deltas: since the sampler started, and per step
between step-boundary reads), memory used (bytes, NVML's: CUDA context and NCCL buffers included), SM
clock (MHz), temperature (C) and the clock event (throttle) reasons. The GPU is looked up by the UUID
``torch.cuda.get_device_properties(i).uuid`` gives, never by index: ``CUDA_VISIBLE_DEVICES`` renumbers
devices, NVML does not. Nothing here raises on a missing NVML: no ``pynvml``, no driver, no CUDA device,
or a query NVML refuses (NOT_SUPPORTED, NO_PERMISSION, a lost GPU) marks the affected series missing
with the reason, and the record (``contracts.run_telemetry.GpuTelemetry``) is written anyway: each rank
writes its own (``write_telemetry``), ``run.json`` keeps the summary. Memory and the record stay bounded on
any run's length: past ``MAX_SAMPLES`` a series drops every other sample (and the rate halves), and the
per-step energies merge neighbouring steps (their joules summed: the energy between the kept boundaries).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from moeplan.simulator.contracts.run_telemetry import GpuTelemetry, ReasonSeries, Series, StepEnergy

log = logging.getLogger(__name__)

FIELDS = ("power_w", "energy_j", "memory_used_bytes", "sm_clock_mhz", "temperature_c", "clock_event_reasons")
MAX_SAMPLES = 20_000  # per series and for the per-step energies; past it every other sample is dropped (the rate
# halves) or neighbouring steps merged. 20,000 is 2.8 hours at the default 2 Hz; a rank's record stays ~6 MB.


def cuda_uuid(device: int) -> str | None:
    """NVML's spelling (``GPU-...``) of CUDA device ``device``'s UUID, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def _reads(nvml: ModuleType) -> dict[str, Callable[[Any], float]]:
    """How each field is read from a device handle, in the record's units."""
    reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return {
        "power_w": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,  # mW
        "energy_j": lambda h: nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3,  # mJ since the driver loaded
        "memory_used_bytes": lambda h: float(nvml.nvmlDeviceGetMemoryInfo(h).used),
        "sm_clock_mhz": lambda h: float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
        "temperature_c": lambda h: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        "clock_event_reasons": lambda h: int(reasons(h)),
    }


class NvmlSampler:
    """Samples one GPU. ``start()`` the thread, call ``step_boundary(step)`` at the end of each step,
    ``stop()`` for the record. ``clock`` is injectable for tests (seconds, monotonic)."""

    def __init__(self, rank: int, uuid: str | None, sample_hz: float = 2.0, nvml: ModuleType | None = None,
                 clock: Callable[[], float] = time.monotonic, unavailable: str | None = None):
        assert sample_hz > 0, f"{sample_hz=}"
        self.rank, self.uuid, self.sample_hz, self.clock = rank, uuid, sample_hz, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval_s = 1.0 / sample_hz
        self._t: dict[str, list[float]] = {f: [] for f in FIELDS}
        self._v: dict[str, list[float]] = {f: [] for f in FIELDS}
        self._missing: dict[str, str] = {}
        self._steps: list[int] = []
        self._step_j: list[float] = []
        self._t0 = clock()
        self._nvml, self._handle, self._reads = nvml, None, {}
        self._energy0 = self._last_boundary_j = None
        why = unavailable or self._open()
        if why is not None:
            self._missing = dict.fromkeys(FIELDS, why)

    @classmethod
    def for_device(cls, rank: int, device: int, sample_hz: float = 2.0) -> NvmlSampler:
        """The sampler of CUDA device ``device`` (its UUID from torch), or one whose fields are all missing."""
        uuid = cuda_uuid(device)
        if uuid is None:
            return cls(rank, None, sample_hz, unavailable="no CUDA device (torch.cuda.is_available() is False)")
        try:
            import pynvml as nvml  # nvidia-ml-py: a named dependency, imported only where a GPU is
        except ImportError as exc:
            return cls(rank, uuid, sample_hz, unavailable=f"pynvml not importable ({exc})")
        return cls(rank, uuid, sample_hz, nvml=nvml)

    def _open(self) -> str | None:
        """Initialise NVML and find the GPU; the reason it cannot, or None."""
        nvml = self._nvml
        if nvml is None:
            return "no NVML module given"
        if self.uuid is None:
            return "no GPU UUID"
        try:
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByUUID(self.uuid.encode())
        except nvml.NVMLError as exc:
            return f"NVML unavailable: {exc}"
        self._reads = _reads(nvml)
        self._energy0 = self._last_boundary_j = self._read("energy_j")
        return None

    def _read(self, field: str) -> float | None:
        """One query; on an NVML error the field is marked missing for good (never raises)."""
        if field in self._missing:
            return None
        try:
            return self._reads[field](self._handle)
        except self._nvml.NVMLError as exc:
            self._missing[field] = f"NVML refused {field}: {exc}"
            log.info("rank %d: NVML %s missing: %s", self.rank, field, exc)
            return None

    def sample(self) -> None:
        """Read every field once (the thread calls this; so does ``step_boundary``)."""
        with self._lock:
            now = self.clock() - self._t0
            for field in FIELDS:
                value = self._read(field)
                if value is None:
                    continue
                if field == "energy_j":
                    value -= self._energy0
                self._t[field].append(now)
                self._v[field].append(value)
            if max(len(t) for t in self._t.values()) > MAX_SAMPLES:  # bounded memory on a long run
                for field in FIELDS:
                    del self._t[field][1::2], self._v[field][1::2]
                self._interval_s *= 2

    def step_boundary(self, step: int) -> None:
        """At the end of ``step``: a sample, and the step's energy from the counter."""
        self.sample()
        with self._lock:
            now_j = self._read("energy_j")
            if now_j is None or self._last_boundary_j is None:
                return
            self._steps.append(step)
            self._step_j.append(now_j - self._last_boundary_j)
            self._last_boundary_j = now_j
            if len(self._steps) > MAX_SAMPLES:
                self._steps, self._step_j = merged_steps(self._steps, self._step_j)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def start(self) -> NvmlSampler:
        if self._handle is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"nvml-sampler-{self.rank}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> GpuTelemetry:
        """Stop the thread (if any) and return the record."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            return self.record()

    def record(self) -> GpuTelemetry:
        def series(field: str, kind: type[Series] = Series) -> Series:
            if field in self._missing and not self._v[field]:
                return kind(missing=self._missing[field])
            values = [int(v) for v in self._v[field]] if kind is ReasonSeries else self._v[field]
            return kind(t_s=tuple(self._t[field]), values=tuple(values))

        energy_missing = self._missing.get("energy_j") if not self._step_j else None
        return GpuTelemetry(
            rank=self.rank, uuid=self.uuid, sample_hz=self.sample_hz, power_w=series("power_w"),
            energy_j=series("energy_j"),
            step_energy_j=StepEnergy(missing=energy_missing) if energy_missing else StepEnergy(
                steps=tuple(self._steps), joules=tuple(self._step_j)),
            memory_used_bytes=series("memory_used_bytes"), sm_clock_mhz=series("sm_clock_mhz"),
            temperature_c=series("temperature_c"), clock_event_reasons=series("clock_event_reasons", ReasonSeries),
        )


def merged_steps(steps: list[int], joules: list[float]) -> tuple[list[int], list[float]]:
    """Steps (0, 1), (2, 3), ... merged into 1, 3, ...: each kept step's joules now count from the boundary
    before the step dropped (an odd last step stays as it is)."""
    odd = len(steps) % 2
    pairs = [a + b for a, b in zip(joules[0::2], joules[1::2])]
    return steps[1::2] + steps[len(steps) - odd:], pairs + joules[len(joules) - odd:]


def driver_version() -> str | None:
    """The NVIDIA driver's version from NVML, or None without a GPU, pynvml or a driver."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        import pynvml as nvml

        nvml.nvmlInit()
        try:
            found = nvml.nvmlSystemGetDriverVersion()
        finally:
            nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 (pynvml missing or NVML refusing: the report marks it unknown)
        return None
    return found.decode() if isinstance(found, bytes) else str(found)
