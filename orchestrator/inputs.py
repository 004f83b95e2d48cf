"""Turn CLI arguments (preset names or a config.json, node count, ``--set`` overrides) into
validated ``PlanInputs``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moeplan.orchestrator.overrides import apply_overrides
from moeplan.simulator.accounting.layout import LayoutError, check_layout
from moeplan.simulator.planning.planner import resolve_microbatches
from moeplan.simulator.presets.clusters import CLUSTER_PRESETS
from moeplan.simulator.presets.models import MODEL_PRESETS
from moeplan.simulator.presets.recipes import recipe_for
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.hardware import ClusterSpec
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec


class InputError(ValueError):
    """Bad user input; the message is one line naming the field and the value."""


def validation_message(exc: ValidationError, prefix: str) -> str:
    """The first pydantic error as ``prefix: a.b: message (got value)``."""
    return first_error_line(exc, prefix)


def load_model(arg: str) -> tuple[ModelSpec, list[str]]:
    """A preset name, or the path of a HF ``config.json``; returns (spec, ignored keys)."""
    if arg in MODEL_PRESETS:
        return MODEL_PRESETS[arg](), []
    path = Path(arg)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise InputError(f"--model {arg}: no such file")
        try:
            return ModelSpec.from_hf_config_file(path)
        except ValidationError as exc:
            raise InputError(validation_message(exc, str(path))) from exc
        except ValueError as exc:  # malformed JSON, not an object
            raise InputError(str(exc)) from exc
    raise InputError(f"--model {arg!r}: unknown preset (choose from: {', '.join(MODEL_PRESETS)}) and not a config.json path")


def load_cluster(name: str, nodes: int | None) -> ClusterSpec:
    if name not in CLUSTER_PRESETS:
        raise InputError(f"--cluster {name!r}: unknown preset (choose from: {', '.join(CLUSTER_PRESETS)})")
    if nodes is not None and nodes <= 0:
        raise InputError(f"--nodes {nodes}: must be a positive number of nodes")
    return CLUSTER_PRESETS[name]() if nodes is None else CLUSTER_PRESETS[name](nodes)


def _fits_cluster(inputs: PlanInputs) -> bool:
    try:
        dp = check_layout(inputs.model, inputs.cluster, inputs.parallel)
        resolve_microbatches(inputs.parallel, inputs.training, dp)
    except LayoutError:
        return False
    return True


@dataclass(frozen=True)
class PlanRequest:
    """Validated inputs plus what the user fixed of the layout."""

    inputs: PlanInputs
    ignored: list[str]
    fixed: dict[str, Any]  # ParallelSpec fields set by the user
    published: bool  # the model's published layout runs on this cluster and is the base of ``inputs``


def build_request(model_arg: str, cluster_arg: str, nodes: int | None, sets: list[str]) -> PlanRequest:
    """Presets, then overrides of model/cluster/training/budget, then the layout (the model's
    published one when it runs on this cluster, else the defaults) with the user's layout
    overrides on top. Raises ``InputError``."""
    model, ignored = load_model(model_arg)
    cluster = load_cluster(cluster_arg, nodes)
    recipe = recipe_for(model.name)
    base: dict[str, Any] = {
        "model": model.model_dump(mode="json"),
        "cluster": cluster.model_dump(mode="json"),
        "training": recipe.training.model_dump(mode="json"),
        "budget": recipe.budget.model_dump(mode="json"),
        "parallel": (recipe.parallel or ParallelSpec()).model_dump(mode="json"),
    }
    layout_sets = [s for s in sets if s.strip().startswith("parallel.")]
    other_sets = [s for s in sets if s not in layout_sets]
    try:
        data = apply_overrides(base, other_sets)
        published = recipe.parallel is not None and _fits_cluster(PlanInputs.model_validate(data))
        if not published:
            data["parallel"] = ParallelSpec().model_dump(mode="json")
        fixed_data = apply_overrides({"parallel": data["parallel"]}, layout_sets)["parallel"]
        fixed = {k: v for k, v in fixed_data.items() if v != data["parallel"][k] or any(
            s.strip().startswith(f"parallel.{k}=") or s.strip().startswith(f"parallel.{k}.") for s in layout_sets)}
        data["parallel"] = fixed_data
        inputs = PlanInputs.model_validate(data)
        return PlanRequest(inputs=inputs, ignored=ignored, fixed=fixed, published=published)
    except ValidationError as exc:
        raise InputError(validation_message(exc, "invalid setting")) from exc
