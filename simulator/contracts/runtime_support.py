"""What the runtime (``model.runtime``) can execute of a plan, checked without importing torch.

``moeplan launch`` refuses a plan or settings the ranks would refuse, before Ray starts and before torch's
import (about 3 s of CPU): the ranks run the same checks (``model.runtime.rank.check_plan_for_world``,
``model.runtime.worker.RunConfig``) from here, so the two cannot drift.
"""

from __future__ import annotations

from moeplan.simulator.contracts.plan_file import PlanFile

DTYPE_NAMES = ("bf16", "fp32")  # model.runtime.worker.DTYPES: "fp32" for exact CPU rehearsals and tests


class PlanRuntimeError(ValueError):
    """A plan the runtime cannot execute on the processes given (one line, names the field)."""


def check_plan_for_world(plan: PlanFile, world: int) -> None:
    """One-line errors for a plan the runtime cannot run on ``world`` processes (before any group forms)."""
    lay, model = plan.layout, plan.inputs.model
    if lay.world != world:
        raise PlanRuntimeError(f"layout.world={lay.world} but {world} processes were given")
    if not model.is_mla:  # model/block.py's LayerFactory.create refuses it too, but in rank 0 after Ray has started
        raise PlanRuntimeError(f"model {model.name!r}: kv_lora_rank={model.kv_lora_rank}; the runtime builds MLA "
                               "models only (the plan is for the simulator only)")
    if plan.schedule is None:
        raise PlanRuntimeError("plan.schedule is null: re-run `moeplan plan` to write the schedule")
    if lay.cp != 1:
        raise PlanRuntimeError(f"layout.cp={lay.cp}: the runtime does not run context parallelism yet (cp must be 1)")
    if plan.inputs.parallel.tp != 1:
        raise PlanRuntimeError(f"parallel.tp={plan.inputs.parallel.tp}: the runtime does not run tensor parallelism "
                               "(tp must be 1; the plan is for the simulator only)")


def check_run_settings(steps: int, warmup_steps: int, dtype: str, checkpoint_every: int) -> None:
    """ValueError (one line) for run settings the ranks refuse (``RunConfig``)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in 0..steps-1={steps - 1}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0 = off)")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(DTYPE_NAMES)}")
