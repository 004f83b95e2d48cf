"""Lowering a schedule's implied communication to P2P batches, and the rendezvous replay.

Oracles: the producer and consumer of each value are recomputed here from ``rank_of`` (not from the
lowering), the send count from ``stage_ranks`` alone, and random schedules (random stage placement,
random valid orders, random F&B pairs) check the claim that "early" receives never deadlock.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.schedules import (
    SCHEDULE_KINDS,
    Action,
    Batch,
    Durations,
    LoweredSchedule,
    Op,
    P2POp,
    Schedule,
    ScheduleError,
    check_rendezvous,
    check_schedule,
    execute,
    lower,
    lowered_to_torch_csv,
    make_schedule,
    schedule_kind,
)

PPS = (1, 2, 3, 4, 8, 16, 32)


def _sizes(kinds: tuple[str, ...], pps: tuple[int, ...], factors: tuple[tuple[int, int], ...]) -> list[tuple]:
    """(kind, pp, M) for every kind and pp the registry admits, M = a*pp + b rounded up to a valid count."""
    sizes = set()
    for kind in kinds:
        entry = schedule_kind(kind)
        for pp in pps:
            if entry.pp_error(pp) is None:
                sizes.update((kind, pp, entry.smallest_valid(pp, a * pp + b)) for a, b in factors)
    return sorted(sizes)


def _crossing_values(schedule: Schedule) -> dict[tuple[str, int, int], tuple[int, int, int, int]]:
    """key -> (producer rank, producer index, consumer rank, consumer index), from rank_of and the op rules
    written out here: F(s-1, m) feeds F(s, m); the backward of (s+1, m) feeds the backward of (s, m)."""
    where: dict[tuple[str, int, int], int] = {}
    for rank, actions in enumerate(schedule.ranks):
        for index, action in enumerate(actions):
            for op in action.ops:
                where[(op.kind, op.stage, op.microbatch)] = index
    values = {}
    last = schedule.num_stages - 1
    for m in range(schedule.num_microbatches):
        for s in range(schedule.num_stages):
            backward = "B" if ("B", s, m) in where else "I"
            if s < last:
                values[("F", s, m)] = (schedule.rank_of(s, m), where[("F", s, m)],
                                       schedule.rank_of(s + 1, m), where[("F", s + 1, m)])
            if s > 0:
                below = "B" if ("B", s - 1, m) in where else "I"
                values[("G", s, m)] = (schedule.rank_of(s, m), where[(backward, s, m)],
                                       schedule.rank_of(s - 1, m), where[(below, s - 1, m)])
    return values


def _check_lowering(schedule: Schedule, lowered: LoweredSchedule) -> None:
    """Every remote input received once, before its action, from its producer; every send received;
    local hand-offs exactly the same-rank pairs; each channel's sends and receives in one order."""
    values = _crossing_values(schedule)
    recvs: dict[tuple[int, tuple], list[tuple[int, int]]] = defaultdict(list)  # (rank, key) -> [(batch, peer)]
    channels: dict[tuple[str, int, int], list] = defaultdict(list)  # (kind, sender, receiver) -> keys in order
    sends = Counter()
    for program in lowered.programs:
        assert [step.action for step in program.steps] == list(schedule.ranks[program.rank])
        for index, batch in enumerate(program.batches):
            for op in batch.ops:
                if op.kind == "recv":
                    recvs[(program.rank, op.key)].append((index, op.peer))
                    channels[("recv", op.peer, program.rank)].append(op.key)
                else:
                    made = values[op.key]
                    assert (program.rank, index, op.peer) == (made[0], made[1] + 1, made[2]), f"{op} batch {index}"
                    sends[op.key] += 1
                    channels[("send", program.rank, op.peer)].append(op.key)
                low, high = op.boundary
                assert op.key[1] == (low if op.key[0] == "F" else high), f"{op} {op.boundary}"
    local = {key for key, (src, _, dst, _) in values.items() if src == dst}
    remote = set(values) - local
    assert set(sends) == remote and set(sends.values()) <= {1}
    assert {key for _, key in recvs} == remote
    for key in remote:
        src, _, dst, used = values[key]
        ((batch, peer),) = recvs[(dst, key)]
        assert peer == src and batch <= used, f"{key_text(key)} received in batch {batch} from {peer}"
        assert key in lowered.programs[dst].steps[used].remote_inputs
    listed_in = {key for p in lowered.programs for step in p.steps for key in step.local_inputs}
    listed_out = {key for p in lowered.programs for step in p.steps for key in step.local_outputs}
    assert listed_in == listed_out == local
    for key in local:
        src, made, _, used = values[key]
        assert key in lowered.programs[src].steps[made].local_outputs
        assert key in lowered.programs[src].steps[used].local_inputs
    for (kind, sender, receiver), keys in channels.items():
        if kind == "send":
            assert keys == channels[("recv", sender, receiver)], f"channel {sender}->{receiver}"


def key_text(key: tuple) -> str:
    return f"{key[0]}({key[1]},{key[2]})"


def _closed_send_count(kind: str, pp: int, m: int) -> int:
    """2 x (stage boundaries whose two stages sit on different ranks) x micro-batches, per direction,
    from the registry's stage placement alone."""
    placements = schedule_kind(kind).stage_ranks(pp, 2)
    half = m // len(placements)
    return sum(
        2 * half * sum(placement[s] != placement[s + 1] for s in range(len(placement) - 1))
        for placement in placements
    )


@pytest.mark.parametrize(("kind", "pp", "m"), _sizes(SCHEDULE_KINDS, PPS, ((0, 1), (1, 1), (2, 0))))
def test_every_kind_lowers_without_deadlock(kind: str, pp: int, m: int) -> None:
    schedule = make_schedule(kind, pp, m)
    lowered = lower(schedule)
    check_rendezvous(lowered)
    _check_lowering(schedule, lowered)
    assert lowered.num_sends() == _closed_send_count(kind, pp, m)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "pp", "m"), _sizes(SCHEDULE_KINDS, PPS, ((1, 3), (3, 1), (4, 0), (8, 0))))
def test_every_kind_lowers_without_deadlock_more_sizes(kind: str, pp: int, m: int) -> None:
    test_every_kind_lowers_without_deadlock(kind, pp, m)


def test_closed_counts_by_hand() -> None:
    """The closed count itself, spelled out: 1F1B crosses pp-1 boundaries, DualPipeV 2pp-2 of its
    2pp-1 (the turn is local), DualPipe pp-1 in each direction with half the micro-batches."""
    assert _closed_send_count("1f1b", 4, 8) == 2 * 3 * 8
    assert _closed_send_count("dualpipev", 4, 8) == 2 * 6 * 8
    assert _closed_send_count("dualpipe", 4, 8) == 2 * 3 * 4 + 2 * 3 * 4
    assert _closed_send_count("interleaved", 1, 3) == 0


def _program_text(lowered: LoweredSchedule, rank: int) -> list[str]:
    program = lowered.programs[rank]
    lines = [f"[{', '.join(map(str, step.batch.ops))}] {step.action}" for step in program.steps]
    return [*lines, f"[{', '.join(map(str, program.final.ops))}] end"]


def test_one_f_one_b_two_ranks_exact_program() -> None:
    """rank 1 receives F(0,1) ahead, with its B(1,0) (Megatron's send_forward_recv_backward shape)."""
    lowered = lower(make_schedule("1f1b", 2, 2))
    assert _program_text(lowered, 0) == [
        "[] 0F0",
        "[send F(0,0) to rank 1] 0F1",
        "[send F(0,1) to rank 1, recv G(1,0) from rank 1] 0B0",
        "[recv G(1,1) from rank 1] 0B1",
        "[] end",
    ]
    assert _program_text(lowered, 1) == [
        "[recv F(0,0) from rank 0] 1F0",
        "[recv F(0,1) from rank 0] 1B0",
        "[send G(1,0) to rank 0] 1F1",
        "[] 1B1",
        "[send G(1,1) to rank 0] end",
    ]
    step = lowered.programs[1].steps[2]
    assert step.remote_inputs == (("F", 0, 1),) and step.deferred_sends == ()
    assert lowered.programs[1].steps[1].deferred_sends == (P2POp("send", 0, ("G", 1, 0)),)


def test_dualpipev_turn_is_a_local_hand_off() -> None:
    """Stages 1 and 2 both sit on rank 1 of a 2-rank V: the activation and the gradient turn there."""
    lowered = lower(make_schedule("dualpipev", 2, 4))
    outputs = {key: str(step.action) for step in lowered.programs[1].steps for key in step.local_outputs}
    inputs = {key: str(step.action) for step in lowered.programs[1].steps for key in step.local_inputs}
    assert outputs[("F", 1, 0)] == "1F0" and inputs[("F", 1, 0)] == "2F0"
    assert outputs[("G", 2, 0)] == "2B0" and inputs[("G", 2, 0)].endswith("1B0")
    assert set(outputs) == set(inputs) == {(kind, stage, m) for kind, stage in (("F", 1), ("G", 2)) for m in range(4)}
    assert not any(op.key[1] in (1, 2) and op.boundary == (1, 2) for p in lowered.programs for b in p.batches for op in b.ops)


def test_single_rank_has_no_ops() -> None:
    for kind in ("1f1b", "interleaved", "dualpipev"):
        lowered = lower(make_schedule(kind, 1, 3))
        assert all(not batch.ops for batch in lowered.programs[0].batches)
        check_rendezvous(lowered)


def test_tensor_and_boundary() -> None:
    assert P2POp("send", 1, ("F", 2, 0)).tensor == "activation"
    assert P2POp("send", 1, ("F", 2, 0)).boundary == (2, 3)
    assert P2POp("recv", 1, ("G", 2, 0)).tensor == "input_grad"
    assert P2POp("recv", 1, ("G", 2, 0)).boundary == (1, 2)


def _schedule(kind: str, stage_ranks, direction_microbatches, rows: list[list[str]]) -> Schedule:
    return Schedule.model_validate({
        "kind": kind, "num_ranks": len(rows), "num_stages": len(stage_ranks[0]),
        "num_microbatches": sum(direction_microbatches), "stage_ranks": stage_ranks,
        "direction_microbatches": direction_microbatches, "ranks": rows,
    })


def _crossing_schedule() -> Schedule:
    """Two ranks, two directions: each runs two forwards of its own direction, then the other
    direction's. Fine with non-blocking sends; with rendezvous, each rank's second batch sends its
    first forward while the peer receives it only after its own second batch."""
    row0 = ["0F0", "0F1", "1F2", "1F3", "1B2", "1B3", "0B0", "0B1"]
    row1 = ["0F2", "0F3", "1F0", "1F1", "1B0", "1B1", "0B2", "0B3"]
    return _schedule("dualpipe", [[0, 1], [1, 0]], [2, 2], [row0, row1])


def test_crossing_order_deadlocks_when_receives_wait_for_their_action() -> None:
    schedule = _crossing_schedule()
    check_schedule(schedule)  # the non-blocking replay accepts it
    with pytest.raises(ScheduleError) as error:
        check_rendezvous(lower(schedule, receives="late"))
    message = str(error.value)
    assert "deadlocks under rendezvous" in message
    assert "rank 0 at batch 1 (before 0F1) waits to send F(0,0) to rank 1" in message
    assert "rank 1 at batch 1 (before 0F3) waits to send F(0,2) to rank 0" in message
    check_rendezvous(lower(schedule))  # early receives: rank 1 takes F(0,0) in its batch 1


def test_late_receives_fail_for_three_generated_kinds() -> None:
    """The literal policy: fine for 1F1B and ZB1P; deadlock or channel-order mismatch otherwise."""
    for kind in ("1f1b", "zb1p"):
        for pp in (2, 3, 8):
            check_rendezvous(lower(make_schedule(kind, pp, 2 * pp + 1), receives="late"))
    with pytest.raises(ScheduleError, match="rank 0 at batch 6 .* rank 1 at batch 6"):
        check_rendezvous(lower(make_schedule("interleaved", 2, 4), receives="late"))
    with pytest.raises(ScheduleError, match="deadlocks"):
        check_rendezvous(lower(make_schedule("dualpipe", 2, 4), receives="late"))
    with pytest.raises(ScheduleError, match=r"rank 0's send #4 to rank 1 carries F\(0,4\) but rank 1's receive #4 "
                                            r"from rank 0 expects G\(5,0\)"):
        check_rendezvous(lower(make_schedule("dualpipev", 3, 6), receives="late"))


def test_consumption_out_of_production_order() -> None:
    """Rank 1 uses F(0,1) before F(0,0): received late, the channel's order is wrong; received early,
    it follows rank 0's production order and buffers F(0,0)."""
    schedule = _schedule("1f1b", [[0, 1]], [2], [["0F0", "0F1", "0B0", "0B1"], ["1F1", "1B1", "1F0", "1B0"]])
    with pytest.raises(ScheduleError, match=r"rank 0's send #0 to rank 1 carries F\(0,0\) but rank 1's receive #0 "
                                            r"from rank 0 expects F\(0,1\)"):
        check_rendezvous(lower(schedule, receives="late"))
    lowered = lower(schedule)
    check_rendezvous(lowered)
    _check_lowering(schedule, lowered)


def test_swapped_batch_order_is_a_mismatch() -> None:
    """Two sends of one channel in one batch, posted in the reverse of the canonical order."""
    lowered = lower(make_schedule("dualpipev", 2, 4))
    for program in lowered.programs:
        for index, step in enumerate(program.steps):
            sends = [op for op in step.batch.ops if op.kind == "send"]
            if len(sends) == 2 and sends[0].peer == sends[1].peer:
                ops = (sends[1], sends[0], *step.batch.ops[2:])
                assert step.batch.ops[:2] == tuple(sends)  # sends come first
                swapped = dataclasses.replace(step, batch=Batch(ops))
                steps = (*program.steps[:index], swapped, *program.steps[index + 1:])
                programs = list(lowered.programs)
                programs[program.rank] = dataclasses.replace(program, steps=steps)
                with pytest.raises(ScheduleError, match=f"rank {program.rank}'s send #"):
                    check_rendezvous(dataclasses.replace(lowered, programs=tuple(programs)))
                return
    pytest.fail("no batch with two sends to one peer")


def test_missing_producer_is_refused() -> None:
    schedule = _schedule("1f1b", [[0, 1]], [1], [["0B0"], ["1F0", "1B0"]])
    with pytest.raises(ScheduleError, match=r"1F0 on rank 1 needs F\(0,0\), which no action produces"):
        lower(schedule)


@st.composite
def random_schedules(draw: st.DrawFn) -> Schedule:
    """Any placement of stages on ranks, any order the dependencies allow (a random linear extension
    of them, split per rank), backward split into I and W at random, and adjacent F-then-B on one rank
    merged into F&B at random (when nothing ran between them, so the pair's inputs were ready)."""
    num_ranks = draw(st.integers(1, 4))
    stages = draw(st.integers(1, 5))
    placement = draw(st.lists(st.integers(0, num_ranks - 1), min_size=stages, max_size=stages))
    m = draw(st.integers(1, 4))
    split = {(s, mb): draw(st.booleans()) for s in range(stages) for mb in range(m)}
    done: set[tuple[str, int, int]] = set()
    todo = {("F", s, mb) for s in range(stages) for mb in range(m)}
    order: list[Op] = []
    while todo:
        ready = sorted(k for k in todo if _ready(k, done, stages))
        kind, s, mb = draw(st.sampled_from(ready))
        todo.discard((kind, s, mb))
        done.add((kind, s, mb))
        order.append(Op(kind=kind, stage=s, microbatch=mb))
        follow = {"F": ["I" if split[(s, mb)] else "B"], "I": ["W"]}.get(kind, [])
        todo.update((k, s, mb) for k in follow)
    rows: list[list[Action]] = [[] for _ in range(num_ranks)]
    previous = None
    for op in order:
        rank = placement[op.stage]
        last = rows[rank][-1] if rows[rank] else None
        pairable = (previous is last is not None and last.kind == "F" and op.kind == "B"
                    and (last.ops[0].stage, last.ops[0].microbatch) != (op.stage, op.microbatch))
        if pairable and draw(st.booleans()):
            rows[rank][-1] = Action.overlap(last.ops[0], op)
        else:
            rows[rank].append(Action(ops=(op,)))
        previous = rows[rank][-1]
    return _schedule("1f1b", [placement], [m], [[str(a) for a in row] for row in rows])


def _ready(key: tuple[str, int, int], done: set, stages: int) -> bool:
    kind, s, mb = key
    if kind == "F":
        return s == 0 or ("F", s - 1, mb) in done
    if kind == "W":
        return ("I", s, mb) in done
    return s == stages - 1 or ("B", s + 1, mb) in done or ("I", s + 1, mb) in done


@settings(max_examples=150, deadline=None)
@given(schedule=random_schedules(), f_s=st.floats(0.1, 4), b_s=st.floats(0.2, 8), w_frac=st.floats(0, 0.9))
def test_early_receives_never_deadlock(schedule: Schedule, f_s: float, b_s: float, w_frac: float) -> None:
    """The module's claim: whatever the placement, order and reference durations, early receives
    lower every schedule the non-blocking replay accepts into a deadlock-free, order-consistent program."""
    durations = Durations(f_s=f_s, b_s=b_s, w_s=w_frac * b_s)
    execute(schedule, durations)
    lowered = lower(schedule, durations=durations)
    check_rendezvous(lowered)
    _check_lowering(schedule, lowered)
    crossings = sum(schedule.stage_ranks[0][s] != schedule.stage_ranks[0][s + 1] for s in range(schedule.num_stages - 1))
    assert lowered.num_sends() == 2 * crossings * schedule.num_microbatches


TORCH_SIZES = [(kind, pp, m) for kind in ("1f1b", "interleaved", "zb1p", "dualpipev") for pp in (2, 3, 4)
               for m in sorted({schedule_kind(kind).smallest_valid(pp, pp + 1), schedule_kind(kind).smallest_valid(pp, 2 * pp)})]


@pytest.mark.parametrize(("kind", "pp", "m"), TORCH_SIZES)
def test_torch_compute_comms_csv(kind: str, pp: int, m: int) -> None:
    """torch 2.13 reads our compute_comms CSV: ``_validate_schedule`` accepts it (stage placement,
    F before B, counts), and, for kinds without F&B (torch's simulator refuses OVERLAP_F_B), its own
    dry run ``_simulate_comms_compute`` finds every receive after its send and no hang."""
    pipelining = pytest.importorskip("torch.distributed.pipelining.schedules")
    schedule = make_schedule(kind, pp, m)
    text = lowered_to_torch_csv(lower(schedule))
    actions = {rank: [pipelining._Action.from_str(cell) for cell in row]
               for rank, row in enumerate(csv.reader(io.StringIO(text)))}
    sends = sum(str(a).count("SEND_") for row in actions.values() for a in row)
    assert sends == _closed_send_count(kind, pp, m)
    mapping = pipelining._validate_schedule(actions, pp, schedule.num_stages, m)
    assert mapping == dict(enumerate(schedule.stage_ranks[0]))
    if kind != "dualpipev":
        pipelining._simulate_comms_compute(actions, lambda s: schedule.stage_ranks[0][s], schedule.num_stages)
        broken = {rank: [a for a in row if "SEND_F" not in str(a) or rank != 0] for rank, row in actions.items()}
        with pytest.raises(ValueError, match="not progressing"):
            pipelining._simulate_comms_compute(broken, lambda s: schedule.stage_ranks[0][s], schedule.num_stages)


def test_torch_csv_refuses_two_directions() -> None:
    with pytest.raises(ScheduleError, match="kind=dualpipe has 2 stage placements"):
        lowered_to_torch_csv(lower(make_schedule("dualpipe", 2, 4)))


def test_torch_tokens() -> None:
    assert [P2POp(kind, 0, key).torch_token() for kind, key in (
        ("send", ("F", 2, 5)), ("recv", ("F", 2, 5)), ("send", ("G", 2, 5)), ("recv", ("G", 2, 5)))
    ] == ["2SEND_F5", "3RECV_F5", "2SEND_B5", "1RECV_B5"]
