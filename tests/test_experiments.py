"""Each paper table's grid, run end to end on a tiny model with the scenario's loaders pointed at fixtures (the
commands in this process: tests/test_reproduce.py runs them as `make reproduce` does)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memguard.tables import PAPER_TABLES
from tests.test_cli import memguard_here as memguard

pytestmark = pytest.mark.slow


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def write_fixtures(data: Path) -> None:
    """Two prompts and a few reference images for each paper scenario, in each dataset's own format."""
    for name in ("laion10k", "laion100k"):
        rows = [{"file_name": f"images/{i}.png", "text": f"a photo number {i}"} for i in range(2)]
        (data / name).mkdir(parents=True)
        (data / name / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for i in range(2):
            _image(data / name / "images" / f"{i}.png", 60 * i)
    for wnid in ("n02979186", "n03028079"):
        _image(data / "imagenette2" / "train" / wnid / "ILSVRC2012_val_0.JPEG", 100)
    (data / "wen_dup200" / "images").mkdir(parents=True)
    (data / "wen_dup200" / "prompts.jsonl").write_text('{"caption": "a memorized photo"}\n{"caption": "another"}\n')
    _image(data / "wen_dup200" / "images" / "0.png", 30)
    webster = data / "webster500"
    webster.mkdir()
    (webster / "sdv1_500_memorized.jsonl").write_text(
        '{"caption": "a poster", "index": 3, "url": "u"}\n{"caption": "a book cover", "index": 9, "url": "u"}\n')
    _image(webster / "gt_images" / "3" / "0.png", 10)
    _image(webster / "gt_images" / "9" / "0.png", 200)


@pytest.mark.parametrize("table", PAPER_TABLES, ids=lambda t: f"table{t.number}")
def test_table_grid_runs_and_fills_its_table(table, tiny_model_dir: Path, tmp_path: Path) -> None:
    write_fixtures(tmp_path / "data")
    result = memguard("run", "-m", f"experiment=table{table.number}", f"model.path={tiny_model_dir}",
                      f"paths.data_dir={tmp_path / 'data'}", "metrics=pixel", "images_per_prompt=1",
                      "sampler.steps=3", "resolution=32", "progress=false", "prompt_draw=null", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = memguard("tables", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "outputs" / "tables" / f"table{table.number}.csv")
    assert frame["Similarity (95pc)"].notna().all(), frame  # every row's run exists and was evaluated
    assert (frame["similarity by"] == "pixel(size=32,pool=1)").all()
