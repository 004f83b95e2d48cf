"""Sweep the TMA FP8 GEMM's configurations on DeepSeek-V3 shapes, and time the grouped loop's parts.

    python benchmarks/fp8_gemm_sweep.py --out docs/results/kernels-sweep.md [--json FILE]

Dense: every configuration of ``kernels/fp8_gemm_tma.py`` and ``kernels/fp8_gemm_ws.py`` (with the
latter's unpromoted upper bound) on the six forward shapes (M = 4096) and
on the weight-gradient form of two of them, against ``torch._scaled_mm`` (1×128 / 128×128 block
scales) and tensor-wise FP8 ``_scaled_mm`` (one scale per operand: the same tensor-core work without
promotion, an upper bound for block scaling) in the same run. Grouped: where the per-expert
``_scaled_mm`` loop loses time against the same GEMMs with prepared scales, and against BF16
``torch._grouped_mm``. A configuration that fails to compile or run is listed with its error.
"""

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton
import triton.testing

from moeplan.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from moeplan.kernels.fp8_gemm_tma import fp8_gemm_tma
from moeplan.kernels.fp8_gemm_ws import CONFIGS as WS_CONFIGS
from moeplan.kernels.fp8_gemm_ws import WIDTHS, fp8_gemm_ws
from moeplan.kernels.fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_weight_128x128
from moeplan.kernels.grouped_gemm import grouped_gemm_fp8, make_problem, segment_rows

M = 4096
DENSE_NK = [(7168, 16384), (2112, 7168), (24576, 1536), (32768, 512), (4096, 7168), (7168, 2048)]
# (BLOCK_M, BLOCK_N, num_warps, num_stages, FLATTEN, WARP_SPECIALIZE)
SWEEP = [  # (BLOCK_M, BLOCK_N, warps, stages, FLATTEN, WARP_SPECIALIZE, DEFER, GROUP_M, programs per SM)
    (128, 128, 8, 4, False, False, False, 8, 1), (128, 128, 8, 4, True, False, False, 8, 1),
    (64, 128, 4, 4, False, False, False, 8, 2), (64, 128, 4, 3, False, False, False, 8, 2),
    (64, 128, 4, 4, False, False, False, 8, 3), (64, 128, 4, 4, True, False, False, 8, 2),
    (128, 64, 4, 4, False, False, False, 8, 2), (128, 64, 4, 3, False, False, False, 8, 3),
    (64, 128, 4, 4, False, True, False, 8, 2), (128, 128, 8, 3, False, False, False, 8, 1),
]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def attempt(fn, flops, ref):
    try:
        out = fn()
        torch.cuda.synchronize()
        err = float((out.double() - ref).norm() / ref.norm())
        return {"tflops": tflops(flops, bench(fn)), "rel_err": err}
    except Exception as exc:  # noqa: BLE001 (a sweep records every failure and goes on)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"}


def dense_sweep() -> list[dict]:
    rows = []
    for N, K in DENSE_NK:
        x, w = torch.randn(M, K, device="cuda"), torch.randn(N, K, device="cuda")
        a, sa = quant_act_1x128(x)
        b, sb, _ = quant_weight_128x128(w)
        ref = fp8_gemm_ref(a, sa, b, sb, torch.float32).double()
        flops = 2.0 * M * N * K
        row = {"N": N, "K": K, "scaled_mm": attempt(lambda: fp8_gemm(a, sa, b, sb, backend="torch"), flops, ref),
               "triton_ptr": attempt(lambda: fp8_gemm(a, sa, b, sb, backend="triton"), flops, ref)}
        one = torch.ones((), device="cuda")
        row["tensorwise"] = attempt(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16), flops,
                                    a.double() @ b.double().t())
        sa_t = sa.t().contiguous().t()  # M-major: one K step's scales are contiguous
        for cfg in WS_CONFIGS:
            row[f"ws {cfg}"] = attempt(lambda c=cfg: fp8_gemm_ws(a, sa, b, sb, config=c), flops, ref)
        # the same data flow with no promotion and no scales (a different product): its upper bound
        unscaled = a.double() @ b.double().t()
        for cfg in WIDTHS.values():
            row[f"ws {cfg} unpromoted"] = attempt(lambda c=cfg: fp8_gemm_ws(a, sa, b, sb, config=c, promote=False),
                                                   flops, unscaled)
        for cfg in SWEEP:
            row[str(cfg)] = attempt(lambda c=cfg: fp8_gemm_tma(a, sa, b, sb, config=c), flops, ref)
            row[str(cfg) + " sa M-major"] = (attempt(lambda c=cfg: fp8_gemm_tma(a, sa_t, b, sb, config=c), flops, ref)
                                             if cfg == SWEEP[0] else None)
        print(json.dumps(row), flush=True)
        rows.append(row)
    # weight gradient form (1x128 row scales on both operands, fp32 out) for two shapes
    for N, K in [(7168, 2048), (4096, 7168)]:
        dy, x = torch.randn(M, N, device="cuda"), torch.randn(M, K, device="cuda")
        dt, sdt = quant_act_128x1_t(dy)
        xt, sxt = quant_act_128x1_t(x)
        ref = fp8_gemm_ref(dt, sdt, xt, sxt, torch.float32).double()
        flops = 2.0 * M * N * K
        row = {"N": N, "K": K, "wgrad": True,
               "scaled_mm": attempt(lambda: fp8_gemm(dt, sdt, xt, sxt, torch.float32, backend="torch"), flops, ref)}
        for cfg in SWEEP[:2]:
            row[str(cfg)] = attempt(lambda c=cfg: fp8_gemm_tma(dt, sdt, xt, sxt, torch.float32, config=c), flops, ref)
        row[f"ws {WIDTHS[128]}"] = attempt(lambda: fp8_gemm_ws(dt, sdt, xt, sxt, torch.float32), flops, ref)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def grouped_parts() -> list[dict]:
    """Per-expert loop: as shipped, with host-side counts, and with scales prepared once (ideal)."""
    rows = []
    for groups, m_per_group, N, K in [(8, 4096, 7168, 2048), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168)]:
        p = make_problem(groups, m_per_group, N, K)
        a, sa, b, sb, m_idx = p["a"], p["sa"], p["b"], p["sb"], p["m_indices"]
        flops = 2.0 * groups * m_per_group * N * K
        segs = segment_rows(m_idx, groups)
        sa_parts = [sa[f:f + n].t().contiguous().t() for f, _, n in segs]
        sb_parts = [sb[e].t() for e in range(groups)]
        c = torch.empty((a.shape[0], N), dtype=torch.bfloat16, device="cuda")

        def prepared():
            for e, (f, _, n) in enumerate(segs):
                torch._scaled_mm(a[f:f + n], b[e].t(), scale_a=sa_parts[e], scale_b=sb_parts[e],
                                 out_dtype=torch.bfloat16, out=c[f:f + n])
            return c

        def one_dense():
            return torch._scaled_mm(a[:m_per_group], b[0].t(), scale_a=sa_parts[0], scale_b=sb_parts[0],
                                    out_dtype=torch.bfloat16)

        sa_t = sa.t().contiguous()  # (K/128, M_total)
        sb_t = sb.transpose(1, 2)

        def strided():  # one transposed copy; each expert's scales a strided (1, M_total) view
            for e, (f, _, n) in enumerate(segs):
                torch._scaled_mm(a[f:f + n], b[e].t(), scale_a=sa_t[:, f:f + n].t(), scale_b=sb_t[e],
                                 out_dtype=torch.bfloat16, out=c[f:f + n])
            return c

        def copies():  # one small copy per expert, in the loop
            for e, (f, _, n) in enumerate(segs):
                torch._scaled_mm(a[f:f + n], b[e].t(), scale_a=sa[f:f + n].t().contiguous().t(), scale_b=sb_t[e],
                                 out_dtype=torch.bfloat16, out=c[f:f + n])
            return c

        ref = prepared().clone()
        extra = {}
        counts = [m_per_group] * groups

        def module():
            return grouped_gemm_fp8(a, sa, b, sb, m_idx, backend="torch", m_counts=counts)

        for name, fn in (("host_counts_strided_scales", strided), ("host_counts_copy_per_expert", copies),
                         ("module_with_m_counts", module)):
            try:
                err = float((fn().double() - ref.double()).norm() / ref.double().norm())
                extra[name] = tflops(flops, bench(fn))
                extra[name + "_diff_vs_prepared"] = err
            except Exception as exc:  # noqa: BLE001
                extra[name] = None
                extra[name + "_error"] = str(exc).splitlines()[0][:150]
        graph = torch.cuda.CUDAGraph()
        prepared()
        with torch.cuda.graph(graph):
            prepared()
        row = {"shape": [groups, m_per_group, N, K],
               "loop_as_shipped": tflops(flops, bench(lambda: grouped_gemm_fp8(a, sa, b, sb, m_idx, backend="torch"))),
               "loop_prepared_scales": tflops(flops, bench(prepared)),
               "loop_prepared_graph": tflops(flops, bench(graph.replay)),
               "one_expert_dense": tflops(flops / groups, bench(one_dense)),
               "grouped_mm_bf16": tflops(flops, bench(lambda: torch._grouped_mm(p["x"], p["w"].transpose(1, 2),
                                                                                offs=p["offs"]))), **extra}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def render(meta: dict, dense: list[dict], grouped: list[dict]) -> str:
    def cell(r):
        if r is None:
            return "-"
        return r["error"][:60] if "error" in r else f"{r['tflops']:.0f} ({r['rel_err']:.1e})"

    out = [f"# FP8 GEMM configuration sweep\n\n{meta['date']} on {meta['device']}; torch {meta['torch']}, "
           f"triton {meta['triton']}. Reproduce: `{meta['command']}`\n",
           "TFLOPS (relative error against float64 on the dequantised operands). Configurations are "
           "(BLOCK_M, BLOCK_N, warps, stages, flatten, warp-specialise, defer, GROUP_M) of `kernels/fp8_gemm_tma.py`; "
           "tensor-wise is `_scaled_mm` with one scale per operand (no promotion: an upper bound). "
           "Rows `ws (BLOCK_N, STAGES, GROUP_M)` are the warp-specialised Gluon kernel of `kernels/fp8_gemm_ws.py`; "
           "`unpromoted` is its data flow with no scales and no promotion (the tensor cores accumulate all of K: "
           "a different product, its error against the unscaled float64 product), an upper bound for that kernel.\n"]
    keys = [k for k in dense[0] if k not in ("N", "K")]
    out.append("| config | " + " | ".join(f"{r['N']}×{r['K']}{' wgrad' if r.get('wgrad') else ''}"
                                          for r in dense) + " |")
    out.append("|---" * (len(dense) + 1) + "|")
    for k in keys:
        out.append(f"| {k} | " + " | ".join(cell(r.get(k)) for r in dense) + " |")
    out += ["\n## Grouped: where the per-expert `_scaled_mm` loop loses time (TFLOPS)\n"]
    for g in grouped:
        out.append(f"- {g['shape']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in g.items() if k != "shape"))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/kernels-sweep.md"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dense-only", action="store_true", help="skip the grouped loop's parts")
    parser.add_argument("--render", type=Path, help="re-render --out from a --json file of an earlier run")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        args.out.write_text(render(saved["meta"], saved["dense"], saved["grouped"]))
        return
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": "python benchmarks/fp8_gemm_sweep.py --out docs/results/kernels-sweep.md"}
    grouped = [] if args.dense_only else grouped_parts()
    dense = dense_sweep()
    args.out.write_text(render(meta, dense, grouped))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "dense": dense, "grouped": grouped}, indent=1))


if __name__ == "__main__":
    main()
