"""Compute and memory measurements of one process, for ``moeplan calibrate`` and benchmarks/cpu_tables.py.

Everything runs in the calling process on ``device`` (the CPU by default, at ``torch.set_num_threads`` as the
caller set it: the runtime's ranks run one thread each; or a CUDA GPU, timed by CUDA events). A time is the
median of up to ``reps`` calls after warm-up, fewer past ``timing.MAX_S`` (``timing.median_s``).

- GEMMs: every shape the simulator prices for a model (``gemm_shapes``: the linears of
  ``engine.unit_costs`` in their forward, input-gradient and weight-gradient forms at each token count,
  and the routed experts' grouped products at each expert-parallel size), ``torch.mm`` for dense ones
  and, for grouped ones, what the model's experts run on a CPU (``model/experts.py``'s "auto" takes
  ``torch._grouped_mm`` on CUDA only): the padded ``bmm`` of ``model.grouped_mm.reference_grouped_mm``,
  here with equal rows per group (no padding); plus a square ``PEAK_N``-sized GEMM for the peak. On a GPU the
  BF16 weight gradients the runtime adds into FP32 main gradients inside the GEMM are also timed that way
  (``wgrad_main_grad_s``: until 2026-12-07 the experts' were timed as ``torch._grouped_mm`` writing BF16, which the
  fused experts' backward does not run).
- Attention: causal ``F.scaled_dot_product_attention`` with the model's head dims at each sequence
  length (one sequence), forward and forward + backward, FLOPs as ``attention_core_flops``, on operands
  strided as ``model.attention`` passes them.
- Memory: ``Tensor.copy_`` of 16 KiB to 64 MiB buffers (bytes read + written).
- Optimizer: one step over a flat FP32 shard of half the model's parameters (MTP included: a rank's share
  at pp 2), at most ``OPTIMIZER_MAX_PARAMS`` of them (the step is element-wise and streams memory: a
  larger shard takes proportionally longer at the same rate), at the simulator's ideal bytes of its norm,
  update and zero (``costs.optimizer_step.one_shard_bytes_per_param``). The step is what the runtime's ZeRO-1
  step runs per parameter (``model.runtime.optimizer``: the FP32 norm read in ``CHUNK`` parts, ``adamw_update``
  with the plan's moment and parameter dtypes, the gradient zeroed): ``kernels.adamw`` on a GPU, the torch
  reference in ``CHUNK`` parts on a CPU (until 2026-12-06 a CPU timed ``torch.optim.AdamW``, which the runtime
  does not run).

Operands are drawn on the measuring device (a GPU draws the V3 stage's 8.9G GEMM operand elements in
milliseconds, one CPU thread in minutes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeplan.model.grouped_mm import reference_grouped_mm
from moeplan.model.weight_grad import fused_main_grad_grouped_mm, fused_main_grad_mm
from moeplan.model.runtime.optimizer import MOMENT_DTYPES, adamw_update, clip_coef, squared_norm
from moeplan.orchestrator.calibration.timing import median_s
from moeplan.simulator.accounting.flops import attention_core_flops
from moeplan.simulator.accounting.params import param_counts
from moeplan.simulator.costs.elementwise import OPTIMIZER
from moeplan.simulator.costs.optimizer_step import one_shard_bytes_per_param
from moeplan.simulator.engine.unit_costs import attention_shapes
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.training import OptimizerSpec

CPU = torch.device("cpu")
PEAK_N = 512
COPY_SIZES = tuple(2**p for p in range(14, 27, 2))  # 16 KiB .. 64 MiB
# 64M parameters: 1.4 GB of traffic a step at 22 B each, 28x the H100/H200's 50 MiB L2 (streams HBM, as the
# whole shard does); 0.9 GB of buffers on a GPU with BF16 moments
OPTIMIZER_MAX_PARAMS = 2**26
PARAM_DTYPES = {2: torch.bfloat16, 4: torch.float32}  # the parameters the runtime's step writes, by param_bytes


def randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Standard normal values drawn on ``device`` itself, in ``dtype``."""
    return torch.randn(*shape, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(seed))


def _linears(m: ModelSpec) -> list[tuple[int, int]]:
    """Every dense linear ``(in, out)`` the simulator prices (``engine.unit_costs``)."""
    attn, up = attention_shapes(m)
    h, shared = m.hidden_size, m.moe_intermediate_size * m.n_shared_experts
    out = attn + up + [(2 * h, h), (h, 2 * m.intermediate_size), (m.intermediate_size, h), (h, m.vocab_size)]
    if m.is_moe:
        out += [(h, m.n_routed_experts)] + ([(h, 2 * shared), (shared, h)] if shared else [])
    return out


def linear_wgrads(m: ModelSpec, tokens: int) -> list[tuple[int, int, int, int]]:
    """(out, in, tokens, 1): every dense linear's weight gradient (``gemm_shapes``' third form) at ``tokens``."""
    return sorted({(o, i, tokens, 1) for i, o in _linears(m)})


def gemm_shapes(m: ModelSpec, tokens: list[int], eps: list[int]) -> list[tuple[int, int, int, int]]:
    """(m, n, k, groups) of every GEMM the simulator prices for ``m`` at these token counts and EP sizes."""
    shapes = set()
    for t in tokens:
        for i, o in _linears(m):
            shapes |= {(t, o, i, 1), (t, i, o, 1), (o, i, t, 1)}  # forward, input and weight gradient
        if not m.is_moe:
            continue
        h, f = m.hidden_size, m.moe_intermediate_size
        for ep in eps:
            groups = m.n_routed_experts // ep
            uniform = max(1, round(t * m.num_experts_per_tok / m.n_routed_experts))
            for per in sorted({uniform, 2 * uniform}):  # uniform routing, and a busiest expert at twice it
                shapes |= {(per, 2 * f, h, groups), (per, h, f, groups), (per, h, 2 * f, groups),
                           (per, f, h, groups), (2 * f, h, per, groups), (h, f, per, groups)}
    return sorted(shapes)


def gemm_s(m: int, n: int, k: int, groups: int, dtype: torch.dtype, reps: int, device: torch.device = CPU) -> float:
    """Median seconds of ``groups`` products (m x k)(k x n) in ``dtype`` (grouped: ``torch._grouped_mm`` on
    CUDA, the padded ``bmm`` reference elsewhere, as ``model/experts.py``'s "auto" chooses)."""
    if groups == 1:
        a, b = randn(m, k, dtype=dtype, device=device), randn(k, n, dtype=dtype, device=device, seed=1)
        return median_s(lambda: torch.mm(a, b), device, reps)
    a = randn(groups * m, k, dtype=dtype, device=device)
    b = randn(groups, k, n, dtype=dtype, device=device, seed=1)
    offs = (torch.arange(1, groups + 1, dtype=torch.int32) * m).to(device)
    grouped = torch._grouped_mm if device.type == "cuda" and hasattr(torch, "_grouped_mm") else reference_grouped_mm
    return median_s(lambda: grouped(a, b, offs=offs), device, reps)


def wgrad_main_grad_s(m: int, n: int, k: int, groups: int, reps: int, device: torch.device) -> float:
    """Median seconds of ``groups`` BF16 weight gradients (m x k)(k x n) added into FP32 main gradients by the GEMM,
    as the runtime runs them on a GPU, its operands laid out as there: a linear's ``fused_main_grad_mm`` (one
    ``addmm``, beta 1, of the output gradient's transpose (m x k tokens) and the input (k x n)), the experts'
    ``fused_main_grad_grouped_mm`` (an ``addmm`` an expert over its ``k`` rows, the bounds on the host). Raises
    where the runtime cannot (a CPU, a torch without ``addmm`` into FP32): its Wgrads are then written in BF16 and
    added by the main-grad hook, which the tables price apart."""
    g = randn(groups * k, m, dtype=torch.bfloat16, device=device)  # the output gradient, tokens x out
    x = randn(groups * k, n, dtype=torch.bfloat16, device=device, seed=1)  # the input, tokens x in
    param = torch.empty(0, device=device)
    param.main_grad = torch.zeros((m, n) if groups == 1 else (groups, m, n), dtype=torch.float32, device=device)
    if groups == 1:
        def wgrad() -> bool:
            return fused_main_grad_mm(param, g.t(), x)
    else:
        bounds = [e * k for e in range(groups + 1)]

        def wgrad() -> bool:
            return fused_main_grad_grouped_mm(param, g, x, bounds)
    if not wgrad():
        raise RuntimeError(f"no BF16 addmm into FP32 on {device} (torch {torch.__version__}): the runtime's "
                           "Wgrads are written in BF16 there and added by the main-grad hook")
    return median_s(wgrad, device, reps)


def gemm_rows(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, reps: int,
              device: torch.device = CPU) -> list[dict]:
    return [_gemm_row(m, n, k, g, gemm_s(m, n, k, g, dtype, reps, device)) for m, n, k, g in shapes]


def wgrad_main_grad_row(shape: tuple[int, int, int, int], reps: int, device: torch.device) -> dict:
    """``gemm_rows``' row of one weight gradient timed into FP32 main gradients (``wgrad_main_grad_s``)."""
    m, n, k, g = shape
    return _gemm_row(m, n, k, g, wgrad_main_grad_s(m, n, k, g, reps, device)) | {"main_grad": True}


def _gemm_row(m: int, n: int, k: int, groups: int, s: float) -> dict:
    return {"m": m, "n": n, "k": k, "groups": groups, "s": s, "flops_per_s": 2.0 * groups * m * n * k / s}


def peak_gemm_row(dtype: torch.dtype, reps: int) -> dict:
    """A square ``PEAK_N`` GEMM: the throughput a large product reaches on one thread."""
    return gemm_rows([(PEAK_N, PEAK_N, PEAK_N, 1)], dtype, reps)[0]


def attention_rows(m: ModelSpec, seqs: list[int], dtype: torch.dtype, reps: int,
                   device: torch.device = CPU) -> list[dict]:
    """Causal SDPA over one sequence of each length: seconds and FLOPs (forward; forward + backward as 3x).
    The operands are laid out as ``model.attention`` passes them: (batch, seq, heads, dim) tensors seen as
    (batch, heads, seq, dim), MLA's values a slice of the KV up-projection's output beside the keys' no-RoPE
    part, the output's gradient coming back through ``o_proj`` in (batch, seq, heads, dim); the kernel a backend
    picks, and its speed, depend on these strides."""
    heads, dq, dv = m.num_attention_heads, m.qk_head_dim, m.v_head_dim if m.is_mla else m.gqa_head_dim
    rows = []
    for seq in seqs:
        q, k = (randn(1, seq, heads, dq, dtype=dtype, device=device, seed=i).requires_grad_() for i in range(2))
        if m.is_mla:  # kv_b_proj's output (B, T, H, Dnope + Dv), v its last Dv columns
            kv = randn(1, seq, heads, m.qk_nope_head_dim + dv, dtype=dtype, device=device, seed=2)
            v = kv[..., m.qk_nope_head_dim:].detach().requires_grad_()
        else:
            v = randn(1, seq, heads, dv, dtype=dtype, device=device, seed=2).requires_grad_()
        leaves = (q, k, v)
        q, k, v = (t.transpose(1, 2) for t in leaves)
        grad = randn(1, seq, heads, dv, dtype=dtype, device=device, seed=3).transpose(1, 2)

        def fwd(q=q, k=k, v=v) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd(q=q, k=k, v=v, grad=grad, leaves=leaves) -> None:
            torch.autograd.backward(fwd(q, k, v), grad)
            for t in leaves:
                t.grad = None

        with torch.no_grad():
            fwd_s = median_s(fwd, device, reps)
        flops = attention_core_flops(m, seq) * seq
        rows.append({"seq": seq, "flops": flops, "fwd_s": fwd_s, "fwd_bwd_s": median_s(fwd_bwd, device, reps)})
    return rows


def copy_rows(reps: int, sizes: tuple[int, ...] = COPY_SIZES, device: torch.device = CPU) -> list[dict]:
    """``dst.copy_(src)`` of each size: bytes read + written per second."""
    rows = []
    for size in sizes:
        src, dst = torch.ones(size // 4, device=device), torch.empty(size // 4, device=device)
        s = median_s(lambda src=src, dst=dst: dst.copy_(src), device, reps)
        rows.append({"bytes": size, "s": s, "bytes_per_s": 2.0 * size / s})
    return rows


def optimizer_params(m: ModelSpec) -> int:
    """Parameters of the optimizer measurement's shard: half the model's, at most ``OPTIMIZER_MAX_PARAMS``."""
    return min(param_counts(m).total_with_mtp // 2, OPTIMIZER_MAX_PARAMS)


def _runtime_step(params: int, opt: OptimizerSpec, device: torch.device):
    """A thunk of what ``model.runtime.optimizer.ZeroAdamW.step`` runs per parameter (see above): the FP32 norm
    with its one host sync, ``adamw_update`` (``kernels.adamw`` on a GPU, the torch reference in ``CHUNK`` parts
    elsewhere) at the plan's moment and parameter dtypes, and the zeroing of the main gradients."""
    if opt.moment_bytes not in MOMENT_DTYPES or opt.param_bytes not in PARAM_DTYPES:
        raise ValueError(f"training.optimizer.moment_bytes={opt.moment_bytes}, param_bytes={opt.param_bytes}: the "
                         f"runtime stores moments in {sorted(MOMENT_DTYPES)} bytes, parameters in {sorted(PARAM_DTYPES)}")
    grad = randn(params, dtype=torch.float32, device=device)
    master = torch.zeros(params, dtype=torch.float32, device=device)
    moments = [torch.zeros(params, dtype=MOMENT_DTYPES[opt.moment_bytes], device=device) for _ in range(2)]
    weight = torch.empty(params, dtype=PARAM_DTYPES[opt.param_bytes], device=device)  # the parameters, written

    def step() -> None:
        norm = math.sqrt(float(squared_norm(grad)))  # the runtime step's one host sync
        coef = clip_coef(norm, opt.grad_clip_norm)
        adamw_update(grad, master, *moments, out=weight, lr=opt.lr.peak_lr, step=1, beta1=opt.beta1,
                     beta2=opt.beta2, eps=opt.eps, weight_decay=opt.weight_decay, grad_scale=coef)
        grad.zero_()  # the main gradients, zeroed for the next step
    update = "kernels.adamw" if device.type == "cuda" else "the torch AdamW reference in CHUNK parts"
    return step, f"{update} ({opt.moment_bytes}-byte moments) with the runtime's FP32 norm and zeroing"


def optimizer_row(m: ModelSpec, reps: int, peak_bytes_per_s: float, device: torch.device = CPU,
                  opt: OptimizerSpec | None = None) -> dict:
    """The optimizer class as an ``elementwise_bench`` row: one step over a flat FP32 shard (see above)."""
    params = optimizer_params(m)
    opt = opt or OptimizerSpec()
    step, implementation = _runtime_step(params, opt, device)
    s, nbytes = median_s(step, device, reps), one_shard_bytes_per_param(opt) * params
    return {"kernel": OPTIMIZER, "implementation": implementation, "in_table": True,
            "shape": f"{params:,} parameters", "skipped": None, "bwd": None,
            "fwd": {"bytes": nbytes, "s": s, "bytes_per_s": nbytes / s, "hbm_frac": nbytes / s / peak_bytes_per_s}}
