"""The pipeline executor: one rank walks its action list of the plan's schedule, unchanged.

What each action does on this rank (stage ``s``, micro-batch ``m``; ``module = modules[s]``):
- ``F``: input = the token ids (first stage) or the activation ``("F", s-1, m)`` received or kept
  locally, made a leaf that requires grad; run the stage. The head stage turns its output into the
  micro-batch's loss (``loss_fn``), scaled by ``1 / num_microbatches`` so that the step's gradients
  are those of the mean loss; any other stage's output is the value ``("F", s, m)``.
- ``B``: backward from the loss (head stage) or from the received output gradient ``("G", s+1, m)``;
  the input's gradient is the value ``("G", s, m)`` (none on the first stage: its input is ids).
- ``I``: the same with a ``WeightGradStore`` attached at ``F`` time, so the weight-gradient matmuls
  are queued; ``W`` runs that queue.
- ``F&B``: the pair. With ``overlap`` on (default on CUDA), its two passes are issued interleaved at
  node granularity, communication on its own stream (``overlap.interleave``); off, forward then backward.

With ``substeps`` on (the default) F, B and I run node by node (``overlap.stage_forward`` /
``stage_backward``: bit-identical to one whole-graph pass) and every node is timed under the simulator's
sub-step names (``"{stage}{kind}{mb} L{i} attn|dispatch|shared|experts|combine|mlp"``, ``-bwd`` in
backward, ``embed``, ``head``), which replace the action's own interval; off, each runs as one call.

Communication comes from ``simulator.schedules.lowering``: before each action this rank posts one
batch of point-to-point operations (pending sends and this action's receives) and waits for it;
values whose two ends are on this rank are handed over in memory. ``Timeline`` records every action
and every batch under the simulator's trace names (``"{stage}{kind}{mb}"``, ``"p2p ..."``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from moeplan.model.runtime.overlap import NODE_RANGE, Pass, drain, interleave, stage_backward, stage_forward
from moeplan.model.runtime.overlap_comm import DistComm, Streams
from moeplan.model.weight_grad import WeightGradStore, attach_weight_grad_store, flush_expert_wgrads
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.schedules.actions import Action, Op
from moeplan.simulator.schedules.lowering import Batch, RankProgram, ValueKey

LossFn = Callable[[object, "Microbatch"], torch.Tensor]  # (head stage output, micro-batch) -> scalar loss


@dataclasses.dataclass(frozen=True)
class Microbatch:
    """One micro-batch's token ids and next-token labels, each (B, T)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


@dataclasses.dataclass
class Timeline:
    """Intervals this rank spent on actions and point-to-point batches, in seconds from ``origin_s``.

    On GPU the times come from CUDA events, resolved at ``events()`` (one synchronize per step);
    on CPU from ``time.perf_counter``.
    """

    rank: int
    cuda: bool
    origin_s: float = 0.0
    _open: list = dataclasses.field(default_factory=list)

    def start(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, lane: str, name: str, started: object) -> None:
        self._open.append((lane, name, started, self.start()))

    def add(self, lane: str, name: str, started: object, ended: object) -> None:
        """An interval whose end was marked elsewhere (a CUDA event on another stream, a completion time)."""
        self._open.append((lane, name, started, ended))

    def events(self, clear: bool = True) -> list[TraceEvent]:
        """The recorded intervals as trace events (resolving CUDA events), and forget them (``clear``)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        first = self._open[0][2] if self._open else None
        for lane, name, begin, end in self._open:
            if self.cuda:
                start_s = self.origin_s + first.elapsed_time(begin) / 1e3
                end_s = self.origin_s + first.elapsed_time(end) / 1e3
            else:
                start_s, end_s = begin - self.origin_s, end - self.origin_s
            out.append(TraceEvent(self.rank, lane, name, start_s, end_s))
        if clear:
            self._open.clear()
        return out


@dataclasses.dataclass
class StepResult:
    """What one step gave on this rank: per micro-batch losses (head stage only, unscaled), the bytes it
    sent point to point, and its timeline (which the caller keeps filling, e.g. with the optimizer step,
    and drains once per step: ``events`` only reads it)."""

    losses: dict[int, float]
    timeline: Timeline
    sent_bytes: int

    @property
    def events(self) -> list[TraceEvent]:
        return self.timeline.events(clear=False)


class PipelineExecutor:
    """Runs ``program`` (this pipeline rank's lowered action list) over the stage ``modules`` it holds.

    - ``modules``: stage index -> module (``model.transformer.Transformer`` of that stage);
    - ``pp_ranks``: global rank of each pipeline rank of this rank's pipeline (``ProcessGroups.pp_groups``);
    - ``hidden_shape``/``dtype``: what crosses a stage boundary, (micro_batch_size, seq/cp, hidden);
    - ``loss_fn(head_output, microbatch)``: the unscaled training loss of one micro-batch.
    """

    def __init__(self, program: RankProgram, num_stages: int, num_microbatches: int, modules: dict[int, nn.Module],
                 pp_ranks: Sequence[int], hidden_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 loss_fn: LossFn, group: dist.ProcessGroup | None = None) -> None:
        held = {op.stage for step in program.steps for op in step.action.ops}
        assert held <= set(modules), f"the program runs stages {sorted(held)}, modules hold {sorted(modules)}"
        self.program, self.num_stages, self.num_microbatches = program, num_stages, num_microbatches
        self.modules, self.pp_ranks, self.group = modules, tuple(pp_ranks), group
        self.hidden_shape, self.dtype, self.device, self.loss_fn = tuple(hidden_shape), dtype, device, loss_fn
        # (stage, mb) whose backward is split into I and W: their F must queue weight gradients
        self.split = {(op.stage, op.microbatch) for step in program.steps for op in step.action.ops if op.kind == "I"}
        # ---- sub-steps and the overlapped F&B (model/runtime/overlap.py); callers may change these
        self.substeps = True  # F, B, I node by node, each node timed under the simulator's names
        self.overlap = device.type == "cuda"  # F&B interleaved (needs substeps)
        self.comm = DistComm()  # the expert-parallel all-to-all facade (LoopbackComm, RecordingComm)
        self.comm_lane = "nvlink"  # lane of the EP all-to-alls: "nic" when the EP group spans nodes
        self.streams: Streams | None = None

    # ---- one step -------------------------------------------------------------------------------

    def step(self, microbatches: dict[int, Microbatch], timeline: Timeline) -> StepResult:
        """Run every action of the program once: one training step's forward and backward on this rank."""
        state = _StepState(timeline=timeline)
        if self.substeps and self.streams is None:
            self.streams = Streams(self.device)
        sent = 0
        for step in self.program.steps:
            sent += self._post(step.batch, state, timeline)
            started = timeline.start()
            with torch.profiler.record_function(NODE_RANGE + _action_name(step.action)):
                self._run(step.action, microbatches, state)
            if not self.substeps or step.action.kind == "W":  # else its nodes are timed instead
                timeline.stop("compute", _action_name(step.action), started)
            for p2p in step.deferred_sends:  # bound for another rank: kept until the next batch posts it
                state.outbox[p2p.key] = state.values.pop(p2p.key)
        sent += self._post(self.program.final, state, timeline)
        for module in {id(m): m for m in self.modules.values()}.values():  # batched expert Wgrads left over
            flush_expert_wgrads(module)
        assert not state.values and not state.outbox and not state.stores, (
            f"rank {self.program.rank}: values {sorted(state.values)}, unsent {sorted(state.outbox)} "
            f"and unflushed weight grads {sorted(state.stores)} left after the step")
        losses = {m: float(loss) for m, loss in state.losses.items()}  # read after the step: no sync inside
        return StepResult(losses=losses, timeline=timeline, sent_bytes=sent)

    def _run(self, action: Action, microbatches: dict[int, Microbatch], state: _StepState) -> None:
        passes = [{"F": self._forward, "B": self._backward, "I": self._backward, "W": self._weights}[op.kind](
            op, microbatches[op.microbatch], state) for op in action.ops]
        if len(passes) == 2 and self.overlap and self.substeps:
            interleave(passes[1], passes[0])  # backward first: its combine-bwd opens the pair (overlap.py)
        else:
            for one in passes:  # F&B without overlap: forward then backward
                drain(one)

    def _pass(self, op: Op, state: _StepState) -> Pass:
        return Pass(self.comm, self.streams, state.timeline, str(op), self.comm_lane)

    def _forward(self, op: Op, mb: Microbatch, state: _StepState):
        """A generator (``overlap.Steps``): it yields after each all-to-all it launches."""
        module, key = self.modules[op.stage], (op.stage, op.microbatch)
        if op.stage == 0:
            inputs = mb.input_ids.to(self.device)
        else:
            inputs = state.values.pop(("F", op.stage - 1, op.microbatch)).detach().requires_grad_()
        store = WeightGradStore() if key in self.split else None
        if store is not None:
            attach_weight_grad_store(module, store)
            state.stores[key] = store
        head = op.stage == self.num_stages - 1

        def finish(out) -> torch.Tensor:  # the head stage's output -> its loss, scaled for the step's mean
            loss = self.loss_fn(out, mb)
            state.losses[op.microbatch] = loss.detach()
            return loss / self.num_microbatches

        ids = mb.input_ids.to(self.device)
        try:
            if self.substeps:
                tape = yield from stage_forward(module, inputs, ids, finish, self._pass(op, state))
                out = tape.output.value
            else:
                out = module(inputs, input_ids=ids)
                out = finish(out) if head else out
        finally:
            if store is not None:
                attach_weight_grad_store(module, None)
        if not head:
            state.values[("F", op.stage, op.microbatch)] = out.detach()
        state.saved[key] = (inputs, tape if self.substeps else out)

    def _backward(self, op: Op, mb: Microbatch, state: _StepState):
        inputs, out = state.saved.pop((op.stage, op.microbatch))
        grad = None if op.stage == self.num_stages - 1 else state.values.pop(("G", op.stage + 1, op.microbatch))
        if self.substeps:
            input_grad = yield from stage_backward(out, grad, self._pass(op, state))
        else:
            torch.autograd.backward(out, grad)
            input_grad = inputs.grad
        if op.stage > 0:
            state.values[("G", op.stage, op.microbatch)] = input_grad

    def _weights(self, op: Op, mb: Microbatch, state: _StepState):
        state.stores.pop((op.stage, op.microbatch)).flush()
        yield from ()

    # ---- communication ----------------------------------------------------------------------------

    def _post(self, batch: Batch, state: _StepState, timeline: Timeline) -> int:
        """Post ``batch`` (pending sends of the previous action, receives of the next) and wait for it."""
        if not batch.ops:
            return 0
        started = timeline.start()
        ops, sent = [], 0
        for p2p in batch.ops:
            peer = self.pp_ranks[p2p.peer]
            if p2p.kind == "send":
                tensor = state.outbox.pop(p2p.key).contiguous()
                sent += tensor.numel() * tensor.element_size()
                ops.append(dist.P2POp(dist.isend, tensor, peer, self.group))
            else:
                buffer = torch.empty(self.hidden_shape, dtype=self.dtype, device=self.device)
                state.values[p2p.key] = buffer
                ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group))
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        timeline.stop("nvlink", "p2p " + " ".join(f"{o.kind}:{o.key[0]}{o.key[1]}/{o.key[2]}" for o in batch.ops),
                      started)
        return sent


@dataclasses.dataclass
class _StepState:
    values: dict[ValueKey, torch.Tensor] = dataclasses.field(default_factory=dict)
    outbox: dict[ValueKey, torch.Tensor] = dataclasses.field(default_factory=dict)
    saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    stores: dict[tuple[int, int], WeightGradStore] = dataclasses.field(default_factory=dict)
    losses: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    timeline: Timeline | None = None


def _action_name(action: Action) -> str:
    return "&".join(str(op) for op in action.ops)
