"""benchmarks/grouped_wgrad_bench.py: its routing is the contiguous layout's, and it refuses a machine without a GPU."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[2] / "benchmarks" / "grouped_wgrad_bench.py"
_spec = importlib.util.spec_from_file_location("grouped_wgrad_bench", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_segments_pad_every_expert_to_128_rows():
    counts, bounds = bench.segments()
    assert len(counts) == bench.EXPERTS and sum(counts) == bench.TOKENS * bench.TOP_K
    sizes = torch.diff(bounds).tolist()
    assert all(s % 128 == 0 and c <= s < c + 128 for s, c in zip(sizes, counts, strict=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_refuses_without_a_gpu():
    out = subprocess.run([sys.executable, "-P", str(BENCH)], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1 and "needs a CUDA GPU" in out.stderr
