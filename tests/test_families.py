"""Model families (memguard/families): with mitigation=none each reproduces its own diffusers pipeline on tiny
random components; d_t is in eps units for each; every schedule and every baseline that applies runs on each, the
others are refused; og_dtp runs end to end on each family's random folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch

from memguard.mitigations import Baselines
from memguard.errors import UserError, instantiate_checked
from memguard.families import FAMILIES, family_name, load_family, random_family
from memguard.families.dit import DiT
from memguard.families.sd3 import SD3
from memguard.guidance import Constant, DynamicTransition
from memguard.mitigations import SLOTS
from memguard.runner import build_schedule, generate, run
from memguard.sampling import generate_images
from tests.numerics import assert_away_from_dtp_ties
from tests.test_configs import compose_config, options

PROMPTS, SEEDS, STEPS = ["a red circle on a blue background", "a photo of a tench"], [11, 12], 5
# each family's own pipeline scheduler, and another one memguard offers
SCHEDULERS = {"sd": ["DPMSolverMultistepScheduler"], "sdxl": ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"],
              "sd3": ["FlowMatchEulerDiscreteScheduler"], "dit": ["DDIMScheduler", "DPMSolverMultistepScheduler"]}
SCALE = {"sd": 7.5, "sdxl": 7.5, "sd3": 7.0, "dit": 4.0}  # the pipelines' defaults (SD3: 7.0, DiT: 4.0)


@pytest.fixture(scope="module")
def families() -> dict:
    return {name: random_family(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def folders(families: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: family.save(root / name) for name, family in families.items()}


def prompts_for(name: str) -> list[str]:
    return ["tench", "An image of church"] if name == "dit" else PROMPTS


def pipeline_images(family, scheduler, name: str, scale: float) -> torch.Tensor:
    pipe = family.pipeline(scheduler)
    generators = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    if name == "dit":  # class ids, as DiTPipeline takes them
        labels = [family.class_id(p) for p in prompts_for(name)]
        return pipe(labels, guidance_scale=scale, num_inference_steps=STEPS, generator=generators,
                    output_type="pt").images
    return pipe(PROMPTS, guidance_scale=scale, num_inference_steps=STEPS, generator=generators, output_type="pt").images


@pytest.mark.parametrize("name,scheduler_name", [(n, s) for n, names in SCHEDULERS.items() for s in names])
def test_none_reproduces_the_family_pipeline(families: dict, name: str, scheduler_name: str) -> None:
    family = families[name]
    cls = getattr(diffusers, scheduler_name)
    expected = pipeline_images(family, cls.from_config(family.scheduler.config), name, SCALE[name])
    ours, traj = generate_images(family, cls.from_config(family.scheduler.config), Constant(SCALE[name]),
                                 prompts_for(name), SEEDS, STEPS)
    assert ours.shape == expected.shape and ours.shape[-1] == family.default_resolution
    assert (ours - expected).abs().max().item() < 1e-4
    assert torch.isfinite(traj.d).all() and traj.d.shape == (2, STEPS)
    # the comparison can fail: another scale gives another image
    other, _ = generate_images(family, cls.from_config(family.scheduler.config), Constant(SCALE[name] / 2),
                               prompts_for(name), SEEDS, STEPS)
    assert (other - expected).abs().max().item() > 1e-3


def test_sd3_without_t5_reproduces_the_pipeline(caplog: pytest.LogCaptureFixture) -> None:
    family = SD3.random(t5=False)
    assert "text_encoder_3 null" in caplog.text  # memguard says what diffusers does silently: zeros for T5
    assert family.encode(["a cat"])["encoder_hidden_states"][:, 77:].abs().max() == 0
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(family.scheduler.config)
    expected = pipeline_images(family, scheduler, "sd3", 7.0)
    ours, _ = generate_images(family, scheduler, Constant(7.0), PROMPTS, SEEDS, STEPS)
    assert (ours - expected).abs().max().item() < 1e-4


def test_images_do_not_depend_on_batch_size(families: dict) -> None:
    for name in ("sdxl", "sd3", "dit"):
        family = families[name]
        scheduler = (diffusers.FlowMatchEulerDiscreteScheduler if name == "sd3"
                     else diffusers.DPMSolverMultistepScheduler).from_config(family.scheduler.config)
        together, traj = generate_images(family, scheduler, DynamicTransition(5.0, 5.0), prompts_for(name), SEEDS, 4)
        assert_away_from_dtp_ties(traj.d.tolist())
        alone, _ = generate_images(family, scheduler, DynamicTransition(5.0, 5.0), prompts_for(name)[1:], SEEDS[1:], 4)
        torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=0)


def record(family, scheduler, prompts: list[str]) -> list[dict]:
    from memguard.sampling import initial_noise, sample

    seen: list[dict] = []
    side = family.default_resolution // family.vae_scale_factor
    noise = initial_noise([0], (family.latent_channels, side, side))
    sample(family, scheduler, family.encode(prompts), family.null(1), noise, Constant(3.0), 4, seen.append)
    return seen


def test_sd3_d_is_in_eps_units(families: dict) -> None:
    """x_sigma = (1 - sigma) x0 + sigma eps and v = eps - x0 give eps = x_sigma + (1 - sigma) v."""
    family = families["sd3"]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(family.scheduler.config)
    for step in record(family, scheduler, ["a cat"]):
        sigma = step["timestep"] / 1000  # the scheduler's timesteps are 1000 sigma
        eps_c, eps_u = step["x"] + (1 - sigma) * step["eps_c"], step["x"] + (1 - sigma) * step["eps_u"]
        assert step["d"].item() == pytest.approx((eps_c - eps_u).pow(2).sum().item(), rel=1e-4, abs=1e-9)
        assert step["d_raw"].item() == pytest.approx((step["eps_c"] - step["eps_u"]).pow(2).sum().item(), rel=1e-5)
        assert step["d"].item() == pytest.approx((1 - sigma) ** 2 * step["d_raw"].item(), rel=1e-4, abs=1e-9)
    assert record(family, scheduler, ["a cat"])[0]["d"].item() == 0  # sigma = 1: x is the noise, eps known


def test_dit_d_uses_eps_without_the_variance_channels(families: dict) -> None:
    family = families["dit"]
    assert family.transformer.config.out_channels == 2 * family.latent_channels  # learned variance
    for step in record(family, diffusers.DDIMScheduler.from_config(family.scheduler.config), ["tench"]):
        assert step["eps_c"].shape[1] == family.latent_channels
        assert step["d"].item() == pytest.approx((step["eps_c"] - step["eps_u"]).pow(2).sum().item(), rel=1e-5)


def test_sdxl_null_condition_is_zeros_as_force_zeros_for_empty_prompt(families: dict) -> None:
    null = families["sdxl"].null(2, 32)
    assert null["encoder_hidden_states"].abs().max() == 0 and null["text_embeds"].abs().max() == 0
    assert null["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # (original size, crop corner, target size)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_mitigation_runs_or_is_refused(families: dict, name: str, tmp_path: Path) -> None:
    """Schedules run on every family; prompt and embedding baselines need text (sd, sdxl, sd3), Ren et al.'s
    attention baseline attn2 cross-attention (sd, sdxl); a slot naming its families (PRSS's: sd, sdxl) is refused
    on the others."""
    family = families[name]
    sampler = "flow" if name == "sd3" else "dpm"
    prompt = prompts_for(name)[0]
    (paraphrases := tmp_path / "paraphrases.json").write_text(json.dumps({prompt: ["a paraphrase"]}))
    (neurons := tmp_path / "neurons.json").write_text(json.dumps({"neurons": {prompt: {}}}))
    needs = {"auto": ["mitigation.auto.threshold=1"], "prss_ss": [f"mitigation.embedding.paraphrases={paraphrases}"],
             "nemo": [f"mitigation.attention.neurons={neurons}"]}  # the inputs a mitigation needs
    for mitigation in options("mitigation"):
        cfg = compose_config([f"mitigation={mitigation}", f"sampler={sampler}", *needs.get(mitigation, [])])
        scheduler = instantiate_checked(cfg.sampler.scheduler, "sampler.scheduler", family.scheduler.config)
        family.check_scheduler(scheduler)
        schedule = build_schedule(cfg, scheduler.config.num_train_timesteps)
        baselines = Baselines(**{key: instantiate_checked(cfg.mitigation[key], f"mitigation.{key}")
                                 for key in SLOTS if cfg.mitigation.get(key) is not None})
        text = baselines.prompt is not None or baselines.embedding is not None
        served = [slot.families for slot in vars(baselines).values() if getattr(slot, "families", None) is not None]
        if (text and not family.text) or (baselines.attention is not None and not family.cross_attention) or \
                any(name not in names for names in served):
            with pytest.raises(UserError, match=rf"mitigation={mitigation}\b.*\b{name}\b"):
                family.check_baselines(baselines, mitigation)
            continue
        family.check_baselines(baselines, mitigation)
        out = tmp_path / mitigation
        out.mkdir()
        records = generate(family, scheduler, schedule, [(0, 3)], prompts_for(name)[:1], 3, None, 1, out, False,
                           baselines)
        assert len(records) == 1 and (out / records[0].file).is_file() and len(records[0].d) == 3, mitigation


@pytest.mark.parametrize("name", list(FAMILIES))
def test_og_dtp_runs_end_to_end_on_each_random_folder(folders: dict, name: str, tmp_path: Path) -> None:
    assert family_name(folders[name]) == name  # read from model_index.json's _class_name
    cfg = compose_config(["scenario=custom", f"model.path={folders[name]}", f"prompts=[{','.join(prompts_for(name))}]",
                          "images_per_prompt=2", "sampler.steps=6", f"run_dir={tmp_path}", "progress=false",
                          "mitigation=og_dtp", *(["sampler=flow"] if name == "sd3" else [])])
    metrics = run(cfg)
    assert metrics["n_images"] == 4 and len(list((tmp_path / "images").glob("*.png"))) == 4
    rows = (tmp_path / "trajectories.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 6
    scales = {float(r.split(",")[5]) for r in rows[1:]}
    assert scales <= {-7.5, 7.5} and -7.5 in scales  # opposite guidance before each sample's switch


def test_dit_prompts_name_classes(families: dict) -> None:
    dit: DiT = families["dit"]
    assert dit.class_id("tench") == 0 and dit.class_id("417") == 417
    assert dit.class_id("An image of English springer") == dit.class_id("English springer") == 217
    assert dit.class_id("An image of French horn") == dit.class_id("French horn")  # the longest label, not "horn"
    with pytest.raises(UserError, match=r"prompts: 'a zorvex' names no class .* class id 0..999"):
        dit.class_id("a zorvex")
    with pytest.raises(UserError, match="names no class"):
        dit.class_id("1000")  # the null class is no prompt


def test_bad_folders_are_one_line_errors(folders: dict, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown"
    shutil.copytree(folders["dit"], unknown)
    index = json.loads((unknown / "model_index.json").read_text())
    (unknown / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match=r"_class_name='FluxPipeline', not one of memguard's families .* model.family"):
        family_name(unknown)
    with pytest.raises(UserError, match=r"lists text_encoder_2, tokenizer_2, which a sd model .* mixed"):
        family_name(folders["sdxl"], "sd")
    with pytest.raises(UserError, match=r"model.family='flux' is not a model family; use one of sd, sdxl, sd3, dit"):
        family_name(folders["sdxl"], "flux")
    with pytest.raises(UserError, match=r"DPMSolverMultistepScheduler cannot sample an sd3 model .* sampler=flow"):
        load_family(folders["sd3"]).check_scheduler(diffusers.DPMSolverMultistepScheduler())
    with pytest.raises(UserError, match=r"flow-matching scheduler; a dit model predicts eps or v"):
        DiT.check_scheduler(diffusers.FlowMatchEulerDiscreteScheduler())


def test_run_refuses_what_a_family_cannot_take(folders: dict, tmp_path: Path) -> None:
    def config(name: str, *extra: str):
        return compose_config(["scenario=custom", f"model.path={folders[name]}", "prompts=[tench]",
                               "images_per_prompt=1", "sampler.steps=2", f"run_dir={tmp_path / name}",
                               "progress=false", *extra])

    with pytest.raises(UserError, match=r"mitigation=rand_word changes the text prompt .* dit model is class-cond"):
        run(config("dit", "mitigation=rand_word"))
    with pytest.raises(UserError, match=r"mitigation=ren .* sd3 model does not have \(joint attention\)"):
        run(config("sd3", "mitigation=ren", "sampler=flow"))
    with pytest.raises(UserError, match=r"prompts: 'a zorvex' names no class"):
        run(compose_config(["scenario=custom", f"model.path={folders['dit']}", "prompts=[tench, a zorvex]",
                            f"run_dir={tmp_path / 'labels'}", "progress=false"]))
    assert not (tmp_path / "labels" / "images").exists()  # refused before anything was generated


def test_random_model_command_writes_each_family(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from memguard.cli import main

    main(["random-model", str(tmp_path / "sd3"), "--family", "sd3", "--no-t5"])
    index = json.loads((tmp_path / "sd3" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert family_name(tmp_path / "sd3") == "sd3" and "sd3 folder" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--family 'flux' is not a model family"):
        main(["random-model", str(tmp_path / "x"), "--family", "flux"])


def test_transition_points_as_a_fraction_of_the_timestep_range(families: dict) -> None:
    """STP and interval timesteps are the scheduler's own (SD3: 1000 sigma), or a fraction of their range."""
    from memguard.guidance import Interval, StaticTransition

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(families["sd3"].scheduler.config)
    scheduler.set_timesteps(20)
    d = torch.zeros(1, 1)
    pairs = ((StaticTransition(0.5, 7.0, 7.0, fraction=True), StaticTransition(500, 7.0, 7.0)),
             (Interval(0.7, 0.2, 7.0, fraction=True), Interval(700, 200, 7.0)))
    for as_fraction, in_timesteps in pairs:
        with pytest.raises(ValueError, match="needs check_timesteps"):
            as_fraction(0, 1000.0, d)
        as_fraction.check_timesteps(scheduler.config.num_train_timesteps)
        scales = [as_fraction(k, float(t), d).item() for k, t in enumerate(scheduler.timesteps)]
        assert scales == [in_timesteps(k, float(t), d).item() for k, t in enumerate(scheduler.timesteps)]
        assert len(set(scales)) == 2  # it switches inside the trajectory
    with pytest.raises(ValueError, match=r"tau=500.0 is outside \[0, 1\]; with fraction=true"):
        StaticTransition(500, 7.0, fraction=True)
