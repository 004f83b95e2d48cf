"""The overlapped F&B (``model.runtime.overlap``): bit-identical to F then B, really interleaved, timed
under the simulator's names. Real gloo processes with expert parallelism over two ranks."""

from __future__ import annotations

import functools

import pytest
import torch

from moeplan.model.losses import training_loss
from moeplan.model.options import ModelOptions
from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.overlap import Pass, drain, interleave, stage_backward, stage_forward
from moeplan.model.runtime.overlap_comm import DistComm, RecordingComm, Streams
from moeplan.model.runtime.rank import RankRuntime, RuntimeOptions
from moeplan.model.transformer import Transformer
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.report.trace_analysis import op_class
from tests.model.runtime.harness import run_ranks, tiny_plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def uncovered_launches(log: list[tuple[str, str]], pairs: list[tuple[str, str]]) -> list[str]:
    """All-to-alls of an F&B pair (chains ``pairs``) with no compute of the pair's other chain issued between
    their launch and their wait, among those launched while the other chain still had nodes to issue (the
    layers one pass has beyond the other's run alone); launches are matched to waits of the same name in order."""
    partner = {a: b for x, y in pairs for a, b in ((x, y), (y, x))}
    bad = []
    for i, (kind, name) in enumerate(log):
        chain = name.split(" ")[0]
        if kind != "launch" or chain not in partner:
            continue
        if not any(n.split(" ")[0] == partner[chain] for _, n in log[i + 1:]):
            continue  # the other pass has finished: this layer is unpaired
        launches_before = sum(1 for k, n in log[:i] if (k, n) == ("launch", name))
        waits = [j for j, (k, n) in enumerate(log) if (k, n) == ("wait", name)]
        end = waits[launches_before]
        if not any(k == "compute" and n.split(" ")[0] == partner[chain] for k, n in log[i + 1:end]):
            bad.append(name)
    return bad


def test_uncovered_launches_on_synthetic_logs():
    covered = [("launch", "1F0 L0 dispatch"), ("compute", "0B1 L1 experts-bwd"), ("wait", "1F0 L0 dispatch")]
    assert uncovered_launches(covered, [("1F0", "0B1")]) == []
    alone = [("launch", "1F0 L0 dispatch"), ("compute", "1F0 L0 shared"), ("wait", "1F0 L0 dispatch"),
             ("compute", "0B1 L1 experts-bwd")]
    assert uncovered_launches(alone, [("1F0", "0B1")]) == ["1F0 L0 dispatch"]
    assert uncovered_launches(alone, []) == []  # outside a pair: nothing asked
    assert uncovered_launches(alone[:3], [("1F0", "0B1")]) == []  # the backward had finished: unpaired


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_node_passes_interleaved_equal_whole_graph_passes(dtype):
    """One process, no expert parallelism: forward of micro-batch 1 interleaved with the backward of
    micro-batch 0 on the same stage gives bit for bit the gradients, loss and outputs of plain calls."""
    spec = tiny_moe().model_copy(update={"aux_loss_alpha": 0.1})
    models = []
    for _ in range(2):
        model = Transformer(spec, ModelOptions(dtype=dtype))
        model.init_weights_by_name(0)
        models.append(model.train())
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, spec.vocab_size, (2, 16), generator=gen) for _ in range(2)]
    labels = [torch.randint(0, spec.vocab_size, (2, 16), generator=gen) for _ in range(2)]
    losses = [training_loss(models[0](ids[m]), labels[m], 0.3).total / 2 for m in range(2)]
    losses[0].backward()
    timeline, streams = Timeline(0, cuda=False), Streams(torch.device("cpu"))

    def chain(name):
        return Pass(DistComm(), streams, timeline, name)

    def loss_of(m):
        return lambda out: training_loss(out, labels[m], 0.3).total / 2

    tape0 = drain(stage_forward(models[1], ids[0], ids[0], loss_of(0), chain("0F0")))
    _, tape1 = interleave(stage_backward(tape0, None, chain("0B0")),
                          stage_forward(models[1], ids[1], ids[1], loss_of(1), chain("0F1")))
    assert torch.equal(tape0.output.value, losses[0]) and torch.equal(tape1.output.value, losses[1])
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    names = {e.name for e in timeline.events()}
    assert {"0F1 embed", "0F1 L0 attn", "0F1 L0 mlp", "0F1 L1 experts", "0F1 head", "0B0 L3 experts-bwd",
            "0B0 L0 mlp-bwd", "0B0 L0 attn-bwd", "0B0 head", "0B0 embed"} <= names
    assert all(op_class(n) for n in names)


# ---- expert parallelism on two gloo processes ------------------------------------------------------------

PLANS = {  # (kind, pp, dp, ep): the EP plan runs 5 F&B pairs on one rank; pp=2 adds P2P and a head-only stage
    "dualpipev-ep2": ("dualpipev", 1, 2, 2),
    "dualpipev-pp2": ("dualpipev", 2, 1, 1),
}


def _run(rank: int, plan, dtype, substeps: bool, overlap: bool) -> dict:
    rt = RankRuntime.create(plan, rank, RuntimeOptions(dtype=dtype))
    ex = rt.executor
    ex.substeps, ex.overlap = substeps, overlap
    ex.comm = RecordingComm(DistComm())
    sent = {}
    post = ex._post

    def keep_sent(batch, state, timeline):  # every value this rank sends, as sent
        sent.update({p2p.key: state.outbox[p2p.key].clone() for p2p in batch.ops if p2p.kind == "send"})
        return post(batch, state, timeline)

    ex._post = keep_sent
    result = rt.forward_backward(step=0, timeline=Timeline(rank, cuda=False))
    ep_bytes = {i: dict(m.comm_bytes) for i, m in rt.moe_layers().items() if hasattr(m, "comm_bytes")}
    return {"losses": result.losses, "grads": {n: p.main_grad.clone() for n, p in rt.named_parameters().items()},
            "sent": sent, "ep_bytes": ep_bytes, "log": ex.comm.log, "events": result.events,
            "pairs": [tuple(str(op) for op in s.action.ops) for s in ex.program.steps if s.action.kind == "FB"]}


def _worker(rank: int, cases: list) -> dict:
    out = {}
    for name, kind, pp, dp, ep, dtype_name in cases:
        plan = tiny_plan(kind, pp=pp, dp=dp, ep=ep, microbatches=4)
        dtype = DTYPES[dtype_name]
        out[name, dtype_name] = {mode: _run(rank, plan, dtype, *flags) for mode, flags in
                                 (("plain", (False, False)), ("overlap", (True, True)), ("sequential", (True, False)))
                                 if mode != "sequential" or (name, dtype_name) == ("dualpipev-ep2", "fp32")}
    return out


@functools.cache
def _results(tmp: str) -> list:
    from pathlib import Path
    cases = [(name, *PLANS[name], d) for name in PLANS for d in DTYPES if (name, d) != ("dualpipev-pp2", "bf16")]
    return run_ranks(2, _worker, cases, tmp=Path(tmp))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _results(str(tmp_path_factory.mktemp("overlap")))


CASES = [("dualpipev-ep2", "fp32"), ("dualpipev-ep2", "bf16"), ("dualpipev-pp2", "fp32")]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_overlapped_pairs_are_bit_identical_to_f_then_b(results, case):
    for rank, per_rank in enumerate(results):
        plain, ovl = per_rank[case]["plain"], per_rank[case]["overlap"]
        assert ovl["pairs"], f"{case}: the plan has no F&B pair on rank {rank}"
        assert ovl["losses"] == plain["losses"]
        for name, grad in plain["grads"].items():
            assert torch.equal(ovl["grads"][name], grad), f"{case} rank {rank}: {name}"
        assert plain["sent"].keys() == ovl["sent"].keys()
        for key, value in plain["sent"].items():  # activations and input gradients sent to the other rank
            assert torch.equal(ovl["sent"][key], value), f"{case} rank {rank}: {key}"
        assert ovl["ep_bytes"] == plain["ep_bytes"]  # the same bytes counted, forward and backward


def test_every_pair_all_to_all_has_the_other_micro_batch_computing_under_it(results):
    for per_rank in results:
        ovl = per_rank["dualpipev-ep2", "fp32"]["overlap"]
        chains = {c for pair in ovl["pairs"] for c in pair}
        launches = [n for k, n in ovl["log"] if k == "launch" and n.split(" ")[0] in chains]
        # per pair: 3 MoE layers, 2 in one pass and 1 in the other; 4 launches in forward (counts, rows, pairs,
        # combine), 3 in backward (combine-bwd, rows, pairs): 11 or 10
        assert len(launches) == 3 * 11 + 2 * 10, launches
        assert uncovered_launches(ovl["log"], ovl["pairs"]) == []
        seq = per_rank["dualpipev-ep2", "fp32"]["sequential"]  # F then B: every forward all-to-all uncovered
        forward = [n for k, n in seq["log"] if k == "launch" and n.split(" ")[0] in {f for f, _ in seq["pairs"]}]
        assert len(forward) >= 5 * 4 and uncovered_launches(seq["log"], seq["pairs"]) == forward


def test_sub_steps_are_timed_under_the_simulators_names(results):
    for per_rank in results:
        events = per_rank["dualpipev-ep2", "fp32"]["overlap"]["events"]
        names = {e.name for e in events}
        for e in events:
            op_class(e.name)  # raises on a name the analyser does not know
            assert e.end_s >= e.start_s >= 0, e
            comm = e.name.split(" ")[-1] in ("dispatch", "combine", "dispatch-bwd", "combine-bwd")
            assert e.lane == ("nvlink" if comm else "compute") or e.name.startswith("p2p"), e
        # stage 1 = layers 2, 3 (MoE) and the head; stage 0 = embedding, dense layer 0, MoE layer 1
        for op in ("attn", "dispatch", "shared", "experts", "combine"):
            assert f"1F1 L0 {op}" in names and f"0F2 L1 {op}" in names
        for op in ("combine-bwd", "experts-bwd", "dispatch-bwd", "shared-bwd", "attn-bwd"):
            assert f"0B1 L1 {op}" in names and f"1B1 L1 {op}" in names
        assert {"0F2 embed", "0F2 L0 mlp", "1F1 head", "0B1 L0 mlp-bwd", "1B1 head"} <= names
        assert not any("&" in n for n in names), "the action-level events give way to their sub-steps"
