"""Grouped expert execution against a per-token loop oracle; backends agree in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeplan.model.experts import GroupedExperts
from moeplan.model.fp8 import dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles, reference_ops
from moeplan.model.grouped_mm import reference_grouped_mm, reference_grouped_weight_grad, torch_grouped_mm

E, D, I, N, K = 6, 32, 16, 20, 3


def _setup(seed: int, backend: str, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    experts = GroupedExperts(E, D, I, dtype, backend=backend,
                             fp8=reference_ops(128) if backend == "fp8" else None)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.3)
    x = torch.randn(N, D, generator=gen, dtype=dtype)
    scores = torch.rand(N, E, generator=gen)
    scores[:, E - 1] = -1  # expert E-1 gets no tokens: empty groups must work
    weights, indices = scores.topk(K, dim=-1)
    return experts, x, indices, weights


def _oracle(experts: GroupedExperts, x, indices, weights) -> torch.Tensor:
    """The naive definition: for every token and every chosen expert, run that expert's SwiGLU."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (experts.down_proj[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("backend", ["reference", "grouped_mm"])
def test_matches_per_token_oracle_with_gradients(backend: str) -> None:
    experts, x, indices, weights = _setup(0, backend)
    x.requires_grad_(True)
    out, counts = experts(x, indices, weights)
    assert counts.tolist() == torch.bincount(indices.flatten(), minlength=E).tolist()
    assert counts[E - 1] == 0
    x_ref = x.detach().clone().requires_grad_(True)
    expected = _oracle(experts, x_ref, indices, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # a stride-0 upstream gradient must be handled
    grads = [x.grad, experts.gate_up_proj.grad, experts.down_proj.grad]
    experts.zero_grad()
    expected.sum().backward()
    for got, want in zip(grads, [x_ref.grad, experts.gate_up_proj.grad, experts.down_proj.grad]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_mm_backends_agree() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(11, 16, generator=gen), torch.randn(4, 16, 8, generator=gen)
    offs = torch.tensor([3, 3, 9, 11], dtype=torch.int32)
    torch.testing.assert_close(reference_grouped_mm(a, b, offs), torch_grouped_mm(a, b, offs))
    g = torch.randn(11, 8, generator=gen)
    wgrad = reference_grouped_weight_grad(a, g, offs)
    torch.testing.assert_close(wgrad[2], a[3:9].t() @ g[3:9])
    assert wgrad[1].abs().max() == 0  # the empty group gets a zero gradient


def test_fp8_backend_equals_quantise_dequantise_oracle() -> None:
    """FP8 experts = the oracle run on 1x128-tile / 128x128-block quantised-dequantised operands."""
    ref, x, indices, weights = _setup(2, "reference")
    fp8, *_ = _setup(2, "fp8")
    with torch.no_grad():
        got, _ = fp8(x, indices, weights)
        want, _ = ref(x, indices, weights)
        qdq = lambda t, q, dq: dq(*q(t, 128), 128)  # noqa: E731
        expected = torch.zeros_like(x)
        for t in range(N):
            xq = qdq(x[t:t + 1], quantize_tiles, dequantize_tiles)[0]
            for j in range(K):
                e = int(indices[t, j])
                gate, up = (qdq(ref.gate_up_proj[e], quantize_blocks, dequantize_blocks) @ xq).chunk(2)
                act = qdq((F.silu(gate) * up)[None], quantize_tiles, dequantize_tiles)[0]
                expected[t] += weights[t, j] * (qdq(ref.down_proj[e], quantize_blocks, dequantize_blocks) @ act)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    rel = float((got - want).norm() / want.norm())
    assert 1e-3 < rel < 0.1, f"{rel=}: FP8 must differ from FP32 by a few percent (E4M3 has 3 mantissa bits)"


def test_bf16_backend() -> None:
    experts, x, indices, weights = _setup(3, "reference", dtype=torch.bfloat16)
    out, _ = experts(x, indices, weights)
    assert out.dtype == torch.bfloat16
    ref32 = GroupedExperts(E, D, I, torch.float32, backend="reference")
    ref32.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    want, _ = ref32(x.float(), indices, weights)
    assert float((out.float() - want).detach().norm() / want.detach().norm()) < 2e-2


def test_the_weighted_combine_equals_autograd_through_its_ops():
    from moeplan.model.experts import WeightedCombineFn

    g = torch.Generator().manual_seed(3)
    for dtype, fp32_sum in ((torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)):
        rows = torch.randn(12, 16, generator=g).to(dtype)
        weight = torch.rand(12, generator=g)
        token_of = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5])
        grad_out = torch.randn(6, 16, generator=g).to(torch.float32 if fp32_sum else dtype)
        a, wa = rows.clone().requires_grad_(), weight.clone().requires_grad_()
        b, wb = rows.clone().requires_grad_(), weight.clone().requires_grad_()
        out_a = WeightedCombineFn.apply(a, wa, token_of, 6, fp32_sum)
        weighted = b.float() * wb[:, None]
        weighted = weighted if fp32_sum else weighted.to(dtype)
        out_b = weighted.new_zeros(6, 16).index_add(0, token_of, weighted)
        out_a.backward(grad_out)
        out_b.backward(grad_out)
        assert torch.equal(out_a, out_b) and torch.equal(a.grad, b.grad) and torch.equal(wa.grad, wb.grad), dtype


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_counts_reach_the_host_as_given_and_the_early_count_changes_nothing(device) -> None:
    """``GroupedExperts.count``: pairs per expert on the device and, for the FP8 paths, on the host (on a GPU by a
    non-blocking copy and an event, on a CPU as they are); the experts' output and counts are the same whether
    the caller issued the count early (``MoE.forward``) or the experts count themselves."""
    from moeplan.model.experts import PendingCounts

    ids = torch.tensor([3, 0, 3, 1, 3, 0], device=device)
    experts = GroupedExperts(4, 8, 16, torch.float32, backend="fp8", fp8=reference_ops(128)).to(device)
    pending = experts.count(ids)
    assert pending.counts.tolist() == [2, 1, 0, 3] and pending.host() == [2, 1, 0, 3]
    assert (pending._ready is not None) == (device == "cuda")
    float_experts = GroupedExperts(4, 8, 16, torch.float32, backend="reference").to(device)
    assert float_experts.count(ids)._ready is None  # no host copy where no path reads the counts there
    assert PendingCounts(torch.tensor([5]), to_host=True).host() == [5]
    experts, x, indices, weights = _setup(7, "fp8")  # the FP8 path, which reads the counts on the host
    x, indices, weights = x.to(device), indices.to(device), weights.to(device)
    experts = experts.to(device)
    out, counts = experts(x, indices, weights)
    early, early_counts = experts(x, indices, weights, experts.count(indices.reshape(-1)))
    assert torch.equal(out, early) and torch.equal(counts, early_counts)
