"""Simulator speed on the 2-core CPU machine; writes docs/results/simulator-speed.md.

    python benchmarks/simulator_speed.py

Targets (issue 4 §8): one DeepSeek-V3 training step on 2048 GPUs simulated in <= 1 s; a search over
>= 500 candidate layouts in <= 60 s. Peers: Calculon ~1 s per point and a minute per search; Echo
under 2 minutes per prediction.
"""

from __future__ import annotations

import datetime
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from moeplan.simulator.engine.build import step_inputs  # noqa: E402
from moeplan.simulator.engine.step import StepSimulation  # noqa: E402
from moeplan.simulator.planning.search import PARALLEL_MIN_LAYOUTS, search, search_workers  # noqa: E402
from moeplan.simulator.presets.clusters import h200, h800  # noqa: E402
from moeplan.simulator.presets.models import deepseek_v2_lite, deepseek_v3  # noqa: E402
from moeplan.simulator.presets.recipes import deepseek_v3_recipe, default_recipe  # noqa: E402
from moeplan.simulator.spec.inputs import PlanInputs  # noqa: E402


def _v3_inputs() -> PlanInputs:
    r = deepseek_v3_recipe()
    return PlanInputs(model=deepseek_v3(), cluster=h800(256), parallel=r.parallel, training=r.training, budget=r.budget)


def _search(which: str, workers: int):
    """The V3 search (its recipe on 256 x 8 H800) or V2-Lite's exhaustive one (16 H200)."""
    inputs = _v3_inputs()
    if which == "v3":
        return search(inputs, {}, workers=workers)
    lite = PlanInputs(model=deepseek_v2_lite(), cluster=h200(2), parallel=inputs.parallel.model_copy(update={"ep": 1, "pp": 1}),
                      training=default_recipe().training)
    return search(lite, {}, exhaustive=True, workers=workers)


def _timed_search(which: str, workers: int):
    """(seconds, result) of one search in a fresh Python process (``--one``), the result pickled back."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pickle"
        subprocess.run([sys.executable, "-P", __file__, "--one", which, str(workers), str(out)], check=True)
        return pickle.loads(out.read_bytes())


def main() -> None:
    if sys.argv[1:2] == ["--one"]:  # a child of _timed_search
        t0 = time.perf_counter()
        result = _search(sys.argv[2], int(sys.argv[3]))
        Path(sys.argv[4]).write_bytes(pickle.dumps((time.perf_counter() - t0, result)))
        return
    inputs = _v3_inputs()
    built = step_inputs(inputs, 128, 120)  # warm the caches (expert traffic)
    times, events = [], 0
    for _ in range(5):
        t0 = time.perf_counter()
        built = step_inputs(inputs, 128, 120)
        sim = StepSimulation(built, trace=True)
        res = sim.run()
        times.append(time.perf_counter() - t0)
        events = len(res.events)
    step_s = statistics.median(times)
    workers = search_workers()
    counts = sorted({1, workers})  # one process, and the pool a search takes here (planning.search)
    # each search in a fresh process, as a `moeplan plan` runs it: no cache warmed by the one before
    v3 = {n: _timed_search("v3", n) for n in counts}
    lite = {n: _timed_search("lite", n) for n in counts}
    search_s, full_s = ({n: s for n, (s, _) in runs.items()} for runs in (v3, lite))
    found, full = v3[counts[-1]][1], lite[counts[-1]][1]  # the results (the same for any count)
    best = found.best

    def timed(seconds: dict[int, float]) -> str:
        return ", ".join(f"{s:.1f} s in {n} process{'es' if n > 1 else ''}" for n, s in seconds.items())
    lines = [
        "# Simulator speed",
        "",
        f"`python benchmarks/simulator_speed.py`, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.",
        "",
        f"A search of {PARALLEL_MIN_LAYOUTS:,} layouts or more runs in a pool of processes (`planning.search`, "
        f"`MOEPLAN_SEARCH_WORKERS`, else the CPUs it may use: {workers} here), the same result in any number.",
        "",
        "| what | measured | target |",
        "|---|---|---|",
        f"| one DeepSeek-V3 step, 2048 H800 (PP16 DualPipe, 120 micro-batches, {events:,} simulated operations), "
        f"build + simulate, median of 5 | {step_s:.2f} s | <= 1 s |",
        f"| layout search, DeepSeek-V3 on 2048 H800 | {timed(search_s)}: {found.enumerated} layouts enumerated and "
        f"memory-checked, {found.evaluated} fit, {found.simulated} simulated coarsely (the rest bounded out), "
        f"{len(found.ranked)} re-simulated in detail "
        "| >= 500 candidates in <= 60 s |",
        f"| exhaustive search (no bound), DeepSeek-V2-Lite on 16 H200 | {timed(full_s)}: {full.enumerated} enumerated, "
        f"{full.evaluated} fit, all {full.simulated} simulated coarsely, {len(full.ranked)} in detail "
        "| >= 500 candidates in <= 60 s |",
        "",
        f"Best layout found: PP{best.pp} {best.schedule}, EP{best.ep}, DP{best.dp}, micro-batch {best.micro_batch_size}, "
        f"recompute {best.recompute}: {found.ranked[0].step_time_s:.2f} s per step, "
        f"{found.ranked[0].tokens_per_s_per_gpu:,.0f} tokens/s per GPU.",
        "",
        "| # | pp | schedule | ep | mbs | recompute | step s | tok/s/GPU |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {i} | {c.parallel.pp} | {c.parallel.schedule} | {c.parallel.ep} | {c.parallel.micro_batch_size} | "
          f"{c.parallel.recompute} | {c.step_time_s:.2f} | {c.tokens_per_s_per_gpu:,.0f} |"
          for i, c in enumerate(found.ranked, 1)],
        "",
    ]
    out = ROOT / "docs" / "results" / "simulator-speed.md"
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main()
