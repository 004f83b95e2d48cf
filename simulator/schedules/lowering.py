"""Lower a schedule's implied communication into explicit point-to-point batches, and replay them.

A ``Schedule`` lists compute only; ``needs`` / ``produces`` (``executor.py``) imply the values that
cross stages. Two kinds of value cross a stage boundary, each named by a key ``(kind, stage, mb)``:

- ``("F", s, m)``, the activation out of stage ``s`` for micro-batch ``m``: made by ``F(s, m)`` on
  ``rank_of(s, m)``, consumed by ``F(s+1, m)`` on ``rank_of(s+1, m)``;
- ``("G", s, m)``, the gradient w.r.t. the input of stage ``s``: made by ``B``/``I(s, m)`` on
  ``rank_of(s, m)``, consumed by ``B``/``I(s-1, m)`` on ``rank_of(s-1, m)``.

Both have the shape of the hidden state at one boundary between stages ``b`` and ``b+1``
(``P2POp.boundary``): the output of stage ``b`` (``b = s`` for ``F``, ``s-1`` for ``G``), so receive
buffers can be shaped before the data arrives. Weight gradients (``W``), a stage's own saved
activation (``F(s, m)`` read by ``B(s, m)``), the last stage's output (the loss reads it) and the
first stage's input gradient never cross ranks and are not listed here.

**Sends (deepseek-ai/DualPipe's ``comm.py``).** On each rank, before action ``i`` runs, one batch is
posted and waited for (one ``batch_isend_irecv``); it holds the sends of action ``i-1``'s outputs
that go to another rank (an ``F&B`` pair sends both outputs). A final batch after the last action
posts the last sends. A value whose producer and consumer sit on one rank (DualPipeV's turn,
``pp=1``) is a *local hand-off*: no op; the producing step lists it in ``local_outputs`` (keep the
tensor, e.g. detach it and mark it as needing a gradient), the consuming step in ``local_inputs``.

**Receives** (``receives=``):

- ``"late"``: with the action that consumes the value (an ``F&B`` pair receives both ops' inputs).
  This is the policy read literally; it deadlocks under rendezvous for interleaved, dualpipe and
  dualpipev (two neighbours each wait to send before the action that would receive), and for
  dualpipe(v) a rank's sends to a neighbour leave in another order than the neighbour consumes them.
  DualPipe's own ``step()`` avoids both by posting some receives ahead (``_recv_forward(0)`` before
  running ``F1`` in its step 2), which ``"early"`` generalises.
- ``"early"`` (default): at the receiver's first action boundary at or after the moment the value is
  made in the reference replay (``execute(schedule, durations)``, non-blocking sends), and never
  after the consuming action. A received value may so wait a few steps in its buffer.

*Why "early" cannot deadlock or mismatch.* Give each batch ``(r, i)`` the potential
``(start_s of action i on r, i)`` from the replay (the final batch: the last action's end). A batch
completes once the previous batch of its rank and, for each op, the batch before its counterpart
have completed. A value made by action ``P`` on rank ``a`` and first received in batch ``j`` on ``b``
gives the edges ``(a, P) -> (b, j)``: ``start(P) < end(P) <= start(j)``, and ``(b, j-1) -> (a, P+1)``:
``start(j-1) < end(P) <= start(P+1)``, both strictly increasing the potential, as are a rank's own
edges; so the wait-for graph has no cycle. Per channel ``a -> b`` receives are posted in order of
``end(P)``, that is in ``a``'s production order, which is the order ``a`` sends. Every schedule that
``check_schedule`` accepts therefore lowers deadlock-free; ``check_rendezvous`` replays it anyway.

**Contract for an executor**, per ``RankProgram.steps[i]`` (``Step``). Every rank must call
``lower`` with the same arguments (the default ones), since both ends of a channel compute its order:

- ``batch.ops``: post exactly these ops, in this order, as one batch, and wait for all of them before
  running ``action``. A ``send`` of ``k`` to ``peer`` ships an output of the previous action (then its
  storage may be freed); a ``recv`` of ``k`` from ``peer`` fills a buffer shaped by ``P2POp.boundary``,
  kept under ``k`` until the step that lists ``k`` in ``remote_inputs`` (this one or a later one);
- ``remote_inputs``: inputs of ``action`` received from another rank (in this batch or earlier);
- ``local_inputs``: inputs of ``action`` made earlier on this rank (kept by a ``local_outputs``);
- ``local_outputs``: outputs of ``action`` to keep for a later step of this rank;
- ``deferred_sends``: outputs of ``action`` for other ranks; they are the sends of the next step's
  batch (or ``RankProgram.final``), so keep them until then.

**Canonical order.** NCCL and gloo match one pair's point-to-point operations in posting order, per
direction: the k-th send rank ``a`` posts to rank ``b`` meets the k-th receive ``b`` posts from ``a``
(a send from ``b`` to ``a`` is another channel). Inside a batch ops are sorted by (sends first, peer,
producing step, consuming step, key): both ends know each transfer's producing and consuming step,
so a batch holding several values of one channel lists them in the same order at both ends (and a
reader that posts ops one by one, as torch's runtime does, posts the sends before waiting on a receive).
``check_rendezvous`` checks the order with the deadlock freedom, sends blocking until received.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from moeplan.simulator.schedules.actions import Action, Op, ScheduleError
from moeplan.simulator.schedules.executor import Durations, execute, needs, produces
from moeplan.simulator.schedules.schedule import Schedule
from moeplan.simulator.schedules.torch_csv import torch_token, write_torch_csv

ValueKey = tuple[str, int, int]  # ("F" | "G", stage, microbatch), as in executor.needs / produces
P2PKind = Literal["send", "recv"]
ReceivePolicy = Literal["early", "late"]


def key_name(key: ValueKey) -> str:
    """``("F", 0, 3)`` -> ``"F(0,3)"``, for messages."""
    return f"{key[0]}({key[1]},{key[2]})"


@dataclass(frozen=True, slots=True)
class P2POp:
    """One point-to-point operation of a rank: ``send`` ``key`` to ``peer`` or ``recv`` it from ``peer``."""

    kind: P2PKind
    peer: int
    key: ValueKey

    @property
    def tensor(self) -> Literal["activation", "input_grad"]:
        """``activation`` (out of stage ``key[1]``) or ``input_grad`` (w.r.t. stage ``key[1]``'s input)."""
        return "activation" if self.key[0] == "F" else "input_grad"

    @property
    def boundary(self) -> tuple[int, int]:
        """The stage boundary ``(b, b+1)`` the tensor crosses; it has the shape of stage ``b``'s output."""
        lower = self.key[1] if self.key[0] == "F" else self.key[1] - 1
        return (lower, lower + 1)

    def __str__(self) -> str:
        return f"{self.kind} {key_name(self.key)} {'to' if self.kind == 'send' else 'from'} rank {self.peer}"

    def torch_token(self) -> str:
        """torch.distributed.pipelining's action string: the sender names its stage (``2SEND_F0``,
        ``2SEND_B0``), the receiver its own (``3RECV_F0``, ``1RECV_B0``)."""
        value, stage, microbatch = self.key
        if self.kind == "send":
            return f"{stage}SEND_{'F' if value == 'F' else 'B'}{microbatch}"
        return f"{stage + 1}RECV_F{microbatch}" if value == "F" else f"{stage - 1}RECV_B{microbatch}"


@dataclass(frozen=True, slots=True)
class Batch:
    """Operations posted together (one ``batch_isend_irecv``) and waited for together, in order."""

    ops: tuple[P2POp, ...] = ()

    @property
    def sends(self) -> tuple[P2POp, ...]:
        return tuple(op for op in self.ops if op.kind == "send")

    @property
    def recvs(self) -> tuple[P2POp, ...]:
        return tuple(op for op in self.ops if op.kind == "recv")


@dataclass(frozen=True, slots=True)
class Step:
    """One action of a rank with the communication around it (see the module docstring)."""

    batch: Batch
    action: Action
    remote_inputs: tuple[ValueKey, ...]
    local_inputs: tuple[ValueKey, ...]
    local_outputs: tuple[ValueKey, ...]
    deferred_sends: tuple[P2POp, ...]


@dataclass(frozen=True, slots=True)
class RankProgram:
    """What one pipeline rank runs: its steps in order, then ``final`` (the last outputs' sends)."""

    rank: int
    steps: tuple[Step, ...]
    final: Batch

    @property
    def batches(self) -> tuple[Batch, ...]:
        """Every batch in posting order: one per step, then ``final``."""
        return (*(step.batch for step in self.steps), self.final)


@dataclass(frozen=True, slots=True)
class LoweredSchedule:
    """A schedule with its communication made explicit: ``programs[rank]``."""

    schedule: Schedule
    programs: tuple[RankProgram, ...]

    def num_sends(self) -> int:
        """Point-to-point sends in one training step, over all ranks."""
        return sum(len(batch.sends) for program in self.programs for batch in program.batches)


# Where a crossing value is made and used: (rank, index of the action on that rank).
_Site = tuple[int, int]


def _crossing_inputs(op: Op, num_stages: int) -> tuple[ValueKey, ...]:
    """Inputs of ``op`` that another stage made (its own stage's saved values excluded)."""
    return tuple(key for key in needs(op, num_stages) if key[1] != op.stage)


def _sites(schedule: Schedule) -> tuple[dict[ValueKey, _Site], dict[ValueKey, _Site]]:
    """Producer and consumer site of every value that crosses a stage boundary."""
    producer: dict[ValueKey, _Site] = {}
    consumer: dict[ValueKey, _Site] = {}
    for rank, actions in enumerate(schedule.ranks):
        for index, action in enumerate(actions):
            for op in action.ops:
                for key in _crossing_inputs(op, schedule.num_stages):
                    if key in consumer:
                        first = schedule.ranks[consumer[key][0]][consumer[key][1]]
                        raise ScheduleError(f"{key_name(key)} is consumed twice: by {first} and by {action} on rank {rank}")
                    consumer[key] = (rank, index)
                for key in produces(op):
                    producer.setdefault(key, (rank, index))
    for key, (rank, index) in consumer.items():
        if key not in producer:
            raise ScheduleError(f"{schedule.ranks[rank][index]} on rank {rank} needs {key_name(key)}, which no action produces")
        made = producer[key]
        if made[0] == rank and made[1] >= index:
            raise ScheduleError(
                f"rank {rank} runs {schedule.ranks[rank][index]} (needs {key_name(key)}) at or before "
                f"{schedule.ranks[rank][made[1]]}, which makes it"
            )
    return {key: producer[key] for key in consumer}, consumer


def _receive_steps(schedule: Schedule, durations: Durations) -> Callable[[_Site, _Site], int]:
    """``receives="early"``: the receiving rank's first step starting at or after the moment the
    reference replay (``execute``) ends the producing action; raises if that replay deadlocks."""
    timeline = execute(schedule, durations)
    starts = [[timed.start_s for timed in row] for row in timeline.ranks]

    def step(made: _Site, used: _Site) -> int:
        ready_s = timeline.ranks[made[0]][made[1]].end_s
        return bisect_left(starts[used[0]], ready_s, hi=used[1])
    return step


_Ordered = tuple[tuple[int, int, int, int, ValueKey], P2POp]  # (canonical order, op)


@dataclass
class _Parts:
    """What ``lower`` puts in each step, keyed by site ``(rank, step)``; batches keyed by the step
    they precede (``len(actions)`` for the final one)."""

    batches: defaultdict[_Site, list[_Ordered]] = field(default_factory=lambda: defaultdict(list))
    sends: defaultdict[_Site, list[_Ordered]] = field(default_factory=lambda: defaultdict(list))
    remote_in: defaultdict[_Site, list[ValueKey]] = field(default_factory=lambda: defaultdict(list))
    local_in: defaultdict[_Site, list[ValueKey]] = field(default_factory=lambda: defaultdict(list))
    local_out: defaultdict[_Site, list[ValueKey]] = field(default_factory=lambda: defaultdict(list))

    def step(self, rank: int, index: int, action: Action) -> Step:
        site = (rank, index)
        return Step(
            batch=self.batch(rank, index),
            action=action,
            remote_inputs=tuple(sorted(self.remote_in[site])),
            local_inputs=tuple(sorted(self.local_in[site])),
            local_outputs=tuple(sorted(self.local_out[site])),
            deferred_sends=tuple(op for _, op in sorted(self.sends[site])),
        )

    def batch(self, rank: int, index: int) -> Batch:
        return Batch(tuple(op for _, op in sorted(self.batches[(rank, index)])))


def lower(schedule: Schedule, receives: ReceivePolicy = "early", durations: Durations | None = None) -> LoweredSchedule:
    """Each rank's program: sends with the next batch after the producing action, receives by
    ``receives`` (module docstring; ``durations`` only times the reference replay of "early", the
    same on every rank). Raises ``ScheduleError`` when a value is needed but never made, consumed
    twice, used before it is made on its own rank, or (for "early") the schedule deadlocks even
    with non-blocking sends. Deadlock under rendezvous is ``check_rendezvous``'s business."""
    producer, consumer = _sites(schedule)
    receive_step = (_receive_steps(schedule, durations or Durations()) if receives == "early"
                    else lambda made, used: used[1])
    parts = _Parts()
    for key, used in consumer.items():
        made = producer[key]
        if made[0] == used[0]:
            parts.local_out[made].append(key)
            parts.local_in[used].append(key)
            continue
        parts.remote_in[used].append(key)
        # Step 1: the canonical order (sends first, peer, producing step, consuming step, key): both
        # ends know each part, so one channel's values keep one order at both ends.
        order = (made[1], used[1], key)
        send = ((0, used[0], *order), P2POp("send", used[0], key))
        parts.sends[made].append(send)
        parts.batches[(made[0], made[1] + 1)].append(send)
        # Step 2: the receive, in the batch the policy picks (never after the consuming step).
        parts.batches[(used[0], receive_step(made, used))].append(((1, made[0], *order), P2POp("recv", made[0], key)))
    programs = tuple(
        RankProgram(
            rank=rank,
            steps=tuple(parts.step(rank, index, action) for index, action in enumerate(actions)),
            final=parts.batch(rank, len(actions)),
        )
        for rank, actions in enumerate(schedule.ranks)
    )
    return LoweredSchedule(schedule=schedule, programs=programs)


class _Replay:
    """Rendezvous replay state: per directed channel ``(sender, receiver)``, the keys sent and the
    keys awaited so far, in posting order; per rank, the batch it waits on."""

    def __init__(self, lowered: LoweredSchedule) -> None:
        self.batches = [program.batches for program in lowered.programs]
        self.position = [0] * len(self.batches)
        self.sent: dict[tuple[int, int], list[ValueKey]] = defaultdict(list)
        self.awaited: dict[tuple[int, int], list[ValueKey]] = defaultdict(list)
        # [rank] -> for each op of the posted batch: (op, channel, its index on the channel)
        self.slots: list[list[tuple[P2POp, tuple[int, int], int]]] = [[] for _ in self.batches]
        for rank in range(len(self.batches)):
            self.post(rank)

    def post(self, rank: int) -> None:
        """Post ``rank``'s current batch; a key that differs from the peer's at the same channel
        position is a mismatch."""
        self.slots[rank] = []
        for op in self.batches[rank][self.position[rank]].ops:
            channel = (rank, op.peer) if op.kind == "send" else (op.peer, rank)
            mine, theirs = (self.sent, self.awaited) if op.kind == "send" else (self.awaited, self.sent)
            index = len(mine[channel])
            mine[channel].append(op.key)
            if index < len(theirs[channel]) and theirs[channel][index] != op.key:
                sent, awaited = (op.key, theirs[channel][index]) if op.kind == "send" else (theirs[channel][index], op.key)
                raise ScheduleError(
                    f"rank {channel[0]}'s send #{index} to rank {channel[1]} carries {key_name(sent)} but rank "
                    f"{channel[1]}'s receive #{index} from rank {channel[0]} expects {key_name(awaited)}"
                )
            self.slots[rank].append((op, channel, index))

    def unmatched(self, rank: int) -> list[P2POp]:
        """Ops of ``rank``'s posted batch whose counterpart the peer has not posted yet."""
        return [
            op for op, channel, index in self.slots[rank]
            if index >= len((self.awaited if op.kind == "send" else self.sent)[channel])
        ]

    def advance(self, rank: int) -> bool:
        """Complete as many of ``rank``'s batches as are matched; whether any was."""
        moved = False
        while self.position[rank] < len(self.batches[rank]) and not self.unmatched(rank):
            self.position[rank] += 1
            moved = True
            if self.position[rank] < len(self.batches[rank]):
                self.post(rank)
        return moved


def check_rendezvous(lowered: LoweredSchedule) -> None:
    """Replay ``lowered`` with blocking point-to-point semantics and zero-time actions: a rank's
    batch completes once the peer has posted the counterpart of each of its ops (sends wait to be
    received, receives to be sent), matched per (sender, receiver) channel in posting order. Raises
    ``ScheduleError`` on a mismatch (two ends disagree on the k-th key of a channel) or a deadlock
    (naming each stuck rank, its batch and the ops nobody matches)."""
    replay = _Replay(lowered)
    while True:
        moved = [replay.advance(rank) for rank in range(len(replay.batches))]  # every rank, each sweep
        if not any(moved):
            break
    stuck = []
    for program in lowered.programs:
        position = replay.position[program.rank]
        if position == len(replay.batches[program.rank]):
            continue
        where = f"before {program.steps[position].action}" if position < len(program.steps) else "final"
        ops = ", ".join(str(op) for op in replay.unmatched(program.rank))
        stuck.append(f"rank {program.rank} at batch {position} ({where}) waits to {ops}")
    if stuck:
        raise ScheduleError(
            f"{lowered.schedule.kind} schedule deadlocks under rendezvous point-to-point: {'; '.join(stuck)}"
        )


def lowered_to_torch_csv(lowered: LoweredSchedule) -> str:
    """torch's ``compute_comms`` CSV: one row per rank, each step's batch ops (``P2POp.torch_token``)
    then its action (``torch_csv.torch_token``), then the final batch. torch's format has no batch
    boundary: its runtime posts the ops of a row in order. One stage placement only, as for
    ``schedule_to_torch_csv`` (DualPipe's two copies of a stage would share one stage index)."""
    return write_torch_csv(lowered.schedule, (
        [*(cell for step in program.steps
           for cell in (*(op.torch_token() for op in step.batch.ops), torch_token(step.action))),
         *(op.torch_token() for op in program.final.ops)]
        for program in lowered.programs
    ))
