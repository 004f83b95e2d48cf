"""DeepSeekMoE layer (TR §2.1.2): shared experts + routed experts, with balance bookkeeping.

Besides the output, each forward
- adds the tokens routed to each expert into ``tokens_per_expert`` (a non-persistent buffer the
  aux-loss-free balancer reads and resets after the optimizer step, ``model.balance``);
- when ``balance_alpha > 0`` and training, attaches the sequence-wise balance loss
  L_Bal = alpha * sum_i f_i P_i (TR eq. 17-20, averaged over sequences) to the output through
  ``AuxLossToGradient``, so it reaches the optimizer without changing the module's return value
  (pipeline stages keep a plain tensor interface). Its value is kept in ``last_balance_loss``.
  ``balance_loss_scale`` scales the gradient it sends, like the main loss's: a runtime that
  accumulates M micro-batches of mean losses sets it to 1 / M (default 1: one batch per step).
"""

from __future__ import annotations

import torch
from torch import nn

from moeplan.model.experts import GroupedExperts
from moeplan.model.gate import Gate, Routing
from moeplan.model.mlp import MLP
from moeplan.simulator.spec.model import ModelSpec


class AuxLossToGradient(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient 1 into ``aux_loss`` (Megatron's trick)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


def sequence_balance_loss(routing: Routing, batch: int, seqlen: int, num_experts: int, top_k: int) -> torch.Tensor:
    """sum_i f_i P_i averaged over sequences (without alpha).

    f_i = E / (k T) * #tokens of the sequence routed to i;  P_i = mean over the sequence of the
    affinity s_i normalised over all experts.
    """
    chosen = torch.zeros_like(routing.scores).scatter_(1, routing.indices, 1.0)  # (N, E)
    f = chosen.view(batch, seqlen, num_experts).sum(1) * num_experts / (top_k * seqlen)  # (B, E)
    probs = routing.scores / routing.scores.sum(-1, keepdim=True)
    p = probs.view(batch, seqlen, num_experts).mean(1)  # (B, E)
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    """HF names: ``gate`` (weight, e_score_correction_bias), ``experts``, ``shared_experts``."""

    def __init__(self, spec: ModelSpec, make_linear, dtype: torch.dtype, expert_backend: str,
                 fp8=None, balance_alpha: float = 0.0, fp8_backward: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k = spec.n_routed_experts, spec.num_experts_per_tok
        self.balance_alpha = balance_alpha
        self.gate = Gate(spec)
        self.experts = GroupedExperts(
            spec.n_routed_experts, spec.hidden_size, spec.moe_intermediate_size, dtype,
            backend=expert_backend, fp8=fp8, fp8_backward=fp8_backward,
        )
        self.shared_experts = (
            MLP(spec.hidden_size, spec.moe_intermediate_size * spec.n_shared_experts, make_linear)
            if spec.n_shared_experts > 0 else None
        )
        self.register_buffer("tokens_per_expert", torch.zeros(spec.n_routed_experts, dtype=torch.int64),
                             persistent=False)
        self.last_balance_loss: torch.Tensor | None = None
        self.balance_loss_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seqlen, dim = x.shape
        flat = x.reshape(-1, dim)  # (B*T, d)
        routing = self.gate(flat)
        # The routed experts' counts start towards the host where they are needed (FP8 off Hopper: the layer's one
        # planned wait), then the shared expert is launched: the GPU runs it while the host waits for the counts
        # and launches the routed experts.
        pending = self.experts.count(routing.indices.reshape(-1))
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        routed, counts = self.experts(flat, routing.indices, routing.weights, pending)
        with torch.no_grad():
            self.tokens_per_expert += counts
        out = routed.view(batch, seqlen, dim)
        if shared is not None:
            out = out + shared
        if self.training and self.balance_alpha > 0 and torch.is_grad_enabled():
            loss = self.balance_alpha * sequence_balance_loss(routing, batch, seqlen, self.num_experts, self.top_k)
            self.last_balance_loss = loss.detach()
            out = AuxLossToGradient.apply(out, loss * self.balance_loss_scale)
        return out
