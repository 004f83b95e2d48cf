"""One memory-bound kernel class timed at a shape: ideal bytes, median seconds, bytes/s and fraction of a bandwidth.

A class's bytes are its *ideal* bytes as the simulator counts them (``simulator.costs.elementwise``:
``layer_bytes_per_token`` / ``end_bytes_per_token`` times the tokens; a once-a-step kernel's, its case's
``step_bytes``), so ``hbm_frac`` = bytes / seconds /
the bandwidth given is the number ``CostTables.memory_fracs`` prices the class at. The cases are
``memory_cases.CASES``; Triton cases are skipped, with the reason, where no CUDA GPU runs them.
Used by ``moeplan calibrate`` and ``benchmarks/elementwise_bench.py``.
"""

from __future__ import annotations

import torch

from moeplan.kernels.triton_compat import HAVE_TRITON
from moeplan.orchestrator.calibration.memory_cases import Case
from moeplan.orchestrator.calibration.timing import median_s
from moeplan.simulator.costs.elementwise import FUSED_LOSS, KernelBytes, end_bytes_per_token, layer_bytes_per_token
from moeplan.simulator.spec.model import ModelSpec


def class_bytes(spec: ModelSpec) -> dict[str, KernelBytes]:
    """Ideal bytes per token of every class, an FP8 MoE layer with uniform routing (k rows per token); the fused
    loss has the cross-entropy's one-pass bytes, MLA's fused RoPE its assembly's too, the fused router the
    router's (the simulator prices them so)."""
    ends, k = end_bytes_per_token(spec), spec.num_experts_per_tok
    fused_layer = layer_bytes_per_token(spec, True, "fp8", k, "fused")
    fused = {"fused_fp8_cast": fused_layer["fp8_cast"], "fused_router": fused_layer["router"]} | (
        {"fused_rope": fused_layer["rope"]} if spec.is_mla else {})
    return layer_bytes_per_token(spec, True, "fp8", k) | ends | {FUSED_LOSS: ends["cross_entropy"]} | fused


def _pass(nbytes: float, seconds: float, hbm_bytes_per_s: float) -> dict:
    rate = nbytes / seconds
    return {"bytes": nbytes, "s": seconds, "bytes_per_s": rate, "hbm_frac": rate / hbm_bytes_per_s}


def measure(case: Case, spec: ModelSpec, tokens: int, device: torch.device, reps: int, hbm_bytes_per_s: float) -> dict:
    """One case's entry: ideal bytes, median seconds, bytes/s and HBM fraction, forward and backward."""
    entry = {"kernel": case.kernel, "implementation": case.implementation, "in_table": case.in_table,
             "shape": case.shape(spec, tokens), "fwd": None, "bwd": None, "skipped": None}
    if case.needs_triton and (device.type != "cuda" or not HAVE_TRITON):
        entry["skipped"] = f"Triton kernel: needs a CUDA GPU and the triton package (device {device.type})"
        return entry
    nbytes = case_bytes(case, spec, tokens)
    fwd, bwd = case.build(spec, tokens, device)
    if fwd is not None and nbytes.fwd_bytes > 0:
        entry["fwd"] = _pass(nbytes.fwd_bytes, median_s(fwd, device, reps), hbm_bytes_per_s)
    if bwd is not None and nbytes.bwd_bytes > 0:
        entry["bwd"] = _pass(nbytes.bwd_bytes, median_s(bwd, device, reps), hbm_bytes_per_s)
    return entry


def case_bytes(case: Case, spec: ModelSpec, tokens: int) -> KernelBytes:
    """A case's ideal bytes at ``tokens``: its class's per token times the tokens, or its ``step_bytes``."""
    if case.step_bytes is not None:
        return case.step_bytes(spec)
    per_token = class_bytes(spec)[case.kernel]
    return KernelBytes(per_token.fwd_bytes * tokens, per_token.bwd_bytes * tokens)
