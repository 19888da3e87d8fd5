"""Every option of every config group composes and instantiates; experiments expand to their grids."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from memguard.cli import CONF_DIR
from memguard.guidance import GuidanceSchedule
from memguard.mitigations import SLOTS


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(overrides: list[str], hydra: bool = False) -> DictConfig:
    """The config `memguard run OVERRIDES` composes (a copy: the caller may change it)."""
    return copy.deepcopy(_compose(tuple(overrides), hydra))


@functools.lru_cache(maxsize=512)
def _compose(overrides: tuple[str, ...], hydra: bool) -> DictConfig:
    """Composed once per test process and list of overrides (the files under conf/ do not change during a run)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("mitigation", options("mitigation"))
def test_every_mitigation_instantiates_a_schedule(mitigation: str) -> None:
    cfg = compose_config([f"mitigation={mitigation}", *(["mitigation.auto.threshold=1"] if mitigation == "auto" else [])])
    assert cfg.mitigation.name.startswith(mitigation)  # parameterised ones carry their values: stp_t500
    schedule = instantiate(cfg.mitigation.schedule)
    assert isinstance(schedule, GuidanceSchedule)
    schedule.check_timesteps(1000)


@pytest.mark.parametrize("sampler", [s for s in options("sampler") if s != "auto"])
def test_every_sampler_builds_from_a_model_scheduler_config(sampler: str, tiny_components) -> None:
    cfg = compose_config([f"sampler={sampler}"])
    scheduler = instantiate(cfg.sampler.scheduler, _partial_=True)(tiny_components.scheduler.config)
    assert type(scheduler).__name__.lower().startswith(sampler)
    assert scheduler.config.beta_schedule == "scaled_linear"  # the model's own noise schedule is kept


def test_guidance_scale_flows_into_schedules() -> None:
    cfg = compose_config(["mitigation=og_dtp", "guidance.scale=5"])
    schedule = instantiate(cfg.mitigation.schedule)
    assert (schedule.scale, schedule.opposite) == (5.0, 5.0)
    cfg = compose_config(["mitigation=og_stp", "guidance.og_scale=2", "mitigation.schedule.tau=600"])
    schedule = instantiate(cfg.mitigation.schedule)
    assert (schedule.scale, schedule.opposite, schedule.tau) == (7.5, 2.0, 600.0)


@pytest.mark.parametrize("scenario", options("scenario"))
def test_every_scenario_composes(scenario: str) -> None:
    cfg = compose_config([f"scenario={scenario}"])
    assert cfg.scenario.name == scenario
    assert cfg.run_name == f"{scenario}/none"


def test_debug_and_experiment_compose() -> None:
    cfg = compose_config(["debug=default"])
    assert cfg.sampler.steps == 4 and cfg.run_name.startswith("debug/")
    cfg = compose_config(["experiment=schedules"], hydra=True)
    swept = cfg.hydra.sweeper.params.mitigation.split(",")
    schedules = [m for m in options("mitigation") if m != "auto"  # auto needs a calibrated threshold first
                 and all(compose_config([f"mitigation={m}"]).mitigation.get(k) is None for k in SLOTS)]
    assert sorted(swept) == schedules  # every guidance schedule; a mitigation with a slot (memguard.mitigations) is not one
    cfg = compose_config(["experiment=tiny_grid"], hydra=True)
    assert cfg.scenario.name == "tiny" and "dtp" in cfg.hydra.sweeper.params.mitigation


def test_run_dirs_follow_scenario_and_mitigation() -> None:
    cfg = compose_config(["mitigation=dtp"], hydra=True)
    assert cfg.hydra.run.dir == "outputs/runs/tiny2/dtp"  # the default scenario
    assert cfg.hydra.sweep.subdir == "tiny2/dtp"


def test_config_dir_ships_with_the_package() -> None:
    assert (CONF_DIR / "config.yaml").is_file()
    assert Path(CONF_DIR).parent.joinpath("memguard", "cli.py").is_file()


def test_metrics_options_compose() -> None:
    assert options("metrics") == ["detection", "none", "paper", "paper_plus", "pixel", "sscd", "tiny", "tiny2"]
    extra = {"aesthetic", "diversity", "dino"}
    for option in options("metrics"):  # every option sets every stage key (null where it has no such metric)
        metrics = compose_config([f"metrics={option}"]).metrics
        base = {"name", "similarity", "threshold", "copy_threshold", "alignment", "fid", "detection"}
        assert set(metrics) == (base | extra if option == "paper_plus" else base), option
    assert options("extra_metrics") == sorted(extra)
    plus = compose_config(["metrics=paper_plus"])
    assert plus.metrics.name == "paper_plus" and plus.metrics.similarity == compose_config(["metrics=paper"]).metrics.similarity
    assert {"aesthetic", "aesthetic_clip", "diversity", "dino"} <= set(plus.sources)
    tiny = compose_config(["metrics=tiny", "+extra_metrics=[aesthetic,diversity,dino]"]).metrics  # any metrics, by keys
    assert tiny.name == "tiny" and extra <= set(tiny) and tiny.dino.path == "weights/dinov2-base"
    embedder = instantiate(compose_config(["metrics=pixel", "metrics.similarity.pool=4"]).metrics.similarity)
    assert embedder.name == "pixel(size=32,pool=4)"
    cfg = compose_config(["metrics=paper", "device=cpu"])
    assert cfg.metrics.similarity.mode == "dcr"
    assert cfg.metrics.similarity.path == "weights/sscd_disc_large.torchscript.pt"
    assert cfg.metrics.fid.path == "weights/weights-inception-2015-12-05-6726825d.pth"


def test_parameterised_mitigations_get_one_run_folder_per_value() -> None:
    names = {compose_config(["mitigation=stp", f"mitigation.schedule.tau={tau}"]).run_name for tau in (300, 700)}
    assert names == {"tiny2/stp_t300", "tiny2/stp_t700"}
    cfg = compose_config(["mitigation=interval", "mitigation.schedule.t_hi=600"])
    assert cfg.mitigation.name == "interval_600_0"


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5])
def test_table_experiments_sweep_exactly_their_tables_rows(number: int) -> None:
    from memguard.tables import PAPER_TABLES

    table = next(t for t in PAPER_TABLES if t.number == number)
    cfg = compose_config([f"experiment=table{number}"], hydra=True)
    assert cfg.scenario.name == table.scenario and cfg.metrics.name == "paper"
    options_swept = cfg.hydra.sweeper.params.mitigation.split(",")
    names = [compose_config([f"experiment=table{number}", f"mitigation={m}"]).mitigation.name for m in options_swept]
    assert names == [row.mitigation for row in table.rows]  # each row's run folder is made by the sweep


@pytest.mark.parametrize(("family", "chosen"), [("sd", "dpm"), ("sdxl", "dpm"), ("dit", "dpm"), ("sd3", "flow")])
def test_sampler_auto_becomes_the_family_sampler_with_the_runs_steps_and_keys(family: str, chosen: str) -> None:
    from memguard.families import _family_class
    from memguard.protocol import resolve_sampler

    cfg = compose_config(["sampler.steps=7", "+sampler.scheduler.solver_order=3"] if chosen == "dpm" else
                         ["sampler.steps=7"])
    assert cfg.sampler.name == "auto"
    resolve_sampler(cfg, _family_class(family))
    assert cfg.sampler.name == chosen and cfg.sampler.steps == 7
    assert cfg.sampler.scheduler._target_ == compose_config([f"sampler={chosen}"]).sampler.scheduler._target_
    assert cfg.sampler.scheduler.get("solver_order") == (3 if chosen == "dpm" else None)
    named = compose_config(["sampler=ddim"])
    resolve_sampler(named, _family_class(family))
    assert named.sampler.name == "ddim"  # a named sampler is kept (and checked against the family when built)
