"""The NVML sampler: without NVML every field is missing with a reason; with a fake ``pynvml`` the series,
the energy deltas and a refused query come out right; the thread samples and stops."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest
import torch

from moeplan.model.runtime.telemetry import FIELDS, NvmlSampler

UUID = "GPU-0e3a-fake"


class FakeNvml:
    """What the sampler calls of pynvml; energy advances by the listed counter values, one per read."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_ERROR_NOT_SUPPORTED = 3

    class NVMLError(Exception):
        def __init__(self, value: int):
            self.value = value

        def __str__(self) -> str:
            return {3: "Not Supported", 12: "NVML Shared Library Not Found"}[self.value]

    def __init__(self, energy_mj: list[int], temperature_supported: bool = True):
        self.energy_mj, self.temperature_supported, self.reads = list(energy_mj), temperature_supported, 0
        self.handles: list[bytes] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes) -> str:
        self.handles.append(uuid)
        return "handle"

    def nvmlDeviceGetPowerUsage(self, h) -> int:
        self.reads += 1
        return 300_000 + 1000 * self.reads  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h) -> int:
        return self.energy_mj.pop(0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=2**30, total=2**34, free=2**34 - 2**30)

    def nvmlDeviceGetClockInfo(self, h, kind) -> int:
        assert kind == self.NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetTemperature(self, h, sensor) -> int:
        if not self.temperature_supported:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return 61

    def nvmlDeviceGetCurrentClocksEventReasons(self, h) -> int:
        return 4  # SW power cap


def test_without_nvml_every_field_is_missing_with_a_reason() -> None:
    """This machine: no GPU (and no driver), the record is still made."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: NVML may be there")
    record = NvmlSampler.for_device(rank=3, device=0).start().stop()
    assert record.rank == 3 and record.uuid is None
    for field in FIELDS:
        series = getattr(record, field)
        assert series.values == () and "no CUDA device" in series.missing
    assert record.step_energy_j.missing and record.step_energy_j.joules == ()


def test_nvml_library_not_found_is_a_reason_not_an_exception() -> None:
    nvml = FakeNvml([])

    def no_library() -> None:
        raise FakeNvml.NVMLError(12)

    nvml.nvmlInit = no_library
    sampler = NvmlSampler(0, UUID, nvml=nvml)
    sampler.step_boundary(0)
    record = sampler.start().stop()
    assert {getattr(record, f).missing for f in FIELDS} == {"NVML unavailable: NVML Shared Library Not Found"}


def test_series_and_energy_deltas_from_a_fake_nvml(monkeypatch) -> None:
    # counter reads: at start, then one per sample: boundary of step 0, a sample, boundary of step 1
    nvml = FakeNvml(energy_mj=[1_000, 3_000, 3_000, 7_000, 15_000, 15_000], temperature_supported=False)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    ticks = iter([10.0, 10.5, 11.0, 11.5])
    sampler = NvmlSampler(1, UUID, sample_hz=2.0, nvml=nvml, clock=lambda: next(ticks))
    sampler.step_boundary(0)  # sample at 0.5 s (energy 3000), then the boundary read (3000)
    sampler.sample()  # 1.0 s (7000)
    sampler.step_boundary(1)  # 1.5 s (15000), boundary (15000)
    record = sampler.stop()
    assert nvml.handles == [UUID.encode()]  # looked up by UUID
    assert record.power_w.t_s == (0.5, 1.0, 1.5) and record.power_w.values == (301.0, 302.0, 303.0)
    assert record.energy_j.values == (2.0, 6.0, 14.0)  # since the sampler started, joules
    assert record.step_energy_j.steps == (0, 1) and record.step_energy_j.joules == (2.0, 12.0)
    assert record.memory_used_bytes.values == (2.0**30,) * 3 and record.sm_clock_mhz.values == (1980.0,) * 3
    assert record.clock_event_reasons.values == (4, 4, 4)
    assert record.temperature_c.values == () and record.temperature_c.missing == "NVML refused temperature_c: Not Supported"


def test_the_thread_samples_until_stopped() -> None:
    nvml = FakeNvml(energy_mj=list(range(0, 10**7, 1000)))
    sampler = NvmlSampler(0, UUID, sample_hz=100.0, nvml=nvml).start()
    deadline = time.monotonic() + 5.0
    while not nvml.reads and time.monotonic() < deadline:
        time.sleep(0.01)
    record = sampler.stop()
    assert len(record.power_w.values) >= 1
    count = len(record.power_w.values)
    time.sleep(0.05)
    assert nvml.reads == count  # nothing sampled after stop()


def test_step_energies_stay_bounded_and_add_up(monkeypatch) -> None:
    from moeplan.model.runtime import telemetry

    monkeypatch.setattr(telemetry, "MAX_SAMPLES", 4)
    nvml = FakeNvml(energy_mj=[1_000 * k * k for k in range(40)])  # at start, then a sample and a read per step
    sampler = NvmlSampler(0, UUID, nvml=nvml, clock=iter(range(100)).__next__)
    for step in range(9):
        sampler.step_boundary(step)
    energy = sampler.stop().step_energy_j
    assert len(energy.steps) <= 4 and energy.steps[-1] == 8  # neighbours merged, the last step kept
    assert sum(energy.joules) == pytest.approx((1_000 * 18 * 18 - 0) / 1e3)  # nothing lost: start to step 8's end
    assert telemetry.merged_steps([0, 1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0, 5.0]) == ([1, 3, 4], [3.0, 7.0, 5.0])
