"""The basin study's core: branches of one shared prefix, their cost, the empirical transition step."""

from __future__ import annotations

import diffusers
import pytest
import torch

from memguard.basin import CfgFrom, branch, check_starts, empirical_transition
from memguard.errors import UserError
from memguard.sampling import encode_prompts, initial_noise, sample


def test_branches_equal_independent_runs_at_a_fraction_of_the_cost(tiny_components) -> None:
    steps, starts = 6, [0, 2, 4]
    cond = encode_prompts(tiny_components, ["a cat", "a dog"])
    uncond = encode_prompts(tiny_components, [""]).expand_as(cond)
    noise = initial_noise([3, 4], (4, 16, 16))
    config = tiny_components.scheduler.config
    result = branch(tiny_components.unet, diffusers.DPMSolverMultistepScheduler.from_config(config), cond, uncond,
                    noise, starts, steps, 7.5, opposite=2.0)
    assert result.evaluations == 2 * (steps + sum(steps - k for k in starts))  # 2 images x (6 + 6 + 4 + 2)
    assert torch.all(result.prefix.scale == -2.0)
    for k in starts:
        alone = sample(tiny_components.unet, diffusers.DPMSolverMultistepScheduler.from_config(config), cond, uncond,
                       noise, CfgFrom(k, 7.5, 2.0), steps)
        torch.testing.assert_close(result.branches[k].latents, alone.latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.branches[k].scale, alone.scale)
        torch.testing.assert_close(result.branches[k].d[:, :k], result.prefix.d[:, :k])


def test_empirical_transition() -> None:
    starts = [0, 5, 10, 15]
    assert empirical_transition(starts, [True, True, False, False]) == 10
    assert empirical_transition(starts, [True, False, True, False]) == 15
    assert empirical_transition(starts, [False] * 4) == 0
    assert empirical_transition(starts, [True] * 4) is None
    assert empirical_transition(starts, [False, False, False, True]) is None


@pytest.mark.parametrize("starts", [[5, 0], [0, 50], [-1, 3], [], [2, 2]])
def test_bad_starts_name_the_key(starts: list[int]) -> None:
    with pytest.raises(UserError, match=r"basin.starts=.* strictly increasing list of steps in \[0, 49\]"):
        check_starts(starts, 50)
