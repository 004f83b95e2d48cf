"""Simulation options from CLI arguments: the cost tables (named, or a calibration file), the expert
load (Zipf, or a recorded load file) and redundant experts, as one ``SimOptions``; and the techniques a
plan leaves out (``--techniques``, ``simulator.planning.techniques``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import ValidationError

from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.inputs import (
    PlanRequest,
    build_request,
    check_redundant,
    check_zipf,
    moe_layers,
    one_load_source,
    read_load_record,
)
from moeplan.simulator.costs.tables import NAMED_TABLES, CostTables, default_tables, named_tables
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.engine.expert_traffic import group_placement
from moeplan.simulator.planning.techniques import Techniques
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.hardware import GpuSpec
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.model import ModelSpec

LayerLoads = tuple[tuple[int, tuple[float, ...]], ...]


def cost_tables(calibration: Path | None, named: str | None, gpu: GpuSpec) -> CostTables | None:
    """The cost tables the options name; None = the GPU's defaults."""
    if calibration is not None and named is not None:
        raise InputError(f"--calibration {calibration} and --cost-tables {named}: give one cost-table source, not both")
    if named is not None:
        try:
            return named_tables(named, gpu.name)
        except ValueError as exc:
            raise InputError(f"--cost-tables {named!r}: unknown (choose {', '.join(NAMED_TABLES)})") from exc
    if calibration is None:
        return None
    try:
        return CostTables.from_file(calibration)
    except ValidationError as exc:
        raise InputError(first_error_line(exc, f"--calibration {calibration}")) from exc
    except ValueError as exc:  # not bounded, strict JSON (``JsonInputError`` names the file)
        raise InputError(f"--calibration {exc}") from exc


def check_comm_sms(tables: CostTables | None, calibration: Path | None, gpu: GpuSpec) -> None:
    """The SMs the tables reserve for expert all-to-all leave the GPU some for compute (a calibration's
    ``comm_sms``, or a ``--set cluster.gpu.sm_count`` below the default tables')."""
    used = tables or default_tables(gpu.name)
    error = used.comm_sms_error(gpu.sm_count)
    if error:
        where = f"--calibration {calibration}" if calibration is not None else f"cost tables {used.name!r}"
        raise InputError(f"{where}: {error} ({gpu.name})")


def check_precision(tables: CostTables | None, precision: str, gpu: GpuSpec) -> None:
    """The tables price GEMMs in the run's precision (the cpu tables price no FP8)."""
    used = tables or default_tables(gpu.name)
    error = used.precision_error(precision)
    if error:
        raise InputError(f"{error} ({gpu.name})")


def layer_loads(path: Path, model: ModelSpec) -> LayerLoads:
    """Per-layer expert loads from a recorded load file; its layers may include the MTP modules'."""
    record = read_load_record(path, model, moe_layers(model, with_mtp=True))
    return tuple((e.layer, tuple(float(c) for c in e.tokens_per_expert)) for e in record.layers)


def sim_options(model: ModelSpec, gpu: GpuSpec, *, zipf: float | None, load: Path | None, redundant_experts: int,
                calibration: Path | None, table_name: str | None, precision: str = "bf16") -> SimOptions:
    """The ``SimOptions`` of ``moeplan plan``'s simulation options (uniform routing unless a load is given)."""
    one_load_source(load, zipf)
    check_zipf(zipf, model)
    check_redundant(redundant_experts, model, "--redundant-experts")
    loads = layer_loads(load, model) if load is not None else ()
    tables = cost_tables(calibration, table_name, gpu)
    check_comm_sms(tables, calibration, gpu)
    check_precision(tables, precision, gpu)
    expert_load = None
    if zipf is not None:
        expert_load = tuple(float(x) for x in 1.0 / np.arange(1, model.n_routed_experts + 1) ** zipf)
    return SimOptions(tables=tables, redundant_experts=redundant_experts, expert_load=expert_load, layer_loads=loads)


def check_placeable(inputs: PlanInputs, redundant_experts: int) -> None:
    """The layout's expert-parallel group holds ``redundant_experts`` extra slots per MoE layer (EPLB
    places at most one replica of an expert on a GPU); checked before a given layout is simulated."""
    m, ep = inputs.model, inputs.parallel.ep
    if redundant_experts == 0 or not m.is_moe or ep == 1:
        return
    try:
        group_placement(m, inputs.cluster, ep, redundant_experts)
    except ValueError as exc:  # the placement's own argument checks: this count does not fit this group
        raise InputError(f"--redundant-experts {redundant_experts} at ep={ep}: {exc}") from exc


def parse_techniques(text: str | None) -> Techniques:
    """``--techniques no-dualpipe,no-fp8``; one line naming an unknown name."""
    try:
        return Techniques.parse(text)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def request_with_techniques(techniques: Techniques, model: str, cluster: str, nodes: int | None,
                            sets: list[str]) -> PlanRequest:
    """``build_request`` with the techniques' settings before the user's (which are then checked against them,
    ``techniques_search``); per training phase too, once the phases are known."""
    req = build_request(model, cluster, nodes, techniques.overrides + sets)
    phases = techniques.phase_overrides(len(req.inputs.training.phases))
    return build_request(model, cluster, nodes, techniques.overrides + phases + sets) if phases else req


def techniques_search(techniques: Techniques, req: PlanRequest, do_search: bool, asked: bool | None) -> bool:
    """Whether to search, given the techniques left out: a layout whose schedule they exclude (the model's
    published one: V3's DualPipe) is searched again without it, unless ``--no-search`` (``asked`` False);
    a setting the user gave that they exclude is one line naming both."""
    par, precision = req.inputs.parallel, req.inputs.training.precision
    if par.schedule not in techniques.schedules and "schedule" not in req.fixed:
        if asked is False:
            raise InputError(f"{techniques.conflict(par.schedule, precision, par.cp, par.ep)} (the planned layout's): "
                             "drop --no-search to search without it, or give --schedule")
        do_search = True
    schedule = par.schedule if "schedule" in req.fixed or not do_search else None
    why = techniques.conflict(schedule, precision, par.cp, par.ep, tuple(p.cp for p in req.inputs.training.phases))
    if why:
        raise InputError(why)
    return do_search
