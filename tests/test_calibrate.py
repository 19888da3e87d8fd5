"""`memguard calibrate mitigation=NAME` on the shipped tiny model: the threshold comes from its control prompts, runs
apply and record it, `memguard check` verifies the model, an uncalibrated run on a model unlike the default's warns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memguard.calibrate import calibrate
from memguard.check import check_inputs
from memguard.errors import UserError
from memguard.runner import run
from tests.test_configs import compose_config

FAST = ["sampler.steps=6", "images_per_prompt=2", "progress=false", "metrics=none"]
TINY = "scenario=tiny"  # the shipped tiny model these tests are written for (not the default, tiny2)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calibrate")


def test_sail_calibrated_on_the_tiny_model_searches_for_memorized_prompts(out: Path) -> None:
    common = [TINY, f"paths.output_dir={out}", *FAST]
    result = calibrate(compose_config(["mitigation=sail", *common]))
    value = result["values"]["mitigation.noise.threshold"]
    assert value < 8.2 and result["groups"] == ["unique"] and result["n_images"] == 16  # 8 unique prompts x 2 seeds
    assert result["measured_fpr"] <= 0.05
    assert "calibration" in " ".join(check_inputs(compose_config(["mitigation=sail", *common])).notes)

    run(compose_config(["mitigation=none", *common]))
    run(compose_config(["mitigation=sail", *common]))
    sail, none = out / "runs" / "tiny" / "sail", out / "runs" / "tiny" / "none"
    assert json.loads((sail / "calibration.json").read_text())["values"] == result["values"]  # the run records it
    generations = pd.read_csv(sail / "generations.csv")
    assert (generations.sail_threshold.min() >= value - 1e-9)
    moved = [not np.array_equal(np.asarray(Image.open(sail / f)), np.asarray(Image.open(none / f)))
             for f in generations.file]
    assert any(moved), "after calibration SAIL keeps every image's own noise"

    # ... and one scored at other timesteps (another number of steps) by a run, naming the fix
    steps8 = [o if o != "sampler.steps=6" else "sampler.steps=8" for o in common]
    with pytest.raises(UserError, match="sampler.steps=6, this run samples with .* sampler.steps=8"):
        run(compose_config(["mitigation=sail", *steps8, "run_name=tiny/sail_steps8"]))

    # a calibration made for another model is refused by check and by a run, naming the fix
    path = out / "calibration" / "tiny" / "sail.json"
    other = json.loads(path.read_text())
    other["model"]["sha256"] = "0" * 64
    path.write_text(json.dumps(other))
    assert any("calibrate again" in p for p in check_inputs(compose_config(["mitigation=sail", *common])).problems)
    with pytest.raises(UserError, match="memguard calibrate mitigation=sail"):
        run(compose_config(["mitigation=sail", *common, "run_name=tiny/sail_other"]))


def test_an_uncalibrated_method_warns_once_per_run(out: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_config([TINY, "mitigation=han", f"paths.output_dir={out / 'uncalibrated'}", *FAST,
                          "prompts=[a red circle on a white background]", "prompts_file=null", "images_per_prompt=1"])
    with caplog.at_level(logging.WARNING):
        run(cfg)
    warnings = [r.getMessage() for r in caplog.records if "uncalibrated" in r.getMessage()]
    assert len(warnings) == 1 and "memguard calibrate mitigation=han" in warnings[0]


def test_a_method_without_a_threshold_is_refused() -> None:
    with pytest.raises(UserError, match="no threshold to calibrate"):
        calibrate(compose_config(["mitigation=dtp"]))


def test_nemo_localize_reads_its_calibrated_thresholds_for_this_model_only(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    from memguard.mitigations.calibration import model_identity
    from memguard.mitigations.nemo_localize import apply_nemo_calibration

    path = tmp_path / "nemo.json"
    cfg = compose_config([TINY, f"nemo.calibration={path}"])
    with caplog.at_level(logging.WARNING):
        assert apply_nemo_calibration(cfg) is None  # none yet: the tiny model is not SD 1.x, one warning
    assert sum("memguard calibrate mitigation=nemo" in r.getMessage() for r in caplog.records) == 1
    values = {"nemo.pairwise_threshold": 0.7, "nemo.initial_threshold": 0.7, "nemo.refinement_threshold": 0.7}
    path.write_text(json.dumps({"mitigation": "nemo", "values": values, "model": model_identity(cfg.model.path)}))
    apply_nemo_calibration(cfg)
    assert cfg.nemo.pairwise_threshold == cfg.nemo.refinement_threshold == 0.7
    path.write_text(json.dumps({"mitigation": "nemo", "values": values, "model": {"sha256": "0" * 64}}))
    with pytest.raises(UserError, match="calibrate again"):
        apply_nemo_calibration(compose_config([TINY, f"nemo.calibration={path}"]))


def test_a_run_folder_calibration_of_auto_is_refused_under_another_sampler(tmp_path: Path) -> None:
    """`memguard calibrate RUN_DIR` records the run's sampler (its config.yaml); `auto` reading that file (no
    threshold given) is refused when sampled with other steps, as a `memguard calibrate mitigation=X` file is."""
    from memguard.metrics.detection import calibrate as calibrate_run
    from memguard.mitigations.calibration import apply_calibration

    common = [TINY, f"paths.output_dir={tmp_path}", *FAST]
    run(compose_config(["mitigation=none", *common]))
    made = calibrate_run(tmp_path / "runs" / "tiny" / "none", fpr=0.1, groups=["unique"])
    assert made["sampler"] == {"name": "dpm", "steps": 6}
    apply_calibration(compose_config(["mitigation=auto", *common]))  # the same sampler: accepted
    steps8 = [o if o != "sampler.steps=6" else "sampler.steps=8" for o in common]
    with pytest.raises(UserError, match="sampler=dpm sampler.steps=6, this run samples with .* sampler.steps=8"):
        apply_calibration(compose_config(["mitigation=auto", *steps8]))
    apply_calibration(compose_config(["mitigation=auto", *steps8, "mitigation.auto.threshold=0.5"]))  # given: kept
