"""The sampling loop against diffusers' StableDiffusionPipeline, and its per-image seeding."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import StableDiffusionPipeline

from memguard.components import Components
from memguard.families.sd import encode_prompts
from memguard.guidance import Constant, DynamicTransition
from memguard.sampling import generate_images, initial_noise, sample
from tests.numerics import assert_away_from_dtp_ties

PROMPTS = ["a red circle on a blue background", "a green square"]
SEEDS = [11, 12]


def memguard_images(components: Components, scheduler, schedule, prompts=PROMPTS, seeds=SEEDS, steps=8):
    return generate_images(components, scheduler, schedule, prompts, seeds, steps)


@pytest.mark.parametrize("scheduler_name", ["DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_none_reproduces_stable_diffusion_pipeline(tiny_components: Components, scheduler_name: str) -> None:
    config = tiny_components.scheduler.config
    scheduler_cls = getattr(diffusers, scheduler_name)
    pipe = StableDiffusionPipeline(
        **{**vars(tiny_components), "scheduler": scheduler_cls.from_config(config)},
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS, num_inference_steps=8, guidance_scale=7.5, output_type="pt",
                    generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS]).images
    ours, _ = memguard_images(tiny_components, scheduler_cls.from_config(config), Constant(7.5))
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4
    # the comparison is sensitive: another guidance scale gives another image
    other, _ = memguard_images(tiny_components, scheduler_cls.from_config(config), Constant(3.0))
    assert (other - expected).abs().max().item() > 1e-3


def test_images_do_not_depend_on_batch_size(tiny_components: Components) -> None:
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(tiny_components.scheduler.config)
    prompts, seeds = ["a cat", "a dog", "a cat"], [1, 2, 3]
    together, traj = memguard_images(tiny_components, scheduler, DynamicTransition(7.5, 7.5), prompts, seeds)
    assert_away_from_dtp_ties(traj.d.tolist())
    for i in range(3):
        alone, traj_i = memguard_images(tiny_components, scheduler, DynamicTransition(7.5, 7.5), prompts[i:i + 1], seeds[i:i + 1])
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(traj_i.scale[0], traj.scale[i])


def test_trajectory_records_d_and_scale(tiny_components: Components) -> None:
    scheduler = diffusers.DDIMScheduler.from_config(tiny_components.scheduler.config)
    seen = []
    cond = encode_prompts(tiny_components, ["a cat"])
    uncond = encode_prompts(tiny_components, [""])
    noise = initial_noise([0], (4, 16, 16))
    traj = sample(tiny_components.unet, scheduler, cond, uncond, noise, Constant(0.0), 5, callback=seen.append)
    assert traj.d.shape == traj.scale.shape == (1, 5)
    assert [s["step"] for s in seen] == list(range(5))
    for step in seen:
        expected = (step["eps_c"] - step["eps_u"]).flatten(1).pow(2).sum(1)
        torch.testing.assert_close(step["d"], expected)
        torch.testing.assert_close(traj.norm_c[:, step["step"]], step["eps_c"].flatten(1).norm(dim=1))
        torch.testing.assert_close(traj.norm_u[:, step["step"]], step["eps_u"].flatten(1).norm(dim=1))
    assert torch.all(traj.d > 0) and torch.all(traj.scale == 0)
    assert traj.timesteps == [float(t) for t in scheduler.timesteps]


def test_d_is_in_eps_units_for_v_prediction_models(tiny_components) -> None:
    scheduler = diffusers.DDIMScheduler.from_config(tiny_components.scheduler.config, prediction_type="v_prediction")
    cond = encode_prompts(tiny_components, ["a red circle"])
    seen = []
    traj = sample(tiny_components.unet, scheduler, cond, encode_prompts(tiny_components, [""]),
                  initial_noise([0], (4, 16, 16)), Constant(7.5), 3, seen.append)
    for step in seen:
        raw = (step["eps_c"] - step["eps_u"]).pow(2).sum().item()
        abar = float(scheduler.alphas_cumprod[int(step["timestep"])])
        assert step["d"].item() == pytest.approx(abar * raw, rel=1e-5)  # eps_c - eps_u = sqrt(abar) (v_c - v_u)
        # eps from v as diffusers' DDIM converts it: eps = sqrt(abar) v + sqrt(1 - abar) x_t
        eps_c = abar ** 0.5 * step["eps_c"] + (1 - abar) ** 0.5 * step["x"]
        assert traj.norm_c[0, step["step"]].item() == pytest.approx(eps_c.norm().item(), rel=1e-5)


@pytest.mark.parametrize("opposite", [0.0, 7.5])
def test_branch_from_a_shared_prefix_equals_an_independent_run(tiny_components: Components, opposite: float) -> None:
    """CFG started at step k, continued from the zero-guidance (or opposite-guidance) prefix's latents and a
    copy of its DPM-Solver state, equals an independent run of the schedule that starts CFG at step k."""
    import copy

    from memguard.guidance import StaticTransition

    steps, k = 8, 3
    unet = tiny_components.unet
    cond = encode_prompts(tiny_components, PROMPTS)
    uncond = encode_prompts(tiny_components, [""]).expand_as(cond)
    noise = initial_noise(SEEDS, (4, 16, 16))
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(tiny_components.scheduler.config)
    kept = {}

    def snapshot(state) -> None:
        if state["step"] == k:
            kept["x"], kept["scheduler"] = state["x"].clone(), copy.deepcopy(scheduler)

    never = StaticTransition(tau=0, scale=7.5, opposite=opposite)  # t <= 0 is never reached in 8 steps
    prefix = sample(unet, scheduler, cond, uncond, noise, never, steps, callback=snapshot)
    tau = prefix.timesteps[k]  # t <= tau from step k on: the independent run's "CFG from step k"
    branch = sample(unet, kept["scheduler"], cond, uncond, kept["x"], StaticTransition(tau, 7.5, opposite), steps,
                    start=k, prefix=prefix)
    fresh = diffusers.DPMSolverMultistepScheduler.from_config(tiny_components.scheduler.config)
    alone = sample(unet, fresh, cond, uncond, noise, StaticTransition(tau, 7.5, opposite), steps)
    torch.testing.assert_close(branch.latents, alone.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(branch.d, alone.d, atol=0, rtol=1e-5)
    torch.testing.assert_close(branch.scale, alone.scale)
    assert (branch.latents - prefix.latents).abs().max() > 1e-3  # the branch did change the image
    reset = diffusers.DPMSolverMultistepScheduler.from_config(tiny_components.scheduler.config)
    reset.set_timesteps(steps)  # right timesteps, but without the solver's history at step k
    stale = sample(unet, reset, cond, uncond, kept["x"], StaticTransition(tau, 7.5, opposite), steps,
                   start=k, prefix=prefix)
    assert (stale.latents - alone.latents).abs().max() > 1e-4
