"""Causal attention throughput on one GPU by sequence length, DeepSeek-V3 head dims (q/k 192, v 128).

    python benchmarks/attention_bench.py --out simulator/costs/data/h200-attention.json

``torch.nn.functional.scaled_dot_product_attention`` (BF16, causal, torch's own backend choice).
FLOPs follow ``simulator.accounting.flops.attention_core_flops`` exactly: forward
``2 · B · H · (d_qk + d_v) · S · (S + 1) / 2`` (each query sees its mean (S + 1) / 2 keys); forward +
backward is counted as 3x the forward, the model-FLOPs convention the cost tables use. Times are
CUDA-event medians of a few repetitions after warm-up; every run stays well above launch overhead.
"""

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

D_QK, D_V = 192, 128
SEQS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


def timed(fn, reps: int = 5) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def measure(seq: int) -> dict:
    heads = 128 if seq <= 32768 else 16  # bounded run time at 64K / 128K; thousands of tiles either way
    batch = max(1, 16384 // seq)
    q = torch.randn(batch, heads, seq, D_QK, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, heads, seq, D_QK, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, heads, seq, D_V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, heads, seq, D_V, device="cuda", dtype=torch.bfloat16)
    fwd_flops = 2.0 * batch * heads * (D_QK + D_V) * seq * (seq + 1) / 2

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad)

    t_fwd, t_all = timed(fwd), timed(fwd_bwd)
    return {"seq": seq, "batch": batch, "heads": heads, "fwd_s": t_fwd, "fwd_bwd_s": t_all,
            "fwd_TFLOPs": fwd_flops / t_fwd / 1e12, "fwd_bwd_TFLOPs_3x": 3 * fwd_flops / t_all / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("simulator/costs/data/h200-attention.json"))
    args = parser.parse_args()
    rows = []
    for seq in SEQS:
        rows.append(measure(seq))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    result = {
        "what": "causal SDPA, BF16, d_qk 192, d_v 128; FLOPs as simulator.accounting.flops.attention_core_flops; "
                "fwd_bwd counted as 3x forward",
        "command": "python benchmarks/attention_bench.py --out simulator/costs/data/h200-attention.json",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
