"""Frechet distance between the feature statistics of generations and of a reference set.

    FID = ||mu_g - mu_r||^2 + Tr(S_g) + Tr(S_r) - 2 Tr((S_g S_r)^(1/2))

computed in float64, the trace of the matrix square root as the sum of square roots of the eigenvalues of
``S_g S_r`` (as torchmetrics does). Feature extractors, each named in the output:

- ``inception`` (:class:`InceptionFeatures`): the standard FID network, torch-fidelity's InceptionV3 port of the
  TensorFlow graph, 2048-d pool features, its standard preprocessing (uint8 input, TF1-compatible bilinear
  resize to 299, ``(x - 128) / 128``), from a local weights file. Only this one is "FID".
- ``pixel`` / ``attributes``: for the tiny scenario (pooled pixels; the attribute classifier's 128-d features).
  Reported as ``fid_pixel`` / ``fid_attributes``, never mixed with Inception FID.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from memguard.components import resolve_device
from memguard.errors import UserError
from memguard.metrics.images import to_uint8_tensor

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
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        device = resolve_device(device)
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"{key}={str(path)!r} is not a file; {INCEPTION_HELP}")
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(file)).to(device)
        except Exception as err:  # noqa: BLE001  (unpickling, missing or unexpected keys: not this network)
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
        from memguard.metrics.alignment import load_attribute_net

        self.net, _ = load_attribute_net(path, key)
        self.name = f"attributes[{Path(path).name}, penultimate 128]"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.net.features(images).double()
