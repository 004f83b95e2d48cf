"""The training hyper-parameters: V3's schedules at the TR's milestones, properties of any schedule,
validation that names the field, and ``--set`` overrides through ``moeplan plan``."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.presets.recipes import deepseek_v3_recipe, default_recipe
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.hyperparams import LrSchedule, LrSegment, TokenSteps
from moeplan.simulator.spec.training import OptimizerSpec

T = 1e12


def test_v3_lr_at_the_reports_milestones() -> None:
    """TR §4.2 (shared/reference/deepseek-v3.md §8): 0 -> 2.2e-4 over 2K steps; 2.2e-4 to 10T tokens; cosine
    to 2.2e-5 over 4.3T; 2.2e-5 for 333B; 7.3e-6 for the final 167B and the context extension (§4.3)."""
    lr = deepseek_v3_recipe().training.optimizer.lr
    assert lr.lr_at(0, 0) == pytest.approx(2.2e-4 / 2000)
    assert lr.lr_at(999, 0.5e9) == pytest.approx(1.1e-4)
    assert lr.lr_at(1999, 1e9) == lr.lr_at(2000, 1e9) == 2.2e-4
    assert lr.lr_at(10**5, 9.99 * T) == 2.2e-4
    assert lr.lr_at(10**5, 10 * T) == pytest.approx(2.2e-4)  # the cosine starts where the constant ends
    assert lr.lr_at(10**5, 12.15 * T) == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # half-way: the mean
    assert lr.lr_at(10**5, 14.3 * T) == 2.2e-5
    assert lr.lr_at(10**5, 14.6 * T) == 2.2e-5
    assert lr.lr_at(10**5, 14.633 * T) == lr.lr_at(10**5, 14.75 * T) == 7.3e-6
    assert lr.lr_at(2 * 10**5, 14.9 * T) == 7.3e-6  # context extension, TR §4.3


def test_v3_gamma_mtp_weight_and_adamw() -> None:
    """TR §2.1.2 / §4.2: gamma 0.001 until 14.3T then 0; lambda 0.3 for the first 10T then 0.1; AdamW 0.9 / 0.95,
    weight decay 0.1, clip 1.0."""
    training = deepseek_v3_recipe().training
    bal, opt = training.balance, training.optimizer
    assert bal.gamma(0) == bal.gamma(14.29 * T) == 0.001 and bal.gamma(14.3 * T) == 0.0
    assert bal.mtp_weight(9.99 * T) == 0.3 and bal.mtp_weight(10 * T) == bal.mtp_weight(14.8 * T) == 0.1
    assert (opt.beta1, opt.beta2, opt.weight_decay, opt.grad_clip_norm) == (0.9, 0.95, 0.1, 1.0)


def test_default_recipe_is_warmup_then_cosine_over_its_run() -> None:
    training = default_recipe().training
    lr, run_tokens = training.optimizer.lr, training.phases[0].tokens
    assert lr.lr_at(1999, 0) == 3e-4 and lr.lr_at(10**5, run_tokens) == 3e-5
    assert training.optimizer_steps(4096) == pytest.approx(run_tokens / (4096 * 4096))


segments = st.lists(st.tuples(st.sampled_from(["constant", "linear", "cosine"]), st.floats(1e6, 1e12),
                              st.floats(0, 1e-2)), max_size=5)


def _schedule(peak: float, warmup: int, segs: list) -> LrSchedule:
    ends = sorted({round(end) for _, end, _ in segs})
    return LrSchedule(warmup_steps=warmup, peak_lr=peak,
                      segments=tuple(LrSegment(kind=k, until_tokens=e, lr=v) for (k, _, v), e in zip(segs, ends)))


@settings(max_examples=200, deadline=None)
@given(peak=st.floats(1e-6, 1e-2), warmup=st.integers(0, 5000), segs=segments, tokens=st.floats(0, 2e12))
def test_schedule_properties(peak, warmup, segs, tokens) -> None:
    """Warmup is monotone and reaches the schedule; values stay between the floor and the top; the schedule is
    continuous where a linear or cosine segment starts (a constant segment may jump, by definition)."""
    sched = _schedule(peak, warmup, segs)
    lrs = [peak, *(s.lr for s in sched.segments)]
    base = sched.base_lr(tokens)
    assert min(lrs) <= base <= max(lrs)
    ramp = [sched.lr_at(s, tokens) for s in range(0, warmup + 2, max(1, warmup // 7))]
    assert ramp == sorted(ramp) and sched.lr_at(warmup, tokens) == base and sched.lr_at(0, tokens) >= 0
    start = peak
    for seg, joint in zip(sched.segments, sched.joints_tokens()):
        if seg.kind != "constant":
            eps = 1e-6 * (seg.until_tokens - joint)
            tol = 1e-5 * max(lrs)  # the step eps moves the value by at most 1e-6 of the segment's span
            assert sched.base_lr(joint + eps) == pytest.approx(start, abs=tol)
            assert sched.base_lr(seg.until_tokens - eps) == pytest.approx(seg.lr, abs=tol)
        start = seg.lr
    if sched.segments:
        assert sched.base_lr(sched.segments[-1].until_tokens * 2) == sched.segments[-1].lr  # held after


@pytest.mark.parametrize(("update", "field"), [
    ({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2"), ({"eps": 0.0}, "eps"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
    ({"lr": {"peak_lr": -3e-4}}, "lr.peak_lr"),
    ({"lr": {"peak_lr": 3e-4, "segments": [{"kind": "cosine", "until_tokens": 1e9, "lr": -1e-5}]}}, "lr.segments.0.lr"),
    ({"lr": {"peak_lr": 3e-4, "segments": [{"kind": "linear", "until_tokens": 2e9, "lr": 1e-5},
                                           {"kind": "cosine", "until_tokens": 1e9, "lr": 1e-6}]}}, "until_tokens"),
])
def test_bad_values_name_their_field(update, field) -> None:
    with pytest.raises(ValidationError) as info:
        OptimizerSpec.model_validate(update)
    assert field in first_error_line(info.value)


def test_token_steps_shape() -> None:
    with pytest.raises(ValidationError, match="2 values need 1"):
        TokenSteps(values=(0.3, 0.1), until_tokens=())
    with pytest.raises(ValidationError, match="must increase"):
        TokenSteps(values=(0.3, 0.2, 0.1), until_tokens=(2e9, 1e9))
    steps = TokenSteps(values=(0.3, 0.2, 0.1), until_tokens=(1e9, 2e9))
    assert [steps.at(t) for t in (0, 1e9 - 1, 1e9, 2e9, math.inf)] == [0.3, 0.3, 0.2, 0.1, 0.1]


TINY = ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search", "--pp", "2", "--ep", "4",
        "--schedule", "dualpipev", "--seq-len", "256", "--global-batch", "32", "--tokens", "1B"]


def test_plan_overrides_reach_the_plan_and_bad_ones_exit_2(tmp_path) -> None:
    sets = ["training.optimizer.lr.warmup_steps=100", "training.optimizer.beta2=0.99",
            "training.balance.mtp_loss_weight.values=[0.3,0.1]", "training.balance.mtp_loss_weight.until_tokens=[5e8]"]
    res = CliRunner().invoke(app, [*TINY, "--out", str(tmp_path), *[a for s in sets for a in ("--set", s)]],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    training = json.loads((tmp_path / "plan.json").read_text())["inputs"]["training"]
    assert training["optimizer"]["lr"]["warmup_steps"] == 100 and training["optimizer"]["beta2"] == 0.99
    assert training["balance"]["mtp_loss_weight"] == {"values": [0.3, 0.1], "until_tokens": [5e8]}
    for item, message in [("training.optimizer.beta1=1", "training.optimizer.beta1"),
                          ("training.optimizer.lr.peak_lr=-1e-4", "training.optimizer.lr.peak_lr"),
                          ("training.optimizer.lr.warmup_steps=200000",
                           "training.optimizer.lr.warmup_steps=200000 exceeds the run's 122,070 optimizer steps")]:
        res = CliRunner().invoke(app, [*TINY, "--out", str(tmp_path / "bad"), "--set", item])
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "bad").exists()
