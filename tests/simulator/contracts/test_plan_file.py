"""The plan file: exact round trip, version and hash checks, atomic writes, import hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeplan.simulator.contracts.plan_file import (
    SCHEMA_VERSION,
    PlanError,
    PlanInputs,
    dump_plan,
    parse_plan,
    read_plan,
    write_atomic,
    write_plan,
)
from moeplan.simulator.planning.planner import build_plan, summary
from moeplan.simulator.presets.clusters import h200, h800
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe
from moeplan.simulator.presets.recipes import deepseek_v3_recipe, default_recipe
from moeplan.simulator.spec.parallel import ParallelSpec


@pytest.fixture(scope="module")
def plan():
    r = default_recipe()
    inputs = PlanInputs(model=tiny_moe(), cluster=h200(1), parallel=ParallelSpec(pp=2, ep=4, schedule="dualpipe"),
                        training=r.training, budget=r.budget)
    return build_plan(inputs)


def test_round_trip_is_exact(plan):
    text = dump_plan(plan)
    again = parse_plan(text)
    assert again == plan
    assert dump_plan(again) == text


def test_other_schema_versions_are_refused(plan):
    raw = json.loads(dump_plan(plan))
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(PlanError, match=f"schema_version={SCHEMA_VERSION + 1} is not supported"):
        parse_plan(json.dumps(raw), "p.json")


@pytest.mark.parametrize("old", [1, 2, 3])  # 1: before CP; 2: before the stage records; 3: before hyper-parameters
def test_older_plans_are_refused_with_the_advice_to_replan(plan, old):
    raw = json.loads(dump_plan(plan))
    raw["schema_version"] = old
    with pytest.raises(PlanError, match=fr"schema_version={old} is not supported; this moeplan reads version 5 "
                                        r"\(re-run `moeplan plan`"):
        parse_plan(json.dumps(raw), "old.json")


def test_a_version_4_plan_reads_as_5():
    """Schema 5 added only the candidates' optional ``expert_wgrad_batch``: a version-4 file (the golden plan as it
    was, none there) reads as the same plan, each candidate's size None."""
    golden = Path(__file__).parents[2] / "orchestrator" / "golden" / "plan-tiny-moe.json"
    raw = json.loads(golden.read_text())
    assert raw["schema_version"] == 5 and raw["predictions"]["top_candidates"]
    want = parse_plan(json.dumps(raw), "v5.json")
    raw["schema_version"] = 4
    for c in raw["predictions"]["top_candidates"]:
        del c["expert_wgrad_batch"]
    assert parse_plan(json.dumps(raw), "v4.json") == want


def test_stage_records_spell_out_the_priced_split(plan):
    records = plan.layout.stage_records
    assert [r.units for r in records] == list(plan.layout.stage_layers)
    assert records[0].has_embedding and records[-1].has_head and records[-1].mtp_layers == (4,)  # 4 layers + MTP
    raw = json.loads(dump_plan(plan))
    raw["layout"]["stage_records"][0]["end_layer"] += 1  # no longer the units that were priced
    with pytest.raises(PlanError, match="stage_records cover layer units"):
        parse_plan(json.dumps(raw), "edited.json")


def test_edited_inputs_break_the_hash(plan):
    raw = json.loads(dump_plan(plan))
    raw["inputs"]["parallel"]["micro_batch_size"] = 2
    with pytest.raises(PlanError, match="does not match the inputs"):
        parse_plan(json.dumps(raw))


def test_a_plan_written_before_the_expert_wgrad_batch_reads_and_a_set_batch_is_hashed(plan):
    """``training.kernels.expert_wgrad_batch`` came after plans existed: a plan without it (as written before) reads
    with its hash unchanged; set to 2 without re-planning, the hash refuses the edit."""
    raw = json.loads(dump_plan(plan))
    assert raw["inputs"]["training"]["kernels"].pop("expert_wgrad_batch") == 1
    assert parse_plan(json.dumps(raw)) == plan
    raw["inputs"]["training"]["kernels"]["expert_wgrad_batch"] = 2
    with pytest.raises(PlanError, match="does not match the inputs"):
        parse_plan(json.dumps(raw))


def test_unknown_fields_and_bad_json_are_refused(plan):
    raw = json.loads(dump_plan(plan))
    raw["layout"]["bogus"] = 1
    with pytest.raises(PlanError, match=r"^<plan>: layout.bogus: Extra inputs are not permitted \(got 1\)$"):
        parse_plan(json.dumps(raw))
    raw = json.loads(dump_plan(plan))
    raw["layout"]["pp"] = "two"
    with pytest.raises(PlanError, match=r"^<plan>: layout.pp: Input should be a valid integer.* \(got 'two'\)$"):
        parse_plan(json.dumps(raw))
    with pytest.raises(PlanError, match="malformed JSON"):
        parse_plan("{")


def test_write_is_atomic(tmp_path, plan, monkeypatch):
    write_plan(plan, tmp_path / "plan.json")
    assert read_plan(tmp_path) == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("moeplan.simulator.contracts.atomic_write.os.replace", boom)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "other.json", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file, no partial file


def test_summary_has_the_public_keys(plan):
    keys = set(summary(plan))
    assert {"params_total", "params_activated", "flops_per_token", "peak_memory_bytes_per_gpu", "step_time_s",
            "bubble_frac", "mfu_frac", "tokens_per_s_per_gpu", "gpu_hours_per_trillion_tokens", "gpu_hours_total",
            "within_budget", "candidates_evaluated"} <= keys


def test_v3_recipe_plan_on_2048_h800():
    r = deepseek_v3_recipe()
    p = build_plan(PlanInputs(model=deepseek_v3(), cluster=h800(256), parallel=r.parallel, training=r.training, budget=r.budget))
    assert (p.layout.pp, p.layout.ep, p.layout.dp, p.layout.microbatches) == (16, 64, 128, 120)
    assert p.params.total == 671_026_404_352 and p.memory.fits


def test_simulated_plan_round_trips_with_schedule_and_placement():
    from moeplan.simulator.planning.planner import plan_with_predictions
    from moeplan.simulator.spec.training import Phase, TrainingSpec

    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=32),))
    inputs = PlanInputs(model=tiny_moe(), cluster=h200(1), training=training,
                        parallel=ParallelSpec(pp=2, ep=4, schedule="dualpipe", seq_len_tokens=128))
    plan = plan_with_predictions(inputs, (), "given")
    assert parse_plan(dump_plan(plan)) == plan
    assert plan.schedule is not None and plan.schedule.num_microbatches == plan.layout.microbatches
    assert plan.placement is not None and plan.placement.num_gpus == 4
    moe_layers = [i for i in range(4) if tiny_moe().is_moe_layer(i)] + [4]  # + the MTP layer
    assert plan.placement.layer_ids == moe_layers


@pytest.fixture(scope="module")
def simulated():
    """A plan with every section filled (predictions, placement, budget), as raw JSON to tamper with."""
    from moeplan.simulator.planning.planner import plan_with_predictions
    from moeplan.simulator.spec.training import BudgetSpec, Phase, TrainingSpec

    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=32),))
    inputs = PlanInputs(model=tiny_moe(), cluster=h200(1), training=training, budget=BudgetSpec(gpu_hours=10.0),
                        parallel=ParallelSpec(pp=2, ep=4, schedule="dualpipe", seq_len_tokens=128))
    return dump_plan(plan_with_predictions(inputs, (), "given"))


def _resigned(raw: dict) -> str:
    """The plan with its hash recomputed, as someone editing more than the inputs would."""
    raw["inputs_sha256"] = PlanInputs.model_validate(raw["inputs"]).sha256()
    return json.dumps(raw)


# (where, new value, what the one line says): fields the inputs hash does not cover
TAMPERED = {
    "negative step time": (("predictions", "step", "step_time_s"), -1.0,
                           "predictions.step.step_time_s: Input should be greater than 0 (got -1.0)"),
    "zero pipeline ranks": (("layout", "pp"), 0, "layout.pp: Input should be greater than 0 (got 0)"),
    "a bool for a size": (("layout", "dp"), True, "layout.dp: Input should be a valid integer (got True)"),
    "world off the inputs": (("layout", "world"), 16, "layout: pp=2 x dp=4 x cp=1 differs from world=16"),
    "pp off the inputs": (("layout", "pp"), 4, "layout: pp=4 x dp=4 x cp=1 differs from world=8"),
    "rank holding a stage that is not there": (("layout", "rank_stages", 0, 0), 9, "names a stage outside 0..1"),
    "memory rank with a stage that is not there": (("memory", "per_rank", 0, "stages"), [7],
                                                   "memory.per_rank must hold pp=2 ranks whose stages lie in 0..1"),
    "peak of a rank that is not there": (("memory", "peak_rank"), 5, "memory: peak_rank=5: peak_bytes_per_gpu="),
    "fits against the numbers": (("memory", "fits"), False, "memory: fits=False contradicts"),
    "negative count": (("memory", "per_rank", 1, "in_flight_microbatches"), -5.0,
                       "per_rank[1]: rank=1 must be 1 and every size finite and >= 0"),
    "bytes off their sum": (("memory", "per_rank", 1, "grad_bytes"), -5.0, "differs from the sum of its parts"),
    "verdict without a margin": (("budget_report", "margin_frac"), None, "budget_gpu_hours, within_budget and margin_frac"),
    "budget off the inputs": (("budget_report", "budget_gpu_hours"), 99.0, "budget_report.budget_gpu_hours=99.0 but"),
    "phase fit without its peak": (("predictions", "run", "phases", 0, "layout", "fits"), False,
                                   "peak_memory_bytes_per_gpu and fits must be given together"),
    "schedule of another size": (("schedule", "num_microbatches"), 64,
                                 "schedule: direction_microbatches=(4, 4) does not sum to num_microbatches=64"),
    "a rank missing from the step": (("predictions", "step", "per_rank"), [],
                                     "predictions: step.per_rank must hold pp=2 ranks"),
    "a stage count that would fill memory": (("layout", "stages"), 2**31,
                                             "layout.stages: Input should be less than or equal to 1024"),
    "a layer range that would fill memory": (("layout", "stage_records", 0, "end_layer"), 2**31,
                                             "end_layer: Input should be less than or equal to 1024"),
    "predictions without a budget report": (("budget_report",), None,
                                            "predictions and budget_report are written together"),
    "a budget report of another run": (("budget_report", "gpu_hours_total"), 1.0,
                                       "budget_report.gpu_hours_total=1.0 is not predictions.run.gpu_hours_total"),
    "NaN": (("predictions", "step", "mfu_frac"), "NaN", "NaN is not a JSON number"),
    "an infinity": (("predictions", "run", "gpu_hours_total"), "1e999", "1e999 does not fit a float"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_plan_is_validated_in_full_when_read(simulated, case):
    """``show`` and the runtime trust what they index: every field the hash does not cover is checked too."""
    path, value, message = TAMPERED[case]
    raw = json.loads(simulated)
    node = raw
    for key in path[:-1]:
        node = node[key]
    raw_value = value in ("NaN", "1e999")
    node[path[-1]] = "@@" if raw_value else value
    text = _resigned(raw).replace('"@@"', value) if raw_value else _resigned(raw)
    with pytest.raises(PlanError) as info:
        parse_plan(text, "p.json")
    assert str(info.value).startswith("p.json: ") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_the_untampered_plan_reads(simulated):
    assert dump_plan(parse_plan(simulated)) == simulated
    assert parse_plan(_resigned(json.loads(simulated))) == parse_plan(simulated)
