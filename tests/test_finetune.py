"""memguard finetune on a tiny model: UNet-only training, checkpoints, resume, a loadable result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memguard.components import load_components
from memguard.finetune import captioned_images
from tests.test_cli import memguard_here as memguard


def test_imagenette_folders_get_the_template_caption(tmp_path: Path) -> None:
    for wnid in ("n01440764", "n03888605"):
        (tmp_path / wnid).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / wnid / "a.JPEG")
    assert [c for _, c in captioned_images(tmp_path, "An image of {}")] == ["An image of tench", "An image of parachute"]


@pytest.mark.slow
def test_finetune_checkpoints_resumes_and_saves_a_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / "images" / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"images/{i}.png", "text": f"photo {i}"}) + "\n"
                                                 for i in range(4)))
    args = ["finetune", "scenario=laion10k", f"finetune.base_model={tiny_model_dir}", f"finetune.data={data}",
            f"finetune.output_dir={tmp_path / 'ft'}", "finetune.settings.batch_size=2", "finetune.settings.lr=1e-3",
            "finetune.settings.resolution=32", "finetune.settings.checkpoint_every=2", "progress=false"]
    first = memguard(*args, "finetune.settings.steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "ft" / "checkpoints" / "step-2").is_dir()
    second = memguard(*args, "finetune.settings.steps=3", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stdout + second.stderr
    tuned = load_components(tmp_path / "ft" / "model-step-3")
    base = load_components(tiny_model_dir)
    changed = [not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters())]
    assert any(changed)
    assert all(torch.equal(a, b) for a, b in zip(tuned.text_encoder.parameters(), base.text_encoder.parameters()))
    again = memguard(*args, "finetune.settings.steps=3", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
