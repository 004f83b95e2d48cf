"""One-GPU loopback expert parallelism: measure the overlapped F&B without a peer.

Every MoE layer of a stage becomes an ``ExpertParallelMoE`` over a one-rank group (all experts local) and
its all-to-alls go through ``overlap_comm.LoopbackComm``: a device copy of the same bytes on the
communication stream, repeated ``repeat`` times to stand for a link that much slower than a device copy.
``run_pair`` then issues one F&B pair (the backward of micro-batch 0 beside the forward of micro-batch 1),
interleaved or as F then B; ``hidden_fraction`` reads a ``torch.profiler`` Chrome trace of it:
|comm ∩ compute| / |comm|, comm = GPU activity on any stream but the compute stream (the one with the most
kernels), compute = the compute stream's. Used by ``tests/model/runtime/test_overlap_gpu.py`` and
``benchmarks/overlap_bench.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    """What ``run_pair`` gives: the pair's losses (micro-batch 0's backward, 1's forward) and the host
    syncs it took for split sizes."""

    losses: tuple[torch.Tensor, torch.Tensor]
    planned_syncs: int


def run_pair(model: Transformer, ids: tuple[torch.Tensor, torch.Tensor], comm: LoopbackComm, streams: Streams,
             timeline: object, overlap: bool, before_pair=None) -> PairRun:
    """Forward of micro-batch 0, then the pair: its backward with the forward of micro-batch 1 (interleaved
    when ``overlap``, else F then B); ``before_pair()`` runs just before the pair (a profiler or sync-debug
    switch). ``ids``: two (B, T) token id tensors, each its own labels shifted by one."""
    def loss_of(m):
        labels = torch.roll(ids[m], -1, dims=1)
        return lambda out: training_loss(out, labels, 0.3).total / 2

    def chain(name):
        return Pass(comm, streams, timeline, name)

    tape0 = drain(stage_forward(model, ids[0], ids[0], loss_of(0), chain("0F0")))
    if before_pair is not None:
        before_pair()
    syncs = streams.planned_syncs
    backward = stage_backward(tape0, None, chain("0B0"))
    forward = stage_forward(model, ids[1], ids[1], loss_of(1), chain("0F1"))
    if overlap:
        _, tape1 = interleave(backward, forward)
    else:
        drain(forward)
        tape1 = None
        drain(backward)
    return PairRun((tape0.output.value, tape1.output.value if tape1 else torch.zeros(())),
                   streams.planned_syncs - syncs)


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


def hidden_fraction(trace: Mapping[str, Any]) -> tuple[float, float, float]:
    """(hidden fraction, comm busy us, compute busy us) of a ``torch.profiler`` Chrome trace's GPU activity
    (``cat`` kernel, gpu_memcpy, gpu_memset, with ``args.stream``); NaN fraction when nothing communicates."""
    gpu = [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
           and e.get("ph") == "X" and "stream" in e.get("args", {})]
    per_stream: dict[int, int] = {}
    for e in gpu:
        if e["cat"] == "kernel":
            per_stream[e["args"]["stream"]] = per_stream.get(e["args"]["stream"], 0) + 1
    if not per_stream:
        return float("nan"), 0.0, 0.0
    compute_stream = max(per_stream, key=per_stream.get)
    comm = _union((e["ts"], e["ts"] + e["dur"]) for e in gpu if e["args"]["stream"] != compute_stream)
    compute = _union((e["ts"], e["ts"] + e["dur"]) for e in gpu if e["args"]["stream"] == compute_stream)
    comm_us = sum(b - a for a, b in comm)
    compute_us = sum(b - a for a, b in compute)
    return (_intersection(comm, compute) / comm_us if comm_us else float("nan")), comm_us, compute_us
