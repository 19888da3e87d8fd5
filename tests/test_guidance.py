"""Guidance schedules against DESIGN.md section 3, and Algorithm 1's switch step."""

from __future__ import annotations

import random

import pytest
import torch

from memguard.guidance import (
    Constant, DynamicTransition, Interval, StaticTransition, dtp_switch_step, transition_step,
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
