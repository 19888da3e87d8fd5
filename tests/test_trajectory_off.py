"""trajectory=off: a step whose scale leaves a branch unused evaluates the other branch only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from memguard.components import Components
from memguard.guidance import Constant, DynamicTransition, GuidanceSchedule, Interval, StaticTransition
from memguard.runner import run
from memguard.sampling import generate_images
from tests.test_run import config

PROMPTS, SEEDS, STEPS = ["a red circle", "a blue square"], [3, 4], 10


class CountingUNet(torch.nn.Module):
    """Counts the samples the UNet sees (one per branch and image)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet, self.samples = unet, 0

    def forward(self, x: torch.Tensor, *args, **kwargs):
        self.samples += x.shape[0]
        return self.unet(x, *args, **kwargs)

    def __getattr__(self, name: str):  # dtype, device, config of the UNet
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)


def both(components: Components, schedule: GuidanceSchedule):
    """(images, trajectory, UNet samples) under trajectory=full and trajectory=off."""
    out = []
    for mode in ("full", "off"):
        counting = CountingUNet(components.unet)
        parts = Components(counting, components.vae, components.text_encoder, components.tokenizer,
                           components.scheduler)
        scheduler = DPMSolverMultistepScheduler.from_config(components.scheduler.config)
        images, traj = generate_images(parts, scheduler, schedule, PROMPTS, SEEDS, STEPS, trajectory=mode)
        out.append((images, traj, counting.samples))
    return out


@pytest.mark.parametrize("schedule", [StaticTransition(tau=500, scale=7.5), Constant(0.0), Constant(1.0),
                                      Interval(t_hi=700, t_lo=300, scale=1.0)])
def test_off_skips_the_unused_branch_and_matches_full(tiny_components: Components, schedule: GuidanceSchedule) -> None:
    (images_full, full, n_full), (images_off, off, n_off) = both(tiny_components, schedule)
    assert (images_full - images_off).abs().max() <= 1 / 255
    torch.testing.assert_close(off.scale, full.scale)
    one_branch = ((full.scale == 0) | (full.scale == 1)).all(dim=0)  # steps where a branch is unused
    assert one_branch.any()
    assert full.unet_evals == 2 * STEPS and n_full == 2 * STEPS * len(SEEDS)
    assert off.unet_evals == 2 * STEPS - int(one_branch.sum()) and n_off == off.unet_evals * len(SEEDS)
    assert off.d[:, one_branch].isnan().all() and not off.d[:, ~one_branch].isnan().any()
    torch.testing.assert_close(off.d[:, ~one_branch], full.d[:, ~one_branch], rtol=1e-3, atol=1e-5)
    measured = torch.where(full.scale[0] == 1, off.norm_c[0], off.norm_u[0])  # the branch that was evaluated
    assert not measured.isnan().any()


def test_schedules_that_read_d_keep_both_branches(tiny_components: Components) -> None:
    (_, full, n_full), (images_off, off, n_off) = both(tiny_components, DynamicTransition(7.5))
    assert n_off == n_full and off.unet_evals == 2 * STEPS
    torch.testing.assert_close(off.d, full.d)


def test_run_with_trajectory_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    """d is NaN (an empty CSV cell) where a branch was skipped; tables, figures and metrics still work."""
    for mode in ("full", "off"):
        run(config(tiny_model_dir, tmp_path / mode, "mitigation=stp", f"trajectory={mode}", "sampler.steps=8"))
    for path in (tmp_path / "full" / "images").glob("*.png"):
        a, b = (np.asarray(Image.open(tmp_path / m / "images" / path.name), dtype=int) for m in ("full", "off"))
        assert np.abs(a - b).max() <= 1
    traj = pd.read_csv(tmp_path / "off" / "trajectories.csv")
    before = traj.timestep > 500
    assert before.any() and traj.d[before].isna().all() and traj.d[~before].notna().all()
    assert traj.norm_u[before].notna().all() and traj.norm_c[before].isna().all()
    metrics = {m: json.loads((tmp_path / m / "metrics.json").read_text()) for m in ("full", "off")}
    assert metrics["full"]["unet_evals_per_image"] == 16
    assert metrics["off"]["unet_evals_per_image"] == 16 - before.groupby([traj.prompt_idx, traj.seed]).sum().iloc[0]
    assert metrics["off"]["d_step0_mean"] is None
    assert (tmp_path / "off" / "d_curves.png").is_file() and (tmp_path / "off" / "grid.png").is_file()


def test_bad_trajectory_names_the_key(tiny_model_dir: Path, tmp_path: Path) -> None:
    from memguard.errors import UserError

    with pytest.raises(UserError, match="trajectory='partial' is not one of full"):
        run(config(tiny_model_dir, tmp_path, "trajectory=partial"))
