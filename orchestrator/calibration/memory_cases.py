"""The memory-bound kernels of one DeepSeek-V3 layer and of its two ends, as cases for elementwise_bench.py.

Each case is one kernel class of ``simulator.costs.elementwise`` run by one implementation at the
class's real per-layer shape (every instance the layer has, e.g. both RMSNorms), built on demand so
only one case's tensors live at a time. ``in_table`` marks the implementation the cost tables take
for the class; the others are recorded beside it for comparison (the eager code in ``model/`` where
``kernels/`` has a fused kernel, or the reverse). The FP8 weights' quantisation runs once a step, not per
token: its case quantises one MoE layer's FP8 weights on one GPU, at bytes of their own (``step_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplan.kernels.cross_entropy import fused_cross_entropy
from moeplan.kernels.fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_act_both, quant_weight_128x128
from moeplan.kernels.moe_permute import MoEUnpermute, make_dispatch_plan, make_pair_plan, moe_permute, moe_unpermute
from moeplan.kernels.swiglu import swiglu, swiglu_backward
from moeplan.model.fp8 import quantize_tiles
from moeplan.model.fused import mla_key_value, mla_query
from moeplan.model.fused import run as run_fused
from moeplan.model.gate import Gate
from moeplan.model.losses import cross_entropy
from moeplan.model.norm import RMSNorm
from moeplan.model.rope import RotaryEmbedding, apply_rotary
from moeplan.simulator.costs.elementwise import (
    FUSED_LOSS,
    WEIGHT_QUANT,
    KernelBytes,
    fp8_weight_quant_bytes,
    residual_ops,
)
from moeplan.simulator.engine.unit_costs import attention_shapes
from moeplan.simulator.spec.model import ModelSpec

Thunk = Callable[[], object]
BF16 = torch.bfloat16


@dataclass(frozen=True)
class Case:
    """``build(spec, tokens, device)`` returns (forward or None, backward or None) thunks on fresh tensors (a
    class with bytes in one pass only has no thunk for the other). ``step_bytes``: the ideal bytes of a kernel
    run once a step whatever the tokens (the FP8 weights' quantisation); None: the class's bytes per token
    (``memory_classes.class_bytes``) times the tokens. ``padded``: the case runs on the experts' contiguous
    layout, so its bytes count each expert's rows padded to 128 (``memory_classes.case_padded_rows``)."""

    kernel: str
    implementation: str
    in_table: bool
    needs_triton: bool
    shape: Callable[[ModelSpec, int], str]
    build: Callable[[ModelSpec, int, torch.device], tuple[Thunk, Thunk | None]]
    step_bytes: Callable[[ModelSpec], KernelBytes] | None = None
    padded: bool = False  # runs on the experts' contiguous layout: its bytes count the padded rows


def _rand(device, *shape, dtype=BF16, grad=False) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _autograd(run: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]]) -> tuple[Thunk, Thunk]:
    """Forward = ``run()`` (outputs, inputs needing gradients); backward = autograd on one kept graph."""
    outs, ins = run()
    grads = [torch.randn_like(o) for o in outs]
    return run, lambda: torch.autograd.grad(outs, ins, grads, retain_graph=True)


def _rows_k(m: ModelSpec) -> int:
    return m.num_experts_per_tok  # routed rows per token, uniform routing


# ----------------------------------------------------------------------------- norms, adds, RoPE


def _norms(widths: Callable[[ModelSpec], list[tuple[int, int]]], module: bool):
    """RMSNorms of (width, row stride) inputs: F.rms_norm, or model.norm.RMSNorm when ``module``."""
    def build(m: ModelSpec, t: int, dev):
        xs = [_rand(dev, t, stride)[:, :w].detach().requires_grad_() for w, stride in widths(m)]  # split views
        norms = [RMSNorm(x.shape[1], m.rms_norm_eps, BF16).to(dev) for x in xs]

        def run():
            outs = [n(x) if module else F.rms_norm(x, (x.shape[1],), n.weight, m.rms_norm_eps) for n, x in zip(norms, xs)]
            return outs, xs + [n.weight for n in norms]
        return _autograd(run)
    return build


def _hidden_widths(m: ModelSpec) -> list[tuple[int, int]]:
    return [(m.hidden_size, m.hidden_size)] * 2


def _latent_widths(m: ModelSpec) -> list[tuple[int, int]]:
    # q_a_layernorm on q_a_proj's output; kv_a_layernorm on the latent part of kv_a_proj_with_mqa's
    q = [(m.q_lora_rank, m.q_lora_rank)] if m.q_lora_rank else []
    return q + [(m.kv_lora_rank, m.kv_lora_rank + m.qk_rope_head_dim)]


def _residual_add(m: ModelSpec, t: int, dev):
    """A MoE layer's ``elementwise.residual_ops``: its adds of h-wide BF16 tensors and the router input's cast to
    FP32 forward; its gradient sums and the cast back to BF16 backward."""
    adds_fwd, adds_bwd, casts = residual_ops(m, True)
    a, b = [_rand(dev, max(adds_fwd, adds_bwd), t, m.hidden_size) for _ in range(2)]
    wide = torch.randn(casts, t, m.hidden_size, device=dev, dtype=torch.float32)
    fwd = lambda: ([a[i] + b[i] for i in range(adds_fwd)], [a[i].float() for i in range(casts)])
    bwd = lambda: ([a[i] + b[i] for i in range(adds_bwd)], [wide[i].to(torch.bfloat16) for i in range(casts)])
    return fwd, bwd


def _rope(m: ModelSpec, t: int, dev):
    nope, r, heads = m.qk_nope_head_dim, m.qk_rope_head_dim, m.num_attention_heads
    q_rope = _rand(dev, 1, t, heads, nope + r)[..., nope:].detach().requires_grad_()  # (B, T, H, R) view of q
    k_rope = _rand(dev, 1, t, m.kv_lora_rank + r)[..., m.kv_lora_rank:].unsqueeze(2).detach().requires_grad_()
    cos, sin = RotaryEmbedding(m)(torch.arange(t, device=dev))
    return _autograd(lambda: ([apply_rotary(q_rope, cos, sin), apply_rotary(k_rope, cos, sin)], [q_rope, k_rope]))


def _qk_parts(m: ModelSpec, t: int, dev):
    """``model.attention``'s operands of the assembly: q (B, T, H, n + R), kv_b_proj's output (B, T, H, n + v),
    the shared RoPE key (B, T, R) (a view of kv_a_proj's output), cos and sin."""
    if not m.is_mla:
        raise NotImplementedError("the query and key assembly is MLA's; this model has none")
    nope, r, heads = m.qk_nope_head_dim, m.qk_rope_head_dim, m.num_attention_heads
    q = _rand(dev, 1, t, heads, nope + r, grad=True)
    kv = _rand(dev, 1, t, heads, nope + m.v_head_dim, grad=True)
    k_rope = _rand(dev, 1, t, m.kv_lora_rank + r)[..., m.kv_lora_rank:].detach().requires_grad_()
    cos, sin = RotaryEmbedding(m)(torch.arange(t, device=dev))
    return q, kv, k_rope, cos, sin


def _qk_cat(m: ModelSpec, t: int, dev):
    """The concatenations alone, as the eager runtime runs them beside ``apply_rotary``: q's parts, k's no-RoPE
    part with the shared key broadcast to every head; backward their splits and the KV split's (a cat)."""
    q, kv, k_rope, _, _ = _qk_parts(m, t, dev)
    nope = m.qk_nope_head_dim

    def run():
        q_nope, q_pe = q.split([nope, m.qk_rope_head_dim], dim=-1)
        k_nope, v = kv.split([nope, m.v_head_dim], dim=-1)
        k_pe = k_rope.unsqueeze(2).expand(-1, -1, m.num_attention_heads, -1)
        return [torch.cat((q_nope, q_pe), dim=-1), torch.cat((k_nope, k_pe), dim=-1), v], [q, kv, k_rope]
    return _autograd(run)


def _fused_rope(m: ModelSpec, t: int, dev):
    """``model.fused.mla_query`` and ``mla_key_value`` compiled, as the fused runtime runs them (RoPE and the
    assembly in one kernel each way; the KV split, its backward included, inside the key's)."""
    q, kv, k_rope, cos, sin = _qk_parts(m, t, dev)

    def run():
        k, v = run_fused(mla_key_value, True, kv, k_rope, cos, sin, m.qk_nope_head_dim)
        return [run_fused(mla_query, True, q, cos, sin, m.qk_nope_head_dim), k, v], [q, kv, k_rope]
    return _autograd(run)


# ----------------------------------------------------------------------------- FP8 casts, SwiGLU


def _cast_widths(m: ModelSpec) -> list[int]:
    """Inputs of the FP8 linears whose cast is a kernel of its own (as simulator.costs.elementwise counts)."""
    return [m.hidden_size, m.hidden_size, m.q_lora_rank or 0, m.kv_lora_rank or 0, m.num_attention_heads * m.v_head_dim]


def _fp8_cast(ours: bool):
    def build(m: ModelSpec, t: int, dev):
        xs = [_rand(dev, t, w) for w in _cast_widths(m) if w]
        dys = [torch.randn_like(x) for x in xs]
        if ours:
            fwd = lambda: [quant_act_1x128(x) for x in xs]
            bwd = lambda: [(quant_act_1x128(dy), quant_act_128x1_t(x)) for x, dy in zip(xs, dys)]
        else:  # model/linear.py: quantize_tiles of x; in backward of dy, and of dy^T and x^T for Wgrad
            fwd = lambda: [quantize_tiles(x, 128) for x in xs]
            bwd = lambda: [(quantize_tiles(dy, 128), quantize_tiles(x.t(), 128)) for x, dy in zip(xs, dys)]
        return fwd, bwd
    return build


def _fused_fp8_cast(m: ModelSpec, t: int, dev):
    """``model.linear`` under FP8 with an FP8 backward: x cast with transpose in the forward, dy in the backward."""
    xs = [_rand(dev, t, w) for w in _cast_widths(m) if w]
    dys = [torch.randn_like(x) for x in xs]
    return lambda: [quant_act_both(x) for x in xs], lambda: [quant_act_both(dy) for dy in dys]


def _expert_cast(m: ModelSpec, t: int, dev):
    """``model.fused_experts``' FP8 backward: down's and gate_up's output gradients (in the padded expert layout)
    cast with transpose, and the tokens' rows gathered again into 128x1 tiles for gate_up's Wgrad."""
    plan = make_dispatch_plan(_routing(m, t, dev), m.n_routed_experts)
    x = _rand(dev, t, m.hidden_size)
    g_down = _rand(dev, plan.num_rows, m.hidden_size)
    g_gate_up = _rand(dev, plan.num_rows, 2 * m.moe_intermediate_size)
    return None, lambda: (quant_act_both(g_down), quant_act_both(g_gate_up), moe_permute(x, plan, quantize="128x1_t"))


def _swiglu_rows(m: ModelSpec, t: int) -> int:
    return t * (_rows_k(m) + m.n_shared_experts)


def _swiglu(ours: bool):
    def build(m: ModelSpec, t: int, dev):
        h = _rand(dev, _swiglu_rows(m, t), 2 * m.moe_intermediate_size, grad=not ours)
        if ours:
            dact = _rand(dev, h.shape[0], m.moe_intermediate_size)
            return lambda: swiglu(h), lambda: swiglu_backward(h, dact)

        def run():  # model/experts.py
            gate, up = h.chunk(2, dim=-1)
            return [F.silu(gate) * up], [h]
        return _autograd(run)
    return build


# ----------------------------------------------------------------------------- router, permute, combine


def _routing(m: ModelSpec, t: int, dev) -> torch.Tensor:
    """Uniform top-k expert ids (T, k), int64."""
    return torch.rand(t, m.n_routed_experts, device=dev).topk(_rows_k(m), dim=-1).indices


def _router(fuse: bool):
    """``model.gate.Gate.route`` from FP32 logits, eager or (``fuse``, as ``ModelOptions.fuse_memory_bound`` sets
    it) through ``model.fused.route`` compiled; backward: the logits' gradient through the weights."""
    def build(m: ModelSpec, t: int, dev):
        gate = Gate(m).to(dev)
        gate.fuse = fuse
        logits = _rand(dev, t, m.n_routed_experts, dtype=torch.float32, grad=True)
        return _autograd(lambda: ([gate.route(logits).weights], [logits]))
    return build


def _dispatch_plan(m: ModelSpec, t: int, dev):
    """The routed experts' row plan as the FP8 experts on Hopper make it: the pairs counted per expert and planned
    for the worst case (``model.experts.GroupedExperts``, no host sync); no backward."""
    ids = _routing(m, t, dev)
    token_of_pair = torch.arange(t, device=dev).repeat_interleave(ids.shape[1])
    expert_of_pair = ids.reshape(-1)
    return lambda: (torch.bincount(expert_of_pair, minlength=m.n_routed_experts),
                    make_pair_plan(token_of_pair, expert_of_pair, t, m.n_routed_experts)), None


def _permute(ours: bool):
    def build(m: ModelSpec, t: int, dev):
        ids = _routing(m, t, dev)
        if ours:
            plan = make_dispatch_plan(ids, m.n_routed_experts)
            x = _rand(dev, t, m.hidden_size)
            g = _rand(dev, plan.num_rows, m.hidden_size)
            return lambda: moe_permute(x, plan), lambda: moe_unpermute(g, plan)  # MoEPermute's forward, backward
        x = _rand(dev, t, m.hidden_size, grad=True)
        token_of = torch.argsort(ids.reshape(-1), stable=True) // ids.shape[1]
        return _autograd(lambda: ([x[token_of]], [x]))  # model/experts.py
    return build


def _combine(ours: bool):
    def build(m: ModelSpec, t: int, dev):
        ids, k, h = _routing(m, t, dev), _rows_k(m), m.hidden_size
        w = torch.rand(t, k, device=dev, requires_grad=True)
        if ours:
            plan = make_dispatch_plan(ids, m.n_routed_experts)
            y = _rand(dev, plan.num_rows, h, grad=True)
            return _autograd(lambda: ([MoEUnpermute.apply(y, w, plan)], [y, w]))
        order = torch.argsort(ids.reshape(-1), stable=True)
        token_of = order // k
        y = _rand(dev, t * k, h, grad=True)

        def run():  # model/experts.py
            rows = (y.float() * w.reshape(-1)[order, None]).to(BF16)
            return [y.new_zeros(t, h).index_add(0, token_of, rows)], [y, w]
        return _autograd(run)
    return build


# ----------------------------------------------------------------------------- once a step

WEIGHT_QUANT_EXPERTS = 32  # routed experts one GPU holds: V3's 256 at EP = 8 (benchmarks/model_step.py's layers)


def _weight_quant_shapes(m: ModelSpec) -> list[tuple[int, ...]]:
    """One MoE layer's FP8 weights on one GPU as the runtime holds them, (out, in): the attention projections
    (``engine.unit_costs.attention_shapes``), the shared experts' gate, up and down (``model.mlp.MLP``) and
    ``WEIGHT_QUANT_EXPERTS`` (at most all) routed experts' gate_up (E, 2f, h) and down (E, h, f)
    (``model.experts.GroupedExperts``): ``engine.unit_costs.fp8_weight_params`` of the layer at EP = the
    routed experts / those."""
    h, f = m.hidden_size, m.moe_intermediate_size
    attn, up = attention_shapes(m)
    shared, experts = f * m.n_shared_experts, min(WEIGHT_QUANT_EXPERTS, m.n_routed_experts)
    dense = [(o, i) for i, o in attn + up] + ([(shared, h), (shared, h), (h, shared)] if shared else [])
    return dense + [(experts, 2 * f, h), (experts, h, f)]


def weight_quant_params(m: ModelSpec) -> int:
    """The parameters ``_weight_quant`` quantises."""
    return sum(math.prod(s) for s in _weight_quant_shapes(m))


def _weight_quant_bytes(m: ModelSpec) -> KernelBytes:
    return KernelBytes(fp8_weight_quant_bytes(weight_quant_params(m), transposed=True), 0.0)


def _weight_quant(m: ModelSpec, t: int, dev):
    """``model.fp8.Fp8WeightCache.with_transpose``'s kernel on each weight: W and W^T in 128x128 blocks from one
    read of W (an FP8 backward's; its weights' cache misses once a step)."""
    ws = [_rand(dev, *s) for s in _weight_quant_shapes(m)]
    return lambda: [quant_weight_128x128(w, transposed=True) for w in ws], None


def _weight_quant_shape(m: ModelSpec, t: int) -> str:
    experts = min(WEIGHT_QUANT_EXPERTS, m.n_routed_experts)
    return (f"one MoE layer's {weight_quant_params(m) / 1e6:,.1f} M FP8 parameters ({experts} of "
            f"{m.n_routed_experts} routed experts), once a step")


# ----------------------------------------------------------------------------- the two ends


def _embedding(m: ModelSpec, t: int, dev):
    table = _rand(dev, m.vocab_size, m.hidden_size)
    ids = torch.randint(0, m.vocab_size, (1, t), device=dev)
    return lambda: F.embedding(ids, table), None


def _cross_entropy(upcast: bool, fused: bool = False):
    def build(m: ModelSpec, t: int, dev):
        logits = _rand(dev, 1, t, m.vocab_size, grad=True)
        targets = torch.randint(0, m.vocab_size, (1, t), device=dev)
        def loss() -> torch.Tensor:
            if fused:
                return fused_cross_entropy(logits.flatten(0, 1), targets.flatten())
            if upcast:
                return cross_entropy(logits, targets)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        out = loss()
        return loss, lambda: torch.autograd.grad(out, logits, retain_graph=True)
    return build


def _rows(n: Callable[[ModelSpec, int], int], width: Callable[[ModelSpec], object]) -> Callable[[ModelSpec, int], str]:
    return lambda m, t: f"{n(m, t)} x {width(m)}"


CASES = (
    Case("rms_norm", "torch.nn.functional.rms_norm", True, False,
         _rows(lambda m, t: t, lambda m: f"{m.hidden_size}, 2 norms"), _norms(_hidden_widths, module=False)),
    Case("eager_rms_norm", "model.norm.RMSNorm (eager, FP32 statistics)", True, False,
         _rows(lambda m, t: t, lambda m: f"{m.hidden_size}, 2 norms"), _norms(_hidden_widths, module=True)),
    Case("latent_norm", "torch.nn.functional.rms_norm", True, False,
         _rows(lambda m, t: t, lambda m: f"{m.q_lora_rank} and {m.kv_lora_rank} (a view of {m.kv_lora_rank + m.qk_rope_head_dim})"),
         _norms(_latent_widths, module=False)),
    Case("eager_latent_norm", "model.norm.RMSNorm (eager, FP32 statistics)", True, False,
         _rows(lambda m, t: t, lambda m: f"{m.q_lora_rank} and {m.kv_lora_rank}"), _norms(_latent_widths, module=True)),
    Case("residual_add", "torch.add (and the router input's casts)", True, False,
         _rows(lambda m, t: t, lambda m: "{}, {} / {} adds, {} cast".format(m.hidden_size, *residual_ops(m, True))),
         _residual_add),
    Case("rope", "model.rope.apply_rotary (eager)", True, False,
         _rows(lambda m, t: t, lambda m: f"({m.num_attention_heads} + 1) x {m.qk_rope_head_dim}"), _rope),
    Case("qk_cat", "torch.cat of MLA's query and key parts (eager; bwd: their splits and the KV split's cat)",
         True, False, _rows(lambda m, t: t, lambda m: f"{m.num_attention_heads} x ({m.qk_nope_head_dim} + "
                                                      f"{m.qk_rope_head_dim}), kv {m.qk_nope_head_dim} + {m.v_head_dim}"),
         _qk_cat),
    Case("fused_rope", "model.fused.mla_query + mla_key_value compiled (RoPE, the assembly and the KV split)", True,
         True, _rows(lambda m, t: t, lambda m: f"{m.num_attention_heads} x ({m.qk_nope_head_dim} + "
                                               f"{m.qk_rope_head_dim}), kv {m.qk_nope_head_dim} + {m.v_head_dim}"),
         _fused_rope),
    Case("fp8_cast", "kernels.fp8_quant.quant_act_1x128 (bwd: + quant_act_128x1_t)", True, True,
         _rows(lambda m, t: t, lambda m: " + ".join(str(w) for w in _cast_widths(m) if w)), _fp8_cast(ours=True)),
    Case("fp8_cast", "model.fp8.quantize_tiles (eager)", False, False,
         _rows(lambda m, t: t, lambda m: " + ".join(str(w) for w in _cast_widths(m) if w)), _fp8_cast(ours=False)),
    Case("fused_fp8_cast", "kernels.fp8_quant.quant_act_both (x forward, dy backward)", True, True,
         _rows(lambda m, t: t, lambda m: " + ".join(str(w) for w in _cast_widths(m) if w)), _fused_fp8_cast),
    Case("expert_cast", "kernels.fp8_quant.quant_act_both of down's and gate_up's gradients + "
         "moe_permute(quantize='128x1_t')", True, True,
         _rows(lambda m, t: t, lambda m: f"{_rows_k(m)} rows (padded per expert) of {m.hidden_size} and "
                                         f"{2 * m.moe_intermediate_size}, backward only"), _expert_cast,
         padded=True),
    Case("swiglu", "kernels.swiglu.swiglu / swiglu_backward", True, True,
         _rows(_swiglu_rows, lambda m: 2 * m.moe_intermediate_size), _swiglu(ours=True)),
    Case("eager_swiglu", "F.silu(gate) * up (eager, model/experts.py)", True, False,
         _rows(_swiglu_rows, lambda m: 2 * m.moe_intermediate_size), _swiglu(ours=False)),
    Case("router", "model.gate.Gate.route (sigmoid, group limit, top-k; FP32)", True, False,
         _rows(lambda m, t: t, lambda m: m.n_routed_experts), _router(fuse=False)),
    Case("fused_router", "model.fused.route compiled (model.gate.Gate with fuse on; FP32)", True, True,
         _rows(lambda m, t: t, lambda m: m.n_routed_experts), _router(fuse=True)),
    Case("dispatch_plan", "kernels.moe_permute.make_pair_plan (worst-case rows) and the per-expert counts", True,
         False, _rows(lambda m, t: t, lambda m: f"{_rows_k(m)} of {m.n_routed_experts} experts"), _dispatch_plan),
    Case("permute", "kernels.moe_permute.moe_permute (bwd: moe_unpermute)", True, True,
         _rows(lambda m, t: t, lambda m: f"{m.hidden_size} -> {_rows_k(m)} copies (padded per expert)"),
         _permute(ours=True), padded=True),
    Case("eager_permute", "x[token_of] (eager, model/experts.py)", True, False,
         _rows(lambda m, t: t, lambda m: f"{m.hidden_size} -> {_rows_k(m)} copies"), _permute(ours=False)),
    Case("combine", "kernels.moe_permute.MoEUnpermute", True, True,
         _rows(lambda m, t: t, lambda m: f"{_rows_k(m)} rows of {m.hidden_size} -> 1"), _combine(ours=True)),
    Case("eager_combine", "weights then index_add (eager, model/experts.py)", True, False,
         _rows(lambda m, t: t, lambda m: f"{_rows_k(m)} rows of {m.hidden_size} -> 1"), _combine(ours=False)),
    Case("embedding", "torch.nn.functional.embedding", True, False,
         _rows(lambda m, t: t, lambda m: f"{m.hidden_size} from {m.vocab_size}"), _embedding),
    Case("cross_entropy", "model.losses.cross_entropy (chunked FP32 softmax of the BF16 logits)", True, False,
         _rows(lambda m, t: t, lambda m: m.vocab_size), _cross_entropy(upcast=True)),
    Case("cross_entropy", "F.cross_entropy of the BF16 logits", False, False,
         _rows(lambda m, t: t, lambda m: m.vocab_size), _cross_entropy(upcast=False)),
    Case(FUSED_LOSS, "kernels.cross_entropy (training.kernels.loss = fused)", True, True,
         _rows(lambda m, t: t, lambda m: m.vocab_size), _cross_entropy(upcast=False, fused=True)),
    Case(WEIGHT_QUANT, "kernels.fp8_quant.quant_weight_128x128(w, transposed=True) of each weight", True, True,
         _weight_quant_shape, _weight_quant, step_bytes=_weight_quant_bytes),
)
