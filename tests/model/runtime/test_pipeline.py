"""The pipelined step equals the single-process step: every schedule kind, real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moeplan.model.runtime.rank import RankRuntime, RuntimeOptions
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.schedules import SCHEDULE_KINDS
from tests.model.runtime.harness import reference_step, run_ranks, tiny_plan

F32 = RuntimeOptions(dtype=torch.float32)


def _one_step(rank: int, plans: list) -> list:
    """On each rank: for every plan, one forward-backward and the gradient sync; this rank's losses and grads."""
    out = []
    for plan in plans:
        rt = RankRuntime.create(plan, rank, F32)
        result = rt.forward_backward(step=0)
        rt.sync_gradients()
        grads, logical = {}, {}
        for name, param in rt.named_parameters().items():  # the data-parallel mean ZeRO-1 reduce-scatters
            grads[name] = param.main_grad.clone()
            expert = ".mlp.experts." in name and plan.layout.ep > 1
            dist.all_reduce(grads[name], group=rt.handles["expert_dp" if expert else "stage"])
            grads[name] /= rt.groups.dp
        rt.optimizer_step()
        loads = rt.expert_loads()  # the whole batch's, gathered from every pipeline rank
        for layer, moe in rt.moe_layers().items():
            if hasattr(moe, "slots"):  # expert parallel: this rank's slots hold these logical experts
                logical[layer] = [moe.slots.phy2log[s] for s in moe.slots.local_slots(moe.ep_rank)]
        out.append({"losses": result.losses, "coords": rt.groups.coords(rank), "grads": grads, "logical": logical, "loads": loads,
                    "stages": sorted(rt.modules), "sent_bytes": result.sent_bytes,
                    "built": {s: ([int(i) for i in m.layers], hasattr(m, "embed_tokens") and m.stage.has_embedding,
                                  m.stage.has_head, [b.layer_id for b in getattr(m, "mtp", [])])
                              for s, m in rt.modules.items()}})
    return out


def _check(plans, results):
    for i, plan in enumerate(plans):
        ref_losses, ref_grads, ref_loads = reference_step(plan)
        seen = set()
        for per_rank in results:
            got = per_rank[i]
            coords = got["coords"]
            for m, loss in got["losses"].items():
                assert loss == pytest.approx(ref_losses[coords.dp_rank][m], rel=1e-5), (plan.schedule.kind, m)
            where = f"{plan.schedule.kind} pp={plan.layout.pp} dp={plan.layout.dp}"
            for name, grad in got["grads"].items():
                expected = ref_grads[name]
                layer = int(name.split(".")[1]) if name.startswith(("layers.", "mtp.")) else None
                if ".mlp.experts." in name and got["logical"]:
                    layer = layer if name.startswith("layers.") else plan.inputs.model.num_hidden_layers + layer
                    expected = expected[got["logical"][layer]]
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6,
                                           msg=lambda s, name=name, where=where: f"{where} {name}: {s}")
                seen.add(name)
            assert got["stages"] == list(plan.layout.rank_stages[coords.pp_rank])
            for stage, (layers, embedding, head, mtp) in got["built"].items():  # what the rank built = the plan's
                record = plan.layout.stage_records[stage]
                assert layers == list(range(record.first_layer, record.end_layer)), (stage, layers, record)
                assert (embedding, head, mtp) == (record.has_embedding, record.has_head, list(record.mtp_layers))
        for per_rank in results:  # expert loads for the load file: the single process's counts, exactly
            assert {k: v.tolist() for k, v in per_rank[i]["loads"].items()} == {k: v.tolist() for k, v in ref_loads.items()}
        assert seen == set(ref_grads), f"{plan.schedule.kind}: parameters nobody holds {set(ref_grads) - seen}"


def test_every_kind_at_pp2_matches_one_process(tmp_path):
    plans = [tiny_plan(kind, pp=2) for kind in SCHEDULE_KINDS]
    _check(plans, run_ranks(2, _one_step, plans, tmp=tmp_path))


def test_every_kind_at_pp4_and_at_pp2_dp2_matches_one_process(tmp_path):
    deeper = tiny_moe().model_copy(update={"num_hidden_layers": 8})  # 9 layer units: 2 stages per rank at pp=4
    plans = [tiny_plan(kind, pp=4, spec=deeper) for kind in SCHEDULE_KINDS] + [tiny_plan(kind, pp=2, dp=2) for kind in SCHEDULE_KINDS]
    _check(plans, run_ranks(4, _one_step, plans, tmp=tmp_path))


def test_expert_parallel_pipelines_match_one_process(tmp_path):
    """Every kind at PP2 x EP2 (dp 2): each rank holds half the routed experts; tokens cross by all-to-all."""
    plans = [tiny_plan(kind, pp=2, dp=2, ep=2) for kind in SCHEDULE_KINDS]
    _check(plans, run_ranks(4, _one_step, plans, tmp=tmp_path))
