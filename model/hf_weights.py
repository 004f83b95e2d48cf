"""Checkpoint naming: DeepSeek's published layout, transformers 5.x's fused layout, and ours.

Published (DeepSeek-V3 on the Hub, also what transformers 4.x used):
- ``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``;
- ``model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight``, ``...self_attn.{q_a_proj,
  q_a_layernorm,q_b_proj | q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight``;
- dense layers ``...mlp.{gate_proj,up_proj,down_proj}.weight``; MoE layers ``...mlp.gate.weight``,
  ``...mlp.gate.e_score_correction_bias``, ``...mlp.shared_experts.{gate,up,down}_proj.weight``,
  ``...mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight``;
- MTP depth k at ``model.layers.{num_hidden_layers + k - 1}``: a full layer plus ``enorm``, ``hnorm``,
  ``eh_proj``, ``shared_head.norm`` and copies of the shared ``embed_tokens`` / ``shared_head.head``;
- FP8 release: E4M3 ``weight`` + FP32 ``weight_scale_inv`` per 128x128 block (dequant = product).
transformers 5.x: experts fused per layer as ``...mlp.experts.gate_up_proj`` (E, 2I, d) (gate rows
first) and ``...mlp.experts.down_proj`` (E, d, I), no ``.weight`` suffix; MTP layers not modelled.
Ours (``Transformer.state_dict()``): published names without ``model.``, experts fused as in
transformers 5.x, MTP depth k as ``mtp.{k-1}.*`` without the shared copies.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from moeplan.model.fp8 import FP8_DTYPE, dequantize_blocks
from moeplan.simulator.spec.model import ModelSpec

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def dequantize_fp8_state_dict(state_dict: dict[str, torch.Tensor], block: int = 128,
                              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Replace every (``X.weight`` FP8, ``X.weight_scale_inv``) pair by the dequantised weight."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("weight_scale_inv"):
            continue
        scale_key = key + "_scale_inv"
        if scale_key in state_dict:
            out[key] = dequantize_blocks(value, state_dict[scale_key], block, dtype)
        elif value.dtype in (FP8_DTYPE, torch.float8_e5m2):
            raise ValueError(f"{key} is {value.dtype} but {scale_key} is missing")
        else:
            out[key] = value
    return out


def published_to_fused(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors -> transformers 5.x fused ``gate_up_proj`` / ``down_proj`` (other keys kept)."""
    experts: dict[int, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out = {}
    for key, value in state_dict.items():
        m = _EXPERT.match(key)
        if m:
            experts[int(m[1])][m[3]][int(m[2])] = value
        else:
            out[key] = value
    for layer, parts in experts.items():
        num = len(parts["gate_proj"])
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if sorted(parts[proj]) != list(range(num)):
                raise ValueError(f"layer {layer}: {proj} has experts {sorted(parts[proj])}, expected 0..{num - 1}")
        gate = torch.stack([parts["gate_proj"][e] for e in range(num)])  # (E, I, d)
        up = torch.stack([parts["up_proj"][e] for e in range(num)])
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat((gate, up), dim=1)  # (E, 2I, d)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(num)])
    return out


def fused_to_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x fused experts -> one ``gate_proj/up_proj/down_proj.weight`` per expert."""
    out = {}
    for key, value in state_dict.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = value
            continue
        prefix = f"model.layers.{m[1]}.mlp.experts"
        if m[2] == "gate_up_proj":
            gate, up = value.chunk(2, dim=1)  # (E, I, d) each
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate[e].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = up[e].clone()
        else:
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].clone()
    return out


def to_internal(state_dict: dict[str, torch.Tensor], spec: ModelSpec, block: int = 128) -> dict[str, torch.Tensor]:
    """Published or transformers-5.x names (FP8 or not) -> our ``Transformer`` names."""
    fused = published_to_fused(dequantize_fp8_state_dict(state_dict, block))
    out = {}
    for key, value in fused.items():
        if key.endswith(_IGNORED_SUFFIXES) or value.numel() == 0:
            continue  # zero-size tensors: transformers builds an empty shared expert for n_shared_experts=0
        if not key.startswith("model.layers."):
            out[key.removeprefix("model.")] = value
            continue
        m = _LAYER.match(key)
        layer, rest = int(m[1]), m[2]
        if layer < spec.num_hidden_layers:
            out[f"layers.{layer}.{rest}"] = value
        elif rest not in _SHARED_COPIES:
            out[f"mtp.{layer - spec.num_hidden_layers}.{rest}"] = value
    return out


def from_internal(state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Our names -> the published layout (per-expert tensors; MTP layers with the shared copies)."""
    out = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head == "mtp":
            depth, _, rest = rest.partition(".")
            out[f"model.layers.{spec.num_hidden_layers + int(depth)}.{rest}"] = value
        elif head == "lm_head":
            out[key] = value
        else:
            out[f"model.{key}"] = value
    for depth in {int(k.split(".")[1]) for k in state_dict if k.startswith("mtp.")}:
        prefix = f"model.layers.{spec.num_hidden_layers + depth}"
        if "embed_tokens.weight" in state_dict:
            out[f"{prefix}.embed_tokens.weight"] = state_dict["embed_tokens.weight"]
        if "lm_head.weight" in state_dict:
            out[f"{prefix}.shared_head.head.weight"] = state_dict["lm_head.weight"]
    return fused_to_published(out)


@dataclass(frozen=True)
class LoadReport:
    loaded: int
    other_stages: list[str]  # keys for parts this module (stage) does not hold


def _belongs_here(module: nn.Module, key: str) -> bool:
    """Whether ``key`` names a part this (stage) module holds, so a missing match is an error."""
    head, _, rest = key.partition(".")
    if head == "layers":
        return rest.partition(".")[0] in module.layers
    if head == "mtp":
        return hasattr(module, "mtp") and int(rest.partition(".")[0]) < len(module.mtp)
    return hasattr(module, head)


@torch.no_grad()
def load_hf_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadReport:
    """Copy a published / transformers-5.x / FP8 checkpoint (or a shard of one) into ``module``.

    Keys for layers the module does not hold (another pipeline stage) are skipped and reported.
    With ``strict``, unknown keys for held parts, shape mismatches and (for a full checkpoint)
    missing keys raise ``ValueError`` naming them.
    """
    internal = to_internal(state_dict, module.spec, module.options.fp8_block_size)
    own = module.state_dict()
    unexpected, other, loaded = [], [], 0
    for key, value in internal.items():
        if key not in own:
            (unexpected if _belongs_here(module, key) else other).append(key)
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}")
        own[key].copy_(value.to(own[key].dtype))
        loaded += 1
    missing = sorted(set(own) - set(internal))
    if strict and (unexpected or missing):
        raise ValueError(f"checkpoint mismatch: unexpected={sorted(unexpected)[:10]} missing={missing[:10]}"
                         f" ({len(unexpected)} unexpected, {len(missing)} missing)")
    if other:
        logger.info("skipped %d keys of other pipeline stages", len(other))
    return LoadReport(loaded=loaded, other_stages=sorted(other))
