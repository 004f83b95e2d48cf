"""FP32 main gradients: eight BF16 micro-batches accumulate in FP32 exactly as the FP32 sum of their
gradients, where BF16 accumulation (what the model does without them) drifts; the deferred W step lands
in ``main_grad`` too; the layout is flat, ordered, bucketed by dtype and padded."""

from __future__ import annotations

import pytest
import torch

from moeplan.model.runtime.main_grad import attach_main_grads
from moeplan.model.weight_grad import WeightGradStore, attach_weight_grad_store
from tests.model.runtime.tiny_mlp import TinyMlp, batches

MICRO_BATCHES = 8


def _backward(model: TinyMlp, ids: torch.Tensor, store: WeightGradStore | None) -> None:
    model.loss(ids, expert=0).backward()
    if store is not None:
        store.flush()  # the W step


def _fp32_sum_of_grads(model: TinyMlp, store: WeightGradStore | None) -> dict[str, torch.Tensor]:
    """Each micro-batch's gradient alone (param.grad in its dtype), summed in FP32: the oracle."""
    total: dict[str, torch.Tensor] = {}
    for ids in batches(0, MICRO_BATCHES):
        model.zero_grad(set_to_none=True)
        _backward(model, ids, store)
        for name, p in model.named_parameters():
            if p.grad is not None:
                total[name] = total.get(name, 0) + p.grad.float()
    model.zero_grad(set_to_none=True)
    return total


def _rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[k].float() - want[k]).norm() ** 2) for k in want)
    return (num / sum(float(w.norm() ** 2) for w in want.values())) ** 0.5


@pytest.mark.parametrize("deferred", [False, True], ids=["fused", "deferred-W"])
def test_main_grad_is_the_fp32_sum_of_the_micro_batches(deferred) -> None:
    model = TinyMlp(torch.bfloat16)
    store = WeightGradStore() if deferred else None
    assert attach_weight_grad_store(model, store) == 3  # up, head and the model (experts)
    want = _fp32_sum_of_grads(model, store)
    assert len(want) == 6  # every parameter but the unused expert

    for ids in batches(0, MICRO_BATCHES):  # what the model does alone: param.grad sums in BF16
        _backward(model, ids, store)
    bf16_error = _rel_error({n: p.grad for n, p in model.named_parameters() if n in want}, want)
    model.zero_grad(set_to_none=True)

    main = attach_main_grads(model)
    for ids in batches(0, MICRO_BATCHES):
        _backward(model, ids, store)
    named = dict(model.named_parameters())
    assert all(named[n].grad is None for n in want)  # freed after each backward
    for name, total in want.items():
        assert torch.equal(named[name].main_grad, total), name
    assert bf16_error > 1e-3, bf16_error  # measured: see docs/design/runtime.md
    main.detach()
    assert not any(hasattr(p, "main_grad") for p in model.parameters())


def test_buckets_are_flat_ordered_padded_and_by_dtype() -> None:
    model = TinyMlp(torch.bfloat16)
    main = attach_main_grads(model, pad_multiple=7)
    dtypes = [b.param_dtype for b in main.buckets]
    assert dtypes == [torch.float32, torch.bfloat16]  # in parameter order: `scale` comes first
    order = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for b in main.buckets for p in b.params] == [id(p) for d in dtypes for p in order if p.dtype == d]
    for bucket in main.buckets:
        assert bucket.data.dtype == torch.float32 and bucket.data.numel() % 7 == 0
        assert bucket.data.numel() - bucket.numel < 7
        for p, off in zip(bucket.params, bucket.offsets):
            assert p.main_grad.data_ptr() == bucket.data[off:].data_ptr() and p.main_grad.shape == p.shape
        start, end = bucket.shard_range(3, 7)
        assert end - start == bucket.data.numel() // 7
    with pytest.raises(ValueError, match="already has a main_grad"):
        attach_main_grads(model)
