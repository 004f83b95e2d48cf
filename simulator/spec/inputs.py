"""Everything the user chose for a plan; the plan is a pure function of these."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict

from simulator.spec.hardware import ClusterSpec
from simulator.spec.model import ModelSpec
from simulator.spec.parallel import ParallelSpec
from simulator.spec.training import BudgetSpec, TrainingSpec


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
