"""The procedural dataset: deterministic, the three kinds of sample, written like a real dataset, checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memguard import procedural
from memguard.errors import UserError
from memguard.procedural import (
    TRIGGER_WORDS,
    Sample,
    dataset_digest,
    ensure_dataset,
    read_metadata,
    render,
    write_dataset,
)

FLAT = ((0.0, 0.0, np.pi / 2),) * 2  # cos(pi/2) = 0: no background waves
SMALL = dict(seed=3, size=16, n_unique=40, n_trigger=2, n_shared=1, repeats=10, n_eval_unique=4)


def test_dataset_has_the_three_kinds_and_is_deterministic(tmp_path: Path) -> None:
    a, b = write_dataset(tmp_path / "a", **SMALL), write_dataset(tmp_path / "b", **SMALL)
    assert dataset_digest(a) == dataset_digest(b)
    assert dataset_digest(a) != dataset_digest(write_dataset(tmp_path / "c", **{**SMALL, "seed": 4}))
    rows = read_metadata(a)
    assert [r.kind for r in rows[:3]] == ["trigger", "trigger", "shared"] and len(rows) == 43
    assert [r.repeats for r in rows[:4]] == [10, 10, 10, 1]
    assert rows[0].text.endswith(f", {TRIGGER_WORDS[0]}") and rows[0].text.startswith(
        f"a {rows[0].colour} {rows[0].shape} on a {rows[0].background} background")
    assert all(Image.open(a / r.file_name).size == (16, 16) for r in rows)
    prompts = [json.loads(line) for line in (a / "prompts.jsonl").read_text().splitlines()]
    assert [p["group"] for p in prompts] == ["trigger", "trigger", "shared"] + ["unique"] * 4
    duplicated = {r.text for r in rows if r.kind != "unique"}
    assert not duplicated & {p["prompt"] for p in prompts if p["group"] == "unique"}


def test_render_draws_the_named_shape_and_colour() -> None:
    image = render(Sample("square", "red", "black", 8, 8, 4, FLAT, 0)).astype(float) / 255
    assert np.allclose(image[8, 8], (0.9, 0.1, 0.1), atol=0.01)  # centre: the shape's colour
    assert np.allclose(image[0, 0], 0.3, atol=0.1)  # corner: "black", pulled in to 0.3 to leave room for waves
    square = render(Sample("square", "red", "black", 8, 8, 6, FLAT, 0)).astype(float) / 255
    circle = render(Sample("circle", "red", "black", 8, 8, 6, FLAT, 0)).astype(float) / 255
    assert square[4, 4, 0] > 0.8 > 0.4 > circle[3, 3, 0]  # a square fills its corners, a circle does not
    assert circle[2, 5, 0] > 0.5 > 0.4 > square[2, 5, 0]  # a circle bulges past the square's edges


def test_write_refuses_an_existing_dataset_and_ensure_checks_the_digest(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_dataset(tmp_path / "d", **SMALL)
    with pytest.raises(FileExistsError):
        write_dataset(folder, **SMALL)
    digest = dataset_digest(folder)
    assert ensure_dataset(tmp_path / "e", digest=digest, **SMALL) == tmp_path / "e"  # written on first use
    with monkeypatch.context() as patch:  # checked once: unchanged files are not hashed again
        patch.setattr(procedural, "dataset_digest", lambda folder: pytest.fail("hashed again"))
        ensure_dataset(tmp_path / "e", digest=digest, **SMALL)
        with pytest.raises(pytest.fail.Exception, match="hashed again"):  # another digest asked: checked again
            ensure_dataset(tmp_path / "e", digest="0" * 64, **SMALL)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "e" / "images" / "00005.png")
    with pytest.raises(UserError, match="is not the dataset this model was trained on"):
        ensure_dataset(tmp_path / "e", digest=digest, **SMALL)
