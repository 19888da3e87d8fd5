"""Similarity metric: nearest-reference logic against numpy, the SSCD loader and preprocessing, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from memguard.errors import UserError
from memguard.metrics.similarity import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PixelEmbedder,
    SSCDEmbedder,
    embed_files,
    nearest_references,
    summarize,
)


def normalized(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_nearest_and_summary_match_numpy() -> None:
    gen, ref = normalized(103, 16, 0), normalized(57, 16, 1)
    ours = nearest_references(gen, ref, chunk=10)  # several chunks, a ragged last one
    cos = gen.numpy() @ ref.numpy().T
    np.testing.assert_allclose(ours.similarity.numpy(), cos.max(1), rtol=1e-6)
    np.testing.assert_array_equal(ours.index.numpy(), cos.argmax(1))
    stats = summarize(ours.similarity, threshold=0.3)
    best = cos.max(1).astype(np.float64)
    assert stats["p95"] == pytest.approx(np.percentile(best, 95), rel=1e-6)
    assert stats["mean"] == pytest.approx(best.mean(), rel=1e-6)
    assert stats["std"] == pytest.approx(best.std(), rel=1e-5)
    assert stats["frac_above_0.3"] == pytest.approx((best > 0.3).mean())


def test_grouped_references_compare_each_generation_with_its_own() -> None:
    gen, ref = normalized(3, 8, 2), normalized(6, 8, 3)
    groups = [[0, 1], [2], [3, 4, 5]]
    ours = nearest_references(gen, ref, groups=groups)
    for i, group in enumerate(groups):
        sims = ref[group] @ gen[i]
        assert ours.similarity[i] == pytest.approx(sims.max().item())
        assert ours.index[i] == group[int(sims.argmax())]


def test_pixel_embedder_finds_the_copy() -> None:
    refs = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    noisy_copy = (refs[3:4] + 0.05 * torch.randn(1, 3, 16, 16)).clamp(0, 1)
    embed = PixelEmbedder(size=16, pool=2)
    result = nearest_references(embed(noisy_copy), embed(refs))
    assert result.index.item() == 3 and result.similarity.item() > 0.95
    assert embed.name == "pixel(size=16,pool=2)"
    torch.testing.assert_close(embed(refs).norm(dim=1), torch.ones(5))


class Flatten(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :32] * 2.0


@pytest.mark.parametrize(("mode", "expected"), [
    ("dcr", transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                transforms.Normalize([0.5] * 3, [0.5] * 3)])),
    ("official", transforms.Compose([transforms.Resize(288), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])),
])
def test_sscd_loader_and_preprocessing(tmp_path: Path, mode: str, expected) -> None:
    path = tmp_path / "sscd_test.torchscript.pt"
    torch.jit.save(torch.jit.script(Flatten()), str(path))
    embedder = SSCDEmbedder(path, mode=mode)
    image = torch.rand(1, 3, 300, 400, generator=torch.Generator().manual_seed(5))
    x = embedder.preprocess(image)
    torch.testing.assert_close(x, expected(image))
    assert x.shape[-2:] == ((224, 224) if mode == "dcr" else (288, 384))
    out = embedder(image)
    torch.testing.assert_close(out, torch.nn.functional.normalize(x.flatten(1)[:, :32], dim=1))
    assert embedder.name == f"sscd[sscd_test.torchscript.pt, {mode}]"


def test_sscd_errors_name_the_key_and_the_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"metrics.similarity.path='.*missing.pt' is not a file; download sscd_disc_large"):
        SSCDEmbedder(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a TorchScript model"):
        SSCDEmbedder(bad)
    with pytest.raises(UserError, match="mode='sscd288' is not one of dcr, official"):
        SSCDEmbedder(bad, mode="sscd288")


def test_reference_cache_is_reused_and_invalidated(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        files.append(tmp_path / f"ref{i}.png")
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(files[-1])

    class Counting(PixelEmbedder):
        calls = 0

        def __call__(self, images):
            Counting.calls += 1
            return super().__call__(images)

    embed, cache = Counting(size=8), tmp_path / "cache"
    first = embed_files(files, embed, cache_dir=cache)
    assert embed_files(files, embed, cache_dir=cache).equal(first) and Counting.calls == 1
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(files[1])  # a reference image changes
    embed_files(files, embed, cache_dir=cache)
    assert Counting.calls == 2
    embed_files(files, Counting(size=4), cache_dir=cache)  # another embedder setting
    assert Counting.calls == 3
    assert len(list(cache.glob("*.pt"))) == 3


def test_per_channel_pixel_similarity_ignores_per_channel_offset_and_gain() -> None:
    from memguard.metrics.similarity import PixelEmbedder

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g)
    saturated = (image * torch.tensor([1.5, 0.7, 0.4]).view(1, 3, 1, 1) + torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1))
    plain, per_channel = PixelEmbedder(16, 1), PixelEmbedder(16, 1, per_channel=True)
    assert (per_channel(image) @ per_channel(saturated).T).item() == pytest.approx(1.0, abs=1e-5)
    assert (plain(image) @ plain(saturated).T).item() < 0.95
    assert per_channel(image).norm().item() == pytest.approx(1.0, abs=1e-6)
    other = torch.rand(1, 3, 16, 16, generator=g)
    channels = [np.corrcoef(image[0, c].flatten(), other[0, c].flatten())[0, 1] for c in range(3)]
    assert (per_channel(image) @ per_channel(other).T).item() == pytest.approx(np.mean(channels), abs=1e-5)
    assert per_channel.name == "pixel(size=16,pool=1,per_channel)"
