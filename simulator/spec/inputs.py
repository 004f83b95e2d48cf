"""Everything the user chose for a plan; the plan is a pure function of these."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, model_validator

from moeplan.simulator.spec.hardware import ClusterSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import BudgetSpec, TrainingSpec


class PlanInputs(BaseModel):
    """Everything the user chose: the plan is a pure function of these."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSpec
    cluster: ClusterSpec
    parallel: ParallelSpec
    training: TrainingSpec
    budget: BudgetSpec = BudgetSpec()

    @model_validator(mode="after")
    def _phases_hold_a_step(self) -> PlanInputs:
        """A phase given in tokens holds at least one step (of its smallest batch, where it ramps)."""
        for i, phase in enumerate(self.training.phases):
            seq = phase.seq_len_tokens or self.parallel.seq_len_tokens
            batch = phase.ramp.start_seqs if phase.ramp is not None else phase.global_batch_seqs
            if phase.tokens is not None and phase.tokens < batch * seq:
                raise ValueError(
                    f"training.phases.{i}.tokens={phase.tokens:g} is less than one step of {batch} sequences x "
                    f"{seq} tokens = {batch * seq:,} tokens"
                )
        return self

    @model_validator(mode="after")
    def _warmup_within_the_run(self) -> PlanInputs:
        warmup = self.training.optimizer.lr.warmup_steps
        steps = self.training.optimizer_steps(self.parallel.seq_len_tokens)
        if warmup > steps:
            raise ValueError(f"training.optimizer.lr.warmup_steps={warmup} exceeds the run's {steps:,.0f} optimizer "
                             "steps")
        return self

    def sha256(self) -> str:
        """The inputs' hash. Settings added after plans were first written (``HASHED_WHEN_SET``) count only away
        from their default, so that a plan written before one existed keeps its hash and still loads."""
        data = self.model_dump(mode="json")
        for *path, key, default in HASHED_WHEN_SET:
            node = data
            for part in path:
                node = node[part]
            if node.get(key) == default:
                del node[key]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# (path..., key, default) of settings added to the inputs after plans were first written: left out of the hash at
# their default (``PlanInputs.sha256``).
HASHED_WHEN_SET = (("training", "kernels", "expert_wgrad_batch", 1),)
