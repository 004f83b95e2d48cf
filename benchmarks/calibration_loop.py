"""The closed loop on this machine's CPU, measured: docs/results/calibration-cpu.md.

    python -P benchmarks/calibration_loop.py            # docs/results/calibration-cpu.md
    python -P benchmarks/calibration_loop.py --md /tmp/c.md --steps 4 --reps 3   # quicker

1. Sum or max: a tiny op (4 x 8, needing grad: its fixed host cost), a square GEMM of each ``SIZES``, and the
   two issued one after the other: whether the pair takes the sum or the max of the two decides how the
   host term meets the device time on a CPU (``costs.host``).
2. The loop of ``tests/orchestrator/test_calibrate.py`` at the tiny preset (``moeplan plan`` on the ``cpu``
   cluster, pp 2, 1F1B, 4 micro-batches of 64 tokens): the runtime's worker on 2 gloo processes for
   ``--steps`` steps, then ``moeplan calibrate --plan``, ``moeplan check --recalibrate``, and the plan priced
   by each table set: predicted step against the measured median, and the entries that moved.

The machine is shared: before the run, and before ``calibrate``, the loop waits (``--quiet``, ``--quiet-wait-s``)
until other work uses less than a tenth of the cores, and does either again (``--tries``) while other work took more
than a fifth of the cores during it; the page gives that share (``/proc/stat`` less this process and its children)
with the measured steps' spread and a fixed workload's time around each (``probe_s``: a VM's speed moves with
its host's load, which the share does not show; at 18:26 calibrate's ops ran 1.15-1.3x the run's with no other
work in the VM, and the calibrated step came out 24% over): another
session's test suite on the 2 cores moved the tiny preset's step from 85 to 104-141 ms within one run
(2026-12-06 17:50), where the calibrated tables predicted 84.9 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the tests' process harness, at the end (never shadowing installed packages)

from moeplan.model.runtime.worker import RunConfig, train
from moeplan.orchestrator.calibration.timing import median_s
from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.contracts.run_report import read_run_report
from moeplan.simulator.costs.tables import CostTables
from tests.model.runtime.harness import run_ranks

PLAN = ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--no-search", "--micro-batch-size", "1",
        "--seq-len", "64", "--pp", "2", "--schedule", "1f1b", "--global-batch", "4"]
SIZES = (8, 32, 64, 128, 256)  # square GEMMs, from shorter than a tiny op's fixed cost to far longer
runner = CliRunner()


def _median_s(fn) -> float:
    return median_s(fn, torch.device("cpu"), 30)


def sum_or_max() -> list[dict]:
    """Per GEMM size: a tiny op alone (the fixed cost), the GEMM alone, and the two issued one after the other."""
    x, rows = torch.ones(4, 8, requires_grad=True), []
    for n in SIZES:
        a = torch.randn(n, n)
        tiny, gemm = _median_s(lambda: x * x), _median_s(lambda a=a: a @ a)
        pair = _median_s(lambda a=a: (x * x, a @ a))
        rows.append({"n": n, "tiny_s": tiny, "gemm_s": gemm, "pair_s": pair})
    return rows


def _train(rank: int, plan, run_dir, steps: int) -> None:
    train(plan, run_dir, RunConfig(steps=steps, warmup_steps=2, dtype="fp32"), rank)


def _invoke(*args: str) -> str:
    res = runner.invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code in (0, 1), res.output
    return res.output


def _cpu_s() -> tuple[float, float]:
    """(the machine's busy CPU seconds, steal included, from /proc/stat; this process's and its reaped children's)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    t = os.times()
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            t.user + t.system + t.children_user + t.children_system)


@contextlib.contextmanager
def others_share(out: dict, key: str):
    """``out[key]``: the share of the machine's cores that other work (other processes, the hypervisor's steal)
    used while the block ran: the run and ``calibrate`` are measured on a shared machine."""
    (busy0, ours0), start = _cpu_s(), time.perf_counter()
    yield
    (busy1, ours1), wall = _cpu_s(), time.perf_counter() - start
    out[key] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (wall * os.cpu_count())


def wait_quiet(share: float, max_wait_s: float, window_s: float = 3.0) -> float:
    """Wait until other work uses less than ``share`` of the cores over a ``window_s`` window (at most ``max_wait_s``);
    returns the last window's share."""
    deadline, seen = time.monotonic() + max_wait_s, {}
    while True:
        with others_share(seen, "share"):
            time.sleep(window_s)
        if seen["share"] < share or time.monotonic() > deadline:
            return seen["share"]


def probe_s() -> float:
    """A fixed workload's median time (a 128 x 128 GEMM and 40 tiny ops, each needing grad): the machine's speed
    now. A VM's speed moves with its host's load, which ``/proc/stat`` inside it does not show."""
    x, a = torch.ones(4, 8, requires_grad=True), torch.randn(128, 128)
    return median_s(lambda: (a @ a, [x * x for _ in range(40)]), torch.device("cpu"), 50)


def _quietly(measure, what: str, load: dict, quiet: tuple[float, float], tries: int) -> None:
    """``measure()`` after waiting for a quiet machine, again (up to ``tries`` in all) while other work took more than
    twice the quiet share of the cores during it; ``load[what]``: that share, ``load[what + ' tries']``: the tries."""
    for attempt in range(1, tries + 1):
        wait_quiet(*quiet)
        before = probe_s()
        with others_share(load, what):
            measure()
        load[f"{what} probe s"] = (before + probe_s()) / 2
        load[f"{what} tries"] = attempt
        if load[what] <= 2 * quiet[0]:
            return


def loop(work: Path, steps: int, reps: int, quiet: tuple[float, float] = (1.0, 0.0), tries: int = 1) -> dict:
    _invoke(*PLAN, "--out", str(work / "p0"))
    plan = read_plan(work / "p0/plan.json")
    load: dict = {}

    def run() -> None:
        shutil.rmtree(work / "run", ignore_errors=True)  # a try's steps only
        run_ranks(plan.layout.world, _train, plan, work / "run", steps, tmp=work / "ranks")
    _quietly(run, "run", load, quiet, tries)
    report = read_run_report(work / "run")
    walls = [s.wall_time_s for s in report.measured_steps]
    measured = statistics.median(walls)
    traced = json.loads((work / "run" / report.traces[0].path).read_text())["otherData"]  # its step, its wall time
    _quietly(lambda: _invoke("calibrate", "--plan", str(work / "p0/plan.json"), "--out", str(work / "cal.json"),
                             "--reps", str(reps)), "calibrate", load, quiet, tries)
    moved = _invoke("check", str(work / "run"), "--plan", str(work / "p0/plan.json"), "--recalibrate",
                    str(work / "rec.json"), "--recalibrate-from", str(work / "cal.json"))
    predicted = {"packaged cpu tables": plan.predictions.step.step_time_s}
    for label, path in (("calibrated at the plan's shapes", "cal.json"), ("calibrated, then recalibrated from the run",
                                                                           "rec.json")):
        _invoke(*PLAN, "--out", str(work / path[:3]), "--calibration", str(work / path))
        predicted[label] = read_plan(work / path[:3] / "plan.json").predictions.step.step_time_s
    host = CostTables.from_file(work / "cal.json").host
    return {"measured_s": measured, "predicted": predicted, "moved": moved[moved.find("recalibrated entries"):],
            "host": host, "steps": steps, "walls_s": walls, "traced": [traced.get("step"), traced["step_time_s"]],
            "others_share": load}


def markdown(split: list[dict], result: dict, command: str) -> str:
    m = result["measured_s"]
    host = result["host"]
    lines = ["# Calibration on this machine's CPU: the closed loop, measured", "",
             (f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}. The "
             "machine is shared: other work slows what is measured, the run and the benchmarks alike."), "",
             "## Sum or max: how the host's per-op time meets the op's own time on a CPU", "",
             "| GEMM n | tiny op us | GEMM us | both, measured us | sum us | max us |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n']} | {r['tiny_s'] * 1e6:,.2f} | {r['gemm_s'] * 1e6:,.2f} | {r['pair_s'] * 1e6:,.2f} | "
              f"{(r['tiny_s'] + r['gemm_s']) * 1e6:,.2f} | {max(r['tiny_s'], r['gemm_s']) * 1e6:,.2f} |" for r in split]
    lines += ["", "## The loop: tiny-moe, cpu cluster, pp 2, 1F1B, 4 micro-batches of 64 tokens, 2 gloo processes", "",
              f"Measured step (median of {result['steps'] - 2} steps after 2 warm-up): {m * 1e3:,.1f} ms. "
              f"{_spread(result['walls_s'], result.get('traced'))} Other work's share of the {os.cpu_count()} cores: "
              + ", ".join(f"{k} {v:.0%}" for k, v in result["others_share"].items() if k in ("run", "calibrate"))
              + " (tries: " + ", ".join(f"{k.removesuffix(' tries')} {v}" for k, v in result["others_share"].items()
                                       if "tries" in k) + f"). {_speed(result['others_share'])}", "",
              "| tables | predicted ms | error |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e3:,.1f} | {(v - m) / m:+.1%} |" for k, v in result["predicted"].items()]
    if host is not None:
        lines += ["", f"Host term ({host.mode}): " + ", ".join(f"{c} {host.op_s(c) * 1e6:.2f} us/op" for c in
                                                              ("fwd_compute", "fwd_view", "bwd")) + "; ops per "
                  "micro-batch: " + ", ".join(f"{c.piece} {c.fwd_compute + c.fwd_view}+{c.bwd}" for c in host.counts)]
    lines += ["", "Entries the run moved (`moeplan check --recalibrate`):", "", "```", result["moved"].rstrip(), "```", ""]
    return "\n".join(lines)


def _speed(load: dict) -> str:
    """The fixed workload's time around calibrate over around the run: above 1, calibrate ran on a slower machine."""
    if "run probe s" not in load or "calibrate probe s" not in load:
        return ""
    return (f"A fixed workload (`probe_s`) took {load['run probe s'] * 1e6:,.0f} us around the run, "
            f"{load['calibrate probe s'] * 1e6:,.0f} us around calibrate ({load['calibrate probe s'] / load['run probe s']:.2f}x).")


def _spread(walls_s: list[float], traced: list | None = None) -> str:
    """The measured steps' spread: the machine's own noise, against which a prediction's error is read; and the
    step the run traced (``check --recalibrate`` reads its ops): since 2026-12-06 the kept step nearest the
    median (``worker.TracedStep``)."""
    q = statistics.quantiles(walls_s, n=4) if len(walls_s) > 1 else walls_s * 3
    step, wall_s = traced if traced else (None, walls_s[-1])
    which = f"the traced one, step {step}" if step is not None else "the traced one, the last"
    return (f"The steps: {min(walls_s) * 1e3:,.1f} min, {q[0] * 1e3:,.1f} / {q[2] * 1e3:,.1f} quartiles, "
            f"{max(walls_s) * 1e3:,.1f} max; {which}: {wall_s * 1e3:,.1f} ms.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", type=Path, default=ROOT / "docs/results/calibration-cpu.md")
    parser.add_argument("--steps", type=int, default=14, help="steps run, the first 2 warm-up (14: the median of 12; "
                        "one step to the next moves 10-20% on a shared 2-core machine)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quiet", type=float, default=0.1, help="before the run, wait until other work uses less "
                        "than this share of the cores over 3 s (at most --quiet-wait-s)")
    parser.add_argument("--quiet-wait-s", type=float, default=600.0)
    parser.add_argument("--tries", type=int, default=3, help="the run, and calibrate, again while other work took more "
                        "than twice --quiet of the cores during it")
    parser.add_argument("--work", type=Path, help="keep the loop's files here (plan p0, run, cal.json, rec.json) for "
                        "benchmarks/calibration_breakdown.py --reuse; a temporary folder by default")
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = sum_or_max()
    with tempfile.TemporaryDirectory() if args.work is None else contextlib.nullcontext(args.work) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        result = loop(Path(tmp), args.steps, args.reps, (args.quiet, args.quiet_wait_s), args.tries)
    page = markdown(split, result, "python -P benchmarks/calibration_loop.py " + " ".join(sys.argv[1:]))
    write_atomic(args.md, page)
    print(json.dumps({k: v for k, v in result["predicted"].items()} | {"measured": result["measured_s"],
                                                                       "walls": result["walls_s"],
                                                                       "others_share": result["others_share"]}))


if __name__ == "__main__":
    main()
