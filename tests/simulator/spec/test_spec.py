"""Model, cluster and training specs: HF config.json loading and validation messages."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from moeplan.simulator.presets.clusters import CLUSTER_PRESETS
from moeplan.simulator.presets.models import MODEL_PRESETS, deepseek_v3
from moeplan.simulator.spec.hardware import NodeSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.training import Phase

# The published deepseek-ai/DeepSeek-V3 config.json (structure and values; reference §1.1 and §13).
V3_CONFIG_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_published_v3_config_loads_and_reports_unmodelled_keys():
    spec, ignored = ModelSpec.from_hf_config(V3_CONFIG_JSON, name="deepseek-v3")
    assert ignored == sorted(["architectures", "attention_dropout", "auto_map", "bos_token_id", "eos_token_id",
                              "ep_size", "pretraining_tp", "quantization_config", "torch_dtype",
                              "transformers_version", "use_cache"])
    preset = deepseek_v3()
    # Same architecture as the preset; the preset carries the TR's alpha and init std instead.
    differs = {k for k, v in spec.model_dump().items() if preset.model_dump()[k] != v}
    assert differs == {"aux_loss_alpha", "initializer_range"}


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: malformed JSON"):
        ModelSpec.from_hf_config_file(bad)
    missing = dict(V3_CONFIG_JSON)
    del missing["hidden_size"]
    with pytest.raises(ValidationError, match="hidden_size"):
        ModelSpec.from_hf_config(missing)


def test_transformers5_rope_parameters_are_read():
    cfg = {k: v for k, v in V3_CONFIG_JSON.items() if k not in ("rope_scaling", "rope_theta")}
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                              "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                              "mscale": 1.0, "mscale_all_dim": 1.0}
    spec, _ = ModelSpec.from_hf_config(cfg)
    assert spec.rope_scaling is not None and spec.rope_scaling.factor == 40 and spec.rope_theta == 10000


def test_llama_config_is_a_dense_gqa_model():
    cfg = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 95,
           "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 102400, "rope_theta": 10000.0,
           "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-6, "max_position_embeddings": 4096}
    spec, ignored = ModelSpec.from_hf_config(cfg)
    assert not spec.is_moe and not spec.is_mla and spec.kv_heads == 8 and ignored == ["architectures"]
    assert spec == MODEL_PRESETS["deepseek-67b"]().model_copy(update={"name": "custom"})


@pytest.mark.parametrize(
    ("update", "message"),
    [({"n_group": 7}, "n_group=7 must divide n_routed_experts=256"),
     ({"topk_group": 9}, "topk_group=9 must be <= n_group=8"),
     ({"num_experts_per_tok": 300}, "num_experts_per_tok=300"),
     ({"topk_group": 1, "num_experts_per_tok": 40}, "topk_group=1 groups of 32 experts"),
     ({"v_head_dim": 0}, "v_head_dim=0 must be > 0 for MLA"),
     ({"hidden_size": -1}, "hidden_size")],
)
def test_model_validation_names_the_values(update, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec.model_validate({**deepseek_v3().model_dump(), **update})


def test_unknown_keys_are_rejected_in_our_own_specs():
    with pytest.raises(ValidationError, match="hidden_sise"):
        ModelSpec.model_validate({**deepseek_v3().model_dump(), "hidden_sise": 1})


def test_specs_are_frozen():
    with pytest.raises(ValidationError):
        deepseek_v3().hidden_size = 1  # type: ignore[misc]


def test_cluster_presets_and_node_checks():
    h800 = CLUSTER_PRESETS["h800"]()
    assert h800.num_gpus == 2048 and h800.node.nvlink_bytes_per_s == 160e9 and h800.node.nic_bytes_per_s == 50e9
    with pytest.raises(ValidationError, match="exceeds nvlink_spec_bytes_per_s"):
        NodeSpec(gpus_per_node=8, nvlink_bytes_per_s=500e9, nvlink_spec_bytes_per_s=400e9, nic_bytes_per_s=50e9)


def test_phase_needs_tokens_or_steps():
    with pytest.raises(ValidationError, match="exactly one of tokens"):
        Phase(name="x", global_batch_seqs=8)
    with pytest.raises(ValidationError, match="ramp.start_seqs=16 exceeds"):
        Phase(name="x", tokens=1e9, global_batch_seqs=8, ramp={"start_seqs": 16, "ramp_tokens": 1e9})


def test_hf_round_trip():
    spec = deepseek_v3()
    again, ignored = ModelSpec.from_hf_config(json.loads(json.dumps(spec.to_hf_config())), name=spec.name)
    assert again == spec and ignored == []


def test_a_training_spec_holds_at_most_max_phases():
    """The bound holds for every reader of a spec (``show``, ``check`` and ``launch`` read plan files), not only
    for ``plan``'s options."""
    from moeplan.simulator.spec.training import MAX_PHASES, TrainingSpec

    phase = {"tokens": 1e9, "global_batch_seqs": 8}
    phases = [{"name": f"p{i}", **phase} for i in range(MAX_PHASES + 1)]
    assert len(TrainingSpec(phases=phases[:MAX_PHASES]).phases) == MAX_PHASES
    with pytest.raises(ValidationError, match=f"at most {MAX_PHASES}"):
        TrainingSpec(phases=phases)
