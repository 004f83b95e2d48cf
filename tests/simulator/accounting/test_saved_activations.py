"""The accounting's activation bytes against what the real model keeps for backward, on CPU.

A tiny V3-shaped stage (MLA, a dense first layer, group-limited sigmoid routing, a shared expert, the
head and its loss) runs its forward node by node as the runtime does (``model.runtime.overlap``). Kept
bytes per node = the distinct storages autograd saves in it (``saved_tensors_hooks``), parameters left out,
plus the node outputs the tape holds. ``model.fused``'s functions run op by op (``fusion="eager"``, what
CPU runs) and compiled (``fusion="fused"``, what a GPU runs: here Inductor's CPU backend, whose
partitioner decides what is saved as on CUDA; the routed experts' fused path, ``model.fused_experts``, on
Triton's interpreter). CPU SDPA falls back to the math path for MLA's unequal head dims
(it keeps the T x T probabilities), so attention runs through a stand-in that keeps what CUDA's flash /
memory-efficient kernels keep: q, k, v, the output (laid out (B, T, H, Dv)) and an FP32 log-sum-exp.
Left out by the accounting, and added here where known: each norm's FP32 statistic per row, the RoPE
cos/sin tables (kept once, by the first layer) and the token ids; inside the tolerance: the experts'
offsets and the balance loss's (B, E) sums.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from moeplan.model import attention, experts, fused, losses, mlp, norm
from moeplan.model.options import ModelOptions
from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.overlap import Pass, drain, stage_forward
from moeplan.model.runtime.overlap_comm import DistComm, Streams
from moeplan.model.transformer import Transformer
from moeplan.simulator.accounting import activations
from moeplan.simulator.accounting.activations import head_activation_bytes_per_token, layer_activation_bytes_per_token
from moeplan.simulator.presets.models import tiny_moe

TOLERANCE_FRAC = 0.01  # the small terms of the module docstring: 0.5% of a MoE layer at these sizes
NORMS_PER_LAYER = 4  # input_layernorm, q_a_layernorm, kv_a_layernorm, post_attention_layernorm


class _FlashStandIn(torch.autograd.Function):
    """Causal attention keeping what CUDA's fused kernels keep (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):  # (B, H, T, D) each
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        lse = scores.logsumexp(-1)  # (B, H, T) FP32
        out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype).transpose(1, 2)
        out.copy_((scores - lse[..., None]).exp() @ v.float())
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            ref = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, scale=ctx.scale)
            return (*torch.autograd.grad(ref, leaves, grad), None)


def _kept_bytes_per_node(spec, seq: int, fuse: bool) -> dict[str, float]:
    """Op name of each node of one micro-batch's forward -> bytes it keeps (saved storages, new ones only,
    and its outputs' storages); the tape's input ports are charged to the node that made them."""
    torch.manual_seed(0)
    model = Transformer(spec, ModelOptions(dtype=torch.bfloat16, with_mtp=False, fuse_memory_bound=fuse))
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, spec.vocab_size, (1, seq))
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, tuple[int, str]] = {}
    alive = []  # every storage seen stays allocated, so no later one reuses its address
    node = ["setup"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        alive.append(s)
        if s.data_ptr() not in owned:
            kept.setdefault(s.data_ptr(), (s.nbytes(), node[0]))
        return t

    p = Pass(DistComm(), Streams(torch.device("cpu")), Timeline(0, False), "0F0")
    run = p.run

    def named_run(op, fn):
        node[0] = op
        return run(op, fn)

    p.run = named_run
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tape = drain(stage_forward(model, ids, ids, lambda out: losses.training_loss(out, ids, 0.0).total, p))
    for n in tape.nodes:  # a node output is charged to its maker, whichever node saved it
        for port in n.outs:
            if port is not None and port.value is not None and port.value.dim():
                s = port.value.untyped_storage()
                kept[s.data_ptr()] = (s.nbytes(), n.op)
    by_node: dict[str, float] = {}
    for nbytes, op in kept.values():
        by_node[op] = by_node.get(op, 0.0) + nbytes
    return by_node


def _compiled_anywhere(fn, fuse, *args, **kwargs):  # model.fused.run, compiling on CPU too
    return fused._compiled(fn)(*args, **kwargs) if fuse else fn(*args, **kwargs)


@pytest.fixture(scope="module", params=["eager", "fused"])
def stage(request):
    spec = tiny_moe().model_copy(update={"num_hidden_layers": 3, "num_nextn_predict_layers": 0})
    seq = 128
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.nn.functional, "scaled_dot_product_attention",
               lambda q, k, v, is_causal, scale: _FlashStandIn.apply(q, k, v, scale))
    for module in (norm, attention, mlp):
        mp.setattr(module, "run", _compiled_anywhere)
    # the experts' fused BF16 path, a GPU's, here on Triton's interpreter
    mp.setattr(experts.GroupedExperts, "fused_bf16", lambda self, x: self.fuse)
    try:
        return spec, seq, request.param, _kept_bytes_per_node(spec, seq, request.param == "fused")
    finally:
        mp.undo()


def _plan_bytes_per_token(spec) -> float:
    """The fused experts' dispatch plan (four int32 maps per pair, one pointer per token): kept by the autograd
    function as an attribute, so the saved-tensor hooks cannot see it; the accounting counts it."""
    return 4 * 4 * spec.num_experts_per_tok + 4


def test_each_layer_keeps_what_the_accounting_counts(stage):
    spec, seq, fusion, kept = stage
    h = spec.hidden_size
    for i in range(spec.num_hidden_layers):
        mlp = "experts" if spec.is_moe_layer(i) else "mlp"
        # a layer's node outputs are the next layer's input and its own mid-layer residual; its own input
        # is the previous node's output: count the layer as "its nodes, minus its output, plus its input"
        measured = kept[f"L{i} attn"] + kept[f"L{i} {mlp}"]
        known = 4 * NORMS_PER_LAYER + (2 * 4 * spec.qk_rope_head_dim // 2 if i == 0 else 0)  # statistics, cos/sin
        known -= _plan_bytes_per_token(spec) if fusion == "fused" and mlp == "experts" else 0
        predicted = seq * (layer_activation_bytes_per_token(spec, i, "bf16", "none", fusion) + known)
        assert measured == pytest.approx(predicted, rel=TOLERANCE_FRAC), (i, measured / seq, predicted / seq)
    assert kept["embed"] == seq * (2 * h + 8)  # the first layer's input and the int64 token ids


def test_the_head_keeps_its_logits_in_bf16_not_fp32_log_probabilities(stage):
    spec, seq, fusion, kept = stage
    predicted = seq * (head_activation_bytes_per_token(spec, fusion) + 4)  # and the final norm's statistic
    assert kept["head"] == pytest.approx(predicted, rel=TOLERANCE_FRAC), (kept["head"] / seq, predicted / seq)
    assert kept["head"] < seq * 4 * spec.vocab_size  # F.cross_entropy(logits.float()) kept 4 B per logit


def test_the_stage_total_matches(stage):
    spec, seq, fusion, kept = stage
    layers = sum(layer_activation_bytes_per_token(spec, u, "bf16", "none", fusion)
                 for u in range(spec.num_hidden_layers))
    known = 4 * (NORMS_PER_LAYER * spec.num_hidden_layers + 1) + 4 * spec.qk_rope_head_dim + 8  # + the token ids
    if fusion == "fused":
        known -= sum(spec.is_moe_layer(u) for u in range(spec.num_hidden_layers)) * _plan_bytes_per_token(spec)
    predicted = seq * (layers + head_activation_bytes_per_token(spec, fusion) + 2 * spec.hidden_size + known)
    assert sum(kept.values()) == pytest.approx(predicted, rel=TOLERANCE_FRAC)


def test_the_loss_chunk_is_priced_with_the_runtimes_constant():
    assert activations.LOSS_CHUNK_ELEMENTS == losses.LOSS_CHUNK_ELEMENTS
