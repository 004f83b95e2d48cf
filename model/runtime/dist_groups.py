"""The torch.distributed groups of one rank, created from ``groups.ProcessGroups``' rank lists.

``dist.new_group`` is collective over the whole world: every rank must call it for every group, its own
or not, in the same order, or the ranks' group ids drift apart and later collectives hang or pair the
wrong communicators. ``new_groups`` therefore walks ``GROUP_KINDS`` and each kind's groups in their fixed
order on every rank, and keeps the handles of the groups that hold ``rank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist

from moeplan.model.runtime.groups import GROUP_KINDS, ProcessGroups, RankCoords


@dataclass(frozen=True)
class RankGroups:
    """This rank's coordinates and, per kind, its group's ranks and handle (None: no mirror group)."""

    rank: int
    coords: RankCoords
    ranks: dict[str, tuple[int, ...] | None]
    handles: dict[str, dist.ProcessGroup | None]

    def __getitem__(self, kind: str) -> dist.ProcessGroup | None:
        return self.handles[kind]


def nccl_options(max_ctas: int):
    """NCCL options for a group whose collectives may hold at most ``max_ctas`` CTAs (one an SM) at a time: NCCL's
    ``ncclConfig_t.maxCTAs``, through torch's ``ProcessGroupNCCL.Options().config``."""
    options = dist.ProcessGroupNCCL.Options()
    options.config.max_ctas = max_ctas
    return options


def new_groups(pg: ProcessGroups, rank: int, backend: str | None = None,
               max_ctas: Mapping[str, int] | None = None) -> RankGroups:
    """Create every group of ``pg`` (call on every rank of an initialised default group, same ``pg``).
    ``max_ctas``: per group kind, the SMs its collectives may hold (the plan's communication SMs for "ep", as the
    simulator reserves them: ``engine.build.comm_sms``), where the groups are NCCL's; 0 or absent: NCCL's own
    choice. Other backends take no such limit (gloo runs on the CPU)."""
    if dist.get_world_size() != pg.world:
        raise ValueError(f"world={pg.world} of the layout but torch.distributed has {dist.get_world_size()} ranks")
    nccl = dist.is_nccl_available() and (backend or dist.get_backend()) == "nccl"
    handles: dict[str, dist.ProcessGroup | None] = {}
    for kind in GROUP_KINDS:
        handles[kind] = None
        ctas = (max_ctas or {}).get(kind, 0) if nccl else 0
        options = {"pg_options": nccl_options(ctas)} if ctas > 0 else {}
        for ranks in pg.groups(kind):
            handle = dist.new_group(list(ranks), backend=backend, **options)
            if rank in ranks:
                handles[kind] = handle
    return RankGroups(rank=rank, coords=pg.coords(rank), handles=handles,
                      ranks={kind: pg.group_of(kind, rank) for kind in GROUP_KINDS})
