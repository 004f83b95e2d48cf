"""``kernels.mla_backward``: MLA's attention backward glue (RoPE's backward on d q; d k's no-RoPE heads and d v put
together) and the casts with transpose that read it where it lies.

On the CPU: the references against autograd's backward of the forward they invert (``model.fused.mla_query`` and
``mla_key_value``) bit for bit, the fallbacks (reference, then ``quant_act_both``), refusals of bad shapes, and the
Gluon kernel's two modes compiled offline for sm_90a: no spills, two programs an SM, each element of d q (or of d k
and d v) loaded from global memory once in 16-byte vectors. On a Hopper GPU: the Gluon modes against the references
then the cast at V3's shapes (128 heads, 128 + 64 query channels, 128 value channels, 4096 tokens) and a ragged one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from moeplan.kernels import fp8_quant_gluon, mla_backward
from moeplan.kernels.fp8_quant import quant_act_both
from moeplan.kernels.mla_backward import assemble_heads, heads_quant_both, rope_backward, rope_backward_quant_both
from moeplan.model.fused import mla_key_value, mla_query
from tests.kernels import test_kernels
from tests.kernels.test_fp8_gemm_ws import _sass

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(not fp8_quant_gluon.HAVE_GLUON, reason="needs triton with Gluon")
on_hopper = pytest.mark.skipif(not (ON_HOPPER and fp8_quant_gluon.HAVE_GLUON), reason="needs Gluon and a Hopper GPU")
device = test_kernels.device


def _rope_tables(seq: int, rope: int, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(seq, rope // 2, generator=gen) * 6.3
    return angle.cos().to(device), angle.sin().to(device)


def _same(a, b) -> None:
    (q, s), (qt, st) = a
    (q2, s2), (qt2, st2) = b
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    assert torch.equal(qt.view(torch.uint8), qt2.view(torch.uint8)) and torch.equal(st, st2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_backward_is_autograds_backward_of_the_query_bit_for_bit(dtype):
    """d q through ``rope_backward`` equals autograd's gradient of ``mla_query`` (RoPE on each head's last channels),
    over 2 sequences of 6 positions, 3 heads of 4 + 6 channels."""
    B, T, H, nope, rope = 2, 6, 3, 4, 6
    cos, sin = _rope_tables(T, rope)
    q = torch.randn(B, T, H, nope + rope, dtype=dtype, requires_grad=True)
    dq = torch.randn(B, T, H, nope + rope, dtype=dtype)
    mla_query(q, cos, sin, nope).backward(dq)
    got = rope_backward(dq.reshape(B * T, -1), cos, sin, nope + rope, nope)
    assert torch.equal(got, q.grad.reshape(B * T, -1))


def test_assemble_heads_and_the_key_rope_backward_are_autograds_for_the_kv_split():
    """``assemble_heads`` of (d k, d v) is autograd's gradient of ``mla_key_value``'s KV input, and
    ``model.fused.mla_key_rope_backward`` of d k its shared RoPE key's, bit for bit."""
    from moeplan.model.fused import mla_key_rope_backward

    B, T, H, nope, rope, v = 2, 5, 3, 4, 6, 8
    cos, sin = _rope_tables(T, rope, seed=1)
    kv = torch.randn(B, T, H, nope + v, dtype=torch.bfloat16, requires_grad=True)
    k_rope = torch.randn(B, T, rope, dtype=torch.bfloat16, requires_grad=True)
    dk = torch.randn(B, T, H, nope + rope, dtype=torch.bfloat16)
    dv = torch.randn(B, T, H, v, dtype=torch.bfloat16)
    k, val = mla_key_value(kv, k_rope, cos, sin, nope)
    torch.autograd.backward((k, val), (dk, dv))
    got = assemble_heads(dk.reshape(B * T, -1), dv.reshape(B * T, -1), nope + rope, nope)
    assert torch.equal(got, kv.grad.reshape(B * T, -1))
    assert torch.equal(mla_key_rope_backward(dk, cos, sin, nope), k_rope.grad)


def test_the_fallbacks_are_the_references_then_the_cast(device):
    """Off the Gluon kernel (here), the two casts are the references then ``quant_act_both``; shapes the references
    cannot take are one error naming the argument."""
    T, H, nope, rope, v = 64, 2, 128, 64, 128
    cos, sin = _rope_tables(T, rope, device)
    dq = test_kernels.rand(2 * T, H * (nope + rope), seed=3, device=device, dtype=torch.bfloat16)
    _same(rope_backward_quant_both(dq, cos, sin, nope + rope, nope, amax_floor=1e-12),
          quant_act_both(rope_backward(dq, cos, sin, nope + rope, nope), amax_floor=1e-12))
    dk = test_kernels.rand(2 * T, H * (nope + rope), seed=4, device=device, dtype=torch.bfloat16)
    dv = test_kernels.rand(2 * T, H * v, seed=5, device=device, dtype=torch.bfloat16)
    _same(heads_quant_both(dk, dv, nope + rope, nope, amax_floor=1e-12),
          quant_act_both(assemble_heads(dk, dv, nope + rope, nope), amax_floor=1e-12))
    with pytest.raises(ValueError, match="cos"):
        rope_backward(dq, cos[:, :-1].contiguous(), sin, nope + rope, nope)
    with pytest.raises(ValueError, match="dividing dq's 128 rows"):
        rope_backward(dq, cos[:-4], sin[:-4], nope + rope, nope)
    with pytest.raises(ValueError, match="head=191"):
        rope_backward(dq, cos, sin, nope + rope - 1, nope)
    with pytest.raises(ValueError, match="dk"):
        assemble_heads(dk, dv[:-1], nope + rope, nope)


_COMPILE_SCRIPT = """
import json
import torch
from moeplan.kernels import fp8_quant_gluon
print(json.dumps({mode: fp8_quant_gluon.compile_offline(torch.bfloat16, **{mode: True}).asm["ptx"]
                  for mode in ("rope", "heads")}))
"""


@needs_gluon
def test_the_gluon_modes_read_each_element_once_without_spills(tmp_path):
    """Both modes compiled for sm_90a at V3's head sizes: no spills, few enough registers for two 8-warp programs an
    SM, each thread's share of the tile loaded from global memory once in 16-byte vectors (d q's, or d k's or d v's
    by the tile), stored into shared memory once; RoPE's mode also loads cos and sin (4-byte loads, from L1/L2: 512
    B a position), and the heads' mode nothing else."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-P", "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    vectors = 128 * 128 * 2 // 16 // (32 * 8)  # 16-byte pieces of the tile a thread
    for mode, ptx in json.loads(res.stdout).items():
        report, _ = _sass(ptx, tmp_path)
        assert "0 bytes spill stores, 0 bytes spill loads" in report, (mode, report)
        regs = int(re.search(r"Used (\d+) registers", report).group(1))
        assert fp8_quant_gluon.resident(regs, 32768, 8) >= 2, (mode, regs)
        assert len(re.findall(r"ld\.global\.v4\.b32", ptx)) == vectors, mode
        assert len(re.findall(r"st\.shared\.v4\.b32", ptx)) == vectors, mode
        others = len(re.findall(r"ld\.global", ptx)) - vectors
        # RoPE's: a cos and a sin per pair of channels a thread holds (64 of the tile's 128 x 64 pairs)
        assert others == (2 * 128 * 64 // (32 * 8) if mode == "rope" else 0), (mode, others)


@pytest.mark.gpu
@on_hopper
def test_the_gluon_modes_are_the_references_then_the_cast(monkeypatch):
    """On the GPU: the heads' mode bit for bit the assembly then the cast; RoPE's the same but where the kernel's
    fused multiply-add rounds the rotated-back value to the neighbouring BF16 (module docstring): its dequantised
    values within a BF16 step of the reference path's, all but a few per million bytes equal. V3's 4096 x 128 heads
    and a ragged 300 rows (positions of 100)."""
    for M, T in ((4096, 4096), (300, 100)):
        H, nope, rope, v = 128, 128, 64, 128
        cos, sin = _rope_tables(T, rope, "cuda", seed=M)
        dq = test_kernels.rand(M, H * (nope + rope), seed=6, device="cuda", dtype=torch.bfloat16)
        dk = test_kernels.rand(M, H * (nope + rope), seed=7, device="cuda", dtype=torch.bfloat16)
        dv = test_kernels.rand(M, H * v, seed=8, device="cuda", dtype=torch.bfloat16)
        monkeypatch.setattr(mla_backward, "FUSED", False)
        want_q = rope_backward_quant_both(dq, cos, sin, nope + rope, nope)
        want_kv = heads_quant_both(dk, dv, nope + rope, nope)
        monkeypatch.setattr(mla_backward, "FUSED", True)
        got_q = rope_backward_quant_both(dq, cos, sin, nope + rope, nope)
        _same(heads_quant_both(dk, dv, nope + rope, nope), want_kv)
        for (q, s), (q2, s2) in zip(got_q, want_q, strict=True):
            differ = (q.view(torch.uint8) != q2.view(torch.uint8)).float().mean().item()
            assert differ < 1e-5, differ
            assert torch.allclose(s, s2, rtol=2 ** -7, atol=0)
