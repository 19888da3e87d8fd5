"""Frechet distance between the feature statistics of generations and of a reference set.

    FID = ||mu_g - mu_r||^2 + Tr(S_g) + Tr(S_r) - 2 Tr((S_g S_r)^(1/2))

computed in float64, the trace of the matrix square root as the sum of square roots of the eigenvalues of
``S_g S_r`` (as torchmetrics does). The evaluation streams (:func:`fid_of_files`): features are computed a
batch at a time and only their running sums are kept, in torchmetrics' ``FrechetInceptionDistance`` (whose
states are ``n``, ``sum x``, ``sum x x^T``), and the reference set's sums are cached; :func:`frechet_distance`
takes two whole feature matrices. Feature extractors, each named in the output:

- ``inception`` (:class:`InceptionFeatures`): the standard FID network, torch-fidelity's InceptionV3 port of the
  TensorFlow graph, 2048-d pool features, its standard preprocessing (uint8 input, TF1-compatible bilinear
  resize to 299, ``(x - 128) / 128``), from a local weights file. Only this one is "FID".
- ``pixel`` / ``attributes``: for the tiny scenario (pooled pixels; the attribute classifier's 128-d features).
  Reported as ``fid_pixel`` / ``fid_attributes``, never mixed with Inception FID.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from memguard.components import resolve_device
from memguard.errors import UserError
from memguard.metrics.alignment import load_attribute_net
from memguard.metrics.images import (
    SKIP_FIX, Unreadable, apply_by_shape, embed_of, image_batches, to_uint8_tensor, transform_of,
)
from memguard.metrics.similarity import files_digest

INCEPTION_HELP = ("the FID Inception weights are a local file: weights-inception-2015-12-05-6726825d.pth from "
                  "https://github.com/toshas/torch-fidelity/releases (v0.2.0), the TensorFlow FID network converted")


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """FID between two feature sets ``(N, D)`` and ``(M, D)`` (N, M >= 2), in float64."""
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    sqrt_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * sqrt_trace)


class InceptionFeatures:
    """2048-d pool features of the FID InceptionV3 (torch-fidelity), from a local weights file."""

    kind = "fid"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", key: str = "metrics.fid.path") -> None:
        # start-up: torch-fidelity loads only for Inception
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        device = resolve_device(device)
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"{key}={str(path)!r} is not a file; {INCEPTION_HELP}")
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(file)).to(device)
        except Exception as err:
            raise UserError(f"{key}={str(path)!r} is not the FID Inception state dict "
                            f"({str(err).splitlines()[0][:200]}); {INCEPTION_HELP}") from err
        self.device = device
        self.name = f"inception-v3-compat[{file.name}, pool 2048]"
        # files: each image as torch-fidelity reads it (uint8 RGB, any size); the network resizes it to 299
        self.transform = to_uint8_tensor

    @torch.no_grad()
    def embed(self, pixels: Tensor) -> Tensor:
        """Features of uint8 images ``(B, 3, H, W)`` of one size (torch-fidelity resizes them itself)."""
        return self.model(pixels.to(self.device))[0].double().cpu()

    def __call__(self, images: Tensor) -> Tensor:
        return self.embed((images.clamp(0, 1) * 255).round().to(torch.uint8))


class PixelFeatures:
    """Average-pooled pixels ``(3 * (size/pool)^2)``-d: a feature space for tiny images, not Inception."""

    kind = "fid_pixel"

    def __init__(self, size: int = 16, pool: int = 2) -> None:
        self.size, self.pool = size, pool
        self.name = f"pixel(size={size},pool={pool})"

    def __call__(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True)
        return F.avg_pool2d(x, self.pool).flatten(1).double()


class AttributeFeatures:
    """The tiny scenario's attribute classifier's 128-d penultimate features (the role Inception plays for FID)."""

    kind = "fid_attributes"

    def __init__(self, path: str | Path, key: str = "metrics.fid.path") -> None:
        self.net, _ = load_attribute_net(path, key)
        self.name = f"attributes[{Path(path).name}, penultimate 128]"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.net.features(images).double()


# ---------------------------------------------------------------------------------------------------------------
# Streaming: running sums instead of every feature, and the references' sums cached


class _Given(torch.nn.Module):
    """The identity, as torchmetrics' feature network: memguard's extractors compute the features first (per
    image shape, each network's own preprocessing), and torchmetrics keeps their running sums."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def streaming_fid(num_features: int):  # -> torchmetrics.image.fid.FrechetInceptionDistance
    """torchmetrics' ``FrechetInceptionDistance`` over features given to ``update``: it holds ``n``, ``sum x`` and
    ``sum x x^T`` per side in float64 (``D x D``: 32 MB for Inception's 2048), never the features themselves, and
    its ``compute`` is the formula above (``torchmetrics/image/fid.py``, ``_compute_fid``)."""
    # start-up: torchmetrics loads only when FID is computed
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=_Given(num_features), reset_real_features=False)


def _stream(metric, files: list[Path], features, real: bool, batch_size: int, num_workers: int, unreadable):
    transform, embed = transform_of(features), embed_of(features)
    for _, tensors in image_batches(files, transform, batch_size, num_workers, unreadable):
        batch = apply_by_shape(embed, tensors).double()
        metric = metric if metric is not None else streaming_fid(batch.shape[1])
        metric.update(batch, real=real)
    return metric


def fid_of_files(generated: list[Path], references: list[Path], features, cache_dir: str | Path | None = None,
                 num_workers: int = 0, skipped: list[Path] | None = None, batch_size: int = 64,
                 generated_key: str = "run_dir", reference_key: str = "references",
                 generated_fix: str | None = None) -> float:
    """The Frechet distance between two sets of image files under ``features``, streamed in batches.

    The references' running sums are cached in ``cache_dir`` (``fid-<digest>.pt``), keyed like the similarity
    embeddings by the SHA-256 of the extractor's name and the files' names and bytes, so a reference set is read
    once per extractor. Unreadable files: as :func:`memguard.metrics.similarity.embed_files` (one error listing
    them all, or, with ``skipped`` a list, left out and appended to it).
    """

    metric, cache_file = None, None
    if cache_dir is not None:
        digest = hashlib.sha256(f"fid-statistics\n{features.name}\n{files_digest(references)}".encode()).hexdigest()
        cache_file = Path(cache_dir) / f"fid-{digest[:32]}.pt"
    if cache_file is not None and cache_file.exists():
        cached = torch.load(cache_file)
        if cached["skipped"] and skipped is None:
            raise Unreadable([Path(f) for f in cached["skipped"]], cached["reasons"]).error(reference_key, SKIP_FIX)
        metric = streaming_fid(cached["real_features_sum"].shape[0])
        for state in REAL_STATES:
            setattr(metric, state, cached[state])
        unread = [Path(f) for f in cached["skipped"]]
    else:
        unreadable = Unreadable()
        metric = _stream(None, references, features, True, batch_size, num_workers, unreadable)
        if unreadable.files and skipped is None:
            raise unreadable.error(reference_key, SKIP_FIX)
        if metric is None:
            raise UserError(f"{reference_key}: none of the {len(references)} image files can be read")
        unread = unreadable.files
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs each write their own, then rename
            torch.save({**{s: getattr(metric, s) for s in REAL_STATES}, "features": features.name,
                        "skipped": [str(f) for f in unread], "reasons": unreadable.reasons}, tmp)
            tmp.replace(cache_file)
    if skipped is not None:
        skipped.extend(unread)
    unreadable = Unreadable()
    _stream(metric, generated, features, False, batch_size, num_workers, unreadable)
    if unreadable.files:
        raise unreadable.error(generated_key, *(() if generated_fix is None else (generated_fix,)))
    if min(int(metric.real_features_num_samples), int(metric.fake_features_num_samples)) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    return float(metric.compute())
