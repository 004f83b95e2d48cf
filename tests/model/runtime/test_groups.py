"""Process groups from a layout: partitions, EP inside a node, DualPipe's mirror pairs, coordinates; and the
torch.distributed groups on 4 gloo processes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moeplan.model.runtime.groups import GROUP_KINDS, process_groups
from moeplan.simulator.contracts.plan_file import parse_plan
from moeplan.simulator.schedules.registry import SCHEDULE_KINDS, schedule_kind
from tests.model.runtime.spawn import ep_worker_results

GOLDEN = Path(__file__).resolve().parents[2] / "orchestrator" / "golden" / "plan-tiny-moe.json"


@dataclass(frozen=True)
class Layout:
    world: int
    pp: int
    dp: int
    cp: int
    ep: int
    rank_stages: tuple[tuple[int, ...], ...]
    mirrored: bool = False  # the registry says each stage lives on two ranks


@st.composite
def layouts(draw) -> tuple[Layout, int]:
    kind = schedule_kind(draw(st.sampled_from(SCHEDULE_KINDS)))
    pp, v = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    assume(kind.pp_error(pp) is None)
    dp, cp = draw(st.integers(1, 6)), draw(st.sampled_from([1, 2, 4]))
    ep = draw(st.sampled_from([e for e in range(1, dp * cp + 1) if dp * cp % e == 0]))
    world = pp * dp * cp
    per_node = draw(st.sampled_from([g for g in (1, 2, 4, 8, 16) if world % g == 0 or world < g]))
    assume(ep % per_node == 0 if ep > per_node else (world <= per_node or per_node % ep == 0))
    stages = tuple(kind.rank_stages(pp, v, r) for r in range(pp))
    return Layout(world, pp, dp, cp, ep, stages, kind.directions(pp, v) > 1), per_node


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@SETTINGS
@given(layouts())
def test_every_kind_partitions_the_world(case) -> None:
    layout, per_node = case
    pg = process_groups(layout, per_node)
    sizes = {"pp": layout.pp, "dp": layout.dp, "cp": layout.cp, "stage": layout.dp * layout.cp, "ep": layout.ep,
             "expert_dp": layout.dp * layout.cp // layout.ep, "mirror": 2}
    for kind in GROUP_KINDS:
        groups = pg.groups(kind)
        flat = [r for g in groups for r in g]
        assert len(flat) == len(set(flat)), f"{kind}: a rank in two groups"
        assert all(len(g) == sizes[kind] for g in groups), (kind, groups)
        if kind != "mirror":
            assert sorted(flat) == list(range(layout.world)), kind


@SETTINGS
@given(layouts())
def test_groups_agree_with_coordinates(case) -> None:
    layout, per_node = case
    pg = process_groups(layout, per_node)
    inner = layout.dp * layout.cp
    for rank in range(layout.world):
        c = pg.coords(rank)
        assert pg.rank_of(c.pp_rank, c.dp_rank, c.cp_rank) == rank  # the round trip
        assert rank == c.pp_rank * inner + c.dp_rank * layout.cp + c.cp_rank  # cp innermost, then dp, then pp
        assert c.node == rank // per_node
        pp_group = pg.group_of("pp", rank)
        assert pp_group.index(rank) == c.pp_rank
        assert [b - a for a, b in itertools.pairwise(pp_group)] == [inner] * (layout.pp - 1)  # simulator's p2p gap
        ep_group = pg.group_of("ep", rank)
        assert ep_group.index(rank) == c.ep_rank and ep_group == tuple(range(ep_group[0], ep_group[0] + layout.ep))
        expert_dp = pg.group_of("expert_dp", rank)
        assert expert_dp.index(rank) == c.expert_dp_rank
        assert {pg.coords(r).ep_rank for r in expert_dp} == {c.ep_rank}  # the same experts
        assert {pg.coords(r).pp_rank for r in pg.group_of("stage", rank)} == {c.pp_rank}
        assert {pg.coords(r)[:2] for r in pg.group_of("cp", rank)} == {c[:2]}
        assert {(pg.coords(r).pp_rank, pg.coords(r).cp_rank) for r in pg.group_of("dp", rank)} == {
            (c.pp_rank, c.cp_rank)}


@SETTINGS
@given(layouts())
def test_ep_groups_stay_in_a_node_and_mirror_pairs_r_with_pp_minus_1_minus_r(case) -> None:
    layout, per_node = case
    pg = process_groups(layout, per_node)
    for group in pg.ep_groups:
        nodes = {r // per_node for r in group}
        if layout.ep <= per_node:
            assert len(nodes) == 1, (group, per_node)
        else:  # whole nodes
            assert len(nodes) == layout.ep // per_node and all(sum(r // per_node == n for r in group) == per_node
                                                                 for n in nodes)
    inner = layout.dp * layout.cp
    expected = set()
    if layout.mirrored:
        expected = {tuple(sorted({p * inner + i, (layout.pp - 1 - p) * inner + i}))
                    for i in range(inner) for p in range(layout.pp)}
    assert set(pg.mirror_groups) == expected
    if layout.mirrored:
        assert sorted(r for g in pg.mirror_groups for r in g) == list(range(layout.world))


def test_the_golden_plans_layout() -> None:
    plan = parse_plan(GOLDEN.read_text(), str(GOLDEN))
    pg = process_groups(plan.layout, plan.inputs.cluster.node.gpus_per_node)  # pp2 dp4 ep4, dualpipev
    assert pg.ep_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert pg.pp_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert pg.expert_dp_groups == tuple((r,) for r in range(8))
    assert pg.mirror_groups == ()  # DualPipeV's two chunks of a rank are different stages


@pytest.mark.parametrize(("change", "message"), [
    ({"world": 12}, "world=12 is not pp=2 x dp=4 x cp=1"),
    ({"ep": 3}, "ep=3 must divide dp x cp = 4"),
    ({"dp": 6, "world": 12, "ep": 3}, "ep=3 must divide gpus_per_node=4"),
    ({"dp": 12, "world": 24, "ep": 6}, "ep=6 must be a multiple of gpus_per_node=4"),
    ({"rank_stages": ((0,),)}, "rank_stages has 1 pipeline ranks but pp=2"),
    ({"dp": 3, "world": 6, "ep": 1}, "world=6 is not a whole number of nodes of gpus_per_node=4"),
    ({"ep": 0}, "ep=0 must be a positive integer"),
])
def test_errors_name_the_field_and_value(change, message) -> None:
    base = {"world": 8, "pp": 2, "dp": 4, "cp": 1, "ep": 2, "rank_stages": ((0,), (1,))}
    with pytest.raises(ValueError, match=message):
        process_groups(Layout(**(base | change)), 4)
    with pytest.raises(ValueError, match="rank=8 is outside 0..7"):
        process_groups(Layout(**base), 4).coords(8)


def test_new_groups_on_four_gloo_processes(tmp_path_factory) -> None:
    """dp2 x cp2, ep2, gloo (``ep_worker.py``): each rank sums its rank id over every group it holds; the sums
    must be its group's (so every group was created on every rank in one order, with the right members)."""
    results = ep_worker_results(tmp_path_factory.getbasetemp())
    pg = process_groups(Layout(world=4, pp=1, dp=2, cp=2, ep=2, rank_stages=((0,),)), 2)
    for rank, got in enumerate(results):
        expected = {kind: sum(pg.group_of(kind, rank)) for kind in GROUP_KINDS if pg.group_of(kind, rank)}
        assert got["groups"] == expected and len(expected) == len(GROUP_KINDS) - 1, rank  # no mirror group


@pytest.mark.parametrize("backend,nccl", [("nccl", True), ("gloo", True), ("nccl", False)])
def test_ep_groups_hold_the_plans_communication_sms_on_nccl(monkeypatch, backend, nccl) -> None:
    """``new_groups(..., max_ctas={"ep": n})`` creates every expert-parallel group with NCCL options capping its
    CTAs at n (NCCL's maxCTAs: one an SM), every other group with none; gloo groups, or a torch without NCCL, take
    no options at all. The calls' order is unchanged (every rank creates every group, ep_worker's test)."""
    import types

    import torch.distributed as dist

    from moeplan.model.runtime import dist_groups

    class Options:
        def __init__(self):
            self.config = types.SimpleNamespace(max_ctas=None)

    pg = process_groups(Layout(world=8, pp=2, dp=4, cp=1, ep=2, rank_stages=((0,), (1,))), 4)
    calls = []
    monkeypatch.setattr(dist, "ProcessGroupNCCL", types.SimpleNamespace(Options=Options), raising=False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(dist, "get_world_size", lambda: pg.world)
    monkeypatch.setattr(dist, "new_group", lambda ranks, backend=None, **kw: calls.append(
        (tuple(ranks), kw.get("pg_options"))) or object())
    dist_groups.new_groups(pg, 0, backend, max_ctas={"ep": 20})
    expected = [(kind, tuple(r)) for kind in GROUP_KINDS for r in pg.groups(kind)]
    assert [ranks for ranks, _ in calls] == [r for _, r in expected]
    for (kind, _), (_, options) in zip(expected, calls, strict=True):
        capped = kind == "ep" and backend == "nccl" and nccl
        assert (options.config.max_ctas == 20) if capped else options is None, (kind, backend, nccl)
    assert any(kind == "ep" for kind, _ in expected)


def test_the_plans_communication_sms_come_from_its_cost_tables() -> None:
    """``rank_entry.comm_sms`` (what the launcher hands every rank, ``RunConfig.comm_sms``): the plan's named
    tables' ``comm_sms`` with expert parallelism (20, TR §3.2.2, in the packaged tables), 0 without; a plan naming
    tables this machine lacks (a calibration file's) takes the GPU's default tables."""
    from moeplan.orchestrator.rank_entry import comm_sms as plan_comm_sms

    plan = parse_plan((Path(__file__).parents[2] / "orchestrator" / "golden" / "plan-tiny-moe.json").read_text())
    with_ep = plan.model_copy(update={"inputs": plan.inputs.model_copy(
        update={"parallel": plan.inputs.parallel.model_copy(update={"ep": 2})})})
    assert plan_comm_sms(with_ep) == 20
    assert plan_comm_sms(with_ep.model_copy(update={"predictions": with_ep.predictions.model_copy(
        update={"cost_tables": "calibrated"})})) == 20
    assert plan_comm_sms(plan.model_copy(update={"inputs": plan.inputs.model_copy(
        update={"parallel": plan.inputs.parallel.model_copy(update={"ep": 1})})})) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (NCCL)")
def test_an_nccl_group_takes_the_cta_cap_and_runs_an_all_to_all(tmp_path) -> None:
    """On the GPU image's torch: a one-rank NCCL world whose expert group is made with ``nccl_options(20)`` (as
    ``new_groups`` makes it) runs an uneven ``all_to_all_single``."""
    import torch
    import torch.distributed as dist

    from moeplan.model.runtime.dist_groups import nccl_options

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        group = dist.new_group([0], backend="nccl", pg_options=nccl_options(20))
        x = torch.arange(12, dtype=torch.float32, device="cuda")
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, [12], [12], group=group)
        assert torch.equal(out, x)
    finally:
        dist.destroy_process_group()
