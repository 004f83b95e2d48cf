"""Benchmark kernels/ on one GPU against torch's built-ins; writes a Markdown results table.

    python benchmarks/kernels_bench.py --out docs/results/kernels.md

Shapes are DeepSeek-V3's (reference §11.4, M = 4096 dense rows). "Ours" for dense GEMMs is the
persistent TMA kernel (``kernels/fp8_gemm_tma.py``) wherever TMA can read the operands, and the
warp-specialised Gluon kernel (``kernels/fp8_gemm_ws.py``) where it applies. Baselines are measured in the
same run: ``torch._scaled_mm`` with 1×128 / 128×128 block scales, BF16 ``torch.matmul`` and BF16
``torch._grouped_mm``. TFLOPS count 2·M·N·K; relative error is ‖out − ref‖ / ‖ref‖ against float64
on the same (dequantised) inputs. Times are medians of ``triton.testing.do_bench`` on random data.
"""

import argparse
import datetime
import json
import logging
import os
from pathlib import Path

import torch
import triton
import triton.testing

import moeplan.kernels.fp8_gemm as gemm_mod
import moeplan.kernels.moe_permute as permute_mod
import moeplan.kernels.swiglu as swiglu_mod
from moeplan.kernels.fp8_gemm import chosen_backend, fp8_gemm, fp8_gemm_ref
from moeplan.kernels.fp8_quant import (
    dequant_blocks,
    dequant_rows,
    quant_act_1x128,
    quant_act_128x1_t,
    quant_weight_128x128,
)
from moeplan.kernels.grouped_gemm import grouped_gemm_bf16, grouped_gemm_fp8, grouped_gemm_ref, make_problem

log = logging.getLogger(__name__)

DENSE_M = 4096
DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
GROUPED = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def graph_ms(fn) -> float:
    """GPU time alone: ``fn`` captured once in a CUDA graph (after a warm-up call has compiled,
    tuned and dispatched it), the replays timed. An eager call also pays its host time, ~100 us
    of Python for our launchers (docs/design/kernels.md), which is most of a small GEMM's."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")


def measure(fn, flops: float, ref: torch.Tensor | None, graphed: bool = False) -> dict:
    """TFLOPS and relative error of one GEMM (with ``graphed``, also from CUDA-graph replays); an
    unsupported baseline gives its error message."""
    try:
        out = fn()
        ms = time_ms(fn)
        ms_graph = graph_ms(fn) if graphed else None
    except (RuntimeError, ValueError) as exc:
        return {"error": str(exc).splitlines()[0][:120]}
    result = {"tflops": tflops(flops, ms), "ms": ms}
    if ms_graph is not None:
        result["tflops_graph"] = tflops(flops, ms_graph)
    if ref is not None:
        result["rel_err"] = rel_err(out, ref)
    return result


def gemm_case(a, sa, b, sb, out_dtype=torch.bfloat16, timed_auto: bool = False) -> dict:
    """Ours (Triton, and the Gluon kernel where it applies) vs torch._scaled_mm on the same FP8 operands,
    plus the auto dispatch choice (with ``timed_auto``, also the auto dispatch's own call timed: what
    a caller of ``fp8_gemm`` gets, the choice included)."""
    M, N, K = a.shape[0], b.shape[0], a.shape[1]
    ref = fp8_gemm_ref(a, sa, b, sb)
    flops = 2.0 * M * N * K
    case = {
        "ours": measure(lambda: fp8_gemm(a, sa, b, sb, out_dtype, backend="triton"), flops, ref),
        "gluon": measure(lambda: fp8_gemm(a, sa, b, sb, out_dtype, backend="gluon"), flops, ref, graphed=True),
        "scaled_mm": measure(lambda: fp8_gemm(a, sa, b, sb, out_dtype, backend="torch"), flops, ref, graphed=True),
    }
    case["auto"] = chosen_backend(a, sa, b, sb, out_dtype)
    if timed_auto:
        case["auto_run"] = measure(lambda: fp8_gemm(a, sa, b, sb, out_dtype), flops, ref, graphed=True)
    case["gluon_width"] = gemm_mod._BACKEND_CACHE.get(("gluon width", tuple(a.shape), tuple(b.shape), out_dtype))
    return case


def dense_results() -> list[dict]:
    rows = []
    for N, K in DENSE_NK:
        M = DENSE_M
        x = torch.randn(M, K, device="cuda")
        w = torch.randn(N, K, device="cuda")
        dy = torch.randn(M, N, device="cuda")
        a, sa = quant_act_1x128(x)
        b, sb, bt = quant_weight_128x128(w, transposed=True)
        row = {"M": M, "N": N, "K": K, "forward": gemm_case(a, sa, b, sb, timed_auto=True)}
        xb, wb = x.bfloat16(), w.bfloat16()
        row["forward"]["bf16_matmul"] = measure(lambda: torch.matmul(xb, wb.t()), 2.0 * M * N * K,
                                                xb.double() @ wb.double().t())
        d, sd = quant_act_1x128(dy)
        row["dgrad"] = gemm_case(d, sd, bt, sb.mT)
        dt, sdt = quant_act_128x1_t(dy)
        xt, sxt = quant_act_128x1_t(x)
        row["wgrad"] = gemm_case(dt, sdt, xt, sxt, torch.float32)
        rows.append(row)
        log.info("dense %s", json.dumps(row))
        del x, w, dy, xb, wb
        torch.cuda.empty_cache()
    return rows


def grouped_results() -> list[dict]:
    rows = []
    for groups, m_per_group, N, K in GROUPED:
        p = make_problem(groups, m_per_group, N, K)
        x, w, a, sa, b, sb, m_indices = (p[k] for k in ("x", "w", "a", "sa", "b", "sb", "m_indices"))
        flops = 2.0 * groups * m_per_group * N * K
        counts = [m_per_group] * groups  # on the host, as DeepEP's dispatch returns them
        ref_fp8 = grouped_gemm_ref(dequant_rows(a, sa), dequant_blocks(b, sb), m_indices)
        ref_bf16 = grouped_gemm_ref(x, w, m_indices)
        row = {
            "groups": groups, "m_per_group": m_per_group, "N": N, "K": K,
            "ours_fp8": measure(lambda: grouped_gemm_fp8(a, sa, b, sb, m_indices, backend="triton"), flops, ref_fp8),
            "gluon_fp8": measure(lambda: grouped_gemm_fp8(a, sa, b, sb, m_indices, backend="gluon"), flops, ref_fp8),
            "scaled_mm_loop": measure(lambda: grouped_gemm_fp8(a, sa, b, sb, m_indices, backend="torch",
                                                               m_counts=counts), flops, ref_fp8),
            "auto_fp8": measure(lambda: grouped_gemm_fp8(a, sa, b, sb, m_indices, m_counts=counts), flops, ref_fp8),
            "scaled_mm_loop_sync": measure(lambda: grouped_gemm_fp8(a, sa, b, sb, m_indices, backend="torch"), flops,
                                           ref_fp8),
            "ours_bf16": measure(lambda: grouped_gemm_bf16(x, w, m_indices, backend="triton"), flops, ref_bf16),
            "grouped_mm_bf16": measure(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=p["offs"]), flops, ref_bf16),
        }
        row["auto"] = [v for k, v in gemm_mod._BACKEND_CACHE.items() if k[0] == "grouped_fp8"][-1]
        rows.append(row)
        log.info("grouped %s", json.dumps(row))
        del ref_fp8, ref_bf16
        torch.cuda.empty_cache()
    return rows


def memory_bound_results() -> dict:
    """GB/s of the quantisers, permutation and SwiGLU, and fused vs unfused times where we fuse."""
    from moeplan.kernels.fp8_quant import benchmark as quant_benchmark

    results = {"quant_gbps": quant_benchmark(), "permute_gbps": permute_mod.benchmark(),
               "swiglu_gbps": swiglu_mod.benchmark()}
    T, H, topk, E = 4096, 7168, 8, 32
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:topk] for _ in range(T)])
    plan = permute_mod.make_dispatch_plan(ids, E)
    h = torch.randn(32768, 4096, device="cuda", dtype=torch.bfloat16)
    results["fused_us"] = {
        "permute+quant fused": time_ms(lambda: permute_mod.moe_permute(x, plan, quantize=True)) * 1e3,
        "permute then quant": time_ms(lambda: quant_act_1x128(permute_mod.moe_permute(x, plan))) * 1e3,
        "swiglu+quant fused": time_ms(lambda: swiglu_mod.swiglu(h, quantize=True)) * 1e3,
        "swiglu then quant": time_ms(lambda: quant_act_1x128(swiglu_mod.swiglu(h))) * 1e3,
    }
    return results


def autotune_choices() -> list[str]:
    """The config each autotuned kernel settled on, per key."""
    lines = []
    for name, kernel in (("fp8", gemm_mod._gemm_kernel_fp8), ("bf16", gemm_mod._gemm_kernel_bf16)):
        for key, config in getattr(kernel, "cache", {}).items():
            lines.append(f"{name} key={key}: {config}")
    return lines


def _fmt(entry: dict, field: str = "tflops", digits: int = 0) -> str:
    if "error" in entry:
        return "n/a"
    return f"{entry[field]:.{digits}f}" if field.startswith("tflops") else f"{entry[field]:.1e}"


def render(meta: dict, dense: list[dict], grouped: list[dict], memory: dict, tunes: list[str]) -> str:
    out = [f"# kernels/ benchmark results\n\n{meta['date']} on {meta['device']} ({meta['sms']} SMs); "
           f"torch {meta['torch']}, triton {meta['triton']}.\n\nReproduce: `{meta['command']}`\n",
           "## Dense FP8 GEMM, forward y = x·Wᵀ (1×128 × 128×128 scales, BF16 out), M = 4096\n",
           "\"ours Triton\" is `fp8_gemm_tma.py`, \"ours Gluon\" the warp-specialised `fp8_gemm_ws.py` (its tile "
           "width, 128 or 256 columns, timed per shape: in brackets); the ratio is the better of the two over "
           "`_scaled_mm`. One pass per shape in a fixed order: the sustained comparison at the target shape is "
           "[kernels-sustained.md](kernels-sustained.md).\n",
           "| N × K | ours Triton | ours Gluon | ours rel err | _scaled_mm TFLOPS | _scaled_mm rel err "
           "| best ours / _scaled_mm | BF16 matmul TFLOPS | auto dispatch (picks) | auto / fastest |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in dense:
        f = r["forward"]
        best = max(e["tflops"] for e in (f["ours"], f["gluon"]) if "error" not in e)
        ratio = best / f["scaled_mm"]["tflops"] if "error" not in f["scaled_mm"] else float("nan")
        width = f" [{f['gluon_width']}]" if f.get("gluon_width") else ""
        auto = f.get("auto_run", {"error": "not timed"})
        fastest = max([best] + ([f["scaled_mm"]["tflops"]] if "error" not in f["scaled_mm"] else []))
        out.append(f"| {r['N']}×{r['K']} | {_fmt(f['ours'])} | {_fmt(f['gluon'])}{width} | {_fmt(f['gluon'], 'rel_err')} | "
                   f"{_fmt(f['scaled_mm'])} | {_fmt(f['scaled_mm'], 'rel_err')} | {ratio:.2f} | "
                   f"{_fmt(f['bf16_matmul'])} | {_fmt(auto)} ({f['auto']}) | "
                   f"{auto['tflops'] / fastest if 'error' not in auto else float('nan'):.2f} |")
    out += ["\nThe same forward GEMMs timed as CUDA-graph replays (GPU time alone; an eager call above also "
            "pays its host time, which is most of a GEMM under ~150 µs):\n",
            "| N × K | ours Gluon | _scaled_mm | ours / _scaled_mm | auto dispatch |", "|---|---|---|---|---|"]
    for r in dense:
        g, t = r["forward"]["gluon"], r["forward"]["scaled_mm"]
        both = "error" not in g and "error" not in t
        out.append(f"| {r['N']}×{r['K']} | {_fmt(g, 'tflops_graph')} | {_fmt(t, 'tflops_graph')} | "
                   f"{g['tflops_graph'] / t['tflops_graph'] if both else float('nan'):.2f} | "
                   f"{_fmt(r['forward'].get('auto_run', {'error': 'not timed'}), 'tflops_graph')} |")
    out += ["\n## Dense FP8 GEMM, backward (same layers)\n",
            "dgrad dx = dy·W: M = 4096 rows, reduce over N. wgrad dW = dyᵀ·x: 1×128 × 1×128 (128×1 tiles "
            "along tokens), reduce over M = 4096, fp32 out.\n",
            "| layer N × K | dgrad ours Triton | dgrad ours Gluon | dgrad _scaled_mm | dgrad auto | wgrad ours Triton "
            "| wgrad ours Gluon | wgrad _scaled_mm | wgrad auto | rel err Gluon (dgrad / wgrad) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in dense:
        d, w = r["dgrad"], r["wgrad"]
        out.append(f"| {r['N']}×{r['K']} | {_fmt(d['ours'])} | {_fmt(d['gluon'])} | {_fmt(d['scaled_mm'])} | {d['auto']} | "
                   f"{_fmt(w['ours'])} | {_fmt(w['gluon'])} | {_fmt(w['scaled_mm'])} | {w['auto']} | "
                   f"{_fmt(d['gluon'], 'rel_err')} / {_fmt(w['gluon'], 'rel_err')} |")
    out += ["\n## Grouped GEMM, contiguous layout (TFLOPS)\n",
            "Row counts per expert are passed on the host (`m_counts`, as DeepEP's dispatch returns them); the "
            "last-but-one column is the same loop when it has to read them from `m_indices` (one host sync).\n",
            "| groups × rows | N × K | ours FP8 (Triton) | ours FP8 (Gluon) | rel err (Gluon) | _scaled_mm per expert "
            "| auto FP8 (picks) | ours BF16 | torch._grouped_mm BF16 | loop, counts synced | auto FP8 / _grouped_mm |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in grouped:
        base, auto = r["grouped_mm_bf16"], r["auto_fp8"]
        ratio = auto["tflops"] / base["tflops"] if "error" not in base and "error" not in auto else float("nan")
        out.append(f"| {r['groups']} × {r['m_per_group']} | {r['N']}×{r['K']} | {_fmt(r['ours_fp8'])} | "
                   f"{_fmt(r['gluon_fp8'])} | {_fmt(r['gluon_fp8'], 'rel_err')} | {_fmt(r['scaled_mm_loop'])} | "
                   f"{_fmt(auto)} ({r['auto']}) | "
                   f"{_fmt(r['ours_bf16'])} | {_fmt(base)} | {_fmt(r['scaled_mm_loop_sync'])} | {ratio:.2f} |")
    out += ["\n## Memory-bound kernels (GB/s, bytes read + written)\n", "| kernel | GB/s |", "|---|---|"]
    for group in ("quant_gbps", "permute_gbps", "swiglu_gbps"):
        out += [f"| {group.split('_')[0]}: {name} | {value:.0f} |" for name, value in memory[group].items()]
    out += ["\n## Fused vs unfused (µs)\n", "| op | µs |", "|---|---|"]
    out += [f"| {name} | {value:.1f} |" for name, value in memory["fused_us"].items()]
    out += ["\n## Autotune choices\n", "```", *tunes, "```", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/kernels.md")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    props = torch.cuda.get_device_properties(0)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "command": "python benchmarks/kernels_bench.py --out docs/results/kernels.md"}
    dense = dense_results()
    grouped = grouped_results()
    try:
        memory = memory_bound_results()
    except (RuntimeError, ValueError, AttributeError) as exc:
        log.exception("memory-bound benchmarks failed")
        memory = {"quant_gbps": {}, "permute_gbps": {}, "swiglu_gbps": {}, "fused_us": {"failed": float("nan")},
                  "error": str(exc)}
    tunes = autotune_choices()
    text = render(meta, dense, grouped, memory, tunes)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    os.replace(tmp, args.out)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "dense": dense, "grouped": grouped,
                                               "memory": memory, "autotune": tunes}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
