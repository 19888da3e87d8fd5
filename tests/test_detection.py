"""The detection stage: scores from the recorded d_t, ROC-AUC and TPR at 1% FPR, calibration for mitigation=auto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memguard.evaluate import evaluate
from memguard.metrics.detection import calibrate, per_image, roc, roc_summary
from memguard.runner import run
from tests.test_cli import memguard_here as memguard
from tests.test_run import config


def test_roc_auc_and_tpr_at_one_percent() -> None:
    labels = np.array([1, 1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.5])
    fpr, tpr, thresholds = roc(scores, labels)
    assert fpr.tolist() == [0, 0, 0, 1 / 3, 1 / 3, 1] and tpr.tolist() == [0, 1 / 3, 2 / 3, 2 / 3, 1, 1]
    assert thresholds[0] == np.inf and thresholds[-1] == 0.5
    summary = roc_summary(scores, labels)
    assert summary["auc"] == pytest.approx(8 / 9)  # pairs ranked right: 8 of 9
    assert summary["tpr_at_1pct_fpr"] == pytest.approx(2 / 3)
    assert roc_summary(scores, 1 - labels)["auc"] == pytest.approx(1 / 9)
    rng = np.random.default_rng(0)  # against the pairwise definition, with ties
    s, y = rng.integers(0, 5, 200).astype(float), rng.integers(0, 2, 200)
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    assert roc_summary(s, y)["auc"] == pytest.approx(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_per_image_scores() -> None:
    import torch

    d = torch.tensor([[4.0, 16.0, 100.0, 25.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    scores = per_image(d, steps=2)
    assert scores["detection_first"].tolist() == [2.0, 1.0] and scores["detection_mean"].tolist() == [3.0, 1.0]
    assert scores["d_peak_step"].tolist() == [2, 0] and scores["d_fall"].tolist() == [0.75, 0.0]


def test_stage_labels_by_group_and_calibration(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "group": g}) + "\n" for p, g in
                               [("a red circle", "trigger"), ("a blue square", "unique"), ("a cat", "other")]))
    run_dir = tmp_path / "run"
    run(config(tiny_model_dir, run_dir, "prompts=null", f"prompts_file={prompts}"))
    cfg = config(tiny_model_dir, run_dir, "prompts=null", f"prompts_file={prompts}", "metrics=detection",
                 "metrics.detection.steps=3")
    metrics = evaluate(cfg)["detection"]
    gens = pd.read_csv(run_dir / "generations.csv")
    traj = pd.read_csv(run_dir / "trajectories.csv")
    first = traj[traj.step == 0].set_index(["prompt_idx", "seed"]).d ** 0.5
    assert gens.detection_first.tolist() == pytest.approx(first.loc[list(zip(gens.prompt_idx, gens.seed))].tolist())
    assert gens.memorized.tolist()[:4] == [True, True, False, False] and gens.memorized.isna().sum() == 2
    assert metrics["n_positive"] == 2 and metrics["n_negative"] == 2 and metrics["labels"] == "group (trigger vs unique)"
    labels = np.array([1, 1, 0, 0])
    assert metrics["detection_first"] == roc_summary(gens.detection_first.to_numpy()[:4], labels)
    assert (run_dir / "roc.png").is_file()

    calibration = calibrate(run_dir, fpr=0.5, groups=["unique", "other"])
    scores = np.sort(gens.detection_first[gens.group != "trigger"].to_numpy())
    assert calibration["threshold"] == pytest.approx(scores[1]) and calibration["measured_fpr"] <= 0.5
    assert json.loads((run_dir / "calibration.json").read_text())["threshold"] == calibration["threshold"]
    result = memguard("calibrate", str(run_dir), "--fpr", "0.25", "--detect-step", "2", cwd=tmp_path)
    assert result.returncode == 0 and "mitigation.auto.threshold=" in result.stdout
    assert json.loads((run_dir / "calibration.json").read_text())["detect_step"] == 2


def test_auto_records_its_decision(tiny_model_dir: Path, tmp_path: Path) -> None:
    reference = run(config(tiny_model_dir, tmp_path / "none"))
    assert reference["n_images"] == 4
    d0 = pd.read_csv(tmp_path / "none" / "trajectories.csv").query("step == 0").d ** 0.5
    threshold = float(np.median(d0))  # about half the images are flagged
    run(config(tiny_model_dir, tmp_path / "auto", "mitigation=auto", f"mitigation.auto.threshold={threshold}"))
    gens = pd.read_csv(tmp_path / "auto" / "generations.csv")
    traj = pd.read_csv(tmp_path / "auto" / "trajectories.csv")
    for row in gens.itertuples():
        this = traj[(traj.prompt_idx == row.prompt_idx) & (traj.seed == row.seed)]
        flagged = this.d.iloc[0] ** 0.5 > threshold
        assert row.decision == ("mitigated" if flagged else "cfg")
        assert (this.scale.iloc[0] == -7.5) == flagged  # og_dtp starts with opposite guidance
    assert set(gens.decision) == {"mitigated", "cfg"}
    # the d of step 0 does not depend on the schedule: the same as under none
    assert (traj[traj.step == 0].d ** 0.5).tolist() == pytest.approx(d0.tolist())


def test_auto_without_calibration_is_a_one_line_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = memguard("run", "scenario=custom", f"model.path={tiny_model_dir}", "prompts=[a cat]", "mitigation=auto",
                      "sampler.steps=2", "images_per_prompt=1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("memguard: error: mitigation.auto.threshold is not set")
    assert "memguard calibrate" in result.stderr and len(result.stderr.strip().splitlines()) == 1
