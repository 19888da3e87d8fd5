"""SAIL (memguard.mitigations.sail): the search as the authors' code runs it, per-image seeds, the threshold
schedule and its cap, the run's records, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor

from memguard.mitigations import Baselines
from memguard.errors import UserError, instantiate_checked
from memguard.families import as_family
from memguard.guidance import Constant
from memguard.mitigations import Start
from memguard.mitigations.sail import SAIL
from memguard.sampling import generate_images, prepare_batch

PROMPT, SHAPE = "a red circle", (4, 16, 16)


def _setup(components, prompts: list[str], seeds: list[int], steps: int = 6, prediction: str | None = None):
    """The family, the first step as generate_images prepares it, and the batch's conditions and unit noise
    (``prediction``: the scheduler's prediction type, default the model's own, epsilon)."""
    from diffusers import DDIMScheduler

    family = as_family(components)
    config = dict(components.scheduler.config) | ({"prediction_type": prediction} if prediction else {})
    scheduler = DDIMScheduler.from_config(config)
    cond, uncond, noise = prepare_batch(family, prompts, seeds)
    scheduler.set_timesteps(steps)
    a, b = family.eps_coefficients(scheduler)
    start = Start(scheduler, scheduler.timesteps[0], float(scheduler.init_noise_sigma), a[0], b[0])
    return family, start, cond, uncond, noise


def _their_search(unet, scheduler, t: Tensor, uncond: Tensor, cond: Tensor, seed: int, wanted: int, budget: int,
                  lr: float, thres: float, max_steps: int, v_model: bool) -> tuple[list[tuple[Tensor, float]], float]:
    """The mitigation block of Dongjae0324/sharpness_memorization_diffusion (local_model/pipe.py lines 505-584,
    commit f4ee4b8), written from their code for this test: the global RNG seeded each round and the candidates
    drawn from it (here in float32 and cast to the model's dtype; theirs: the default dtype, bfloat16), the
    [null, condition] batch built once per round from the round's first draw, a unit direction in "eps" units
    (v models: their ``(x - sqrt(abar) v) / sqrt(1 - abar)``), the perturbed call at the current latents, the
    penalty 0.05 (eps) or 0.01 (v) of ||lat||, the check before each Adam step (views of lat kept), every 3rd failed
    round the threshold + 0.1 and a new seed from ``randint(0, 50000)``. Returns the first ``wanted`` (latent,
    loss) and the final threshold."""
    dtype = unet.dtype
    gamma = 0.01 if v_model else 0.05
    abar = scheduler.alphas_cumprod[t].to(dtype)
    beta, beta_prod = abar.sqrt(), (1 - abar).sqrt()
    to_eps = (lambda out, x: (x - beta * out) / beta_prod) if v_model else (lambda out, x: out)
    embeddings = torch.cat([uncond] * budget + [cond] * budget)
    found: list[tuple[Tensor, float]] = []
    failed = 0
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        while True:
            torch.manual_seed(seed)
            lat = torch.randn((budget, *SHAPE)).to(dtype).requires_grad_(True)
            doubled = torch.cat([scheduler.scale_model_input(lat, t)] * 2)
            optimizer = torch.optim.Adam([lat], lr=lr)
            recorded = torch.tensor([], dtype=torch.long)
            for _ in range(max_steps):
                eps_u, eps_c = to_eps(unet(doubled, t, encoder_hidden_states=embeddings).sample, doubled).chunk(2)
                direction = (eps_c - eps_u) / (eps_c - eps_u).view(budget, -1).norm(dim=1)[:, None, None, None]
                moved = torch.cat([lat + direction] * 2)
                eps_u, eps_c = to_eps(unet(moved, t, encoder_hidden_states=embeddings).sample, moved).chunk(2)
                loss = (eps_c - eps_u).view(budget, -1).norm(dim=1) + gamma * lat.view(budget, -1).norm(dim=1)
                merged = torch.cat([recorded, torch.where(loss <= thres)[0]]).unique()
                if len(merged) > len(recorded):
                    found += [(lat[i].detach(), float(loss[i].detach())) for i in merged[~torch.isin(merged, recorded)]]
                    recorded = merged
                    if len(found) >= wanted:
                        return [(z.clone(), loss) for z, loss in found[:wanted]], thres
                loss.sum().backward()
                optimizer.step()
                optimizer.zero_grad()
            failed += 1
            if failed % 3 == 0:
                thres += 0.1
                seed = int(torch.randint(0, 50000, (1,)).item())


@pytest.fixture(scope="module")
def tiny64(tiny_components):
    """The tiny components in float64, so the comparison with the reference does not depend on the CPU: Adam's
    first step moves an element by ``lr g / (|g| + 1e-8)``, whose slope near ``g = 0`` is up to 1e8; float64's
    rounding (~1e-16 of the gradient's terms) then moves a latent by far less than ``atol``, float32's would not."""
    return copy.deepcopy(tiny_components).to("cpu", torch.float64)


# Measured differences to the reference: up to 2e-13 in the latents, 3e-15 in the losses (float64, the same
# operations, gradients summed in another order); atol 1e-9 is four orders above them and far below what a wrong
# direction or penalty moves (Adam moves an element by up to lr = 0.05 a step).
ATOL = 1e-9


@pytest.mark.parametrize(("threshold", "max_steps", "least_rounds"), [(2.05, 4, 1), (1.9, 3, 4)])
def test_the_search_is_their_code_for_one_image(tiny64, threshold: float, max_steps: int, least_rounds: int) -> None:
    """One image, where their pool (one prompt, ``images_per_prompt`` 1, ``gen_seed`` the image's seed) and
    memguard's coincide: the same latent and loss; the second case needs a raise and a re-seed."""
    family, start, cond, uncond, noise = _setup(tiny64, [PROMPT], [11])
    sail = SAIL(threshold=threshold, budget=3, lr=0.05, max_steps=max_steps)
    latents, info = sail(family, noise * start.sigma, start, cond, uncond, prompts=[PROMPT], seeds=[11])
    found, thres = _their_search(tiny64.unet, start.scheduler, start.t, uncond["encoder_hidden_states"],
                                 cond["encoder_hidden_states"], 11, 1, 3, 0.05, threshold, max_steps, False)
    (want, loss), = found
    assert latents.dtype == torch.float64 and torch.allclose(latents[0], want, rtol=0, atol=ATOL)
    assert float(info["sail_final_loss"][0]) == pytest.approx(loss, rel=0, abs=ATOL)
    assert float(info["sail_threshold"][0]) == pytest.approx(thres, abs=1e-12)
    assert int(info["sail_rounds"][0]) >= least_rounds and not bool(info["sail_capped"][0])
    assert (latents[0] - noise[0]).abs().max() > 0.1  # a search happened: not the image's own noise
    assert float(info["sail_final_loss"][0]) <= thres


def test_the_direction_at_the_current_latent_is_not_their_code(tiny64) -> None:
    """Their ``lat_single`` is built once per round (pipe.py line 523): the direction comes from the round's first
    draw. ``direction=current`` takes it at the current latent, and the search then ends elsewhere."""
    family, start, cond, uncond, noise = _setup(tiny64, [PROMPT], [11])
    their = _their_search(tiny64.unet, start.scheduler, start.t, uncond["encoder_hidden_states"],
                          cond["encoder_hidden_states"], 11, 1, 3, 0.05, 2.05, 4, False)[0][0][0]
    latents, _ = SAIL(threshold=2.05, budget=3, max_steps=4, direction="current")(
        family, noise, start, cond, uncond, prompts=[PROMPT], seeds=[11])
    assert not torch.allclose(latents[0], their, atol=1e-4)


def test_a_v_model_in_their_units_is_their_code_and_in_eps_units_differs_by_their_factor(tiny64) -> None:
    """v-prediction: ``v_units=their_code`` reproduces their SD 2 branch (pipe.py lines 531, 545, penalty 0.01);
    eps units are ``sqrt(abar) v + sqrt(1 - abar) x`` (Start), so their Delta is ``-Delta_eps / sqrt(1 - abar)``."""
    family, start, cond, uncond, noise = _setup(tiny64, [PROMPT], [11], prediction="v_prediction")
    assert start.b > 0 and SAIL().coefficient(start) == 0.01
    sail = SAIL(threshold=0.39, budget=3, max_steps=5, v_units="their_code")
    latents, info = sail(family, noise, start, cond, uncond, prompts=[PROMPT], seeds=[11])
    (want, loss), = _their_search(tiny64.unet, start.scheduler, start.t, uncond["encoder_hidden_states"],
                                  cond["encoder_hidden_states"], 11, 1, 3, 0.05, 0.39, 5, True)[0]
    assert torch.allclose(latents[0], want, rtol=0, atol=ATOL)
    assert float(info["sail_final_loss"][0]) == pytest.approx(loss, abs=ATOL) and int(info["sail_steps"][0]) == 3

    z = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    both = {k: torch.cat([uncond[k].expand(3, -1, -1), cond[k].expand(3, -1, -1)]) for k in cond}
    theirs = sail.difference(family, start, z, both)
    exact = SAIL(v_units="eps").difference(family, start, z, both)
    abar = float(start.scheduler.alphas_cumprod[int(start.t)])
    v = family(torch.cat([z, z]), start.t, both)
    assert torch.allclose(exact, abar ** 0.5 * (v[3:] - v[:3]), atol=1e-12)  # eps_c - eps_u = sqrt(abar) (v_c - v_u)
    assert torch.allclose(theirs, -exact / (1 - abar) ** 0.5, atol=1e-12)


def test_their_pool_per_prompt_keeps_the_first_latents_found_as_their_code(tiny64) -> None:
    """``pool=prompt``: one pool for the prompt's two images, seeded with the first seed; the first two latents
    found, each taken as their list holds it (a view of the optimised tensor); the pool's cost shared out."""
    family, start, cond, uncond, noise = _setup(tiny64, [PROMPT, PROMPT], [5, 7])
    sail = SAIL(threshold=2.0, budget=3, max_steps=8, pool="prompt")
    latents, info = sail(family, noise, start, cond, uncond, prompts=[PROMPT] * 2, seeds=[5, 7])
    found, _ = _their_search(tiny64.unet, start.scheduler, start.t, uncond["encoder_hidden_states"][:1],
                             cond["encoder_hidden_states"][:1], 5, 2, 3, 0.05, 2.0, 8, False)
    for k in range(2):
        assert torch.allclose(latents[k], found[k][0], rtol=0, atol=ATOL)
        assert float(info["sail_final_loss"][k]) == pytest.approx(found[k][1], abs=ATOL)
    assert info["sail_steps"][0] < info["sail_steps"][1]  # found at different steps: the view moved with Adam
    search = sail.search(family, start, {k: v[:1] for k, v in cond.items()}, {k: v[:1] for k, v in uncond.items()},
                         5, 2, SHAPE)
    assert info["unet_evals_before"].sum() == search.evals
    second = {k: v[1:] for k, v in cond.items()}, {k: v[1:] for k, v in uncond.items()}
    alone, _ = sail(family, noise[1:], start, *second, prompts=[PROMPT], seeds=[7])
    assert sail.image_set is None and not torch.allclose(alone[0], latents[1])  # without a set: the batch's seeds
    sail.image_set = lambda seed: [5, 7]
    alone, _ = sail(family, noise[1:], start, *second, prompts=[PROMPT], seeds=[7])
    assert torch.equal(alone[0], latents[1])  # the prompt's set (as the runner sets it): the pool's second latent


def test_each_image_is_the_same_alone_and_in_any_batch_order(tiny_components) -> None:
    prompts, seeds = [PROMPT, "a blue square", PROMPT], [3, 4, 5]
    sail = SAIL(threshold=2.1, budget=2, max_steps=3)
    family, start, cond, uncond, noise = _setup(tiny_components, prompts, seeds)
    batch, info = sail(family, noise, start, cond, uncond, prompts=prompts, seeds=seeds)
    assert len(set(info["sail_final_loss"].tolist())) == 3  # three different searches
    for order in ([2, 1, 0], [1], [0], [2]):
        sub = [prompts[i] for i in order], [seeds[i] for i in order]
        family, start, cond, uncond, noise = _setup(tiny_components, *sub)
        latents, sub_info = sail(family, noise, start, cond, uncond, prompts=sub[0], seeds=sub[1])
        assert torch.allclose(latents, batch[order], atol=1e-5)
        for key in ("sail_rounds", "sail_steps", "unet_evals_before"):
            assert sub_info[key].tolist() == info[key][order].tolist()
    images, _ = generate_images(tiny_components, tiny_components.scheduler, Constant(7.5), prompts, seeds, 3,
                                baselines=Baselines(noise=sail))
    alone, _ = generate_images(tiny_components, tiny_components.scheduler, Constant(7.5), prompts[1:2], seeds[1:2],
                               3, baselines=Baselines(noise=sail))
    assert torch.allclose(images[1], alone[0], atol=1e-5)
    plain, _ = generate_images(tiny_components, tiny_components.scheduler, Constant(7.5), prompts, seeds, 3)
    assert (images - plain).abs().max() > 1e-2  # the chosen latents, not the images' own noise


def test_the_threshold_rises_every_three_failed_rounds_and_the_cap_stops_the_search(tiny_components) -> None:
    """An unreachable threshold (0: the loss is a sum of norms): rounds 1-3 at 0 with the image's seed, 4-6 at 0.1
    with the seed their code draws next (``torch.manual_seed(s); torch.randn(...); torch.randint(0, 50000)`` on a
    CPU), 7 at 0.2; the cap (7 rounds) ends it with the last evaluation's lowest-loss candidate."""
    family, start, cond, uncond, noise = _setup(tiny_components, [PROMPT], [9])
    sail = SAIL(threshold=0.0, budget=2, max_steps=1, max_rounds=7)
    one = {k: v[:1] for k, v in cond.items()}, {k: v[:1] for k, v in uncond.items()}
    search = sail.search(family, start, *one, 9, 1, SHAPE)
    with torch.random.fork_rng(devices=[]):
        seeds = [9]
        for _ in range(2):
            torch.manual_seed(seeds[-1])
            torch.randn((2, *SHAPE))
            seeds.append(int(torch.randint(0, 50000, (1,)).item()))
    assert [s for _, s in search.rounds] == [seeds[0]] * 3 + [seeds[1]] * 3 + [seeds[2]]
    assert [t for t, _ in search.rounds] == pytest.approx([0.0] * 3 + [0.1] * 3 + [0.2])
    assert search.capped and search.evals == 7 * 1 * 4 * 2
    six = SAIL(threshold=0.0, budget=2, max_steps=1, max_rounds=6).search(family, start, *one, 9, 1, SHAPE)
    assert six.picks[0].threshold == pytest.approx(0.1)  # the 6th round's threshold, not the raise after it
    latents, info = sail(family, noise, start, *one, prompts=[PROMPT], seeds=[9])
    assert bool(info["sail_capped"][0]) and int(info["sail_rounds"][0]) == 7
    assert float(info["sail_threshold"][0]) == pytest.approx(0.2) and int(info["unet_evals_before"][0]) == 56
    drawn = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(seeds[2]))
    both = {k: torch.cat([one[1][k].expand(2, -1, -1), one[0][k].expand(2, -1, -1)]) for k in one[0]}
    with torch.enable_grad():
        losses = sail.loss(family, start, drawn.clone(), drawn, both, 0.05).detach()
    assert torch.equal(latents[0], drawn[int(losses.argmin())])
    assert float(info["sail_final_loss"][0]) == pytest.approx(float(losses.min()))


def test_a_run_records_the_search_per_image_and_its_cost(tiny_model_dir: Path, tmp_path: Path) -> None:
    from memguard.runner import run
    from tests.test_run import config

    budget, max_steps = 2, 3
    keys = [f"mitigation.noise.budget={budget}", f"mitigation.noise.max_steps={max_steps}",
            "mitigation.noise.threshold=2.1", "mitigation.noise.max_rounds=5"]
    metrics = run(config(tiny_model_dir, tmp_path / "image", "mitigation=sail", *keys))
    rows = pd.read_csv(tmp_path / "image" / "generations.csv")
    for column in ("sail_rounds", "sail_steps", "sail_final_loss", "sail_threshold", "sail_capped", "unet_evals_before"):
        assert column in rows.columns, column
    evaluated = [(r.sail_rounds - 1) * max_steps + r.sail_steps + 1 if not r.sail_capped else r.sail_rounds * max_steps
                 for r in rows.itertuples()]
    assert rows.unet_evals_before.tolist() == [4 * budget * n for n in evaluated]
    assert (rows[~rows.sail_capped].sail_final_loss <= rows[~rows.sail_capped].sail_threshold + 1e-6).all()
    saved = json.loads((tmp_path / "image" / "metrics.json").read_text())
    assert saved["mitigation"] == "sail" and saved == metrics
    assert saved["unet_evals_per_image"] == pytest.approx(2 * saved["steps"] + rows.unet_evals_before.mean())
    assert saved["unet_evals_per_image"] > 2 * saved["steps"]

    run(config(tiny_model_dir, tmp_path / "prompt", "mitigation=sail", *keys, "mitigation.noise.pool=prompt"))
    pooled = pd.read_csv(tmp_path / "prompt" / "generations.csv")
    for _, images in pooled.groupby("prompt_idx"):  # one pool per prompt: its cost split over its two images
        assert images.sail_capped.nunique() == 1 and images.unet_evals_before.max() - images.unet_evals_before.min() <= 1


def test_their_protocol_runs_the_search_in_bfloat16_under_ddim(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``+protocol=authors``: their sampler and dtype (mitigate_mem.py l. 11-12, 34), and the candidates (Adam's
    parameter and so its state) in bfloat16 too, ``mitigation.noise.precision=model`` (tests/test_authors_dtype.py)."""
    from omegaconf import OmegaConf

    from memguard.runner import run
    from tests.test_run import config

    run(config(tiny_model_dir, tmp_path, "+protocol=authors", "mitigation=sail", "sampler.steps=3",
               "mitigation.noise.budget=2", "mitigation.noise.max_steps=2", "mitigation.noise.max_rounds=1"))
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert (saved.sampler.name, saved.dtype, saved.mitigation.noise.precision) == ("ddim", "bfloat16", "model")
    rows = pd.read_csv(tmp_path / "generations.csv")
    assert rows.sail_final_loss.notna().all() and (rows.unet_evals_before > 0).all()


@pytest.mark.parametrize(("key", "value"), [("budget", "0"), ("max_steps", "0"), ("lr", "0"), ("lr", "-0.1"),
                                            ("threshold", "-1"), ("max_rounds", "0"), ("gaussianity", "-0.5"),
                                            ("direction", "sideways"), ("pool", "batch"), ("v_units", "x0")])
def test_bad_input_is_refused_in_one_line_naming_the_key(key: str, value: str) -> None:
    from tests.test_configs import compose_config

    cfg = compose_config(["mitigation=sail", f"mitigation.noise.{key}={value}"])
    with pytest.raises(UserError) as err:
        instantiate_checked(cfg.mitigation.noise, "mitigation.noise")
    message = str(err.value)
    assert message.startswith(f"mitigation.noise.{key}=") and "\n" not in message


def test_flow_models_are_refused_and_the_defaults_are_theirs() -> None:
    from omegaconf import OmegaConf

    from memguard.cli import CONF_DIR
    from memguard.families.sd3 import SD3

    with pytest.raises(UserError, match=r"^mitigation=sail: mitigation.noise serves the sd, sdxl, dit families, not sd3"):
        SD3.check_baselines(Baselines(noise=SAIL()), "sail")
    noise = OmegaConf.load(CONF_DIR / "mitigation" / "sail.yaml").noise
    assert (noise.threshold, noise.budget, noise.lr, noise.max_steps) == (8.2, 8, 0.05, 10)  # mitigate_mem.py 70-73
    assert (noise.direction, noise.pool, noise.v_units, noise.gaussianity) == ("first", "image", "eps", None)


@pytest.mark.parametrize(("name", "prompt"), [("dit", "goldfish"), ("sdxl", PROMPT)])
def test_the_other_families_it_serves_search_too(name: str, prompt: str) -> None:
    """DiT (an eps model with a null class; learned-variance channels dropped) and SDXL (conditions beyond the
    text embedding: pooled embedding, time ids) run the search on their denoisers."""
    from memguard.families import random_family

    family = random_family(name)
    sail = SAIL(threshold=0.0, budget=2, max_steps=2, max_rounds=1)
    images, traj = generate_images(family, family.scheduler, Constant(4.0), [prompt], [0], 3,
                                   baselines=Baselines(noise=sail))
    assert images.shape[0] == 1 and traj.info["unet_evals_before"].tolist() == [16]
    assert bool(traj.info["sail_capped"][0]) and torch.isfinite(traj.info["sail_final_loss"]).all()
