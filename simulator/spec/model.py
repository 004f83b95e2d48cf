"""The model spec: the fields and meaning of a Hugging Face DeepseekV3 ``config.json``.

One class covers DeepSeek-V3, V2, V2-Lite and dense Llama-style models:
- MLA attention when ``kv_lora_rank`` is set, GQA/MHA (``num_key_value_heads``) otherwise;
- routed experts when ``n_routed_experts > 0``, a dense SwiGLU MLP in every layer otherwise.

``ModelSpec.from_hf_config`` loads a published ``config.json`` as is: keys we do not model are
returned so the caller can report them; keys we model are validated and kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.spec.json_input import read_json_file
from moeplan.simulator.spec.numbers import Bool, Float, Int

logger = logging.getLogger(__name__)

# Bounds on the sizes that drive work (per-layer and per-expert loops, placements), far above any
# published model (DeepSeek-V3: 61 layers, 256 experts, 163,840 positions).
MAX_LAYERS = 2**9
MAX_EXPERTS = 2**14
MAX_POSITIONS = 2**30


class RopeScaling(BaseModel):
    """YaRN / linear RoPE scaling, as in the HF ``rope_scaling`` dict (DeepSeek-V3 TR §4.3)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str = Field("yarn", description="'yarn' for DeepSeek; HF newer configs call it rope_type.")
    factor: Float = Field(..., gt=0, le=MAX_POSITIONS)
    original_max_position_embeddings: Int = Field(..., gt=0, le=MAX_POSITIONS)
    beta_fast: Float = 32.0
    beta_slow: Float = 1.0
    mscale: Float = 1.0
    mscale_all_dim: Float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _rope_type_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rope_type" in data:
            data = dict(data)
            rope_type = data.pop("rope_type")
            data.setdefault("type", rope_type)
        return data


class ModelSpec(BaseModel):
    """Architecture of one decoder-only model. Field names follow HF ``DeepseekV3Config``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("custom", description="Display name; not part of the HF config.")
    model_type: str = Field("deepseek_v3", description="HF model_type: deepseek_v3, deepseek_v2, llama, ...")
    vocab_size: Int = Field(..., gt=0, le=2**24)
    hidden_size: Int = Field(..., gt=0, le=2**20)
    num_hidden_layers: Int = Field(..., gt=0, le=MAX_LAYERS)
    intermediate_size: Int = Field(..., gt=0, le=2**22, description="Dense SwiGLU MLP width.")
    hidden_act: Literal["silu"] = "silu"
    # Attention. MLA when kv_lora_rank is set; GQA otherwise.
    num_attention_heads: Int = Field(..., gt=0, le=2**14)
    num_key_value_heads: Int | None = Field(None, gt=0, le=2**14, description="GQA KV heads; ignored by MLA.")
    head_dim: Int | None = Field(None, gt=0, le=2**16, description="GQA head dim; default hidden/heads.")
    q_lora_rank: Int | None = Field(None, gt=0, le=2**20, description="MLA query compression; null = full q_proj.")
    kv_lora_rank: Int | None = Field(None, gt=0, le=2**20, description="MLA KV compression; null = GQA model.")
    qk_nope_head_dim: Int = Field(0, ge=0, le=2**16)
    qk_rope_head_dim: Int = Field(0, ge=0, le=2**16)
    v_head_dim: Int = Field(0, ge=0, le=2**16)
    attention_bias: Bool = False
    # Mixture of experts. n_routed_experts == 0 means a dense model.
    n_routed_experts: Int = Field(0, ge=0, le=MAX_EXPERTS)
    n_shared_experts: Int = Field(0, ge=0, le=2**10)
    num_experts_per_tok: Int = Field(0, ge=0, le=MAX_EXPERTS)
    moe_intermediate_size: Int = Field(0, ge=0, le=2**22)
    first_k_dense_replace: Int = Field(0, ge=0, le=MAX_LAYERS)
    moe_layer_freq: Int = Field(1, gt=0, le=MAX_LAYERS)
    n_group: Int = Field(1, gt=0, le=MAX_EXPERTS)
    topk_group: Int = Field(1, gt=0, le=MAX_EXPERTS)
    routed_scaling_factor: Float = Field(1.0, gt=0)
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "group_limited_greedy", "greedy"] = "noaux_tc"
    norm_topk_prob: Bool = True
    aux_loss_alpha: Float = Field(0.0, ge=0)
    seq_aux: Bool = True
    # Multi-token prediction (DeepSeek-V3 TR §2.2).
    num_nextn_predict_layers: Int = Field(0, ge=0, le=2**6)
    # Positions and norms.
    max_position_embeddings: Int = Field(4096, gt=0, le=MAX_POSITIONS)
    rope_theta: Float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: Float = Field(1e-6, gt=0)
    tie_word_embeddings: Bool = False
    initializer_range: Float = Field(0.02, gt=0)

    # ---- derived shape facts -------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: nope + rope for MLA, head_dim for GQA."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.gqa_head_dim

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, layer: int) -> bool:
        """HF rule: layer i is MoE iff experts exist, i >= first_k_dense_replace and i % freq == 0."""
        return (
            self.is_moe
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def num_dense_layers(self) -> int:
        return self.num_hidden_layers - self.num_moe_layers

    # ---- validation ------------------------------------------------------------------------
    @model_validator(mode="after")
    def _check_consistency(self) -> ModelSpec:
        if self.is_mla:
            for field in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, field) <= 0:
                    raise ValueError(f"{field}={getattr(self, field)} must be > 0 for MLA (kv_lora_rank={self.kv_lora_rank})")
        else:
            if self.hidden_size % self.num_attention_heads and self.head_dim is None:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; give head_dim"
                )
            if self.num_attention_heads % self.kv_heads:
                raise ValueError(
                    f"num_key_value_heads={self.kv_heads} must divide num_attention_heads={self.num_attention_heads}"
                )
        if self.is_moe:
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be > 0 with experts")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts={self.n_routed_experts}"
                )
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
            if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
                raise ValueError(
                    f"topk_group={self.topk_group} groups of {self.n_routed_experts // self.n_group} experts "
                    f"cannot supply num_experts_per_tok={self.num_experts_per_tok}"
                )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace} exceeds num_hidden_layers={self.num_hidden_layers}"
            )
        return self

    # ---- HF config.json --------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "custom") -> tuple[ModelSpec, list[str]]:
        """Build a spec from a HF ``config.json`` dict; returns (spec, sorted keys not modelled).

        The mapping is 1:1 by field name. ``rope_parameters`` (transformers 5.x) is read for
        ``rope_theta`` and the scaling dict when the old keys are absent.
        """
        data = dict(config)
        rope_params = data.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            data.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
            if rope_params.get("rope_type", rope_params.get("type")) not in (None, "default"):
                data.setdefault("rope_scaling", {k: v for k, v in rope_params.items() if k != "rope_theta"})
        if isinstance(data.get("rope_scaling"), dict):  # anything else is left for validation to refuse
            known_rope = set(RopeScaling.model_fields) | {"rope_type"}
            data["rope_scaling"] = {k: v for k, v in data["rope_scaling"].items() if k in known_rope}
        if data.get("model_type") in ("llama", "mistral", "qwen2") and "n_routed_experts" not in data:
            data.setdefault("kv_lora_rank", None)
        if data.get("n_routed_experts") is None:
            data["n_routed_experts"] = 0
        known = set(cls.model_fields)
        ignored = sorted(k for k in data if k not in known)
        kept = {k: v for k, v in data.items() if k in known}
        kept.setdefault("name", name)
        return cls.model_validate(kept), ignored

    @classmethod
    def from_hf_config_file(cls, path: str | Path) -> tuple[ModelSpec, list[str]]:
        """Load a ``config.json`` file (``json_input.read_json_file``: bounded, strict JSON); errors
        (``ValueError``, or pydantic's ``ValidationError``) name the file."""
        path = Path(path)
        config = read_json_file(path)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
        return cls.from_hf_config(config, name=path.parent.name or path.stem)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF-style dict of this spec (``name`` dropped; a null ``head_dim`` dropped, since HF
        derives it; other nulls such as ``q_lora_rank`` kept)."""
        data = self.model_dump(mode="json", exclude={"name"})
        if data["head_dim"] is None:
            del data["head_dim"]
        return data
