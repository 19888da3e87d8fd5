"""Run folders written before random tokens, Wen and Ren moved out of ``memguard/baselines.py`` (their saved
``config.yaml`` names ``memguard.baselines.*``; tests/fixtures/former_folders/README.md) resume with today's code:
the finished image is kept, the missing one is made, and what today's code makes is what the old code made."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memguard.cli import main
from memguard.runner import run
from memguard.runs.folder import read_record
from tests.test_configs import compose_config

FORMER = Path(__file__).parent / "fixtures" / "former_folders"
RECORDED_MODEL = "/tmp/wt27/old/model"  # the model.path each saved config.yaml records


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model folder the old folders were made with, written by the same command."""
    folder = tmp_path_factory.mktemp("former") / "model"
    main(["random-model", str(folder)])
    return folder


def config(model: Path, run_dir: Path, mitigation: str, images: int):
    return compose_config(["scenario=custom", f"model.path={model}", "prompts=[a red circle]",
                           f"mitigation={mitigation}", f"images_per_prompt={images}", "sampler.steps=2",
                           "evaluate=false", "progress=false", f"run_dir={run_dir}"])


@pytest.mark.parametrize("mitigation", ["rand_word", "wen_l1", "wen_l1_per_image", "ren"])
def test_a_folder_written_before_the_move_resumes(random_model: Path, tmp_path: Path, mitigation: str) -> None:
    old = tmp_path / "old"
    shutil.copytree(FORMER / mitigation, old)
    saved = (old / "config.yaml").read_text()
    assert "_target_: memguard.baselines." in saved and RECORDED_MODEL in saved
    (old / "config.yaml").write_text(saved.replace(RECORDED_MODEL, str(random_model)))
    kept = (old / "images" / "00000_0.png").read_bytes()

    metrics = run(config(random_model, old, mitigation, 2))
    assert metrics["generation"]["images_made"] == 1  # seed 1 only: seed 0's image is kept
    assert (old / "images" / "00000_0.png").read_bytes() == kept
    assert sorted(p.name for p in (old / "images").glob("*.png")) == ["00000_0.png", "00000_1.png"]

    # today's code makes the image the old code made, and records the same trajectory and prompt
    new = tmp_path / "new"
    run(config(random_model, new, mitigation, 1))
    pixels = [np.asarray(Image.open(folder / "images" / "00000_0.png"), dtype=int) for folder in (old, new)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # identical up to uint8 rounding of float noise
    before, after = (read_record(folder / "images" / "00000_0.png") for folder in (old, new))
    np.testing.assert_allclose(after.d, before.d, rtol=1e-4)
    assert (after.model_prompt, after.scale) == (before.model_prompt, before.scale)
    columns = [c for c in pd.read_csv(FORMER / mitigation / "generations.csv").columns if c.startswith("wen_")]
    if columns:  # what Wen's optimisation did, as the old code recorded it
        old_row, new_row = (pd.read_csv(f / "generations.csv").iloc[0] for f in (FORMER / mitigation, new))
        assert [new_row[c] for c in columns] == pytest.approx([old_row[c] for c in columns], rel=1e-4)
