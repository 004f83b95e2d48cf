"""Bytes moved by the memory-bound kernels of one layer and of the model's two ends, by kernel class.

One definition, read by the simulator (``engine.unit_costs`` prices each class's bytes at its own
fraction of HBM bandwidth, ``CostTables.memory_fracs``) and by ``benchmarks/elementwise_bench.py``
(which times each class at these bytes, so a measured fraction times these bytes gives back the
measured seconds). Bytes are *ideal*: every input read once, every output written once; what a real
kernel moves beyond that (a second pass for statistics, an FP32 round trip, re-reads a cache misses)
shows as a lower measured fraction, not as more bytes. Per token; BF16 activations.

Per layer (``h`` hidden, ``q``/``c`` the MLA query/KV latent widths, ``H`` heads, ``R`` RoPE dim,
``f`` expert width, ``k`` expert rows per token, ``s`` shared experts, ``E`` routed experts):

=============== ============================================ ============================================
class           forward                                      backward
=============== ============================================ ============================================
rms_norm        2 norms of h: read x, write y (4 B each)     read x and dy, write dx (6 B each)
latent_norm     norms of q and c: as rms_norm                as rms_norm
residual_add    adds of h (6 B): the 2 residuals, routed +    sums of h where a tensor forks (6 B): the 2
                shared; the router's FP32 copy of its        residuals, MLA's q and kv inputs, gate and up
                input (6 B; ``residual_ops``)                of an MLP, the router, routed and shared
                                                             experts' common input; the FP32 copy's back
rope            (H + 1) R rotated values (4 B) + cos/sin     the same
qk_cat (MLA)    the query and key put together around RoPE:  the reverse (8Hn + 2(H-1)R), and the KV
                q's and k's no-RoPE values copied (4Hn B     up-projection's gradient put together from
                each), the shared rotated key written to     the keys' and the values' (4H(n + v))
                the other H - 1 heads (2(H-1)R)
fp8_cast        1x128 casts of the FP8 linears' inputs:      1x128 of dy and 128x1 (transposed, for the
                2h + q + c + H v_head, 2 + 1 + 4/128 B each  weight gradient) of x: twice the forward
expert_cast     none (the routed rows are cast inside the    the routed experts' FP8 backward (k rows a
                permute, and SwiGLU's output inside it)      token): each of down's and gate_up's output
                                                             gradients (h and 2f wide) cast with transpose
                                                             (2 + 2 (1 + 4/128) B), and the rows gathered
                                                             again into 128x1 tiles for gate_up's Wgrad
                                                             (2 + 1 + 4/128 B of h)
swiglu          (k + s) rows: read gate, up, write act (6f)  read gate, up, d act, write d gate, d up (10f)
router          sigmoid scores over E (fp32, read logits,    read d weights and scores, write d logits
                write scores) and top-k ids and weights      (8 E + 4 k)
dispatch_plan   the experts' row plan from the top-k ids:    none (the plan is reused)
                the pairs sorted by expert and by token,
                the rows' maps (2 8 + 4 4 B a pair, 4 B)
permute         read x once, write k copies (2h + 2kh)       the sum of the copies' gradients (2kh + 2h)
                (the k rows padded, as below)
combine         read k expert rows, write one (2kh + 2h)     read dy and the k rows (for the weights'
                                                             gradient), write k row gradients (4kh + 2h)
=============== ============================================ ============================================

Padding: the kernels on the experts' contiguous layout (``kernels.moe_permute``; DeepGEMM's the same) run over
each expert's segment padded to 128 rows, so where ``layer_bytes_per_token`` is given the padded rows
(``padded_rows_per_token``, ``engine.expert_traffic.padded_rows``) their k is the padded rows a token: the
experts' casts, the routed SwiGLU and the permutation's writes. Few rows an expert make that many more: 1.48x
at 128 rows an expert (a V3 layer's 256 experts on one GPU at 4096 tokens), 1.06x at 1,024.

Ends: ``embedding`` (gather a row of h: read and write 4h; its backward is not modelled) and
``cross_entropy`` over the vocabulary ``V`` (forward reads the BF16 logits, 2V; backward reads them
and writes their gradient, 4V).

Fusion (``training.kernels.fusion``; the tables' fractions are measured at the bytes above, with the
kernels named in their source): ``eager`` is the table above, one kernel per class as moeplan's runtime
runs them. ``fused`` is DeepSeek's stack, each fused kernel one read and one write of what it touches:

- ``permute``, ``combine`` and ``dispatch_plan`` move no bytes of their own where there is a dispatch (expert
  parallelism):
  DeepEP's dispatch writes the received rows in the grouped GEMM's layout (``expert_alignment``,
  ``num_recv_tokens_per_expert_list``) and its combine reduces a token's expert outputs; the backward of
  each is the other (DeepEP README, V2 example; TR §3.2.2: "IB receive + accumulate"). Those bytes are
  the all-to-all's, priced as communication, and DeepEP's notify phase lays the rows out (the dispatch plan).
  Without a dispatch the runtime plans the rows on the compute stream (``kernels.moe_permute.make_pair_plan``:
  radix sorts, scans and scatters, ~0.19 ms a V3-shaped layer and 4096-token micro-batch in
  ``benchmarks/model_step.py``'s H100 trace of 2026-12-07, a class no table priced before); latency-bound, like
  the router, so its measured fraction is low.
- ``fp8_cast``: cast with transpose, one read of the BF16 tensor writing both the 1x128 and the 128x1
  transposed copy (2 + 2 (1 + 4/128) B) instead of two casts that each read it (TR §3.3, §3.5.2): x in the
  forward (its 128x1 copy kept for the weight gradient), dy in the backward (``model.linear``), priced at the
  tables' ``fused_fp8_cast`` point (``kernels.fp8_quant.quant_act_both``).
- ``expert_cast`` is the same under both: the runtime's FP8 experts (``model.fused_experts``) always cast their
  output gradients with transpose. Measured in ``benchmarks/model_step.py``'s FP8 step (H100, 2026-12-06,
  docs/results/model-step.md): 8 ``_quant_both_kernel`` calls of the experts' gradients, 6.3 ms a 4096-token
  micro-batch of 4 layers, which no class had priced.
- ``swiglu`` (FP8): the kernel writes the down-projection's FP8 input and its scales (1 + 4/128 B)
  instead of a BF16 output (TR §3.3: SwiGLU inputs cached in FP8, output recomputed and quantised).
  The routed experts keep only SwiGLU's input (gate and up) and redo its output in backward for the
  down-projection's weight gradient (``model/fused_experts.py``: ``_swiglu_fwd_kernel`` in BF16,
  ``_swiglu_quant_t_kernel`` writing the 128x1 FP8 copy; TR §3.3 likewise): their rows' forward bytes again,
  priced as recompute (``experts_swiglu_redo_bytes``; selective recompute redoes them already). Seen in
  ``benchmarks/model_step.py``'s traces (H100, 2026-12-07): 0.54 ms (BF16) and 0.80 ms (FP8) a micro-batch of 4
  layers, unpriced until then.
- ``rope`` and ``router`` are priced as single kernels at the tables' ``fused_rope`` / ``fused_router``
  points, else at ``memory_frac`` (copy bandwidth): the tables' ``rope`` and ``router`` points time the
  runtime's eager composites of many small kernels. For MLA the fused RoPE kernel is also the query's and
  key's assembly (``model.fused.mla_query`` / ``mla_key_value`` compiled: one kernel each way per tensor, the
  KV split inside the key's; the values' copy it writes, 4Hv B a token, is not counted), so ``rope`` then
  carries the ``qk_cat`` bytes and there is no ``qk_cat`` class. With an FP8 backward the fused runtime moves
  that kernel's backward into the up-projections' output-gradient casts, which read the attention's gradients where
  they lie (``kernels.mla_backward``: RoPE's backward applied to d q as it is loaded, each head's no-RoPE d k and
  d v read in place of their concatenation; the casts' bytes unchanged): ``rope``'s backward is then the shared
  key's gradient alone (``_key_rope_backward``: the heads' R channels of d k summed and rotated back). In
  ``benchmarks/model_step.py``'s FP8 step (H100, 2026-12-07 18:09 UTC) the two kernels it removes took 1.02 and
  0.69 ms a 4096-token micro-batch of 4 V3-shaped layers. ``fused_router`` is ``model.fused.route``
  compiled, as the runtime runs the router under ``ModelOptions.fuse_memory_bound`` (``model.gate``; Inductor
  fuses the elementwise work around the three top-k selections, which stay library calls: generated code seen
  on the CPU, torch 2.13), at the ``router`` bytes. Until 2026-12-06 the runtime had no fused router; the
  packaged tables have no ``fused_router`` point yet, so it is priced at ``memory_frac`` (near zero time),
  where the eager router and the dispatch plan took ~1.4 ms a 4096-token micro-batch of 4 MoE layers on an
  H100 (``docs/results/model-step.md``).

``qk_cat`` (n = ``qk_nope_head_dim``, R = ``qk_rope_head_dim``, v = ``v_head_dim``) is what MLA's attention
moves besides RoPE to hand a standard attention kernel 192-wide queries and keys (``model.attention``: the
no-RoPE and RoPE parts concatenated, the one RoPE key broadcast to the H heads) and, backward, to split
their gradients and put the KV up-projection's gradient back together (autograd's ``split`` backward).
Measured in the one-GPU loop (2026-12-06, H100, ``docs/results/one-gpu.md``): 0.61 ms forward and 0.92 ms
backward a 4096-token micro-batch and layer for these kernels, which the tables had not priced (before this
class the module left "the concatenations around the attention core" out). GQA's q, k and v are views of
one projection: no class.

The loss (``training.kernels.loss``): ``fp32`` is ``model.losses.cross_entropy``, chunk by chunk of rows:
forward one ``log_softmax`` reading the BF16 logits and writing FP32 (read 2V, write 4V), the targets
gathered; backward ``softmax`` again (read 2V, write 4V), minus one at each target, and one multiply by the
row's scale written in BF16 (read 4V, write 2V): 6V forward, 12V backward (``fp32_loss_bytes_per_token``;
until 2026-12-06 it cast the logits to FP32 first and kept FP32 log-probabilities: 14V and 22V). ``fused`` is one pass over the BF16 logits (Liger's
or Megatron's fused cross-entropy): the ``cross_entropy`` bytes above, at the ``fused_cross_entropy`` point.

Selective recompute (``selective_recompute_bytes_per_token``) redoes, in backward, the forward of what
``accounting.activations`` does not store under ``selective`` (TR §3.2.3, §3.3): the attention's input
RMSNorm (one norm of h; the MLP's normed input is kept as the experts' input), the latent norms, q's
RoPE (q is rebuilt by its up-projection), the up-projections' FP8 input casts, and SwiGLU.

Not counted: the weights of norms (read once per micro-batch, not per token), the concatenations and
transposes around the attention core, and the optimizer (its own class, ``OPTIMIZER``, priced part by
part in ``optimizer_step``).

Once a step, not per token: the FP8 weights' quantisation (``fp8_weight_quant_bytes``), its own class
``WEIGHT_QUANT``, priced at the tables' ``fp8_weight_quant`` point (``kernels.fp8_quant.quant_weight_128x128``
with the transposed copy, timed by ``benchmarks/elementwise_bench.py`` over one V3 MoE layer's FP8 weights on one
GPU: the attention projections, the shared expert and 32 of the 256 routed experts, EP = 8;
``orchestrator.calibration.memory_cases``), else at ``memory_frac`` (the copy bandwidth; no stand-in: ``fp8_cast``
times other kernels, 1x128 tiles of activations). Why a class: in ``benchmarks/model_step.py``'s FP8 step (H100,
2026-12-06, ``docs/results/model-step.md``) its ``_quant_blocks_kernel`` took 3.44 ms a micro-batch at 4
micro-batches a step, ~50% of HBM, where the copy bandwidth priced it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.training import Fusion

BF16_BYTES = 2.0
FP32_BYTES = 4.0
INDEX_BYTES = 8.0  # int64 expert ids (torch.topk)
FP8_TILE_BYTES = 1.0 + FP32_BYTES / 128  # e4m3 and a 1x128 (or 128x1) tile's FP32 scale
FP8_CAST_BYTES = BF16_BYTES + FP8_TILE_BYTES  # read BF16, write e4m3 and its scale
FP8_BOTH_BYTES = BF16_BYTES + 2 * FP8_TILE_BYTES  # cast with transpose: read BF16, write both tilings
INT32_BYTES = 4.0
# The dispatch plan (``kernels.moe_permute.make_pair_plan``): each (token, expert) pair's token and expert read
# (int64 each), its row's source token, expert tile and destination and its place in token order written (int32
# each); a token's pair pointer (int32).
PLAN_BYTES_PER_PAIR = 2 * INDEX_BYTES + 4 * INT32_BYTES

LAYER_KERNELS = ("rms_norm", "latent_norm", "residual_add", "rope", "qk_cat", "fp8_cast", "expert_cast", "swiglu",
                 "router", "dispatch_plan", "permute", "combine")
END_KERNELS = ("embedding", "cross_entropy")
# Under fusion="fused" these classes are priced at their fused kernel's point (not measured by the
# packaged tables: memory_frac); the loss="fused" cross-entropy likewise
FUSED_CLASSES = {"rope": "fused_rope", "router": "fused_router", "fp8_cast": "fused_fp8_cast"}
FUSED_LOSS = "fused_cross_entropy"
OPTIMIZER = "optimizer"
WEIGHT_QUANT = "fp8_weight_quant"  # the FP8 weights' quantisation, once a step (module docstring)
# Under fusion="eager" the runtime runs these op by op (``model/fused.py``'s functions uncompiled; the BF16 routed
# experts of ``model/experts.py``: x[token_of], F.silu(gate) * up, index_add), where the tables' class times a
# single kernel (``F.rms_norm``, ``kernels.swiglu``, ``kernels.moe_permute``). Each is priced at the point of its
# op-by-op code where the tables measured it (the measurement files time it beside the kernel: 1.4-28x lower
# fractions of HBM on the H200), else at the kernel's (``STAND_INS``). The experts' classes
# (``EAGER_EXPERT_CLASSES``) only where the routed experts run op by op: a BF16 run (the FP8 experts are
# ``model.fused_experts``' kernels in both).
EAGER_CLASSES = {"rms_norm": "eager_rms_norm", "latent_norm": "eager_latent_norm", "swiglu": "eager_swiglu",
                 "permute": "eager_permute", "combine": "eager_combine"}
EAGER_EXPERT_CLASSES = frozenset({"swiglu", "permute", "combine"})
# A class the tables have not measured is priced at a measured class run by the same kernels, where there is one
# (``CostTables.memory_fracs``), before the copy bandwidth: the cast with transpose and the experts' casts are
# ``kernels.fp8_quant``'s quantisers, as the measured ``fp8_cast`` is (its casts one at a time); an op-by-op class
# unmeasured takes its single kernel's point (as every eager run was priced until 2026-12-07).
STAND_INS = {"fused_fp8_cast": "fp8_cast", "expert_cast": "fp8_cast"} | {v: k for k, v in EAGER_CLASSES.items()}
def priced_as(kernel: str, precision: str, fusion: Fusion) -> str:
    """The table class a run prices ``kernel`` at: its fused kernel's where the run fuses it (``FUSED_CLASSES``);
    its op-by-op code's where the eager runtime runs it so (``EAGER_CLASSES``; the experts' only in a BF16 run)."""
    if fusion == "fused":
        return FUSED_CLASSES.get(kernel, kernel)
    if kernel in EAGER_CLASSES and (precision != "fp8" or kernel not in EAGER_EXPERT_CLASSES):
        return EAGER_CLASSES[kernel]
    return kernel


KERNEL_CLASSES = (LAYER_KERNELS + END_KERNELS + tuple(FUSED_CLASSES.values()) + (FUSED_LOSS, OPTIMIZER, WEIGHT_QUANT)
                  + tuple(EAGER_CLASSES.values()))


@dataclass(frozen=True)
class KernelBytes:
    """Ideal bytes of one kernel class per token: forward and backward."""

    fwd_bytes: float
    bwd_bytes: float


def _norm(width: float) -> KernelBytes:
    return KernelBytes(2 * BF16_BYTES * width, 3 * BF16_BYTES * width)


def _rope(m: ModelSpec, heads: int) -> float:
    """RoPE over ``heads`` query heads and the shared key: read and write R values each, cos and sin."""
    r = m.qk_rope_head_dim
    return 2 * BF16_BYTES * heads * r + 2 * FP32_BYTES * r / 2


def _qk_cat(m: ModelSpec) -> KernelBytes:
    """MLA's query and key assembly beside RoPE, and the KV up-projection's gradient put together (module
    docstring)."""
    heads, n, r = m.num_attention_heads, m.qk_nope_head_dim, m.qk_rope_head_dim
    fwd = BF16_BYTES * (4 * heads * n + (heads - 1) * r)
    return KernelBytes(fwd, fwd + 2 * BF16_BYTES * heads * (n + m.v_head_dim))


def _key_rope_backward(m: ModelSpec) -> float:
    """The shared RoPE key's gradient alone (``model.fused.mla_key_rope_backward``): read the H heads' R channels of
    the keys' gradient, write R values, cos and sin."""
    heads, r = m.num_attention_heads, m.qk_rope_head_dim
    return BF16_BYTES * (heads * r + r) + 2 * FP32_BYTES * r / 2


def _fp8_linear_inputs(m: ModelSpec) -> float:
    """Width of the FP8 linears' inputs per token: attention and MLP inputs, the MLA latents, o_proj's."""
    return 2 * m.hidden_size + (m.q_lora_rank or 0) + (m.kv_lora_rank or 0) \
        + m.num_attention_heads * (m.v_head_dim or m.gqa_head_dim)


def _swiglu(width: float, precision: str, fusion: Fusion) -> KernelBytes:
    """Read gate and up, write the activation (FP8 with its scales where fused with the FP8 cast)."""
    out = FP8_TILE_BYTES if precision == "fp8" and fusion == "fused" else BF16_BYTES
    return KernelBytes((2 * BF16_BYTES + out) * width, 5 * BF16_BYTES * width)


def residual_ops(m: ModelSpec, moe: bool) -> tuple[int, int, int]:
    """(adds forward, adds backward, casts each way) of h-wide BF16 tensors in one layer, the ``residual_add``
    class (6 B a value each: read two and write one, or read FP32 and write BF16). Forward: the two residuals, and
    the shared experts' output added to the routed ones' (``model/moe.py``). Backward: a tensor read by n ops gets
    its gradient as n - 1 sums (autograd's, where no GEMM accumulates into it): the two residual forks, MLA's
    normed input (its query and its KV projections; GQA's q, k and v are one projection), an MLP's input (gate
    and up projections, ``model/mlp.py``: the dense MLP, the shared experts) and a MoE layer's normed input (the
    router, the routed experts and the shared ones). The router multiplies an FP32 copy of its input
    (``model/gate.py``, as Hugging Face's DeepSeek-V3 gate): a cast up forward and its gradient's cast down
    backward. Seen in ``benchmarks/model_step.py``'s traces (H100, 2026-12-07): per MoE layer 3 forward adds and a
    copy; about 6 backward ``add_`` and a ``copy_``, where 2 adds had been priced."""
    mla = 1 if m.is_mla else 0
    if not moe:
        return 2, 2 + mla + 1, 0
    shared = 1 if m.n_shared_experts > 0 else 0
    return 2 + shared, 2 + mla + (1 + shared) + shared, 1


def layer_bytes_per_token(m: ModelSpec, moe: bool, precision: str, expert_rows_per_token: float,
                          fusion: Fusion = "eager", dispatch: bool = False,
                          padded_rows_per_token: float | None = None) -> dict[str, KernelBytes]:
    """Per class, the bytes one layer's memory-bound kernels move per token (classes with none are left out).
    ``dispatch``: the layer's tokens go through DeepEP's expert-parallel dispatch and combine (where ``fused``
    moves the permutation and the combine into them). ``padded_rows_per_token``: the routed rows with each
    expert's segment padded as the contiguous layout pads it (``engine.expert_traffic.padded_rows``; None = no
    padding), which the kernels on that layout move: the experts' casts, their SwiGLU, the permutation's writes;
    the combine and the permutation's backward read the routed rows only."""
    h = m.hidden_size
    adds_fwd, adds_bwd, casts = residual_ops(m, moe)
    value = 3 * BF16_BYTES * h  # an add of two h-wide BF16 tensors, or a cast between FP32 and BF16 (4 + 2 B)
    out = {"rms_norm": _norm(2 * h),
           "residual_add": KernelBytes((adds_fwd + casts) * value, (adds_bwd + casts) * value)}
    if m.is_mla:
        out["latent_norm"] = _norm((m.q_lora_rank or 0) + (m.kv_lora_rank or 0))
        rope = _rope(m, m.num_attention_heads + 1)  # the query heads and the decoupled key
        cat = _qk_cat(m)
        if fusion == "fused":  # one compiled kernel does both (module docstring)
            # FP8: the up-projections' output-gradient casts do the glue's backward but the shared key's
            bwd = _key_rope_backward(m) if precision == "fp8" else rope + cat.bwd_bytes
            out["rope"] = KernelBytes(rope + cat.fwd_bytes, bwd)
        else:
            out["rope"], out["qk_cat"] = KernelBytes(rope, rope), cat
    if precision == "fp8":
        width = _fp8_linear_inputs(m)
        if fusion == "fused":  # x and dy each cast with transpose
            out["fp8_cast"] = KernelBytes(FP8_BOTH_BYTES * width, FP8_BOTH_BYTES * width)
        else:
            out["fp8_cast"] = KernelBytes(FP8_CAST_BYTES * width, 2 * FP8_CAST_BYTES * width)
    if not moe:
        out["swiglu"] = _swiglu(m.intermediate_size, precision, fusion)
        return out
    f, k, e = m.moe_intermediate_size, expert_rows_per_token, m.n_routed_experts
    padded = k if padded_rows_per_token is None else padded_rows_per_token
    if precision == "fp8":
        out["expert_cast"] = KernelBytes(0.0, padded * (FP8_BOTH_BYTES * (h + 2 * f) + FP8_CAST_BYTES * h))
    out["swiglu"] = _swiglu(f * (padded + m.n_shared_experts), precision, fusion)
    topk = m.num_experts_per_tok
    out["router"] = KernelBytes(2 * FP32_BYTES * e + (INDEX_BYTES + FP32_BYTES) * topk,
                                2 * FP32_BYTES * e + FP32_BYTES * topk)
    if not (fusion == "fused" and dispatch):
        out["dispatch_plan"] = KernelBytes(PLAN_BYTES_PER_PAIR * topk + INT32_BYTES, 0.0)
        out["permute"] = KernelBytes(BF16_BYTES * h * (1 + padded), BF16_BYTES * h * (1 + k))
        out["combine"] = KernelBytes(BF16_BYTES * h * (topk + 1), BF16_BYTES * h * (2 * topk + 1))
    return out


def selective_recompute_bytes_per_token(m: ModelSpec, layer: dict[str, KernelBytes], precision: str) -> dict[str, float]:
    """Per class, the forward bytes per token that selective recompute redoes in backward (module docstring);
    ``layer`` is the layer's ``layer_bytes_per_token``, whose SwiGLU (width and fusion) it re-runs."""
    out = {"rms_norm": _norm(m.hidden_size).fwd_bytes}  # the attention's input norm
    if m.is_mla:
        out["latent_norm"] = layer["latent_norm"].fwd_bytes
        out["rope"] = _rope(m, m.num_attention_heads)
        q_cat = 2 * BF16_BYTES * m.num_attention_heads * m.qk_nope_head_dim  # q's no-RoPE part copied again
        if "qk_cat" in layer:
            out["qk_cat"] = q_cat
        else:  # fused: the rope kernel assembles q
            out["rope"] += q_cat
        if precision == "fp8":
            out["fp8_cast"] = FP8_CAST_BYTES * ((m.q_lora_rank or 0) + (m.kv_lora_rank or 0))
    out["swiglu"] = layer["swiglu"].fwd_bytes
    return out


def experts_swiglu_redo_bytes(m: ModelSpec, precision: str, expert_rows_per_token: float, fusion: Fusion) -> float:
    """Forward SwiGLU bytes per token that the fused routed experts redo in backward whatever the recompute
    setting (module docstring, ``swiglu``): their ``expert_rows_per_token`` rows under ``fused``, none under
    ``eager`` (the op-by-op experts keep the output). Selective recompute's SwiGLU covers them already."""
    if fusion != "fused":
        return 0.0
    return _swiglu(m.moe_intermediate_size * expert_rows_per_token, precision, fusion).fwd_bytes


def fp8_weight_quant_bytes(params: float, transposed: bool) -> float:
    """Bytes to quantise ``params`` FP8 weights once per optimizer step (``model.fp8.Fp8WeightCache``,
    ``kernels.fp8_quant.quant_weight_128x128``): one read of the BF16 weight, its e4m3 copy in 128x128 blocks
    and, where the FP8 backward multiplies W^T (``transposed``), the transposed copy written in the same pass;
    one FP32 scale a block. The runtime makes them in the step's first micro-batch. Priced as the class
    ``WEIGHT_QUANT`` (``memory_s(..., WEIGHT_QUANT)``: the tables' measured fraction, else the copy bandwidth), as
    the engine's step does (``engine.unit_costs.fp8_weight_quant_s``: 4 ms of V3's 15.6 s step at the copy
    bandwidth)."""
    return params * (BF16_BYTES + (2.0 if transposed else 1.0) + FP32_BYTES / (128 * 128))


def fp32_loss_bytes_per_token(m: ModelSpec) -> KernelBytes:
    """``model.losses.cross_entropy`` over the vocabulary: one FP32 softmax of the BF16 logits forward, the
    softmax again and the scaled BF16 gradient backward (module docstring)."""
    v = m.vocab_size
    return KernelBytes((BF16_BYTES + FP32_BYTES) * v, 2 * (BF16_BYTES + FP32_BYTES) * v)


def end_bytes_per_token(m: ModelSpec) -> dict[str, KernelBytes]:
    """The embedding gather (first stage) and the softmax cross-entropy over the vocabulary (last stage)."""
    v = m.vocab_size
    return {"embedding": KernelBytes(2 * BF16_BYTES * m.hidden_size, 0.0),
            "cross_entropy": KernelBytes(BF16_BYTES * v, 2 * BF16_BYTES * v)}
