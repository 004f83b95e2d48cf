"""Interoperability with torch 2.13's ``torch.distributed.pipelining`` schedules and CSV format.

torch's schedule classes are built with stand-in stage objects (no process group is needed to
compute their ``pipeline_order``), and their orders compared with ours action by action, idle
steps (``None``) and ``REDUCE_GRAD`` dropped.
"""

from __future__ import annotations

import csv
import io
import types

import pytest

pipelining = pytest.importorskip("torch.distributed.pipelining.schedules")

from moeplan.simulator.schedules import ScheduleError, make_schedule, schedule_from_torch_csv, schedule_to_torch_csv  # noqa: E402


def _stages(pp: int, num_stages: int, local: list[int]) -> list[types.SimpleNamespace]:
    return [
        types.SimpleNamespace(num_stages=num_stages, group_size=pp, group_rank=0, stage_index=s, submod=None)
        for s in local
    ]


def _torch_order(kind: str, pp: int, m: int, v: int = 2) -> list[list[str]]:
    """torch's per-rank compute order for our ``kind``, as action strings."""
    if kind == "1f1b":
        schedule = pipelining.Schedule1F1B(_stages(pp, pp, [0])[0], m)
    elif kind == "interleaved":
        schedule = pipelining.ScheduleInterleaved1F1B(_stages(pp, v * pp, [c * pp for c in range(v)]), m)
    elif kind == "zb1p":
        schedule = pipelining.ScheduleInterleavedZeroBubble(_stages(pp, pp, [0]), m)
    else:
        schedule = pipelining.ScheduleDualPipeV(_stages(pp, 2 * pp, [0, 2 * pp - 1]), m)
    return [
        [str(a) for a in schedule.pipeline_order[rank] if a is not None and "REDUCE_GRAD" not in str(a)]
        for rank in range(pp)
    ]


def _our_order(kind: str, pp: int, m: int, v: int = 2) -> list[list[str]]:
    return list(csv.reader(io.StringIO(schedule_to_torch_csv(make_schedule(kind, pp, m, virtual_stages=v)))))


SIZES = (
    [("1f1b", pp, m, 1) for pp in (1, 2, 3, 5) for m in (pp, pp + 1, 2 * pp + 3)]
    + [("interleaved", pp, m, v) for pp in (2, 3, 4) for m in (pp, 2 * pp, 3 * pp, pp + 1) for v in (2, 3)]
    + [("zb1p", pp, m, 1) for pp in (1, 2, 3, 4, 6) for m in (pp, pp + 1, 2 * pp, 3 * pp)]
    + [("dualpipev", pp, m, 2) for pp in (1, 2, 3, 4, 5) for m in (2 * pp, 2 * pp + 1, 3 * pp + 2)]
)


@pytest.mark.parametrize(("kind", "pp", "m", "v"), SIZES)
def test_orders_match_torch(kind: str, pp: int, m: int, v: int) -> None:
    ours, theirs = _our_order(kind, pp, m, v), _torch_order(kind, pp, m, v)
    if kind == "1f1b":
        # torch 2.13's Schedule1F1B._get_pipeline_order numbers the last rank's forwards 1..M
        # (its runtime, _step_microbatches, runs 0..M-1, as we do): compare that rank shifted.
        last = theirs[-1]
        theirs[-1] = [f"{pp - 1}F{int(a.split('F')[1]) - 1}" if "F" in a else a for a in last]
    assert ours == theirs


def test_torch_1f1b_last_rank_difference_is_as_documented() -> None:
    # If torch fixes the off-by-one, this fails and docs/design/schedules.md needs updating.
    assert _torch_order("1f1b", 3, 3)[-1] == ["2F1", "2B0", "2F2", "2B1", "2F3", "2B2"]
    assert _our_order("1f1b", 3, 3)[-1] == ["2F0", "2B0", "2F1", "2B1", "2F2", "2B2"]


@pytest.mark.parametrize(("kind", "pp", "m"), [("interleaved", 4, 8), ("zb1p", 4, 6), ("dualpipev", 3, 8), ("1f1b", 4, 5)])
def test_torch_validator_accepts_our_csv(kind: str, pp: int, m: int) -> None:
    schedule = make_schedule(kind, pp, m)
    rows = csv.reader(io.StringIO(schedule_to_torch_csv(schedule)))
    actions = {rank: [pipelining._Action.from_str(cell) for cell in row] for rank, row in enumerate(rows)}
    placement = pipelining._validate_schedule(actions, pp, schedule.num_stages, m)
    assert placement == dict(enumerate(schedule.stage_ranks[0]))


@pytest.mark.parametrize(("kind", "pp", "m"), [("interleaved", 2, 4), ("zb1p", 3, 5), ("dualpipev", 2, 5)])
def test_torch_dump_imports_to_the_same_schedule(kind: str, pp: int, m: int, tmp_path) -> None:
    # torch's own _dump_csv (compute_only) writes empty cells for idle steps; we skip them.
    v_stages = {"interleaved": [0, pp], "zb1p": [0], "dualpipev": [0, 2 * pp - 1]}[kind]
    num_stages = {"interleaved": 2 * pp, "zb1p": pp, "dualpipev": 2 * pp}[kind]
    cls = {
        "interleaved": pipelining.ScheduleInterleaved1F1B,
        "zb1p": pipelining.ScheduleInterleavedZeroBubble,
        "dualpipev": pipelining.ScheduleDualPipeV,
    }[kind]
    path = tmp_path / "torch.csv"
    cls(_stages(pp, num_stages, v_stages), m)._dump_csv(str(path), format="compute_only")
    assert schedule_from_torch_csv(path.read_text(), kind) == make_schedule(kind, pp, m)


def test_round_trip_and_bookkeeping_cells() -> None:
    schedule = make_schedule("dualpipev", 2, 5)
    text = schedule_to_torch_csv(schedule)
    assert "(0F3;3B1)OVERLAP_F_B" in text.split("\n")[0]
    assert schedule_from_torch_csv(text, "dualpipev") == schedule
    padded = ",".join(["", "0F0", "0B0", "0REDUCE_GRAD"]) + "\n" + "1F0,,1B0\n"
    assert [[str(a) for a in row] for row in schedule_from_torch_csv(padded, "1f1b").ranks] == [
        ["0F0", "0B0"],
        ["1F0", "1B0"],
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0F0,0SEND_F0,0B0\n1F0,1B0\n", r"rank=0 column=1: '0SEND_F0' is a communication action"),
        ("0F0,0Q0\n", r"rank=0 column=1: cannot read '0Q0'"),
        ("0F0,0B0\n0F0,0B0\n", "stage=0 appears on rank=0 and rank=1"),
        ("0F0,0B0\n2F0,2B0\n", r"no actions for stages \[1\]"),
        ("0F0\n1F0,1B0\n", "stage=0 microbatch=0 runs F x1, B x0"),
        ("(0F0;0W0)OVERLAP_F_B\n", "only F&B may overlap"),
    ],
)
def test_bad_csv_names_the_cell(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        schedule_from_torch_csv(text, "1f1b")


def test_dualpipe_has_no_torch_csv() -> None:
    with pytest.raises(ScheduleError, match="kind=dualpipe has 2 stage placements"):
        schedule_to_torch_csv(make_schedule("dualpipe", 4, 8))


@pytest.mark.parametrize(("kind", "pp", "m"), [("interleaved", 2, 4), ("zb1p", 3, 5), ("dualpipev", 2, 5), ("1f1b", 3, 4)])
def test_torch_runtime_lowers_our_csv(kind: str, pp: int, m: int, tmp_path) -> None:
    # _load_csv validates, infers the stage placement and adds the SEND/RECV actions torch runs.
    schedule = make_schedule(kind, pp, m)
    path = tmp_path / "ours.csv"
    path.write_text(schedule_to_torch_csv(schedule))
    local = [s for s, rank in enumerate(schedule.stage_ranks[0]) if rank == 0]
    runtime = pipelining._PipelineScheduleRuntime(_stages(pp, schedule.num_stages, local), m)
    runtime._load_csv(str(path), format="compute_only")
    assert runtime.stage_index_to_group_rank == dict(enumerate(schedule.stage_ranks[0]))
    sends = [str(a) for a in runtime.pipeline_order_with_comms[0] if "SEND" in str(a)]
    assert sends, runtime.pipeline_order_with_comms[0]
