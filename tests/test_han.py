"""Han et al.'s initial-noise adjustment (memguard.mitigations.han) against references written from their code
(hygnhan/init_noise_diffusion_memorization, local_sd_pipeline.py, commit 3a47d7a), per image, through a run.

Tolerances: memguard and the references make the same float32 UNet calls on the same batches ([x, x] with
[null, prompt]), so they agree to rounding (ATOL 1e-5 on latents of norm ~30). A batch changes what the
convolutions see, which moves the denoiser's outputs by float32 rounding (~1e-7): ATOL covers that for the
batch-wise update (measured: at most 3.4e-6 here, under ATEN_CPU_CAPABILITY default, avx2 and native). AdamW
(per-sample) divides each element's step by the root of its own mean squared gradient, so an element whose gradient
is near zero turns that rounding into a larger step difference; measured at lr 0.01 on these components (same three
capabilities, a few of the 1024 elements): at most 1.8e-5 after 4 steps (the tests), 8e-5 after 50 steps, hence
ADAM_ATOL 1e-4 for the per-sample latents; its norms agree to 1e-5 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor

from memguard.mitigations import Baselines
from memguard.errors import UserError, instantiate_checked
from memguard.families import as_family, random_family
from memguard.guidance import Constant, DelayedStart, transition_step
from memguard.mitigations import Start
from memguard.mitigations.han import HanBatchWise, HanPerSample
from memguard.runner import run
from memguard.sampling import decode, generate_images, prepare_batch, sample
from tests.test_configs import compose_config
from tests.test_run import config

PROMPTS, SEEDS, STEPS = ["a red circle", "a blue square on a white background", "a green dot"], [0, 1, 2], 4
ATOL, ADAM_ATOL = 1e-5, 1e-4


def _batch(components, prompts=PROMPTS, seeds=SEEDS):
    """The batch as generate_images prepares it: the family, conditions, x_T and the first step's Start."""
    family = as_family(components)
    cond, uncond, noise = prepare_batch(family, prompts, seeds)
    scheduler = components.scheduler
    scheduler.set_timesteps(STEPS)
    a, b = family.eps_coefficients(scheduler)
    start = Start(scheduler, scheduler.timesteps[0], float(scheduler.init_noise_sigma), a[0], b[0])
    return family, cond, uncond, noise * start.sigma, start


def _their_batch_wise(unet, latents: Tensor, t: Tensor, prompt_embeds: Tensor, adj_iters: int, rho: float,
                      gamma: float) -> Tensor:
    """adj_init_noise_batch_wise as their code writes it (lines 245-274): raw UNet on cat([latents] * 2) with
    [negative, prompt] embeddings at timesteps[0], no scale_model_input."""
    for _ in range(adj_iters):
        out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        out_uncond, out_text = out.chunk(2)
        eps_tilde = out_text - out_uncond
        magnitude = torch.sqrt(torch.sum(eps_tilde ** 2, dim=(1, 2, 3), keepdim=True))
        shifted = latents + rho * (eps_tilde / magnitude)
        out = unet(torch.cat([shifted] * 2), t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        out_uncond_shifted, out_text_shifted = out.chunk(2)
        latents = latents - gamma * ((out_text_shifted - out_uncond_shifted) - eps_tilde)
    return latents


def _their_per_sample(unet, scheduler, latent: Tensor, t: Tensor, prompt_embed: Tensor, lr: float,
                      optim_iters: int, target_loss: float | None) -> tuple[Tensor, list[float]]:
    """adj_init_noise_per_sample's loop (lines 318-357) for one image: AdamW on the latent, loss
    torch.norm(eps_c - eps_u, p=2).mean(), stop check before each step. Returns the latent and the losses seen."""
    latent = latent.clone()
    latent.requires_grad = True
    optimizer = torch.optim.AdamW([latent], lr=lr)
    losses = []
    for _ in range(optim_iters):
        x_in = scheduler.scale_model_input(torch.cat([latent] * 2), t)
        out_uncond, out_text = unet(x_in, t, encoder_hidden_states=prompt_embed, return_dict=False)[0].chunk(2)
        loss = torch.norm(out_text - out_uncond, p=2).mean()
        losses.append(loss.item())
        if target_loss is not None and loss.item() <= target_loss:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return latent.detach(), losses


def _embeddings(cond, uncond) -> Tensor:
    return torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])


# -- the batch-wise update ------------------------------------------------------------------------------------
@pytest.mark.parametrize("iterations, rho, gamma", [(2, 50.0, 0.7), (3, 2.0, 1.5)])
def test_batch_wise_matches_a_reference_written_from_their_code(tiny_components, iterations, rho, gamma) -> None:
    family, cond, uncond, latents, start = _batch(tiny_components)
    with torch.no_grad():
        theirs = _their_batch_wise(tiny_components.unet, latents, start.t, _embeddings(cond, uncond), iterations,
                                   rho, gamma)
    ours, info = HanBatchWise(iterations, rho, gamma)(family, latents, start, cond, uncond, prompts=PROMPTS,
                                                      seeds=SEEDS)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)
    moved = (theirs - latents).flatten(1).norm(dim=1)
    assert (moved > 100 * ATOL).all()  # the update is large enough for the comparison to see it
    assert info["han_shift_norm"] == pytest.approx(moved.tolist(), rel=1e-4)
    assert info["unet_evals_before"].tolist() == [4 * iterations] * len(SEEDS)
    with torch.no_grad():  # the comparison would see a wrong gamma or sign
        for wrong in (1.1 * gamma, -gamma):
            other = _their_batch_wise(tiny_components.unet, latents, start.t, _embeddings(cond, uncond),
                                      iterations, rho, wrong)
            assert (other - ours).abs().max() > 100 * ATOL


def test_batch_wise_through_generate_images_samples_from_the_adjusted_noise(tiny_components) -> None:
    family, cond, uncond, latents, start = _batch(tiny_components)
    with torch.no_grad():
        adjusted = _their_batch_wise(tiny_components.unet, latents, start.t, _embeddings(cond, uncond), 2, 50.0,
                                     0.7)
    schedule = DelayedStart(1, 7.5)
    expected = decode(family, sample(family, tiny_components.scheduler, cond, uncond, adjusted / start.sigma,
                                     schedule, STEPS).latents)
    images, traj = generate_images(tiny_components, tiny_components.scheduler, schedule, PROMPTS, SEEDS, STEPS,
                                   baselines=Baselines(noise=HanBatchWise()))
    assert torch.allclose(images, expected, atol=ATOL)
    assert traj.scale.tolist() == [[0.0, 0.0, 7.5, 7.5]] * len(SEEDS)  # CFG after step 1
    assert traj.unet_evals == 2 * STEPS and traj.info["unet_evals_before"].tolist() == [8] * len(SEEDS)


def test_eps_units_scale_the_difference_by_a_t(tiny_components) -> None:
    """eps_c - eps_u = a_T (out_c - out_u): the direction of delta is unchanged, the step is gamma a_T."""
    family, cond, uncond, latents, start = _batch(tiny_components)
    start.a, start.b = 0.5, 0.3  # as a v-prediction model's first step would give
    raw, raw_info = HanBatchWise(2, 5.0, 0.35)(family, latents, start, cond, uncond, prompts=PROMPTS, seeds=SEEDS)
    eps, eps_info = HanBatchWise(2, 5.0, 0.7, units="eps")(family, latents, start, cond, uncond, prompts=PROMPTS,
                                                           seeds=SEEDS)
    assert torch.allclose(raw, eps, atol=ATOL)
    assert eps_info["han_first_norm"] == pytest.approx((0.5 * raw_info["han_first_norm"]).tolist(), rel=1e-5)
    start.a = 0.0  # flow matching at sigma = 1: nothing in eps units
    with pytest.raises(UserError, match=r"^mitigation.noise.units=eps: .* use units=raw$"):
        HanBatchWise(units="eps")(family, latents, start, cond, uncond, prompts=PROMPTS, seeds=SEEDS)


# -- the per-sample optimisation ------------------------------------------------------------------------------
def test_per_sample_matches_their_loop_for_one_image(tiny_components) -> None:
    family, cond, uncond, latents, start = _batch(tiny_components, PROMPTS[:1], SEEDS[:1])
    embed = _embeddings(cond, uncond)
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    theirs, losses = _their_per_sample(unet, scheduler, latents, start.t, embed, 0.05, 3, None)
    ours, info = HanPerSample(lr=0.05, iterations=3, target=None)(family, latents, start, cond, uncond,
                                                                  prompts=PROMPTS[:1], seeds=SEEDS[:1])
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0) and (theirs - latents).abs().max() > 100 * ATOL
    assert info["han_iterations"].tolist() == [3]
    assert info["unet_evals_before"].tolist() == [8]  # 3 steps, 4 forward passes of [x, x]
    assert info["han_first_norm"].tolist() == pytest.approx(losses[:1], rel=1e-5)
    assert "han_reached_target" not in info  # target=None: no early stop

    # a target reached after two steps: both stop there, before a third step
    _, seen = _their_per_sample(unet, scheduler, latents, start.t, embed, 0.05, 5, None)
    assert seen[0] > seen[1] > seen[2]
    target = (seen[1] + seen[2]) / 2
    theirs, losses = _their_per_sample(unet, scheduler, latents, start.t, embed, 0.05, 5, target)
    ours, info = HanPerSample(lr=0.05, iterations=5, target=target)(family, latents, start, cond, uncond,
                                                                    prompts=PROMPTS[:1], seeds=SEEDS[:1])
    assert len(losses) == 3 and torch.allclose(ours, theirs, atol=ATOL, rtol=0)
    assert info["han_iterations"].tolist() == [2] and info["han_reached_target"].tolist() == [True]
    assert info["han_final_norm"].tolist() == pytest.approx(losses[-1:], rel=1e-5)
    assert info["unet_evals_before"].tolist() == [6]


def test_per_sample_with_their_lr_lowers_the_norm(tiny_components) -> None:
    family, cond, uncond, latents, start = _batch(tiny_components)
    _, info = HanPerSample(iterations=4, target=None)(family, latents, start, cond, uncond, prompts=PROMPTS,
                                                      seeds=SEEDS)
    assert (info["han_final_norm"] < info["han_first_norm"]).all()


# -- per image ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, atol", [(lambda: HanBatchWise(2, 5.0, 0.7), ATOL),
                                         (lambda: HanPerSample(iterations=4), ADAM_ATOL)])
def test_an_image_gets_the_same_alone_as_in_a_batch(tiny_components, make, atol: float) -> None:
    family, cond, uncond, latents, start = _batch(tiny_components)
    adjustment = make()
    if isinstance(adjustment, HanPerSample):  # a target that some images reach and some do not: freezing is used
        first = HanPerSample(iterations=1, target=None)(family, latents, start, cond, uncond, prompts=PROMPTS,
                                                        seeds=SEEDS)[1]
        adjustment.target = float(((first["han_first_norm"] + first["han_final_norm"]) / 2).median())
    together, info = adjustment(family, latents, start, cond, uncond, prompts=PROMPTS, seeds=SEEDS)
    moved = (together - latents).flatten(1).abs().max(dim=1).values
    if isinstance(adjustment, HanPerSample):
        assert len(set(info["han_iterations"].tolist())) > 1
        moved = moved[info["han_iterations"] > 0]
    assert (moved > 100 * atol).all()  # the images that moved, moved far more than the tolerance
    for i in range(len(SEEDS)):
        f, c, u, x, s = _batch(tiny_components, PROMPTS[i : i + 1], SEEDS[i : i + 1])
        alone, alone_info = adjustment(f, x, s, c, u, prompts=PROMPTS[i : i + 1], seeds=SEEDS[i : i + 1])
        assert torch.allclose(alone[0], together[i], atol=atol, rtol=0)
        assert {k: v[0].item() for k, v in alone_info.items()} == pytest.approx(
            {k: v[i].item() for k, v in info.items()}, rel=1e-5)


def test_the_images_do_not_depend_on_batch_size(tiny_components) -> None:
    han = Baselines(noise=HanPerSample(iterations=2, target=None))
    batch, _ = generate_images(tiny_components, tiny_components.scheduler, Constant(7.5), PROMPTS, SEEDS, STEPS,
                               baselines=han)
    alone, _ = generate_images(tiny_components, tiny_components.scheduler, Constant(7.5), PROMPTS[1:2], SEEDS[1:2],
                               STEPS, baselines=han)
    assert torch.allclose(batch[1], alone[0], atol=ADAM_ATOL)


def test_other_families_are_served_in_raw_units() -> None:
    """DiT: a class-conditional eps model with a null class; the adjustment is per image there too."""
    dit = random_family("dit")
    labels = ["1", "2"]
    cond, uncond, noise = prepare_batch(dit, labels, [0, 1])
    dit.scheduler.set_timesteps(STEPS)
    start = Start(dit.scheduler, dit.scheduler.timesteps[0], 1.0)
    together, _ = HanPerSample(lr=0.1, iterations=2)(dit, noise, start, cond, uncond, prompts=labels, seeds=[0, 1])
    c1, u1, n1 = prepare_batch(dit, labels[1:], [1])
    alone, _ = HanPerSample(lr=0.1, iterations=2)(dit, n1, start, c1, u1, prompts=labels[1:], seeds=[1])
    assert torch.allclose(alone[0], together[1], atol=ATOL) and not torch.allclose(together, noise)
    from memguard.families.sd3 import SD3

    SD3.check_baselines(Baselines(noise=HanBatchWise()), "han")  # raw units: every family
    refusal = r"^mitigation=han: mitigation.noise serves the sd, sdxl, dit families, not sd3;"
    with pytest.raises(UserError, match=refusal):
        SD3.check_baselines(Baselines(noise=HanBatchWise(units="eps")), "han")


# -- the delayed CFG schedule ---------------------------------------------------------------------------------
def test_delayed_start_is_zero_up_to_and_including_its_step() -> None:
    d = torch.zeros(2, 1)
    scales = [DelayedStart(2, 7.5)(k, 999.0 - k, d).tolist() for k in range(5)]
    assert scales == [[0.0, 0.0]] * 3 + [[7.5, 7.5]] * 2
    assert transition_step([s[0] for s in scales]) == 3 and not DelayedStart.needs_d
    assert DelayedStart(0, 7.5)(0, 999.0, d).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("step, scale, message", [
    (-1, 7.5, r"^step=-1 must be an integer >= 0"), (1.5, 7.5, r"^step=1.5 must be"), (True, 7.5, r"^step=True"),
    (4, -1.0, r"^scale=-1.0 is negative"),
])
def test_delayed_start_refuses_bad_values(step, scale, message) -> None:
    with pytest.raises(ValueError, match=message):
        DelayedStart(step, scale)


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mitigation, override, message", [
    ("han", "iterations=0", r"iterations=0 must be an integer >= 1 \(M"),
    ("han", "rho=0", r"rho=0 must be a finite number > 0"),
    ("han", "gamma=-0.7", r"gamma=-0.7 must be a finite number > 0"),
    ("han", "units=v", r"units='v' must be raw"),
    ("han_per_sample", "lr=0", r"lr=0 must be a finite number > 0"),
    ("han_per_sample", "iterations=0", r"iterations=0 must be an integer >= 1 \(the most AdamW steps"),
    ("han_per_sample", "target=-1", r"target=-1 must be >= 0"),
])
def test_bad_values_are_refused_in_one_line_naming_the_key(mitigation, override, message) -> None:
    cfg = compose_config([f"mitigation={mitigation}", f"mitigation.noise.{override}"])
    with pytest.raises(UserError, match=rf"^mitigation\.noise\.{message}") as err:
        instantiate_checked(cfg.mitigation.noise, "mitigation.noise")
    assert "\n" not in str(err.value)


def test_the_yaml_defaults_are_their_code_defaults() -> None:
    han = compose_config(["mitigation=han", "guidance.scale=7"]).mitigation
    noise, schedule = instantiate(han.noise), instantiate(han.schedule)
    assert (noise.iterations, noise.rho, noise.gamma, noise.units) == (2, 50.0, 0.7, "raw")
    assert (type(schedule), schedule.step, schedule.scale) == (DelayedStart, 4, 7.0)
    per = compose_config(["mitigation=han_per_sample"]).mitigation
    noise, schedule = instantiate(per.noise), instantiate(per.schedule)
    assert (noise.lr, noise.iterations, noise.target, noise.units) == (0.01, 1000, 0.9, "raw")
    assert type(schedule) is Constant


# -- a run ----------------------------------------------------------------------------------------------------
def test_a_han_run_records_the_adjustment_and_the_delay(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path, "mitigation=han", "mitigation.schedule.step=2"))
    gens = pd.read_csv(tmp_path / "generations.csv")
    assert {"han_first_norm", "han_shift_norm", "unet_evals_before"} <= set(gens.columns)
    assert (gens.unet_evals_before == 8).all() and (gens.han_shift_norm > 0).all()
    assert (gens.transition_step == 3).all()
    traj = pd.read_csv(tmp_path / "trajectories.csv")
    assert (traj.query("step <= 2").scale == 0).all() and (traj.query("step > 2").scale == 7.5).all()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["unet_evals_per_image"] == pytest.approx(8 + 2 * metrics["steps"])


def test_a_per_sample_run_records_its_iterations(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path, "mitigation=han_per_sample", "mitigation.noise.iterations=2",
               "mitigation.noise.target=null", "mitigation.noise.lr=0.1"))
    gens = pd.read_csv(tmp_path / "generations.csv")
    assert (gens.han_iterations == 2).all() and (gens.unet_evals_before == 6).all()
    traj = pd.read_csv(tmp_path / "trajectories.csv")
    assert (traj.query("step == 0").d.to_numpy() ** 0.5 == pytest.approx(gens.han_final_norm.to_numpy(), rel=1e-4))
    assert (traj.scale == 7.5).all()  # CFG from the first step
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["unet_evals_per_image"] == pytest.approx(6 + 2 * metrics["steps"])
