"""evaluate(cfg) on run folders: per-image columns, the aggregate, the embedder named, CLI re-evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memguard.errors import UserError
from memguard.evaluate import evaluate
from memguard.runner import run
from tests.test_cli import memguard_here as memguard
from tests.test_run import config


def make_references(run_dir: Path, folder: Path) -> None:
    """Two of the run's own images (exact copies) and three random images."""
    folder.mkdir()
    shutil.copy(run_dir / "images" / "00000_0.png", folder / "copy_a.png")
    shutil.copy(run_dir / "images" / "00001_1.png", folder / "copy_b.png")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"other_{i}.png")


def test_run_then_evaluate_with_pixel_similarity(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir, refs = tmp_path / "run", tmp_path / "refs"
    run(config(tiny_model_dir, run_dir))
    make_references(run_dir, refs)
    metrics = evaluate(config(tiny_model_dir, run_dir, "metrics=pixel", f"references={refs}",
                              f"paths.cache_dir={tmp_path / 'cache'}"))
    gens = pd.read_csv(run_dir / "generations.csv").set_index("file")
    assert gens.loc["images/00000_0.png", "nearest_reference"] == "copy_a.png"
    assert gens.loc["images/00001_1.png", "nearest_reference"] == "copy_b.png"
    assert gens.loc["images/00000_0.png", "similarity"] == pytest.approx(1.0, abs=1e-5)
    sim = metrics["similarity"]
    assert sim["embedder"] == "pixel(size=32,pool=1)" and sim["references"] == 5
    assert sim["p95"] == pytest.approx(np.percentile(gens.similarity, 95))
    assert sim["frac_above_0.5"] == pytest.approx((gens.similarity > 0.5).mean())
    for key in ("p95", "mean", "frac_above_0.5"):  # a bootstrap interval over the 2 prompts beside each
        assert sim[f"{key}_lo"] <= sim[key] <= sim[f"{key}_hi"], key
    assert sim["mean_lo"] < sim["mean_hi"] and "std_lo" not in sim
    assert metrics["bootstrap"] == {"method": "percentile bootstrap over prompts", "level": 0.95, "resamples": 1000,
                                    "seed": 0}
    assert metrics["transition"]["fired_fraction_lo"] == 1.0  # the run's own fractions have them too
    assert json.loads((run_dir / "metrics.json").read_text())["n_images"] == 4  # the run's entries are kept
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_run_evaluates_at_the_end_when_metrics_are_chosen(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    run(config(tiny_model_dir, first))
    make_references(first, tmp_path / "refs")
    metrics = run(config(tiny_model_dir, tmp_path / "second", "metrics=pixel", f"references={tmp_path / 'refs'}",
                         f"paths.cache_dir={tmp_path / 'cache'}"))
    assert metrics["similarity"]["p95"] == pytest.approx(1.0, abs=1e-5)  # same seeds and prompts: same images
    assert "similarity" in pd.read_csv(tmp_path / "second" / "generations.csv").columns


@pytest.mark.parametrize(("overrides", "message"), [
    (["metrics=none", "references=/x"], "metrics=none sets no metric: choose metrics=pixel"),
    (["metrics=pixel"], "references is not set"),
    (["metrics=pixel", "references=/no/such/dir"], "references='/no/such/dir' is not a folder"),
    (["metrics=sscd", "metrics.similarity.path=/no/sscd.pt", "references=REFS"], "metrics.similarity.path='/no/sscd.pt' is not a file"),
])
def test_evaluate_errors(tiny_model_dir: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    run(config(tiny_model_dir, tmp_path / "run"))
    make_references(tmp_path / "run", tmp_path / "refs")
    overrides = [o.replace("REFS", str(tmp_path / "refs")) for o in overrides]
    with pytest.raises(UserError, match=message):
        evaluate(config(tiny_model_dir, tmp_path / "run", *overrides))


def test_evaluate_needs_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no generations.csv"):
        evaluate(config(tmp_path, tmp_path / "empty", "metrics=pixel", f"references={tmp_path}"))


@pytest.mark.slow
def test_cli_reevaluates_a_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(config(tiny_model_dir, run_dir))
    make_references(run_dir, tmp_path / "refs")
    result = memguard("evaluate", f"run_dir={run_dir}", "metrics=pixel", f"references={tmp_path / 'refs'}",
                      "metrics.similarity.pool=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["similarity"]["embedder"] == "pixel(size=32,pool=2)"
