"""The pipeline executor's overhead against the plain model step, for a single-rank plan (issue 18).

    python -P benchmarks/executor_overhead.py --out docs/results/executor-overhead.md      # one GPU (NCCL world of 1)
    python -P benchmarks/executor_overhead.py --small --device cpu --out /tmp/eo.md        # smoke run (gloo)

The same stage module, the same micro-batches, the same loss, timed two ways per step:
- **plain**: for each micro-batch, forward, loss / M, backward (gradient accumulation), as a user's loop;
- **executor**: ``RankRuntime.forward_backward`` walking the plan's lowered 1F1B action list (pp = 1: the
  schedule is F then B per micro-batch, no point-to-point), with its per-action timeline.
Both accumulate into the same FP32 main gradients, zeroed after every step; no optimizer step (it is the
same code either way). Steps alternate between the two (A B, B A, ...) after ``--warmup`` steps of each,
each step timed from a synchronize to a synchronize; the figure is the ratio of medians. Target: < 3%.

Model: DeepSeek-V3's layer shapes (hidden 7168, MLA, 32 routed experts top-8 in 8 groups, 4 kept, one
shared expert) with 2 MoE layers, a 4K vocabulary and no MTP, 4 micro-batches of 1 x 4096 tokens
(``--small``: the tiny preset at 1 x 64).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moeplan.model.losses import training_loss
from moeplan.model.runtime.rank import RankRuntime, RuntimeOptions
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.plan_file import PlanInputs
from moeplan.simulator.planning.planner import build_plan
from moeplan.simulator.presets.clusters import h200
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe
from moeplan.simulator.presets.recipes import default_recipe
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec

TARGET_FRAC = 0.03


def stage_spec(small: bool):
    if small:
        return tiny_moe().model_copy(update={"num_nextn_predict_layers": 0})
    return deepseek_v3().model_copy(update={
        "name": "v3-2layer", "num_hidden_layers": 2, "first_k_dense_replace": 0, "n_routed_experts": 32,
        "vocab_size": 4096, "num_nextn_predict_layers": 0})


def single_rank_plan(spec, seq_len: int, microbatches: int):
    cluster = h200(1)
    cluster = cluster.model_copy(update={"node": cluster.node.model_copy(update={"gpus_per_node": 1})})
    par = ParallelSpec(pp=1, dp=1, ep=1, schedule="1f1b", micro_batch_size=1, seq_len_tokens=seq_len,
                       microbatches=microbatches)
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=microbatches),))
    return build_plan(PlanInputs(model=spec, cluster=cluster, parallel=par, training=training,
                                 budget=default_recipe().budget))


def plain_step(rt: RankRuntime, step: int) -> None:
    """The user's loop over the same modules and micro-batches: forward, loss / M, backward."""
    (module,) = rt.unique_modules()
    micro = rt.microbatches(step)
    for mb in micro.values():
        out = module(mb.input_ids.to(rt.device))
        (training_loss(out, mb.labels.to(rt.device), 0.0).total / len(micro)).backward()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(rt: RankRuntime, device: torch.device, warmup: int, rounds: int) -> dict:
    ways = {"plain": lambda s: plain_step(rt, s), "executor": lambda s: rt.forward_backward(s)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(warmup + rounds):
        order = list(ways) if i % 2 == 0 else list(reversed(ways))
        for name in order:
            seconds = timed(lambda name=name, i=i: ways[name](i), device)
            rt.main_grads.zero_()
            if i >= warmup:
                times[name].append(seconds)
    plain, executor = statistics.median(times["plain"]), statistics.median(times["executor"])
    return {"plain_s": plain, "executor_s": executor, "overhead_frac": executor / plain - 1, "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/executor-overhead.md"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        spec = stage_spec(args.small)
        seq, micro = (64, 2) if args.small else (4096, 4)
        plan = single_rank_plan(spec, seq, micro)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        rt = RankRuntime.create(plan, 0, RuntimeOptions(dtype=dtype), device)
        result = measure(rt, device, args.warmup, args.rounds)
    finally:
        dist.destroy_process_group()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = {"device": gpu, "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "model": spec.name, "microbatches": micro, "seq_len": seq, "dtype": str(dtype)}
    verdict = "meets" if result["overhead_frac"] < TARGET_FRAC else "misses"
    text = (f"# Executor overhead (single-rank plan)\n\n{json.dumps(meta)}\n\n"
            f"| way | median step |\n| --- | --- |\n| plain loop | {result['plain_s'] * 1e3:.2f} ms |\n"
            f"| executor | {result['executor_s'] * 1e3:.2f} ms |\n\n"
            f"Overhead {result['overhead_frac'] * 100:+.2f}% ({verdict} the < {TARGET_FRAC * 100:.0f}% target); "
            f"{args.rounds} alternating rounds after {args.warmup} warm-up steps of each.\n\n"
            "Reproduce: `python -P benchmarks/executor_overhead.py" + (" --small --device cpu" if args.small else "")
            + "`\n")
    write_atomic(args.out, text)
    write_atomic(args.out.with_suffix(".json"), json.dumps({"meta": meta, **result}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
