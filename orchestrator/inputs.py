"""Turn CLI arguments into validated inputs: preset names or a config.json, node counts, plan flags and
``--set`` overrides into ``PlanInputs``; the JSON files options name (load records, placements) into
their pydantic models. Every failure is one ``InputError`` line naming the option and the value."""

from __future__ import annotations

import json
import math
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.overrides import apply_overrides, parse_override
from moeplan.simulator.accounting.layout import LayoutError, check_layout
from moeplan.simulator.contracts.expert_load import ExpertLoadRecord, one_line_error
from moeplan.simulator.planning.planner import resolve_microbatches
from moeplan.simulator.planning.search import SearchResult
from moeplan.simulator.presets.clusters import CLUSTER_PRESETS
from moeplan.simulator.presets.models import MODEL_PRESETS
from moeplan.simulator.presets.recipes import recipe_for
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.hardware import MAX_NODES, ClusterSpec
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.json_input import JsonInputError, read_json_file
from moeplan.simulator.spec.model import MAX_EXPERTS, ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import MAX_PHASES

Model = TypeVar("Model", bound=BaseModel)

# CLI flag -> plan-input key it sets (the specs hold the defaults; the CLI declares none)
FLAG_KEYS = {
    "pp": "parallel.pp", "ep": "parallel.ep", "dp": "parallel.dp", "cp": "parallel.cp", "schedule": "parallel.schedule",
    "microbatches": "parallel.microbatches", "micro_batch_size": "parallel.micro_batch_size",
    "recompute": "parallel.recompute", "seq_len": "parallel.seq_len_tokens",
    "precision": "training.precision", "global_batch": "training.phases.0.global_batch_seqs",
    "tokens": "training.phases.0.tokens", "budget_gpu_hours": "budget.gpu_hours",
    "price_per_gpu_hour": "budget.usd_per_gpu_hour",
}
COUNT_FLAGS = ("tokens", "budget_gpu_hours")  # given as text such as 14.8T
_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str, flag: str) -> float:
    """``14.8T`` -> 1.48e13; plain numbers pass through. Finite and non-negative, or ``InputError``."""
    match = re.fullmatch(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,4})?)\s*([KMBGT]?)\s*", text)
    if not match:
        raise InputError(f"{flag} {text!r:.80}: expected a number such as 14.8T, 469B or 1e12")
    value = float(match.group(1)) * _SUFFIX.get(match.group(2), 1.0)
    if not math.isfinite(value):
        raise InputError(f"{flag} {text!r:.80}: too large for a number")
    return value


def finite_float(text: str) -> float:
    """A float option's value (typer's own float takes ``nan``, ``inf`` and ``1e999``): a finite number."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r:.80} is not a finite number")
    return value


def flag_overrides(flags: Mapping[str, Any]) -> list[str]:
    """``--set`` items for the plan flags given (``FLAG_KEYS`` names; None = not given)."""
    sets = [f"{FLAG_KEYS[k]}={json.dumps(v)}" for k, v in flags.items() if v is not None and k not in COUNT_FLAGS]
    for k in COUNT_FLAGS:
        if flags.get(k) is not None:
            sets.append(f"{FLAG_KEYS[k]}={parse_count(flags[k], '--' + k.replace('_', '-'))}")
    return sets


def read_model_file(path: Path, cls: type[Model], option: str) -> Model:
    """Parse a JSON file (``json_input.read_json_file``: bounded, strict) into ``cls``; every failure is
    one ``InputError`` naming the option and file."""
    try:
        data = read_json_file(path)
    except JsonInputError as exc:
        raise InputError(f"{option} {exc}") from None
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{option} {path}: {one_line_error(exc)}") from exc


def moe_layers(model: ModelSpec, with_mtp: bool = False) -> list[int]:
    """The model's MoE layer ids (HF numbering), and its MTP modules' after them when ``with_mtp``."""
    layers = [i for i in range(model.num_hidden_layers) if model.is_moe_layer(i)]
    if with_mtp:
        layers += list(range(model.num_hidden_layers, model.num_hidden_layers + model.num_nextn_predict_layers))
    return layers


def one_load_source(load: Path | None, zipf: float | None) -> None:
    if load is not None and zipf is not None:
        raise InputError("--load and --zipf: give one expert-load source, not both")


MAX_ZIPF = 50.0  # past this the first expert takes all but 1e-15 of the load; larger exponents overflow


def check_zipf(zipf: float | None, model: ModelSpec) -> None:
    """``--zipf``: an exponent in 0..``MAX_ZIPF``, for a model with routed experts."""
    if zipf is None:
        return
    if not model.is_moe:
        raise InputError(f"--zipf {zipf}: {model.name} has no routed experts (n_routed_experts=0)")
    if not 0 <= zipf <= MAX_ZIPF:  # NaN fails this too
        raise InputError(f"--zipf {zipf}: must be a finite exponent in 0..{MAX_ZIPF:g}")


def check_redundant(redundant: int, model: ModelSpec, option: str) -> None:
    """Redundant expert slots: >= 0, at most ``MAX_EXPERTS``, and only for a model with routed experts."""
    if not 0 <= redundant <= MAX_EXPERTS:
        raise InputError(f"{option} {redundant}: must be >= 0 and at most {MAX_EXPERTS}")
    if redundant and not model.is_moe:
        raise InputError(f"{option} {redundant}: {model.name} has no routed experts (n_routed_experts=0)")


def read_load_record(path: Path, model: ModelSpec, layers: Iterable[int]) -> ExpertLoadRecord:
    """A recorded expert-load file (``ExpertLoadRecord``, the format training writes) that fits ``model``:
    its expert count, and every layer one of ``layers``."""
    record = read_model_file(path, ExpertLoadRecord, "--load")
    if record.n_routed_experts != model.n_routed_experts:
        raise InputError(f"--load {path}: n_routed_experts={record.n_routed_experts} but the model has {model.n_routed_experts}")
    stray = sorted(set(record.layer_ids) - set(layers))
    if stray:
        raise InputError(f"--load {path}: layer={stray[0]} is not an MoE layer of {model.name}")
    return record


def load_model(arg: str) -> tuple[ModelSpec, list[str]]:
    """A preset name, or the path of a HF ``config.json``; returns (spec, ignored keys)."""
    if arg in MODEL_PRESETS:
        return MODEL_PRESETS[arg](), []
    path = Path(arg)
    kind = path_kind(path, "--model")
    if path.suffix == ".json" or kind is not None:
        if kind != "file":
            raise InputError(f"--model {arg}: no such file")
        try:
            return ModelSpec.from_hf_config_file(path)
        except ValidationError as exc:
            raise InputError(first_error_line(exc, str(path))) from exc
        except ValueError as exc:  # not strict JSON, not an object (``JsonInputError`` names the file)
            raise InputError(f"--model {exc}") from exc
    raise InputError(f"--model {arg!r:.200}: unknown preset (choose from: {', '.join(MODEL_PRESETS)}) and not a "
                     "config.json path")


def path_kind(path: Path, option: str) -> str | None:
    """``"file"``, ``"dir"`` or ``"other"`` for what is at ``path`` (links followed), None for nothing;
    ``InputError`` for a name the system refuses (too long, a NUL byte, a loop of links)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        raise InputError(f"{option} {str(path)!r:.200}: cannot use ({getattr(exc, 'strerror', None) or exc})") from None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def load_cluster(name: str, nodes: int | None) -> ClusterSpec:
    if name not in CLUSTER_PRESETS:
        raise InputError(f"--cluster {name!r:.200}: unknown preset (choose from: {', '.join(CLUSTER_PRESETS)})")
    if nodes is not None and not 0 < nodes <= MAX_NODES:
        raise InputError(f"--nodes {nodes}: must be a positive number of nodes, at most {MAX_NODES}")
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
    wgrad_batch_set: bool = False  # the user set training.kernels.expert_wgrad_batch (the planner leaves it)

    def planned(self, searched: SearchResult | None) -> tuple[PlanInputs, str]:
        """The inputs to plan (the searched layout's, if any) and where their layout came from."""
        if searched is not None:
            return self.inputs.model_copy(update={"parallel": searched.best}), "searched"
        return self.inputs, "published" if self.published and not self.fixed else "given"


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
    layout_sets = [s for s in sets if parse_override(s)[0][0] == "parallel"]  # parallel.pp=8, parallel={...}
    other_sets = [s for s in sets if s not in layout_sets]
    try:
        data = apply_overrides(base, other_sets)
        _check_phase_count(data["training"])
        published = recipe.parallel is not None and _fits_cluster(PlanInputs.model_validate(data))
        if not published:
            data["parallel"] = ParallelSpec().model_dump(mode="json")
        fixed_data = apply_overrides({"parallel": data["parallel"]}, layout_sets)["parallel"]
        data["parallel"] = fixed_data
        inputs = PlanInputs.model_validate(data)
        return PlanRequest(inputs=inputs, ignored=ignored, fixed=_fixed(fixed_data, layout_sets), published=published,
                           wgrad_batch_set=any(_sets_wgrad_batch(*parse_override(s)) for s in other_sets))
    except ValidationError as exc:
        raise InputError(first_error_line(exc, "invalid setting")) from exc


_WGRAD_BATCH = ("training", "kernels", "expert_wgrad_batch")


def _sets_wgrad_batch(path: list[str], value: Any) -> bool:
    """Whether an override sets ``training.kernels.expert_wgrad_batch``: by its path, or inside the object it gives
    ``training`` or ``training.kernels``."""
    if tuple(path) == _WGRAD_BATCH:
        return True
    if tuple(path) != _WGRAD_BATCH[:len(path)]:
        return False
    for key in _WGRAD_BATCH[len(path):]:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return True


def _check_phase_count(training: Any) -> None:
    """At most ``MAX_PHASES`` phases, checked before they are validated or priced (``--set training.phases=[...]``
    or ``--set training={...}``; anything but a list of them is the spec's to refuse)."""
    phases = training.get("phases") if isinstance(training, dict) else None
    if isinstance(phases, list) and len(phases) > MAX_PHASES:
        raise InputError(f"training.phases: {len(phases):,} phases; at most {MAX_PHASES} (each phase is planned on "
                         "its own)")


def _fixed(parallel: dict[str, Any], layout_sets: list[str]) -> dict[str, Any]:
    """The layout settings the user gave (``parallel.pp=8``, ``parallel.stage_layers.0=3``, or every key of
    ``parallel={...}``), with their values: what the search must not vary."""
    keys: set[str] = set()
    for item in layout_sets:
        path, value = parse_override(item)
        keys |= {path[1]} if len(path) > 1 else set(value) if isinstance(value, dict) else set()
    return {k: parallel[k] for k in sorted(keys) if k in parallel}

