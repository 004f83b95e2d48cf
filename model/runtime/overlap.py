"""DualPipe's overlapped F&B: a stage's pass cut into nodes, issued interleaved with another micro-batch's.

A stage's forward runs node by node (``stage_forward``): the embedding, then per layer ``L{i}`` (index in
the stage, as the simulator's units) the nodes below, then the head (norm, ``lm_head``, MTP, the loss),
which stay whole. Each compute node runs on *detached* copies of its inputs (leaves), so its piece of the
autograd graph ends there; the node and its (leaf, output) pairs go on a ``Tape``. ``stage_backward``
walks the tape backwards, one ``torch.autograd.backward(outputs, grads)`` per node, the grads being what
the consumer nodes' leaves received. Communication nodes are not autograd at all: forward launches the
all-to-all, backward launches the reverse one (swapped split sizes). Every tensor that crosses a node
boundary has exactly one consuming node, so each gradient is summed in the same order as in one
whole-graph backward: the pair is bit-identical to F then B.

Nodes of an expert-parallel MoE layer (``ExpertParallelMoE``; trace op name, stream):

====  ==========================================================  =========  ======
node  forward                                                     op         stream
====  ==========================================================  =========  ======
attn  norm, MLA, residual, norm, router; launch counts exchange   attn       C
perm  host sync on the counts; rows to send, (slot, weight) pairs  attn       C
disp  all-to-all of rows and pairs                                dispatch   X
shr   shared expert                                               shared     C
exp   local experts over the received rows                        experts    C
comb  all-to-all of the partial sums back                         combine    X
post  sum per token, + shared, balance-loss hook, residual        experts    C
====  ==========================================================  =========  ======

Backward runs post, comb, exp, disp, shr, perm, attn (ops ``*-bwd``). A dense layer is ``attn`` then
``mlp``; a MoE layer without expert parallelism ``attn`` then ``experts``; neither communicates.

**The pair** (``interleave``): one generator per pass yields right after it *launches* an all-to-all;
the pair then switches to the other pass, which waits for nothing of it. The backward starts. For
forward layer i of micro-batch f beside backward layer j of b (both MoE) this issues:

==  ======  =====================================  ========================================
#   stream  node                                   runs beside
==  ======  =====================================  ========================================
1   C       b post-bwd (experts-bwd)               -
2   X       b combine-bwd launch                   3
3   C       f attn (+ counts launch on X)          2
4   C       b experts-bwd (waits 2)                counts
5   X       b dispatch-bwd launch                  6, 7
6   host    f counts wait (the planned host sync)  4 still running on the GPU
7   C       f perm                                 5
8   X       f dispatch launch                      9
9   C       b shared-bwd, perm-bwd, attn-bwd       8
10  C       b layer j-1 post-bwd                   8
11  X       b layer j-1 combine-bwd launch         12
12  C       f shared, experts (waits 8)            11
13  X       f combine launch                       14
14  C       b layer j-1 experts-bwd (waits 11)     13
==  ======  =====================================  ========================================

and so on: every all-to-all of one micro-batch has compute of the other issued between its launch and its
wait. When one pass runs out of layers the other finishes alone (Megatron's unpaired layers).

Streams (``Streams``): on CUDA, compute nodes run on the current stream C and communication on one
high-priority stream X; one event per micro-batch chain (``"{stage}{kind}{mb}"``) orders them: a node
waits only for its own chain's latest event, never for the other micro-batch's queued kernels, and all
collectives of the pair go to X in one program order, the same on every rank. No host sync in the pair
but the counts (``Streams.planned_sync``). On CPU the contexts are empty and gloo runs each all-to-all
on its own thread while this one computes.

Communication goes through a ``Comm`` facade: ``DistComm`` (``all_to_all_single``, async),
``LoopbackComm`` (a copy of the same bytes on X: one GPU measures the overlap without a peer),
``RecordingComm`` (logs launches, waits and compute nodes, for the structural test). Every node is timed
on the ``Timeline`` under the simulator's names (``"{stage}{kind}{mb} L{i} {op}"``): compute on lane
``compute``, all-to-all on ``comm_lane`` (``nvlink``, or ``nic`` when the EP group spans nodes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moeplan.model.moe import AuxLossToGradient, sequence_balance_loss
from moeplan.model.runtime.expert_parallel import Dispatched, Exchange, ExpertParallelMoE
from moeplan.model.runtime.overlap_comm import DistComm, Streams

# A compute node's ``torch.profiler`` range: a profiled step's kernels are given to the node whose range launched
# them (``moeplan launch --kernel-trace``; ``benchmarks/one_gpu_loop.kernels_by_node``). ~1 us a node unprofiled.
NODE_RANGE = "moeplan::node "

Steps = Generator[None, None, object]  # a pass: yields right after each all-to-all launch, returns its result


# ---- ports, nodes, the tape ---------------------------------------------------------------------------

@dataclass
class Pending:
    """All-to-alls in flight as one communication node: waited for once, by the first consumer."""

    handles: list
    name: str
    started: object
    lane: str
    done: object = None  # CUDA: event on X after the collectives
    waited: bool = False


@dataclass
class Port:
    """A tensor crossing a node boundary (exactly one consumer): its value, the gradient the consumer gave
    back, and the all-to-all still filling one of them."""

    value: torch.Tensor | None
    grad: torch.Tensor | None = None
    pending: Pending | None = None


@dataclass
class _Compute:
    op: str  # forward op, e.g. "L0 attn"
    ins: list[Port | None]
    leaves: list[torch.Tensor | None]
    outs: list[Port | None]


@dataclass
class _Exchange:
    op: str
    exchange: Exchange
    phases: tuple[str, ...]
    ins: list[Port]
    outs: list[Port]


@dataclass
class Tape:
    """One (stage, micro-batch) forward, node by node, for its backward to walk in reverse."""

    nodes: list = field(default_factory=list)
    input: Port | None = None  # the stage's input (None on the first stage: token ids)
    output: Port | None = None  # the stage's output or, on the head stage, its scaled loss


def backward_op(op: str) -> str:
    """The simulator's name of a forward op's backward: ``L0 attn`` -> ``L0 attn-bwd``; embed, head keep theirs."""
    return op if op in ("embed", "head") else f"{op}-bwd"


def count_bytes(exchange: Exchange, rows: torch.Tensor, phase: str) -> None:
    """``comm_bytes`` of ``rows`` through ``exchange`` (``Exchange.run``'s accounting)."""
    row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
    own, counted = exchange.send_splits[exchange.rank], exchange.comm_bytes
    counted[f"{phase}_sent_bytes"] += (sum(exchange.send_splits) - own) * row_bytes
    counted[f"{phase}_recv_bytes"] += (sum(exchange.recv_splits) - exchange.recv_splits[exchange.rank]) * row_bytes
    counted[f"{phase}_self_bytes"] += own * row_bytes


@dataclass
class Pass:
    """One forward or backward pass of one chain (``"{stage}{kind}{mb}"``): its communication facade,
    streams, timeline (``executor.Timeline``) and lane for all-to-alls."""

    comm: DistComm
    streams: Streams
    timeline: object
    chain: str
    comm_lane: str = "nvlink"

    def name(self, op: str) -> str:
        return f"{self.chain} {op}"

    def resolve(self, port: Port, attr: str) -> torch.Tensor | None:
        """The port's ``value`` or ``grad``, once the all-to-all filling it has arrived."""
        pend = port.pending
        if pend is not None and not pend.waited:
            ends = [t for t in (self.comm.wait(h, pend.name) for h in pend.handles) if t is not None]
            if self.streams.cuda:
                self.streams.last[self.chain] = pend.done
            else:
                self.timeline.add(pend.lane, pend.name, pend.started, max(ends))
            pend.waited = True
        port.pending = None
        return getattr(port, attr)

    def run(self, op: str, fn: Callable[[], object]) -> object:
        """``fn()`` as compute node ``op``: after the chain's latest event, timed on lane ``compute``."""
        self.comm.note("compute", self.name(op))
        with self.streams.compute(self.chain):
            started = self.timeline.start()
            with torch.profiler.record_function(NODE_RANGE + self.name(op)):
                out = fn()
            self.timeline.stop("compute", self.name(op), started)
        return out

    def compute(self, tape: Tape, op: str, ins: Sequence[Port | None], fn: Callable, at: int | None = None):
        """Compute node: ``fn(*leaves)`` over detached copies of ``ins``; its outputs as ports. ``at``: its
        place on the tape when the backward should meet it elsewhere than in issue order."""
        leaves = []
        for port in ins:
            value = None if port is None else self.resolve(port, "value")
            leaves.append(None if value is None else value.detach().requires_grad_(value.is_floating_point()))
        outs = self.run(op, lambda: fn(*leaves))
        single = not isinstance(outs, tuple)
        ports = [None if t is None else Port(t) for t in ((outs,) if single else outs)]
        tape.nodes.insert(len(tape.nodes) if at is None else at, _Compute(op, list(ins), leaves, ports))
        return ports[0] if single else tuple(ports)

    def backward(self, node: _Compute) -> None:
        """The node's piece of the graph, from the grads its consumers gave back; its leaves' grads go on."""
        roots, grads = [], []
        for port in node.outs:
            grad = None if port is None else self.resolve(port, "grad")
            if grad is not None and port.value.requires_grad:
                roots.append(port.value)
                grads.append(grad)
        self.run(backward_op(node.op), lambda: torch.autograd.backward(roots, grads) if roots else None)
        for port, leaf in zip(node.ins, node.leaves):
            if port is not None:
                port.grad = None if leaf is None else leaf.grad
        node.leaves, node.outs = [], []

    def launch(self, op: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], exchange: Exchange | None,
               group: dist.ProcessGroup) -> Pending:
        """``out <- all-to-all(inp)`` for each pair, as one communication node (equal splits without exchange)."""
        name = self.name(op)
        with self.streams.communicate(self.chain):
            started = self.timeline.start()
            handles = [self.comm.all_to_all(out, inp, exchange and exchange.recv_splits,
                                            exchange and exchange.send_splits, group, name) for out, inp in pairs]
            pend = Pending(handles, name, started, self.comm_lane)
            if self.streams.cuda:
                pend.done = self.timeline.start()  # recorded on X after the collectives
                self.timeline.add(self.comm_lane, name, started, pend.done)
                for _, inp in pairs:  # made on C, read on X: not reused before X is done with it
                    inp.record_stream(self.streams.comm)
        return pend

    def exchange(self, tape: Tape, op: str, exchange: Exchange, ins: Sequence[Port], phases: tuple[str, ...]):
        """Communication node: each port's rows through ``exchange``; the outputs wait for their consumer."""
        values = [self.resolve(p, "value").detach().contiguous() for p in ins]
        outs = [v.new_empty((sum(exchange.recv_splits), *v.shape[1:])) for v in values]
        pend = self.launch(op, list(zip(outs, values)), exchange, exchange.group)
        for value, phase in zip(values, phases):
            count_bytes(exchange, value, phase)
        ports = [Port(o, pending=pend) for o in outs]
        tape.nodes.append(_Exchange(op, exchange, phases, list(ins), ports))
        return ports

    def exchange_backward(self, node: _Exchange) -> None:
        """The reverse all-to-all of the consumers' grads (zeros where there is none: every rank sends)."""
        back = node.exchange.reversed()
        grads = [self.resolve(p, "grad") for p in node.outs]
        grads = [(torch.zeros_like(p.value) if g is None else g).contiguous() for p, g in zip(node.outs, grads)]
        outs = [g.new_empty((sum(back.recv_splits), *g.shape[1:])) for g in grads]
        pend = self.launch(backward_op(node.op), list(zip(outs, grads)), back, back.group)
        for grad, phase in zip(grads, node.phases):
            count_bytes(back, grad, f"{phase}_bwd")
        for port, out in zip(node.ins, outs):
            port.grad, port.pending = out, pend
        node.outs = []


# ---- a stage's passes -------------------------------------------------------------------------------------

def stage_forward(module: nn.Module, inputs: torch.Tensor, input_ids: torch.Tensor | None,
                  finish: Callable[[object], torch.Tensor], p: Pass) -> Steps:
    """Forward of a stage module (``model.transformer.Transformer``) node by node; returns its ``Tape``.
    ``inputs``: token ids (first stage) or the received hidden states (a leaf); ``finish(head_output)``
    turns the head stage's output into the scaled loss (the tape's output)."""
    tape = Tape()
    cos, sin = module.rope(inputs)
    if module.stage.has_embedding:
        hidden, input_ids = p.compute(tape, "embed", [], lambda: module.embed(inputs)[0]), inputs
    else:
        hidden = tape.input = Port(inputs)
    for i, block in enumerate(module.layers.values()):
        if isinstance(block.mlp, ExpertParallelMoE):
            hidden = yield from _moe_layer(p, tape, block, hidden, cos, sin, i)
        else:
            hidden = _local_layer(p, tape, block, hidden, cos, sin, i)
    if module.stage.has_head:
        hidden = p.compute(tape, "head", [hidden], lambda h: finish(module.head(h, input_ids, cos, sin)))
    tape.output = hidden
    return tape


def stage_backward(tape: Tape, grad: torch.Tensor | None, p: Pass) -> Steps:
    """Backward of a taped forward from ``grad`` (the output's; None on the head stage: d loss = 1); returns
    the gradient of the stage's input (None on the first stage)."""
    out = tape.output
    out.grad = torch.ones_like(out.value) if grad is None else grad
    for node in reversed(tape.nodes):
        if isinstance(node, _Exchange):
            p.exchange_backward(node)
            yield
        else:
            p.backward(node)
    tape.nodes.clear()
    return None if tape.input is None else tape.input.grad


def _local_layer(p: Pass, tape: Tape, block: nn.Module, x: Port, cos, sin, i: int) -> Port:
    """A dense layer (``attn``, ``mlp``) or a MoE layer without expert parallelism (``attn``, ``experts``)."""
    h = p.compute(tape, f"L{i} attn", [x], lambda x: x + block.self_attn(block.input_layernorm(x), cos, sin))
    op = "experts" if hasattr(block.mlp, "gate") else "mlp"
    return p.compute(tape, f"L{i} {op}", [h], lambda h: h + block.mlp(block.post_attention_layernorm(h)))


def _moe_layer(p: Pass, tape: Tape, block: nn.Module, x: Port, cos, sin, i: int) -> Steps:
    """An expert-parallel MoE layer as the nodes of the module docstring's table; yields after each launch.
    Same arithmetic as ``Block.forward`` over ``ExpertParallelMoE.forward``, cut at its sub-steps."""
    moe: ExpertParallelMoE = block.mlp
    seen = {}

    def pre(x):
        h = x + block.self_attn(block.input_layernorm(x), cos, sin)
        y = block.post_attention_layernorm(h)
        seen["routed"] = routed = moe.route(y)
        return h, y, routed.flat, routed.routing.weights, _balance_loss(moe, routed)

    h, y, flat, weights, aux = p.compute(tape, f"L{i} attn", [x], pre)
    routed = seen["routed"]
    host = moe.known_counts(routed.flat.shape[0])  # one rank (loopback): nothing to exchange, no host sync
    if host is None:
        send_counts = torch.stack([routed.row_counts, routed.pair_counts], dim=1)  # (ep, 2) rows, pairs per GPU
        recv_counts = torch.empty_like(send_counts)
        counts = p.launch(f"L{i} dispatch", [(recv_counts, send_counts)], None, moe.group)
        for name, count in (("sent", moe.ep - 1), ("recv", moe.ep - 1), ("self", 1)):
            moe.comm_bytes[f"dispatch_counts_{name}_bytes"] += count * send_counts[0].numel() * 8
        yield
        p.resolve(Port(None, pending=counts), "value")
        host = p.streams.planned_sync(torch.stack([send_counts, recv_counts]))
    exchange = Exchange(moe.group, moe.ep_rank, tuple(r[0] for r in host[0]), tuple(r[0] for r in host[1]),
                        moe.comm_bytes)

    def permute(flat, weights):  # rows by destination GPU, with their (weight, local slot) there
        rows = routed.hits_first[:sum(exchange.send_splits)]
        dest, token = rows // flat.shape[0], rows % flat.shape[0]  # (R,) each
        here = routed.gpu[token] == dest[:, None]  # (R, k)
        slot = torch.where(here, routed.local[token], -1).to(torch.float32)  # exact below 2**24
        seen["token"], seen["dest"] = token, dest
        return flat[token], torch.cat([torch.where(here, weights[token], 0.0), slot], dim=1)

    send = p.compute(tape, f"L{i} attn", [flat, weights], permute)
    mark = len(tape.nodes)  # backward: shared-bwd beside dispatch-bwd, so the shared node goes before it
    recv_x, recv_meta = p.exchange(tape, f"L{i} dispatch", exchange, send, ("dispatch", "dispatch_routing"))
    yield
    shared = p.compute(tape, f"L{i} shared", [y], moe.shared, at=mark) if moe.shared_experts is not None else None
    k, pairs = moe.top_k, sum(r[1] for r in host[1])

    def experts(recv_x, recv_meta):
        d = Dispatched(routed, seen["token"], seen["dest"], exchange, recv_x, recv_meta[:, :k],
                       recv_meta[:, k:].detach().long(), pairs)
        return moe.experts_step(d).partial

    partial = p.compute(tape, f"L{i} experts", [recv_x, recv_meta], experts)
    (back,) = p.exchange(tape, f"L{i} combine", exchange.reversed(), [partial], ("combine",))
    yield

    def post(h, back, shared, aux):  # ExpertParallelMoE.combine's sum, its forward's tail, the residual
        out = back.new_zeros(routed.flat.shape).index_add(0, seen["token"], back).view(routed.x.shape)
        if shared is not None:
            out = out + shared
        if aux is not None:
            out = AuxLossToGradient.apply(out, aux)
        return h + out

    return p.compute(tape, f"L{i} experts", [h, back, shared, aux], post)


def _balance_loss(moe: ExpertParallelMoE, routed) -> torch.Tensor | None:
    """The scaled sequence-wise balance loss ``ExpertParallelMoE.forward`` hooks onto its output, or None."""
    if not (moe.training and moe.balance_alpha > 0 and torch.is_grad_enabled()):
        return None
    batch, seqlen = routed.x.shape[:2]
    loss = moe.balance_alpha * sequence_balance_loss(routed.routing, batch, seqlen, moe.num_experts, moe.top_k)
    moe.last_balance_loss = loss.detach()
    return loss * moe.balance_loss_scale


# ---- issuing passes ---------------------------------------------------------------------------------------

def interleave(*passes: Steps) -> list:
    """Run the passes, switching to the next live one each time one yields (has launched an all-to-all);
    the first pass starts. Returns each pass's result."""
    results: list = [None] * len(passes)
    live, turn = list(range(len(passes))), 0
    while live:
        k = live[turn % len(live)]
        try:
            next(passes[k])
            turn = live.index(k) + 1
        except StopIteration as stop:
            results[k] = stop.value
            turn = live.index(k)
            live.remove(k)
    return results


def drain(steps: Steps) -> object:
    """Run one pass to its end."""
    return interleave(steps)[0]
