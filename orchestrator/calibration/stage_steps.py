"""Each pipeline rank's passes run as the runtime runs them, a process a rank, their sub-steps timed: a CPU's ops.

``time_stage_ops(inputs, dp, dtype, reps, label)`` starts a process per pipeline rank (spawned, all at once, each
step begun together at a barrier), as a run's ranks share the machine's cores. Tiny-moe on this 2-core VM,
2026-12-06 18:51 (a scratch script, the median of 25 steps, alternated): rank 1's passes took 52.0-67.1 ms a step
alone, and with rank 0's passes looping in a second process 0.2-5.2 ms more in seven runs of ten, 56-66 ms more in
three; the runs' rank 1 passes had run 0.9-6.1 ms a step over this module's timing of them one rank after the
other in one process. Each builds the stage modules it holds
(``model.transformer.build_rank``, the model's initialisation by name), their FP32 main gradients (the
runtime's post-accumulate-grad hooks: every backward adds each weight's gradient into its bucket) and walks
the rank's action list of the plan's schedule over the runtime's synthetic micro-batches (``SyntheticTask``; a
later stage's input and output gradient are random): each ``F`` through
``model.runtime.overlap.stage_forward``, each ``B`` through ``stage_backward``, node by node, with the
executor's ``Pass`` and ``Timeline``, so every sub-step event carries the simulator's name
(``"{stage}{kind}{mb} L{i} attn"``, ``... head``) exactly as a run's trace does. Then what
``check --recalibrate`` derives from a run's traces (``recalibrate.measured_ops_of``): per (layer kind,
action, op) the median over micro-batches, layers and ranks after one untimed step, the head event per head
(it holds the MTP modules, whose ops are entered at zero), the shared expert inside ``experts``. And what a
run's events leave out: per pass kind, the median of each pass's wall time less its nodes' events
(``costs.measured_ops.PASS_OP``: the RoPE tables, each node's detached leaf and tape entry; tiny-moe,
2026-12-06: 0.24-0.28 ms a forward, 0.15-0.25 ms a backward, against 2-5 ms of nodes). Where dp = 1, each
step's passes are followed by the rank's optimizer step (``optimizer_ranks.optimizer_step``), its parts timed as
the runtime times them, on the gradients the passes left: entries of layer kind ``optimizer``, as
``optimizer_ranks`` times them alone, but on memory the passes have just used. After each timed step, the same
step again (the same micro-batches): its first pass with the runtime's data thread beside it, every other pass
after a sleep of one of ``WAKE_WAITS_S`` in turn (a run's rank waits that long for a neighbour's message): per
pass kind and wait, the median of each pass's wall time less the same pass's median back to back
(``engine.host_term.wake_op``; tiny-moe, 2026-12-06: 0.1-0.2 ms after 2 ms, 0.9-1.3 ms after 16 ms), made
non-decreasing in the wait (a wait whose median falls below a shorter one's is pooled with it, weighted by
samples: with 4-6 samples a wait, one median can fall to 0), which the engine adds to a pass its rank waited before; and the first pass's extra over the same pass without the
thread (``STEP_START_OP``), which the engine adds to a rank's first pass begun at the step's start.

Why not the pieces timed alone (``host_ops.time_pieces``): a piece repeated alone runs 5-15% faster than
the same piece in the runtime's pass (tiny-moe, 2026-12-06: 0.96 against 1.06 ms for the MoE half forward,
1.15 against 1.30 ms backward, 0.20 against 0.29 ms for the dense FFN backward): the main-gradient hooks,
the node's detached leaves, and the other pieces between two calls of the same one. What differs from a
run: no communication (a stage's input is a fresh tensor, its output gradient too), so a rank's passes meet the
others' passes where their own schedule puts them, not where a run's messages do; and a data-parallel replica's
ranks (dp > 1) have no process here.

Only plain ``F``/``B`` schedules without tensor, context or expert parallelism (the runtime's CPU path for
those: one process per pipeline rank, the MoE experts local); anything else raises ``NotImplementedError``
and the pieces timed alone stand.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp

from moeplan.model.balance import BalanceSchedule
from moeplan.model.losses import training_loss
from moeplan.model.runtime.data import SyntheticTask
from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.main_grad import MainGrads
from moeplan.model.runtime.optimizer import part_marker
from moeplan.model.runtime.overlap import Pass, stage_backward, stage_forward
from moeplan.model.runtime.overlap_comm import DistComm, Streams
from moeplan.orchestrator.calibration.optimizer_ranks import (
    SEED,
    one_process_group,
    optimizer_step,
    part_ops,
    part_seconds,
    rank_modules,
    set_shape,
)
from moeplan.orchestrator.calibration.recalibrate import measured_ops_of, op_durations_of
from moeplan.orchestrator.calibration.spawned import gather, running
from moeplan.simulator.contracts.trace import TraceEvent, chrome_trace
from moeplan.simulator.costs.measured_ops import PASS_OP, MeasuredOp
from moeplan.simulator.costs.optimizer_step import OPTIMIZER_PARTS
from moeplan.simulator.engine.host_term import STEP_START_OP, wake_op
from moeplan.simulator.planning.planner import resolve_microbatches
from moeplan.simulator.schedules.registry import make_schedule, rank_stages
from moeplan.simulator.spec.inputs import PlanInputs

WARMUP_STEPS = 1
# Sleeps before each pass, to time a pass after its process blocked (``engine.host_term.wake_op``): the runs' waits
# for a neighbour's message (tiny-moe, pp 2, 1F1B: 2-15 ms)
WAKE_WAITS_S = (0.002, 0.004, 0.008, 0.016)
# A rank's process waits at most this long for the others at a step's start (one tiny-moe step: ~0.1 s), and is
# joined this long after it reported
RANK_BARRIER_TIMEOUT_S = 600.0
RANK_JOIN_TIMEOUT_S = 30.0


def time_stage_ops(inputs: PlanInputs, dp: int, dtype: torch.dtype, reps: int, label: str) -> list[MeasuredOp]:
    """The ops of every pipeline rank's passes, timed in them (see module docstring)."""
    par = inputs.parallel
    if par.tp != 1 or par.cp != 1 or par.ep != 1:
        raise NotImplementedError(f"tp={par.tp}, cp={par.cp}, ep={par.ep}: the passes are timed without tensor, "
                                  "context or expert parallelism only")
    microbatches = resolve_microbatches(par, inputs.training, dp)
    schedule = make_schedule(par.schedule, par.pp, microbatches, par.virtual_stages)
    if any(len(a.ops) != 1 or a.ops[0].kind not in "FB" for rank in schedule.ranks for a in rank):
        raise NotImplementedError(f"schedule={par.schedule}: the passes are timed for schedules of F and B "
                                  "actions alone")
    ranks = _all_ranks(inputs, dp, dtype, reps, label, microbatches, schedule)
    traces = {r: got.trace for r, got in enumerate(ranks)}
    outside = {kind: [s for got in ranks for s in got.outside[kind]] for kind in "FB"}
    woken: dict[tuple[str, float], list[float]] = {}  # (pass kind, wait) -> each pass's extra over back to back
    starts: dict[str, list[float]] = {}  # pass kind -> a step's first pass's extra beside the data thread
    for got in ranks:
        for key, extras in got.woken.items():
            woken.setdefault(key, []).extend(extras)
        for kind, extras in got.starts.items():
            starts.setdefault(kind, []).extend(extras)
    out = [o for got in ranks for o in got.optimizer]
    src = (f"{label}: the runtime's passes, each pipeline rank's in a process of its own, all at once, "
           f"{microbatches} micro-batches of {par.micro_batch_size} x {par.seq_len_tokens} tokens a step, "
           f"{reps} step(s)")
    passes = [MeasuredOp(layer_kind="ends", action=kind, op=PASS_OP, tokens=par.micro_batch_size * par.seq_len_tokens,
                         seq_len=par.seq_len_tokens, s=statistics.median(seconds), samples=len(seconds),
                         source=f"{src}: each pass's wall time less its nodes' events, median of {len(seconds)}")
              for kind, seconds in outside.items() if seconds]
    wakes = [MeasuredOp(layer_kind="ends", action=kind, op=wake_op(wait), tokens=par.micro_batch_size
                        * par.seq_len_tokens, seq_len=par.seq_len_tokens, s=s, samples=n,
                        source=f"{src}: each pass's wall time after its process slept {wait:g} s, less the median of "
                        f"the same pass back to back, median of {n}" + (f", pooled with the next waits' ({pooled} "
                        "samples: never less after a longer wait)" if pooled > n else ""))
             for kind, wait, s, n, pooled in _non_decreasing(woken)]
    wakes += [MeasuredOp(layer_kind="ends", action=kind, op=STEP_START_OP, tokens=par.micro_batch_size
                         * par.seq_len_tokens, seq_len=par.seq_len_tokens, s=max(0.0, statistics.median(extra)),
                         samples=len(extra), source=f"{src}: a step's first pass with the runtime's data thread making "
                         f"the next step's micro-batches beside it, less the same pass without, median of {len(extra)}")
              for kind, extra in sorted(starts.items())]
    return measured_ops_of(inputs, op_durations_of(inputs, traces), src) + passes + wakes + out


@dataclass
class _RankResult:
    """What one pipeline rank's process measured (see ``_rank_worker``)."""
    trace: dict  # its timed steps' node events, as a run's trace
    outside: dict[str, list[float]]  # per pass kind, each pass's seconds outside its nodes
    woken: dict[tuple[str, float], list[float]]  # (pass kind, wait) -> each pass's extra over back to back
    starts: dict[str, list[float]]  # pass kind -> a step's first pass's extra beside the data thread
    optimizer: list[MeasuredOp]  # its optimizer parts (dp = 1)


def _all_ranks(inputs: PlanInputs, dp: int, dtype: torch.dtype, reps: int, label: str, microbatches: int,
               schedule) -> list[_RankResult]:
    """Every pipeline rank's passes, each rank in a process of its own, all at once, as a run's processes share the
    machine's cores; each step begun together (a barrier), as a run's ranks leave the step's barrier together."""
    par = inputs.parallel
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(par.pp), ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank_worker, name=f"moeplan-passes-{r}", daemon=True,
                         args=(inputs, r, dp, dtype, reps, label, microbatches, schedule.ranks[r],
                               torch.get_num_threads(), barrier, queue)) for r in range(par.pp)]
    with running(procs, RANK_JOIN_TIMEOUT_S):  # a rank's process gone or a signal: the others stopped at once
        got: dict[int, _RankResult | str] = dict(gather(procs, queue, par.pp, "the passes"))
    failed = {r: res for r, res in got.items() if isinstance(res, str)}
    if failed:
        raise RuntimeError(f"pipeline rank(s) {sorted(failed)}'s passes failed: {failed}")
    return [got[r] for r in range(par.pp)]


def _rank_worker(inputs: PlanInputs, r: int, dp: int, dtype: torch.dtype, reps: int, label: str, microbatches: int,
                 actions, threads: int, barrier, queue) -> None:
    """Pipeline rank ``r``'s process: its timed steps and, after each, the same step with waits (module docstring);
    puts ``(r, _RankResult)`` on ``queue``, or ``(r, the error)`` (the other ranks' barrier is then broken)."""
    torch.set_num_threads(threads)
    try:
        queue.put((r, _one_rank(inputs, r, dp, dtype, reps, label, microbatches, actions, barrier)))
    except Exception as e:  # noqa: BLE001 -- any error: reported by the parent, with the rank
        barrier.abort()
        queue.put((r, f"{type(e).__name__}: {e}"))


def _one_rank(inputs: PlanInputs, r: int, dp: int, dtype: torch.dtype, reps: int, label: str, microbatches: int,
              actions, barrier) -> _RankResult:
    """Rank ``r``'s steps, each begun at ``barrier`` with the other ranks' (see ``_rank_worker``)."""
    optimizer = dp == 1  # the rank's optimizer step after its passes, as the runtime runs it (ZeRO groups of one)
    outside: dict[str, list[float]] = {"F": [], "B": []}
    timed = _RankTimes(events=[], outside=outside, optimizer={part: [] for part in OPTIMIZER_PARTS})
    built, main_grads = rank_modules(inputs, r, dtype)
    gen = torch.Generator().manual_seed(r)
    # each pass kind's next wait, the ranks' cycles offset so that every wait meets the others' passes
    waits = {kind: itertools.islice(itertools.cycle(WAKE_WAITS_S), r, None) for kind in "FB"}
    with one_process_group() if optimizer else contextlib.nullcontext(), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeplan-data") as data_thread:
        step = optimizer_step(inputs, built, main_grads) if optimizer else None
        modules = dict(zip(rank_stages(inputs.parallel, r), built, strict=True))
        varied = _RankTimes(events=[], outside={"F": [], "B": []}, optimizer={})
        for i in range(WARMUP_STEPS + reps):
            timing = i >= WARMUP_STEPS
            barrier.wait(timeout=RANK_BARRIER_TIMEOUT_S)
            _one_step(inputs, modules, actions, microbatches, dtype, gen, i, timed if timing else None)
            _optimizer(step, main_grads, timed if timing else None)
            if timing:  # the same step again, interleaved (a drift of the machine's speed meets both)
                barrier.wait(timeout=RANK_BARRIER_TIMEOUT_S)
                _one_step(inputs, modules, actions, microbatches, dtype, gen, i, varied,
                          lambda kind: next(waits[kind]), data_thread)
                _optimizer(step, main_grads, None)
    woken: dict[tuple[str, float], list[float]] = {}
    starts: dict[str, list[float]] = {}
    for (kind, chain, how), walls in varied.walls.items():
        base = statistics.median(timed.walls[(kind, chain, 0.0)])
        extras = starts.setdefault(kind, []) if how == "start" else woken.setdefault((kind, how), [])
        extras.extend(w - base for w in walls)
    main_grads.detach()
    ops = part_ops(inputs, r, timed.optimizer, set_shape(main_grads),
                   f"{str(dtype).removeprefix('torch.')}, one process a rank, after its passes", label) if optimizer else []
    return _RankResult(trace=chrome_trace(timed.events), outside=outside, woken=woken, starts=starts, optimizer=ops)


def _non_decreasing(woken: dict[tuple[str, float], list[float]]) -> list[tuple[str, float, float, int, int]]:
    """Per pass kind and wait: (kind, wait s, extra s, samples, samples pooled). The median extra of each wait, made
    non-decreasing in the wait by pooling adjacent waits (pool-adjacent-violators, weighted by samples): a pass
    asleep longer is never faster to wake, so a median that falls below a shorter wait's is the few samples' noise
    (tiny-moe, 2026-12-06 17:41, 4-6 samples a wait: F 0.46, 0.86, 0.0, 1.80 ms after 2, 4, 8, 16 ms)."""
    out = []
    for kind in sorted({k for k, _ in woken}):
        blocks: list[list] = []  # [extra s, samples, waits]
        for wait in sorted(w for k, w in woken if k == kind):
            extra = woken[(kind, wait)]
            blocks.append([max(0.0, statistics.median(extra)), len(extra), [(wait, len(extra))]])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                (s1, n1, w1), (s2, n2, w2) = blocks.pop(-2), blocks.pop()
                blocks.append([(s1 * n1 + s2 * n2) / (n1 + n2), n1 + n2, w1 + w2])
        out += [(kind, wait, s, n, pooled) for s, pooled, waits in blocks for wait, n in waits]
    return out


@dataclass
class _RankTimes:
    events: list[TraceEvent]  # the passes' node events
    outside: dict[str, list[float]]  # per pass kind, each pass's seconds outside its nodes
    optimizer: dict[str, list[float]]  # per optimizer part, its seconds
    # (pass kind, chain, the wait before it or "start": beside the data thread) -> wall times
    walls: dict[tuple[str, str, float | str], list[float]] = field(default_factory=dict)


def _one_step(inputs: PlanInputs, modules: dict[int, torch.nn.Module], actions, microbatches: int,
              dtype: torch.dtype, gen: torch.Generator, step: int, timed: _RankTimes | None,
              wait_of: Callable[[str], float] | None = None, data_thread: ThreadPoolExecutor | None = None) -> None:
    """Step ``step``'s passes of ``actions`` (on ``modules``, by stage) over the runtime's synthetic micro-batches
    (a later stage's input and output gradient drawn from ``gen``), recorded into ``timed`` (if given). With
    ``data_thread``, the first pass starts the next step's micro-batches on it, as the runtime's
    ``RankRuntime.forward_backward`` does; every other pass (or, without it, every pass) first sleeps
    ``wait_of(its kind)`` seconds (the process blocked, as in a receive)."""
    spec, par = inputs.model, inputs.parallel
    for module in modules.values():
        module.train()
        for moe in module.moe_layers().values():
            moe.balance_loss_scale = 1.0 / microbatches  # as model.runtime.rank.RankRuntime.create
    mtp_weight = BalanceSchedule.from_training(inputs.training).mtp_weight(0.0)
    shape = (par.micro_batch_size, par.seq_len_tokens, spec.hidden_size)
    comm, streams = DistComm(), Streams(torch.device("cpu"))
    task = SyntheticTask(spec.vocab_size, par.micro_batch_size, par.seq_len_tokens, SEED)
    timeline, tapes, walls = Timeline(rank=0, cuda=False), {}, {}
    prefetched = None
    for action in actions:
        op = action.ops[0]
        p = Pass(comm, streams, timeline, str(op))
        how: float | str = 0.0
        if data_thread is not None and prefetched is None:
            how = "start"
        elif wait_of is not None:
            how = wait_of(op.kind)
            time.sleep(how)
        start = time.perf_counter()
        if how == "start":
            prefetched = data_thread.submit(lambda: [task.microbatch(step + 1, 0, m) for m in range(microbatches)])
        if op.kind == "F":
            mb = task.microbatch(step, 0, op.microbatch)  # the runtime's own data: its routing, its loss
            ids, labels = mb.input_ids, mb.labels
            x = ids if op.stage == 0 else torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()

            def finish(out, labels=labels) -> torch.Tensor:  # the executor's loss of the head stage
                return training_loss(out, labels, mtp_weight).total / microbatches
            tapes[(op.stage, op.microbatch)] = _drive(stage_forward(modules[op.stage], x, ids, finish, p))
        else:
            grad = None if modules[op.stage].stage.has_head else torch.randn(shape, generator=gen, dtype=dtype)
            _drive(stage_backward(tapes.pop((op.stage, op.microbatch)), grad, p))
        walls[str(op)] = op.kind, time.perf_counter() - start, how
    if prefetched is not None:
        prefetched.result()
    mine = timeline.events()
    if timed is not None:
        for chain, (kind, wall, how) in walls.items():
            nodes = sum(e.end_s - e.start_s for e in mine if e.name.split(" ")[0] == chain)
            timed.outside[kind].append(max(0.0, wall - nodes))
            timed.walls.setdefault((kind, chain, how), []).append(wall)
        timed.events += mine


def _optimizer(step, main_grads: MainGrads, timed: _RankTimes | None) -> None:
    """The rank's optimizer step after its passes, its parts recorded into ``timed``; without one (a ZeRO group
    larger than one) the main gradients are zeroed for the next step."""
    if step is None:
        main_grads.zero_()
        return
    timeline = Timeline(rank=0, cuda=False)
    step(part_marker(timeline, "optimizer"))
    if timed is not None:
        for part, s in part_seconds(timeline.events()).items():
            timed.optimizer[part].append(s)


def _drive(steps: Generator) -> object:
    """Run one pass generator to its end (it yields only around all-to-alls, which a local MoE has none of)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
