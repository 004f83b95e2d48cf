"""One memory-bound kernel class timed at a shape: ideal bytes, median seconds, bytes/s and fraction of a bandwidth.

A class's bytes are its *ideal* bytes as the simulator counts them (``simulator.costs.elementwise``:
``layer_bytes_per_token`` / ``end_bytes_per_token`` times the tokens; a once-a-step kernel's, its case's
``step_bytes``), so ``hbm_frac`` = bytes / seconds /
the bandwidth given is the number ``CostTables.memory_fracs`` prices the class at. The cases are
``memory_cases.CASES``; Triton cases are skipped, with the reason, where no CUDA GPU runs them.
Used by ``moeplan calibrate`` and ``benchmarks/elementwise_bench.py``.

A per-token case is timed at two sizes, its tokens and ``1 / FIT_DIVISOR`` of them (``fit_pass``): the line
through the two points splits a call into fixed seconds (the intercept) and bytes at a fraction of the
bandwidth (``simulator.costs.memory_kernels`` module docstring); then ``hbm_frac`` is that fraction, which with
``fixed_s`` gives back the main point's seconds, and ``bytes_per_s`` stays the main point's bytes over seconds.
A once-a-step case (``step_bytes``) keeps one size: ``hbm_frac`` = bytes / seconds / the bandwidth.

A case on the experts' contiguous layout (``Case.padded``: the experts' casts, the permutation) counts the rows
its kernels move, each expert's segment padded to 128 (``case_padded_rows``), as the engine prices them: a V3
layer's 256 experts at 4096 tokens pad 1.48x, at 1024 tokens 4x. Until 2026-12-07 both sizes counted the routed
rows only, so the fit saw the second size cost nearly what the first did and clamped the fixed seconds.
"""

from __future__ import annotations

import torch

from moeplan.kernels.triton_compat import HAVE_TRITON
from moeplan.orchestrator.calibration.memory_cases import Case
from moeplan.orchestrator.calibration.timing import median_s
from moeplan.simulator.costs.elementwise import (
    EAGER_CLASSES,
    FUSED_LOSS,
    KernelBytes,
    end_bytes_per_token,
    layer_bytes_per_token,
)
from moeplan.simulator.engine.expert_traffic import padded_rows
from moeplan.simulator.spec.model import ModelSpec


def class_bytes(spec: ModelSpec, padded_rows_per_token: float | None = None) -> dict[str, KernelBytes]:
    """Ideal bytes per token of every class, an FP8 MoE layer with uniform routing (k rows per token; the
    contiguous layout's kernels over ``padded_rows_per_token``, as ``layer_bytes_per_token`` takes it); the fused
    loss has the cross-entropy's one-pass bytes, MLA's fused RoPE its assembly's too, the fused router the
    router's (the simulator prices them so)."""
    ends, k = end_bytes_per_token(spec), spec.num_experts_per_tok
    fused_layer = layer_bytes_per_token(spec, True, "fp8", k, "fused")
    # MLA's fused RoPE is timed as the BF16 runtime runs it, its backward the whole glue (under an FP8 backward the
    # casts do most of it and the class prices the shared key's gradient alone, at the fraction measured here)
    fused_rope = layer_bytes_per_token(spec, True, "bf16", k, "fused")["rope"]
    fused = {"fused_fp8_cast": fused_layer["fp8_cast"], "fused_router": fused_layer["router"]} | (
        {"fused_rope": fused_rope} if spec.is_mla else {})
    layer = layer_bytes_per_token(spec, True, "fp8", k, padded_rows_per_token=padded_rows_per_token)
    eager = {cls: layer[kernel] for kernel, cls in EAGER_CLASSES.items() if kernel in layer}  # the same bytes
    return layer | ends | {FUSED_LOSS: ends["cross_entropy"]} | fused | eager


def case_padded_rows(spec: ModelSpec, tokens: int) -> float:
    """Routed rows per token of a case on the contiguous layout (``Case.padded``): uniform routing of ``tokens``
    over all the experts, each segment padded (``expert_traffic.padded_rows``), the expectation of what
    ``kernels.moe_permute.make_dispatch_plan`` lays out."""
    experts = spec.n_routed_experts
    return experts * padded_rows(tokens * spec.num_experts_per_tok / experts) / tokens


FIT_DIVISOR = 4  # a per-token case's second size: its tokens / FIT_DIVISOR (at least 1 token)


def fit_pass(nbytes: float, seconds: float, hbm_bytes_per_s: float, small: tuple[float, float] | None = None) -> dict:
    """A pass's entry from its main point (``nbytes`` in ``seconds``) and, where given, a ``small`` (bytes,
    seconds) point of fewer bytes. With ``small``: the line through both points; ``fixed_s`` is its intercept
    clamped to [0, seconds - nbytes / bandwidth] (so the fraction is at most 1 where the main point is below the
    datasheet; ``fixed_clamped`` says when it was), and ``hbm_frac`` = nbytes / (bandwidth x (seconds -
    fixed_s)), so fixed_s + nbytes / (bandwidth x hbm_frac) = seconds. Without: no fixed term, ``hbm_frac`` =
    nbytes / seconds / bandwidth."""
    entry = {"bytes": nbytes, "s": seconds, "bytes_per_s": nbytes / seconds, "hbm_frac": nbytes / seconds / hbm_bytes_per_s,
             "small_bytes": None, "small_s": None, "intercept_s": None, "fixed_s": None, "fixed_clamped": None}
    if small is None:
        return entry
    small_bytes, small_s = small
    assert 0 < small_bytes < nbytes, f"{small_bytes=} {nbytes=}: the second point has fewer bytes"
    intercept_s = seconds - (seconds - small_s) / (nbytes - small_bytes) * nbytes
    at_datasheet_s = seconds - nbytes / hbm_bytes_per_s  # the most fixed seconds that leave the fraction at most 1
    fixed_s = max(0.0, min(intercept_s, at_datasheet_s))
    frac = 1.0 if 0.0 < fixed_s == at_datasheet_s else nbytes / (hbm_bytes_per_s * (seconds - fixed_s))  # no round-off
    return entry | {"small_bytes": small_bytes, "small_s": small_s, "intercept_s": intercept_s, "fixed_s": fixed_s,
                    "fixed_clamped": fixed_s != intercept_s, "hbm_frac": frac}


def fit_tokens(case: Case, tokens: int) -> int | None:
    """The tokens of a case's second size; None where it keeps one (a once-a-step case, or too few tokens)."""
    small = tokens // FIT_DIVISOR
    return None if case.step_bytes is not None or small < 1 else small


def _points(case: Case, spec: ModelSpec, tokens: int, device: torch.device,
            reps: int) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """(forward, backward) (ideal bytes, median seconds) of a case at ``tokens``; None for a pass without bytes or
    thunk."""
    nbytes = case_bytes(case, spec, tokens)
    fwd, bwd = case.build(spec, tokens, device)
    return ((nbytes.fwd_bytes, median_s(fwd, device, reps)) if fwd is not None and nbytes.fwd_bytes > 0 else None,
            (nbytes.bwd_bytes, median_s(bwd, device, reps)) if bwd is not None and nbytes.bwd_bytes > 0 else None)


def measure(case: Case, spec: ModelSpec, tokens: int, device: torch.device, reps: int, hbm_bytes_per_s: float) -> dict:
    """One case's entry: per pass, ideal bytes, median seconds, bytes/s, and the HBM fraction with the fixed
    seconds fitted over a second size of ``small_tokens`` (``fit_tokens``, ``fit_pass``), forward and backward."""
    entry = {"kernel": case.kernel, "implementation": case.implementation, "in_table": case.in_table,
             "shape": case.shape(spec, tokens), "small_tokens": None, "fwd": None, "bwd": None, "skipped": None}
    if case.needs_triton and (device.type != "cuda" or not HAVE_TRITON):
        entry["skipped"] = f"Triton kernel: needs a CUDA GPU and the triton package (device {device.type})"
        return entry
    main = _points(case, spec, tokens, device, reps)
    small_tokens = fit_tokens(case, tokens)
    small = _points(case, spec, small_tokens, device, reps) if small_tokens else (None, None)
    return entry | {"small_tokens": small_tokens} | {
        key: fit_pass(*point, hbm_bytes_per_s, second) if point else None
        for key, point, second in zip(("fwd", "bwd"), main, small)}


def case_bytes(case: Case, spec: ModelSpec, tokens: int) -> KernelBytes:
    """A case's ideal bytes at ``tokens``: its class's per token times the tokens, or its ``step_bytes``."""
    if case.step_bytes is not None:
        return case.step_bytes(spec)
    per_token = class_bytes(spec, case_padded_rows(spec, tokens) if case.padded else None)[case.kernel]
    return KernelBytes(per_token.fwd_bytes * tokens, per_token.bwd_bytes * tokens)
