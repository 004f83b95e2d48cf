"""``engine.build``'s stage-boundary links: what a message weighs and whether it holds the hosts at its ends."""

from __future__ import annotations

from moeplan.simulator.engine.build import step_inputs
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


def test_gpus_send_bf16_activations_beside_compute():
    links = step_inputs(_inputs(h800(1)), dp=1, microbatches=4).links
    assert not links.p2p_blocks
    assert links.p2p_bytes == TOKENS * tiny_moe().hidden_size * 2
