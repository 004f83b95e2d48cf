"""Expert parallelism on 4 gloo processes (EP2 twice, EP4 three ways) against the single-process ``MoE``; the
slot map's pure rules. The workers' checks are in ``ep_worker.py``; one run serves every test here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeplan.model.runtime.ep_slots import SlotMap
from moeplan.simulator.contracts.plan_file import parse_plan
from tests.model.runtime.spawn import run_workers

GOLDEN = Path(__file__).resolve().parents[2] / "orchestrator" / "golden" / "plan-tiny-moe.json"
SCENARIOS = ("ep2 contiguous", "ep4 contiguous", "ep4 hierarchical replicas", "ep4 golden plan placement",
             "block drop-in")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    placement = parse_plan(GOLDEN.read_text(), str(GOLDEN)).placement
    env = {"GOLDEN_PLACEMENT": placement.model_dump_json()}
    return run_workers("ep_worker.py", 4, tmp_path_factory.mktemp("ep"), env=env)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_expert_parallel_matches_the_single_process_moe(results, scenario) -> None:
    for rank, by_scenario in enumerate(results):
        checks = by_scenario[scenario]
        assert checks, scenario
        failed = {name: detail for name, (ok, detail) in checks.items() if not ok}
        assert not failed, f"rank {rank}: {failed}"


def test_the_checks_cover_what_they_claim(results) -> None:
    """Guard against a scenario that silently checks less: replicas, node limits and bytes are all looked at."""
    names = set(results[0]["ep4 hierarchical replicas"])
    assert {"nodes per token <= topk_group", "experts.gate_up_proj.grad", "comm_bytes[dispatch_sent_bytes]",
            "dedup: fewer rows than (token, expert) pairs", "input_grad", "tokens_per_expert"} <= names
    assert "block output" in results[0]["block drop-in"]


def test_slot_map_rules() -> None:
    placement = parse_plan(GOLDEN.read_text(), str(GOLDEN)).placement
    slots = SlotMap.from_placement(placement, 1, 4)
    assert slots.offsets == (0, 5, 10, 14) and slots.gpu_of_slot[4:6] == (0, 1)
    assert sorted(s for replicas in slots.log2phy for s in replicas) == list(range(18))
    for expert in slots.replicated:  # tokens spread evenly over replicas: 1/c of them each, up to one
        replicas = slots.log2phy[expert]
        hits = [sum(slots.replica_of(t, expert, 1) == s for t in range(10)) for s in replicas]
        assert max(hits) - min(hits) <= 1 and sum(hits) == 10
    assert SlotMap.contiguous(16, 4).gpu_of_slot == tuple(e // 4 for e in range(16))
    with pytest.raises(ValueError, match="ep=3 must divide n_routed_experts=16"):
        SlotMap.contiguous(16, 3)
    with pytest.raises(ValueError, match="placement.slots_per_gpu has 4 GPUs but the EP group has ep=2"):
        SlotMap.from_placement(placement, 1, 2)
    with pytest.raises(ValueError, match=r"layer_id=0 is not in the placement's layer_ids=\[1, 2, 3, 4\]"):
        SlotMap.from_placement(placement, 0, 4)
    with pytest.raises(ValueError, match="expert 3"):
        SlotMap((0, 1, 2, 2), (2, 2), 4)


def test_results_are_json(results) -> None:
    assert json.loads(json.dumps(results)) == results
