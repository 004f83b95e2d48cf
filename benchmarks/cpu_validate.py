"""Predicted against measured on this machine: one training step of the whole model in one process.

For benchmarks/cpu_tables.py. The plan: ``--cluster cpu`` with one process (``gpus_per_node=1``: pp, ep,
dp 1, so no communication), ``microbatches`` micro-batches of ``mbs`` sequences of ``seq`` tokens, priced
with the cpu tables just measured (``tables``, and the peaks their fractions are of, whatever file the
preset reads). The run: the same model (``moeplan.model.Transformer``,
MTP included) in the tables' dtype on one thread, each micro-batch's forward, loss (MTP weight 0.3) and
backward, gradients accumulated, then one AdamW step; the median step of ``reps`` after two warm-up
steps. A plan of several processes adds bubbles and gloo transfers the single process has not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from moeplan.model.losses import training_loss
from moeplan.model.options import ModelOptions
from moeplan.model.transformer import Transformer
from moeplan.orchestrator.inputs import build_request, flag_overrides
from moeplan.simulator.costs.tables import CostTables
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.planning.planner import plan_with_trace

OPTIMIZER_RANGE = "moeplan::optimizer"
SPLIT = {"GEMMs (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
         "attention core (SDPA forward and backward)": ("scaled_dot_product", "_flash_attention"),
         "optimizer (AdamW step)": (), "other": ()}


def predicted_step_s(model: str, tables: CostTables, mbs: int, seq: int, microbatches: int) -> float:
    flags = {"pp": 1, "ep": 1, "dp": 1, "schedule": "1f1b", "microbatches": microbatches, "micro_batch_size": mbs,
             "seq_len": seq, "global_batch": mbs * microbatches}
    assert tables.machine is not None, "cpu tables carry the peaks their fractions are of"
    peaks = [f"cluster.gpu.bf16_flops_per_s={tables.machine.peak_flops_per_s!r}",
             f"cluster.gpu.hbm_bytes_per_s={tables.machine.memory_bytes_per_s!r}"]
    req = build_request(model, "cpu", 1, flag_overrides(flags) + ["cluster.node.gpus_per_node=1", *peaks])
    inputs, source = req.planned(None)
    plan, _ = plan_with_trace(inputs, tuple(req.ignored), source, None, SimOptions(tables=tables),
                              tuple(sorted(req.fixed)))
    assert plan.predictions is not None, "a fixed one-process layout is simulated"
    return plan.predictions.step.step_time_s


def _step(model: str, dtype: torch.dtype, mbs: int, seq: int, microbatches: int) -> Callable[[], None]:
    """One training step of the whole model on fixed random batches (fresh weights, seed 0)."""
    spec = build_request(model, "cpu", 1, []).inputs.model
    net = Transformer(spec, ModelOptions(dtype=dtype))
    net.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, spec.vocab_size, (mbs, seq + 1), generator=gen) for _ in range(microbatches)]

    def step() -> None:
        for tokens in batches:
            out = net(tokens[:, :-1])
            training_loss(out, tokens[:, 1:], 0.3).total.backward()
        with record_function(OPTIMIZER_RANGE):
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measured_step_s(model: str, dtype: torch.dtype, mbs: int, seq: int, microbatches: int, reps: int) -> float:
    step = _step(model, dtype, mbs, seq, microbatches)
    times = []
    for i in range(reps + 2):
        start = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_split(model: str, dtype: torch.dtype, mbs: int, seq: int) -> dict[str, float]:
    """Self CPU seconds of one step (one micro-batch, after two warm-up steps) by class, from torch.profiler."""
    step = _step(model, dtype, mbs, seq, 1)
    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    split = dict.fromkeys(SPLIT, 0.0)
    events = prof.key_averages()
    opt_total = next((e.cpu_time_total for e in events if e.key == OPTIMIZER_RANGE), 0.0) * 1e-6
    for e in events:
        if e.key == OPTIMIZER_RANGE:
            continue
        name = next((c for c, ops in SPLIT.items() if any(op in e.key for op in ops)), "other")
        split[name] += e.self_cpu_time_total * 1e-6
    # AdamW runs no GEMM or attention: its ops' self times landed in "other"; its range is the optimizer
    split["optimizer (AdamW step)"] = opt_total
    split["other"] -= opt_total
    return split


def validation_rows(model: str, tables: dict[str, tuple[CostTables, torch.dtype]], cases: list[tuple[int, int, int]],
                    reps: int) -> list[dict]:
    """Per tables and (mbs, seq, microbatches): predicted and measured seconds."""
    rows = []
    for name, (t, dtype) in tables.items():
        for mbs, seq, mb in cases:
            rows.append({"tables": name, "mbs": mbs, "seq": seq, "microbatches": mb,
                         "predicted_s": predicted_step_s(model, t, mbs, seq, mb),
                         "measured_s": measured_step_s(model, dtype, mbs, seq, mb, reps)})
    return rows
