"""Worker of test_groups: create every group of a dp2 x cp2, ep2 layout and all-reduce the rank id in each."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeplan.model.runtime.dist_groups import new_groups
from moeplan.model.runtime.groups import GROUP_KINDS, process_groups


@dataclass(frozen=True)
class Layout:
    world: int = 4
    pp: int = 1
    dp: int = 2
    cp: int = 2
    ep: int = 2
    rank_stages: tuple[tuple[int, ...], ...] = ((0,),)


def main() -> None:
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    mine = new_groups(process_groups(Layout(), gpus_per_node=2), rank, backend="gloo")
    sums = {}
    for kind in GROUP_KINDS:
        if mine[kind] is not None:
            value = torch.tensor([rank])
            dist.all_reduce(value, group=mine[kind])
            sums[kind] = int(value)
    dist.destroy_process_group()
    with open(os.environ["RESULT"], "w") as out:
        json.dump(sums, out)


if __name__ == "__main__":
    main()
