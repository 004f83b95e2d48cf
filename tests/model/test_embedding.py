"""The embedding's main-grad backward: the same FP32 sum as nn.Embedding's dense gradient added by the hook."""

import torch

from moeplan.model.embedding import Embedding
from moeplan.model.runtime.main_grad import attach_main_grads


def _ids(vocab: int, shape, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_main_grad_backward_matches_the_dense_gradient_over_micro_batches_and_two_uses() -> None:
    torch.manual_seed(0)
    vocab, dim = 50, 16
    ours = Embedding(vocab, dim, dtype=torch.bfloat16)
    dense = torch.nn.Embedding(vocab, dim, dtype=torch.bfloat16)
    dense.weight.data.copy_(ours.weight.data)
    attach_main_grads(ours)
    expected = torch.zeros(vocab, dim, dtype=torch.float32)
    bf16_sum = torch.zeros(vocab, dim, dtype=torch.float32)
    for mb in range(3):
        ids = _ids(vocab, (2, 9), mb)  # repeated ids inside a micro-batch
        grad = torch.randn(2, 9, dim, dtype=torch.bfloat16)
        out = ours(ids)
        torch.testing.assert_close(out, dense(ids), rtol=0, atol=0)  # the same forward
        # two uses per micro-batch, as the head stage's MTP shares the embedding
        (out * grad).sum().backward(inputs=[ours.weight])
        (ours(ids.flip(0)) * grad).float().sum().backward(inputs=[ours.weight])
        assert ours.weight.grad is None  # nothing dense was made
        for use_ids in (ids, ids.flip(0)):  # each row's gradient summed in FP32
            expected.index_add_(0, use_ids.reshape(-1), grad.reshape(-1, dim).float())
            d = torch.nn.Embedding(vocab, dim, dtype=torch.bfloat16)
            d.weight.data.copy_(dense.weight.data)
            (d(use_ids) * grad).float().sum().backward()
            bf16_sum += d.weight.grad.float()  # nn.Embedding sums a row's repeats in BF16
    torch.testing.assert_close(ours.weight.main_grad, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.weight.main_grad, bf16_sum, rtol=2e-2, atol=5e-2)  # the same gradient


def test_without_a_main_grad_it_is_nn_embedding() -> None:
    torch.manual_seed(1)
    emb = Embedding(20, 8)
    ids = _ids(20, (3, 5), 2)
    emb(ids).sum().backward()
    dense = torch.zeros(20, 8).index_add_(0, ids.reshape(-1), torch.ones(15, 8))
    torch.testing.assert_close(emb.weight.grad, dense)
