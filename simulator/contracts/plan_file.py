"""The plan file: one versioned JSON document, the contract between planner, runtime and checks.

It holds the inputs in full, a SHA-256 of them, the resolved layout, the accounting and memory,
and the sections later capabilities fill (schedule, placement, predictions, budget). Reading
refuses another schema version and a document whose inputs no longer match their hash. Writing
is atomic: a temporary file in the target directory, then ``os.replace``.

Version 2 added context parallelism: ``parallel.cp`` and each phase's ``cp`` in the inputs (which
changes their hash), ``layout.cp`` and the layout each phase was priced on. Version 3 added
``layout.stage_records``: each stage's decoder layers, MTP modules, embedding and head, so the
runtime builds the stages the memory and time were priced with instead of splitting the model
itself. An older file is refused with the advice to re-plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeplan.simulator.accounting.layout import Stage
from moeplan.simulator.accounting.memory import RankMemory
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.placement import ExpertPlacement
from moeplan.simulator.contracts.predictions import RunPrediction, StepPrediction
from moeplan.simulator.schedules.schedule import Schedule
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec

__all__ = ["PlanInputs", "PlanFile", "PlanError", "SCHEMA_VERSION", "StageRecord", "write_atomic"]

SCHEMA_VERSION = 3


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the file and the problem."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StageRecord(_Frozen):
    """One pipeline stage as it was priced and as the runtime builds it (``model.stage.stages_from_plan``)."""

    index: int
    first_layer: int = Field(..., description="First decoder layer (global id, as in checkpoint names).")
    end_layer: int = Field(..., description="One past the last decoder layer; equals first_layer on a stage without any.")
    mtp_layers: tuple[int, ...] = Field(
        ..., description="MTP modules on the stage by layer id (num_hidden_layers + depth - 1); only on the last stage."
    )
    has_embedding: bool
    has_head: bool = Field(..., description="Final norm and output head.")

    @property
    def units(self) -> tuple[int, ...]:
        """The stage's layer units as ``layout.stage_layers`` lists them (decoder layers, then MTP)."""
        return tuple(range(self.first_layer, self.end_layer)) + self.mtp_layers

    @classmethod
    def of(cls, stage: Stage, num_hidden_layers: int) -> StageRecord:
        """The record of one of ``accounting.layout.pipeline_stages``' stages (contiguous units,
        decoder layers first)."""
        first = min(stage.layers[0], num_hidden_layers)
        decoder = sum(u < num_hidden_layers for u in stage.layers)
        return cls(index=stage.index, first_layer=first, end_layer=first + decoder,
                   mtp_layers=tuple(u for u in stage.layers if u >= num_hidden_layers),
                   has_embedding=stage.has_embedding, has_head=stage.has_head)


class ResolvedLayout(_Frozen):
    world: int
    pp: int
    dp: int
    cp: int = Field(..., description="Context-parallel size: GPUs that split each sequence; world = pp x dp x cp.")
    ep: int
    expert_dp: int = Field(..., description="dp x cp / ep: replicas of each routed expert.")
    stages: int
    stage_layers: tuple[tuple[int, ...], ...] = Field(..., description="Layer units per stage (>= L is MTP).")
    stage_records: tuple[StageRecord, ...] = Field(
        ..., description="Per stage, what the runtime builds: decoder layer range, MTP modules, embedding, head."
    )
    rank_stages: tuple[tuple[int, ...], ...] = Field(..., description="[rank] -> stages whose weights it holds.")
    microbatches: int
    tokens_per_microbatch: int = Field(..., description="micro_batch_size x seq_len_tokens, over the CP group.")
    tokens_per_gpu_per_microbatch: int = Field(..., description="tokens_per_microbatch / cp.")

    @model_validator(mode="after")
    def _records_match_units(self) -> ResolvedLayout:
        units = tuple(r.units for r in self.stage_records)
        if units != self.stage_layers or [r.index for r in self.stage_records] != list(range(self.stages)):
            raise ValueError(f"stage_records cover layer units {units}, but stage_layers={self.stage_layers} "
                             f"over stages={self.stages}")
        return self


class ParamsReport(_Frozen):
    by_component: dict[str, int]
    total: int
    total_with_mtp: int
    activated: int = Field(..., description="Per token, embedding and head included.")
    activated_no_embedding: int


class FlopsReport(_Frozen):
    seq_len_tokens: int
    forward_by_component: dict[str, float]
    model_flops_per_token: float = Field(..., description="3 x forward, MTP included: the MFU numerator.")
    model_flops_per_token_no_mtp: float
    hardware_flops_per_token: float = Field(..., description="Model FLOPs plus recompute: the HFU numerator.")
    mfu_definition: str


class MemoryReport(_Frozen):
    per_rank: tuple[RankMemory, ...]
    peak_bytes_per_gpu: float
    peak_rank: int
    usable_hbm_bytes: int
    fits: bool


class Candidate(_Frozen):
    """One layout the search evaluated."""

    parallel: ParallelSpec
    microbatches: int
    step_time_s: float
    tokens_per_s_per_gpu: float
    mfu_frac: float
    peak_memory_bytes_per_gpu: float


class Predictions(_Frozen):
    """The simulator's verdict on the plan's layout."""

    step: StepPrediction
    run: RunPrediction
    layout_source: Literal["given", "published", "searched"]
    fixed_layout_fields: tuple[str, ...] = Field((), description="Layout settings the user fixed; the rest was searched or defaulted.")
    candidates_evaluated: int = Field(0, description="Layouts the search checked (memory) and ranked.")
    top_candidates: tuple[Candidate, ...] = ()
    cost_tables: str


class BudgetReport(_Frozen):
    gpu_hours_total: float
    budget_gpu_hours: float | None
    cost_usd: float | None
    within_budget: bool | None
    margin_frac: float | None = Field(None, description="1 - used / budget: negative when over budget.")


class PlanFile(_Frozen):
    schema_version: Literal[3] = SCHEMA_VERSION
    moeplan_version: str
    inputs_sha256: str
    inputs: PlanInputs
    ignored_config_keys: tuple[str, ...] = ()
    layout: ResolvedLayout
    params: ParamsReport
    flops: FlopsReport
    memory: MemoryReport
    # Filled by the schedule, placement and simulator capabilities; null when not run.
    schedule: Schedule | None = None
    placement: ExpertPlacement | None = Field(None, description="One expert-parallel group's placement, every MoE layer.")
    predictions: Predictions | None = None
    budget_report: BudgetReport | None = None


def dump_plan(plan: PlanFile) -> str:
    return plan.model_dump_json(indent=2) + "\n"


def parse_plan(text: str, source: str = "<plan>") -> PlanFile:
    """Parse and check a plan document: JSON, schema version, schema, inputs hash."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{source}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(raw, dict):
        raise PlanError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PlanError(
            f"{source}: schema_version={version!r} is not supported; this moeplan reads version {SCHEMA_VERSION} "
            "(re-run `moeplan plan` to regenerate it)"
        )
    try:
        plan = PlanFile.model_validate(raw)
    except ValidationError as exc:
        raise PlanError(first_error_line(exc, prefix=source, whole="plan")) from exc
    actual = plan.inputs.sha256()
    if actual != plan.inputs_sha256:
        raise PlanError(
            f"{source}: inputs_sha256={plan.inputs_sha256[:12]}... does not match the inputs ({actual[:12]}...); "
            "the inputs were edited after planning: re-run `moeplan plan`"
        )
    return plan


def read_plan(path: str | Path) -> PlanFile:
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"{path}: cannot read ({exc.strerror})") from exc
    return parse_plan(text, str(path))


def write_plan(plan: PlanFile, path: str | Path) -> None:
    write_atomic(path, dump_plan(plan))
