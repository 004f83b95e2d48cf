"""Pipeline stage descriptions: which layers, and whether the embedding / head live on the stage.

A stage is pure data (``StageSpec``), so a schedule made elsewhere (the plan) can say which stages a
rank holds and the runtime builds exactly those with ``model.transformer.build_rank``.
- the first stage (``has_embedding``) maps token ids to hidden states;
- the last stage (``has_head``) holds the final norm, ``lm_head`` and the MTP modules; MTP needs the
  token ids and the embedding, so a head stage also owns an ``embed_tokens`` unless it shares the
  first stage's (DualPipe / DualPipeV put stage 0 and the last stage on the same rank, and then
  the main model and MTP use one physical embedding, TR §3.2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.spec.model import ModelSpec


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


def split_stages(spec: ModelSpec, layers_per_stage: list[int]) -> list[StageSpec]:
    """Consecutive stages with the given layer counts (a stage may hold 0 layers, e.g. head only)."""
    if sum(layers_per_stage) != spec.num_hidden_layers or any(n < 0 for n in layers_per_stage):
        raise ValueError(f"layers_per_stage={layers_per_stage} must be >= 0 and sum to "
                         f"num_hidden_layers={spec.num_hidden_layers}")
    stages, start = [], 0
    last = len(layers_per_stage) - 1
    for i, count in enumerate(layers_per_stage):
        stages.append(StageSpec(start, start + count, has_embedding=i == 0, has_head=i == last))
        start += count
    return stages


def even_layers_per_stage(num_layers: int, num_stages: int) -> list[int]:
    """Balanced split; the remainder goes to the middle stages (ends also carry embedding/head)."""
    if num_stages <= 0:
        raise ValueError(f"num_stages={num_stages} must be > 0")
    base, extra = divmod(num_layers, num_stages)
    counts = [base] * num_stages
    middle = list(range(1, num_stages - 1)) or list(range(num_stages))
    for i in range(extra):
        counts[middle[i % len(middle)]] += 1
    return counts


def mirrored_stage_ids(num_stages: int, rank: int) -> tuple[int, int]:
    """Stages of ``rank`` under DualPipe (ranks = stages) or DualPipeV (ranks = stages / 2): r and S-1-r."""
    if num_stages % 2 or not 0 <= rank < num_stages:
        raise ValueError(f"num_stages={num_stages} must be even and rank={rank} in 0..{num_stages - 1}")
    return rank, num_stages - 1 - rank
