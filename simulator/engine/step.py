"""One training step of one pipeline, simulated event by event with SimPy.

Each pipeline rank stands for its expert-parallel group (every data-parallel replica does the same
work), with the busiest GPU's costs. A rank owns a compute stream and two links, its NIC and its
NVLink port, each a SimPy resource that serves one transfer at a time (latency + bytes/bandwidth,
the ``Cable`` pattern). Ranks run the schedule's actions in order; an action expands per layer into
attention, dispatch, experts (the shared expert and router beside the dispatch), combine, and for
backward the same in reverse with input- and weight-gradient work. In ``F&B`` the forward and the
backward run as two concurrent processes on the same compute stream and links, so one
micro-batch's all-to-all hides behind the other's compute only as far as the events allow.
Activations and gradients cross stage boundaries over the sender's NIC (NVLink when both stages
share a node). Where a message holds the hosts at both ends (``Links.p2p_blocks``: gloo, the ``cpu`` cluster), each
rank posts the runtime's own batches (``schedules.lowering``: before each action one batch of the previous action's
sends and the receives the lowering places there, a last batch of sends after the last action) and waits for each:
the host is held for the batch's time (``Links.post_s``) and until its receives have arrived, each one message time
(``Links.p2p_s``) after its sender posted it; NCCL's messages run beside compute. A pass whose rank waited before it (for a message) first runs the measured extra of a pass after
such a wait, and a rank's first pass begun at the step's start the measured extra of the runtime's data thread
beside it (``WakeCosts``, from ``calibrate`` on a CPU; none elsewhere). When a rank has run the last backward of a stage, that stage's ZeRO-1
reduce-scatter of gradients and all-gather of weights start on its NIC; the optimizer step closes
the rank's step, its parts (``"optimizer norm"``, ``update``, ``zero``, ``other``: ``costs.optimizer_step``)
one after the other, as the runtime times them. With ``optimizer_barrier`` (a global gradient norm, for
clipping) no rank's optimizer starts before every rank's gradients are in: the norm is one all-reduce
over them all (the runtime's ``optimizer.grad_norm``; measured on the tiny preset, docs/results/calibration-cpu.md).

Communication SMs (``sm_share``): every compute piece has a duration on all SMs (``StageCosts.units``)
and one on the SMs an all-to-all leaves (``slow_units``); it runs at the second rate only while one of
this rank's all-to-all legs is in flight. Without ``slow_units`` compute never slows.

Context parallelism adds two collectives per layer on the CP group's link (NVLink inside a node,
else the NIC), queued on the same lanes as everything else. Forward: the KV all-gather starts
when the down-projection has made the latent, the query up-projection runs beside it, and the
rest of attention (KV up-projection, core, output projection) waits for it. Backward: the
gather is issued again when the layer's attention backward starts (the recompute, if any, runs
beside it; the core's backward waits for it); after the attention input-gradient work the
gradient of the gathered tensor is reduce-scattered, the weight gradients run beside it, and the
down-projection's input gradient waits for it.

Tensor parallelism (``engine.tensor_parallel``): each TP region (attention, a dense MLP) and the ends
queue their collectives on the NVLink lane; forward ones (and SP's gather of an output gradient) are
exposed, compute waits for them; a region's input-gradient reduction is issued after its input-gradient
work and waited for after its weight-gradient work, which hides it when both run in the same pass.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import simpy

from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.engine.sm_share import ComputeLane
from moeplan.simulator.engine.tensor_parallel import TpComm, TpEnds
from moeplan.simulator.engine.unit_costs import EndCosts, UnitCosts
from moeplan.simulator.schedules.actions import Op
from moeplan.simulator.schedules.executor import needs, produces
from moeplan.simulator.schedules.lowering import Batch, lower
from moeplan.simulator.schedules.schedule import Schedule


@dataclass(frozen=True)
class StageCosts:
    units: tuple[UnitCosts, ...]
    has_embedding: bool
    has_head: bool
    heads: int  # output-head passes on this stage: the main head plus one per MTP module
    slow_units: tuple[UnitCosts, ...] | None = None  # the same units beside an all-to-all (comm SMs taken)
    tp_comm: tuple[TpComm, ...] | None = None  # per unit, its tensor-parallel collectives (None: tp = 1)

    def slow(self, i: int) -> UnitCosts:
        return self.units[i] if self.slow_units is None else self.slow_units[i]

    def tp(self, i: int) -> TpComm:
        return _NO_TP if self.tp_comm is None else self.tp_comm[i]


_NO_TP = TpComm()


@dataclass(frozen=True)
class Links:
    nic_bytes_per_s: float
    nvlink_bytes_per_s: float
    latency_s: float
    p2p_bytes: float  # activation or gradient of one micro-batch at a stage boundary
    p2p_over_nvlink: bool
    cp_over_nvlink: bool = True  # the context-parallel group fits in a node
    p2p_blocks: bool = False  # a message holds the sender and the receiver for its time (gloo), not only the link
    # under p2p_blocks, the host's seconds of one batch as the runtime posts it, by what it holds: (one send, one
    # receive whose message is there, one of each), measured (``calibrate`` on a CPU); None: a message time an op
    batch_s: tuple[float, float, float] | None = None

    def p2p_s(self) -> float:
        """One stage-boundary message: latency and its bytes over the link it takes."""
        return self.latency_s + self.p2p_bytes / (self.nvlink_bytes_per_s if self.p2p_over_nvlink
                                                  else self.nic_bytes_per_s)

    def post_s(self, sends: int, recvs: int) -> float:
        """The host's time of one blocking batch of ``sends`` and ``recvs``: the measured batch of its kind, and a
        message time for each op beyond one send and one receive (without measured batches, one an op)."""
        if self.batch_s is None or not sends + recvs:
            return (sends + recvs) * self.p2p_s()
        kind = self.batch_s[0 if not recvs else 1 if not sends else 2]
        return kind + (max(0, sends - 1) + max(0, recvs - 1)) * self.p2p_s()


@dataclass(frozen=True)
class WakeCosts:
    """What a pass costs more when its rank waited before it (``engine.host_term.wake_op``): per pass kind, the
    measured (wait s, extra s) points, by wait; linear between (0, 0) and them, the last one's beyond."""

    forward: tuple[tuple[float, float], ...] = ()
    backward: tuple[tuple[float, float], ...] = ()
    step_start: tuple[tuple[str, float], ...] = ()  # (pass kind, extra s) of a rank's first pass begun at once

    def start_s(self, kind: str) -> float:
        return dict(self.step_start).get(kind, 0.0)

    def extra_s(self, kind: str, waited_s: float) -> float:
        points = self.forward if kind == "F" else self.backward if kind == "B" else ()
        prev_w, prev_s = 0.0, 0.0
        for w, s in points:
            if waited_s <= w:
                return prev_s + (s - prev_s) * (waited_s - prev_w) / (w - prev_w) if w > prev_w else s
            prev_w, prev_s = w, s
        return max(0.0, prev_s) if waited_s > 0 else 0.0


@dataclass(frozen=True)
class RankTail:
    """Per rank: DP synchronisation per stage chunk and the optimizer step."""

    dp_sync_s: dict[int, float]  # stage -> reduce-scatter + all-gather seconds on the NIC
    optimizer_parts_s: dict[str, float]  # part -> seconds, run in this order (costs.optimizer_step.OPTIMIZER_PARTS)

    @property
    def optimizer_s(self) -> float:
        return sum(self.optimizer_parts_s.values())


@dataclass(frozen=True)
class StepInputs:
    schedule: Schedule
    stages: tuple[StageCosts, ...]
    ends: EndCosts
    links: Links
    tails: tuple[RankTail, ...]
    slow_ends: EndCosts | None = None  # the ends beside an all-to-all; None = as ``ends``
    optimizer_barrier: bool = False  # every rank's gradients in before any optimizer step (a global norm)
    tp_ends: TpEnds = TpEnds()  # the embedding's and a head's tensor-parallel collectives
    wake: WakeCosts = WakeCosts()  # a pass after its rank waited (measured on a CPU); none: no extra


@dataclass
class StepResult:
    step_time_s: float
    compute_busy_s: list[float]
    nic_busy_s: list[float]
    finish_s: list[float]
    events: list[TraceEvent] = field(default_factory=list)


class _Rank:
    """One rank's compute stream and links. Each is a first-come-first-served server of capacity
    one; since a request holds a link for a known time, a link is just the time it next falls free
    (equivalent to a ``simpy.Resource`` of capacity 1, with one event per use instead of three). The
    compute stream is a ``ComputeLane``: a job's end moves when an all-to-all takes SMs beside it."""

    def __init__(self, env: simpy.Environment, index: int, trace: list[TraceEvent] | None):
        self.env, self.index, self.trace = env, index, trace
        self.free_at = {"nic": 0.0, "nvlink": 0.0}
        self.busy_s = {"compute": 0.0, "nic": 0.0, "nvlink": 0.0}
        self.compute = ComputeLane()

    def reserve(self, lane: str, seconds: float, name: str) -> float:
        """Queue ``seconds`` of work on ``lane`` now; returns when it will end (no event)."""
        start = max(self.env.now, self.free_at[lane])
        self.free_at[lane] = end = start + seconds
        self.busy_s[lane] += seconds
        if self.trace is not None:
            self.trace.append(TraceEvent(self.index, lane, name, start, end))
        return end

    def use(self, lane: str, seconds: float, name: str) -> Generator:
        if seconds > 0:
            yield self.env.timeout(self.reserve(lane, seconds, name) - self.env.now)

    def until(self, time_s: float) -> Generator:
        if time_s > self.env.now:
            yield self.env.timeout(time_s - self.env.now)

    def run(self, seconds: float, name: str, slow_s: float | None = None) -> Generator:
        """``seconds`` of compute on all SMs (``slow_s`` beside an all-to-all; None: the same)."""
        if seconds <= 0:
            return
        job = self.compute.submit(self.env.now, seconds, seconds if slow_s is None else slow_s, name)
        while job.end_s > self.env.now:  # re-armed when an all-to-all issued meanwhile stretched the job
            yield self.env.timeout(job.end_s - self.env.now)
        self.compute.finish(job)
        self.busy_s["compute"] += job.end_s - job.start_s
        if self.trace is not None:
            self.trace.append(TraceEvent(self.index, "compute", name, job.start_s, job.end_s))


class StepSimulation:
    """Build with ``StepInputs``; ``run()`` returns the ``StepResult``."""

    def __init__(self, inputs: StepInputs, trace: bool = False, free_comm: bool = False):
        self.inp, self.free_comm = inputs, free_comm
        self.share_sms = any(st.slow_units is not None for st in inputs.stages)
        self.slow_ends = inputs.slow_ends or inputs.ends
        self.env = simpy.Environment()
        self.events: list[TraceEvent] | None = [] if trace else None
        self.ranks = [_Rank(self.env, r, self.events) for r in range(inputs.schedule.num_ranks)]
        self.ready: dict[tuple[str, str, int, int], simpy.Event] = {}
        self.backwards_left = {
            (r, s): sum(1 for a in acts for op in a.ops if op.stage == s and op.kind in ("B", "W"))
            for r, acts in enumerate(inputs.schedule.ranks) for s in range(inputs.schedule.num_stages)
        }
        self.tail_done: list[list[simpy.Process]] = [[] for _ in self.ranks]
        self.grads_in = [self.env.event() for _ in self.ranks]
        # the runtime's point-to-point batches, where they block the hosts (gloo)
        self.lowered = lower(inputs.schedule) if inputs.links.p2p_blocks and not free_comm else None

    # -- dependencies ---------------------------------------------------------------------
    def _event(self, key: tuple[str, str, int, int]) -> simpy.Event:
        if key not in self.ready:
            self.ready[key] = self.env.event()
        return self.ready[key]

    def _needs(self, op: Op) -> list[simpy.Event]:
        """The schedule's dependency rules (``schedules.executor.needs``): a value made by the same
        stage is local ("done"); one from a neighbouring stage waits for its transfer ("ready")."""
        return [self._event(("done" if stage == op.stage else "ready", kind, stage, mb))
                for kind, stage, mb in needs(op, self.inp.schedule.num_stages)]

    def _deliver(self, rank: _Rank, key: tuple[str, int, int], to_rank: int) -> Generator:
        """Hand an activation (``F``) or input gradient (``G``) to the rank that consumes it."""
        name = f"p2p {key[0]}{key[1]}/{key[2]}"
        if to_rank != rank.index and not self.free_comm:
            links = self.inp.links
            yield from rank.use("nvlink" if links.p2p_over_nvlink else "nic", links.p2p_s(), name)
        self._event(("ready", *key)).succeed()

    def _send(self, rank: _Rank, key: tuple[str, int, int], to_rank: int) -> None:
        """Deliver beside the sender's next work; a message to another rank that blocks (``lowered``) leaves in the
        sender's next batch instead (``_post``)."""
        if self.lowered is None or to_rank == rank.index:
            self.env.process(self._deliver(rank, key, to_rank))

    def _arrive(self, key: tuple[str, int, int], at_s: float) -> Generator:
        yield self.env.timeout(at_s - self.env.now)
        self._event(("ready", *key)).succeed()

    def _post(self, rank: _Rank, batch: Batch) -> Generator:
        """Post one of the runtime's batches and wait for it (``p2p_blocks``): its sends leave now, each arriving one
        message time later; the host is held for the batch's time and until its receives are in. Returns the seconds
        this rank waited for a message beyond the batch's own time (a pass after it starts cold: ``WakeCosts``)."""
        if not batch.ops:
            return 0.0
        links, posted = self.inp.links, self.env.now
        for op in batch.sends:
            self.env.process(self._arrive(op.key, posted + links.p2p_s()))
        end = posted + links.post_s(len(batch.sends), len(batch.recvs))
        if batch.recvs:
            yield self.env.all_of([self._event(("ready", *op.key)) for op in batch.recvs])
        waited, end = max(0.0, self.env.now - end), max(end, self.env.now)
        lane = "nvlink" if links.p2p_over_nvlink else "nic"
        rank.busy_s[lane] += end - posted
        if rank.trace is not None:
            name = " ".join(f"{o.kind}:{o.key[0]}{o.key[1]}/{o.key[2]}" for o in batch.ops)
            rank.trace.append(TraceEvent(rank.index, lane, f"p2p {name}", posted, end))
        yield from rank.until(end)
        return waited

    # -- communication --------------------------------------------------------------------
    def _a2a(self, rank: _Rank, ib_bytes: float, nvl_bytes: float, name: str) -> float:
        """Queue the IB and NVLink legs of one all-to-all, which run in parallel (TR §3.2.2: fully
        overlapped); returns when the later leg ends."""
        if self.free_comm:
            return self.env.now
        links, end = self.inp.links, self.env.now
        for lane, nbytes, bw in (("nic", ib_bytes, links.nic_bytes_per_s), ("nvlink", nvl_bytes, links.nvlink_bytes_per_s)):
            if nbytes > 0:
                seconds = links.latency_s + nbytes / bw
                leg_end = rank.reserve(lane, seconds, name)
                if self.share_sms:  # the kernel holds the communication SMs while its leg runs
                    rank.compute.add_comm(leg_end - seconds, leg_end)
                end = max(end, leg_end)
        return end

    def _cp(self, rank: _Rank, nbytes: float, name: str) -> float:
        """Queue one context-parallel ring collective (all-gather or reduce-scatter; ``nbytes`` is
        what one GPU receives or sends, latency once, as ``costs.kernels.ring_s``); returns when it ends."""
        if self.free_comm:
            return self.env.now
        links = self.inp.links
        lane, bw = ("nvlink", links.nvlink_bytes_per_s) if links.cp_over_nvlink else ("nic", links.nic_bytes_per_s)
        return rank.reserve(lane, links.latency_s + nbytes / bw, name)

    def _tp(self, rank: _Rank, seconds: float, name: str) -> float:
        """Queue one tensor-parallel collective on the TP group's NVLink (``engine.tensor_parallel``);
        returns when it ends."""
        if self.free_comm or seconds <= 0:
            return self.env.now
        return rank.reserve("nvlink", seconds, name)

    def _tp_wait(self, rank: _Rank, seconds: float, name: str) -> Generator:
        """An exposed tensor-parallel collective: compute waits for it."""
        yield from rank.until(self._tp(rank, seconds, name))

    # -- compute chains (``u``: a unit on all SMs, ``v``: the same unit beside an all-to-all) --------
    def _attention_forward(self, rank: _Rank, u: UnitCosts, v: UnitCosts, tag: str) -> Generator:
        if not u.cp_gather_bytes:
            yield from rank.run(u.attn_fwd_s, f"{tag} attn", v.attn_fwd_s)
            return
        yield from rank.run(u.attn_pre_fwd_s, f"{tag} attn-down", v.attn_pre_fwd_s)
        gathered = self._cp(rank, u.cp_gather_bytes, f"{tag} cp-gather")
        yield from rank.run(u.attn_beside_fwd_s, f"{tag} q-up", v.attn_beside_fwd_s)
        yield from rank.until(gathered)
        yield from rank.run(u.attn_fwd_s - u.attn_pre_fwd_s - u.attn_beside_fwd_s, f"{tag} attn",
                            v.attn_fwd_s - v.attn_pre_fwd_s - v.attn_beside_fwd_s)

    def _tp_region_backward(self, rank: _Rank, out_s: float, in_s: float, dx: tuple[float, float],
                            dw: tuple[float, float], name: str) -> Generator:
        """A TP region's backward: the output gradient's all-gather (SP) exposed, the input gradient's
        reduction issued after the input-gradient work and hidden behind the weight gradient's."""
        yield from self._tp_wait(rank, out_s, f"{name} tp-gather")
        yield from rank.run(dx[0], name, dx[1])
        reduced = self._tp(rank, in_s, f"{name} tp-reduce")
        yield from rank.run(dw[0], f"{name} dw", dw[1])
        yield from rank.until(reduced)

    def _attention_backward(self, rank: _Rank, u: UnitCosts, v: UnitCosts, c: TpComm, tag: str,
                            weights: bool) -> Generator:
        dw, dw_v = (u.attn_dw_s, v.attn_dw_s) if weights else (0.0, 0.0)
        if c.attn_out_bwd_s or c.attn_in_bwd_s:  # tensor parallelism (never with CP)
            yield from self._tp_region_backward(rank, c.attn_out_bwd_s, c.attn_in_bwd_s, (u.recompute_s + u.attn_dx_s,
                                                v.recompute_s + v.attn_dx_s), (dw, dw_v), f"{tag} attn-bwd")
            return
        if not u.cp_gather_bytes:
            yield from rank.run(u.recompute_s + u.attn_dx_s + dw, f"{tag} attn-bwd", v.recompute_s + v.attn_dx_s + dw_v)
            return
        gathered = self._cp(rank, u.cp_gather_bytes, f"{tag} cp-regather")
        yield from rank.run(u.recompute_s, f"{tag} recompute", v.recompute_s)
        yield from rank.until(gathered)
        yield from rank.run(u.attn_dx_s - u.attn_down_dx_s, f"{tag} attn-bwd", v.attn_dx_s - v.attn_down_dx_s)
        scattered = self._cp(rank, u.cp_gather_bytes, f"{tag} cp-reduce-scatter")
        yield from rank.run(dw, f"{tag} attn-dw", dw_v)
        yield from rank.until(scattered)
        yield from rank.run(u.attn_down_dx_s, f"{tag} attn-down-dx", v.attn_down_dx_s)

    def _forward(self, rank: _Rank, op: Op) -> Generator:
        st, tag = self.inp.stages[op.stage], f"{op.stage}F{op.microbatch}"
        ends, slow_ends = self.inp.ends, self.slow_ends
        tp_ends = self.inp.tp_ends
        if st.has_embedding:
            yield from rank.run(ends.embed_fwd_s, f"{tag} embed", slow_ends.embed_fwd_s)
            yield from self._tp_wait(rank, tp_ends.embed_fwd_s, f"{tag} embed tp-reduce")
        for i, u in enumerate(st.units):
            v, c = st.slow(i), st.tp(i)
            yield from self._tp_wait(rank, c.attn_in_fwd_s, f"{tag} L{i} tp-gather")
            yield from self._attention_forward(rank, u, v, f"{tag} L{i}")
            yield from self._tp_wait(rank, c.attn_out_fwd_s, f"{tag} L{i} attn tp-reduce")
            if u.moe:
                dispatched = self._a2a(rank, u.dispatch_ib_bytes + u.routing_ib_bytes,
                                       u.dispatch_nvlink_bytes + u.routing_nvlink_bytes, f"{tag} L{i} dispatch")
                yield from rank.run(u.mlp_fwd_s, f"{tag} L{i} shared", v.mlp_fwd_s)
                yield from rank.until(dispatched)
                yield from rank.run(u.experts_fwd_s, f"{tag} L{i} experts", v.experts_fwd_s)
                yield from rank.until(self._a2a(rank, u.combine_ib_bytes, u.combine_nvlink_bytes, f"{tag} L{i} combine"))
            else:
                yield from self._tp_wait(rank, c.mlp_in_fwd_s, f"{tag} L{i} mlp tp-gather")
                yield from rank.run(u.mlp_fwd_s, f"{tag} L{i} mlp", v.mlp_fwd_s)
                yield from self._tp_wait(rank, c.mlp_out_fwd_s, f"{tag} L{i} mlp tp-reduce")
        if st.has_head:
            yield from self._tp_wait(rank, st.heads * tp_ends.head_fwd_s, f"{tag} head tp")
            yield from rank.run(st.heads * ends.head_fwd_s, f"{tag} head", st.heads * slow_ends.head_fwd_s)

    def _backward(self, rank: _Rank, op: Op, weights: bool) -> Generator:
        st, tag = self.inp.stages[op.stage], f"{op.stage}{op.kind}{op.microbatch}"
        ends, slow_ends = self.inp.ends, self.slow_ends
        on = 1.0 if weights else 0.0
        if st.has_head:
            yield from rank.run(st.heads * (ends.head_dx_s + on * ends.head_dw_s), f"{tag} head",
                                st.heads * (slow_ends.head_dx_s + on * slow_ends.head_dw_s))
            yield from self._tp_wait(rank, st.heads * self.inp.tp_ends.head_bwd_s, f"{tag} head tp-reduce")
        for i in reversed(range(len(st.units))):
            u, v, c = st.units[i], st.slow(i), st.tp(i)
            if u.moe:
                # gradient into the experts travels like a dispatch (FP8), back like a combine (BF16), with
                # the routing metadata's gradient
                yield from rank.until(self._a2a(rank, u.dispatch_ib_bytes, u.dispatch_nvlink_bytes, f"{tag} L{i} combine-bwd"))
                yield from rank.run(u.experts_dx_s + on * u.experts_dw_s, f"{tag} L{i} experts-bwd",
                                    v.experts_dx_s + on * v.experts_dw_s)
                back = self._a2a(rank, u.combine_ib_bytes + u.routing_ib_bytes,
                                 u.combine_nvlink_bytes + u.routing_nvlink_bytes, f"{tag} L{i} dispatch-bwd")
                yield from rank.run(u.mlp_dx_s + on * u.mlp_dw_s, f"{tag} L{i} shared-bwd", v.mlp_dx_s + on * v.mlp_dw_s)
                yield from rank.until(back)
            elif c.mlp_out_bwd_s or c.mlp_in_bwd_s:
                yield from self._tp_region_backward(rank, c.mlp_out_bwd_s, c.mlp_in_bwd_s, (u.mlp_dx_s, v.mlp_dx_s),
                                                    (on * u.mlp_dw_s, on * v.mlp_dw_s), f"{tag} L{i} mlp-bwd")
            else:
                yield from rank.run(u.mlp_dx_s + on * u.mlp_dw_s, f"{tag} L{i} mlp-bwd", v.mlp_dx_s + on * v.mlp_dw_s)
            yield from self._attention_backward(rank, u, v, c, f"{tag} L{i}", weights)

    def _weights(self, rank: _Rank, op: Op) -> Generator:
        st = self.inp.stages[op.stage]
        units = [(u, st.slow(i)) for i, u in enumerate(st.units)]
        head = (st.heads * self.inp.ends.head_dw_s, st.heads * self.slow_ends.head_dw_s) if st.has_head else (0.0, 0.0)
        yield from rank.run(sum(u.dw_s for u, _ in units) + head[0], f"{op.stage}W{op.microbatch}",
                            sum(v.dw_s for _, v in units) + head[1])

    def _op(self, rank: _Rank, op: Op) -> Generator:
        sched = self.inp.schedule
        if op.kind == "F":
            yield from self._forward(rank, op)
        elif op.kind == "W":
            yield from self._weights(rank, op)
        else:
            yield from self._backward(rank, op, weights=op.kind == "B")
        for key in produces(op):
            self._event(("done", *key)).succeed()
        # activations go to the next stage, input gradients to the previous one
        if op.kind == "F" and op.stage + 1 < sched.num_stages:
            self._send(rank, ("F", op.stage, op.microbatch), sched.rank_of(op.stage + 1, op.microbatch))
        if op.kind in ("B", "I") and op.stage > 0:
            self._send(rank, ("G", op.stage, op.microbatch), sched.rank_of(op.stage - 1, op.microbatch))
        if op.kind in ("B", "W"):
            self._stage_backward_done(rank, op.stage)

    def _stage_backward_done(self, rank: _Rank, stage: int) -> None:
        key = (rank.index, stage)
        self.backwards_left[key] -= 1
        if self.backwards_left[key] == 0:
            seconds = self.inp.tails[rank.index].dp_sync_s.get(stage, 0.0)
            if seconds > 0 and not self.free_comm:
                self.tail_done[rank.index].append(self.env.process(rank.use("nic", seconds, f"dp-sync stage {stage}")))

    def _action(self, rank: _Rank, index: int) -> Generator:
        action, posted_s, blocked_s = self.inp.schedule.ranks[rank.index][index], self.env.now, 0.0
        if self.lowered is not None:
            blocked_s = yield from self._post(rank, self.lowered.programs[rank.index].steps[index].batch)
            posted_s = self.env.now
        waits = [e for op in action.ops for e in self._needs(op)]
        if waits:
            yield self.env.all_of(waits)
        waited_s, first = blocked_s + self.env.now - posted_s, index == 0
        if len(action.ops) == 1:  # a pass after its rank waited starts cold, a step's first beside the data thread
            op, wake = action.ops[0], self.inp.wake
            tag = f"{op.stage}{op.kind}{op.microbatch}"
            if first and waited_s == 0:
                yield from rank.run(wake.start_s(op.kind), f"{tag} step-start")
            else:
                yield from rank.run(wake.extra_s(op.kind, waited_s), f"{tag} wake")
        if len(action.ops) == 1:
            yield from self._op(rank, action.ops[0])
        else:
            yield self.env.all_of([self.env.process(self._op(rank, op)) for op in action.ops])

    def _rank(self, rank: _Rank) -> Generator:
        for i in range(len(self.inp.schedule.ranks[rank.index])):
            yield from self._action(rank, i)
        if self.lowered is not None:
            yield from self._post(rank, self.lowered.programs[rank.index].final)
        if self.tail_done[rank.index]:
            yield self.env.all_of(self.tail_done[rank.index])
        if self.inp.optimizer_barrier:
            self.grads_in[rank.index].succeed()
            yield self.env.all_of(self.grads_in)
        for part, seconds in self.inp.tails[rank.index].optimizer_parts_s.items():
            yield from rank.run(seconds, f"optimizer {part}")
        self.finish[rank.index] = self.env.now

    def run(self) -> StepResult:
        self.finish = [0.0] * len(self.ranks)
        for rank in self.ranks:
            self.env.process(self._rank(rank))
        self.env.run()
        if any(f == 0.0 for f in self.finish) and self.env.now > 0:
            stuck = [r.index for r, f in zip(self.ranks, self.finish) if f == 0.0]
            raise RuntimeError(f"simulation stalled: ranks {stuck} never finished (schedule deadlock)")
        return StepResult(
            step_time_s=max(self.finish), compute_busy_s=[r.busy_s["compute"] for r in self.ranks],
            nic_busy_s=[r.busy_s["nic"] for r in self.ranks], finish_s=list(self.finish), events=self.events or [],
        )
