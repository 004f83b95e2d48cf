"""Tensor (TP) and sequence (SP) parallelism: what one GPU of a TP group holds and computes.

The split is Megatron-LM's (Shoeybi et al. 2019, "Megatron-LM", §3): in each attention block the
projections that make queries, keys and values are column-parallel (split by heads) and the output
projection row-parallel; in a dense SwiGLU MLP gate and up are column-parallel and down row-parallel
(split by the intermediate width); the embedding and the output head are vocabulary-parallel (rows
padded to a multiple of ``tp`` as Megatron pads them; here the first ranks take one more row). For
MLA the down-projections (``q_a``, ``kv_a``) and the latent norms stay whole on every TP rank and the
up-projections and output projection split by heads, as Megatron-Core's ``MLASelfAttention``.
Norms, routers, shared and routed experts and MTP's ``eh_proj`` are not split here (routed experts:
expert tensor parallel size 1; see ``spec.parallel.ParallelSpec``).

So a TP rank computes a *slice* of the model: ``tp_slice`` returns it as a ``ModelSpec`` with
``num_attention_heads / tp`` heads (and KV heads), ``intermediate_size / tp`` and the vocabulary
share. Every per-token formula written for a whole model (GEMM shapes, the attention core, the
activation bytes a layer keeps) then gives the TP rank's share: width-``h`` and latent terms stay
whole, head- and intermediate-width terms divide by ``tp``.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", §4.2 and Table 2): without SP a TP rank keeps the width-``h`` tensors outside the TP
regions whole (their ``10 sbh`` term: the norm inputs, the inputs of the first linears and the
dropout masks) and ``1/t`` of the rest (``24/t + 5as/(ht)``); with SP it keeps ``1/t`` of
everything (``(34 + 5as/h)/t``). ``layer_activation_bytes_per_token_tp`` applies exactly that to
this repository's activation model (``accounting.activations``: flash attention, so no ``5as/h``
score term; no dropout, so no masks).
"""

from __future__ import annotations

from moeplan.simulator.accounting.activations import layer_activation_bytes_per_token
from moeplan.simulator.accounting.params import attention_params
from moeplan.simulator.spec.hardware import ClusterSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec, RecomputeKind


class TensorParallelError(ValueError):
    """A tensor-parallel size the model or the cluster cannot split."""


def check_tp(m: ModelSpec, cluster: ClusterSpec, parallel: ParallelSpec) -> None:
    """``tp`` must split the heads (and KV heads), the dense MLP and stay inside one node."""
    tp = parallel.tp
    if tp == 1:
        return
    per_node = cluster.node.gpus_per_node
    if tp > per_node or per_node % tp:
        raise TensorParallelError(f"tp={tp} must divide the {per_node} GPUs of a node (a TP group stays on NVLink)")
    if m.num_attention_heads % tp:
        raise TensorParallelError(f"tp={tp} must divide num_attention_heads={m.num_attention_heads}")
    if not m.is_mla and m.kv_heads % tp:
        raise TensorParallelError(f"tp={tp} must divide num_key_value_heads={m.kv_heads}")
    if m.num_dense_layers and m.intermediate_size % tp:
        raise TensorParallelError(f"tp={tp} must divide intermediate_size={m.intermediate_size}")
    if m.is_moe and not parallel.sp:
        raise TensorParallelError(f"tp={tp} with routed experts needs sp=true (each TP rank routes its own "
                                  "1/tp of the sequence, as Megatron requires)")
    if parallel.cp > 1:
        raise TensorParallelError(f"tp={tp} with cp={parallel.cp}: tensor and context parallelism together are "
                                  "not modelled (use one of them)")
    tokens = parallel.micro_batch_size * parallel.seq_len_tokens
    if tokens < tp:  # each TP rank routes (and, under SP, norms) its own 1/tp of the micro-batch's tokens
        raise TensorParallelError(f"tp={tp} exceeds the {tokens} token(s) of a micro-batch "
                                  f"(micro_batch_size={parallel.micro_batch_size} x "
                                  f"seq_len_tokens={parallel.seq_len_tokens}): a TP rank would hold none")


def shard_rows(rows: int, tp: int, rank: int = 0) -> int:
    """Rows of a vocabulary-parallel table that TP rank ``rank`` holds (the first ranks one more)."""
    base, extra = divmod(rows, tp)
    return base + (1 if rank < extra else 0)


def tp_slice(m: ModelSpec, tp: int) -> ModelSpec:
    """The part of ``m`` one TP rank (rank 0, the busiest) computes: heads, KV heads, dense MLP width and
    vocabulary divided by ``tp``; everything else whole. ``check_tp`` must have passed."""
    if tp == 1:
        return m
    update = {"num_attention_heads": m.num_attention_heads // tp, "intermediate_size": m.intermediate_size // tp or 1,
              "vocab_size": shard_rows(m.vocab_size, tp), "name": f"{m.name} (tp={tp} shard)"}
    if not m.is_mla:  # keep the head width: it was derived from hidden / heads
        update |= {"head_dim": m.gqa_head_dim, "num_key_value_heads": m.kv_heads // tp}
    return m.model_copy(update=update)


def attention_split_params(m: ModelSpec) -> int:
    """Parameters of one attention block that TP splits by heads (the rest is replicated on every TP rank):
    GQA's q, k, v (weights and biases) and the output weight; MLA's up-projections and output weight."""
    heads = m.num_attention_heads
    if m.is_mla:
        assert m.kv_lora_rank is not None
        q = heads * m.qk_head_dim * (m.q_lora_rank or m.hidden_size)
        return q + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim) + heads * m.v_head_dim * m.hidden_size
    hd, bias = m.gqa_head_dim, m.attention_bias
    qkv = (heads + 2 * m.kv_heads) * hd
    return m.hidden_size * qkv + (qkv if bias else 0) + heads * hd * m.hidden_size


def split_counts(m: ModelSpec, counts: dict[str, int]) -> tuple[int, int]:
    """(split, replicated) parameters of one layer unit's counts (keys of ``params.decoder_layer_params``,
    ``projection`` for MTP); routed experts are left out (they are expert-parallel)."""
    split = 0
    if counts.get("attention"):
        assert counts["attention"] == attention_params(m), "counts must come from the whole model"
        split += attention_split_params(m)
    split += counts.get("dense_mlp", 0)
    total = sum(v for k, v in counts.items() if k != "routed_experts")
    return split, total - split


def layer_activation_bytes_per_token_tp(m: ModelSpec, unit: int, precision: str, recompute: RecomputeKind,
                                        tp: int, sp: bool, fusion: str = "fused") -> float:
    """Bytes per token (of the micro-batch's whole sequence) one TP rank keeps for one layer unit: with
    ``sp`` 1/tp of the whole layer's, else the TP slice's (width-``h`` terms whole, the rest 1/tp):
    Korthikanti et al. 2022, Table 2."""
    if sp:
        return layer_activation_bytes_per_token(m, unit, precision, recompute, fusion) / tp
    return layer_activation_bytes_per_token(tp_slice(m, tp), unit, precision, recompute, fusion)
