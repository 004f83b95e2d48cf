"""The routed experts' FP8 weight gradient at V3's shapes, each backend of ``kernels.grouped_gemm.grouped_wgrad_fp8``.

    python -P benchmarks/grouped_wgrad_bench.py             # a Hopper GPU; about 20 s
    python -P benchmarks/grouped_wgrad_bench.py --segments  # only the segment tables' comparison
    python -P benchmarks/grouped_wgrad_bench.py --tall      # only 128- against 256-row output tiles

32 experts (one GPU's share at EP = 8), 4096 tokens routed top-8 uniformly at random (seed 0), each expert's
rows padded to 128 (the contiguous layout); gate_up's Wgrad (4096 x 7168) and down's (7168 x 2048). Backends:
"torch" (a block-scaled cuBLAS GEMM per expert, the bounds on the host, the Triton kernel for segments cuBLAS
gets wrong), "gluon" (``fp8_gemm_ws.fp8_wgrad_ws``: one launch, the bounds on the GPU) and "triton" (the
K-grouped Triton kernel). Time: ``triton.testing.do_bench`` median; TFLOPS over the real (unpadded) rows; the
largest relative difference of each backend's result from the "torch" one. docs/design/kernels.md quotes it.

Then the Gluon kernel adding into an FP32 main gradient (``accumulate_into``, as ``model.weight_grad`` runs it in
training), by each path of ``fp8_gemm_ws.OLD_VALUES`` for the old values: read from HBM after the last MMA
("after"), asked into L2 before the K loop ("l2"), brought into the output buffer by the copy engine while the
K loop runs ("tma"), or none read, the copy engine adding the product in L2 ("reduce"); the same timing, the result
checked against old + product. Then the same for V3's dense linears (``DENSE_OLD_VALUES``), one layer's worth.
Last, S micro-batches' expert Wgrads into one main gradient: S launches of one segment table against one launch of
S tables (``seg_offsets`` (S, E + 1)).
``--tall``: the same Wgrads (the experts' at S = 1 and 4 tables, each old-value path; V3's dense linears) with
128-row output tiles against 256-row ones (``block_m``; ``fp8_gemm_ws.TALL_DENSE``, ``TALL_MIN_SEGMENTS`` and
``TALL_OLD_VALUES`` choose by default), each result (one launch into a fresh copy of the main gradient) compared bit
for bit.
"""

from __future__ import annotations

import functools
import itertools
import sys

import torch

from moeplan.kernels import fp8_gemm_ws
from moeplan.kernels.fp8_quant import quant_act_128x1_t
from moeplan.kernels.grouped_gemm import grouped_wgrad_fp8

EXPERTS, TOKENS, TOP_K, TILE = 32, 4096, 8, 128
SHAPES = {"gate_up": (4096, 7168), "down": (7168, 2048)}  # (M, N) of dW[e] = dy_e^T x_e
BACKENDS = ("torch", "gluon", "triton")


def segments(seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """Rows per expert and the padded segment bounds (int32, on the host)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.randint(0, EXPERTS, (TOKENS * TOP_K,), generator=g), minlength=EXPERTS).tolist()
    padded = [-(-c // TILE) * TILE for c in counts]
    return counts, torch.tensor([0, *itertools.accumulate(padded)], dtype=torch.int32)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("grouped_wgrad_bench: needs a CUDA GPU (a Hopper one for the gluon backend)")
    import triton

    counts, bounds = segments()
    rows = int(bounds[-1])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{EXPERTS} experts, {TOKENS} tokens top-{TOP_K}, {rows} padded rows")
    for name, (m, n) in SHAPES.items():
        a_t, sa_t = quant_act_128x1_t(torch.randn(rows, m, device="cuda", dtype=torch.bfloat16))
        b_t, sb_t = quant_act_128x1_t(torch.randn(rows, n, device="cuda", dtype=torch.bfloat16))
        flops = 2 * m * n * sum(counts)
        results = {}
        for backend in BACKENDS:
            seg = bounds if backend == "torch" else bounds.cuda()  # "torch" slices at host bounds: no sync
            run = functools.partial(grouped_wgrad_fp8, a_t, sa_t, b_t, sb_t, seg, backend=backend)
            results[backend] = (run(), triton.testing.do_bench(run, rep=200, return_mode="median"))
        base = results["torch"][0]
        for backend, (out, ms) in results.items():
            diff = float((out - base).norm() / base.norm())
            print(f"{name} ({m} x {n}) {backend}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOPS, vs torch {diff:.1e}")
        product = fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, bounds.cuda())
        old = torch.randn(EXPERTS, m, n, device="cuda")
        default = fp8_gemm_ws.OLD_VALUES
        for path in fp8_gemm_ws.OLD_VALUE_PATHS:
            fp8_gemm_ws.OLD_VALUES = path
            main_grad = old.clone()
            fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, bounds.cuda(), accumulate_into=main_grad)
            diff = float((main_grad - (old + product)).abs().max())
            run = functools.partial(fp8_gemm_ws.fp8_wgrad_ws, a_t, sa_t, b_t, sb_t, bounds.cuda(),
                                    accumulate_into=main_grad)
            ms = triton.testing.do_bench(run, rep=200, return_mode="median")
            print(f"{name} ({m} x {n}) gluon into FP32, old values {path!r}: "
                  f"{ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOPS, max |C - (old + product)| {diff:.1e}")
        fp8_gemm_ws.OLD_VALUES = default
    dense_paths()
    segment_tables()


# V3's dense linears (attention and the shared expert), (out, in) features: their Wgrad dW = dy^T x over TOKENS
DENSE = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "kv_b": (32768, 512), "o": (7168, 16384),
         "shared gate_up": (4096, 7168), "shared down": (7168, 2048)}


def dense_paths() -> None:
    """The dense Wgrads into FP32 main gradients (``fp8_gemm_ws`` with ``accumulate_into``, as
    ``model.weight_grad.fused_main_grad_fp8`` runs them), each path of ``DENSE_OLD_VALUES``; one layer's sum."""
    import triton

    totals = dict.fromkeys(fp8_gemm_ws.OLD_VALUE_PATHS, 0.0)
    for name, (m, n) in DENSE.items():
        a_t, sa_t = quant_act_128x1_t(torch.randn(TOKENS, m, device="cuda", dtype=torch.bfloat16))
        b_t, sb_t = quant_act_128x1_t(torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16))
        product = fp8_gemm_ws.fp8_gemm_ws(a_t, sa_t, b_t, sb_t, torch.float32)
        old = torch.randn(m, n, device="cuda")
        default = fp8_gemm_ws.DENSE_OLD_VALUES
        cells = []
        for path in fp8_gemm_ws.OLD_VALUE_PATHS:
            fp8_gemm_ws.DENSE_OLD_VALUES = path
            main_grad = old.clone()
            fp8_gemm_ws.fp8_gemm_ws(a_t, sa_t, b_t, sb_t, torch.float32, accumulate_into=main_grad)
            diff = float((main_grad - (old + product)).abs().max())
            run = functools.partial(fp8_gemm_ws.fp8_gemm_ws, a_t, sa_t, b_t, sb_t, torch.float32,
                                    accumulate_into=main_grad)
            ms = triton.testing.do_bench(run, rep=100, return_mode="median")
            totals[path] += ms
            cells.append(f"{path} {ms:.3f} ms ({2 * m * n * TOKENS / ms / 1e9:.0f} TFLOPS, diff {diff:.0e})")
        fp8_gemm_ws.DENSE_OLD_VALUES = default
        plain = triton.testing.do_bench(functools.partial(fp8_gemm_ws.fp8_gemm_ws, a_t, sa_t, b_t, sb_t,
                                                          torch.float32), rep=100, return_mode="median")
        print(f"dense {name} ({m} x {n}, K {TOKENS}) into FP32: " + "; ".join(cells)
              + f"; no accumulation {plain:.3f} ms")
    print("dense Wgrads of one layer, summed: " + ", ".join(f"{p} {t:.3f} ms" for p, t in totals.items()))


def _tables(count: int) -> tuple[torch.Tensor, int]:
    """``count`` micro-batches' segment tables side by side along K (seeds 0 .. count - 1) on the GPU: (count,
    E + 1), or (E + 1,) for one; and their total rows."""
    tables, start = [], 0
    for seed in range(count):
        bounds = segments(seed)[1]
        tables.append(bounds + start)
        start += int(bounds[-1])
    return (torch.stack(tables) if count > 1 else tables[0]).cuda().contiguous(), start


def segment_tables() -> None:
    """The experts' Wgrads of S micro-batches into one FP32 main gradient: S launches of one segment table each
    (as the model runs them now) against one launch of S tables (``fp8_wgrad_ws`` with ``seg_offsets`` (S, E + 1):
    each expert's main gradient read and written once for all S); per micro-batch, and the results compared."""
    import triton

    for name, (m, n) in SHAPES.items():
        for count in range(2, fp8_gemm_ws.MAX_SEGMENTS + 1, 2):
            tables, start = _tables(count)
            a_t, sa_t = quant_act_128x1_t(torch.randn(start, m, device="cuda", dtype=torch.bfloat16))
            b_t, sb_t = quant_act_128x1_t(torch.randn(start, n, device="cuda", dtype=torch.bfloat16))
            old = torch.randn(EXPERTS, m, n, device="cuda")
            one_by_one, together = old.clone(), old.clone()

            wgrad = functools.partial(fp8_gemm_ws.fp8_wgrad_ws, a_t, sa_t, b_t, sb_t)
            separate = functools.partial(_each_table, wgrad, tables, one_by_one)
            joint = functools.partial(wgrad, tables, accumulate_into=together)
            separate(), joint()
            diff = float((one_by_one - together).abs().max() / (one_by_one - old).abs().max())
            ms = [triton.testing.do_bench(f, rep=200, return_mode="median") for f in (separate, joint)]
            print(f"{name} ({m} x {n}) into FP32, {count} micro-batches: {count} launches of one table "
                  f"{ms[0] / count:.3f} ms a micro-batch, one launch of {count} tables {ms[1] / count:.3f} ms "
                  f"({1 - ms[1] / ms[0]:.1%} less); results differ by {diff:.1e} of the product")


def tile_heights() -> None:
    """128-row against 256-row ("tall") output tiles (``block_m``) for the experts' Wgrads into FP32 main gradients
    (one table and ``MAX_SEGMENTS`` tables, each old-value path; a tall tile's "tma" is "l2") and V3's dense linears
    (``DENSE_OLD_VALUES``, and without accumulating); per micro-batch; the two heights' results compared bit for
    bit."""
    import triton

    def timed(fn) -> float:
        return triton.testing.do_bench(fn, rep=200, return_mode="median")

    for name, (m, n) in SHAPES.items():
        for count in (1, fp8_gemm_ws.MAX_SEGMENTS):
            tables, start = _tables(count)
            a_t, sa_t = quant_act_128x1_t(torch.randn(start, m, device="cuda", dtype=torch.bfloat16))
            b_t, sb_t = quant_act_128x1_t(torch.randn(start, n, device="cuda", dtype=torch.bfloat16))
            flops = 2 * m * n * start  # padded rows: the same for both heights
            old = torch.randn(EXPERTS, m, n, device="cuda")
            default, tall_default = fp8_gemm_ws.OLD_VALUES, fp8_gemm_ws.TALL_OLD_VALUES
            cells = []
            for path in fp8_gemm_ws.OLD_VALUE_PATHS:
                fp8_gemm_ws.OLD_VALUES = fp8_gemm_ws.TALL_OLD_VALUES = path
                outs, ms = [], []
                for block_m in (128, 256):
                    outs.append(fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, tables, accumulate_into=old.clone(),
                                                         block_m=block_m))  # once, for the bits
                    ms.append(timed(functools.partial(fp8_gemm_ws.fp8_wgrad_ws, a_t, sa_t, b_t, sb_t, tables,
                                                      accumulate_into=old.clone(), block_m=block_m)) / count)
                same = torch.equal(outs[0], outs[1])
                cells.append(f"{path} {ms[0]:.3f} -> {ms[1]:.3f} ms ({flops / count / ms[1] / 1e9:.0f} TFLOPS, "
                             f"{'same bits' if same else 'DIFFERENT'})")
            fp8_gemm_ws.OLD_VALUES, fp8_gemm_ws.TALL_OLD_VALUES = default, tall_default
            plain = [timed(functools.partial(fp8_gemm_ws.fp8_wgrad_ws, a_t, sa_t, b_t, sb_t, tables, block_m=bm)) /
                     count for bm in (128, 256)]
            print(f"tall {name} ({m} x {n}), {count} table(s), a micro-batch, 128 -> 256 rows: " + "; ".join(cells)
                  + f"; no accumulation {plain[0]:.3f} -> {plain[1]:.3f} ms")
    totals = [0.0, 0.0, 0.0, 0.0]
    for name, (m, n) in DENSE.items():
        if m % 256:
            print(f"tall dense {name} ({m} x {n}): M not a multiple of 256, 128-row tiles only")
            continue
        a_t, sa_t = quant_act_128x1_t(torch.randn(TOKENS, m, device="cuda", dtype=torch.bfloat16))
        b_t, sb_t = quant_act_128x1_t(torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16))
        old = torch.randn(m, n, device="cuda")
        row, outs = [], []
        for block_m in (128, 256):
            outs.append(fp8_gemm_ws.fp8_gemm_ws(a_t, sa_t, b_t, sb_t, torch.float32, accumulate_into=old.clone(),
                                                block_m=block_m))  # once, for the bits
            row.append(timed(functools.partial(fp8_gemm_ws.fp8_gemm_ws, a_t, sa_t, b_t, sb_t, torch.float32,
                                               accumulate_into=old.clone(), block_m=block_m)))
        for block_m in (128, 256):
            row.append(timed(functools.partial(fp8_gemm_ws.fp8_gemm_ws, a_t, sa_t, b_t, sb_t, torch.float32,
                                               block_m=block_m)))
        totals = [t + r for t, r in zip(totals, row)]
        print(f"tall dense {name} ({m} x {n}, K {TOKENS}), 128 -> 256 rows: into FP32 ({fp8_gemm_ws.DENSE_OLD_VALUES}) "
              f"{row[0]:.3f} -> {row[1]:.3f} ms ({2 * m * n * TOKENS / row[1] / 1e9:.0f} TFLOPS, "
              f"{'same bits' if torch.equal(*outs) else 'DIFFERENT'}); no accumulation {row[2]:.3f} -> {row[3]:.3f} ms")
    print(f"tall dense Wgrads of one layer, summed, 128 -> 256 rows: into FP32 {totals[0]:.3f} -> {totals[1]:.3f} ms; "
          f"no accumulation {totals[2]:.3f} -> {totals[3]:.3f} ms")


def _each_table(wgrad, tables: torch.Tensor, into: torch.Tensor) -> None:
    for table in tables:
        wgrad(table, accumulate_into=into)


if __name__ == "__main__":
    if sys.argv[1:] == ["--segments"]:
        segment_tables()
    elif sys.argv[1:] == ["--tall"]:
        tile_heights()
    else:
        main()
