"""Build transformers models on the meta device and count their parameters by component:
the independent reference for our accounting."""

from __future__ import annotations

from collections import Counter

import torch

from moeplan.simulator.spec.model import ModelSpec


def hf_model(spec: ModelSpec) -> torch.nn.Module:
    """The transformers model of ``spec`` on the meta device (no memory, ~0.1 s for 671B)."""
    import transformers

    cfg = spec.to_hf_config()
    if spec.model_type == "llama":
        config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k in transformers.LlamaConfig().to_dict() or k == "head_dim"})
        cls = transformers.LlamaForCausalLM
    elif spec.model_type == "deepseek_v2":
        config = transformers.DeepseekV2Config(**cfg)
        cls = transformers.DeepseekV2ForCausalLM
    else:
        config = transformers.DeepseekV3Config(**cfg)
        cls = transformers.DeepseekV3ForCausalLM
    with torch.device("meta"):
        return cls(config)


def component_of(name: str) -> str:
    if name.startswith("model.embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if ".self_attn." in name:
        return "attention"
    if "layernorm" in name or name.startswith("model.norm"):
        return "norms"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "gates"
    assert ".mlp." in name, name
    return "dense_mlp"


def hf_counts(spec: ModelSpec) -> Counter:
    counts: Counter = Counter()
    for name, p in hf_model(spec).named_parameters():
        counts[component_of(name)] += p.numel()
    return counts
