"""The host term's two measurements (``simulator.costs.host``): seconds per framework op, ops per piece.

- ``op_costs(device, reps)``: a micro-benchmark on tiny tensors (4 x 8, so the kernel itself costs next to
  nothing): each forward op kind called from Python on tensors that need gradients (autograd records a
  node, as in training), timed per call over runs of ``INNER`` calls (``reps`` runs, fewer past
  ``timing.MAX_S``) and divided by the ops the call dispatches (counted); the backward class is a chain of ``CHAIN`` such steps whose ``backward()`` is timed and divided
  by the ops it dispatches. On a GPU the same calls are timed without synchronising: what the host spends
  issuing them.
- ``count_pieces(spec, ...)``: each piece of the model (``costs.host.PIECES``) built alone from the model's
  own classes, on the measuring device itself, and run once forward and once backward at the plan's micro-batch shape under
  ``OpCounter``, a ``TorchDispatchMode`` that counts every dispatched aten op, split into compute and view
  ops; GEMM and attention-core ops (``PRICED``) are counted apart and left out of the host term.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moeplan.model.block import Block, LayerFactory
from moeplan.model.losses import cross_entropy
from moeplan.model.mtp import MTPModule
from moeplan.model.options import ModelOptions
from moeplan.model.rope import RotaryEmbedding
from moeplan.model.runtime.optimizer import MOMENT_DTYPES, adamw_update
from moeplan.model.transformer import init_module_weights
from moeplan.orchestrator.calibration.timing import MAX_S, MIN_REPS
from moeplan.simulator.costs.host import HostOpCost, HostOpCount, Piece
from moeplan.simulator.costs.measured_ops import ActionKind, LayerKind, MeasuredOp
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.training import OptimizerSpec

# aten ops whose time the GEMM and attention entries measure whole (their call included)
PRICED = frozenset({"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm",
                    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
                    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"})
ALIASES = frozenset({"detach", "alias", "lift_fresh", "_unsafe_view"})  # no kernel, like views
INNER, CHAIN = 64, 32


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops: ``compute``, ``view`` (no kernel) and ``priced`` (GEMM, attention core)."""

    def __init__(self) -> None:
        super().__init__()
        self.compute = self.view = self.priced = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in PRICED:
            self.priced += 1
        elif func.is_view or name in ALIASES:
            self.view += 1
        else:
            self.compute += 1
        return func(*args, **(kwargs or {}))

    @property
    def host(self) -> int:
        return self.compute + self.view


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call_s(fn: Callable[[], object], device: torch.device, reps: int, max_s: float = MAX_S) -> float:
    """Median seconds per call of ``fn`` over runs of ``INNER`` calls (host time: no synchronisation inside);
    ``reps`` runs, fewer once the runs took ``max_s`` (never fewer than ``MIN_REPS``)."""
    for _ in range(INNER):
        fn()
    times: list[float] = []
    while len(times) < reps and (len(times) < MIN_REPS or sum(times) * INNER < max_s):
        _sync(device)
        start = time.perf_counter()
        for _ in range(INNER):
            fn()
        times.append((time.perf_counter() - start) / INNER)
    return statistics.median(times)


def _dispatched(fn: Callable[[], object]) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def op_costs(device: torch.device, reps: int, label: str) -> list[HostOpCost]:
    """Seconds per dispatched op of each forward kind (compute and view classes) and of backward."""
    x, y = (torch.randn(4, 8, device=device, requires_grad=True) for _ in range(2))
    kinds = {"fwd_compute": {"add": lambda: x + y, "mul": lambda: x * y, "sum": lambda: x.sum(-1),
                             "pow": lambda: x.pow(2), "cat": lambda: torch.cat((x, y), -1), "silu": lambda: F.silu(x),
                             "softmax": lambda: x.softmax(-1), "to": lambda: x.to(torch.float64)},
             "fwd_view": {"view": lambda: x.view(-1), "transpose": lambda: x.t(), "unsqueeze": lambda: x.unsqueeze(0),
                          "slice": lambda: x[1:], "detach": lambda: x.detach()}}
    out = []
    for op_class, fns in kinds.items():
        for op, fn in fns.items():
            ops = max(1, _dispatched(fn).host)
            out.append(HostOpCost(op=op, op_class=op_class, s=_per_call_s(fn, device, reps) / ops,  # type: ignore[arg-type]
                                  source=f"{label}: {op} on 4x8 {device.type} tensors needing grad, {ops} op(s) a call"))

    def chain() -> torch.Tensor:
        h = x
        for _ in range(CHAIN):
            h = (h * y + x).sum(-1, keepdim=True) * h
        return h.sum()

    ops = _dispatched(lambda: chain().backward()).host - _dispatched(chain).host
    with_bwd = _per_call_s(lambda: chain().backward(), device, max(3, reps // 8))
    fwd_only = _per_call_s(chain, device, max(3, reps // 8))
    out.append(HostOpCost(op="chain backward", op_class="bwd", s=max(with_bwd - fwd_only, 1e-9) / max(1, ops),
                          source=f"{label}: backward of a {CHAIN}-step chain of mul/add/sum on 4x8 {device.type} "
                                 f"tensors over its {ops} dispatched ops"))
    return out


def _fwd_bwd(run: Callable[[], torch.Tensor]) -> tuple[OpCounter, OpCounter]:
    """Counters of ``run()`` (forward) and of the backward of its output (a given gradient: no extra op)."""
    with OpCounter() as fwd:
        out = run()
    grad = torch.ones_like(out)
    with OpCounter() as bwd:
        out.backward(grad)
    return fwd, bwd


def _count(piece: Piece, fwd: OpCounter, bwd: OpCounter, tokens: int, seq: int, label: str) -> HostOpCount:
    return HostOpCount(piece=piece, fwd_compute=fwd.compute, fwd_view=fwd.view, bwd=bwd.host,
                       priced=fwd.priced + bwd.priced, tokens=tokens, seq_len=seq, source=label)


def count_pieces(spec: ModelSpec, mbs: int, seq: int, dtype: torch.dtype, device: torch.device,
                 label: str) -> list[HostOpCount]:
    """Ops per micro-batch of (``mbs``, ``seq``) tokens of every piece the model has (see module docstring)."""
    torch.manual_seed(0)
    with torch.device(device):  # built where they run: V3's layers and head are 1.7G parameters to initialise
        return _count_pieces(spec, mbs, seq, dtype, device, label)


Thunk = Callable[[], torch.Tensor]


def _setting(spec: ModelSpec, mbs: int, seq: int, dtype: torch.dtype, device: torch.device):
    """What every piece is built from: the layer factory, RoPE's cos and sin, and a maker of fresh hidden states
    (mbs, seq, d) that need grad."""
    factory = LayerFactory.create(spec, ModelOptions(dtype=dtype))
    cos, sin = RotaryEmbedding(spec).to(device)(torch.arange(seq, device=device))

    def hidden() -> torch.Tensor:
        return torch.randn(mbs, seq, spec.hidden_size, device=device, dtype=dtype, requires_grad=True)
    return factory, cos, sin, hidden


def _layer_halves(spec: ModelSpec, factory, cos, sin, hidden, device) -> Iterator[tuple[str, int, Thunk, Thunk]]:
    """(kind, layer, attention half, FFN half) of a dense and a MoE layer where the model has them: each half its
    norm, its module and its residual, on one block with the model's initialisation."""
    kinds = [("dense", 0)] if spec.first_k_dense_replace > 0 or not spec.is_moe else []
    kinds += [("moe", spec.first_k_dense_replace)] if spec.is_moe else []
    for kind, layer in kinds:
        block, x = _initialised(Block(layer, factory).to(device), spec), hidden()
        yield (kind, layer, lambda x=x, b=block: x + b.self_attn(b.input_layernorm(x), cos, sin),
               lambda x=x, b=block: x + b.mlp(b.post_attention_layernorm(x)))


def _mtp_thunks(spec: ModelSpec, factory, cos, sin, hidden, device) -> tuple[Thunk, Thunk, Thunk]:
    """(the whole MTP module, its projection and attention half, its FFN half) on one initialised module."""
    mtp, x, emb = _initialised(MTPModule(spec.num_hidden_layers, factory).to(device), spec), hidden(), hidden()

    def attn() -> torch.Tensor:  # MTPModule.forward up to its FFN half: the projection, then attention
        h = mtp.eh_proj(torch.cat((mtp.enorm(emb), mtp.hnorm(x)), dim=-1))
        return h + mtp.self_attn(mtp.input_layernorm(h), cos, sin)
    return (lambda: mtp(x, emb, cos, sin)), attn, (lambda: x + mtp.mlp(mtp.post_attention_layernorm(x)))


def _count_pieces(spec: ModelSpec, mbs: int, seq: int, dtype: torch.dtype, device: torch.device,
                  label: str) -> list[HostOpCount]:
    factory, cos, sin, hidden = _setting(spec, mbs, seq, dtype, device)
    tokens = mbs * seq
    src = f"{label}: counted at {mbs} x {seq} tokens, {str(dtype).removeprefix('torch.')}"
    out = []
    for kind, layer, attn_half, ffn_half in _layer_halves(spec, factory, cos, sin, hidden, device):
        out.append(_count(f"{kind}_attn", *_fwd_bwd(attn_half), tokens, seq, f"{src}, layer {layer}"))
        out.append(_count(f"{kind}_ffn", *_fwd_bwd(ffn_half), tokens, seq, f"{src}, layer {layer}"))
    if spec.num_nextn_predict_layers:
        whole_run, _, ffn_run = _mtp_thunks(spec, factory, cos, sin, hidden, device)
        whole, ffn = _fwd_bwd(whole_run), _fwd_bwd(ffn_run)
        attn = [OpCounter() for _ in range(2)]
        for c, w, f in zip(attn, whole, ffn, strict=True):
            c.compute, c.view, c.priced = (max(0, a - b) for a, b in ((w.compute, f.compute), (w.view, f.view),
                                                                     (w.priced, f.priced)))
        out.append(_count("mtp_attn", *attn, tokens, seq, f"{src}, MTP module less its FFN half"))
        out.append(_count("mtp_ffn", *ffn, tokens, seq, f"{src}, MTP module"))
    out += _ends(spec, mbs, seq, dtype, device, tokens, src)
    return out


def time_pieces(spec: ModelSpec, mbs: int, seq: int, dtype: torch.dtype, device: torch.device, reps: int,
                label: str, expert_parallel: bool = False) -> list[MeasuredOp]:
    """Each piece ``count_pieces`` counts, timed whole on this device at one micro-batch of (``mbs``, ``seq``):
    the median wall time of its forward and of the backward of its output, as the engine's ops
    (``costs.measured_ops``: what ``check --recalibrate`` reads from a run's trace, here from the pieces alone).
    For a CPU, where the thread that issues each op also runs it: the tiny-tensor per-op cost (``op_costs``) is
    a third of what the model's own modules cost per op in context (tiny-moe, 2026-12-06: 4-6 us an op in the
    attention and dense halves, 10-13 us in the MoE half, against 1.5-1.8 us), so the ops of a small model are
    priced from their own time. A MoE half runs all experts locally: with ``expert_parallel`` it is left out
    (the all-to-all and the local share are priced). The MTP module's attention half is its projection of the
    two normed inputs and its attention, timed as such (``MTPModule.forward`` up to the FFN half)."""
    torch.manual_seed(0)
    # no ``with torch.device(...)`` here: its function mode runs Python on every op, a third more per op at this size
    return _time_pieces(spec, mbs, seq, dtype, device, reps, label, expert_parallel)


def _initialised(module: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """``module`` with the model's own initialisation (a piece built alone holds ``torch.empty`` weights: a router
    on garbage sends every token to a few experts, and denormal or NaN values slow a CPU's arithmetic)."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(0)
    init_module_weights(module, spec.initializer_range, lambda name, shape: torch.randn(
        shape, generator=gen, device=gen.device, dtype=torch.float32))
    return module


def _timed(run: Callable[[], torch.Tensor], reps: int) -> tuple[float, float]:
    """Median seconds of ``run()`` and of the backward of its output (two untimed calls first)."""
    fwd, bwd = [], []
    for i in range(reps + 2):
        start = time.perf_counter()
        out = run()
        mid = time.perf_counter()
        out.backward(torch.ones_like(out))
        end = time.perf_counter()
        if i >= 2:
            fwd.append(mid - start)
            bwd.append(end - mid)
    return statistics.median(fwd), statistics.median(bwd)


def _time_pieces(spec: ModelSpec, mbs: int, seq: int, dtype: torch.dtype, device: torch.device, reps: int,
                 label: str, expert_parallel: bool) -> list[MeasuredOp]:
    factory, cos, sin, hidden = _setting(spec, mbs, seq, dtype, device)
    tokens = mbs * seq
    src = f"{label}: timed alone at {mbs} x {seq} tokens, {str(dtype).removeprefix('torch.')}"
    out: list[MeasuredOp] = []

    def op(kind: LayerKind, action: ActionKind, name: str, seconds: float, what: str) -> None:
        out.append(MeasuredOp(layer_kind=kind, action=action, op=name, tokens=tokens, seq_len=seq, s=seconds,
                              samples=reps, source=f"{src}, {what}"))

    def halves(kind: LayerKind, moe: bool, attn_half: Thunk, ffn_half: Thunk, what: str) -> None:
        f, b = _timed(attn_half, reps)
        op(kind, "F", "attn", f, f"{what}'s attention half")
        op(kind, "B", "attn-bwd", b, f"{what}'s attention half")
        if moe and expert_parallel:
            return
        f, b = _timed(ffn_half, reps)
        if not moe:
            op(kind, "F", "mlp", f, f"{what}'s FFN half")
            op(kind, "B", "mlp-bwd", b, f"{what}'s FFN half")
            return
        op(kind, "F", "experts", f, f"{what}'s FFN half")  # the whole MoE half; the shared expert inside it
        op(kind, "B", "experts-bwd", b, f"{what}'s FFN half")
        op(kind, "F", "shared", 0.0, f"{what}'s FFN half (in the experts' time)")
        op(kind, "B", "shared-bwd", 0.0, f"{what}'s FFN half (in the experts' time)")

    for kind, layer, attn_half, ffn_half in _layer_halves(spec, factory, cos, sin, hidden, device):
        halves(kind, kind == "moe", attn_half, ffn_half, f"layer {layer}")
    if spec.num_nextn_predict_layers:
        _, attn_half, ffn_half = _mtp_thunks(spec, factory, cos, sin, hidden, device)
        halves("mtp", spec.is_moe, attn_half, ffn_half, "the MTP module (its input projection in the attention half)")
    norm, head = (_initialised(m.to(device), spec) for m in (factory.norm(), factory.make_linear(spec.hidden_size,
                                                                                                  spec.vocab_size)))
    x, labels = hidden(), torch.randint(0, spec.vocab_size, (mbs, seq), device=device)
    f, b = _timed(lambda: cross_entropy(head(norm(x)), labels), reps)
    op("ends", "F", "head", f, "final norm, output head and cross-entropy")
    op("ends", "B", "head", b, "final norm, output head and cross-entropy")
    return out


def _ends(spec: ModelSpec, mbs: int, seq: int, dtype: torch.dtype, device: torch.device, tokens: int,
          src: str) -> list[HostOpCount]:
    """The embedding, one head with its loss, and one optimizer tensor's AdamW step."""
    embed = torch.nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
    ids = torch.randint(0, spec.vocab_size, (mbs, seq), device=device)
    factory = LayerFactory.create(spec, ModelOptions(dtype=dtype))
    norm = factory.norm().to(device)
    head = factory.make_linear(spec.hidden_size, spec.vocab_size).to(device)
    x = torch.randn(mbs, seq, spec.hidden_size, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, spec.vocab_size, (mbs, seq), device=device)
    # the runtime's update of one parameter (ZeRO group of one) or one shard: ``adamw_update`` at the default
    # storage (BF16 moments and weights), the torch reference on a CPU, ``kernels.adamw`` on a GPU
    storage = OptimizerSpec()
    grad, master = torch.ones(1024, device=device), torch.zeros(1024, device=device)
    moments = [torch.zeros(1024, device=device, dtype=MOMENT_DTYPES[storage.moment_bytes]) for _ in range(2)]
    weight = torch.empty(1024, device=device, dtype=torch.bfloat16)
    with OpCounter() as opt:
        adamw_update(grad, master, *moments, out=weight, lr=1e-4, step=1, beta1=storage.beta1, beta2=storage.beta2,
                     eps=storage.eps, weight_decay=storage.weight_decay)
    return [_count("embedding", *_fwd_bwd(lambda: embed(ids)), tokens, seq, f"{src}, nn.Embedding"),
            _count("head", *_fwd_bwd(lambda: cross_entropy(head(norm(x)), labels)), tokens, seq,
                   f"{src}, final norm, output head and cross-entropy"),
            _count("optimizer", opt, OpCounter(), tokens, seq, f"{src}, the runtime's AdamW update of one tensor")]
