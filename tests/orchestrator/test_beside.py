"""The compute-beside-communication measurement (issue 21, capability 7): on a CPU, a matmul alone and beside a
gloo all-reduce pair; the copy kernel the GPU measurement runs beside its GEMM, in Triton's interpreter."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from moeplan.kernels.copy_loop import copy_loop, copy_loop_ref
from moeplan.orchestrator.calibration.beside import CPU_COMM_PROCESSES, measure_beside
from moeplan.simulator.costs.beside_comm import BesidePoint


def test_cpu_measurement_is_a_beside_point_and_leaves_no_process():
    row = measure_beside(256, 256, 256, torch.float32, torch.device("cpu"), reps=5, comm_sms=20, label="test")
    point = BesidePoint.model_validate(row)
    assert point.comm_sms == CPU_COMM_PROCESSES and point.sm_count >= 1
    assert point.alone_s > 0 and point.beside_s > 0
    assert "all-reduce" in point.source and "alone" in point.source
    assert not multiprocessing.active_children()


_KILLED_PARENT = """
import multiprocessing, pathlib, sys, time
import torch
from moeplan.orchestrator.calibration import beside

def gemm():  # runs while the pair loops: say who the pair is, then wait to be killed
    pathlib.Path(sys.argv[1]).write_text(" ".join(str(p.pid) for p in multiprocessing.active_children()))
    time.sleep(600)

if __name__ == "__main__":
    beside._cpu_beside_s(gemm, 1)
"""


def test_a_killed_parent_leaves_no_all_reduce_pair_behind(tmp_path):
    """SIGKILL skips the daemonic children's clean-up: the pair notices its parent is gone and exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pids = tmp_path / "parent.py", tmp_path / "pids"
    script.write_text(_KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pids)])
    try:
        deadline = time.monotonic() + 120
        while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        children = [int(p) for p in pids.read_text().split()]
        assert len(children) >= CPU_COMM_PROCESSES
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        stat = open(f"/proc/{pid}/stat").read().split()[2] if os.path.exists(f"/proc/{pid}/stat") else "Z"
        return stat != "Z"  # a zombie has exited; its reaper is init

    deadline = time.monotonic() + 30
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in children)


@pytest.mark.parametrize("blocks,passes", [(1, 1), (3, 2), (7, 1)])
def test_copy_loop_copies_whatever_the_blocks(blocks, passes):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU tensor only in Triton's interpreter
    src = torch.arange(3 * 4096 + 17, dtype=torch.float32, device=device)
    dst, ref = torch.zeros_like(src), torch.zeros_like(src)
    copy_loop(src, dst, blocks, passes)
    copy_loop_ref(src, ref)
    assert torch.equal(dst, ref)


def test_copy_loop_refuses_bad_arguments():
    src = torch.zeros(8)
    with pytest.raises(ValueError, match="blocks=0"):
        copy_loop(src, torch.zeros(8), 0)
    with pytest.raises(ValueError, match="1-D fp32"):
        copy_loop(src, torch.zeros(8, dtype=torch.float64), 1)


def _shapes():
    from moeplan.orchestrator.calibration.shapes import PlanShapes
    return PlanShapes(mbs=1, seq_len=64, tokens=64, gemms=((64, 32, 16, 1), (64, 128, 256, 1), (8, 512, 512, 4)),
                      links=())


def _setup():
    from moeplan.orchestrator.calibration.measure import Setup
    from moeplan.simulator.presets.models import tiny_moe
    return Setup(spec=tiny_moe(), device=torch.device("cpu"), dtype=torch.float32, reps=2, threads=1, backend="gloo",
                 label="[CAL] test")


def test_calibrate_measures_the_largest_dense_gemm_beside_comm(monkeypatch):
    from moeplan.orchestrator.calibration import measure
    seen = []

    def fake(m, n, k, dtype, device, reps, comm_sms, threads, label):
        seen.append((m, n, k, comm_sms))
        return {"m": m, "n": n, "k": k, "sm_count": 2, "comm_sms": 2, "alone_s": 1.0, "beside_s": 1.5, "source": label}

    monkeypatch.setattr(measure, "measure_beside", fake)
    got = measure.Measured()
    for item in measure._beside(_shapes(), _setup()):
        measure.run(item, got)
    assert seen == [(64, 128, 256, 20)]  # the largest dense one (the grouped one is not dense), 20 comm SMs
    assert [BesidePoint.model_validate(r).beside_s for r in got.beside] == [1.5] and not got.skipped


def test_a_failing_beside_measurement_is_skipped_not_filled(monkeypatch):
    from moeplan.orchestrator.calibration import measure

    def broken(*args, **kwargs):
        raise RuntimeError("gloo: cannot connect (seeded)")

    monkeypatch.setattr(measure, "measure_beside", broken)
    got = measure.Measured()
    for item in measure._beside(_shapes(), _setup()):
        measure.run(item, got)
    assert got.beside == []
    assert got.skipped == ["GEMM 64x128x256 beside communication: gloo: cannot connect (seeded)"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gemm_beside_a_copy_on_20_sms():
    """On one GPU: V3's 4096 x 7168 x 2048 BF16 GEMM alone and beside the copy kernel on 20 SMs; the copy
    outlasts the timed calls (else the measurement raises) and the GEMM is not faster beside it."""
    row = measure_beside(4096, 7168, 2048, torch.bfloat16, torch.device("cuda"), reps=10, comm_sms=20, label="test")
    point = BesidePoint.model_validate(row)
    assert point.comm_sms == 20 and point.sm_count == torch.cuda.get_device_properties(0).multi_processor_count
    assert point.beside_s > 0.95 * point.alone_s
