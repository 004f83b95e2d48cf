"""One decoder layer (``Block``): pre-norm MLA and pre-norm FFN (dense SwiGLU or DeepSeekMoE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeplan.model.attention import MLA
from moeplan.model.fp8 import Fp8Ops, resolve_fp8_ops
from moeplan.model.linear import LinearFactory
from moeplan.model.mlp import MLP
from moeplan.model.moe import MoE
from moeplan.model.norm import RMSNorm
from moeplan.model.options import ModelOptions
from moeplan.simulator.spec.model import ModelSpec


@dataclass(frozen=True)
class LayerFactory:
    """Everything a layer needs to be built, resolved once from (spec, options)."""

    spec: ModelSpec
    dtype: torch.dtype
    make_linear: LinearFactory
    expert_backend: str
    fp8: Fp8Ops | None  # the experts' FP8 ops when they run in FP8
    fp8_backward: bool = False

    @classmethod
    def create(cls, spec: ModelSpec, options: ModelOptions) -> LayerFactory:
        if not spec.is_mla:
            raise ValueError(f"model {spec.name!r}: kv_lora_rank={spec.kv_lora_rank}; only MLA models are supported")
        needs_fp8 = options.linear_precision == "fp8" or options.expert_backend == "fp8"
        fp8 = resolve_fp8_ops(options.fp8_kernel, options.fp8_block_size) if needs_fp8 else None
        return cls(
            spec=spec,
            dtype=options.dtype,
            make_linear=LinearFactory(options.dtype, fp8 if options.linear_precision == "fp8" else None,
                                      options.fp8_backward),
            expert_backend=options.expert_backend,
            fp8=fp8 if options.expert_backend == "fp8" else None,
            fp8_backward=options.fp8_backward,
        )

    def ffn(self, layer_id: int) -> nn.Module:
        spec = self.spec
        if spec.is_moe_layer(layer_id):
            return MoE(spec, self.make_linear, self.dtype, self.expert_backend, self.fp8,
                       balance_alpha=spec.aux_loss_alpha if spec.seq_aux else 0.0, fp8_backward=self.fp8_backward)
        return MLP(spec.hidden_size, spec.intermediate_size, self.make_linear)

    def norm(self, dim: int | None = None) -> RMSNorm:
        return RMSNorm(dim or self.spec.hidden_size, self.spec.rms_norm_eps, self.dtype)


class Block(nn.Module):
    """HF names: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``."""

    def __init__(self, layer_id: int, factory: LayerFactory) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = factory.norm()
        self.self_attn = MLA(factory.spec, factory.make_linear, factory.dtype)
        self.post_attention_layernorm = factory.norm()
        self.mlp = factory.ffn(layer_id)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))
