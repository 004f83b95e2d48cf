"""One training step (forward + backward) of a DeepSeek-V3-shaped pipeline stage on one GPU, against the simulator.

    python benchmarks/model_step.py --out docs/results/model-step.md          # CUDA; also writes model-step.json
    python -P benchmarks/model_step.py --small --device cpu --out /tmp/ms.md   # smoke run (tiny model, CPU)

Workloads (``benchmarks/model_step_cases.py``): A = four MoE layers of V3's shape with 32 routed experts
(top-8 in 8 groups, 4 kept; one shared expert), B = a dense layer and the same four; one micro-batch of
4096 tokens; no embedding, no head. Configurations: BF16; FP8 forward through our kernels; FP8 forward
and backward. They share one copy of the weights. Input: random BF16 hidden states (1, T, d) that
require grad; loss <out, g> for a fixed random g (backward seeded with g); the optimizer step is not
included. A step is ``--microbatches`` K micro-batches (default 1) on that same input, the gradients
accumulating across them and set to None after the K-th, the FP8 weight copies made afresh before the
first only: weights are quantised once per optimizer step (TR §3.3), so K micro-batches share them.
Times, rates and kernel classes are per micro-batch (a step's, divided by K).

Timing: ``--warmup`` steps per configuration (compiles and autotunes the kernels), then ``--burn-s``
seconds of steps of every configuration in turn so the clocks settle at the power cap, then
``--rounds`` rounds of ``--steps`` steps per configuration, the order reversed every other round
(A B C, C B A, ...) so heating favours none; each step timed by CUDA events after a synchronize, the SM
clock and board power read after each configuration's turn. Memory: one more step per configuration
after ``reset_peak_memory_stats``. Kernel classes: ``--profile-steps`` steps under ``torch.profiler``;
a kernel's class comes from its name and from who launched it (the routed experts' forward inside a
``record_function`` range, their backward nodes by autograd sequence number); idle = the step's wall
time less the union of the GPU's busy intervals. The simulator prices the same layers and one micro-batch
on one GPU (EP = 1) from its cost tables for the GPU preset; model FLOPs come from ``simulator.accounting.flops``.

Arms: ``--configs "NAME,NAME @mla-glue-cast=off"`` times NAME twice in the same process and rounds, the second
with a module switch of its own (``ARM_SWITCHES``): the same stage and weights, so the two differ by the switch
alone. Kernel changes worth ~1% of the step cannot be resolved across processes: each starts at other clocks
(docs/results/model-step.md, 2026-12-07 22:27). An arm is priced as its configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from moeplan.kernels import fp8_gemm_ws, fp8_quant, moe_permute, swiglu
from moeplan.model import ModelOptions, StageSpec, attention, build_rank, linear
from moeplan.model.fp8 import clear_fp8_weight_cache
from moeplan.model.runtime.main_grad import attach_main_grads
from moeplan.model.weight_grad import attach_expert_wgrad_batches, flush_expert_wgrads
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.costs.tables import NAMED_TABLES, named_tables


def _sibling(name: str):
    """``benchmarks/<name>.py`` as a module (the script runs as ``python -P``: its folder is not on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cases = _sibling("model_step_cases")
gpu_gaps = _sibling("gpu_gaps")
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("docs/results/model-step.md")
STEP_RANGE, EXPERTS_RANGE = "moeplan::step", "moeplan::experts"
BACKWARD_NODE = "autograd::engine::evaluate_function: "


@dataclasses.dataclass
class Runner:
    """One configuration of one workload: its stage module (None once skipped) and what was measured."""

    config: object  # model_step_cases.Config
    stage: torch.nn.Module | None
    skipped: str | None = None
    times_s: list = dataclasses.field(default_factory=list)
    clocks: list = dataclasses.field(default_factory=list)
    switches: dict = dataclasses.field(default_factory=dict)  # ARM_SWITCHES name -> value name, for its steps alone


# Module switches a configuration can set for its own steps (``--configs "NAME @switch=value"``): each is read at
# every call or forward, so two arms of one configuration can share one stage and alternate within one process
# (the Wgrads' old-values paths are read when a launch is first planned: not here).
ARM_SWITCHES = {
    "mla-glue-cast": (attention, "GLUE_IN_CAST", {"on": True, "off": False}),
    "permute-both": (moe_permute, "PERMUTE_BOTH", {"on": True, "off": False}),
    "swiglu-backward-both": (swiglu, "BACKWARD_BOTH", {"on": True, "off": False}),
    "fp8-cast": (fp8_quant, "ONE_READ", fp8_quant.ONE_READ_CHOICES),
    "paired-linears": (linear, "PAIRED", {"on": True, "off": False}),
}
ARM = " @"  # between a configuration's name and an arm's switches


def parse_arm(text: str) -> tuple[str, dict]:
    """``"NAME @switch=value @switch=value"`` -> (NAME, {switch: value}); ValueError naming what is wrong."""
    name, *parts = text.split(ARM)
    switches = {}
    for part in parts:
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ARM_SWITCHES:
            raise ValueError(f"{part.strip()!r}: not switch=value with a switch of {', '.join(ARM_SWITCHES)}")
        if value not in ARM_SWITCHES[key][2]:
            raise ValueError(f"{key}={value!r}: not one of {', '.join(ARM_SWITCHES[key][2])}")
        switches[key] = value
    return name.strip(), switches


@contextmanager
def switched(r: Runner):
    """The runner's module switches set while its steps run, the modules' own values back after."""
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in (ARM_SWITCHES[k] for k in r.switches)]
    try:
        for key, value in r.switches.items():
            module, attr, values = ARM_SWITCHES[key]
            setattr(module, attr, values[value])
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def unsupported(config, device: torch.device) -> str | None:
    """Why the installed model cannot run ``config`` here, or None."""
    known = {f.name for f in dataclasses.fields(ModelOptions)}
    missing = sorted(set(config.options) - known)
    if missing:
        return f"the installed ModelOptions has no field {', '.join(missing)}"
    if device.type != "cuda" and config.options.get("fp8_kernel") == "kernels":
        return "fp8_kernel='kernels' runs the kernels' Triton GEMMs: needs a CUDA GPU"
    return None


def build_runners(w, device: torch.device, configs: set[str] | list[str] | None = None) -> list[Runner]:
    """Every configuration's stage, all built with the same seed, then made to share the first one's
    weights (``load_state_dict(assign=True)``): one copy in memory whatever the number of configurations. An arm
    (``"NAME @switch=value"``, ``parse_arm``) runs NAME's stage itself with its switches set (``switched``), after
    NAME's own runner where that is asked for too; NAME's are the configurations' order."""
    arms = {}  # base name -> [(label, switches)]
    for label in (c.name for c in cases.CONFIGS) if configs is None else configs:
        name, switches = parse_arm(label)
        arms.setdefault(name, []).append((label, switches))
    runners, first = [], None
    for config in (c for c in cases.CONFIGS if c.name in arms):
        reason = unsupported(config, device)
        if reason is None:
            try:
                options = ModelOptions(**config.options)
                with torch.device(device):
                    stage = build_rank(w.spec, [StageSpec(w.first_layer, w.end_layer, False, False)], options)[0]
                    stage.init_weights(torch.Generator(device).manual_seed(0))
                # the FP8 expert Wgrads of that many micro-batches as one launch (1: none)
                attach_expert_wgrad_batches(stage, config.wgrad_batch)
            except (TypeError, ValueError, ImportError, RuntimeError) as exc:
                reason = f"cannot build: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if reason is not None:
            log.info("%s %s: skipped, %s", w.name, config.name, reason)
            runners += [Runner(dataclasses.replace(config, name=label), None, reason, switches=switches)
                        for label, switches in arms[config.name]]
            continue
        if first is None:
            first = stage
        else:
            res = stage.load_state_dict(first.state_dict(), assign=True, strict=False)
            if res.missing_keys or res.unexpected_keys:  # then those tensors are this configuration's own
                log.warning("%s %s: not shared: %s", w.name, config.name, res.missing_keys + res.unexpected_keys)
        runners += [Runner(dataclasses.replace(config, name=label), stage, switches=switches)
                    for label, switches in arms[config.name]]
    return runners


def step_inputs(w, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (1, T, d) that require grad, and the fixed output gradient g of the same shape."""
    gen = torch.Generator(device).manual_seed(1)
    shape = (1, w.tokens, w.spec.hidden_size)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()
    return x, torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)


def accumulate(stage: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, microbatches: int) -> None:
    """``microbatches`` forwards and backwards of loss = <stage(x), g>, the gradients adding up across them
    as between two optimizer steps. The FP8 weight copies are made afresh before the first only, as after
    an optimizer step: the micro-batches of one step share them (TR §3.3)."""
    clear_fp8_weight_cache()
    for _ in range(microbatches):
        torch.autograd.backward(stage(x), g)
    flush_expert_wgrads(stage)  # batched expert Wgrads still pending (model.weight_grad), as the runtime at a step end


def train_step(stage: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, microbatches: int) -> None:
    """One step of ``microbatches`` micro-batches (``accumulate``); then the gradients are dropped."""
    accumulate(stage, x, g, microbatches)
    stage.zero_grad(set_to_none=True)
    x.grad = None


@contextmanager
def main_grads(stage: torch.nn.Module, on: bool):
    """While active (``on``), the stage's parameters have FP32 main gradients as the runtime attaches them
    (``model.runtime.main_grad``): the weight gradients add into them (inside the GEMM where the path can: BF16
    ``addmm`` into FP32, the FP8 Gluon epilogue; else by the main-grad hook), never summing in BF16. Attached and
    detached outside the timed steps: the buffers' allocation is not a micro-batch's cost."""
    if not on:
        yield
        return
    grads = attach_main_grads(stage)
    try:
        yield
    finally:
        grads.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(runners: list[Runner], x, g, device: torch.device, steps: int, microbatches: int,
            with_main_grads: bool = False) -> None:
    """``steps`` steps per configuration; one that fails is skipped with the error as its reason."""
    for r in runners:
        if r.skipped:
            continue
        started = time.perf_counter()
        try:
            with main_grads(r.stage, with_main_grads), switched(r):
                for _ in range(steps):
                    train_step(r.stage, x, g, microbatches)
                sync(device)
        except Exception as exc:  # a configuration the installed kernels cannot run: recorded, the others go on
            log.exception("%s: warm-up failed", r.config.name)
            r.skipped, r.stage = f"failed in warm-up: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", None
            x.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        log.info("%s: %d warm-up steps in %.1f s", r.config.name, steps, time.perf_counter() - started)


def timed_steps(r: Runner, x, g, device: torch.device, n: int, microbatches: int,
                with_main_grads: bool = False) -> list[float]:
    """Seconds per micro-batch of ``n`` steps, each alone on the GPU: CUDA events around the step (wall
    clock on the CPU), over its ``microbatches``."""
    with main_grads(r.stage, with_main_grads), switched(r):
        return [_timed_step(r, x, g, device, microbatches) for _ in range(n)]


def _timed_step(r: Runner, x, g, device: torch.device, microbatches: int) -> float:
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        train_step(r.stage, x, g, microbatches)
        return (time.perf_counter() - t0) / microbatches
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    train_step(r.stage, x, g, microbatches)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / microbatches


def read_clocks(device: torch.device) -> dict:
    """SM clock (MHz) and board power (W) now, through NVML (torch.cuda's pynvml calls); None without."""
    if device.type != "cuda":
        return {"sm_mhz": None, "watts": None}
    try:
        return {"sm_mhz": float(torch.cuda.clock_rate(device)), "watts": torch.cuda.power_draw(device) / 1e3}
    except Exception:  # noqa: BLE001 (no pynvml, or NVML refusing: the timings stand without clocks)
        return {"sm_mhz": None, "watts": None}


def burn_and_time(runners: list[Runner], x, g, device: torch.device, args) -> None:
    """Burn-in for ``args.burn_s`` seconds (all configurations in turn), then the timed rounds."""
    end = time.perf_counter() + args.burn_s
    while time.perf_counter() < end:
        for r in runners:
            with main_grads(r.stage, args.main_grads), switched(r):
                train_step(r.stage, x, g, args.microbatches)
                sync(device)
    log.info("burn-in done, clocks %s", read_clocks(device))
    for rnd in range(args.rounds):
        for r in runners if rnd % 2 == 0 else runners[::-1]:
            r.times_s += timed_steps(r, x, g, device, args.steps, args.microbatches, args.main_grads)
            r.clocks.append(read_clocks(device))


def memory_and_loads(r: Runner, x, g, device: torch.device, microbatches: int, with_main_grads: bool = False) -> dict:
    """Peak allocated bytes over one step of ``microbatches`` (CUDA: the accumulated gradients included), the
    weights' bytes, and each MoE layer's routed load."""
    moe = r.stage.moe_layers()
    for layer in moe.values():
        layer.tokens_per_expert.zero_()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with main_grads(r.stage, with_main_grads), switched(r):  # in the baseline: held for the whole optimizer step
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        train_step(r.stage, x, g, microbatches)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    loads = {i: layer.tokens_per_expert.double() for i, layer in moe.items()}
    return {"baseline_bytes": base, "peak_bytes": peak, "step_peak_bytes": None if peak is None else peak - base,
            "weight_bytes": sum(p.numel() * p.element_size() for p in r.stage.parameters()),
            "load_max_over_mean": {i: float(c.max() / c.mean()) for i, c in loads.items()}}


@contextmanager
def experts_marked(stage: torch.nn.Module):
    """While active, every routed-experts module (``layers.{i}.mlp.experts``, the checkpoint's name) runs
    its forward inside ``record_function(EXPERTS_RANGE)``, and the yielded list collects the open
    interval of autograd sequence numbers each forward created: its backward nodes carry them."""
    spans, open_ = [], []

    def marker() -> int:  # the sequence number of a fresh autograd node: all later nodes have larger ones
        return torch.ones((), requires_grad=True).mul(1.0).grad_fn._sequence_nr()

    def enter(module, args):
        rf = record_function(EXPERTS_RANGE)
        rf.__enter__()
        open_.append((rf, marker()))

    def leave(module, args, output):
        rf, first = open_.pop()
        spans.append((first, marker()))
        rf.__exit__(None, None, None)

    handles = [h for name, m in stage.named_modules() if name.endswith(".mlp.experts")
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield spans
    finally:
        for h in handles:
            h.remove()


def region_and_phase(event, spans: list[tuple[int, int]]) -> tuple[str, str]:
    """("experts" | "attention" | "", "fwd" | "bwd") of a profiled CPU op, from its ancestors: in the
    backward, the autograd node being evaluated (its sequence number, its name); in the forward, the
    experts' range or the attention op."""
    chain = []  # the op, then its ancestors
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    names = [e.name for e in chain]
    attention = any("scaled_dot_product" in n or "ScaledDotProduct" in n for n in names)
    bwd = next((i for i, n in enumerate(names) if n.startswith(BACKWARD_NODE)), None)
    if bwd is None:
        return ("experts" if EXPERTS_RANGE in names else "attention" if attention else ""), "fwd"
    node = chain[bwd] if chain[bwd].sequence_nr >= 0 or bwd == 0 else chain[bwd - 1]  # the node's own event
    if any(a < node.sequence_nr < b for a, b in spans):
        return "experts", "bwd"
    return ("attention" if attention else ""), "bwd"


def kernel_records(events, device: torch.device, spans) -> list[tuple[str, float, str, str]]:
    """(name, seconds, region, phase) per CUDA kernel, by the op that launched it; on the CPU, per aten
    op's self time (the CPU has no kernels: its ops are the nearest thing)."""
    out = []
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if device.type == "cuda":
            items = [(k.name, k.duration * 1e-6) for k in e.kernels if k.name not in (STEP_RANGE, EXPERTS_RANGE)]
        else:
            items = [(e.name, e.self_cpu_time_total * 1e-6)] if e.name.startswith("aten::") else []
        if items:
            region, phase = region_and_phase(e, spans)
            out += [(name, s, region, phase) for name, s in items if s > 0]
    return out


def profile_breakdown(r: Runner, x, g, device: torch.device, steps: int, microbatches: int,
                      with_main_grads: bool = False, trace: Path | None = None) -> dict:
    """Per micro-batch (``steps`` steps of ``microbatches``): seconds by kernel class and pass, busy (union of
    kernel intervals), wall and idle; with ``trace``, the Chrome trace is kept there and the GPU's idle gaps
    are charged to the host ops that released them (``gpu_gaps``)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with main_grads(r.stage, with_main_grads), switched(r), experts_marked(r.stage) as spans, \
            profile(activities=activities) as prof:
        for _ in range(steps):
            sync(device)
            with record_function(STEP_RANGE):
                train_step(r.stage, x, g, microbatches)
                sync(device)
    events = prof.events()
    records = kernel_records(events, device, spans)
    windows = [(e.time_range.start * 1e-6, e.time_range.end * 1e-6) for e in events
               if e.name == STEP_RANGE and e.device_type == DeviceType.CPU]
    kernel_s = sum(s for _, s, _, _ in records)
    if device.type == "cuda":
        gpu = [(e.time_range.start * 1e-6, e.time_range.end * 1e-6) for e in events
               if e.device_type == DeviceType.CUDA and e.name not in (STEP_RANGE, EXPERTS_RANGE)
               and not getattr(e, "is_user_annotation", False)]
        busy_s = cases.union_s(gpu, windows)
        device_s = sum(min(b, hi) - max(a, lo) for a, b in gpu for lo, hi in windows if b > lo and a < hi)
    else:
        busy_s = device_s = kernel_s  # one thread: the ops' self times do not overlap
    wall_s = sum(hi - lo for lo, hi in windows)
    n = steps * microbatches
    gaps = None
    if trace is not None and device.type == "cuda":
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        gaps = gpu_gaps.gap_summary(json.loads(trace.read_text()), STEP_RANGE)
        log.info("%s: GPU idle\n%s", trace.name, gpu_gaps.format_summary(gaps))
    return {"steps": steps, "microbatches": microbatches, "classes": cases.class_times(records, n), "gaps": gaps,
            "top_kernels": cases.top_kernels(records, n),
            "wall_s": wall_s / n, "busy_s": busy_s / n, "idle_s": (wall_s - busy_s) / n, "kernel_s": kernel_s / n,
            "unlinked_s": (device_s - kernel_s) / n, "spans": len(spans) // n}


HOLD_S = 0.3  # seconds the GPU is held busy (``torch.cuda._sleep``) while the host issues one micro-batch


def host_issue(r: Runner, x, g, device: torch.device, microbatches: int, with_main_grads: bool = False,
               profile_to: Path | None = None) -> dict | None:
    """Host seconds to issue each pass of a step's micro-batches while the GPU is held busy, so that the host never
    waits for it: the step's host cost alone (CUDA only). Each micro-batch of one step (``accumulate``'s order: the
    FP8 weights quantised before the first, the batched expert Wgrads at their slots, the pending ones flushed at
    the end) runs after a ``HOLD_S`` sleep kernel; its forward and its backward are timed by the wall clock from
    their call to their return, then the GPU is drained. A pass whose issue outlasts the hold (the launch queue
    full, or a host wait) is counted and flagged. Per micro-batch: the mean over the step. Where the host issues a
    pass slower than the GPU runs it, the GPU starves there. With ``profile_to``, the step is run again with the
    backward on the calling thread (``torch.autograd.set_multithreading_enabled(False)``) under cProfile, and the
    20 functions with the most own time and the 30 with the most cumulative time are written there."""
    if device.type != "cuda":
        return None
    cycles = int(HOLD_S * 2e9)  # clock64 cycles: HOLD_S at 2 GHz, longer at the lower clocks a GPU runs

    def issue_step(prof=None) -> tuple[list[float], list[float], int]:
        fwd, bwd, late = [], [], 0
        clear_fp8_weight_cache()
        for _ in range(microbatches):
            sync(device)
            torch.cuda._sleep(cycles)
            t0 = time.perf_counter()
            if prof is not None:
                prof.enable()
            out = r.stage(x)
            t1 = time.perf_counter()
            torch.autograd.backward(out, g)
            t2 = time.perf_counter()
            if prof is not None:
                prof.disable()
            del out
            late += (t2 - t0) > 0.8 * HOLD_S
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        flush_expert_wgrads(r.stage)
        sync(device)
        r.stage.zero_grad(set_to_none=True)
        x.grad = None
        return fwd, bwd, late

    with main_grads(r.stage, with_main_grads), switched(r):
        issue_step()  # the allocator's blocks and the kernels' caches as in a timed step
        fwd, bwd, late = issue_step()
        if profile_to is not None:
            import cProfile
            import io
            import pstats
            prof = cProfile.Profile()
            with torch.autograd.set_multithreading_enabled(False):
                issue_step(prof)
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("tottime").print_stats(20)
            stats.sort_stats("cumulative").print_stats(30)
            profile_to.parent.mkdir(parents=True, exist_ok=True)
            profile_to.write_text(text.getvalue())
    n = microbatches
    return {"hold_s": HOLD_S, "fwd_s": sum(fwd) / n, "bwd_s": sum(bwd) / n, "late_passes": late,
            "fwd_max_s": max(fwd), "bwd_max_s": max(bwd)}


def trace_path(folder: Path | None, workload: str, config: str) -> Path | None:
    if folder is None:
        return None
    return folder / f"{workload}-{''.join(c if c.isalnum() else '-' for c in config)}.json"


def host_profile_path(folder: Path | None, workload: str, config: str) -> Path | None:
    path = trace_path(folder, workload, config)
    return None if path is None else path.with_suffix(".txt")


def run_workload(w, device: torch.device, gpu, tables, args) -> dict:
    """Build, warm up, burn in, time, measure memory and profile every configuration of ``w``."""
    log.info("workload %s (%s, %d tokens): building", w.name, w.title, w.tokens)
    runners = build_runners(w, device, args.configs)
    x, g = step_inputs(w, device)
    warm_up(runners, x, g, device, args.warmup, args.microbatches, args.main_grads)
    live = [r for r in runners if not r.skipped]
    burn_and_time(live, x, g, device, args)
    configs = []
    for r in runners:
        entry = {"name": r.config.name, "options": r.config.options, "switches": r.switches, "skipped": r.skipped,
                 "precision": {"fwd": r.config.fwd_precision, "bwd": r.config.bwd_precision},
                 "fusion": r.config.fusion,
                 "predicted_s": cases.predicted_classes(w, r.config, gpu, tables, args.microbatches),
                 "predicted_memory": cases.predicted_memory(w, r.config)}
        if not r.skipped:
            timing = cases.timing_summary(w, r.times_s, r.clocks, gpu.bf16_flops_per_s)
            entry.update(times_s=r.times_s, clocks=r.clocks, timing=timing,
                         memory=memory_and_loads(r, x, g, device, args.microbatches, args.main_grads),
                         profile=profile_breakdown(r, x, g, device, args.profile_steps, args.microbatches,
                                                   args.main_grads, trace_path(args.trace, w.name, r.config.name)))
            if args.host_issue:
                entry["host_issue"] = host_issue(r, x, g, device, args.microbatches, args.main_grads,
                                                 host_profile_path(args.host_profile, w.name, r.config.name))
            log.info("%s %s: %s", w.name, r.config.name, json.dumps(entry["timing"]))
        configs.append(entry)
    del runners, live, x, g
    if device.type == "cuda":
        torch.cuda.empty_cache()
    s = w.spec
    return {"name": w.name, "title": w.title, "layers": [w.first_layer, w.end_layer], "tokens": w.tokens,
            "spec": {k: getattr(s, k) for k in ("name", "hidden_size", "n_routed_experts", "num_experts_per_tok",
                                                "n_group", "topk_group", "n_shared_experts", "moe_intermediate_size",
                                                "intermediate_size", "first_k_dense_replace")},
            "forward_flops_per_token": cases.stage_flops(w), "configs": configs}


def host_cpu() -> dict:
    """The host's CPU model (Linux ``/proc/cpuinfo``, else ``platform.processor()``) and its logical CPUs: the
    machine that launches the kernels. Profiled idle differs between machines of the same GPU by their hosts."""
    model = platform.processor() or None
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count()}


def host_launch_us(device: torch.device, n: int = 2000) -> float:
    """Host microseconds to issue one small CUDA op (``add_`` on a one-element tensor), the median of 5 runs of
    ``n``: how fast this host feeds the GPU, a step's kernels being many and small."""
    t = torch.zeros(1, device=device)
    runs = []
    for _ in range(5):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            t.add_(1)
        runs.append((time.perf_counter() - t0) / n * 1e6)
    torch.cuda.synchronize(device)
    return statistics.median(runs)


def run_meta(device: torch.device, gpu, tables, args) -> dict:
    """Where and with what the numbers were taken."""
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/model_step.py " + " ".join(sys.argv[1:]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "triton": None, "gpu_preset": gpu.name, "tables": tables.name,
            "peak_bf16_flops_per_s": gpu.bf16_flops_per_s, "wgrad_old_values": fp8_gemm_ws.OLD_VALUES,
            "dense_wgrad_old_values": fp8_gemm_ws.DENSE_OLD_VALUES or fp8_gemm_ws.OLD_VALUES,
            "permute_both": moe_permute.PERMUTE_BOTH, "swiglu_backward_both": swiglu.BACKWARD_BOTH,
            "mla_glue_in_cast": attention.GLUE_IN_CAST, "paired_linears": linear.PAIRED,
            "tall_wgrads": {"dense": fp8_gemm_ws.TALL_DENSE, "min_segments": fp8_gemm_ws.TALL_MIN_SEGMENTS,
                            "old_values": fp8_gemm_ws.TALL_OLD_VALUES},
            "fp8_cast": {v: k for k, v in fp8_quant.ONE_READ_CHOICES.items()}[fp8_quant.ONE_READ],
            "protocol": {**{k: getattr(args, k) for k in ("warmup", "burn_s", "rounds", "steps", "profile_steps",
                                                          "microbatches", "main_grads")},
                         "step": cases.step_protocol(args.microbatches)}}
    try:
        meta["triton"] = __import__("triton").__version__
    except ImportError:
        pass
    meta["host"] = host_cpu()
    if device.type == "cuda":
        meta["host"]["launch_us"] = host_launch_us(device)
        meta["sms"] = torch.cuda.get_device_properties(device).multi_processor_count
        query = "driver_version,clocks.max.sm,power.limit,clocks.sm"
        try:
            cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", str(device.index or 0)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            meta["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in res.stdout.split(","))))
        except (OSError, subprocess.TimeoutExpired):
            meta["nvidia_smi"] = None
    return meta


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown results")
    parser.add_argument("--json", type=Path, default=None, help="raw results (default: --out with .json)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="tiny_moe-shaped layers, 64 tokens (smoke run)")
    parser.add_argument("--workloads", default="A,B", help="comma-separated subset of A,B")
    parser.add_argument("--tables", default="default", choices=tuple(NAMED_TABLES), help="simulator cost tables")
    parser.add_argument("--warmup", type=int, default=None, help="steps per configuration (3 CUDA, 1 CPU)")
    parser.add_argument("--burn-s", type=float, default=None, help="burn-in seconds (10 CUDA, 0 CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (4 CUDA, 2 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration and round (3 / 1)")
    parser.add_argument("--profile-steps", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=1, metavar="K",
                        help="micro-batches a step, gradients accumulating, FP8 weights quantised once (default %(default)s)")
    parser.add_argument("--main-grads", action=argparse.BooleanOptionalAction, default=True,
                        help="FP32 main gradients attached as the runtime does (default on)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated configuration names to run (default: all of model_step_cases.CONFIGS); "
                             "'NAME @switch=value ...' runs NAME's stage again with module switches of its own, in "
                             f"the same rounds ({', '.join(ARM_SWITCHES)}; ARM_SWITCHES)")
    parser.add_argument("--trace", type=Path, default=None, metavar="DIR",
                        help="keep each profiled step's Chrome trace there, with its GPU idle charged to host ops")
    parser.add_argument("--host-issue", action="store_true",
                        help="also time the host's issue of each pass with the GPU held busy (host_issue)")
    parser.add_argument("--host-profile", type=Path, default=None, metavar="DIR",
                        help="with --host-issue: a cProfile summary of the host's issue of one step there")
    parser.add_argument("--wgrad-old-values", default=None, choices=tuple(fp8_gemm_ws.OLD_VALUE_PATHS),
                        help="how the FP8 Wgrads' accumulating epilogue gets the main gradients' old values "
                             "(kernels.fp8_gemm_ws.OLD_VALUES; default: the module's)")
    parser.add_argument("--permute-both", default=None, choices=tuple(ARM_SWITCHES["permute-both"][2]),
                        help="the routed experts' combine backward quantised as it permutes, in Gluon "
                             "(kernels.moe_permute.PERMUTE_BOTH; default: the module's)")
    parser.add_argument("--dense-wgrad-old-values", default=None, choices=tuple(fp8_gemm_ws.OLD_VALUE_PATHS),
                        help="the same for the dense (not K-grouped) FP8 Wgrads only "
                             "(kernels.fp8_gemm_ws.DENSE_OLD_VALUES; default: the module's)")
    parser.add_argument("--fp8-cast", default=None, choices=tuple(ARM_SWITCHES["fp8-cast"][2]),
                        help="the casts with transpose (kernels.fp8_quant.quant_act_both): the two single quantisers, "
                             "the one-read Triton kernel or the one-read Gluon kernel (fp8_quant.ONE_READ; default: "
                             "the module's)")
    parser.add_argument("--mla-glue-cast", default=None, choices=tuple(ARM_SWITCHES["mla-glue-cast"][2]),
                        help="MLA's up-projections' output gradients cast as the attention's backward glue is read "
                             "(model.attention.GLUE_IN_CAST; default: the module's)")
    parser.add_argument("--paired-linears", default=None, choices=tuple(ARM_SWITCHES["paired-linears"][2]),
                        help="linears that read one input (q_a and kv_a, gate and up) with one backward: one cast and "
                             "one Dgrad for the two (model.linear.PAIRED; default: the module's)")
    parser.add_argument("--reprice", type=Path, default=None, metavar="JSON",
                        help="no run: that results file's measurements, predicted again by today's simulator")
    args = parser.parse_args()
    if args.reprice is not None:
        args.json = args.json or args.out.with_suffix(".json")
        return args
    if args.configs is not None:
        names = {c.name for c in cases.CONFIGS}
        args.configs = list(dict.fromkeys(c.strip() for c in args.configs.split(",")))
        for label in args.configs:
            try:
                name, _ = parse_arm(label)
            except ValueError as exc:
                parser.error(f"--configs {label!r}: {exc}")
            if name not in names:
                parser.error(f"--configs {name}: not one of {', '.join(sorted(names))}")
    if args.microbatches < 1:
        parser.error(f"--microbatches {args.microbatches}: must be at least 1")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (smoke run: --small --device cpu --out FILE)")
    if not cuda and args.out.resolve() == (ROOT / DEFAULT_OUT).resolve():
        parser.error(f"--device cpu writes no measurement to {DEFAULT_OUT}: give --out")
    for name, on_cuda, on_cpu in (("warmup", 3, 1), ("burn_s", 10.0, 0.0), ("rounds", 4, 2), ("steps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    args.json = args.json or args.out.with_suffix(".json")
    return args


def reprice(path: Path, out: Path, out_json: Path) -> None:
    """A results JSON's measurements unchanged, its predictions made again by today's simulator (the run's GPU
    preset and tables): after a cost entry is fixed from a measurement, the page shows what it predicts now."""
    result = json.loads(path.read_text())
    meta = result["meta"]
    gpu = cases.gpu_preset(meta["device"])
    tables = named_tables(next(n for n in NAMED_TABLES if named_tables(n, gpu.name).name == meta["tables"]), gpu.name)
    by_name = {c.name: c for c in cases.CONFIGS}
    small = "--small" in meta["command"]
    for w in cases.workloads(small):
        for rw in (x for x in result["workloads"] if x["name"] == w.name):
            for c in rw["configs"]:
                config = by_name.get(c["name"].split(ARM)[0])
                if config is not None:
                    c["predicted_s"] = cases.predicted_classes(w, config, gpu, tables,
                                                               meta["protocol"].get("microbatches", 1))
                    c["fusion"] = config.fusion
    meta["repriced"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_atomic(out_json, json.dumps(result, indent=1, default=str) + "\n")
    write_atomic(out, cases.markdown(result))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.reprice is not None:
        reprice(args.reprice, args.out, args.json)
        return
    if args.wgrad_old_values is not None:
        fp8_gemm_ws.OLD_VALUES = args.wgrad_old_values  # read when a launch is planned: before the first one
    if args.dense_wgrad_old_values is not None:
        fp8_gemm_ws.DENSE_OLD_VALUES = args.dense_wgrad_old_values
    for key, (module, attr, values) in ARM_SWITCHES.items():  # the whole run's, where a flag sets it
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            setattr(module, attr, values[value])
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run on a shared machine: spinning thread pools slow tiny ops 10x
    gpu = cases.gpu_preset(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    tables = named_tables(args.tables, gpu.name)
    meta = run_meta(device, gpu, tables, args)
    wanted = set(args.workloads.split(","))
    result = {"meta": meta, "workloads": [run_workload(w, device, gpu, tables, args)
                                          for w in cases.workloads(args.small) if w.name in wanted]}
    write_atomic(args.json, json.dumps(result, indent=1, default=str) + "\n")
    text = cases.markdown(result)
    write_atomic(args.out, text)
    log.info("wrote %s and %s", args.out, args.json)
    print(text)


if __name__ == "__main__":
    main()
