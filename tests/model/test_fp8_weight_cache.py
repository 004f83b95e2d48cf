"""The FP8 weight cache (``model.fp8.Fp8WeightCache``): one quantisation per weight version, W^T's blocks
made from W's, and nothing stale after an in-place write, a clear, or a freed weight. On the GPU, or tiny
through the Triton interpreter (tests/conftest.py)."""

from __future__ import annotations

import torch

from moeplan.kernels.fp8_quant import quant_weight_128x128_ref
from moeplan.model.fp8 import MIN_AMAX, Fp8WeightCache, _kernel_weight, _kernel_weight_t
from tests.kernels import test_kernels
from tests.kernels.test_kernels import rand

device, poisoned = test_kernels.device, test_kernels.poisoned


def _equal(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0].float(), b[0].float()) and torch.equal(a[1], b[1])


def test_one_quantisation_per_version_and_transpose_from_the_same_blocks(device):
    cache = Fp8WeightCache(_kernel_weight, _kernel_weight_t)
    w = rand(2, 256, 384, seed=0, device=device, dtype=torch.bfloat16)  # (E, N, K): 2 x 3 blocks per expert
    first = cache(w)
    assert _equal(first, quant_weight_128x128_ref(w, amax_floor=MIN_AMAX))
    assert cache(w) is first and cache.misses == 1
    wt = cache(w.transpose(1, 2))  # the input gradient's W^T, (E, K, N)
    assert _equal(wt, quant_weight_128x128_ref(w.transpose(1, 2), amax_floor=MIN_AMAX))
    assert wt[0].is_contiguous() and cache.misses == 2
    assert cache(w.transpose(1, 2)) is wt and cache.misses == 2
    two_d = rand(128, 256, seed=1, device=device, dtype=torch.bfloat16)
    assert _equal(cache(two_d.t()), quant_weight_128x128_ref(two_d.t(), amax_floor=MIN_AMAX))


def test_an_in_place_write_or_a_clear_makes_a_new_copy(device):
    cache = Fp8WeightCache(_kernel_weight, _kernel_weight_t)
    w = rand(256, 128, seed=2, device=device, dtype=torch.bfloat16)
    old = cache(w)
    with torch.no_grad():
        w.mul_(2.0)  # what an optimizer step does: bumps the version counter
    new = cache(w)
    assert new is not old and _equal(new, quant_weight_128x128_ref(w, amax_floor=MIN_AMAX))
    assert not torch.equal(new[1], old[1])
    cache.clear()
    assert cache(w) is not new and cache.misses == 3


def test_a_freed_weight_is_never_served_to_a_new_one_at_its_address(device):
    cache = Fp8WeightCache(_kernel_weight, _kernel_weight_t)
    for seed in range(4):  # the allocator hands the same block back; the dead weight's entry must not match
        w = rand(128, 128, seed=seed, device=device, dtype=torch.bfloat16)
        assert _equal(cache(w), quant_weight_128x128_ref(w, amax_floor=MIN_AMAX))
        assert cache.misses == seed + 1
        del w


def test_a_forward_that_makes_both_leaves_the_backward_a_hit_with_the_same_bits(device):
    from moeplan.model.fp8 import _kernel_weight_both

    cache = Fp8WeightCache(_kernel_weight, _kernel_weight_t, _kernel_weight_both)
    for w in (rand(2, 256, 384, seed=5, device=device, dtype=torch.bfloat16),  # experts (E, N, K)
              rand(384, 256, seed=6, device=device, dtype=torch.bfloat16)):  # a dense weight (N, K)
        misses = cache.misses
        fwd = cache.with_transpose(w)
        assert _equal(fwd, quant_weight_128x128_ref(w, amax_floor=MIN_AMAX)) and cache.misses == misses + 1
        assert cache.with_transpose(w) is fwd and cache(w) is fwd
        bwd = cache(w.mT)  # what the Dgrad asks for: made in the forward's pass
        assert cache.misses == misses + 1 and bwd[0].is_contiguous() and bwd[1].is_contiguous()
        assert _equal(bwd, quant_weight_128x128_ref(w.mT, amax_floor=MIN_AMAX))
        with torch.no_grad():
            w.add_(1.0)  # the optimizer's write invalidates both
        assert _equal(cache(w.mT), quant_weight_128x128_ref(w.mT, amax_floor=MIN_AMAX))
        assert cache.misses == misses + 2
    strided = rand(256, 128, seed=7, device=device, dtype=torch.bfloat16).t()  # not contiguous: one copy only
    assert _equal(cache.with_transpose(strided), quant_weight_128x128_ref(strided, amax_floor=MIN_AMAX))
