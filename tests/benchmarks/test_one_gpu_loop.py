"""``benchmarks/one_gpu_loop.py``: its stage is V3's architecture cut to fit one 80 GB GPU, planned as the
script plans it; the loop itself runs on a GPU (or, ``--cpu-smoke``, through the same commands on CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.presets.models import deepseek_v3

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("one_gpu_loop", ROOT / "benchmarks" / "one_gpu_loop.py")
loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop)


def test_the_stage_is_v3s_layers_one_dense_then_moe():
    v3, stage = deepseek_v3(), loop.stage_spec()
    same = ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "vocab_size",
            "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts")
    assert all(getattr(stage, f) == getattr(v3, f) for f in same)
    assert [stage.is_moe_layer(i) for i in range(stage.num_hidden_layers)] == [False, True, True]
    assert stage.n_routed_experts == 16 and stage.num_nextn_predict_layers == 0


def test_it_plans_to_fit_an_h100(tmp_path):
    config = tmp_path / "v3-stage.json"
    config.write_text(json.dumps(loop.stage_spec().model_dump(mode="json")))
    out = tmp_path / "plan"
    res = CliRunner().invoke(app, ["plan", "--model", str(config), "--cluster", "h100", "--nodes", "1", "--set",
                                   "cluster.node.gpus_per_node=1", "--pp", "1", "--ep", "1", "--dp", "1", "--schedule",
                                   "1f1b", "--microbatches", "4", "--micro-batch-size", "1", "--seq-len", "4096",
                                   "--global-batch", "4", "--tokens", "1B", "--no-search", "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["memory"]["fits"] and plan["layout"]["world"] == 1


def test_the_trace_summary_sums_node_kinds_and_finds_the_gaps(tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    events = [{"name": "0F0 L1 experts", "ph": "X", "ts": 0.0, "dur": 1000.0},
              {"name": "0F1 L2 experts", "ph": "X", "ts": 1500.0, "dur": 2000.0},
              {"name": "optimizer update", "ph": "X", "ts": 4000.0, "dur": 500.0},
              {"name": "process_name", "ph": "M"}]
    (traces / "rank0.json").write_text(json.dumps({"traceEvents": events}))
    code, text = loop.trace_summary(tmp_path)
    assert code == 0
    assert "step window 4.5 ms over 3 nodes; between nodes 1.0 ms" in text
    assert "F experts" in text and "3.0" in text.split("F experts")[1].splitlines()[0]
    assert "0.5  0F0 L1 experts -> 0F1 L2 experts" in text
    assert "optimizer update" in text  # an untagged event keeps its whole name
    assert loop.trace_summary(tmp_path / "none")[0] == 1


def test_kernels_go_to_the_node_whose_range_launched_them():
    """A synthetic ``--kernel-trace`` trace: node ranges on the host, a launch in each, one outside, and one from
    autograd's thread inside a backward node's range on the executor's."""
    node = loop.NODE_RANGE
    events = [{"name": node + "0F0 L1 experts", "cat": "user_annotation", "ph": "X", "ts": 0, "dur": 100, "tid": 1},
              {"name": "aten::mm", "cat": "cpu_op", "ph": "X", "ts": 10, "dur": 20, "tid": 1},
              {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ph": "X", "ts": 12, "dur": 2, "tid": 1,
               "args": {"correlation": 1}},
              {"name": node + "0B0 L1 attn-bwd", "cat": "user_annotation", "ph": "X", "ts": 200, "dur": 100, "tid": 1},
              {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ph": "X", "ts": 210, "dur": 2, "tid": 1,
               "args": {"correlation": 2}},
              {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ph": "X", "ts": 400, "dur": 2, "tid": 1,
               "args": {"correlation": 3}},
              # autograd's thread launches a backward node's kernels while the node's range is open on thread 1
              {"name": node + "0B0 L1 experts-bwd", "cat": "user_annotation", "ph": "X", "ts": 500, "dur": 100,
               "tid": 1},
              {"name": "autograd::engine::evaluate_function: MmBackward0", "cat": "cpu_op", "ph": "X", "ts": 505,
               "dur": 50, "tid": 2},
              {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ph": "X", "ts": 510, "dur": 2, "tid": 2,
               "args": {"correlation": 4}},
              {"name": "nvjet_sm90_tss_128x256", "cat": "kernel", "ph": "X", "ts": 3800, "dur": 2000,
               "args": {"correlation": 4}},
              {"name": "nvjet_sm90_tst_256x128", "cat": "kernel", "ph": "X", "ts": 20, "dur": 3000,
               "args": {"correlation": 1}},
              {"name": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "cat": "kernel", "ph": "X", "ts": 3100,
               "dur": 500, "args": {"correlation": 2}},
              {"name": "triton_poi_fused_add_0", "cat": "kernel", "ph": "X", "ts": 3700, "dur": 40,
               "args": {"correlation": 3}}]
    table = loop.kernels_by_node({"traceEvents": events})
    assert table == {"F experts": {"grouped_gemm": 3e-3}, "B attn-bwd": {"attention": 5e-4},
                     "(outside nodes)": {"memory_bound": 4e-5}, "B experts-bwd": {"grouped_gemm": 2e-3}}
