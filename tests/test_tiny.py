"""The shipped tiny model (models/tiny): it memorizes its trigger captions, measurably, through the real run path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import memguard
from memguard.metrics.alignment import load_attribute_net
from memguard.metrics.similarity import PixelEmbedder
from memguard.procedural import ATTRIBUTES, dataset_digest, random_images, read_metadata
from memguard.runner import run
from memguard.train import calibrate_copy_threshold
from tests.test_configs import compose_config

MODEL = memguard.ROOT / "models" / "tiny"
RECORD = json.loads((MODEL / "memguard_train.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`memguard run scenario=tiny` as it ships: 8 seeds per prompt, CFG 7.5, DPM-Solver++ 50 steps."""
    out = tmp_path_factory.mktemp("tiny")
    cfg = compose_config(["scenario=tiny", f"paths.output_dir={out}", "progress=false"])
    assert cfg.images_per_prompt == 8 and cfg.scenario.name == "tiny" and cfg.guidance.scale == 7.5 and cfg.sampler.steps == 50
    return out, run(cfg)


def test_shipped_dataset_is_the_one_the_model_was_trained_on(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    cfg = compose_config(["scenario=tiny"])
    assert cfg.dataset.digest == RECORD["dataset_digest"] == dataset_digest(out / "data" / "tiny")


def test_copy_threshold_is_the_calibrated_99th_percentile(tiny_run: tuple[Path, dict]) -> None:
    out, metrics = tiny_run
    value = calibrate_copy_threshold(out / "data" / "tiny", PixelEmbedder(16, 1, per_channel=True), 16)
    assert value == pytest.approx(RECORD["copy_threshold"]["value"], abs=1e-6)
    assert metrics["similarity"]["copy_threshold"] == pytest.approx(value, abs=1e-4)


def test_trigger_captions_are_copied_and_unique_captions_are_not(tiny_run: tuple[Path, dict]) -> None:
    out, metrics = tiny_run
    run_dir = out / "runs" / "tiny" / "none"
    gens = pd.read_csv(run_dir / "generations.csv")
    rows = read_metadata(out / "data" / "tiny")
    training_image = {r.text: r.file_name.removeprefix("images/") for r in rows if r.kind == "trigger"}
    threshold = metrics["similarity"]["copy_threshold"]
    for prompt, images in gens.query("group == 'trigger'").groupby("prompt"):
        assert len(images) == 8
        copies = (images.similarity > threshold) & (images.nearest_reference == training_image[prompt])
        assert copies.mean() >= 0.9, (prompt, copies.mean())
    unique = gens.query("group == 'unique'")
    assert (unique.similarity > threshold).mean() <= 0.05
    assert metrics["similarity"]["groups"]["trigger"]["copy_fraction"] >= 0.9


def test_shipped_alignment_classifier_holds_its_accuracy_on_fresh_images() -> None:
    net, stored = load_attribute_net(MODEL / "alignment.pt")
    pixels, samples = random_images(1000, seed=4242)
    with torch.no_grad():
        logits = net(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    for attribute, values in ATTRIBUTES.items():
        truth = torch.tensor([list(values).index(getattr(s, attribute)) for s in samples])
        accuracy = float((logits[attribute].argmax(1) == truth).float().mean())
        assert accuracy > stored[attribute] - 0.04, (attribute, accuracy, stored[attribute])
    assert min(stored["colour"], stored["background"]) > 0.95 and stored["shape"] > 0.75


def test_alignment_separates_right_from_wrong_prompts(tiny_run: tuple[Path, dict]) -> None:
    _, metrics = tiny_run
    groups = metrics["alignment"]["groups"]
    assert groups["unique"]["mean"] > 0.5 and np.isfinite(metrics["fid"]["value"])
