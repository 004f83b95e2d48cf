"""Micro-batches every rank can make alone: a synthetic next-token task keyed by (seed, step, dp rank, mb).

Task (as ``tests/model/synthetic_task.py``): a fixed random permutation ``perm`` of the vocabulary;
each sequence starts at a token drawn from a Zipf law and follows t_{i+1} = perm[t_i], so a working
model drives the loss towards 0 from ln(V), and the skewed start tokens load the experts unevenly.
The first and the last pipeline stage both need a micro-batch (ids in, labels and MTP ids out), and
the single-process reference needs all of them: each is a pure function of its key, so nothing is
sent and every party sees the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from moeplan.model.runtime.executor import Microbatch
from moeplan.model.seeds import name_seed


@dataclass(frozen=True)
class SyntheticTask:
    vocab_size: int
    micro_batch_size: int
    seq_len_tokens: int
    seed: int = 0

    def permutation(self) -> torch.Tensor:
        return torch.randperm(self.vocab_size, generator=torch.Generator().manual_seed(name_seed(self.seed, "perm")))

    @cached_property
    def _cycles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The permutation as cycles, so perm applied i times is one gather: (cycles concatenated (V,), each token's
        index into it (V,), each token's cycle start and length (V,) each)."""
        perm = self.permutation().tolist()
        flat, index, start, length = [], [0] * self.vocab_size, [0] * self.vocab_size, [0] * self.vocab_size
        seen = bytearray(self.vocab_size)
        for first in range(self.vocab_size):
            if seen[first]:
                continue
            cycle, t = [], first
            while not seen[t]:
                seen[t] = 1
                cycle.append(t)
                t = perm[t]
            base = len(flat)
            for k, t in enumerate(cycle):
                start[t], length[t], index[t] = base, len(cycle), base + k
            flat += cycle
        return tuple(torch.tensor(v, dtype=torch.int64) for v in (flat, index, start, length))

    def microbatch(self, step: int, dp_rank: int, microbatch: int) -> Microbatch:
        """The micro-batch ``microbatch`` of data-parallel rank ``dp_rank`` at optimizer step ``step``."""
        gen = torch.Generator().manual_seed(name_seed(self.seed, f"batch/{step}/{dp_rank}/{microbatch}"))
        zipf = 1.0 / torch.arange(1, self.vocab_size + 1, dtype=torch.float64) ** 1.2
        start = torch.multinomial(zipf, self.micro_batch_size, replacement=True, generator=gen)  # (B,)
        # token i of a sequence is perm applied i times to its start: a step along the start's cycle
        flat, index, first, length = self._cycles
        steps = torch.arange(self.seq_len_tokens + 1)  # (T+1,)
        offset = (index[start] - first[start])[:, None] + steps  # (B, T+1) position along the cycle
        tokens = flat[first[start][:, None] + offset % length[start][:, None]]  # (B, T+1)
        return Microbatch(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
