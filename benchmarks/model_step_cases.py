"""What benchmarks/model_step.py measures, and what the simulator and the accounting say about it.

- ``workloads``: the pipeline stages timed (V3-shaped MoE layers with 32 experts, 4096 tokens), built
  from the ``deepseek_v3`` preset (``tiny_moe`` with ``small``);
- ``CONFIGS``: the ``ModelOptions`` compared (BF16; FP8 forward through our kernels; FP8 forward and
  backward);
- ``stage_flops``, ``timing_summary``: model FLOPs of the stage's layers (``simulator.accounting.flops``)
  and the MFU of a measured step time;
- ``predicted_classes``: the simulator's seconds for the stage on one GPU (EP = 1, no communication),
  by kernel class, from the engine's own per-layer costs (``engine.unit_costs``);
- ``predicted_memory``: the accounting's weights and kept activations of the stage, one micro-batch;
- ``kernel_class``, ``union_s``, ``class_times``: the measured side's kernel classes and busy time;
- ``step_protocol``, ``markdown``: what a timed step of K micro-batches is, and the results page.

Pure functions of specs, names and numbers: no torch here.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, fields

from moeplan.simulator.accounting.activations import BF16_BYTES, layer_activation_bytes_per_token
from moeplan.simulator.accounting.flops import ForwardFlops, attention_core_flops, forward_flops
from moeplan.simulator.accounting.layout import Stage
from moeplan.simulator.accounting.memory import expert_wgrad_stash_bytes, rank_params
from moeplan.simulator.costs.elementwise import WEIGHT_QUANT, fp8_weight_quant_bytes, layer_bytes_per_token
from moeplan.simulator.costs.kernels import attention_s, memory_s
from moeplan.simulator.costs.tables import CostTables, Precision
from moeplan.simulator.engine.unit_costs import (
    CostContext,
    attention_shapes,
    fp8_weight_params,
    memory_bound_s,
    swiglu_redo_s,
    unit_costs,
)
from moeplan.simulator.presets.clusters import gpu_for_device, h200_gpu
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe
from moeplan.simulator.spec.hardware import GpuSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Fusion, OptimizerSpec

EXPERTS = 32  # routed experts of the benchmark's MoE layers (V3 has 256; one GPU holds 32 at EP = 8)
MOE_LAYERS = 4
TOKENS, SMALL_TOKENS = 4096, 64  # one micro-batch of one sequence
PREDICTED_CLASSES = ("gemm", "grouped_gemm", "attention", "memory_bound")
CLASSES = PREDICTED_CLASSES + ("communication",)


@dataclass(frozen=True)
class Workload:
    """Layers ``first_layer .. end_layer - 1`` of ``spec`` as one pipeline stage (no embedding, no head)."""

    name: str
    title: str
    spec: ModelSpec
    first_layer: int
    end_layer: int
    tokens: int

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)


@dataclass(frozen=True)
class Config:
    """A named ``ModelOptions`` field set, and the precisions the simulator prices it with."""

    name: str
    options: dict = field(default_factory=dict)
    wgrad_batch: int = 1  # the plan's training.kernels.expert_wgrad_batch (model.weight_grad.ExpertWgradBatch)

    @property
    def fwd_precision(self) -> Precision:
        return "fp8" if self.options.get("linear_precision") == "fp8" else "bf16"

    @property
    def bwd_precision(self) -> Precision:
        return "fp8" if self.fwd_precision == "fp8" and self.options.get("fp8_backward") else "bf16"

    @property
    def fusion(self) -> Fusion:
        """The plan's ``training.kernels.fusion`` that builds this configuration: the runtime turns a plan's
        "fused" into ``fuse_memory_bound`` (``model.runtime.rank``), and the engine prices "fused" as one kernel
        each for the casts with transpose, SwiGLU with its quantisation and MLA's RoPE with the query and key's
        assembly, and the fused experts' BF16 weight gradients added inside their GEMMs (``engine.unit_costs``)."""
        return "fused" if self.options.get("fuse_memory_bound") else "eager"


_FP8 = {"linear_precision": "fp8", "expert_backend": "fp8", "fp8_kernel": "kernels"}
_FUSED = {"fuse_memory_bound": True}  # RMSNorm, RoPE/concat and SwiGLU compiled (model.fused)
CONFIGS = (Config("bf16"), Config("bf16 fused", _FUSED), Config("fp8 fwd", _FP8),
           Config("fp8 fwd+bwd", {**_FP8, "fp8_backward": True}),
           Config("fp8 fwd+bwd fused", {**_FP8, "fp8_backward": True, **_FUSED}),
           *(Config(f"fp8 fwd+bwd fused wgrad-batch {s}", {**_FP8, "fp8_backward": True, **_FUSED}, s) for s in (2, 4)))


def derive(base: ModelSpec, **update) -> ModelSpec:
    """A validated copy of ``base`` with ``update`` (as ``simulator.presets.models`` derives its presets)."""
    return ModelSpec.model_validate({**base.model_dump(), **update})


def workloads(small: bool) -> tuple[Workload, ...]:
    """A: four MoE layers (from ``first_k_dense_replace`` on); B: a dense layer then the same four."""
    base = tiny_moe() if small else deepseek_v3()
    experts = base.n_routed_experts if small else EXPERTS
    tokens = SMALL_TOKENS if small else TOKENS
    first = base.first_k_dense_replace
    a = derive(base, name=f"{base.name}-e{experts}-moe{MOE_LAYERS}", n_routed_experts=experts,
               num_hidden_layers=first + MOE_LAYERS, num_nextn_predict_layers=0)
    b = derive(base, name=f"{base.name}-e{experts}-dense1-moe{MOE_LAYERS}", n_routed_experts=experts,
               first_k_dense_replace=1, num_hidden_layers=1 + MOE_LAYERS, num_nextn_predict_layers=0)
    return (Workload("A", f"{MOE_LAYERS} MoE layers {first}..{first + MOE_LAYERS - 1}", a, first,
                     first + MOE_LAYERS, tokens),
            Workload("B", f"1 dense + {MOE_LAYERS} MoE layers 0..{MOE_LAYERS}", b, 0, 1 + MOE_LAYERS, tokens))


def _first_layers_flops(spec: ModelSpec, n: int, seq_len_tokens: int) -> dict[str, float]:
    """Forward FLOPs per token of decoder layers ``0 .. n - 1`` by component (no head, no MTP)."""
    if n == 0:
        return {f.name: 0.0 for f in fields(ForwardFlops) if f.name not in ("head", "mtp")}
    cut = derive(spec, num_hidden_layers=n, first_k_dense_replace=min(spec.first_k_dense_replace, n))
    fwd = forward_flops(cut, seq_len_tokens)
    return {f.name: getattr(fwd, f.name) for f in fields(ForwardFlops) if f.name not in ("head", "mtp")}


def stage_flops(w: Workload) -> dict[str, float]:
    """Forward model FLOPs per token of the stage's layers by component (``accounting.flops``; the
    accounting has no per-layer entry point, so: the first ``end`` layers less the first ``first``)."""
    upto_end = _first_layers_flops(w.spec, w.end_layer, w.tokens)
    upto_first = _first_layers_flops(w.spec, w.first_layer, w.tokens)
    return {k: upto_end[k] - upto_first[k] for k in upto_end}


def timing_summary(w: Workload, times_s: list[float], clocks: list[dict], peak_flops_per_s: float) -> dict:
    """Median / min / max step seconds, tokens/s, model TFLOPS and MFU (3 x forward model FLOPs; no
    recompute, so HFU = MFU) of one configuration, and its median SM clock and board power."""
    flops = 3.0 * sum(stage_flops(w).values()) * w.tokens
    med = statistics.median(times_s)
    mhz = [c["sm_mhz"] for c in clocks if c["sm_mhz"] is not None]
    watts = [c["watts"] for c in clocks if c["watts"] is not None]
    return {"median_s": med, "min_s": min(times_s), "max_s": max(times_s), "n": len(times_s),
            "tokens_per_s": w.tokens / med, "model_flops": flops, "model_tflops": flops / med / 1e12,
            "mfu": flops / med / peak_flops_per_s, "hfu": flops / med / peak_flops_per_s,
            "sm_mhz_median": statistics.median(mhz) if mhz else None,
            "watts_median": statistics.median(watts) if watts else None}


def gpu_preset(device_name: str | None) -> GpuSpec:
    """The cluster preset's GPU for a CUDA device name; the H200's when it is none of them (CPU runs)."""
    return gpu_for_device(device_name) or h200_gpu()


def _layer_classes(tables: CostTables, gpu: GpuSpec, spec: ModelSpec, layer: int, precision: Precision,
                   tokens: int, fusion: Fusion, wgrad_batch: int = 1) -> dict[str, tuple[float, float]]:
    """(forward, backward) seconds of one layer by class, from ``engine.unit_costs`` at EP = 1.

    The engine folds the memory-bound kernels into its attention and MLP times, so they are taken back
    out with the engine's own functions: attention core (``attention_s``), memory-bound classes
    (``unit_costs.memory_bound_s`` over ``layer_bytes_per_token`` at the configuration's fusion), grouped
    GEMMs (the unit's expert times); GEMM is the rest of the unit (projections, shared expert or dense MLP,
    router).
    """
    ctx = CostContext(tables=tables, gpu=gpu, precision=precision, tokens=tokens, seq_len_tokens=tokens,
                      compute_frac=1.0, recompute="none", fusion=fusion,  # one GPU: no SMs kept for all-to-all
                      expert_wgrad_batch=wgrad_batch)
    moe = spec.is_moe_layer(layer)
    unit = unit_costs(ctx, spec, moe=moe, traffic=None)
    core = attention_core_flops(spec, tokens) * tokens
    attn = (attention_s(tables, gpu, core, backward=False, seq_len=tokens),
            attention_s(tables, gpu, core, backward=True, seq_len=tokens))
    mem = memory_bound_s(ctx, layer_bytes_per_token(spec, moe, precision, spec.num_experts_per_tok if moe else 0.0,
                                                    fusion))  # one GPU: no dispatch
    if moe:  # the fused experts' SwiGLU redone in backward: in the unit's recompute, a memory-bound kernel
        mem = (mem[0], mem[1] + swiglu_redo_s(ctx, spec, spec.num_experts_per_tok))
    grouped = (unit.experts_fwd_s, unit.experts_dx_s + unit.experts_dw_s)
    total = (unit.fwd_s, unit.dx_s + unit.dw_s)
    gemm = tuple(t - a - m - g for t, a, m, g in zip(total, attn, mem, grouped))
    assert min(gemm) > -1e-9 * max(total), f"{gemm=} {total=}: the classes exceed the unit's time"
    return {"gemm": gemm, "grouped_gemm": grouped, "attention": attn, "memory_bound": mem}


def weight_quant_s(w: Workload, config: Config, gpu: GpuSpec, tables: CostTables) -> float:
    """Seconds of one step's FP8 weight quantisation (``costs.elementwise.fp8_weight_quant_bytes``, W^T too where
    the backward is FP8) at the tables' ``WEIGHT_QUANT`` fraction, else the copy bandwidth; 0 for BF16."""
    if config.fwd_precision != "fp8":
        return 0.0
    nbytes = fp8_weight_quant_bytes(fp8_weight_params(w.spec, w.layers), transposed=config.bwd_precision == "fp8")
    return memory_s(tables, gpu, nbytes, WEIGHT_QUANT)  # as engine.unit_costs.fp8_weight_quant_s, W^T per config


def predicted_classes(w: Workload, config: Config, gpu: GpuSpec, tables: CostTables,
                      microbatches: int = 1) -> dict[str, dict[str, float]]:
    """The simulator's seconds for one micro-batch of the stage on one GPU: class -> {"fwd_s", "bwd_s"}.

    The forward is priced at the config's forward precision and the backward at its backward precision
    (FP8 forward with a BF16 backward is not one of the engine's precisions: its two halves are). The FP8
    weights' quantisation, once a step of ``microbatches``, adds its share to the memory-bound forward."""
    out = {c: {"fwd_s": 0.0, "bwd_s": 0.0} for c in PREDICTED_CLASSES}
    out["memory_bound"]["fwd_s"] += weight_quant_s(w, config, gpu, tables) / microbatches
    for layer in w.layers:
        fwd = _layer_classes(tables, gpu, w.spec, layer, config.fwd_precision, w.tokens, config.fusion)
        bwd = _layer_classes(tables, gpu, w.spec, layer, config.bwd_precision, w.tokens, config.fusion,
                             config.wgrad_batch)
        for c in PREDICTED_CLASSES:
            out[c]["fwd_s"] += fwd[c][0]
            out[c]["bwd_s"] += bwd[c][1]
    return out


def predicted_memory(w: Workload, config: Config) -> dict[str, float]:
    """The accounting's bytes for the stage and one micro-batch, recompute none.

    - ``weight_bytes``: ``rank_params`` of the stage times the BF16 weight bytes of ``OptimizerSpec``;
    - ``activation_bytes``: what the layers keep for backward (``layer_activation_bytes_per_token`` at
      the config's forward precision) plus the stage's received BF16 input, as ``rank_memory`` counts a
      stage; not the gradients, not transient workspace;
    - ``stash_bytes``: the FP8 expert Wgrads' stash of ``config.wgrad_batch`` micro-batches
      (``expert_wgrad_stash_bytes``; 0 without a batch), which the runtime allocates at the first backward and keeps
      from step to step, so that the measured peak holds it and the step's peak above its baseline does not.
    """
    params = rank_params(w.spec, [Stage(0, tuple(w.layers), False, False)], ep=1)
    kept = sum(layer_activation_bytes_per_token(w.spec, u, config.fwd_precision, "none") for u in w.layers)
    return {"params": params.dense + params.expert,
            "weight_bytes": (params.dense + params.expert) * OptimizerSpec().param_bytes,
            "activation_bytes": w.tokens * (kept + BF16_BYTES * w.spec.hidden_size),
            "stash_bytes": expert_wgrad_stash_bytes(w.spec, ParallelSpec(ep=1), config.bwd_precision,
                                                    config.wgrad_batch, w.layers, w.tokens)}


# Kernel-name fragments, lower case. GEMMs: cuBLAS (sm90_xmma_*, nvjet_*, *gemm*, its split-K reduce),
# CUTLASS, our Triton and Gluon FP8 GEMMs (kernels/fp8_gemm*.py: ``_fp8_gemm_tma_kernel``,
# ``_fp8_gemm_ws_kernel``, and the autotuned one that kernels/fp8_gemm.py names plain ``kernel``) and,
# on the CPU, the aten matmul ops. Our GEMM kernels run dense and grouped products alike, so a GEMM is
# grouped when its name says so (torch._grouped_mm's CUTLASS GroupProblemShape) or when the routed
# experts launched it (``region``).
_COMMUNICATION = ("nccl", "alltoall", "all_to_all", "allreduce", "all_reduce", "allgather", "reducescatter")
_ATTENTION = ("flash", "fmha", "sdpa", "scaled_dot_product", "attention", "mha_")
_GROUPED = ("grouped", "groupproblemshape", "ptrarray")
_GEMM = ("gemm", "cutlass", "cublas", "nvjet", "xmma", "wgmma", "gemv", "matmul", "splitkreduce")
_GEMM_NAMES = ("kernel", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def kernel_class(name: str, region: str = "") -> str:
    """The class of one kernel (on the CPU: one aten op) from its name, and ``region``: "experts" when the
    routed experts launched it, "attention" when the attention core did, else ""."""
    low = name.lower()
    if any(p in low for p in _COMMUNICATION):
        return "communication"
    if region == "attention" or any(p in low for p in _ATTENTION):
        return "attention"
    if any(p in low for p in _GROUPED):
        return "grouped_gemm"
    if low in _GEMM_NAMES or any(p in low for p in _GEMM):
        return "grouped_gemm" if region == "experts" else "gemm"
    return "memory_bound"


def union_s(intervals: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals`` (start, end) clipped to the ``windows`` (same unit)."""
    total = 0.0
    for lo, hi in windows:
        clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
        end = lo
        for a, b in clipped:
            total += max(0.0, b - max(a, end))
            end = max(end, b)
    return total


def class_times(records: list[tuple[str, float, str, str]], steps: int) -> dict[str, dict[str, float]]:
    """Seconds per step by class and pass from ``(kernel name, seconds, region, "fwd" | "bwd")`` records."""
    out = {c: {"fwd_s": 0.0, "bwd_s": 0.0} for c in CLASSES}
    for name, seconds, region, phase in records:
        out[kernel_class(name, region)][f"{phase}_s"] += seconds / steps
    return out


def top_kernels(records: list[tuple[str, float, str, str]], steps: int, n: int = 25) -> list[dict]:
    """The ``n`` kernels (by name, region and pass) with the most seconds per step, with their class and calls:
    what a class's measured time is made of."""
    agg: dict[tuple[str, str, str], list[float]] = {}
    for name, seconds, region, phase in records:
        entry = agg.setdefault((name, region, phase), [0.0, 0])
        entry[0] += seconds / steps
        entry[1] += 1
    ranked = sorted(agg.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"name": name, "region": region, "phase": phase, "class": kernel_class(name, region), "s": s,
             "calls": calls / steps} for (name, region, phase), (s, calls) in ranked]


def step_protocol(microbatches: int) -> str:
    """What one timed step of ``microbatches`` is, in the JSON's protocol record and on the page."""
    k = f"{microbatches} micro-batch{'es' if microbatches > 1 else ''}"
    return (f"{k} of forward + backward on the same input, the gradients accumulating across them and set to "
            f"None after the last; weights quantised once per {k}, as after one optimizer step; time per "
            f"micro-batch = the step's time / {microbatches}")


# What ``predicted_classes`` holds of the FP8 weights' quantisation (``weight_quant_s``), on the page.
_WEIGHT_QUANT_NOTE = (
    "The prediction prices one micro-batch (`engine.unit_costs` at its tokens) plus, for the FP8 configurations, "
    "1/K of a step's FP8 weight quantisation in the memory-bound forward (`costs.elementwise."
    "fp8_weight_quant_bytes`: the BF16 weights read once, W and, with an FP8 backward, W^T written; at the "
    "tables' `fp8_weight_quant` fraction, `kernels.fp8_quant.quant_weight_128x128` timed by "
    "`benchmarks/elementwise_bench.py`, else at their copy bandwidth), as the measured time per micro-batch holds "
    "1/K of it (K micro-batches a step, above). The engine's step (`moeplan plan`) prices it the same way since "
    "2026-12-06 (`engine.unit_costs.fp8_weight_quant_s`, spread over each stage copy's micro-batches).")


_MAIN_GRADS_ON = (
    "The gradients accumulate in FP32 main gradients attached as the runtime attaches them "
    "(`model.runtime.main_grad`, allocated outside the timed steps and counted in the memory baseline): BF16 "
    "weight gradients added inside cuBLAS (`addmm` into FP32), FP8 ones in the Gluon GEMM's epilogue "
    "(`weight_grad.fused_main_grad_fp8`), the rest (norms, router) by the main-grad hook; the prediction prices "
    "the same (`engine.unit_costs`, MAIN_GRAD_ADD_BYTES and MAIN_GRAD_EPILOGUE_BYTES).")
_MAIN_GRADS_OFF = (
    "They accumulate in autograd's `.grad`, in the weights' dtype (`--no-main-grads`): the stage has no FP32 "
    "main gradients (`model.runtime.main_grad`), which the runtime adds into and the prediction prices.")


def _num(value: float) -> str:
    """Two decimals, or three significant digits below 1 (the CPU smoke run's tiny figures)."""
    return f"{value:,.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else _num(seconds * 1e3)


def _gib(nbytes: float | None) -> str:
    return "—" if nbytes is None else _num(nbytes / 2**30)


def _err(pred: float, meas: float) -> str:
    return f"{pred / meas - 1:+.0%}" if meas > 0 else "—"


_TIMING_HEAD = ("| configuration | median ms | min | max | steps | tokens/s | model TFLOPS | MFU | SM MHz | W "
                "| peak GiB | load max/mean |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
_LOAD_NOTE = ("Load max/mean: routed tokens of the busiest expert over the mean, averaged over the MoE layers "
              "(the simulator assumes 1.00).")
_ARM_NOTE = ("`NAME @switch=value`: NAME's stage run again with that module switch set for its own steps alone, in the "
             "same process and rounds (`model_step.ARM_SWITCHES`); priced as NAME.")
_CLASS_HEAD = ("| class | measured fwd ms | measured bwd ms | measured | predicted fwd | predicted bwd | predicted "
               "| predicted / measured − 1 |\n|---|---:|---:|---:|---:|---:|---:|---:|")
_MEMORY_HEAD = ("| configuration | weights (measured) | weights (accounting) | step peak above weights and inputs "
                "| kept activations (accounting) | expert Wgrad stash (accounting) | peak allocated |\n"
                "|---|---:|---:|---:|---:|---:|---:|")
_MEMORY_NOTE = ("GiB. The accounting's activations are what the layers keep for backward plus the stage's input, at "
                "the configuration's forward precision (`layer_activation_bytes_per_token`); the measured step peak "
                "also holds the gradients formed so far and transient workspace. The FP8 expert Wgrads' stash "
                "(`expert_wgrad_stash_bytes`, configurations with a Wgrad batch) stays allocated from step to step: "
                "the peak allocated holds it, the step's peak above its baseline does not.")


def _header(meta: dict) -> list[str]:
    p = meta["protocol"]
    k = p.get("microbatches", 1)  # results written before the option: one micro-batch a step
    clock = "CUDA events" if "sms" in meta else "the wall clock (CPU run: no CUDA events, no clocks, no memory peak)"
    smi = meta.get("nvidia_smi") or {}
    where = meta["device"]
    if "sms" in meta:
        where += (f" ({meta['sms']} SMs, driver {smi.get('driver_version')}, max SM clock {smi.get('clocks.max.sm')} "
                  f"MHz, power limit {smi.get('power.limit')} W)")
    host = meta.get("host")  # results written before it had none
    if host:
        launch = f", {host['launch_us']:.1f} us to issue a small CUDA op" if host.get("launch_us") else ""
        where += f"; host {host.get('cpu')} ({host.get('cpus')} CPUs{launch})"
    run = (f"`{meta['command']}` on {where}, {meta['date']}; torch {meta['torch']}, CUDA {meta['cuda']}, triton "
           f"{meta['triton']}. Simulator: GPU preset {meta['gpu_preset']}, cost tables `{meta['tables']}`" + (
               f"; the predictions made again on {meta['repriced']} (`--reprice`), the measurements as run." if
               "repriced" in meta else "."))
    if meta.get("wgrad_old_values"):  # results written before the option: the module's default then ("l2")
        run += f" FP8 Wgrads' old main-gradient values: `{meta['wgrad_old_values']}` (`fp8_gemm_ws.OLD_VALUES`)."
        dense = meta.get("dense_wgrad_old_values")
        if dense and dense != meta["wgrad_old_values"]:
            run += f" The dense ones': `{dense}` (`fp8_gemm_ws.DENSE_OLD_VALUES`)."
    if meta.get("permute_both"):
        run += " The combine's backward quantised as it permutes (`moe_permute.PERMUTE_BOTH`)."
    if meta.get("swiglu_backward_both"):
        run += " SwiGLU's backward quantised as it is computed (`swiglu.BACKWARD_BOTH`)."
    if "mla_glue_in_cast" in meta:  # results written before the option had none
        run += (" MLA's up-projections' output gradients cast as the attention's backward glue is read "
                f"(`attention.GLUE_IN_CAST`): {'on' if meta['mla_glue_in_cast'] else 'off'}.")
    if "paired_linears" in meta:  # results written before the option had none
        run += (" Linears that read one input (q_a and kv_a, an MLP's gate and up) with one backward, one cast and one "
                f"Dgrad for the two (`linear.PAIRED`): {'on' if meta['paired_linears'] else 'off'}.")
    tall = meta.get("tall_wgrads")
    if tall:  # results written before the 256-row Wgrad tiles had none
        run += (f" 256-row Wgrad tiles: dense {'on' if tall['dense'] else 'off'} (`fp8_gemm_ws.TALL_DENSE`), the experts'"
                f" from {tall['min_segments']} segment tables (`TALL_MIN_SEGMENTS`), their old values "
                f"`{tall['old_values']}` (`TALL_OLD_VALUES`).")
    if meta.get("fp8_cast"):
        run += f" FP8 casts with transpose: `{meta['fp8_cast']}` (`fp8_quant.ONE_READ`)."
    protocol = (
        f"Protocol: {p['warmup']} warm-up steps per configuration, {p['burn_s']:g} s burn-in cycling through the "
        f"configurations, then {p['rounds']} rounds of {p['steps']} timed steps per configuration, the order "
        f"reversed every other round; each step timed alone by {clock}. A step (K = {k}) is "
        f"{p.get('step', step_protocol(k))} (loss = <out, g>, g a fixed random tensor; no optimizer step). Times, "
        "tokens/s and MFU are per micro-batch. The configurations share one copy of the weights. MFU = 3 × forward "
        "model FLOPs (`simulator.accounting.flops`, no recompute, so HFU = MFU) / median time per micro-batch / "
        f"{meta['peak_bf16_flops_per_s'] / 1e12:.1f} TFLOPS (the preset's dense BF16 peak, also for FP8 runs). "
        f"Classes: {p['profile_steps']} profiled step(s), per micro-batch (divided by {p['profile_steps']} × K); "
        "idle = profiled wall time less the union of busy kernel intervals (profiling slows the host, so idle is "
        "an upper bound). Peak memory: one step, the gradients accumulated over its K micro-batches included. "
        + (_MAIN_GRADS_ON if p.get("main_grads") else _MAIN_GRADS_OFF))
    return ["# One training step of a DeepSeek-V3-shaped pipeline stage on one GPU", "", run, "", protocol, "",
            _WEIGHT_QUANT_NOTE, ""]


def _timing_row(c: dict) -> str:
    if c["skipped"]:
        return f"| {c['name']} | skipped: {c['skipped']} |||||||||||"
    t, m = c["timing"], c["memory"]
    loads = list(m["load_max_over_mean"].values())
    mhz = "—" if t["sm_mhz_median"] is None else f"{t['sm_mhz_median']:,.0f}"
    watts = "—" if t["watts_median"] is None else f"{t['watts_median']:,.0f}"
    load = f"{sum(loads) / len(loads):.2f}" if loads else "—"
    return (f"| {c['name']} | {_ms(t['median_s'])} | {_ms(t['min_s'])} | {_ms(t['max_s'])} | {t['n']} | "
            f"{t['tokens_per_s']:,.0f} | {t['model_tflops']:,.1f} | {t['mfu']:.1%} | {mhz} | {watts} | "
            f"{_gib(m['peak_bytes'])} | {load} |")


def _class_table(c: dict) -> list[str]:
    prof, pred, med = c["profile"], c["predicted_s"], c["timing"]["median_s"]
    fusion = f", fusion {c['fusion']}" if "fusion" in c else ""  # recorded since 2026-12-06 16:10 UTC
    lines = [f"**{c['name']}** (simulator: {c['precision']['fwd']} forward, {c['precision']['bwd']} backward{fusion})",
             "", _CLASS_HEAD]
    for cls in CLASSES:
        m, p = prof["classes"][cls], pred.get(cls)
        meas = m["fwd_s"] + m["bwd_s"]
        cells = "— | — | — | —" if p is None else (
            f"{_ms(p['fwd_s'])} | {_ms(p['bwd_s'])} | {_ms(p['fwd_s'] + p['bwd_s'])} | "
            f"{_err(p['fwd_s'] + p['bwd_s'], meas)}")
        lines.append(f"| {cls} | {_ms(m['fwd_s'])} | {_ms(m['bwd_s'])} | {_ms(meas)} | {cells} |")
    predicted = sum(p["fwd_s"] + p["bwd_s"] for p in pred.values())
    note = (f"Profiled, per micro-batch: wall {_ms(prof['wall_s'])} ms, busy {_ms(prof['busy_s'])} ms, kernels summed "
            f"{_ms(prof['kernel_s'])} ms, kernels not linked to an op {_ms(prof['unlinked_s'])} ms; "
            f"{prof['spans']} routed-experts modules marked.")
    step = (f"| **micro-batch** (median of the timed steps) | | | {_ms(med)} | | | {_ms(predicted)} | "
            f"{_err(predicted, med)} |")
    top = prof.get("top_kernels") or []  # absent from results written before 2026-12-06 16:00 UTC
    largest = ("Largest kernels per micro-batch (name cut at 60 characters, pass, class, calls, ms): " + "; ".join(
        f"`{k['name'][:60]}` {k['phase']} {k['class']} ×{k['calls']:g} {_ms(k['s'])}" for k in top[:12]) + ".")
    return lines + [f"| idle | | | {_ms(prof['idle_s'])} | | | — | |", step, "", note, ""] + (
        [largest, ""] if top else []) + _gaps_lines(prof.get("gaps"), prof["microbatches"]) + _host_lines(c)


def _host_lines(c: dict) -> list[str]:
    """The host's issue time per micro-batch against the GPU's (``model_step.host_issue``; ``--host-issue`` runs)."""
    h = c.get("host_issue")
    if not h:
        return []
    prof = c["profile"]["classes"]
    gpu = {p: sum(v[f"{p}_s"] for v in prof.values()) for p in ("fwd", "bwd")}
    late = f" {h['late_passes']} micro-batch(es) outlasted the hold: their figures are a floor." if h["late_passes"] else ""
    return [f"Host issue per micro-batch, the GPU held busy ({h['hold_s']:g} s sleep kernel before each): forward "
            f"{_ms(h['fwd_s'])} ms (profiled kernels {_ms(gpu['fwd'])}), backward {_ms(h['bwd_s'])} ms (kernels "
            f"{_ms(gpu['bwd'])}); slowest micro-batch {_ms(h['fwd_max_s'])} / {_ms(h['bwd_max_s'])} ms.{late}", ""]


def _gaps_lines(gaps: dict | None, microbatches: int) -> list[str]:
    """The profiled step's GPU idle charged to host ops (``benchmarks/gpu_gaps.py``; ``--trace`` runs only)."""
    if not gaps:
        return []
    n = gaps["windows"] * microbatches
    idle = "; ".join(f"{r['op']} {r['us'] / n / 1e3:.2f} ms ({r['gaps'] / n:g} gaps)"
                     for r in gaps["idle_by_op_us"][:6])
    blocking = "; ".join(f"{r['call']} {r['us'] / n / 1e3:.2f} ms (×{r['calls'] / n:g})"
                         for r in gaps["blocking_host_calls_us"][:4])
    return [f"GPU idle per micro-batch, charged to the host op that launched the kernel after each gap (`gpu_gaps`, "
            f"profiled): {gaps['idle_us'] / n / 1e3:.2f} ms; largest: {idle or 'none'}. Blocking host calls: "
            f"{blocking or 'none'}.", ""]


def _memory_row(c: dict) -> str:
    m, p = c["memory"], c["predicted_memory"]
    return (f"| {c['name']} | {_gib(m['weight_bytes'])} | {_gib(p['weight_bytes'])} | {_gib(m['step_peak_bytes'])} "
            f"| {_gib(p['activation_bytes'])} | {_gib(p.get('stash_bytes'))} | {_gib(m['peak_bytes'])} |")


def markdown(result: dict) -> str:
    """The results page: header, then per workload the timings, the classes against the simulator, memory."""
    lines = _header(result["meta"])
    for w in result["workloads"]:
        flops = w["forward_flops_per_token"]
        parts = ", ".join(f"{k.replace('_', ' ')} {_num(v / 1e9)}" for k, v in flops.items() if v)
        ran = [c for c in w["configs"] if not c["skipped"]]
        lines += [f"## Workload {w['name']}: {w['title']} ({w['spec']['name']}, {w['tokens']} tokens)", "",
                  f"Forward model GFLOP per token: {_num(sum(flops.values()) / 1e9)} ({parts}).", "",
                  _TIMING_HEAD, *(_timing_row(c) for c in w["configs"]), "", _LOAD_NOTE, ""]
        if any(c.get("switches") for c in w["configs"]):  # results written before arms have none
            lines += [_ARM_NOTE, ""]
        for c in ran:
            lines += _class_table(c)
        lines += [_MEMORY_HEAD, *(_memory_row(c) for c in ran), "", _MEMORY_NOTE, ""]
    return "\n".join(lines)
