"""The model's memory-bound pieces as pure functions, run eagerly or compiled into fused kernels.

Each function below is the eager code its module used to inline; a module whose ``fuse`` flag is set
(``ModelOptions.fuse_memory_bound``, applied by ``fuse_memory_bound``) calls it through ``torch.compile``
on CUDA, so Inductor generates one Triton kernel per function and one for its backward instead of the
eager chain of casts, reductions and elementwise ops (RMSNorm's seven, RoPE's split/stack/cat and
their backwards; the router's sigmoid, bias add, group scores, masks, gather and normalisation around its
top-k selections, which Inductor leaves as library calls). The compiled code computes the same expression
(FP32 statistics, the same casts); it may round differently in the last bit where Inductor keeps an
intermediate in FP32, so equivalence tests against Hugging Face run on the eager path. On CPU the flag is ignored: the eager functions run.

Shapes are static per run (one micro-batch size, one sequence length), so each function compiles once
per distinct shape (``dynamic=False``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps): statistics in FP32, the scale applied in the input dtype (as HF)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's checkpoints expect.

    x: (B, T, H, R); cos/sin: (T, R/2). Output keeps the interleaved layout.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, R/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)  # (B, T, H, R/2, 2)
    return rotated.flatten(-2).to(x.dtype)


def mla_query(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """q (B, T, H, nope + rope) -> the same with RoPE applied to its last ``rope`` channels."""
    q_nope, q_rope = q.split([nope_dim, q.shape[-1] - nope_dim], dim=-1)
    return torch.cat((q_nope, apply_rotary(q_rope, cos, sin)), dim=-1)


def mla_key(k_nope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """k_nope (B, T, H, nope) and the one shared RoPE key k_rope (B, T, R) -> keys (B, T, H, nope + R)."""
    k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin)  # (B, T, 1, R): one key shared by all heads
    return torch.cat((k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)), dim=-1)


def mla_key_value(kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  nope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv (B, T, H, nope + v) from the KV up-projection and the one shared RoPE key k_rope (B, T, R) -> keys
    (B, T, H, nope + R) and values (B, T, H, v), the values a copy: compiled, the KV split's backward (the keys'
    and values' gradients put back into kv's) is then part of this function's kernel, where the split outside it
    ran as a separate concatenation (``CatArrayBatchedCopy``, 0.6 ms a 4096-token layer at ~27% of the H100's
    HBM in benchmarks/model_step.py's traces, 2026-12-06). A view of kv would be regenerated outside the graph,
    its gradient with it."""
    k_nope, v = kv.split([nope_dim, kv.shape[-1] - nope_dim], dim=-1)
    return mla_key(k_nope, k_rope, cos, sin), v.contiguous()


def mla_key_rope_backward(dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """The keys' gradient dk (B, T, H, nope + R) -> the one shared RoPE key's (B, T, R): ``mla_key``'s backward for
    k_rope, as autograd computes it (the H heads' gradients summed in dk's dtype, then RoPE's backward: the rotation
    by -sin, in FP32)."""
    summed = dk[..., nope_dim:].sum(2, keepdim=True)  # (B, T, 1, R): the broadcast's backward
    return apply_rotary(summed, cos, -sin).squeeze(2)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020)."""
    return F.silu(gate) * up


def route(logits: torch.Tensor, bias: torch.Tensor | None, *, scoring_func: str, topk_method: str, n_group: int,
          topk_group: int, top_k: int, norm_topk_prob: bool, route_scale: float,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``model.gate.Gate``'s selection from the FP32 logits (N, E): (weights (N, k), indices (N, k), scores (N, E)).

    Scores are the sigmoid (or softmax) of the logits; the selection uses them plus ``bias`` (None: none),
    limited to the ``topk_group`` best groups where ``topk_method`` is not "greedy"; the weights gather the
    unbiased scores, normalised if ``norm_topk_prob``, times ``route_scale`` (``model.gate``'s docstring)."""
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    if topk_method != "greedy" and n_group > 1:
        choice = _limit_groups(choice, n_group, topk_group, two_best=topk_method == "noaux_tc")
    indices = choice.topk(top_k, dim=-1).indices  # (N, k)
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * route_scale, indices, scores


def _limit_groups(choice: torch.Tensor, n_group: int, topk_group: int, two_best: bool) -> torch.Tensor:
    """Mask (to -inf) every expert outside the ``topk_group`` best groups; a group's score is the sum of its two
    best scores (``two_best``, V3) or its best (V2)."""
    grouped = choice.view(choice.shape[0], n_group, -1)  # (N, G, E/G)
    if two_best:
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
    else:
        group_scores = grouped.amax(dim=-1)
    keep = group_scores.topk(topk_group, dim=-1).indices  # (N, topk_group)
    mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # True = dropped
    return grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)


@cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False, fullgraph=True)


def run(fn: Callable, fuse: bool, *args, **kwargs):
    """``fn(*args)``, through its compiled form when ``fuse`` and the first argument is on a GPU."""
    if fuse and args[0].is_cuda:
        return _compiled(fn)(*args, **kwargs)
    return fn(*args, **kwargs)


class Fusable:
    """Mixin for the modules that call the functions above: ``fuse`` off until ``fuse_memory_bound``."""

    fuse: bool = False


def fuse_memory_bound(model: nn.Module, on: bool = True) -> int:
    """Set ``fuse`` on every ``Fusable`` module of ``model``; returns how many were set."""
    found = [m for m in model.modules() if isinstance(m, Fusable)]
    for m in found:
        m.fuse = on
    return len(found)
