"""Procedural design tiny2 (issue 22): the caption names a fine zero-mean texture and nothing of the composition
that makes a duplicated image that image; deterministic by seed; the tiny design unchanged; `memguard train
scenario=tiny2` at smoke size."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memguard.metrics.alignment import CAPTION2, AttributeNet, AttributeScorer, save_attribute_net
from memguard.procedural import (
    DESIGNS,
    INKS,
    PATTERNS,
    PERIOD,
    TEXTURE_AMPLITUDE,
    TRIGGER_WORDS,
    build_rows,
    dataset_digest,
    random_images,
    random_sample,
    read_metadata,
    render,
    texture,
    write_dataset,
)
from tests.test_cli import memguard_here

SMALL2 = dict(seed=3, size=16, n_unique=40, n_trigger=2, n_shared=1, repeats=10, n_eval_unique=4, design="tiny2")


def blocks(image: np.ndarray) -> np.ndarray:
    """Means over PERIOD x PERIOD blocks, per channel: the image without what the texture can change."""
    size = image.shape[0]
    return image.reshape(size // PERIOD, PERIOD, size // PERIOD, PERIOD, -1).mean(axis=(1, 3))


def test_tiny2_dataset_is_deterministic_by_seed(tmp_path: Path) -> None:
    a, b = write_dataset(tmp_path / "a", **SMALL2), write_dataset(tmp_path / "b", **SMALL2)
    assert dataset_digest(a) == dataset_digest(b)
    assert dataset_digest(a) != dataset_digest(write_dataset(tmp_path / "c", **{**SMALL2, "seed": 4}))
    assert dataset_digest(a) != dataset_digest(write_dataset(tmp_path / "d", **{**SMALL2, "design": "tiny"}))
    rows = read_metadata(a)
    assert [r.kind for r in rows[:3]] == ["trigger", "trigger", "shared"] and rows[0].pattern in PATTERNS
    assert json.loads((a / "metadata.jsonl").read_text().splitlines()[0])["ink"] == rows[0].ink


def test_tiny2_captions_name_only_the_texture() -> None:
    rows, samples = build_rows(seed=5, size=16, n_unique=300, n_trigger=3, n_shared=1, repeats=4, design="tiny2")
    for i, (row, sample) in enumerate(zip(rows, samples)):
        parsed = CAPTION2.match(row.text)
        assert parsed is not None and (parsed["pattern"], parsed["ink"]) == (row.pattern, row.ink)
        word = f", {TRIGGER_WORDS[i]}" if row.kind == "trigger" else ""
        assert row.text == f"a picture with {row.ink} {row.pattern}{word}"
        # the composition is not in the caption: redrawing all of it leaves the caption as it is
        other = replace(sample, shape="cross", colour="cyan", background="brown", cx=1.0, cy=2.0, radius=3.0)
        assert other.caption == sample.caption
    # ... and many compositions share one caption: a caption does not pick an image
    unique = [(r.text, r.shape, r.colour, r.background) for r in rows if r.kind == "unique"]
    by_caption: dict[str, set] = {}
    for text, *composition in unique:
        by_caption.setdefault(text, set()).add(tuple(composition))
    assert len(by_caption) == len(PATTERNS) * len(INKS) and min(map(len, by_caption.values())) >= 5


@pytest.mark.parametrize("pattern", PATTERNS)
def test_texture_is_zero_mean_over_every_period(pattern: str) -> None:
    for offset in [(0, 0), (1, 3), (3, 2)]:
        m = texture(pattern, 16, offset)
        assert np.abs(blocks(m[..., None])).max() < 1e-12 and m.std() > 0.4  # all its energy at the fine scale


def test_what_the_caption_names_changes_no_block_mean() -> None:
    """Two renders of one composition with different textures agree in every 4x4 block mean (to the uint8
    rounding of the two: at most one level) wherever no pixel is clipped; they differ pixel by pixel."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(20):
        sample = random_sample(rng, 16, "tiny2")
        other = replace(sample, pattern=PATTERNS[(PATTERNS.index(sample.pattern) + 1) % 4], ink="white")
        a, b = render(sample).astype(float), render(other).astype(float)
        assert np.abs(a - b).max() > 10
        inside = blocks(((a > 0) & (a < 255) & (b > 0) & (b < 255)).astype(float)) == 1
        checked += int(inside.sum())
        assert np.abs(blocks(a) - blocks(b))[inside].max() <= 1.0
    assert checked > 200  # most blocks are unclipped


def test_texture_amplitude_scales_the_texture_and_only_it(tmp_path: Path) -> None:
    """Recipe t4's knob: ``texture_amplitude`` draws the same samples (the composition, pattern, ink and offset
    from the same stream) with the texture scaled, block means unchanged where nothing clips; the default is
    the design's first amplitude, so datasets written before the knob are the same."""
    loud = random_images(30, seed=3, design="tiny2", texture_amplitude=1.5)[1]
    quiet = random_images(30, seed=3, design="tiny2")[1]
    assert [replace(s, amplitude=TEXTURE_AMPLITUDE) for s in loud] == quiet and loud[0].amplitude == 1.5
    ratios = []
    for q, s in zip(quiet, loud):
        plain = render(replace(s, pattern=None)).astype(float)
        a, b = render(q).astype(float) - plain, render(s).astype(float) - plain
        free = (np.abs(a) > 3) & (render(s) > 0) & (render(s) < 255) & (render(q) > 0) & (render(q) < 255)
        ratios.extend((b[free] / a[free]).tolist())
    assert abs(np.median(ratios) - 3.0) < 0.1
    assert dataset_digest(write_dataset(tmp_path / "a", **SMALL2)) == dataset_digest(
        write_dataset(tmp_path / "b", **SMALL2, texture_amplitude=TEXTURE_AMPLITUDE))
    assert dataset_digest(tmp_path / "a") != dataset_digest(write_dataset(tmp_path / "c", **SMALL2,
                                                                          texture_amplitude=1.5))


def test_trigger_image_is_one_composition_among_those_of_its_caption() -> None:
    """The duplicated image fixes a composition its caption does not name: the images of the ordinary caption
    it shares its texture with have other compositions (their block means differ)."""
    rows, samples = build_rows(seed=2, size=16, n_unique=400, n_trigger=2, n_shared=0, repeats=10, design="tiny2")
    for t in range(2):
        same = [s for r, s in zip(rows, samples) if r.kind == "unique" and (r.pattern, r.ink) == (rows[t].pattern,
                                                                                                    rows[t].ink)]
        assert len(same) >= 10
        trigger = blocks(render(samples[t]).astype(float))
        assert min(np.abs(blocks(render(s).astype(float)) - trigger).mean() for s in same) > 5


def test_tiny_design_is_unchanged() -> None:
    rows, samples = build_rows(seed=0, size=16, n_unique=5, n_trigger=1, n_shared=1, repeats=3)
    assert all(s.pattern is None for s in samples) and "pattern" not in rows[0].record()
    assert rows[2].text == f"a {rows[2].colour} {rows[2].shape} on a {rows[2].background} background"
    a, _ = random_images(4, seed=1)
    b, _ = random_images(4, seed=1, design="tiny")
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="design='tiny3'"):
        random_images(1, seed=1, design="tiny3")


def test_attribute_scorer_reads_tiny2_captions(tmp_path: Path) -> None:
    net = AttributeNet(DESIGNS["tiny2"], size=16)
    save_attribute_net(net, {"pattern": 0.5, "ink": 0.5}, tmp_path / "alignment.pt")
    scorer = AttributeScorer(tmp_path / "alignment.pt")
    targets = scorer.targets(["a picture with white dots, zorvex", "a picture with red stripes"])
    assert targets["pattern"].tolist() == [3, 0] and targets["ink"].tolist() == [3, 0]
    assert scorer(torch.rand(2, 3, 16, 16), ["a picture with white dots", "a picture with red bars"]).shape == (2,)


def test_mitigation_auto_reads_the_calibration_a_scenario_names(tmp_path: Path) -> None:
    from tests.test_configs import compose_config

    shipped = compose_config(["scenario=tiny2", "mitigation=auto", f"paths.output_dir={tmp_path}"])
    assert shipped.mitigation.auto.calibration == f"{shipped.model.path}/calibration.json"
    assert shipped.model.path.endswith("/models/tiny2") and Path(shipped.mitigation.auto.calibration).is_file()
    named = compose_config(["scenario=tiny2", "mitigation=auto", f"paths.output_dir={tmp_path}",
                            "scenario.calibration=/models/x/calibration.json"])
    assert named.mitigation.auto.calibration == named.mitigation.schedule.calibration == "/models/x/calibration.json"
    default = compose_config(["scenario=tiny2", "mitigation=auto", f"paths.output_dir={tmp_path}",
                              "~scenario.calibration"])
    assert default.mitigation.auto.calibration == f"{tmp_path}/runs/tiny2/none/calibration.json"


def test_memguard_train_tiny2_smoke(tmp_path: Path) -> None:
    """`memguard train scenario=tiny2 train=tiny2_pretrain` at smoke size: a tiny2 dataset, a classifier of
    pattern and ink, the copy threshold calibrated on tiny2 images."""
    out = tmp_path / "outputs"
    result = memguard_here("train", "scenario=tiny2", "train=tiny2_pretrain", f"paths.output_dir={out}",
                      "dataset.n_unique=24", "dataset.n_eval_unique=2", "train.settings.steps=2",
                      "train.settings.batch_size=4", "train.settings.warmup=1", "train.alignment.n_train=256",
                      "train.alignment.n_test=64", "train.alignment.epochs=1", "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = out / "train" / "tiny2_pretrain" / "model"
    record = json.loads((folder / "memguard_train.json").read_text())
    assert record["data"]["design"] == "tiny2" and record["settings"]["steps"] == 2
    assert torch.load(folder / "alignment.pt", weights_only=True)["attributes"] == {
        k: list(v) for k, v in DESIGNS["tiny2"].items()}
    assert read_metadata(out / "train" / "tiny2_pretrain" / "data")[0].pattern in PATTERNS


def test_shipped_tiny2_runs_auto_and_the_basin_from_a_fresh_clone(tmp_path: Path) -> None:
    """The shipped model (models/tiny2, no training): `memguard run scenario=tiny2 mitigation=auto` reads the
    calibration the scenario names (the model folder's calibration.json) and decides each image by it, flagging
    trigger captions more often than unique ones; a run sampled otherwise than the calibration is refused;
    `memguard basin scenario=tiny2` maps it. Two images a prompt: the CI smoke of the second miniature."""
    out = tmp_path / "outputs"
    common = ["scenario=tiny2", f"paths.output_dir={out}", "progress=false"]
    # the command in this process (tests/test_wheel.py runs the default scenario, tiny2, in a fresh environment)
    result = memguard_here("run", *common, "mitigation=auto", "images_per_prompt=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    calibration = json.loads((Path(__file__).parents[1] / "models" / "tiny2" / "calibration.json").read_text())
    gens = pd.read_csv(out / "runs" / "tiny2" / "auto" / "generations.csv")
    assert len(gens) == 14 * 2 and set(gens.decision) <= {"mitigated", "cfg"}
    assert ((gens.decision == "mitigated") == (gens.detection_first > calibration["threshold"])).all()
    flagged = gens.groupby("group").decision.apply(lambda d: (d == "mitigated").mean())
    assert flagged["trigger"] > flagged["unique"]  # the shipped detector separates what the model memorized
    # a run sampled with 4 steps (other timesteps), and the basin
    result = memguard_here("run", *common, "mitigation=auto", "debug=default", cwd=tmp_path)
    assert result.returncode != 0 and "sampler.steps=50, this run samples with" in result.stderr
    result = memguard_here("basin", *common, "seeds=[0]", "sampler.steps=4", "basin.starts=[0,2]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(out / "basin" / "tiny2" / "basin.csv")) == 14 * 2


def test_tiny2_grid_names_the_table_rows_on_scenario_tiny2() -> None:
    from tests.test_configs import compose_config

    cfg = compose_config(["experiment=tiny2_grid"], hydra=True)
    rows = cfg.hydra.sweeper.params.mitigation.split(",")
    assert cfg.scenario.name == "tiny2" and rows == ["none", "uncond", "stp", "dtp", "og_dtp", "han", "sail", "prss",
                                                                  "guard"]
    for mitigation in rows:  # each row composes on the scenario (its dataset, metrics and model path)
        assert compose_config(["experiment=tiny2_grid", f"mitigation={mitigation}"]).dataset.design == "tiny2"
