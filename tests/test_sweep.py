"""Every mitigation declares its strength knob(s) and default sweep as data; the loader refuses a bad declaration."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from memguard.cli import CONF_DIR
from memguard.errors import UserError
from memguard.mitigations import SLOTS
from memguard.mitigations.sweep import load_sweep, point_name
from tests.test_configs import compose_config, options


@pytest.mark.parametrize("mitigation", options("mitigation"))
def test_every_mitigation_declares_a_sweep_whose_points_compose(mitigation: str) -> None:
    sweep = load_sweep(mitigation, CONF_DIR)
    assert sweep.source.strip()
    extra = ["mitigation.auto.threshold=1"] if mitigation == "auto" else []
    base = compose_config([f"mitigation={mitigation}", *extra])
    for point in sweep.points(base):
        cfg = base.copy()
        for key, value in point.items():  # the key exists in the composed config, and its object takes the value
            assert OmegaConf.select(cfg, key) is not None, key
            OmegaConf.update(cfg, key, value)
        instantiate(cfg.mitigation.schedule)
        for slot in SLOTS:  # nemo needs its neuron file, prss_ss its paraphrases: their schedules only
            if cfg.mitigation.get(slot) is not None and mitigation not in ("nemo", "prss_ss"):
                instantiate(cfg.mitigation[slot])


def test_relative_sweeps_scale_the_configured_value() -> None:
    sweep = load_sweep("sail", CONF_DIR)
    base = compose_config(["mitigation=sail", "mitigation.noise.threshold=2.0"])
    values = [p["mitigation.noise.threshold"] for p in sweep.points(base)]
    assert values == [2.0 * f for f in sweep.knobs["mitigation.noise.threshold"]]
    assert point_name({"mitigation.noise.threshold": 2.5}) == "threshold=2.5" and point_name({}) == "default"


def test_a_mitigation_without_a_sweep_is_refused_naming_its_yaml(tmp_path: Path) -> None:
    (tmp_path / "mitigation").mkdir()
    (tmp_path / "mitigation" / "bare.yaml").write_text("name: bare\nschedule:\n  scale: 1\n")
    with pytest.raises(UserError, match=r"declares no strength knob.*bare\.yaml"):
        load_sweep("bare", tmp_path)
    (tmp_path / "mitigation" / "typo.yaml").write_text(
        "name: typo\nschedule:\n  tau: 1\nsweep:\n  knobs:\n    mitigation.schedule.tua: [1, 2]\n  source: x\n")
    with pytest.raises(UserError, match="mitigation.schedule.tua is not a key"):
        load_sweep("typo", tmp_path)
    (tmp_path / "mitigation" / "uneven.yaml").write_text(
        "name: u\nschedule:\n  a: 1\n  b: 2\nsweep:\n  knobs:\n    mitigation.schedule.a: [1, 2]\n"
        "    mitigation.schedule.b: [1]\n  source: x\n")
    with pytest.raises(UserError, match="one length"):
        load_sweep("uneven", tmp_path)
