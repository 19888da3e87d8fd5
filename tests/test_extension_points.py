"""The loop's extension points (memguard.mitigations): each is called at its place, per sample, and a slot that
changes nothing leaves the images as they were; the cost a slot reports reaches the run's records."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor

from memguard.mitigations import Baselines
from memguard.families import as_family
from memguard.guidance import Constant
from memguard.mitigations import Branches, NoiseAdjustment, Start
from memguard.sampling import generate_images

PROMPTS, SEEDS, STEPS = ["a red circle", "a blue square on a white background"], [0, 1], 3


class Unchanged(Branches):
    """A third branch with the prompt itself, and plain CFG: what two branches give."""

    def conditions(self, family, prompts, size):
        return [family.encode(prompts, size)]

    def combine(self, eps_u: Tensor, eps_c: Tensor, extra: list[Tensor], scale: Tensor, step: int,
                a: float = 1.0) -> Tensor:
        assert torch.allclose(extra[0], eps_c, atol=1e-5)
        return eps_u + scale.view(-1, 1, 1, 1) * (extra[0] - eps_u)


class Shift(NoiseAdjustment):
    """x_T + offset * seed, with one 'evaluation' per image reported."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self, family, latents: Tensor, start: Start, cond, uncond, *, prompts, seeds):
        assert start.t == start.scheduler.timesteps[0] and len(prompts) == len(seeds) == len(latents)
        shift = torch.tensor(seeds, dtype=latents.dtype).view(-1, 1, 1, 1) * self.offset
        return latents + shift, {"unet_evals_before": torch.full((len(seeds),), 7)}


def _images(components, baselines: Baselines | None, prompts=PROMPTS, seeds=SEEDS):
    return generate_images(components, components.scheduler, Constant(7.5), prompts, seeds, STEPS,
                           baselines=baselines)


def test_a_third_branch_combined_as_cfg_gives_the_two_branch_images(tiny_components) -> None:
    plain, two = _images(tiny_components, None)
    three, traj = _images(tiny_components, Baselines(branches=Unchanged()))
    assert torch.allclose(plain, three, atol=1e-5)
    assert two.unet_evals == 2 * STEPS and traj.unet_evals == 3 * STEPS
    assert torch.allclose(two.d, traj.d, rtol=1e-4)


def test_a_noise_adjustment_is_applied_per_image(tiny_components) -> None:
    plain, _ = _images(tiny_components, None)
    none, _ = _images(tiny_components, Baselines(noise=Shift(0.0)))
    moved, traj = _images(tiny_components, Baselines(noise=Shift(0.5)))
    assert torch.allclose(plain, none, atol=1e-6)
    assert torch.allclose(plain[0], moved[0], atol=1e-6) and not torch.allclose(plain[1], moved[1], atol=1e-3)
    alone, _ = _images(tiny_components, Baselines(noise=Shift(0.5)), PROMPTS[1:], SEEDS[1:])
    assert torch.allclose(moved[1], alone[0], atol=1e-5)  # per image: the same alone as in a batch
    assert traj.info["unet_evals_before"].tolist() == [7, 7]
    from memguard.mitigations.wen import WenEmbeddingOptimization

    both = Baselines(noise=Shift(0.5), embedding=WenEmbeddingOptimization(l_target=1e9, max_iters=0))
    assert _images(tiny_components, both)[1].info["unet_evals_before"].tolist() == [7 + 2, 7 + 2]  # costs add up


def test_a_slot_for_other_families_is_refused_in_one_line() -> None:
    from memguard.errors import UserError
    from memguard.families.dit import DiT

    class SdOnly(Shift):
        families = ("sd",)

    with pytest.raises(UserError, match=r"mitigation=x: mitigation.noise serves the sd family, not dit"):
        DiT.check_baselines(Baselines(noise=SdOnly(0.0)), "x")


def test_a_run_records_the_slot_cost_per_image(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    from memguard.runner import run
    from tests.test_run import config

    run(config(tiny_model_dir, tmp_path / "r", "mitigation=none", "+mitigation.noise._target_=tests.test_extension_points.Shift"))
    rows = pd.read_csv(tmp_path / "r" / "generations.csv")
    assert (rows.unet_evals_before == 7).all()
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["unet_evals_per_image"] == pytest.approx(7 + 2 * metrics["steps"])


@pytest.mark.parametrize("overrides", [["mitigation=han_per_sample", "mitigation.noise.iterations=2", "mitigation.noise.target=null"],
                                       ["mitigation=sail", "mitigation.noise.threshold=0", "mitigation.noise.max_rounds=1",
                                        "mitigation.noise.max_steps=2", "mitigation.noise.budget=2"],
                                       ["mitigation=wen_l1_per_image", "mitigation.embedding.max_iters=2",
                                        "mitigation.embedding.l_target=1e-6"],
                                       ["mitigation=prss", "mitigation.embedding.max_iters=2",
                                        "mitigation.embedding.l_target=1e-6"]])
def test_a_slot_that_optimises_also_runs_when_sampling_is_under_no_grad(tiny_components, overrides) -> None:
    """scripts/bench/sampling.py (and any caller) may sample under torch.no_grad(): an optimisation before sampling
    still takes its gradients."""
    from memguard.runner import build_baselines, build_schedule
    from tests.test_configs import compose_config

    cfg = compose_config(overrides)
    family = type(as_family(tiny_components))
    schedule, baselines = build_schedule(cfg, 1000), build_baselines(cfg, family)
    with torch.no_grad():
        images, traj = generate_images(tiny_components, tiny_components.scheduler, schedule, PROMPTS, SEEDS, 2,
                                       baselines=baselines)
    assert torch.isfinite(images).all() and (traj.info["unet_evals_before"] > 2).all()
