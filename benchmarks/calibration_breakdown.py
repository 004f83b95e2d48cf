"""The closed loop's step, op class by op class and per rank: measured against each table set's simulated step.

    python -P benchmarks/calibration_breakdown.py --work /tmp/loop            # run the loop, keep it, print
    python -P benchmarks/calibration_breakdown.py --work /tmp/loop --reuse    # print again from the kept files

Runs ``benchmarks/calibration_loop.py``'s loop into ``--work`` (plan ``p0``, the 2-process run ``run``,
``cal.json`` from ``moeplan calibrate --plan``, ``rec.json`` from ``moeplan check --recalibrate``), then sums,
per rank, the measured trace's events (the profiled step) and the simulated step's events under the packaged,
calibrated and recalibrated tables, by bucket: forward and backward layer ops, head, embedding, point-to-point
(measured: the blocking rendezvous batches, waits included), optimizer, and idle (the window less the union
of the rank's events). Prints a markdown table (docs/results/calibration-cpu.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

BUCKETS = ("F layers", "B layers", "F head", "B head", "F embed", "B embed", "p2p", "optimizer", "idle", "window")
_OP = re.compile(r"^\d+([FBIW])\d+(?: L\d+)? ?(\S*)$")


def bucket(name: str) -> str:
    if name.startswith(("p2p", "dp-sync")):
        return "p2p"
    if name.split(" ")[0] == "optimizer":  # the step's parts ("optimizer norm", ...), or the whole of older traces
        return "optimizer"
    hit = _OP.match(name)
    if hit is None:
        return "other"
    kind = "F" if hit[1] == "F" else "B"
    return f"{kind} {hit[2]}" if hit[2] in ("head", "embed") else f"{kind} layers"


def summarise(events: list[tuple[int, str, float, float]]) -> dict[int, dict[str, float]]:
    """Per rank, seconds per bucket; ``events`` are (rank, name, start s, end s)."""
    from moeplan.simulator.report.trace_analysis import length, union

    end, out = max(e[3] for e in events), {}
    for r in sorted({e[0] for e in events}):
        mine, sums = [e for e in events if e[0] == r], defaultdict(float)
        for _, name, start, stop in mine:
            sums[bucket(name)] += stop - start
        sums["idle"] = end - length(union((a, b) for _, _, a, b in mine))
        sums["window"] = end
        out[r] = dict(sums)
    return out


def measured(run: Path, world: int) -> list[tuple[int, str, float, float]]:
    out = []
    for r in range(world):
        doc = json.loads((run / f"traces/rank{r}.json").read_text())
        out += [(r, e["name"], e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6)
                for e in (doc["traceEvents"] if isinstance(doc, dict) else doc) if e.get("ph") == "X"]
    return out


def simulated(plan, tables_file: Path | None) -> list[tuple[int, str, float, float]]:
    from moeplan.simulator.costs.tables import CostTables, default_tables
    from moeplan.simulator.engine.build import SimOptions
    from moeplan.simulator.planning.predict import predict_step

    tables = CostTables.from_file(tables_file) if tables_file else default_tables(plan.inputs.cluster.gpu.name)
    _, events = predict_step(plan.inputs, plan.layout.dp, plan.layout.microbatches, opts=SimOptions(tables=tables),
                             trace=True)
    return [(e.rank, e.name, e.start_s, e.end_s) for e in events]


def table(work: Path) -> str:
    from moeplan.simulator.contracts.plan_file import read_plan

    plan = read_plan(work / "p0/plan.json")
    cols = {"measured": summarise(measured(work / "run", plan.layout.world))}
    for label, name in (("packaged", None), ("calibrated", "cal.json"), ("recalibrated", "rec.json")):
        cols[label] = summarise(simulated(plan, work / name if name else None))
    lines = ["| rank | ms | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in range(plan.layout.world):
        lines += [f"| {r} | {b} | " + " | ".join(f"{c.get(r, {}).get(b, 0.0) * 1e3:.2f}" for c in cols.values()) + " |"
                  for b in BUCKETS]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--reuse", action="store_true", help="the loop's files are in --work already")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if not args.reuse:
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from calibration_loop import loop

        torch.set_num_threads(1)
        args.work.mkdir(parents=True, exist_ok=True)
        result = loop(args.work, args.steps, 3, (0.1, 600.0), 3)  # on a quiet machine (calibration_loop)
        print(json.dumps(result["predicted"] | {"measured median": result["measured_s"], "load": os.getloadavg(),
                                                "steps": result["walls_s"], "others' share": result["others_share"]}))
    print(table(args.work))


if __name__ == "__main__":
    main()
