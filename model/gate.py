"""The router (``Gate``): expert affinities, top-k selection, gating weights.

Variants, chosen only by spec fields (``scoring_func``, ``topk_method``, ``n_group``, ...):
- "noaux_tc" (V3, TR §2.1.2): s = sigmoid(u·e); selection uses s + b (b = the per-expert
  ``e_score_correction_bias``, updated by the aux-loss-free balancer, never by gradients);
  group-limited: a group's score is the sum of its two best biased scores, keep ``topk_group``
  groups, then top-k experts inside them. Weights gather the *unbiased* s.
- "group_limited_greedy" (V2): group score = its best score, no bias.
- "greedy" (V2-Lite): plain top-k.
Then, if ``norm_topk_prob``, weights are divided by their sum; finally times ``routed_scaling_factor``.
The router runs in FP32 whatever the model dtype. The selection is ``model.fused.route``, compiled into
fused kernels on a GPU when ``fuse`` is set (``ModelOptions.fuse_memory_bound``), eager otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.model.fused import Fusable, route, run
from moeplan.simulator.spec.model import ModelSpec


@dataclass(frozen=True)
class Routing:
    """Router output for N tokens: ``weights`` (N, k) FP32, ``indices`` (N, k) int64,
    ``scores`` (N, E) FP32 unbiased affinities (for the sequence-wise balance loss)."""

    weights: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor


class Gate(nn.Module, Fusable):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_experts, self.top_k = spec.n_routed_experts, spec.num_experts_per_tok
        self.n_group, self.topk_group = spec.n_group, spec.topk_group
        self.scoring_func, self.topk_method = spec.scoring_func, spec.topk_method
        self.norm_topk_prob, self.route_scale = spec.norm_topk_prob, spec.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, spec.hidden_size, dtype=torch.float32))
        if self.topk_method == "noaux_tc":
            # A buffer: saved in checkpoints, moved with the module, invisible to the optimizer.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        return self.route(F.linear(x.float(), self.weight))  # logits (N, E)

    def route(self, logits: torch.Tensor) -> Routing:
        """Scores, top-k selection and weights from the FP32 logits (N, E): the router's memory-bound part."""
        weights, indices, scores = run(
            route, self.fuse, logits, self.e_score_correction_bias, scoring_func=self.scoring_func,
            topk_method=self.topk_method, n_group=self.n_group, topk_group=self.topk_group, top_k=self.top_k,
            norm_topk_prob=self.norm_topk_prob, route_scale=self.route_scale)
        return Routing(weights=weights, indices=indices, scores=scores)
