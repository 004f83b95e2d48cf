"""The DeepSeek-V3 decoder (or one pipeline stage of it), built only from a ``ModelSpec``.

Module tree = the HF checkpoint names without the ``model.`` prefix: ``embed_tokens``,
``layers.{i}`` (global layer ids), ``norm``, ``lm_head``; MTP depth k is ``mtp.{k-1}`` (checkpoint
``model.layers.{num_hidden_layers + k - 1}``); routed experts are fused (``experts.gate_up_proj``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moeplan.model.block import Block, LayerFactory
from moeplan.model.embedding import Embedding
from moeplan.model.fused import fuse_memory_bound
from moeplan.model.linear import LinearFactory
from moeplan.model.mtp import MTPModule
from moeplan.model.norm import RMSNorm
from moeplan.model.options import ModelOptions
from moeplan.model.rope import RotaryEmbedding
from moeplan.model.seeds import name_seed
from moeplan.model.stage import StageSpec
from moeplan.simulator.spec.model import ModelSpec


@dataclass
class ModelOutput:
    """``logits`` (B, T, V) of the main head; ``mtp_logits[k-1]`` (B, T-k, V) predicts t_{i+k+1};
    ``hidden`` (B, T, d) the last layer's output before the final norm."""

    logits: torch.Tensor
    hidden: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


class Transformer(nn.Module):
    """The whole model (default) or the part of it that ``stage`` describes.

    forward(inputs, input_ids=None):
    - first stage: ``inputs`` are token ids (B, T); others: hidden states (B, T, d);
    - last stage returns ``ModelOutput`` (MTP logits need the token ids: on a stage without the
      embedding pass them as ``input_ids``); other stages return the hidden states (B, T, d).
    """

    def __init__(self, spec: ModelSpec, options: ModelOptions | None = None, stage: StageSpec | None = None,
                 shared_embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        options = options or ModelOptions()
        stage = stage or StageSpec.full(spec)
        stage.validate(spec)
        self.spec, self.options, self.stage = spec, options, stage
        factory = LayerFactory.create(spec, options)
        num_mtp = spec.num_nextn_predict_layers if (stage.has_head and options.with_mtp) else 0
        self.rotary = RotaryEmbedding(spec)
        if stage.has_embedding or num_mtp:
            self.embed_tokens = shared_embedding or Embedding(spec.vocab_size, spec.hidden_size, dtype=options.dtype)
        self.layers = nn.ModuleDict({str(i): Block(i, factory) for i in stage.layers})
        if stage.has_head:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, options.dtype)
            # The output head stays in high precision (TR §3.3.1), whatever linear_precision says.
            self.lm_head = LinearFactory(options.dtype)(spec.hidden_size, spec.vocab_size)
            self.mtp = nn.ModuleList(MTPModule(spec.num_hidden_layers + k, factory) for k in range(num_mtp))
        if options.fuse_memory_bound:
            fuse_memory_bound(self)

    def forward(self, inputs: torch.Tensor, input_ids: torch.Tensor | None = None) -> ModelOutput | torch.Tensor:
        hidden, input_ids = self.embed(inputs, input_ids)
        cos, sin = self.rope(hidden)
        for layer in self.layers.values():
            hidden = layer(hidden, cos, sin)
        return self.head(hidden, input_ids, cos, sin)

    # The three parts of ``forward``, also called one by one by the runtime's node-by-node passes
    # (``model.runtime.overlap``), which cut the layers in between into sub-steps.

    def embed(self, inputs: torch.Tensor,
              input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's input as hidden states (B, T, d), and the token ids the MTP modules need."""
        if self.stage.has_embedding:
            return self.embed_tokens(inputs), inputs
        return inputs, input_ids

    def rope(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, R/2) each for the positions of ``hidden`` (B, T, d)."""
        return self.rotary(torch.arange(hidden.shape[1], device=hidden.device))

    def head(self, hidden: torch.Tensor, input_ids: torch.Tensor | None, cos: torch.Tensor,
             sin: torch.Tensor) -> ModelOutput | torch.Tensor:
        """The last layer's output -> ``ModelOutput`` on the head stage (with MTP logits when ``input_ids``
        are given), else ``hidden`` itself."""
        if not self.stage.has_head:
            return hidden
        seqlen = hidden.shape[1]
        out = ModelOutput(logits=self.lm_head(self.norm(hidden)), hidden=hidden)
        if input_ids is None or not len(self.mtp):
            return out
        prev = hidden
        for k, module in enumerate(self.mtp, start=1):
            if seqlen - k <= 0:
                break
            next_embeds = self.embed_tokens(input_ids[:, k:])  # Emb(t_{i+k}), (B, T-k, d)
            prev = module(prev[:, : seqlen - k], next_embeds, cos[: seqlen - k], sin[: seqlen - k])
            out.mtp_logits.append(self.lm_head(module.head_input(prev)))
        return out

    def init_weights(self, generator: torch.Generator, std: float | None = None) -> None:
        """N(0, std) for matrices (std = spec.initializer_range), ones for norms, zeros for biases/buffers;
        the matrices drawn in module order from ``generator``."""
        self._init(lambda name, shape: torch.randn(shape, generator=generator, dtype=torch.float32), std)

    def init_weights_by_name(self, seed: int, std: float | None = None) -> None:
        """As ``init_weights``, but each matrix drawn from a generator seeded by ``(seed, its name)`` alone.

        Stage modules use the whole model's parameter names (``layers.{global id}...``, ``embed_tokens``,
        ``norm``, ``lm_head``, ``mtp.{k}...``), so any pipeline split, on any rank, starts from the same
        weights as the single-process model, with no communication.
        """
        self._init(lambda name, shape: torch.randn(
            shape, generator=torch.Generator().manual_seed(name_seed(seed, name)), dtype=torch.float32), std)

    def _init(self, draw, std: float | None) -> None:
        init_module_weights(self, self.spec.initializer_range if std is None else std, draw)

    def moe_layers(self) -> dict[int, nn.Module]:
        """Layer id -> MoE module, MTP layers included (ids >= num_hidden_layers)."""
        blocks = list(self.layers.values()) + list(getattr(self, "mtp", []))
        return {b.layer_id: b.mlp for b in blocks if hasattr(b.mlp, "gate")}


@torch.no_grad()
def init_module_weights(module: nn.Module, std: float, draw: Callable[[str, torch.Size], torch.Tensor]) -> None:
    """The model's initialisation of any of its modules (a stage, or one block alone): ones for norms,
    ``draw(name, shape) * std`` for matrices, zeros for biases and the routers' statistics buffers."""
    for sub in module.modules():
        if isinstance(sub, RMSNorm):
            sub.weight.fill_(1.0)
    for name, param in module.named_parameters():
        if param.dim() >= 2:
            param.copy_(draw(name, param.shape) * std)
        elif name.endswith("bias"):
            param.zero_()
    for name, buf in module.named_buffers():
        if name.endswith(("e_score_correction_bias", "tokens_per_expert")):
            buf.zero_()


def build_rank(spec: ModelSpec, stages: list[StageSpec], options: ModelOptions | None = None) -> list[Transformer]:
    """The stage modules one pipeline rank holds, in the given order.

    When the rank holds both the embedding stage and the head stage (DualPipe, DualPipeV), the head
    stage's MTP uses the *same* ``nn.Embedding`` object, so its gradients accumulate in one tensor.
    Otherwise the head stage gets its own copy, to be kept in sync by the runtime (all-reduce of
    the embedding gradient between the first and last stage).
    """
    modules: list[Transformer] = []
    first = next((s for s in stages if s.has_embedding), None)
    shared = None
    if first is not None:
        modules_by_stage = {first: Transformer(spec, options, first)}
        shared = modules_by_stage[first].embed_tokens
    else:
        modules_by_stage = {}
    for stage in stages:
        if stage not in modules_by_stage:
            modules_by_stage[stage] = Transformer(spec, options, stage, shared_embedding=shared)
        modules.append(modules_by_stage[stage])
    return modules
