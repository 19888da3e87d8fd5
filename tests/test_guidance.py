"""Guidance schedules against DESIGN.md section 3, and Algorithm 1's switch step."""

from __future__ import annotations

import random

import pytest
import torch

from memguard.guidance import (
    Auto,
    Constant,
    DynamicTransition,
    Interval,
    StaticTransition,
    detection_score,
    dtp_switch_step,
    transition_step,
)


@pytest.mark.parametrize(("d", "expected"), [
    ([], None),
    ([5.0, 4.0], None),
    ([5.0, 4.0, 3.0, 2.0, 1.0], None),  # monotone decreasing: no minimum
    ([1.0, 2.0, 3.0, 4.0], None),  # monotone increasing: the start is no minimum (d_{T+1} = -inf)
    ([1.0, 5.0, 6.0, 7.0], None),  # "minimum" at the very start never fires
    ([5.0, 1.0, 2.0, 0.5, 3.0], 2),  # several minima: the first one, one step later
    ([5.0, 4.0, 1.0, 2.0, 0.5, 3.0], 3),
    ([5.0, 2.0, 2.0, 3.0], None),  # plateau at the bottom: never strictly below both neighbours
    ([5.0, 5.0, 5.0, 5.0], None),  # flat
    ([5.0, 2.0, 2.0, 1.0, 4.0], 4),  # plateau, then a strict minimum
    ([3.0, 3.0, 2.0, 3.0], 3),
    ([9.0, 1.0, 9.0], 2),  # the earliest possible switch
])
def test_dtp_switch_step(d: list[float], expected: int | None) -> None:
    assert dtp_switch_step(d) == expected


def run_schedule(schedule, d: torch.Tensor, timesteps: list[float]) -> torch.Tensor:
    """Call a schedule as the sampler does: step by step, with the history up to the current step."""
    return torch.stack([schedule(k, t, d[:, : k + 1]) for k, t in enumerate(timesteps)], dim=1)


def test_dtp_schedule_switches_online_at_dtp_switch_step() -> None:
    rng = random.Random(0)
    d = torch.tensor([[rng.choice([1.0, 2.0, 3.0]) for _ in range(12)] for _ in range(200)])
    scales = run_schedule(DynamicTransition(scale=7.5, opposite=2.0), d, list(range(12)))
    for row, s in zip(d.tolist(), scales.tolist()):
        k = dtp_switch_step(row)
        assert s == ([-2.0] * 12 if k is None else [-2.0] * k + [7.5] * (12 - k))
        assert transition_step(s) == k


def test_dtp_never_looks_ahead() -> None:
    schedule = DynamicTransition(scale=7.5)
    d = torch.tensor([[5.0, 1.0, 2.0]])
    assert schedule(1, 0.0, d[:, :2]).item() == 0.0  # the minimum at step 1 is only known at step 2
    assert schedule(2, 0.0, d).item() == 7.5


def test_static_and_interval_rules() -> None:
    timesteps = [999.0, 800.0, 600.0, 500.0, 499.0, 100.0, 0.0]
    d = torch.ones(2, len(timesteps))
    assert run_schedule(StaticTransition(tau=500, scale=7.5), d, timesteps)[0].tolist() == [0, 0, 0, 7.5, 7.5, 7.5, 7.5]
    assert run_schedule(StaticTransition(tau=500, scale=7.5, opposite=7.5), d, timesteps)[1].tolist() == [
        -7.5, -7.5, -7.5, 7.5, 7.5, 7.5, 7.5]
    assert run_schedule(Interval(t_hi=700, t_lo=100, scale=5.0), d, timesteps)[0].tolist() == [0, 0, 5, 5, 5, 5, 0]
    assert run_schedule(Constant(7.5), d, timesteps).unique().tolist() == [7.5]
    assert transition_step(run_schedule(Constant(0.0), d, timesteps)[0].tolist()) is None
    assert transition_step(run_schedule(Constant(7.5), d, timesteps)[0].tolist()) == 0


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Constant(-1.0), "scale=-1.0 is negative"),
    (lambda: DynamicTransition(7.5, opposite=-2.0), "opposite=-2.0 is negative"),
    (lambda: StaticTransition(500, float("nan")), "scale=nan is negative"),
    (lambda: Interval(100, 700, 7.5), "t_lo=700 is greater than t_hi=100"),
])
def test_bad_parameters_are_named(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_timestep_range_is_checked() -> None:
    StaticTransition(999, 7.5).check_timesteps(1000)
    with pytest.raises(ValueError, match=r"tau=1000.0 is outside the scheduler's timestep range \[0, 999\]"):
        StaticTransition(1000, 7.5).check_timesteps(1000)
    with pytest.raises(ValueError, match="t_lo=-1.0"):
        Interval(700, -1, 7.5).check_timesteps(1000)


def test_detection_score_is_the_mean_norm_of_the_first_steps() -> None:
    d = torch.tensor([[4.0, 16.0, 100.0], [9.0, 1.0, 0.0]])
    assert detection_score(d).tolist() == [2.0, 3.0]
    assert detection_score(d, 2).tolist() == [3.0, 2.0]


def test_auto_decides_per_sample_at_detect_step_then_follows_inner_or_cfg() -> None:
    # sample 0: memorized (large first-step norm), with a local minimum of d at step 3; sample 1: not memorized
    d = torch.tensor([[100.0, 90.0, 40.0, 30.0, 50.0, 60.0], [1.0, 2.0, 1.0, 3.0, 4.0, 5.0]])
    inner = DynamicTransition(scale=7.5, opposite=7.5)
    scales = run_schedule(Auto(inner, scale=7.5, threshold=5.0), d, list(range(6)))
    assert scales[0].tolist() == [-7.5] * 4 + [7.5] * 2  # og_dtp from the first step: switch one after the minimum
    assert scales[1].tolist() == [7.5] * 6  # plain CFG, although its d has a local minimum
    assert Auto(inner, 7.5, threshold=5.0).decisions(d) == ["mitigated", "cfg"]
    # detect at step 2 on the mean norm of steps 0..2: CFG until then; sample 1 (mean 1.14) stays under 5
    late = run_schedule(Auto(inner, scale=7.5, threshold=5.0, detect_step=2), d, list(range(6)))
    assert late[0].tolist() == [7.5, 7.5, -7.5, -7.5, 7.5, 7.5] and late[1].tolist() == [7.5] * 6
    assert Auto(inner, 7.5, threshold=5.0, detect_step=2).decisions(d[:, :2]) == [None, None]
    # a threshold above every score: CFG for all, i.e. mitigation=none
    assert run_schedule(Auto(inner, 7.5, threshold=1e9), d, list(range(6))).eq(7.5).all()


def test_auto_is_stateless_between_batches() -> None:
    schedule = Auto(StaticTransition(tau=2, scale=7.5), scale=7.5, threshold=5.0)
    first = run_schedule(schedule, torch.tensor([[100.0, 1.0, 1.0, 1.0]]), [3.0, 2.0, 1.0, 0.0])
    second = run_schedule(schedule, torch.tensor([[1.0, 1.0, 1.0, 1.0]]), [3.0, 2.0, 1.0, 0.0])
    assert first.tolist() == [[0.0, 7.5, 7.5, 7.5]] and second.tolist() == [[7.5] * 4]


def test_auto_without_threshold_or_calibration_names_the_key(tmp_path) -> None:
    from memguard.errors import UserError

    with pytest.raises(UserError, match="mitigation.auto.threshold is not set .* memguard calibrate"):
        Auto(Constant(7.5), 7.5, threshold=None, calibration=str(tmp_path / "none.json"))
    (tmp_path / "c.json").write_text('{"threshold": 2.5, "detect_step": 0}')
    assert Auto(Constant(7.5), 7.5, threshold=None, calibration=str(tmp_path / "c.json")).threshold == 2.5
    with pytest.raises(UserError, match="detect_step=0, not mitigation.auto.detect_step=3"):
        Auto(Constant(7.5), 7.5, threshold=None, detect_step=3, calibration=str(tmp_path / "c.json"))


def test_dtp_margin_names_a_near_tie() -> None:
    from tests.numerics import TIE, assert_away_from_dtp_ties, dtp_margin

    assert dtp_margin([9.0, 4.0, 8.0, 1.0]) == pytest.approx(4 / 8)  # stops at the switch (k = 2): 9>4, 4<8
    assert dtp_margin([5.0, 4.0, 4.0 * (1 + 1e-6), 9.0]) < TIE  # 4 vs 4.000004 decides the switch: a tie
    with pytest.raises(AssertionError, match="near-tie"):
        assert_away_from_dtp_ties([[5.0, 4.0, 4.0 * (1 + 1e-6), 9.0]])
