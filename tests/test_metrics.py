"""CLIP score, FID and the attribute classifier: formulas against references, loaders on files made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memguard.errors import UserError
from memguard.metrics.alignment import (
    AttributeNet,
    AttributeScorer,
    ClipScorer,
    save_attribute_net,
    train_attribute_net,
)
from memguard.metrics.fid import AttributeFeatures, InceptionFeatures, PixelFeatures, frechet_distance
from tests.rehearsal import write_random_inception

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 3.0])
    va, vb = torch.cov(a.T).diagonal(), torch.cov(b.T).diagonal()
    off = torch.cov(a.T) - torch.diag(va)
    assert off.abs().max() < 0.1  # nearly diagonal, so the closed form nearly holds
    closed = float((a.mean(0) - b.mean(0)).square().sum() + (va + vb - 2 * (va * vb).sqrt()).sum())
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_equals_torchmetrics() -> None:
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randn(200, 8, generator=g, dtype=torch.float64) * 1.5
    expected = _compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-6)


def test_pixel_features_are_pooled_pixels() -> None:
    images = torch.rand(2, 3, 16, 16)
    assert torch.allclose(PixelFeatures(16, 2)(images).float(), F.avg_pool2d(images, 2).flatten(1), atol=1e-6)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised FID InceptionV3 state dict with the real network's keys and shapes."""
    path = tmp_path_factory.mktemp("weights") / "weights-inception-2015-12-05-6726825d.pth"
    write_random_inception(path)
    return path


@pytest.mark.slow
def test_inception_features_load_a_local_file(inception_file: Path) -> None:
    features = InceptionFeatures(inception_file)
    out = features(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 2048) and out.dtype == torch.float64 and torch.isfinite(out).all()
    assert features.kind == "fid" and inception_file.name in features.name


def test_inception_errors_name_the_key_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"metrics.fid.path='/no/inception.pth' is not a file; .*weights-inception-2015-12-05-6726825d.pth"):
        InceptionFeatures("/no/inception.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="is not the FID Inception state dict"):
        InceptionFeatures(corrupt)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match="is not the FID Inception state dict"):
        InceptionFeatures(wrong)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny open_clip architecture (config JSON) and its randomly initialised weights file."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    config = folder / "mg-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    model = open_clip.create_model("mg-tiny-clip")
    torch.save(model.state_dict(), folder / "weights.bin")
    return config, folder / "weights.bin"


def test_clip_score_is_the_raw_cosine_of_the_loaded_model(clip_files: tuple[Path, Path]) -> None:
    import open_clip

    config, weights = clip_files
    scorer = ClipScorer("mg-tiny-clip", weights, model_config=config)
    images, prompts = torch.rand(3, 3, 40, 40), ["a red circle", "a dog", "a blue square on a white background"]
    scores = scorer(images, prompts)
    reference = open_clip.create_model("mg-tiny-clip", pretrained=str(weights)).eval()
    from torchvision.transforms.v2.functional import to_pil_image

    pixels = torch.stack([scorer.preprocess(to_pil_image(im)) for im in images])
    with torch.no_grad():
        img = F.normalize(reference.encode_image(pixels), dim=-1)
        txt = F.normalize(reference.encode_text(open_clip.tokenize(prompts)), dim=-1)
    assert torch.allclose(scores, (img * txt).sum(-1), atol=1e-5)
    assert scorer.name == "clip[mg-tiny-clip, weights.bin]"


def test_clip_errors_name_the_key_and_the_download(clip_files: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = clip_files
    with pytest.raises(UserError, match=r"metrics.alignment.path='/no/clip.bin' is not a file; .*ViT-g-14"):
        ClipScorer("mg-tiny-clip", "/no/clip.bin", model_config=config)
    with pytest.raises(UserError, match="is not an open_clip model"):
        ClipScorer("no-such-model", "/no/clip.bin")
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(UserError, match="does not hold mg-tiny-clip weights"):
        ClipScorer("mg-tiny-clip", corrupt, model_config=config)


def test_attribute_classifier_learns_the_generator_labels(tmp_path: Path) -> None:
    net, accuracy = train_attribute_net(n_train=3000, n_test=500, epochs=3)
    assert accuracy["colour"] > 0.85 and accuracy["background"] > 0.85, accuracy  # untrained: 1/6, 1/4
    assert accuracy["shape"] > 0.3, accuracy  # chance 1/4; shape needs more data (the shipped one: see test_tiny)
    save_attribute_net(net, accuracy, tmp_path / "alignment.pt")
    scorer = AttributeScorer(tmp_path / "alignment.pt")
    assert scorer.name.startswith("attributes[alignment.pt, held-out accuracy shape ")
    features = AttributeFeatures(tmp_path / "alignment.pt")
    assert features(torch.rand(2, 3, 16, 16)).shape == (2, 128) and features.kind == "fid_attributes"


def test_attribute_scorer_rejects_other_prompts_and_files(tmp_path: Path) -> None:
    save_attribute_net(AttributeNet(), {"shape": 0.0, "colour": 0.0, "background": 0.0}, tmp_path / "a.pt")
    with pytest.raises(UserError, match="reads procedural captions"):
        AttributeScorer(tmp_path / "a.pt")(torch.rand(1, 3, 16, 16), ["a photo of a cat"])
    with pytest.raises(UserError, match="ships alignment.pt"):
        AttributeScorer(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="is not an attribute classifier written by memguard"):
        AttributeScorer(tmp_path / "bad.pt")
