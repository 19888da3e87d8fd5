"""The basin study's core: branches of one shared prefix, their cost, the empirical transition step."""

from __future__ import annotations

import diffusers
import pytest
import torch

from memguard.basin import CfgFrom, branch, check_starts, empirical_transition
from memguard.errors import UserError
from memguard.families.sd import encode_prompts
from memguard.sampling import initial_noise, sample


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


def test_basin_on_the_tiny_scenario(tmp_path) -> None:
    """A reduced grid of the task: 2 seeds, 6 steps, 3 starts; files, copies, transitions, resume, batch size."""
    import json

    import numpy as np
    import pandas as pd
    from PIL import Image

    from memguard.basin import basin
    from tests.test_configs import compose_config

    def cfg(run: str, *extra: str):
        return compose_config(["scenario=tiny", "seeds=[0,1]", "sampler.steps=6", "basin.starts=[0,2,4]",
                               f"paths.output_dir={tmp_path}", f"run_dir={tmp_path}/{run}", "progress=false", *extra])

    metrics = basin(cfg("a", "batch_size=64"))
    folder = tmp_path / "a"
    for name in ("basin.csv", "transitions.csv", "metrics.json", "basin.png"):
        assert (folder / name).is_file(), name
    branches, transitions = pd.read_csv(folder / "basin.csv"), pd.read_csv(folder / "transitions.csv")
    assert len(branches) == 14 * 2 * 3 and len(transitions) == 14 * 2
    threshold = metrics["copy_rule"]["threshold"]
    assert (branches["copy"] == (branches.similarity > threshold)).all() and "alignment" in branches
    for row in transitions.itertuples():
        rows = branches[(branches.prompt_idx == row.prompt_idx) & (branches.seed == row.seed)].sort_values("start")
        expected = empirical_transition([0, 2, 4], rows["copy"].tolist())
        assert (None if pd.isna(row.empirical_step) else int(row.empirical_step)) == expected
    assert metrics["unet_evaluations"]["measured_now"] == 28 * (6 + 6 + 4 + 2)
    assert json.loads((folder / "metrics.json").read_text())["transitions"]["all"]["images"] == 28

    again = basin(cfg("a", "batch_size=64"))  # resumes: nothing made
    assert again["unet_evaluations"]["measured_now"] == 0
    basin(cfg("b", "batch_size=5", "seeds=[1]"))  # other batches: the same images
    for path in (tmp_path / "b" / "images").glob("*.png"):
        one, other = (np.asarray(Image.open(tmp_path / f / "images" / path.name), dtype=int) for f in ("a", "b"))
        assert np.abs(one - other).max() <= 1
    with pytest.raises(UserError, match="basin.opposite"):
        basin(cfg("a", "basin.opposite=7.5"))
    with pytest.raises(UserError, match=r"basin.starts=\[4, 2\]"):
        basin(cfg("c", "basin.starts=[4,2]"))
    with pytest.raises(UserError, match="mitigation=dtp does not apply"):
        basin(cfg("c", "mitigation=dtp"))
