"""FID streamed through torchmetrics' running sums, with the references' sums cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memguard.errors import UserError
from memguard.metrics.fid import PixelFeatures, fid_of_files, frechet_distance
from memguard.metrics.similarity import embed_files


class CountingFeatures(PixelFeatures):
    def __init__(self) -> None:
        super().__init__(size=8, pool=2)
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return super().__call__(images)


def write_images(folder: Path, n: int, seed: int, shift: float = 0.0) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        side = 12 + 4 * (i % 3)  # sizes mixed in a batch
        pixels = np.clip(rng.normal(0.5 + shift, 0.2, (side, side, 3)), 0, 1)
        files.append(folder / f"{i:03d}.png")
        Image.fromarray((pixels * 255).astype(np.uint8)).save(files[-1])
    return files


def test_streamed_fid_equals_the_whole_feature_matrices(tmp_path: Path) -> None:
    generated, references = write_images(tmp_path / "g", 40, 0, 0.1), write_images(tmp_path / "r", 50, 1)
    features = CountingFeatures()
    expected = frechet_distance(embed_files(generated, features), embed_files(references, features))
    streamed = fid_of_files(generated, references, features, batch_size=7)  # ragged batches of mixed sizes
    assert streamed == pytest.approx(expected, rel=1e-6) and streamed > 0

    cache = tmp_path / "cache"
    first = fid_of_files(generated, references, features, cache_dir=cache, batch_size=16)
    assert len(list(cache.glob("fid-*.pt"))) == 1
    features.images = 0
    second = fid_of_files(generated, references, features, cache_dir=cache, batch_size=16)
    assert features.images == len(generated)  # the references' sums came from the cache
    assert second == first == pytest.approx(expected, rel=1e-6)


def test_unreadable_references_listed_or_skipped(tmp_path: Path) -> None:
    generated, references = write_images(tmp_path / "g", 6, 0), write_images(tmp_path / "r", 6, 1)
    references[2].write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"references: 1 image file\(s\) cannot be read: .*002.png"):
        fid_of_files(generated, references, PixelFeatures(8, 2))
    skipped: list[Path] = []
    kept = [f for f in references if f != references[2]]
    value = fid_of_files(generated, references, PixelFeatures(8, 2), cache_dir=tmp_path / "c", skipped=skipped)
    assert skipped == [references[2]]
    assert value == pytest.approx(fid_of_files(generated, kept, PixelFeatures(8, 2)), rel=1e-9)
    again: list[Path] = []
    assert fid_of_files(generated, references, PixelFeatures(8, 2), cache_dir=tmp_path / "c", skipped=again) == value
    assert again == [references[2]]
