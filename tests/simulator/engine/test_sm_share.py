"""Communication SMs taken only while an all-to-all runs: the compute lane's arithmetic, exact tiny timelines
in the engine, and the V3-size effect of reserving them always versus beside communication only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.engine.sm_share import ComputeLane
from moeplan.simulator.engine.step import Links, RankTail, StageCosts, StepInputs, StepSimulation
from moeplan.simulator.engine.unit_costs import EndCosts, UnitCosts
from moeplan.simulator.schedules import make_schedule

NO_ENDS = EndCosts(embed_fwd_s=0.0, head_fwd_s=0.0, head_dx_s=0.0, head_dw_s=0.0)


def test_a_job_slows_only_inside_the_interval() -> None:
    lane = ComputeLane()
    job = lane.submit(0.0, 2.0, 4.0, "a")
    assert job.end_s == 2.0
    lane.add_comm(1.0, 1.5)  # issued after the job was queued: it stretches it
    # [0, 1): half the work; [1, 1.5): 0.5 / 4 of it; the remaining 3/8 at full speed: 0.75 s
    assert job.end_s == pytest.approx(2.25)
    behind = lane.submit(0.0, 1.0, 1.0, "b")
    assert (behind.start_s, behind.end_s) == pytest.approx((2.25, 3.25))
    lane.add_comm(1.5, 2.0)  # touches the first interval: merged, and both jobs move again
    assert lane.comm_starts == [1.0] and lane.comm_ends == [2.0]
    assert job.end_s == pytest.approx(2.5) and behind.start_s == pytest.approx(2.5)
    lane.finish(job)
    lane.finish(behind)
    assert lane.free_at == pytest.approx(3.5) and lane.comm_starts == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0.01, 3)), min_size=0, max_size=6),
       st.floats(0, 5), st.floats(0.1, 4), st.floats(1.0, 3.0))
def test_end_matches_a_fine_time_grid(intervals, start, full_s, slowdown) -> None:
    """Against a brute-force integration of the rate on a 1e-4 s grid (the union of intervals, any order)."""
    lane = ComputeLane()
    for s, length in intervals:
        lane.add_comm(s, s + length)
    slow_s = full_s * slowdown
    end = lane.submit(start, full_s, slow_s, "x").end_s

    def inside(t: float) -> bool:
        return any(s <= t < s + length for s, length in intervals)

    dt, t, work = 1e-4, start, 0.0
    while work < 1.0:
        work += dt / (slow_s if inside(t) else full_s)
        t += dt
    assert end == pytest.approx(t, abs=3e-4)
    assert full_s + start - 1e-12 <= end <= start + slow_s + 1e-12


def _moe_unit(shared_s: float, experts_s: float, a2a_bytes: float) -> UnitCosts:
    return UnitCosts(attn_fwd_s=1.0, attn_dx_s=0.0, attn_dw_s=0.0, mlp_fwd_s=shared_s, mlp_dx_s=0.0, mlp_dw_s=0.0,
                     experts_fwd_s=experts_s, experts_dx_s=0.0, experts_dw_s=0.0, recompute_s=0.0,
                     dispatch_ib_bytes=a2a_bytes, combine_ib_bytes=a2a_bytes)


def _one_microbatch(stage: StageCosts) -> StepInputs:
    links = Links(nic_bytes_per_s=1.0, nvlink_bytes_per_s=1.0, latency_s=0.0, p2p_bytes=0.0, p2p_over_nvlink=False)
    return StepInputs(schedule=make_schedule("1f1b", 1, 1), stages=(stage,), ends=NO_ENDS, links=links,
                      tails=(RankTail(dp_sync_s={}, optimizer_parts_s={}),))


def test_only_the_shared_expert_beside_the_dispatch_slows() -> None:
    """One micro-batch's forward: attention 1 s, dispatch 0.5 s beside the shared expert (1 s on all SMs, 2 s on the rest),
    experts 1 s (2 s beside comm, but nothing runs beside them), combine 0.5 s."""
    full, slow = _moe_unit(1.0, 1.0, 0.5), _moe_unit(2.0, 2.0, 0.5)
    res = StepSimulation(_one_microbatch(StageCosts((full,), False, False, 0, slow_units=(slow,))), trace=True).run()
    log = sorted((e.lane, e.name, e.start_s, e.end_s) for e in res.events if "F0" in e.name)
    assert log == [
        ("compute", "0F0 L0 attn", 0.0, 1.0),
        ("compute", "0F0 L0 experts", 2.25, 3.25),  # all SMs: the dispatch ended at 1.5
        ("compute", "0F0 L0 shared", 1.0, 2.25),  # 0.25 of it in the dispatch's 0.5 s, the rest at full speed
        ("nic", "0F0 L0 combine", 3.25, 3.75),
        ("nic", "0F0 L0 dispatch", 1.0, 1.5),
    ]
    # the backward has no compute here, only its two all-to-all legs: 1 s after the forward
    assert res.step_time_s == 3.75 + 1.0
    # the old model (every piece at the reduced rate) is the same stage priced slow throughout
    always = StepSimulation(_one_microbatch(StageCosts((slow,), False, False, 0))).run()
    assert always.step_time_s == 1.0 + 2.0 + 2.0 + 0.5 + 1.0
    assert res.compute_busy_s == [pytest.approx(3.25)]
