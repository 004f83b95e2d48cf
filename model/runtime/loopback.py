"""One-GPU loopback expert parallelism: measure the overlapped F&B without a peer.

Every MoE layer of a stage becomes an ``ExpertParallelMoE`` over a one-rank group (all experts local) and
its all-to-alls go through ``overlap_comm.LoopbackComm``: a device copy of the same bytes on the
communication stream, repeated ``repeat`` times to stand for a link that much slower than a device copy.
``run_pairs`` issues DualPipe's steady state on one stage: the forward of micro-batch 0, then ``pairs`` F&B
pairs back to back (pair k: the backward of micro-batch k beside the forward of k + 1, interleaved or as F
then B) with no host sync between them, then the last micro-batch's backward; ``run_pair`` is one pair
alone. ``hidden_fraction`` reads a ``torch.profiler`` Chrome trace: |comm ∩ compute| / |comm|, comm = GPU
activity on any stream but the compute stream (the one with the most kernels), compute = the compute
stream's, optionally clipped to the window between two ``mark_window`` kernels (``pairs_window``). Used by
``tests/model/runtime/test_overlap_gpu.py`` and ``benchmarks/overlap_bench.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moeplan.model.losses import training_loss
from moeplan.model.options import ModelOptions
from moeplan.model.runtime.expert_parallel import ExpertParallelMoE
from moeplan.model.runtime.overlap import Pass, drain, interleave, stage_backward, stage_forward
from moeplan.model.runtime.overlap_comm import LoopbackComm, Streams
from moeplan.model.transformer import Transformer
from moeplan.simulator.spec.model import ModelSpec


def loopback_spec(spec: ModelSpec, small: bool, shape: str = "1k") -> ModelSpec:
    """``spec`` (tiny-moe, for smoke runs) as is when ``small``; else, ``shape="1k"``: widened into a toy of
    V3's structure (its MLA, dense first layer, grouped routing): d=1024, 16 experts top-4, no MTP;
    ``shape="v3"``: ``spec`` is DeepSeek-V3 (the caller's preset), cut to three of its own layers (d=7168, MLA
    with 128 heads, one dense), 8 of 16 experts in 8 groups (4 kept), a small vocabulary, no MTP: enough work
    per layer that the GPU, not the host's kernel launches, sets the pace."""
    if small:
        return spec
    if shape == "v3":
        return spec.model_copy(update={
            "name": "loopback-v3", "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 16,
            "vocab_size": 8192, "num_nextn_predict_layers": 0})
    if shape != "1k":
        raise ValueError(f"shape={shape!r} must be '1k' or 'v3'")
    return spec.model_copy(update={
        "name": "loopback-1k", "hidden_size": 1024, "intermediate_size": 4096, "moe_intermediate_size": 512,
        "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 384, "kv_lora_rank": 256,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "vocab_size": 8192,
        "num_nextn_predict_layers": 0})


def single_process_group() -> dist.ProcessGroup:
    """The world group, made here (gloo, one rank, in-memory store) if none exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1, f"loopback runs on one process, the world has {dist.get_world_size()}"
    return dist.group.WORLD


def loopback_stage(spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """The whole model ``spec`` as one stage, MoE layers expert-parallel over a one-rank group."""
    group = single_process_group()
    with torch.device(device):
        model = Transformer(spec, ModelOptions(dtype=dtype))
    model.init_weights_by_name(seed)
    for block in list(model.layers.values()) + list(getattr(model, "mtp", [])):
        if hasattr(block.mlp, "gate"):
            block.mlp = ExpertParallelMoE.from_moe(block.mlp, group)
    return model.train()


@dataclass
class PairRun:
    """What ``run_pairs`` gives: each micro-batch's scaled loss, in order, and the host syncs the pairs took
    for split sizes (between ``before_pairs`` and ``after_pairs``)."""

    losses: tuple[torch.Tensor, ...]
    planned_syncs: int


def _micro_batch_loss(ids: torch.Tensor, scale: float):
    """The head's output -> the scaled loss of micro-batch ``ids`` (B, T), its own labels shifted by one."""
    labels = torch.roll(ids, -1, dims=1)
    return lambda out: training_loss(out, labels, 0.3).total * scale


def run_pairs(model: Transformer, ids: Sequence[torch.Tensor], comm: LoopbackComm, streams: Streams,
              timeline: object, overlap: bool, pairs: int, before_pairs=None, after_pairs=None,
              finish: bool = True) -> PairRun:
    """Forward of micro-batch 0; then ``pairs`` F&B pairs, pair k = the backward of micro-batch k with the
    forward of k + 1 (interleaved when ``overlap``, else F then B), issued back to back with no host sync
    between them, so on the GPU each pair's edges run beside its neighbours' compute; then (``finish``)
    micro-batch ``pairs``'s backward. Each loss is scaled by 1 / (pairs + 1); gradients accumulate in
    ``.grad`` micro-batch by micro-batch, in the same order in both modes.

    ``before_pairs()`` runs right before the first pair is issued and ``after_pairs()`` right after the last
    one (before the trailing backward): a timer or profiler marker there covers exactly the steady state.
    ``ids``: (B, T) token id tensors, micro-batch m takes ``ids[m % len(ids)]``. Reusing a tensor across
    micro-batches is safe: token ids carry no autograd state, nothing writes to them, and each micro-batch
    makes its own labels (``torch.roll`` copies)."""
    assert pairs >= 1, f"{pairs=} must be at least 1"
    scale = 1.0 / (pairs + 1)

    def forward(m):
        x = ids[m % len(ids)]
        return stage_forward(model, x, x, _micro_batch_loss(x, scale), Pass(comm, streams, timeline, f"0F{m}"))

    def backward(tape, m):
        return stage_backward(tape, None, Pass(comm, streams, timeline, f"0B{m}"))

    tape = drain(forward(0))
    losses = [tape.output.value]
    if before_pairs is not None:
        before_pairs()
    syncs = streams.planned_syncs
    for m in range(pairs):
        if overlap:
            _, nxt = interleave(backward(tape, m), forward(m + 1))
        else:
            nxt = drain(forward(m + 1))
            drain(backward(tape, m))
        tape = nxt
        losses.append(tape.output.value)
    planned = streams.planned_syncs - syncs
    if after_pairs is not None:
        after_pairs()
    if finish:
        drain(backward(tape, pairs))
    return PairRun(tuple(losses), planned)


def run_pair(model: Transformer, ids: tuple[torch.Tensor, torch.Tensor], comm: LoopbackComm, streams: Streams,
             timeline: object, overlap: bool, before_pair=None) -> PairRun:
    """One pair alone: forward of micro-batch 0, then its backward with the forward of micro-batch 1
    (``run_pairs`` with ``pairs=1`` and no trailing backward); ``before_pair()`` runs just before the pair
    (a profiler or sync-debug switch). ``ids``: two (B, T) token id tensors."""
    return run_pairs(model, ids, comm, streams, timeline, overlap, 1, before_pair, finish=False)


# ---- the profiler trace -----------------------------------------------------------------------------------

MARK_KERNEL = "spin_kernel"  # torch.cuda._sleep's kernel (ATen's cuda/Sleep.cu); the model never launches it
_MARK_CYCLES = 1000  # about 0.5 us at 2 GHz


def mark_window() -> None:
    """A window mark: one tiny ``MARK_KERNEL`` on the current (compute) stream. Called as ``before_pairs`` and
    ``after_pairs`` under a profiler that covers the whole chain, it brackets the steady state in GPU time
    with no host sync: the first mark runs when the compute stream has finished micro-batch 0's forward
    (whose last node waited for all its all-to-alls), the second when it has finished the last pair, and
    every all-to-all of a pair is waited for by a compute node of that pair, so nothing of the pairs runs
    outside the marks and nothing else inside them. (Starting and stopping the profiler there instead
    would cut off the kernels still queued when ``after_pairs`` runs, or need a host sync.)"""
    torch.cuda._sleep(_MARK_CYCLES)


def _gpu_events(trace: Mapping[str, Any]) -> list[dict]:
    """Kernels, device copies and memsets with a stream (``torch.profiler`` Chrome trace, times in us)."""
    return [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
            and e.get("ph") == "X" and "stream" in e.get("args", {})]


def pairs_window(trace: Mapping[str, Any]) -> tuple[float, float]:
    """(start us, end us) between the two ``mark_window`` kernels of a trace: the end of the first, the start
    of the second. Raises ``ValueError`` unless there are exactly two."""
    marks = sorted((e["ts"], e["ts"] + e["dur"]) for e in _gpu_events(trace) if MARK_KERNEL in e.get("name", ""))
    if len(marks) != 2:
        raise ValueError(f"a pairs window needs 2 {MARK_KERNEL} marks, the trace has {len(marks)}")
    return marks[0][1], marks[1][0]


def _comm_and_compute(trace: Mapping[str, Any], window: tuple[float, float] | None
                      ) -> tuple[list[tuple[float, float]], list[tuple[float, float]]] | None:
    """(communication, compute) busy intervals (us, merged) of a trace's GPU activity clipped to ``window``, the
    compute stream being the one with the most kernels and every other stream communication; ``mark_window``
    kernels left out. None when no kernel ran."""
    lo, hi = window if window is not None else (-math.inf, math.inf)
    gpu = []
    for e in _gpu_events(trace):
        start, end = max(e["ts"], lo), min(e["ts"] + e["dur"], hi)
        if end > start and MARK_KERNEL not in e.get("name", ""):
            gpu.append((e["args"]["stream"], e["cat"], start, end))
    per_stream: dict[int, int] = {}
    for stream, cat, _, _ in gpu:
        if cat == "kernel":
            per_stream[stream] = per_stream.get(stream, 0) + 1
    if not per_stream:
        return None
    compute_stream = max(per_stream, key=per_stream.get)
    return (_union((a, b) for stream, _, a, b in gpu if stream != compute_stream),
            _union((a, b) for stream, _, a, b in gpu if stream == compute_stream))


# A compute kernel that waited for an all-to-all starts this soon after the copy's end: the event's signal plus the
# kernel's launch latency on the GPU, a few microseconds (an H100 trace of 2026-12-06: 2-8 us). A longer gap ends
# because the host issued the next kernel late.
WAITED_US = 20.0


def exposure(trace: Mapping[str, Any], window: tuple[float, float] | None = None) -> dict[str, float]:
    """Where a trace's exposed communication (comm busy while the compute stream is idle, ``hidden_fraction``'s
    complement, us) sat: ``waited``, in compute-stream gaps that end within ``WAITED_US`` of a copy's end (the
    compute waited for that all-to-all: the order of issue or the copy's length exposed it), or ``host``, in gaps
    that end otherwise (the compute stream had nothing to run: the host issued late), with ``gaps`` and
    ``waits``, the counts of each kind of gap holding exposed communication."""
    lo, hi = window if window is not None else (-math.inf, math.inf)
    out = {"waited": 0.0, "host": 0.0, "waits": 0, "gaps": 0}
    busy = _comm_and_compute(trace, window)
    if busy is None:
        return out
    comm, compute = busy
    edges = [min(lo, comm[0][0]) if comm else lo, *(t for span in compute for t in span), max(hi, comm[-1][1]) if comm
             else hi]
    for g0, g1 in zip(edges[::2], edges[1::2]):  # the compute stream's idle gaps, window edges included
        exposed = _intersection(comm, [(g0, g1)]) if g1 > g0 else 0.0
        if exposed <= 0:
            continue
        waited = any(g1 - WAITED_US <= b <= g1 for _, b in comm) and g1 < hi
        out["waited" if waited else "host"] += exposed
        out["waits" if waited else "gaps"] += 1
    return out


def _union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += min(end, b[k][1]) - max(start, b[k][0])
            k += 1
    return total


def hidden_fraction(trace: Mapping[str, Any], window: tuple[float, float] | None = None
                    ) -> tuple[float, float, float]:
    """(hidden fraction, comm busy us, compute busy us) of a ``torch.profiler`` Chrome trace's GPU activity
    (``cat`` kernel, gpu_memcpy, gpu_memset, with ``args.stream``), each interval clipped to ``window``
    (start us, end us; ``pairs_window``) when given; ``mark_window`` kernels do not count. NaN fraction when
    nothing communicates."""
    busy = _comm_and_compute(trace, window)
    if busy is None:
        return float("nan"), 0.0, 0.0
    comm, compute = busy
    comm_us = sum(b - a for a, b in comm)
    compute_us = sum(b - a for a, b in compute)
    return (_intersection(comm, compute) / comm_us if comm_us else float("nan")), comm_us, compute_us
