"""Where one MoE layer's expert slots live inside an expert-parallel group (pure: plain ints and tuples).

A ``SlotMap`` is one row of the plan's ``ExpertPlacement`` (``simulator/contracts/placement.py``): slot ``s``
holds logical expert ``phy2log[s]``, and GPU ``g`` of the EP group (its rank in the group) holds the slots
``offsets[g] .. offsets[g] + slots_per_gpu[g] - 1``, GPU by GPU as ``simulator/placement/maps.py`` lays
them out. Without a placement the map is contiguous: expert ``e`` on GPU ``e // (E / ep)``.

Replica choice (``replica_of``): a token whose expert has ``c`` replicas goes to replica
``(token + ep_rank) mod c``, replicas in slot order; ``token`` is the token's index among the source GPU's
tokens of the micro-batch. Deterministic (both the runtime and its tests can recompute it) and even:
each replica gets ``1/c`` of the expert's tokens up to one, which is EPLB's load model that the placement
was balanced for and that the simulator's traffic model samples (``simulator/traffic/routing.py`` step 3:
a uniform replica). "Same node first" would cut inter-node bytes but load a node's replica with every
token of that node, which the placement did not plan for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

from moeplan.simulator.contracts.placement import ExpertPlacement


@dataclass(frozen=True)
class SlotMap:
    """``phy2log`` ``[num_slots]`` logical expert of each slot; ``slots_per_gpu`` ``[ep]`` in GPU order."""

    phy2log: tuple[int, ...]
    slots_per_gpu: tuple[int, ...]
    num_logical: int

    def __post_init__(self) -> None:
        if sum(self.slots_per_gpu) != len(self.phy2log) or min(self.slots_per_gpu, default=0) < 1:
            raise ValueError(f"slots_per_gpu={list(self.slots_per_gpu)} must be >= 1 each and sum to the "
                             f"{len(self.phy2log)} slots of phy2log")
        missing = sorted(set(range(self.num_logical)) - set(self.phy2log))
        if missing or any(not 0 <= e < self.num_logical for e in self.phy2log):
            raise ValueError(f"phy2log={list(self.phy2log)} must hold each of the {self.num_logical} experts "
                             f"and nothing else (expert {missing[0] if missing else 'out of range'})")

    @classmethod
    def contiguous(cls, num_experts: int, ep: int) -> SlotMap:
        if num_experts % ep:
            raise ValueError(f"ep={ep} must divide n_routed_experts={num_experts} without a placement")
        return cls(tuple(range(num_experts)), (num_experts // ep,) * ep, num_experts)

    @classmethod
    def from_placement(cls, placement: ExpertPlacement, layer_id: int, ep: int) -> SlotMap:
        """The row of MoE layer ``layer_id`` (HF numbering) of a plan's placement for an EP group of ``ep``."""
        if layer_id not in placement.layer_ids:
            raise ValueError(f"layer_id={layer_id} is not in the placement's layer_ids={placement.layer_ids}")
        if placement.num_gpus != ep:
            raise ValueError(f"placement.slots_per_gpu has {placement.num_gpus} GPUs but the EP group has ep={ep}")
        row = placement.phy2log[placement.layer_ids.index(layer_id)]
        return cls(tuple(row), tuple(placement.slots_per_gpu), placement.num_logical_experts)

    @property
    def ep(self) -> int:
        return len(self.slots_per_gpu)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """``[ep]`` first slot of each GPU."""
        return tuple(accumulate(self.slots_per_gpu, initial=0))[:-1]

    @cached_property
    def gpu_of_slot(self) -> tuple[int, ...]:
        return tuple(g for g, count in enumerate(self.slots_per_gpu) for _ in range(count))

    @cached_property
    def log2phy(self) -> tuple[tuple[int, ...], ...]:
        """``[num_logical]`` the slots of each expert, in slot order."""
        return tuple(tuple(s for s, e in enumerate(self.phy2log) if e == expert) for expert in range(self.num_logical))

    def local_slots(self, ep_rank: int) -> range:
        return range(self.offsets[ep_rank], self.offsets[ep_rank] + self.slots_per_gpu[ep_rank])

    def replica_of(self, token: int, expert: int, ep_rank: int) -> int:
        """The slot serving ``expert`` for ``token`` of the GPU ``ep_rank`` (the module docstring's rule)."""
        slots = self.log2phy[expert]
        return slots[(token + ep_rank) % len(slots)]

    @cached_property
    def replicated(self) -> tuple[int, ...]:
        """Logical experts with more than one slot, ascending."""
        return tuple(e for e, slots in enumerate(self.log2phy) if len(slots) > 1)
