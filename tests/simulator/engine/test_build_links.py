"""``engine.build``'s stage-boundary links (what a message weighs, whether it holds the hosts at its ends) and the
measured extra of a pass after its rank waited."""

from __future__ import annotations

from moeplan.simulator.costs.machine import POSTED_BATCHES, LinkFit, LinkPoint
from moeplan.simulator.costs.measured_ops import MeasuredOp
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.engine.build import SimOptions, step_inputs
from moeplan.simulator.engine.host_term import STEP_START_OP, wake_op
from moeplan.simulator.engine.step import WakeCosts
from moeplan.simulator.presets.clusters import cpu, h800
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec

TOKENS = 64  # one micro-batch of one 64-token sequence


def _inputs(cluster) -> PlanInputs:
    par = ParallelSpec(pp=2, schedule="1f1b", seq_len_tokens=TOKENS, micro_batch_size=1)
    training = TrainingSpec(phases=(Phase(name="p", tokens=1e9, global_batch_seqs=4),), precision="bf16")
    return PlanInputs(model=tiny_moe(), cluster=cluster, parallel=par, training=training)


def test_cpu_processes_send_fp32_activations_that_hold_both_hosts():
    links = step_inputs(_inputs(cpu()), dp=1, microbatches=4).links
    assert links.p2p_blocks  # gloo: the runtime waits each point-to-point batch on the host
    assert links.p2p_bytes == TOKENS * tiny_moe().hidden_size * 4  # the cpu runs train in FP32


def test_the_runtimes_measured_batches_at_the_messages_size_hold_the_hosts():
    inputs = _inputs(cpu())
    tables = default_tables(inputs.cluster.gpu.name)
    assert step_inputs(inputs, dp=1, microbatches=4, opts=SimOptions(tables=tables)).links.batch_s is None

    def fit(collective: str, latency_s: float, processes: int = 2) -> LinkFit:
        return LinkFit(collective=collective, processes=processes, latency_s=latency_s, bytes_per_s=1e9,
                       points=(LinkPoint(buffer_bytes=1024, s=latency_s),), source="test")

    fits = tuple(fit(c, 1e-4 * (i + 1)) for i, c in enumerate(POSTED_BATCHES))
    links = step_inputs(inputs, dp=1, microbatches=4, opts=SimOptions(tables=tables.model_copy(
        update={"links": tables.links + fits}))).links
    message_s = TOKENS * tiny_moe().hidden_size * 4 / 1e9  # FP32 activations at 1 GB/s
    assert links.batch_s == tuple(1e-4 * i + message_s for i in (1, 2, 3))
    # all three or none; between two processes only
    for partial in (fits[:2], tuple(fit(c, 1e-4, 4) for c in POSTED_BATCHES)):
        links = step_inputs(inputs, dp=1, microbatches=4, opts=SimOptions(tables=tables.model_copy(
            update={"links": tables.links + partial}))).links
        assert links.batch_s is None


def test_gpus_send_bf16_activations_beside_compute():
    links = step_inputs(_inputs(h800(1)), dp=1, microbatches=4).links
    assert not links.p2p_blocks
    assert links.p2p_bytes == TOKENS * tiny_moe().hidden_size * 2


def test_the_wake_entries_at_the_plans_shape_price_a_pass_after_a_wait():
    inputs = _inputs(cpu())
    tables = default_tables(inputs.cluster.gpu.name)
    assert step_inputs(inputs, dp=1, microbatches=4, opts=SimOptions(tables=tables)).wake == WakeCosts()

    def entry(action: str, wait_s: float, s: float, seq_len: int = TOKENS) -> MeasuredOp:
        return MeasuredOp(layer_kind="ends", action=action, op=wake_op(wait_s), tokens=seq_len, seq_len=seq_len, s=s,
                          samples=1, source="test")

    start = entry("F", 0.0, 5e-4).model_copy(update={"op": STEP_START_OP})
    ops = (entry("B", 0.008, 3e-4), entry("B", 0.002, 1e-4), entry("F", 0.004, 2e-4), entry("F", 0.004, 9.0, 128), start)
    measured = tables.model_copy(update={"measured_ops": ops})
    wake = step_inputs(inputs, dp=1, microbatches=4, opts=SimOptions(tables=measured)).wake
    assert wake == WakeCosts(forward=((0.004, 2e-4),), backward=((0.002, 1e-4), (0.008, 3e-4)),
                             step_start=(("F", 5e-4),))
