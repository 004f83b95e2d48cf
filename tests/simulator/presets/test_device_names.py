"""``presets.clusters.gpu_for_device``: the one mapping from a CUDA device name to the cluster preset's GPU, which the
benchmarks use to take the datasheet figures of the card they ran on."""

from __future__ import annotations

import pytest

from moeplan.simulator.presets.clusters import gpu_for_device


@pytest.mark.parametrize(("device_name", "preset", "hbm_bytes_per_s"), [
    ("NVIDIA H100 80GB HBM3", "H100-SXM5", 3.35e12),
    ("NVIDIA H800", "H800-SXM5", 3.35e12),
    ("NVIDIA H200", "H200-SXM", 4.8e12),
    ("nvidia h200", "H200-SXM", 4.8e12),
])
def test_each_preset_gpu_is_found_by_its_device_name(device_name, preset, hbm_bytes_per_s):
    gpu = gpu_for_device(device_name)
    assert gpu is not None and gpu.name == preset and gpu.hbm_bytes_per_s == hbm_bytes_per_s


@pytest.mark.parametrize("device_name",
                         [None, "", "cpu", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"])
def test_other_devices_and_other_h100_boards_are_none_of_them(device_name):
    assert gpu_for_device(device_name) is None
