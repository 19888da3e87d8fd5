"""Reading image files for the metrics: every size, mode and format, each network's own preprocessing,
unreadable files listed at once, batches of bounded size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from memguard.errors import UserError
from memguard.metrics.images import image_batches, read_image, to_unit_tensor
from memguard.metrics.similarity import PixelEmbedder, SSCDEmbedder, embed_files
from tests.rehearsal import LAION_FILES, PooledDescriptor, write_awkward_image, write_laion


@pytest.fixture(scope="module")
def laion(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("data")
    write_laion(root, "laion10k")
    return [root / "laion10k" / "images" / f for f, *_ in LAION_FILES]


def test_every_mode_and_format_reads_as_8_bit_rgb(laion: list[Path]) -> None:
    for file, (_, kind, width, height) in zip(laion, LAION_FILES):
        image = read_image(file)
        assert image.mode == "RGB", kind
        assert image.size == (width, height), kind
        if kind == "exif_jpeg":  # stored sideways; the EXIF orientation is applied
            assert Image.open(file).size == (height, width)


def test_conversions_keep_the_picture(tmp_path: Path) -> None:
    reference = np.asarray(Image.open(_write(tmp_path, "rgb_png")).convert("RGB"), dtype=np.float64)
    gray = reference @ np.array([0.299, 0.587, 0.114])
    sixteen = np.asarray(read_image(_write(tmp_path, "gray16_png")), dtype=np.float64)
    assert np.abs(sixteen[..., 0] - gray).max() <= 1.5  # scaled by 1/257, not clipped to white
    assert np.abs(np.asarray(read_image(_write(tmp_path, "bmp")), dtype=np.float64) - reference).max() == 0
    rgba = np.asarray(read_image(_write(tmp_path, "rgba_png")))
    assert (rgba[: 64 // 3] == 255).all()  # the transparent top third is white
    assert np.abs(rgba[40:].astype(np.float64) - reference[40:]).max() == 0
    cmyk = np.asarray(read_image(_write(tmp_path, "cmyk_jpeg")), dtype=np.float64)
    assert np.abs(cmyk - reference).mean() < 8  # CMYK JPEG comes back as the picture, not inverted
    exif = np.asarray(read_image(_write(tmp_path, "exif_jpeg")), dtype=np.float64)
    assert np.abs(exif - reference).mean() < 4  # stored sideways, shown upright


def _write(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.img"
    write_awkward_image(path, kind, 48, 64, seed=7)
    return path


def test_mixed_sizes_embed_one_at_a_time_in_batches(laion: list[Path]) -> None:
    embedder = PixelEmbedder(size=16)
    ours = embed_files(laion, embedder, batch_size=3)  # batches that mix sizes; a ragged last one
    expected = torch.cat([embedder(to_unit_tensor(read_image(f))[None]) for f in laion])
    torch.testing.assert_close(ours, expected)
    sizes = [len(i) for i, _ in image_batches(laion, to_unit_tensor, batch_size=4)]
    assert sizes == [4, 4, 2]  # never more than one batch of pixels at a time
    torch.testing.assert_close(embed_files(laion, embedder, batch_size=4, num_workers=2), expected)


def test_sscd_files_are_preprocessed_as_dcr_does(laion: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "sscd.torchscript.pt"
    torch.jit.save(torch.jit.script(PooledDescriptor()), str(path))
    model = torch.jit.load(str(path)).eval()
    dcr = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                              transforms.Normalize([0.5], [0.5])])  # DCR diff_retrieval.py ret_transform
    files = laion[:2]  # the 500x375 JPEG and the 640x480 PNG of the issue
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(torch.stack([dcr(Image.open(f).convert("RGB")) for f in files])))
    torch.testing.assert_close(embed_files(files, SSCDEmbedder(path, mode="dcr")), expected)
    official = embed_files(laion, SSCDEmbedder(path, mode="official"), batch_size=4)  # no crop: shapes differ
    assert official.shape == (len(laion), 32) and torch.isfinite(official).all()


def test_unreadable_files_are_all_listed_or_skipped(laion: list[Path], tmp_path: Path) -> None:
    broken = [tmp_path / "a_truncated.jpg", tmp_path / "b_not_an_image.png"]
    broken[0].write_bytes(laion[0].read_bytes()[:300])
    broken[1].write_text("<html>404</html>")
    files = [laion[0], broken[0], laion[1], broken[1]]
    with pytest.raises(UserError, match=r"references: 2 image file\(s\) cannot be read: .*a_truncated.jpg .*"
                                        r"b_not_an_image.png .*skip_unreadable=true"):
        embed_files(files, PixelEmbedder(size=8))
    skipped: list[Path] = []
    kept = embed_files(files, PixelEmbedder(size=8), skipped=skipped, cache_dir=tmp_path / "cache")
    assert skipped == broken and kept.shape[0] == 2
    again: list[Path] = []
    assert embed_files(files, PixelEmbedder(size=8), skipped=again, cache_dir=tmp_path / "cache").equal(kept)
    assert again == broken  # the cache remembers what it left out
