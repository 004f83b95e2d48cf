"""Run a worker script on N local processes (gloo, 127.0.0.1, a free port) and collect their JSON results.

Each worker is a plain script beside this file, started as ``python -P script`` with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``RESULT`` (the JSON file it must write) in its
environment, so nothing depends on how pytest imported the test module.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(script: str, world: int, tmp_path: Path, timeout_s: float = 180.0, env: dict | None = None) -> list:
    """Start ``world`` copies of ``script``; wait for all; return each rank's JSON result in rank order."""
    port = free_port()
    procs = []
    for rank in range(world):
        proc_env = os.environ | (env or {}) | {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port), "RESULT": str(tmp_path / f"rank{rank}.json"),
                            "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-P", str(HERE / script)], env=proc_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout_s)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(rank, proc.returncode, out[-3000:]) for rank, (proc, out) in enumerate(zip(procs, outputs))
              if proc.returncode]
    assert not failed, "\n".join(f"rank {r} exited {code}:\n{out}" for r, code, out in failed)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]


@functools.cache
def ep_worker_results(base: Path) -> list:
    """``ep_worker.py``'s results on 4 processes, run once per test process (test_groups and
    test_expert_parallel both read them)."""
    from moeplan.simulator.contracts.plan_file import parse_plan

    golden = HERE.parents[1] / "orchestrator" / "golden" / "plan-tiny-moe.json"
    env = {"GOLDEN_PLACEMENT": parse_plan(golden.read_text(), str(golden)).placement.model_dump_json()}
    out = base / "ep_worker"
    out.mkdir(exist_ok=True)
    return run_workers("ep_worker.py", 4, out, env=env)
