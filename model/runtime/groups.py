"""Rank coordinates and process-group rank lists of a plan's layout (pure: plain ints and tuples).

Rank order, innermost first, is cp, dp, pp (``simulator/spec/parallel.py`` ``ParallelSpec``,
docs/design/simulator.md "Context parallelism"):

    rank = pp_rank * (dp * cp) + dp_rank * cp + cp_rank

which is the layout the simulator prices: ``simulator/engine/build.py`` takes pipeline neighbours to be
``dp * cp`` ranks apart (``p2p_over_nvlink = dp * cp < gpus_per_node``), a CP group to fit in a node
when ``cp <= gpus_per_node``, and reduces a stage's dense gradients over its ``dp * cp`` GPUs and its
expert gradients over ``expert_dp = dp * cp / ep`` of them (``_tails``); ``simulator/engine/expert_traffic``
prices one EP group as ``ep / gpus_per_node`` whole nodes or a slice of one node.

The expert-parallel groups are carved from contiguous blocks of ``ep`` ranks among the ``dp * cp`` ranks
of one pipeline rank (DeepSeek-V3: EP64 inside DP128, 8 whole nodes per group), so an EP group of at most
a node's GPUs lies inside one node; ``expert_dp`` groups join the ranks at the same position of the
different EP groups: they hold the same experts. ``mirror`` groups join the pipeline ranks that hold a
common stage (DualPipe's mirrored copies: ranks r and pp-1-r), read from ``layout.rank_stages`` (which the
plan takes from the schedule registry's ``rank_stages``), never from a kind name.

``new_groups`` (creating the torch.distributed groups) lives in ``model/runtime/dist_groups.py``, so this
module stays importable and testable without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

Groups = tuple[tuple[int, ...], ...]
GROUP_KINDS = ("pp", "dp", "cp", "stage", "ep", "expert_dp", "mirror")


class LayoutLike(Protocol):
    """What ``process_groups`` reads from ``simulator.contracts.plan_file.ResolvedLayout``."""

    world: int
    pp: int
    dp: int
    cp: int
    ep: int
    rank_stages: tuple[tuple[int, ...], ...]


class RankCoords(NamedTuple):
    pp_rank: int
    dp_rank: int
    cp_rank: int
    ep_rank: int  # position inside the EP group
    expert_dp_rank: int  # which EP group of the stage (= position inside the expert_dp group)
    node: int


@dataclass(frozen=True)
class ProcessGroups:
    """Every group of each kind as a tuple of global ranks (ascending), groups in a fixed order.

    - ``pp``: one per (dp, cp) position, the pipeline ranks in pipeline order;
    - ``dp``: one per (pp, cp); ``cp``: one per (pp, dp);
    - ``stage``: the ``dp * cp`` ranks of one pipeline rank (dense-gradient reduction, ZeRO-1 shards);
    - ``ep``: contiguous blocks of ``ep`` ranks inside a ``stage`` group;
    - ``expert_dp``: the ranks at the same EP position of one stage group (the same experts);
    - ``mirror``: per (dp, cp) position, pipeline ranks sharing a stage (DualPipe's r and pp-1-r); empty
      when no stage lives on two ranks. Each mirrored stage's gradients sum over ``stage`` (or
      ``expert_dp``) and then over ``mirror``.
    """

    world: int
    pp: int
    dp: int
    cp: int
    ep: int
    gpus_per_node: int
    pp_groups: Groups
    dp_groups: Groups
    cp_groups: Groups
    stage_groups: Groups
    ep_groups: Groups
    expert_dp_groups: Groups
    mirror_groups: Groups

    def groups(self, kind: str) -> Groups:
        """The groups of ``kind`` (one of ``GROUP_KINDS``)."""
        if kind not in GROUP_KINDS:
            raise ValueError(f"kind={kind!r} must be one of {', '.join(GROUP_KINDS)}")
        return getattr(self, f"{kind}_groups")

    def group_of(self, kind: str, rank: int) -> tuple[int, ...] | None:
        """The group of ``kind`` that holds ``rank``; None for a rank outside every mirror group."""
        self._check_rank(rank)
        return next((g for g in self.groups(kind) if rank in g), None)

    def rank_of(self, pp_rank: int, dp_rank: int, cp_rank: int) -> int:
        assert 0 <= pp_rank < self.pp and 0 <= dp_rank < self.dp and 0 <= cp_rank < self.cp, (
            f"{pp_rank=} {dp_rank=} {cp_rank=} {self.pp=} {self.dp=} {self.cp=}")
        return (pp_rank * self.dp + dp_rank) * self.cp + cp_rank

    def coords(self, rank: int) -> RankCoords:
        self._check_rank(rank)
        pp_rank, inner = divmod(rank, self.dp * self.cp)
        dp_rank, cp_rank = divmod(inner, self.cp)
        expert_dp_rank, ep_rank = divmod(inner, self.ep)
        return RankCoords(pp_rank, dp_rank, cp_rank, ep_rank, expert_dp_rank, rank // self.gpus_per_node)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank} is outside 0..{self.world - 1}")


def process_groups(layout: LayoutLike, gpus_per_node: int) -> ProcessGroups:
    """Coordinates and group lists of ``layout`` (a plan's ``ResolvedLayout``) on nodes of ``gpus_per_node``."""
    pp, dp, cp, ep, world = layout.pp, layout.dp, layout.cp, layout.ep, layout.world
    _check(layout, gpus_per_node)
    inner = dp * cp  # ranks of one pipeline rank

    def rank(p: int, d: int, c: int) -> int:
        return (p * dp + d) * cp + c

    stage = tuple(tuple(range(p * inner, (p + 1) * inner)) for p in range(pp))
    return ProcessGroups(
        world=world, pp=pp, dp=dp, cp=cp, ep=ep, gpus_per_node=gpus_per_node,
        pp_groups=tuple(tuple(rank(p, d, c) for p in range(pp)) for d in range(dp) for c in range(cp)),
        dp_groups=tuple(tuple(rank(p, d, c) for d in range(dp)) for p in range(pp) for c in range(cp)),
        cp_groups=tuple(tuple(rank(p, d, c) for c in range(cp)) for p in range(pp) for d in range(dp)),
        stage_groups=stage,
        ep_groups=tuple(block[i:i + ep] for block in stage for i in range(0, inner, ep)),
        expert_dp_groups=tuple(block[j::ep] for block in stage for j in range(ep)),
        mirror_groups=tuple(tuple(p * inner + i for p in ranks)
                            for i in range(inner) for ranks in _sharing_stages(layout.rank_stages)),
    )


def _sharing_stages(rank_stages: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
    """Pipeline ranks joined by a common stage (connected components of size > 1), ascending."""
    component = list(range(len(rank_stages)))  # union-find over pipeline ranks

    def root(r: int) -> int:
        while component[r] != r:
            r = component[r]
        return r

    owner: dict[int, int] = {}
    for r, held in enumerate(rank_stages):
        for s in held:
            if s in owner:
                component[root(r)] = root(owner[s])
            owner.setdefault(s, r)
    members: dict[int, list[int]] = {}
    for r in range(len(rank_stages)):
        members.setdefault(root(r), []).append(r)
    return sorted(tuple(m) for m in members.values() if len(m) > 1)


def _check(layout: LayoutLike, gpus_per_node: int) -> None:
    pp, dp, cp, ep, world = layout.pp, layout.dp, layout.cp, layout.ep, layout.world
    sizes = {"pp": pp, "dp": dp, "cp": cp, "ep": ep, "world": world, "gpus_per_node": gpus_per_node}
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if pp * dp * cp != world:
        raise ValueError(f"world={world} is not pp={pp} x dp={dp} x cp={cp}")
    if (dp * cp) % ep:
        raise ValueError(f"ep={ep} must divide dp x cp = {dp * cp} (EP groups are carved from a stage's ranks)")
    if world > gpus_per_node and world % gpus_per_node:
        raise ValueError(f"world={world} is not a whole number of nodes of gpus_per_node={gpus_per_node}")
    if world > gpus_per_node and ep <= gpus_per_node and gpus_per_node % ep:
        raise ValueError(f"ep={ep} must divide gpus_per_node={gpus_per_node} so that an EP group stays in one node")
    if ep > gpus_per_node and ep % gpus_per_node:
        raise ValueError(f"ep={ep} must be a multiple of gpus_per_node={gpus_per_node} when it spans nodes")
    if len(layout.rank_stages) != pp:
        raise ValueError(f"rank_stages has {len(layout.rank_stages)} pipeline ranks but pp={pp}")
