"""The router (``Gate``): expert affinities, top-k selection, gating weights.

Variants, chosen only by spec fields (``scoring_func``, ``topk_method``, ``n_group``, ...):
- "noaux_tc" (V3, TR §2.1.2): s = sigmoid(u·e); selection uses s + b (b = the per-expert
  ``e_score_correction_bias``, updated by the aux-loss-free balancer, never by gradients);
  group-limited: a group's score is the sum of its two best biased scores, keep ``topk_group``
  groups, then top-k experts inside them. Weights gather the *unbiased* s.
- "group_limited_greedy" (V2): group score = its best score, no bias.
- "greedy" (V2-Lite): plain top-k.
Then, if ``norm_topk_prob``, weights are divided by their sum; finally times ``routed_scaling_factor``.
The router runs in FP32 whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.simulator.spec.model import ModelSpec


@dataclass(frozen=True)
class Routing:
    """Router output for N tokens: ``weights`` (N, k) FP32, ``indices`` (N, k) int64,
    ``scores`` (N, E) FP32 unbiased affinities (for the sequence-wise balance loss)."""

    weights: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor


class Gate(nn.Module):
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
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            choice = self._limit_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights=weights * self.route_scale, indices=indices, scores=scores)

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask (to -inf) every expert outside the ``topk_group`` best groups."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)  # (N, G, E/G)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # True = dropped
        return grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
