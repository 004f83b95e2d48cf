"""Where a profiled step leaves the GPU idle, from a PyTorch profiler trace (Chrome JSON).

Every gap between the GPU's busy intervals inside a step range is charged to the host work that
released the kernel after it: the CPU op (and the nearest module or autograd node around it) whose
launch call carries that kernel's correlation id. Blocking host calls (stream, event and device
synchronisations, and copies to the host) are listed with the op that made them, since a kernel
launched after one of them waits for the whole host path in between.

    python benchmarks/gpu_gaps.py trace.json [--range moeplan::step] [--min-us 2]

``model_step.py --trace DIR`` writes such traces and this summary beside the step's numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
# Host calls that return only when the GPU has caught up (names exactly: cudaMemcpyAsync, a device-to-device copy's
# call among them, returns at once)
BLOCKING = frozenset(("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                      "cuStreamSynchronize", "cuEventSynchronize", "cuCtxSynchronize"))
CONTEXT_PREFIXES = ("nn.Module:", "autograd::engine::evaluate_function:", "moeplan::")


def _stacks(events: list[dict]) -> dict[int, list[str]]:
    """Host call index -> names of the CPU ops (outermost first) enclosing it on its thread."""
    by_tid: dict[tuple, list[tuple[float, float, int, dict]]] = collections.defaultdict(list)
    for i, e in enumerate(events):
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat in ("cpu_op", "user_annotation") or cat in LAUNCH_CATS:
            by_tid[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), -float(e.get("dur", 0)), i, e))
    out: dict[int, list[str]] = {}
    for items in by_tid.values():
        items.sort(key=lambda t: (t[0], t[1]))
        stack: list[tuple[float, str]] = []  # (end, name)
        for ts, neg_dur, i, e in items:
            while stack and stack[-1][0] <= ts:
                stack.pop()
            if e.get("cat") in LAUNCH_CATS:
                out[i] = [name for _, name in stack]
            else:
                stack.append((ts - neg_dur, e["name"]))
    return out


def _label(stack: list[str]) -> str:
    """The innermost op, with the nearest module / autograd node / moeplan range around it."""
    if not stack:
        return "(no op)"
    inner = stack[-1]
    ctx = next((s for s in reversed(stack[:-1]) if s.startswith(CONTEXT_PREFIXES)), "")
    ctx = ctx.replace("autograd::engine::evaluate_function: ", "bwd ").replace("nn.Module: ", "")
    return f"{inner} [{ctx}]" if ctx else inner


def gap_summary(trace: dict | list, step_range: str = "moeplan::step", min_us: float = 2.0,
                top: int = 15) -> dict:
    """Idle time of the GPU inside every ``step_range`` window, charged to host ops (microseconds)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    windows = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                     if e.get("ph") == "X" and e.get("name") == step_range and e.get("cat") == "user_annotation")
    if not windows:
        raise ValueError(f"no {step_range!r} range in the trace")
    stacks = _stacks(events)
    launch_of = {}
    for i, e in enumerate(events):
        if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {}):
            launch_of[e["args"]["correlation"]] = i
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e) for e in events
                 if e.get("ph") == "X" and e.get("cat") in GPU_CATS)
    idle_by = collections.Counter()
    count_by = collections.Counter()
    sizes = collections.Counter()
    total_wall = total_busy = 0.0
    for lo, hi in windows:
        inside = [(max(a, lo), min(b, hi), e) for a, b, e in gpu if b > lo and a < hi]
        total_wall += hi - lo
        cursor = lo
        for a, b, e in inside:
            if a - cursor >= min_us:
                gap = a - cursor
                i = launch_of.get(e.get("args", {}).get("correlation"))
                label = _label(stacks.get(i, [])) if i is not None else f"(unlinked {e.get('cat')})"
                if cursor == lo:
                    label = "(step start) " + label
                idle_by[label] += gap
                count_by[label] += 1
                sizes["<20us" if gap < 20 else "<100us" if gap < 100 else "<1ms" if gap < 1000 else ">=1ms"] += gap
            if b > cursor:
                total_busy += b - max(a, cursor)
                cursor = b
        if hi - cursor >= min_us:
            idle_by["(step end)"] += hi - cursor
            count_by["(step end)"] += 1
    blocking = collections.Counter()
    blocking_n = collections.Counter()
    for i, e in enumerate(events):
        if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS and e.get("name") in BLOCKING:
            ts = float(e["ts"])
            if any(lo <= ts < hi for lo, hi in windows):
                key = f"{e['name']} in {_label(stacks.get(i, []))}"
                blocking[key] += float(e.get("dur", 0))
                blocking_n[key] += 1
    return {"windows": len(windows), "wall_us": total_wall, "busy_us": total_busy,
            "idle_us": total_wall - total_busy, "min_gap_us": min_us,
            "idle_by_size_us": dict(sizes),
            "idle_by_op_us": [{"op": k, "us": v, "gaps": count_by[k]} for k, v in idle_by.most_common(top)],
            "blocking_host_calls_us": [{"call": k, "us": v, "calls": blocking_n[k]}
                                       for k, v in blocking.most_common(top)]}


def format_summary(s: dict) -> str:
    n = s["windows"]
    lines = [f"{n} step(s): wall {s['wall_us'] / n / 1e3:.2f} ms, GPU busy {s['busy_us'] / n / 1e3:.2f} ms, "
             f"idle {s['idle_us'] / n / 1e3:.2f} ms per step",
             "idle by gap size (ms/step): " + ", ".join(f"{k} {v / n / 1e3:.2f}" for k, v in
                                                         sorted(s["idle_by_size_us"].items())),
             "idle before the kernel launched by (ms/step, gaps):"]
    lines += [f"  {r['us'] / n / 1e3:8.3f}  {r['gaps'] / n:7.1f}  {r['op']}" for r in s["idle_by_op_us"]]
    lines.append("blocking host calls (ms/step, calls):")
    lines += [f"  {r['us'] / n / 1e3:8.3f}  {r['calls'] / n:7.1f}  {r['call']}" for r in s["blocking_host_calls_us"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--range", default="moeplan::step", help="the user range that bounds a step")
    parser.add_argument("--min-us", type=float, default=2.0, help="smaller gaps are not charged")
    args = parser.parse_args()
    try:
        trace = json.loads(args.trace.read_text())
        summary = gap_summary(trace, args.range, args.min_us)
    except (OSError, ValueError) as exc:
        sys.exit(f"gpu_gaps: {args.trace}: {exc}")
    print(format_summary(summary))


if __name__ == "__main__":
    main()
