"""Loopback expert parallelism on CPU (``model.runtime.loopback``): the steady-state chain of F&B pairs gives
the gradients of plain whole-graph passes, interleaved or not, and its window marks; the profiler-trace
reading (hidden fraction, window) on synthetic traces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from moeplan.model.losses import training_loss
from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.loopback import (
    MARK_KERNEL,
    exposure,
    hidden_fraction,
    loopback_spec,
    loopback_stage,
    pairs_window,
    run_pair,
    run_pairs,
)
from moeplan.model.runtime.overlap_comm import LoopbackComm, RecordingComm, Streams
from moeplan.simulator.presets.models import tiny_moe
from tests.model.runtime.test_overlap import uncovered_launches

CPU = torch.device("cpu")


# ---- the chain on CPU -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage():
    """tiny-moe (with a balance loss) as one loopback stage; the one-rank gloo world torn down after."""
    made = not dist.is_initialized()
    spec = loopback_spec(tiny_moe().model_copy(update={"aux_loss_alpha": 0.1}), small=True)
    model = loopback_stage(spec, torch.float32, CPU)
    yield model, spec
    if made:
        dist.destroy_process_group()


def _ids(spec, count: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, spec.vocab_size, (2, 16), generator=gen) for _ in range(count))


def _chain(model, ids, overlap: bool, pairs: int, comm=None, **marks) -> tuple[list, dict]:
    """(losses, gradients by name) of one chain, the model's gradients zeroed again."""
    run = run_pairs(model, ids, comm or LoopbackComm(3), Streams(CPU), Timeline(0, cuda=False), overlap, pairs,
                    **marks)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert run.planned_syncs == 0  # one rank: split sizes known on the host
    return list(run.losses), grads


@pytest.mark.parametrize("pairs", [1, 3])
def test_interleaved_chain_equals_f_then_b_and_whole_graph_passes(stage, pairs):
    model, spec = stage
    ids = _ids(spec, pairs + 1)
    interleaved = _chain(model, ids, True, pairs)
    sequential = _chain(model, ids, False, pairs)
    reference = []  # plain forward and backward per micro-batch, gradients accumulating
    for x in ids:
        loss = training_loss(model(x), torch.roll(x, -1, dims=1), 0.3).total / (pairs + 1)
        loss.backward()
        reference.append(loss.detach())
    ref_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert len(interleaved[0]) == pairs + 1 and ref_grads.keys() == interleaved[1].keys() == sequential[1].keys()
    for a, b, c in zip(interleaved[0], sequential[0], reference, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), (a, b, c)
    for name, ref in ref_grads.items():
        assert torch.equal(interleaved[1][name], sequential[1][name]), name
        # whole-graph passes sum embed_tokens' rows in another order (~1e-7 apart on CPU); the rest is exact
        tol = 1e-6 * ref.abs().max().item()
        torch.testing.assert_close(interleaved[1][name], ref, rtol=1e-6, atol=tol, msg=name)


def test_reusing_token_tensors_across_micro_batches_is_safe(stage):
    model, spec = stage
    a, b = _ids(spec, 2)
    (losses, grads), (losses_copied, grads_copied) = (_chain(model, ids, True, 3)
                                                      for ids in ((a, b), (a, b, a.clone(), b.clone())))
    assert all(torch.equal(x, y) for x, y in zip(losses, losses_copied, strict=True))
    assert grads.keys() == grads_copied.keys() and all(torch.equal(grads[n], grads_copied[n]) for n in grads)


def test_marks_bracket_exactly_the_pairs_and_each_pair_overlaps(stage):
    model, spec = stage
    comm, pairs = RecordingComm(LoopbackComm()), 3
    _chain(model, _ids(spec, 2), True, pairs, comm, before_pairs=lambda: comm.log.append(("mark", "before")),
           after_pairs=lambda: comm.log.append(("mark", "after")))
    log = comm.log
    before, after = log.index(("mark", "before")), log.index(("mark", "after"))
    chains = [{n.split(" ")[0] for k, n in part if k != "mark"} for part in (log[:before], log[before:after],
                                                                              log[after:])]
    assert chains == [{"0F0"}, {f"0{k}{m}" for m in range(pairs) for k in "BF"} - {"0F0"} | {f"0F{pairs}"},
                      {f"0B{pairs}"}]
    assert uncovered_launches(log[before:after], [(f"0B{m}", f"0F{m + 1}") for m in range(pairs)]) == []


def test_run_pair_is_one_pair_without_the_trailing_backward(stage):
    model, spec = stage
    comm = RecordingComm(LoopbackComm())
    run = run_pair(model, _ids(spec, 2), comm, Streams(CPU), Timeline(0, cuda=False), False)
    model.zero_grad(set_to_none=True)
    assert len(run.losses) == 2 and run.planned_syncs == 0
    assert {n.split(" ")[0] for _, n in comm.log} == {"0F0", "0B0", "0F1"}


# ---- reading a profiler trace ----------------------------------------------------------------------------

def _event(stream: int, ts: float, dur: float, name: str = "gemm", cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


C, X = 7, 20  # compute stream (the most kernels), communication stream


def test_hidden_fraction_of_a_synthetic_trace():
    trace = {"traceEvents": [
        _event(C, 0, 10), _event(C, 10, 10), _event(C, 30, 10),
        _event(X, 5, 10, "Memcpy DtoD", "gpu_memcpy"),  # 10 us, all under compute
        _event(X, 15, 10, "Memcpy DtoD", "gpu_memcpy"),  # merges with the one above: 15..25, 5 under compute
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100, "args": {}},  # not GPU activity
    ]}
    hidden, comm_us, compute_us = hidden_fraction(trace)
    assert (comm_us, compute_us) == (20, 30) and hidden == pytest.approx(15 / 20)
    assert math.isnan(hidden_fraction({"traceEvents": [_event(C, 0, 5)]})[0])


def test_the_window_clips_intervals_and_drops_the_marks():
    marks = [_event(C, 8, 1, f"void at::cuda::(anonymous namespace)::{MARK_KERNEL}(long)"),
             _event(C, 42, 1, f"{MARK_KERNEL}(long)")]
    trace = {"traceEvents": [
        _event(X, 0, 6, cat="gpu_memcpy"),  # before the window: the first pair's edge is not counted
        *marks,
        _event(C, 9, 20), _event(X, 20, 15, cat="gpu_memcpy"),  # 20..35, 9 us under compute
        _event(C, 40, 10), _event(X, 38, 10, cat="gpu_memcpy"),  # clipped at 42: 38..42, 2 us under compute
    ]}
    window = pairs_window(trace)
    assert window == (9, 42)
    hidden, comm_us, compute_us = hidden_fraction(trace, window)
    assert (comm_us, compute_us) == (19, 22) and hidden == pytest.approx(11 / 19)
    assert hidden_fraction(trace)[1] == 6 + 15 + 10  # no window: everything, marks never count
    with pytest.raises(ValueError, match="needs 2"):
        pairs_window({"traceEvents": marks[:1]})


def test_exposure_tells_a_wait_for_a_copy_from_a_late_host():
    trace = {"traceEvents": [
        _event(C, 0, 10), _event(C, 30, 10), _event(C, 100, 10),
        _event(X, 5, 23, "Memcpy DtoD", "gpu_memcpy"),  # 10..28 exposed; compute resumes 2 us after: waited
        _event(X, 45, 5, "Memcpy DtoD", "gpu_memcpy"),  # 45..50 in a gap ending 50 us later: the host was late
        _event(X, 105, 10, "Memcpy DtoD", "gpu_memcpy"),  # 110..115 exposed after the last kernel: not a wait
    ]}
    got = exposure(trace)
    assert got == {"waited": 18, "host": 5 + 5, "waits": 1, "gaps": 2}
    hidden, comm_us, _ = hidden_fraction(trace)
    assert comm_us - hidden * comm_us == pytest.approx(got["waited"] + got["host"])
    assert exposure(trace, (0, 60)) == {"waited": 18, "host": 5, "waits": 1, "gaps": 1}
    assert exposure({"traceEvents": [_event(C, 0, 5)]}) == {"waited": 0.0, "host": 0.0, "waits": 0, "gaps": 0}


def test_a_copy_on_few_sms_takes_whole_words_and_refuses_no_sms():
    """``LoopbackComm(sms=...)``: contiguous tensors of whole 4-byte words go to ``copy_loop`` as fp32 views of
    the same bytes; anything else (odd bytes, strided) falls back to torch's copy; no SMs is an error."""
    from moeplan.model.runtime.overlap_comm import _fp32_words

    a = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    words = _fp32_words(a, torch.empty_like(a))
    assert words is not None and words[0].dtype == torch.float32 and words[0].numel() == 6
    assert words[0].data_ptr() == a.data_ptr()
    assert _fp32_words(torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8)) is None
    assert _fp32_words(a.t(), torch.empty_like(a.t())) is None
    with pytest.raises(ValueError, match="sms=0"):
        LoopbackComm(2, sms=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (4096, 7168)), (torch.float8_e4m3fn, (1000, 7168)),
                                         (torch.uint8, (5, 3))])
def test_a_copy_on_few_sms_moves_every_byte(dtype, shape):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    src = torch.randint(0, 255, shape, dtype=torch.uint8, device="cuda").view(dtype)
    out = torch.zeros_like(src)
    LoopbackComm(3, sms=4).all_to_all(out, src, None, None, None, "dispatch")
    assert torch.equal(out.view(torch.uint8), src.view(torch.uint8))
