"""The shipped second miniature (models/tiny2): what a fresh clone runs with no training. `memguard run
scenario=tiny2 mitigation=auto` and `memguard basin scenario=tiny2` at smoke size, through the CLI, and the
shipped files agree with the scenario and with each other."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import memguard
from memguard.procedural import dataset_digest
from tests.test_cli import memguard as memguard_cli
from tests.test_configs import compose_config

MODEL = memguard.ROOT / "models" / "tiny2"
RECORD = json.loads((MODEL / "memguard_train.json").read_text())


def test_shipped_folder_is_small_and_agrees_with_the_scenario(tmp_path: Path) -> None:
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size < 20 * 2**20 and RECORD["weights_dtype"] == "float16"
    cfg = compose_config(["scenario=tiny2", "mitigation=auto", f"paths.output_dir={tmp_path}"])
    assert Path(cfg.model.path) == MODEL and Path(cfg.mitigation.auto.calibration) == MODEL / "calibration.json"
    assert cfg.dataset.digest == RECORD["dataset_digest"]
    assert cfg.dataset.texture_amplitude == RECORD["data"]["texture_amplitude"]
    assert cfg.metrics.copy_threshold == pytest.approx(RECORD["copy_threshold"]["value"], abs=1e-4)
    assert RECORD["copy_threshold"]["embedder"] == "pixel(size=16,pool=4,per_channel)"
    calibration = json.loads((MODEL / "calibration.json").read_text())
    assert calibration["detect_step"] == 0 and calibration["fpr"] == 0.01 and calibration["groups"] == ["unique"]


@pytest.mark.slow
def test_run_auto_from_a_fresh_clone(tmp_path: Path) -> None:
    """CI's smoke of scenario=tiny2: 2 seeds, 4 steps. The first step is the 50-step run's first step (t = 999),
    so the decisions are the full run's: every trigger image is flagged, ordinary captions are left to CFG."""
    result = memguard_cli("run", "scenario=tiny2", "mitigation=auto", "debug=default", "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "outputs" / "runs" / "debug" / "tiny2" / "auto"
    assert dataset_digest(tmp_path / "outputs" / "data" / "tiny2") == RECORD["dataset_digest"]
    gens = pd.read_csv(run_dir / "generations.csv")
    assert len(gens) == 14 * 2 and len(list((run_dir / "images").glob("*.png"))) == 28
    flagged = gens.assign(m=gens.decision == "mitigated").groupby("group").m.mean()
    assert flagged["trigger"] == 1.0 and flagged["unique"] <= 0.1, flagged.to_dict()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"similarity", "alignment", "detection"} <= set(metrics)


@pytest.mark.slow
def test_basin_from_a_fresh_clone(tmp_path: Path) -> None:
    result = memguard_cli("basin", "scenario=tiny2", "seeds=[0]", "sampler.steps=4", "basin.starts=[0,2]",
                          "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "outputs" / "basin" / "tiny2"
    assert len(pd.read_csv(folder / "basin.csv")) == 14 * 2 and (folder / "basin.png").is_file()
