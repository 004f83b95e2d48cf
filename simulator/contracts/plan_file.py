"""The plan file: one versioned JSON document, the contract between planner, runtime and checks.

It holds the inputs in full, a SHA-256 of them, the resolved layout, the accounting and memory,
and the sections later capabilities fill (schedule, placement, predictions, budget). Reading
refuses another schema version and a document whose inputs no longer match their hash. Writing
is atomic: a temporary file in the target directory, then ``os.replace``.

Version 2 added context parallelism: ``parallel.cp`` and each phase's ``cp`` in the inputs (which
changes their hash), ``layout.cp`` and the layout each phase was priced on. Version 3 added
``layout.stage_records``: each stage's decoder layers, MTP modules, embedding and head, so the
runtime builds the stages the memory and time were priced with instead of splitting the model
itself. Version 4 added the training hyper-parameters to the inputs (``training.optimizer``'s AdamW
betas, eps, weight decay, clipping and learning-rate schedule; ``training.balance``'s gamma and MTP
weight schedules), which the runtime reads instead of constants. An older file is refused with the
advice to re-plan.

The hash covers only the inputs, so a plan is validated in full when read: strict, bounded JSON
(``spec.json_input``), finite numbers, sizes >= 1, and every derived section consistent with the
inputs and with each other (layout sizes, memory per rank, the schedule's shape, the budget), so
that whatever reads a plan (``moeplan show``, the runtime) can trust what it indexes.
"""

from __future__ import annotations

import math
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
from moeplan.simulator.spec.json_input import JsonInputError, parse_json, read_json_file
from moeplan.simulator.spec.hardware import MAX_NODES
from moeplan.simulator.spec.model import MAX_LAYERS
from moeplan.simulator.spec.numbers import Bool, Float, Int
from moeplan.simulator.spec.parallel import MAX_MICROBATCHES, MAX_RANKS
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import MAX_EXPERT_WGRAD_BATCH

__all__ = ["PlanInputs", "PlanFile", "PlanError", "SCHEMA_VERSION", "StageRecord", "write_atomic"]

SCHEMA_VERSION = 5
READABLE_VERSIONS = (4, 5)  # 4 lacks only top_candidates' expert_wgrad_batch (None there): read as 5
MAX_UNITS = 2 * MAX_LAYERS  # layer units (decoder layers and MTP modules), and so stages
MAX_GPUS = MAX_NODES * 2**10  # nodes of at most 1024 GPUs


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the file and the problem."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StageRecord(_Frozen):
    """One pipeline stage as it was priced and as the runtime builds it (``model.stage.stages_from_plan``)."""

    index: Int = Field(..., ge=0, le=MAX_UNITS)
    first_layer: Int = Field(..., ge=0, le=MAX_UNITS, description="First decoder layer (global id, as in checkpoint names).")
    end_layer: Int = Field(..., ge=0, le=MAX_UNITS,
                           description="One past the last decoder layer; equals first_layer on a stage without any.")
    mtp_layers: tuple[Int, ...] = Field(
        ..., description="MTP modules on the stage by layer id (num_hidden_layers + depth - 1); only on the last stage."
    )
    has_embedding: Bool
    has_head: Bool = Field(..., description="Final norm and output head.")

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
    # Bounded like the inputs they come from, so that a tampered file cannot make a reader build a
    # range of 2**31 layers or ranks before it finds out.
    world: Int = Field(..., gt=0, le=MAX_GPUS)
    pp: Int = Field(..., gt=0, le=MAX_RANKS)
    dp: Int = Field(..., gt=0, le=MAX_GPUS)
    cp: Int = Field(..., gt=0, le=MAX_RANKS,
                    description="Context-parallel size: GPUs that split each sequence; world = pp x dp x cp.")
    ep: Int = Field(..., gt=0, le=MAX_GPUS)
    tp: Int = Field(1, gt=0, le=8, description="Tensor-parallel size; world = pp x dp x cp x tp.")
    expert_dp: Int = Field(..., gt=0, le=MAX_GPUS, description="dp x cp x tp / ep: replicas of each routed expert.")
    stages: Int = Field(..., gt=0, le=MAX_UNITS)
    stage_layers: tuple[tuple[Int, ...], ...] = Field(..., description="Layer units per stage (>= L is MTP).")
    stage_records: tuple[StageRecord, ...] = Field(
        ..., description="Per stage, what the runtime builds: decoder layer range, MTP modules, embedding, head."
    )
    rank_stages: tuple[tuple[Int, ...], ...] = Field(..., description="[rank] -> stages whose weights it holds.")
    microbatches: Int = Field(..., gt=0, le=MAX_MICROBATCHES)
    tokens_per_microbatch: Int = Field(..., gt=0, description="micro_batch_size x seq_len_tokens, over the CP group.")
    tokens_per_gpu_per_microbatch: Int = Field(..., gt=0, description="tokens_per_microbatch / cp.")

    @model_validator(mode="after")
    def _records_match_units(self) -> ResolvedLayout:
        units = tuple(r.units for r in self.stage_records)
        if units != self.stage_layers or [r.index for r in self.stage_records] != [*range(len(self.stage_records))] or (
                len(self.stage_records) != self.stages):
            raise ValueError(f"stage_records cover layer units {units}, but stage_layers={self.stage_layers} "
                             f"over stages={self.stages}")
        if any(r.end_layer < r.first_layer for r in self.stage_records):
            raise ValueError("stage_records: a stage's end_layer is below its first_layer")
        return self

    @model_validator(mode="after")
    def _sizes_agree(self) -> ResolvedLayout:
        tp = f" x tp={self.tp}" if self.tp > 1 else ""
        if self.pp * self.dp * self.cp * self.tp != self.world:
            raise ValueError(f"pp={self.pp} x dp={self.dp} x cp={self.cp}{tp} differs from world={self.world}")
        if (self.dp * self.cp * self.tp) % self.ep or self.expert_dp != self.dp * self.cp * self.tp // self.ep:
            raise ValueError(f"expert_dp={self.expert_dp} is not dp={self.dp} x cp={self.cp}{tp} / ep={self.ep}")
        if len(self.rank_stages) != self.pp:
            raise ValueError(f"rank_stages has {len(self.rank_stages)} ranks but pp={self.pp}")
        if any(not 0 <= s < self.stages for held in self.rank_stages for s in held):
            raise ValueError(f"rank_stages={self.rank_stages} names a stage outside 0..{self.stages - 1}")
        if self.tokens_per_gpu_per_microbatch * self.cp != self.tokens_per_microbatch:
            raise ValueError(f"tokens_per_gpu_per_microbatch={self.tokens_per_gpu_per_microbatch} x cp={self.cp} "
                             f"differs from tokens_per_microbatch={self.tokens_per_microbatch}")
        return self


class ParamsReport(_Frozen):
    by_component: dict[str, Int]
    total: Int = Field(..., gt=0)
    total_with_mtp: Int = Field(..., gt=0)
    activated: Int = Field(..., gt=0, description="Per token, embedding and head included.")
    activated_no_embedding: Int = Field(..., ge=0)


class FlopsReport(_Frozen):
    seq_len_tokens: Int = Field(..., gt=0)
    forward_by_component: dict[str, Float]
    model_flops_per_token: Float = Field(..., gt=0, description="3 x forward, MTP included: the MFU numerator.")
    model_flops_per_token_no_mtp: Float = Field(..., gt=0)
    hardware_flops_per_token: Float = Field(..., gt=0, description="Model FLOPs plus recompute: the HFU numerator.")
    mfu_definition: str


class MemoryReport(_Frozen):
    per_rank: tuple[RankMemory, ...] = Field(..., min_length=1)
    peak_bytes_per_gpu: Float = Field(..., gt=0)
    peak_rank: Int = Field(..., ge=0)
    usable_hbm_bytes: Int
    fits: Bool

    @model_validator(mode="after")
    def _peak_of_the_ranks(self) -> MemoryReport:
        for i, r in enumerate(self.per_rank):
            values = (r.params_dense, r.params_expert, r.param_bytes, r.grad_bytes, r.optimizer_bytes,
                      r.activation_bytes, r.transient_bytes, r.in_flight_microbatches, r.total_bytes)
            if r.rank != i or not all(math.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"per_rank[{i}]: rank={r.rank} must be {i} and every size finite and >= 0")
        if self.peak_rank >= len(self.per_rank) or self.per_rank[self.peak_rank].total_bytes != self.peak_bytes_per_gpu:
            raise ValueError(f"peak_rank={self.peak_rank}: peak_bytes_per_gpu={self.peak_bytes_per_gpu} is not that "
                             "rank's total_bytes")
        if self.fits != (self.peak_bytes_per_gpu <= self.usable_hbm_bytes):
            raise ValueError(f"fits={self.fits} contradicts peak_bytes_per_gpu={self.peak_bytes_per_gpu} and "
                             f"usable_hbm_bytes={self.usable_hbm_bytes}")
        return self


class Candidate(_Frozen):
    """One layout the search evaluated."""

    parallel: ParallelSpec
    microbatches: Int = Field(..., gt=0)
    step_time_s: Float = Field(..., gt=0)
    tokens_per_s_per_gpu: Float = Field(..., ge=0)
    mfu_frac: Float = Field(..., ge=0)
    peak_memory_bytes_per_gpu: Float = Field(..., ge=0)
    expert_wgrad_batch: Int | None = Field(
        None, ge=1, le=MAX_EXPERT_WGRAD_BATCH,
        description="The routed experts' Wgrad batch the search chose for this layout and simulated it at "
                    "(simulator.planning.wgrad_batch); None: the inputs' own.")


class Predictions(_Frozen):
    """The simulator's verdict on the plan's layout."""

    step: StepPrediction
    run: RunPrediction
    layout_source: Literal["given", "published", "searched"]
    fixed_layout_fields: tuple[str, ...] = Field((), description="Layout settings the user fixed; the rest was searched or defaulted.")
    candidates_evaluated: Int = Field(0, ge=0, description="Layouts the search checked (memory) and ranked.")
    top_candidates: tuple[Candidate, ...] = ()
    cost_tables: str
    techniques: tuple[str, ...] = Field((), description="Techniques left out (plan --techniques, "
                                        "simulator.planning.techniques); empty = none.")


class BudgetReport(_Frozen):
    gpu_hours_total: Float = Field(..., ge=0)
    budget_gpu_hours: Float | None = Field(..., gt=0)
    cost_usd: Float | None = Field(..., ge=0)
    within_budget: Bool | None
    margin_frac: Float | None = Field(None, description="1 - used / budget: negative when over budget.")

    @model_validator(mode="after")
    def _verdict_with_budget(self) -> BudgetReport:
        if not (self.budget_gpu_hours is None) == (self.within_budget is None) == (self.margin_frac is None):
            raise ValueError("budget_gpu_hours, within_budget and margin_frac must be given together or all be null")
        return self


class PlanFile(_Frozen):
    schema_version: Literal[5] = SCHEMA_VERSION
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


def consistency_error(plan: PlanFile) -> str | None:
    """What the hash does not cover must follow from what it does: the layout from the inputs; memory,
    schedule, predictions and budget from the layout and inputs. The reason they do not, or None."""
    return _layout_error(plan) or _derived_error(plan)


def _layout_error(plan: PlanFile) -> str | None:
    par, lay, cluster = plan.inputs.parallel, plan.layout, plan.inputs.cluster
    given = {"pp": par.pp, "cp": par.cp, "ep": par.ep, "tp": par.tp, "world": cluster.num_gpus,
             "tokens_per_microbatch": par.micro_batch_size * par.seq_len_tokens}
    given |= {"dp": par.dp} if par.dp is not None else {}
    given |= {"microbatches": par.microbatches} if par.microbatches is not None else {}
    for name, value in given.items():
        if getattr(lay, name) != value:
            return f"layout.{name}={getattr(lay, name)} but the inputs give {value}"
    units = plan.inputs.model.num_hidden_layers + plan.inputs.model.num_nextn_predict_layers
    if sorted(u for stage in lay.stage_layers for u in stage) != list(range(units)):
        return f"layout.stage_layers={lay.stage_layers} do not hold the model's {units} layer units once each"
    return None


def _derived_error(plan: PlanFile) -> str | None:
    lay, mem = plan.layout, plan.memory
    if len(mem.per_rank) != lay.pp or any(not 0 <= s < lay.stages for r in mem.per_rank for s in r.stages):
        return f"memory.per_rank must hold pp={lay.pp} ranks whose stages lie in 0..{lay.stages - 1}"
    if mem.usable_hbm_bytes != plan.inputs.cluster.usable_hbm_bytes:
        return f"memory.usable_hbm_bytes={mem.usable_hbm_bytes} but the cluster has {plan.inputs.cluster.usable_hbm_bytes}"
    sched = plan.schedule
    if sched is not None and (sched.kind, sched.num_ranks, sched.num_stages, sched.num_microbatches) != (
            plan.inputs.parallel.schedule, lay.pp, lay.stages, lay.microbatches):
        return (f"schedule ({sched.kind}, {sched.num_ranks} ranks, {sched.num_stages} stages, {sched.num_microbatches} "
                f"micro-batches) is not the layout's ({plan.inputs.parallel.schedule}, {lay.pp}, {lay.stages}, "
                f"{lay.microbatches})")
    pred = plan.predictions
    if pred is not None and (len(pred.step.per_rank) != lay.pp or pred.step.microbatches != lay.microbatches
                             or len(pred.run.phases) != len(plan.inputs.training.phases)):
        return (f"predictions: step.per_rank must hold pp={lay.pp} ranks at microbatches={lay.microbatches}, and "
                f"run.phases the inputs' {len(plan.inputs.training.phases)} phases")
    budget = plan.budget_report
    if (pred is None) != (budget is None):
        return "predictions and budget_report are written together: one of them is null"
    if budget is not None and budget.gpu_hours_total != pred.run.gpu_hours_total:
        return (f"budget_report.gpu_hours_total={budget.gpu_hours_total} is not predictions.run.gpu_hours_total="
                f"{pred.run.gpu_hours_total}")
    if budget is not None and budget.budget_gpu_hours != plan.inputs.budget.gpu_hours:
        return f"budget_report.budget_gpu_hours={budget.budget_gpu_hours} but the inputs give {plan.inputs.budget.gpu_hours}"
    return None


def dump_plan(plan: PlanFile) -> str:
    return plan.model_dump_json(indent=2) + "\n"


def parse_plan(text: str | bytes, source: str = "<plan>") -> PlanFile:
    """Parse and check a plan document: strict JSON, schema version, schema, consistency, inputs hash."""
    try:
        raw = parse_json(text, source)
    except JsonInputError as exc:
        raise PlanError(str(exc)) from None
    return _checked(raw, source)


def _checked(raw: object, source: str) -> PlanFile:
    if not isinstance(raw, dict):
        raise PlanError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version in READABLE_VERSIONS and version != SCHEMA_VERSION:  # an older plan this version reads unchanged
        raw = {**raw, "schema_version": SCHEMA_VERSION}
        version = SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        raise PlanError(
            f"{source}: schema_version={version!r:.40} is not supported; this moeplan reads version {SCHEMA_VERSION} "
            "(re-run `moeplan plan` to regenerate it)"
        )
    try:
        plan = PlanFile.model_validate(raw)
    except ValidationError as exc:
        raise PlanError(first_error_line(exc, prefix=source, whole="plan")) from exc
    actual = plan.inputs.sha256()
    if actual != plan.inputs_sha256:
        raise PlanError(
            f"{source}: inputs_sha256={plan.inputs_sha256[:12]!r}... does not match the inputs ({actual[:12]}...); "
            "the inputs were edited after planning: re-run `moeplan plan`"
        )
    error = consistency_error(plan)
    if error:
        raise PlanError(f"{source}: {error}: the plan was edited after planning: re-run `moeplan plan`")
    return plan


def read_plan(path: str | Path) -> PlanFile:
    """The plan at ``path`` (a plan file, or a folder holding ``plan.json``), checked as ``parse_plan`` does."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / "plan.json"
        raw = read_json_file(path)
    except OSError as exc:  # is_dir on a name the system refuses (too long)
        raise PlanError(f"{path}: cannot read ({exc.strerror})") from None
    except JsonInputError as exc:
        raise PlanError(str(exc)) from None
    return _checked(raw, str(path))


def write_plan(plan: PlanFile, path: str | Path) -> None:
    write_atomic(path, dump_plan(plan))
