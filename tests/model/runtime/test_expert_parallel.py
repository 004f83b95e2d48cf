"""Expert parallelism on 4 gloo processes (EP2 twice, EP4 three ways) against the single-process ``MoE``; the
slot map's pure rules. The workers' checks are in ``ep_worker.py``; one run serves every test here."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moeplan.model.linear import LinearFactory
from moeplan.model.moe import MoE
from moeplan.model.runtime.ep_slots import SlotMap
from moeplan.model.runtime.expert_parallel import ExpertParallelMoE, sync_replica_grads
from moeplan.simulator.contracts.plan_file import parse_plan
from moeplan.simulator.presets.models import tiny_moe
from tests.model.runtime.spawn import ep_worker_results

GOLDEN = Path(__file__).resolve().parents[2] / "orchestrator" / "golden" / "plan-tiny-moe.json"
SCENARIOS = ("ep2 contiguous", "ep4 contiguous", "ep4 hierarchical replicas", "ep4 golden plan placement",
             "block drop-in")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return ep_worker_results(tmp_path_factory.getbasetemp())


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


@pytest.fixture
def single_rank_group(request):
    """A world of one in this process: gloo on the CPU, NCCL on a GPU."""
    backend = request.param
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs CUDA and NCCL")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    finally:
        dist.destroy_process_group()


def _reference(spec, dtype: torch.dtype, device: torch.device) -> MoE:
    moe = MoE(spec, LinearFactory(dtype), dtype, "auto").to(device)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return moe


@pytest.mark.parametrize("single_rank_group", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)], indirect=True)
def test_two_replicas_on_one_gpu_and_an_unsplit_group(single_rank_group) -> None:
    """EP of one GPU: with the contiguous map the layer is the single-process MoE bit for bit (same pairs, same
    order); with experts 0 and 5 given a second slot on the same GPU, tokens split over the two slots and
    ``sync_replica_grads`` puts the expert's whole gradient on both."""
    device, spec = single_rank_group, tiny_moe()
    ref = _reference(spec, torch.float32, device)
    x = torch.randn(2, 8, spec.hidden_size, generator=torch.Generator().manual_seed(8)).to(device)
    want = ref(x)
    want.square().sum().backward()
    plain = ExpertParallelMoE.from_moe(ref, dist.group.WORLD)
    assert torch.equal(plain(x), want)
    slots = SlotMap((*range(16), 0, 5), (18,), 16)
    ep = ExpertParallelMoE.from_moe(ref, dist.group.WORLD, slots)
    got = ep(x)
    got.square().sum().backward()
    sync_replica_grads(ep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    logical = list(slots.phy2log)
    torch.testing.assert_close(ep.experts.down_proj.grad, ref.experts.down_proj.grad[logical], rtol=1e-5, atol=1e-5)
    assert ep.comm_bytes["dispatch_sent_bytes"] == 0 and ep.comm_bytes["dispatch_self_bytes"] == 16 * 64 * 4
    fresh = ExpertParallelMoE.from_spec(spec, dist.group.WORLD, slots, LinearFactory(torch.float32), torch.float32,
                                        expert_backend="auto").to(device)
    fresh.load_state_dict(ep.state_dict())  # the same parameters, names and shapes as from_moe's
    assert torch.equal(fresh(x), got)


@pytest.mark.gpu
@pytest.mark.parametrize("single_rank_group", ["nccl"], indirect=True)
def test_one_host_sync_per_layer_on_a_gpu(single_rank_group) -> None:
    """Forward and backward of the expert-parallel layer in BF16 (torch._grouped_mm experts) sync the host
    once: the split sizes after the counts all-to-all."""
    device, spec = single_rank_group, tiny_moe()
    ep = ExpertParallelMoE.from_moe(_reference(spec, torch.bfloat16, device), dist.group.WORLD)
    x = torch.randn(4, 64, spec.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step() -> None:
        ep(x).float().square().mean().backward()

    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
