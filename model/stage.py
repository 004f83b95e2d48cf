"""Pipeline stage descriptions: which layers, and whether the embedding / head live on the stage.

A stage is pure data (``StageSpec``). The model does not split itself: the plan file records each
stage (``layout.stage_records``, the split memory and time were priced with) and which stages a rank
holds (``layout.rank_stages``); ``rank_stages_from_plan`` turns them into the ``StageSpec`` list that
``model.transformer.build_rank`` builds.

- the first stage (``has_embedding``) maps token ids to hidden states;
- the last stage (``has_head``) holds the final norm, ``lm_head`` and the MTP modules; MTP needs the
  token ids and the embedding, so a head stage also owns an ``embed_tokens`` unless it shares the
  first stage's (DualPipe / DualPipeV put stage 0 and the last stage on the same rank, and then
  the main model and MTP use one physical embedding, TR §3.2.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moeplan.simulator.spec.model import ModelSpec

if TYPE_CHECKING:  # plain data read from a plan; importing the model does not load the plan module
    from moeplan.simulator.contracts.plan_file import ResolvedLayout, StageRecord


@dataclass(frozen=True)
class StageSpec:
    """Layers ``first_layer .. end_layer - 1`` (global ids, as in checkpoint names) of one stage."""

    first_layer: int
    end_layer: int
    has_embedding: bool
    has_head: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    @classmethod
    def full(cls, spec: ModelSpec) -> StageSpec:
        return cls(0, spec.num_hidden_layers, has_embedding=True, has_head=True)

    def validate(self, spec: ModelSpec) -> None:
        if not 0 <= self.first_layer <= self.end_layer <= spec.num_hidden_layers:
            raise ValueError(f"stage layers {self.first_layer}..{self.end_layer} outside "
                             f"0..num_hidden_layers={spec.num_hidden_layers}")
        if self.has_embedding and self.first_layer != 0:
            raise ValueError(f"has_embedding=True needs first_layer=0, got {self.first_layer}")
        if self.has_head and self.end_layer != spec.num_hidden_layers:
            raise ValueError(f"has_head=True needs end_layer=num_hidden_layers={spec.num_hidden_layers}, "
                             f"got {self.end_layer}")


def stages_from_plan(records: Sequence[StageRecord], spec: ModelSpec) -> list[StageSpec]:
    """The ``StageSpec`` of each of a plan's stage records (``plan.layout.stage_records``), in order.

    The split is the planner's (``simulator.accounting.layout.pipeline_stages``, what memory and time
    were priced with); the model only checks that it can build it: the stages cover the decoder
    layers ``0..num_hidden_layers-1`` once, in order, and the MTP modules sit on the head stage.
    """
    mtp = tuple(spec.num_hidden_layers + k for k in range(spec.num_nextn_predict_layers))
    stages, end = [], 0
    for i, r in enumerate(records):
        if r.index != i or r.first_layer != end:
            raise ValueError(f"stage record {i} (index={r.index}) starts at first_layer={r.first_layer}, "
                             f"expected index={i} and first_layer={end}")
        if tuple(r.mtp_layers) != (mtp if r.has_head else ()):
            raise ValueError(f"stage {i} has mtp_layers={r.mtp_layers} with has_head={r.has_head}; "
                             f"the head stage holds all of {mtp} and no other stage any")
        stage = StageSpec(r.first_layer, r.end_layer, has_embedding=r.has_embedding, has_head=r.has_head)
        stage.validate(spec)
        stages.append(stage)
        end = r.end_layer
    if end != spec.num_hidden_layers or not stages or not stages[0].has_embedding or not stages[-1].has_head:
        raise ValueError(f"stage records end at layer {end} of num_hidden_layers={spec.num_hidden_layers}; "
                         "they must cover every layer, the first stage holding the embedding, the last the head")
    return stages


def rank_stages_from_plan(layout: ResolvedLayout, spec: ModelSpec, rank: int) -> list[StageSpec]:
    """The stages pipeline rank ``rank`` holds (``layout.rank_stages``, the schedule's placement),
    ready for ``build_rank(spec, stages)``."""
    if not 0 <= rank < layout.pp:
        raise ValueError(f"rank={rank} outside the plan's pipeline ranks 0..{layout.pp - 1}")
    stages = stages_from_plan(layout.stage_records, spec)
    return [stages[s] for s in layout.rank_stages[rank]]
