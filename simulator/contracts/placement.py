"""The JSON form of an expert placement: what the plan file embeds and ``--current`` reads back.

``ExpertPlacement`` stores ``phy2log`` and the slot count of every GPU; ``log2phy`` and ``logcnt`` are
derived (``to_placement``) so the file cannot contradict itself. Rows follow ``layer_ids`` (model layer
indices, HF numbering).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.placement.maps import Placement, count_replicas
from moeplan.simulator.spec.model import MAX_EXPERTS
from moeplan.simulator.spec.numbers import Int

PLACEMENT_SCHEMA_VERSION = 1


class ExpertPlacement(BaseModel):
    """Expert -> slot -> GPU maps of every MoE layer (DeepSeek EPLB meaning, see ``placement_maps``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = PLACEMENT_SCHEMA_VERSION
    policy: Literal["hierarchical", "global", "contiguous"]
    num_logical_experts: Int = Field(..., gt=0, le=MAX_EXPERTS)
    num_groups: Int = Field(..., gt=0)
    num_nodes: Int = Field(..., gt=0)
    slots_per_gpu: list[Int] = Field(..., min_length=1, description="[num_gpus] slots on each GPU, in GPU order.")
    layer_ids: list[Int] = Field(..., min_length=1, description="Model layer index of each row.")
    phy2log: list[list[Int]] = Field(..., description="[layers][num_replicas] logical expert of each slot.")

    @model_validator(mode="after")
    def _consistent(self) -> ExpertPlacement:
        num_gpus = len(self.slots_per_gpu)
        if self.num_logical_experts % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide num_logical_experts={self.num_logical_experts}")
        if num_gpus % self.num_nodes:
            raise ValueError(f"num_nodes={self.num_nodes} must divide the {num_gpus} GPUs of slots_per_gpu")
        if min(self.slots_per_gpu) < 1:
            raise ValueError(f"slots_per_gpu={self.slots_per_gpu} must all be >= 1")
        if len(self.phy2log) != len(self.layer_ids):
            raise ValueError(f"phy2log has {len(self.phy2log)} rows but layer_ids has {len(self.layer_ids)}")
        num_replicas = sum(self.slots_per_gpu)
        for row, ids in zip(self.layer_ids, self.phy2log, strict=True):
            if len(ids) != num_replicas:
                raise ValueError(f"layer {row}: len(phy2log)={len(ids)} != sum(slots_per_gpu)={num_replicas}")
            bad = [e for e in ids if not 0 <= e < self.num_logical_experts]
            if bad:
                raise ValueError(f"layer {row}: expert id {bad[0]} outside 0..{self.num_logical_experts - 1}")
            missing = set(range(self.num_logical_experts)) - set(ids)
            if missing:
                raise ValueError(f"layer {row}: expert {min(missing)} has no replica")
        return self

    @property
    def num_gpus(self) -> int:
        return len(self.slots_per_gpu)

    def to_placement(self) -> Placement:
        phy2log = np.asarray(self.phy2log, dtype=np.int64)
        return Placement(
            phy2log=phy2log,
            logcnt=count_replicas(phy2log, self.num_logical_experts).astype(np.int64),
            slots_per_gpu=np.asarray(self.slots_per_gpu, dtype=np.int64),
            num_nodes=self.num_nodes,
            policy=self.policy,
        )

    @classmethod
    def from_placement(cls, placement: Placement, num_groups: int, layer_ids: list[int]) -> ExpertPlacement:
        return cls(
            policy=placement.policy,
            num_logical_experts=placement.num_logical_experts,
            num_groups=num_groups,
            num_nodes=placement.num_nodes,
            slots_per_gpu=[int(s) for s in placement.slots_per_gpu],
            layer_ids=list(layer_ids),
            phy2log=placement.phy2log.tolist(),
        )
