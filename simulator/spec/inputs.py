"""Everything the user chose for a plan; the plan is a pure function of these."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict

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

    def sha256(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
