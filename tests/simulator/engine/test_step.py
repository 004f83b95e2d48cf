"""The SimPy step engine: schedule formulas with free communication, overlap, contention, traces."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moeplan.simulator.engine.step import Links, RankTail, StageCosts, StepInputs, StepSimulation, WakeCosts
from moeplan.simulator.engine.trace import chrome_trace
from moeplan.simulator.engine.unit_costs import EndCosts, UnitCosts
from moeplan.simulator.schedules import Durations, closed_form_bubble, execute, make_schedule

F, B, W = 1.0, 2.0, 1.0  # I = B - W = F: inside every closed form's conditions (docs/design/schedules.md)
NO_ENDS = EndCosts(embed_fwd_s=0.0, head_fwd_s=0.0, head_dx_s=0.0, head_dw_s=0.0)


def _unit(a2a_bytes: float = 0.0, moe: bool = False) -> UnitCosts:
    """One layer whose forward is F, input backward B - W and weight backward W seconds."""
    if moe:  # the same times split over attention and experts, with all-to-all traffic
        return UnitCosts(attn_fwd_s=F / 2, attn_dx_s=(B - W) / 2, attn_dw_s=W / 2, mlp_fwd_s=0.0, mlp_dx_s=0.0,
                         mlp_dw_s=0.0, experts_fwd_s=F / 2, experts_dx_s=(B - W) / 2, experts_dw_s=W / 2,
                         recompute_s=0.0, dispatch_ib_bytes=a2a_bytes, combine_ib_bytes=a2a_bytes)
    return UnitCosts(attn_fwd_s=F, attn_dx_s=B - W, attn_dw_s=W, mlp_fwd_s=0.0, mlp_dx_s=0.0, mlp_dw_s=0.0,
                     experts_fwd_s=0.0, experts_dx_s=0.0, experts_dw_s=0.0, recompute_s=0.0)


def _inputs(kind: str, pp: int, m: int, unit: UnitCosts, nic_bytes_per_s: float = 1.0, latency_s: float = 0.0,
            p2p_bytes: float = 0.0) -> StepInputs:
    schedule = make_schedule(kind, pp, m)
    stages = tuple(StageCosts(units=(unit,), has_embedding=False, has_head=False, heads=0)
                   for _ in range(schedule.num_stages))
    links = Links(nic_bytes_per_s=nic_bytes_per_s, nvlink_bytes_per_s=1.0, latency_s=latency_s,
                  p2p_bytes=p2p_bytes, p2p_over_nvlink=False)
    tails = tuple(RankTail(dp_sync_s={}, optimizer_parts_s={}) for _ in range(pp))
    return StepInputs(schedule=schedule, stages=stages, ends=NO_ENDS, links=links, tails=tails)


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "dualpipe", "dualpipev", "interleaved"])
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_free_communication_reproduces_the_schedule_tables(kind, pp):
    m = 4 * pp
    result = StepSimulation(_inputs(kind, pp, m, _unit()), free_comm=True).run()
    # In the engine an F&B pair shares one compute stream, so with nothing to hide it takes F + B.
    durations = Durations(f_s=F, b_s=B, w_s=W, fb_s=F + B)
    reference = execute(make_schedule(kind, pp, m), durations)
    assert result.step_time_s == pytest.approx(reference.makespan_s)
    assert result.compute_busy_s == pytest.approx(list(reference.busy_s))
    form = closed_form_bubble(kind, pp, m, durations)
    assert form.holds
    assert result.step_time_s - min(result.compute_busy_s) == pytest.approx(form.bubble_s)


def test_exact_two_rank_timeline_with_a_transfer():
    # 1F1B, 2 ranks, 1 micro-batch; every stage boundary costs 0.5 s latency + 1 byte at 2 B/s.
    inp = _inputs("1f1b", 2, 1, _unit(), nic_bytes_per_s=2.0, latency_s=0.5, p2p_bytes=1.0)
    sim = StepSimulation(inp, trace=True)
    res = sim.run()
    log = sorted((e.rank, e.lane, e.name, e.start_s, e.end_s) for e in res.events)
    assert log == [
        (0, "compute", "0B0 L0 attn-bwd", 6.0, 8.0),  # waits for the gradient: 5 + 0.5 + 1/2
        (0, "compute", "0F0 L0 attn", 0.0, 1.0),
        (0, "nic", "p2p F0/0", 1.0, 2.0),
        (1, "compute", "1B0 L0 attn-bwd", 3.0, 5.0),
        (1, "compute", "1F0 L0 attn", 2.0, 3.0),
        (1, "nic", "p2p G1/0", 5.0, 6.0),
    ]
    assert res.step_time_s == 8.0


def test_blocking_messages_are_the_runtimes_batches_each_holding_its_host():
    # As above with 2 micro-batches, where a message holds both hosts (gloo on the cpu cluster): each rank posts the
    # runtime's batches (schedules.lowering) and waits for each: a message time (1 s) an op, and until its receives
    # are in, each 1 s after its sender posted it. Rank 0 sends F0 before F1, then F1 with G0's receive; rank 1
    # receives F1 before B0 (the lowering's early receive) and sends G1 after the step. Without blocking: 11 s.
    inp = _inputs("1f1b", 2, 2, _unit(), nic_bytes_per_s=2.0, latency_s=0.5, p2p_bytes=1.0)
    free = StepSimulation(inp).run().step_time_s
    inp = dataclasses.replace(inp, links=dataclasses.replace(inp.links, p2p_blocks=True))
    res = StepSimulation(inp, trace=True).run()
    log = sorted((e.rank, e.start_s, e.end_s, e.lane, e.name) for e in res.events)
    assert log == [
        (0, 0.0, 1.0, "compute", "0F0 L0 attn"),
        (0, 1.0, 2.0, "nic", "p2p send:F0/0"),
        (0, 2.0, 3.0, "compute", "0F1 L0 attn"),  # after its send
        (0, 3.0, 7.0, "nic", "p2p send:F0/1 recv:G1/0"),  # G0 posted at 6, in at 7
        (0, 7.0, 9.0, "compute", "0B0 L0 attn-bwd"),
        (0, 9.0, 11.0, "nic", "p2p recv:G1/1"),
        (0, 11.0, 13.0, "compute", "0B1 L0 attn-bwd"),
        (1, 0.0, 2.0, "nic", "p2p recv:F0/0"),
        (1, 2.0, 3.0, "compute", "1F0 L0 attn"),
        (1, 3.0, 4.0, "nic", "p2p recv:F0/1"),  # posted at 3 as F1 left rank 0: in at 4
        (1, 4.0, 6.0, "compute", "1B0 L0 attn-bwd"),
        (1, 6.0, 7.0, "nic", "p2p send:G1/0"),
        (1, 7.0, 8.0, "compute", "1F1 L0 attn"),
        (1, 8.0, 10.0, "compute", "1B1 L0 attn-bwd"),
        (1, 10.0, 11.0, "nic", "p2p send:G1/1"),  # the step's last batch
    ]
    assert (free, res.step_time_s) == (11.0, 13.0)
    # measured batches: a send 0.25 s, a receive whose message is there 0.5 s, one of each 0.75 s
    inp = dataclasses.replace(inp, links=dataclasses.replace(inp.links, batch_s=(0.25, 0.5, 0.75)))
    res = StepSimulation(inp, trace=True).run()
    assert sorted((e.rank, e.start_s, e.end_s) for e in res.events if e.lane == "nic") == [
        (0, 1.0, 1.25), (0, 2.25, 6.5), (0, 8.5, 9.75), (1, 0.0, 2.0), (1, 3.0, 3.5), (1, 5.5, 5.75), (1, 8.75, 9.0)]
    assert res.step_time_s == 11.75
    assert (inp.links.post_s(2, 1), inp.links.post_s(0, 0)) == (0.75 + 1.0, 0.0)  # an op beyond one of each: 1 s


def test_a_pass_after_its_rank_waited_first_runs_the_measured_extra():
    # As the two-rank timeline above, with measured extras of a pass after a wait: forward 0.5 s after 2 s, backward
    # 1 s after 4 s and 1.5 s after 8 s (linear between, from 0 at no wait).
    wake = WakeCosts(forward=((2.0, 0.5),), backward=((4.0, 1.0), (8.0, 1.5)))
    inp = dataclasses.replace(_inputs("1f1b", 2, 1, _unit(), nic_bytes_per_s=2.0, latency_s=0.5, p2p_bytes=1.0),
                              wake=wake)
    res = StepSimulation(inp, trace=True).run()
    log = sorted((e.rank, e.start_s, e.end_s, e.name) for e in res.events if e.lane == "compute")
    assert log == [
        (0, 0.0, 1.0, "0F0 L0 attn"),  # no wait before it, no extra
        (0, 6.5, 7.6875, "0B0 wake"),  # waited 1 -> 6.5: 5.5 s, 1 + 0.5 * 1.5 / 4
        (0, 7.6875, 9.6875, "0B0 L0 attn-bwd"),
        (1, 2.0, 2.5, "1F0 wake"),  # waited 0 -> 2 for F0
        (1, 2.5, 3.5, "1F0 L0 attn"),
        (1, 3.5, 5.5, "1B0 L0 attn-bwd"),  # right after the forward: no extra
    ]
    assert (wake.extra_s("B", 16.0), wake.extra_s("F", 1.0), wake.extra_s("W", 9.0)) == (1.5, 0.25, 0.0)


def test_a_ranks_first_pass_begun_at_the_steps_start_runs_the_measured_step_start():
    # Rank 0 begins F0 at once: it pays the data thread's 0.25 s; rank 1's first pass waited, so it pays the wake
    wake = WakeCosts(forward=((2.0, 0.5),), step_start=(("F", 0.25),))
    inp = dataclasses.replace(_inputs("1f1b", 2, 1, _unit(), nic_bytes_per_s=2.0, latency_s=0.5, p2p_bytes=1.0),
                              wake=wake)
    res = StepSimulation(inp, trace=True).run()
    log = sorted((e.rank, e.start_s, e.end_s, e.name) for e in res.events if e.lane == "compute")
    assert log == [
        (0, 0.0, 0.25, "0F0 step-start"),
        (0, 0.25, 1.25, "0F0 L0 attn"),
        (0, 6.75, 8.75, "0B0 L0 attn-bwd"),  # no backward entries: no extra after its wait
        (1, 2.25, 2.75, "1F0 wake"),  # waited 2.25 s: the last point's 0.5 s beyond it
        (1, 2.75, 3.75, "1F0 L0 attn"),
        (1, 3.75, 5.75, "1B0 L0 attn-bwd"),
    ]


def test_overlapped_pairs_hide_all_to_all_that_plain_1f1b_exposes():
    unit = _unit(a2a_bytes=0.2, moe=True)  # 0.2 s per all-to-all leg at 1 B/s
    free = {k: StepSimulation(_inputs(k, 4, 16, unit), free_comm=True).run().step_time_s for k in ("1f1b", "dualpipe")}
    real = {k: StepSimulation(_inputs(k, 4, 16, unit)).run().step_time_s for k in ("1f1b", "dualpipe")}
    exposed = {k: real[k] - free[k] for k in real}
    assert exposed["1f1b"] > 0 and exposed["dualpipe"] >= 0
    assert exposed["dualpipe"] < 0.5 * exposed["1f1b"]
    # but never better than compute alone
    assert real["dualpipe"] >= free["dualpipe"]


def test_links_serialise_transfers():
    # twice the all-to-all bytes on the same NIC cannot finish sooner
    small = StepSimulation(_inputs("dualpipe", 4, 16, _unit(0.5, moe=True))).run().step_time_s
    large = StepSimulation(_inputs("dualpipe", 4, 16, _unit(1.0, moe=True))).run().step_time_s
    assert large > small


def test_chrome_trace_is_valid():
    res = StepSimulation(_inputs("dualpipe", 4, 8, _unit(0.2, moe=True)), trace=True).run()
    trace = json.loads(json.dumps(chrome_trace(res.events)))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(res.events) and {e["pid"] for e in spans} == {0, 1, 2, 3}
    assert all(e["dur"] >= 0 for e in spans)
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(res.step_time_s * 1e6)


@pytest.mark.parametrize("barrier", [False, True])
def test_the_optimizer_barrier_waits_for_every_ranks_gradients(barrier):
    # 1F1B, 2 ranks, 1 micro-batch, free links: rank 1's backward ends at 4, rank 0's at 6 (see the timeline
    # above less the transfers); optimizers of 3 s (rank 0) and 5 s (rank 1). With a global gradient norm
    # rank 1 updates only once rank 0's gradients are in: 6 + 5 = 11, else 4 + 5 = 9 against 6 + 3. The parts
    # run one after the other, in their order, under their own names.
    inp = _inputs("1f1b", 2, 1, _unit())
    tails = (RankTail(dp_sync_s={}, optimizer_parts_s={"norm": 1.0, "update": 2.0}),
             RankTail(dp_sync_s={}, optimizer_parts_s={"norm": 0.5, "update": 3.0, "zero": 1.0, "other": 0.5}))
    res = StepSimulation(dataclasses.replace(inp, tails=tails, optimizer_barrier=barrier), trace=True).run()
    opt = [(e.rank, e.name, e.start_s, e.end_s) for e in res.events if e.name.startswith("optimizer")]
    t0 = 6.0 if barrier else 4.0
    assert sorted(opt) == [(0, "optimizer norm", 6.0, 7.0), (0, "optimizer update", 7.0, 9.0),
                           (1, "optimizer norm", t0, t0 + 0.5), (1, "optimizer other", t0 + 4.5, t0 + 5.0),
                           (1, "optimizer update", t0 + 0.5, t0 + 3.5), (1, "optimizer zero", t0 + 3.5, t0 + 4.5)]
    assert res.finish_s == ([9.0, 11.0] if barrier else [9.0, 9.0]) and res.step_time_s == max(res.finish_s)
