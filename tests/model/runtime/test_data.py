"""The synthetic task's micro-batches: each token is the permutation applied to the one before (the gather along
the permutation's cycles equals stepping token by token), keyed by (seed, step, dp rank, micro-batch)."""

import torch

from moeplan.model.runtime.data import SyntheticTask


def _stepped(task: SyntheticTask, start: torch.Tensor) -> torch.Tensor:
    perm, seq = task.permutation(), [start]
    for _ in range(task.seq_len_tokens):
        seq.append(perm[seq[-1]])
    return torch.stack(seq, dim=1)


def test_each_token_is_the_permutation_of_the_one_before() -> None:
    for vocab, batch, seq, seed in ((7, 3, 40, 0), (129, 2, 300, 5), (4096, 4, 64, 9)):
        task = SyntheticTask(vocab, batch, seq, seed)
        mb = task.microbatch(3, 1, 2)
        tokens = torch.cat((mb.input_ids, mb.labels[:, -1:]), dim=1)
        assert torch.equal(tokens, _stepped(task, tokens[:, 0]))
        assert torch.equal(mb.labels[:, :-1], mb.input_ids[:, 1:])


def test_micro_batches_are_keyed_and_repeatable() -> None:
    task = SyntheticTask(1000, 8, 16, 1)
    assert torch.equal(task.microbatch(0, 0, 0).input_ids, SyntheticTask(1000, 8, 16, 1).microbatch(0, 0, 0).input_ids)
    assert not torch.equal(task.microbatch(0, 0, 0).input_ids, task.microbatch(0, 0, 1).input_ids)
    assert not torch.equal(task.microbatch(0, 0, 0).input_ids, task.microbatch(1, 0, 0).input_ids)
