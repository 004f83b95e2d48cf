"""Expert-parallel DeepSeekMoE across one EP process group (``all_to_all_single``, gloo or NCCL).

``ExpertParallelMoE`` is a drop-in for ``model.moe.MoE`` inside a ``Block`` (same forward signature, same
``gate``, ``shared_experts``, ``tokens_per_expert`` and balance loss), whose ``experts`` hold only this
GPU's slots of the plan's placement (``ep_slots.SlotMap``). Its sub-steps carry the simulator's names so
the overlap code can issue them one by one (``simulator/engine/step.py``: dispatch, experts, shared, combine):

- ``route(x) -> Routed``: gate (group-limited routing as ``model.gate`` does it), replica of each chosen
  expert, the GPUs each token needs; local compute only, no host sync.
- ``dispatch(routed) -> Dispatched``: an all-to-all of the per-GPU row counts, then the one host sync
  (split sizes), then each token sent once to each GPU holding at least one of its experts, with its
  (local slot, weight) pairs for that GPU (``k`` columns each, -1 / 0 where the expert is elsewhere).
- ``experts_step(dispatched) -> ExpertOutput`` (``experts`` is the HF name of the slots' weights): the
  local slots' SwiGLU experts over the received rows (``GroupedExperts.forward_pairs``), one weighted
  partial sum per received row. With FP8 experts off Hopper, ``forward_pairs`` reads the per-slot row counts
  on the host: a second sync (the exchanged counts could carry them; not done yet). On Hopper it needs none
  (``GroupedExperts.counts_on_host``: the plan at its worst-case size, the Gluon kernels reading it on the GPU).
- ``combine(expert_output) -> (B, T, d)``: the reverse all-to-all of the partial sums, summed per token.
- ``shared(x)``: the shared experts (None without).

Autograd: ``AllToAllFn`` is an all-to-all whose backward is the all-to-all of the swapped split sizes
(dispatch's backward is combine-shaped and vice versa), reusing forward's host split sizes: no host sync
in backward. Every rank of the group runs the same autograd graph, so the backward collectives come in one
order on all of them; a missing gradient is materialised as zeros so that no rank skips one.

``comm_bytes`` accumulates, per phase, bytes sent to and received from the other GPUs of the group and the
bytes a GPU keeps (its own split): ``{phase}_{sent,recv,self}_bytes`` for phase in ``dispatch`` (hidden
states: the simulator's dispatch traffic, ``simulator/traffic/all_to_all.py``), ``dispatch_routing``
(k weights and k slot ids, FP32 each), ``dispatch_counts`` (int64 per GPU), ``combine``, and their
backward ``*_bwd``.

Replica gradients: a logical expert with several slots gets a gradient per slot from that slot's tokens;
``sync_replica_grads`` sums them over the EP group (expert-data-parallel sync of identical slots across
EP groups is the ``expert_dp`` group's, like every expert gradient).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeplan.model.experts import GroupedExperts
from moeplan.model.gate import Gate, Routing
from moeplan.model.mlp import MLP
from moeplan.model.moe import AuxLossToGradient, MoE, sequence_balance_loss
from moeplan.model.runtime.ep_slots import SlotMap
from moeplan.simulator.spec.model import ModelSpec


@dataclass(frozen=True)
class Exchange:
    """One all-to-all's host split sizes (rows to / from each GPU of ``group``) and where bytes are counted."""

    group: dist.ProcessGroup
    rank: int  # in the group
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    comm_bytes: dict[str, int]

    def reversed(self) -> Exchange:
        return Exchange(self.group, self.rank, self.recv_splits, self.send_splits, self.comm_bytes)

    def run(self, rows: torch.Tensor, phase: str) -> torch.Tensor:
        """(sum(send_splits), ...) rows in destination order -> (sum(recv_splits), ...) in source order."""
        assert rows.shape[0] == sum(self.send_splits), f"{rows.shape=} {self.send_splits=}"
        out = rows.new_empty((sum(self.recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), list(self.recv_splits), list(self.send_splits),
                               group=self.group)
        row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
        own = self.send_splits[self.rank]
        self.comm_bytes[f"{phase}_sent_bytes"] += (sum(self.send_splits) - own) * row_bytes
        self.comm_bytes[f"{phase}_recv_bytes"] += (sum(self.recv_splits) - self.recv_splits[self.rank]) * row_bytes
        self.comm_bytes[f"{phase}_self_bytes"] += own * row_bytes
        return out


class AllToAllFn(torch.autograd.Function):
    """``Exchange.run`` of each tensor; backward: the reversed exchange of each gradient (phase + ``_bwd``)."""

    @staticmethod
    def forward(ctx, exchange: Exchange, phases: tuple[str, ...], *tensors: torch.Tensor):
        ctx.exchange, ctx.phases = exchange, phases
        return tuple(exchange.run(t, phase) for t, phase in zip(tensors, phases, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        back = ctx.exchange.reversed()
        return None, None, *(back.run(g, f"{phase}_bwd") for g, phase in zip(grads, ctx.phases, strict=True))


@dataclass
class Routed:
    """``route``'s result: x (B, T, d); flat (N, d); gpu (N, k) destination of each choice; local (N, k) its
    slot on that GPU; hits_first (N*ep,) (gpu, token) positions, hit ones first in (gpu, token) order;
    row_counts (ep,) rows to each GPU; pair_counts (ep,) (token, expert) pairs to each GPU."""

    x: torch.Tensor
    flat: torch.Tensor
    routing: Routing
    gpu: torch.Tensor
    local: torch.Tensor
    hits_first: torch.Tensor
    row_counts: torch.Tensor
    pair_counts: torch.Tensor


@dataclass
class Dispatched:
    """``dispatch``'s result: token, dest (R,) source token and destination GPU of each sent row; exchange;
    recv_x (Rr, d); recv_weight (Rr, k); recv_slot (Rr, k) local slot or -1; recv_pairs (host int)."""

    routed: Routed
    token: torch.Tensor
    dest: torch.Tensor
    exchange: Exchange
    recv_x: torch.Tensor
    recv_weight: torch.Tensor
    recv_slot: torch.Tensor
    recv_pairs: int


@dataclass
class ExpertOutput:
    dispatched: Dispatched
    partial: torch.Tensor  # (Rr, d) weighted sum of each received row's local experts
    slot_counts: torch.Tensor  # (local slots,) pairs computed per local slot


class ExpertParallelMoE(nn.Module):
    """DeepSeekMoE over an EP group; see the module docstring. Build with ``from_moe`` or ``from_spec``."""

    def __init__(self, gate: Gate, experts: GroupedExperts, shared_experts: MLP | None, group: dist.ProcessGroup,
                 slots: SlotMap, balance_alpha: float = 0.0) -> None:
        super().__init__()
        self.ep_rank, self.ep = dist.get_rank(group), dist.get_world_size(group)
        if slots.ep != self.ep or slots.num_logical != gate.num_experts:
            raise ValueError(f"the slot map has ep={slots.ep}, {slots.num_logical} experts; the group has ep={self.ep}"
                             f" and the gate n_routed_experts={gate.num_experts}")
        if experts.num_experts != slots.slots_per_gpu[self.ep_rank]:
            raise ValueError(f"experts hold {experts.num_experts} slots but rank {self.ep_rank} has "
                             f"slots_per_gpu={slots.slots_per_gpu[self.ep_rank]}")
        self.group, self.slots = group, slots
        self.num_experts, self.top_k, self.balance_alpha = gate.num_experts, gate.top_k, balance_alpha
        self.gate, self.experts, self.shared_experts = gate, experts, shared_experts
        widest = max(len(s) for s in slots.log2phy)
        table = [list(s) + [s[0]] * (widest - len(s)) for s in slots.log2phy]
        device = gate.weight.device
        self.register_buffer("log2phy", torch.tensor(table, device=device), persistent=False)  # (E, max replicas)
        self.register_buffer("logcnt", torch.tensor([len(s) for s in slots.log2phy], device=device), persistent=False)
        self.register_buffer("gpu_of_slot", torch.tensor(slots.gpu_of_slot, device=device), persistent=False)
        local = [s - slots.offsets[g] for s, g in enumerate(slots.gpu_of_slot)]
        self.register_buffer("local_of_slot", torch.tensor(local, device=device), persistent=False)
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.comm_bytes: dict[str, int] = defaultdict(int)
        self.last_balance_loss: torch.Tensor | None = None
        self.balance_loss_scale = 1.0  # as MoE's: 1 / M when M micro-batches of mean losses accumulate

    @classmethod
    def from_moe(cls, moe: MoE, group: dist.ProcessGroup, slots: SlotMap | None = None) -> ExpertParallelMoE:
        """Copies of ``moe``'s gate and shared experts, and of the experts of this rank's slots (replicas hold
        their logical expert's weights)."""
        ep_rank = dist.get_rank(group)
        slots = slots or SlotMap.contiguous(moe.num_experts, dist.get_world_size(group))
        old = moe.experts
        experts = GroupedExperts(slots.slots_per_gpu[ep_rank], old.gate_up_proj.shape[2], old.down_proj.shape[2],
                                 old.gate_up_proj.dtype, backend=old.backend, fp8=old.fp8,
                                 fp8_backward=old.fp8_backward).to(old.gate_up_proj.device)
        experts.fuse = old.fuse
        logical = torch.tensor([slots.phy2log[s] for s in slots.local_slots(ep_rank)], device=old.gate_up_proj.device)
        with torch.no_grad():
            experts.gate_up_proj.copy_(old.gate_up_proj[logical])
            experts.down_proj.copy_(old.down_proj[logical])
        return cls(copy.deepcopy(moe.gate), experts, copy.deepcopy(moe.shared_experts), group, slots,
                   moe.balance_alpha)

    @classmethod
    def from_spec(cls, spec: ModelSpec, group: dist.ProcessGroup, slots: SlotMap | None, make_linear, dtype: torch.dtype,
                  expert_backend: str = "auto", fp8=None, balance_alpha: float = 0.0,
                  fp8_backward: bool = False) -> ExpertParallelMoE:
        """Fresh (uninitialised, like ``MoE``'s) modules for ``spec`` and this rank's slots."""
        slots = slots or SlotMap.contiguous(spec.n_routed_experts, dist.get_world_size(group))
        experts = GroupedExperts(slots.slots_per_gpu[dist.get_rank(group)], spec.hidden_size,
                                 spec.moe_intermediate_size, dtype, backend=expert_backend, fp8=fp8,
                                 fp8_backward=fp8_backward)
        shared = (MLP(spec.hidden_size, spec.moe_intermediate_size * spec.n_shared_experts, make_linear)
                  if spec.n_shared_experts > 0 else None)
        return cls(Gate(spec), experts, shared, group, slots, balance_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.route(x)
        out = self.combine(self.experts_step(self.dispatch(routed)))
        shared = self.shared(x)
        if shared is not None:
            out = out + shared
        if self.training and self.balance_alpha > 0 and torch.is_grad_enabled():  # as MoE.forward
            loss = self.balance_alpha * sequence_balance_loss(routed.routing, x.shape[0], x.shape[1],
                                                              self.num_experts, self.top_k)
            self.last_balance_loss = loss.detach()
            out = AuxLossToGradient.apply(out, loss * self.balance_loss_scale)
        return out

    def route(self, x: torch.Tensor) -> Routed:
        """Gate, replica and destination GPU of each (token, expert); tokens per expert counted. No comm."""
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        routing = self.gate(flat)
        experts = routing.indices  # (N, k) logical
        with torch.no_grad():
            self.tokens_per_expert.scatter_add_(0, experts.reshape(-1), torch.ones_like(experts.reshape(-1)))
        token = torch.arange(flat.shape[0], device=flat.device)
        replica = (token[:, None] + self.ep_rank) % self.logcnt[experts]  # (N, k) ep_slots.replica_of
        slot = self.log2phy[experts, replica]  # (N, k)
        gpu = self.gpu_of_slot[slot]
        hit = torch.zeros(flat.shape[0], self.ep, dtype=torch.bool, device=flat.device).scatter_(1, gpu, True)
        pairs = torch.zeros(self.ep, dtype=torch.int64, device=flat.device).scatter_add_(
            0, gpu.reshape(-1), torch.ones_like(gpu.reshape(-1)))
        # (gpu, token) positions with a hit first, in (gpu, token) order: the send rows once their count is known
        hits_first = torch.argsort((~hit.t()).reshape(-1).to(torch.int8), stable=True)
        return Routed(x, flat, routing, gpu, self.local_of_slot[slot], hits_first, hit.sum(0), pairs)

    def known_counts(self, num_tokens: int) -> list | None:
        """The dispatch's host counts ``[send, recv]`` (each a (rows, pairs) row per GPU) when they need no
        exchange: a one-rank group, where every token's k pairs stay on this GPU. No host sync then. None
        whenever there are peers."""
        if self.ep != 1:
            return None
        row = [num_tokens, num_tokens * self.top_k]
        return [[row], [row]]

    def dispatch(self, routed: Routed) -> Dispatched:
        """Counts all-to-all, the host sync for split sizes, then tokens and their (slot, weight) pairs."""
        send_counts = torch.stack([routed.row_counts, routed.pair_counts], dim=1)  # (ep, 2)
        own = self.ep_rank
        host = self.known_counts(routed.flat.shape[0])
        if host is None:
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            for name, count in (("sent", self.ep - 1), ("recv", self.ep - 1), ("self", 1)):
                self.comm_bytes[f"dispatch_counts_{name}_bytes"] += count * send_counts[0].numel() * 8
            host = torch.stack([send_counts, recv_counts]).tolist()  # the one host sync of the layer
        send_splits = tuple(row[0] for row in host[0])
        recv_splits = tuple(row[0] for row in host[1])
        recv_pairs = sum(row[1] for row in host[1])
        exchange = Exchange(self.group, own, send_splits, recv_splits, self.comm_bytes)
        num_tokens = routed.flat.shape[0]
        rows = routed.hits_first[:sum(send_splits)]
        dest, token = rows // num_tokens, rows % num_tokens  # (R,) each, by destination then token
        here = routed.gpu[token] == dest[:, None]  # (R, k) the token's choices on that GPU
        slot = torch.where(here, routed.local[token], -1).to(torch.float32)  # exact below 2**24
        weight = torch.where(here, routed.routing.weights[token], 0.0)  # (R, k) FP32
        recv_x, recv_meta = AllToAllFn.apply(exchange, ("dispatch", "dispatch_routing"), routed.flat[token],
                                             torch.cat([weight, slot], dim=1))
        k = self.top_k
        return Dispatched(routed, token, dest, exchange, recv_x, recv_meta[:, :k], recv_meta[:, k:].detach().long(),
                          recv_pairs)

    def experts_step(self, dispatched: Dispatched) -> ExpertOutput:
        """The local slots' experts over the received rows: one weighted partial sum per row."""
        valid = (dispatched.recv_slot >= 0).reshape(-1)  # (Rr*k,)
        pairs = torch.argsort((~valid).to(torch.int8), stable=True)[:dispatched.recv_pairs]  # valid ones, no sync
        k = self.top_k
        partial, counts = self.experts.forward_pairs(dispatched.recv_x, pairs // k,
                                                     dispatched.recv_slot.reshape(-1)[pairs],
                                                     dispatched.recv_weight.reshape(-1)[pairs])
        return ExpertOutput(dispatched, partial, counts)

    def combine(self, out: ExpertOutput) -> torch.Tensor:
        """Partial sums back to their source GPU, summed per token: (B, T, d)."""
        d = out.dispatched
        (back,) = AllToAllFn.apply(d.exchange.reversed(), ("combine",), out.partial)
        flat = d.routed.flat
        summed = flat.new_zeros(flat.shape).index_add(0, d.token, back)
        return summed.view(d.routed.x.shape)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.shared_experts is None else self.shared_experts(x)


@torch.no_grad()
def sync_replica_grads(moe: ExpertParallelMoE) -> None:
    """Sum each replicated expert's gradient over its slots in the EP group; every slot then holds the sum.

    One all-reduce per weight over the EP group of a (replicated experts, ...) buffer: every rank calls it
    (the slot map is the group's), in the same order. Call after the weight gradients exist (after W with a
    ``WeightGradStore``) and before the expert-data-parallel reduction."""
    replicated = moe.slots.replicated
    if not replicated:
        return
    local = list(moe.slots.local_slots(moe.ep_rank))
    position = {e: i for i, e in enumerate(replicated)}
    mine = [(i, position[moe.slots.phy2log[s]]) for i, s in enumerate(local) if moe.slots.phy2log[s] in position]
    for weight in (moe.experts.gate_up_proj, moe.experts.down_proj):
        main = getattr(weight, "main_grad", None)  # the runtime's FP32 buffer (model.runtime.main_grad), if any
        grad = main if main is not None else weight.grad if weight.grad is not None else torch.zeros_like(weight)
        slot_ids = torch.tensor([i for i, _ in mine], dtype=torch.long, device=weight.device)
        rows = torch.tensor([p for _, p in mine], dtype=torch.long, device=weight.device)
        buffer = grad.new_zeros(len(replicated), *grad.shape[1:]).index_add_(0, rows, grad[slot_ids])
        dist.all_reduce(buffer, group=moe.group)
        grad[slot_ids] = buffer[rows]
        if main is None:
            weight.grad = grad
