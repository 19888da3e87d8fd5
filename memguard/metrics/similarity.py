"""Copy similarity: each generation's nearest reference (training) image under an embedder.

    sim_i = max_j <e(g_i), e(r_j)>,  e(.) L2-normalised,  nearest_i = argmax_j

reported as the 95th percentile, mean, std and the fraction above a threshold (0.5 for SSCD, Somepalli et
al.). Every result carries the embedder's name, so a pixel-space number is never mistaken for an SSCD one.

Embedders:

- ``pixel``: mean-centred, L2-normalised pixels (optionally average-pooled first, optionally per colour
  channel). For the embedded tiny scenario, where copies are exact up to noise and colour saturation. Not SSCD.
- ``sscd``: a TorchScript SSCD descriptor (``sscd_disc_large.torchscript.pt``, ``sscd_disc_mixup...``) from a
  local file, with one of two preprocessings, named in every output:
  ``dcr``: resize 256, centre-crop 224, normalise mean 0.5 / std 0.5 (what the paper's numbers used, after
  Somepalli et al.'s DCR code); ``official``: resize 288, ImageNet mean/std (the SSCD authors' README).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from memguard.components import resolve_device
from memguard.errors import UserError
from memguard.metrics.images import (
    SKIP_FIX,
    Unreadable,
    apply_by_shape,
    embed_of,
    image_batches,
    read_image,
    transform_of,
)

SSCD_URL = "https://github.com/facebookresearch/sscd-copy-detection (README: pretrained models)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# mode -> (resize of the shorter side, centre crop or None, mean, std)
SSCD_PREPROCESSING = {
    "dcr": (256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "official": (288, None, IMAGENET_MEAN, IMAGENET_STD),
}


class Embedder:
    """Maps images ``(B, 3, H, W)`` in ``[0, 1]`` to L2-normalised embeddings ``(B, D)``.

    :func:`embed_files` reads files through ``transform`` (one PIL image to one tensor, default ``[0, 1]``
    pixels) and ``embed`` (a stack of same-shaped transformed images to embeddings, default ``__call__``); see
    memguard.metrics.images.
    """

    name: str = "embedder"

    def __call__(self, images: Tensor) -> Tensor:
        raise NotImplementedError


class PixelEmbedder(Embedder):
    """Mean-centred, L2-normalised pixels at a fixed size, after ``pool x pool`` average pooling.

    Cosine of two such vectors is the Pearson correlation of their (pooled) pixels. With ``per_channel``, each
    colour channel is centred and normalised on its own (and the three scaled by 1/sqrt(3)), so the cosine is
    the mean of the three channels' correlations: a copy whose colours CFG has saturated (a per-channel
    offset and gain) still scores as a copy. Images are resized (bilinear) to ``size`` first so references and
    generations of other sizes compare.
    """

    def __init__(self, size: int = 32, pool: int = 1, per_channel: bool = False) -> None:
        if size < 1 or pool < 1 or size % pool:
            raise ValueError(f"size={size} must be a positive multiple of pool={pool}")
        self.size, self.pool, self.per_channel = size, pool, per_channel
        self.name = f"pixel(size={size},pool={pool}{',per_channel' if per_channel else ''})"

    def __call__(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=True)
        x = F.avg_pool2d(x, self.pool).flatten(2 if self.per_channel else 1)
        x = F.normalize(x - x.mean(dim=-1, keepdim=True), dim=-1)
        return x.flatten(1) / 3**0.5 if self.per_channel else x


class SSCDEmbedder(Embedder):
    """An SSCD TorchScript descriptor from a local file, with ``dcr`` or ``official`` preprocessing."""

    def __init__(self, path: str | Path, mode: str = "dcr", device: str | torch.device = "cpu",
                 key: str = "metrics.similarity.path") -> None:
        device = resolve_device(device)
        if mode not in SSCD_PREPROCESSING:
            raise UserError(f"SSCD preprocessing mode={mode!r} is not one of {', '.join(SSCD_PREPROCESSING)}")
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"{key}={str(path)!r} is not a file; download sscd_disc_large.torchscript.pt or "
                            f"sscd_disc_mixup.torchscript.pt from {SSCD_URL}")
        try:
            with warnings.catch_warnings():  # SSCD's weights are published as TorchScript only
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(file), map_location=device).eval()
        except RuntimeError as err:
            raise UserError(f"{key}={str(path)!r} is not a TorchScript model ({str(err).splitlines()[0]}); "
                            f"use the .torchscript.pt files from {SSCD_URL}") from err
        self.mode, self.device = mode, torch.device(device)
        self.name = f"sscd[{file.name}, {mode}]"
        self.transform = sscd_transform(mode)

    def preprocess(self, images: Tensor) -> Tensor:
        """torchvision ``Resize(resize)`` (shorter side, bilinear, antialias), ``CenterCrop(crop)`` for ``dcr``,
        ``Normalize(mean, std)``, on ``(B, 3, H, W)`` tensors in ``[0, 1]``."""
        # start-up: torchvision loads only where images are resized
        from torchvision.transforms.v2 import functional as TF

        resize, crop, mean, std = SSCD_PREPROCESSING[self.mode]
        x = TF.resize(images.float(), [resize], antialias=True)
        if crop is not None:
            x = TF.center_crop(x, [crop, crop])
        return TF.normalize(x, list(mean), list(std))

    @torch.no_grad()
    def embed(self, pixels: Tensor) -> Tensor:
        """The descriptors of images already through :attr:`transform` (or :meth:`preprocess`), L2-normalised."""
        return F.normalize(self.model(pixels.to(self.device)).float().cpu(), dim=1)

    def __call__(self, images: Tensor) -> Tensor:
        return self.embed(self.preprocess(images))


def sscd_transform(mode: str) -> Callable[[Image.Image], Tensor]:
    """The per-image PIL pipeline of a preprocessing mode: ``dcr`` is DCR's ``ret_transform``
    (somepago/DCR ``diff_retrieval.py`` lines 325-330: ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``,
    ``Normalize([0.5], [0.5])``) on ``Image.open(f).convert("RGB")`` (line 105); ``official`` is
    ``Resize(288)``, ``ToTensor()``, ImageNet ``Normalize`` (sscd-copy-detection README), whose images keep
    their aspect ratio (a batch of mixed shapes is embedded per shape)."""
    from torchvision import transforms  # start-up: torchvision loads only for SSCD's preprocessing

    resize, crop, mean, std = SSCD_PREPROCESSING[mode]
    steps = [transforms.Resize(resize)] + ([transforms.CenterCrop(crop)] if crop is not None else [])
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(list(mean), list(std))])


@dataclass
class Nearest:
    """Per generation: the highest cosine similarity to any reference, and that reference's index."""

    similarity: Tensor  # (N,)
    index: Tensor  # (N,) long


def nearest_references(generations: Tensor, references: Tensor, chunk: int = 4096,
                       groups: Sequence[Sequence[int]] | None = None) -> Nearest:
    """Max cosine over the references for each generation; embeddings must already be L2-normalised.

    One matrix product per chunk of ``chunk`` generations, so 10k x 10k never builds more than
    ``chunk x len(references)`` at once. With ``groups`` (one list of reference indices per generation), each
    generation is compared with its own references only (e.g. the ground-truth images of its prompt).
    """
    if generations.shape[1] != references.shape[1]:
        raise ValueError(f"embedding sizes differ: generations {generations.shape[1]}, references {references.shape[1]}")
    if groups is not None:
        best = [(references[list(g)] @ generations[i]).max(dim=0) for i, g in enumerate(groups)]
        return Nearest(torch.stack([b.values for b in best]),
                       torch.tensor([list(g)[int(b.indices)] for g, b in zip(groups, best)]))
    sims, idx = [], []
    for start in range(0, len(generations), chunk):
        best = (generations[start : start + chunk] @ references.T).max(dim=1)
        sims.append(best.values)
        idx.append(best.indices)
    return Nearest(torch.cat(sims), torch.cat(idx))


def summarize(similarity: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """95th percentile (linear interpolation, as ``numpy.percentile``), mean, std (ddof 0), fraction > threshold."""
    values = similarity.double().cpu().numpy()
    return {
        "p95": float(np.percentile(values, 95)),
        "mean": float(values.mean()),
        "std": float(values.std()),
        f"frac_above_{threshold:g}": float((values > threshold).mean()),
    }


def load_images(files: Sequence[str | Path]) -> Tensor:
    """Images as ``(B, 3, H, W)`` floats in ``[0, 1]``; all files must have one size (for files of any size,
    :func:`embed_files` reads one at a time)."""
    arrays = [np.asarray(read_image(f), dtype=np.float32) / 255.0 for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def files_digest(files: Sequence[str | Path]) -> str:
    """SHA-256 over the files' names and bytes, in order: the cache key of a reference set."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(Path(f).name.encode())
        try:
            digest.update(Path(f).read_bytes())
        except OSError:  # unreadable: embed_files reports it
            digest.update(b"\0unreadable")
    return digest.hexdigest()


def embed_files(files: Sequence[str | Path], embedder: Embedder, batch_size: int = 64,
                cache_dir: str | Path | None = None, num_workers: int = 0, skipped: list[Path] | None = None,
                key: str = "references", fix: str = SKIP_FIX) -> Tensor:
    """Embed image files in batches; with ``cache_dir``, reuse an earlier result for the same files and embedder.

    Each file is decoded and preprocessed on its own (``embedder.transform``, in ``num_workers`` DataLoader
    worker processes, 0: in this one), so files may differ in size, mode and format; only one batch of pixels
    is held at a time. A file that cannot be read stops with one error listing every such file (``key`` names
    the input, ``fix`` what to do), unless ``skipped`` is a list: then those files are left out of the result
    and appended to it.

    The cache key is the SHA-256 of the embedder's name and the files' names and contents, so editing, adding
    or reordering a reference image, or changing the embedder or its preprocessing, computes anew.
    """
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256(f"{embedder.name}\n{files_digest(files)}".encode()).hexdigest()[:32]
        cache_file = Path(cache_dir) / f"{digest}.pt"
        if cache_file.exists():
            cached = torch.load(cache_file)
            if cached.get("skipped") and skipped is None:
                raise Unreadable([Path(f) for f in cached["skipped"]], cached["reasons"]).error(key, fix)
            if skipped is not None:
                skipped.extend(Path(f) for f in cached.get("skipped", []))
            return cached["embeddings"]
    unreadable, parts = Unreadable(), []
    transform, embed = transform_of(embedder), embed_of(embedder)
    for _, tensors in image_batches(files, transform, batch_size, num_workers, unreadable):
        parts.append(apply_by_shape(embed, tensors))
    if unreadable.files and skipped is None:
        raise unreadable.error(key, fix)
    if not parts:
        raise UserError(f"{key}: none of the {len(files)} image files can be read")
    embeddings = torch.cat(parts)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs each write their own, then rename
        torch.save({"embeddings": embeddings, "embedder": embedder.name, "files": [str(f) for f in files],
                    "skipped": [str(f) for f in unreadable.files], "reasons": unreadable.reasons}, tmp)
        tmp.replace(cache_file)
    if skipped is not None:
        skipped.extend(unreadable.files)
    return embeddings
