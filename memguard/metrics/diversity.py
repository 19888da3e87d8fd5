"""Diversity among a prompt's images: the mean LPIPS distance over every pair of them (Han et al.).

    diversity(p) = mean_{i < j} LPIPS(x_i, x_j),  x_1 .. x_n the images of prompt p (n >= 2)

reported as the mean over prompts, with its interval over prompts. A mitigation that makes every seed give the
same picture scores near 0; copies of one training image score low too. Han et al.'s definition:
hygnhan/init_noise_diffusion_memorization at commit 3a47d7a9f957cc6afc941b3c1283cbfd4847f2e1,
``metrics/compute_lpips_imagereward.py`` lines 32-40 (a prompt's images: ``num_samples`` consecutive files),
43 (``lpips.LPIPS(net='alex')``: LPIPS v0.1, AlexNet), 50-63 (every pair ``i < j``, the mean per prompt), 65-66
(the mean over prompts); each image read with ``lpips.load_image`` / ``im2tensor`` (RGB at its own size,
``x / 127.5 - 1``).

The network is LPIPS v0.1 (Zhang et al.) as torchmetrics ships it (``torchmetrics.functional.image.lpips``: the
``lpips`` package's code and its ``alex.pth`` linear layers, inside the torchmetrics wheel), whose AlexNet
backbone is torchvision's ImageNet weights, read here from a local file (``alexnet-owt-7be5be79.pth``, the file
torchvision downloads; only its ``features.*`` tensors are used). Each image's backbone features are computed
once and every pair compared from them: the same value as calling the network on each pair.

AlexNet cannot read images under about 63 px (its pooling leaves nothing): images whose shorter side is under
``min_size`` (64) are first upsampled (bilinear, aspect kept) to it, memguard's addition for small models such as
the tiny scenario's (32 px); Han et al.'s 512 px images are read as they are. The network's name says so.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from memguard.components import resolve_device
from memguard.errors import UserError

ALEXNET_HELP = ("the LPIPS backbone is torchvision's AlexNet: alexnet-owt-7be5be79.pth from "
                "https://download.pytorch.org/models/; `memguard fetch ... metrics=paper_plus` fetches it")
# torchmetrics' Alexnet slices hold torchvision's alexnet.features[0:2], [2:5], [5:8], [8:10], [10:12]
ALEX_SLICES = ((1, range(0, 2)), (2, range(2, 5)), (3, range(5, 8)), (4, range(8, 10)), (5, range(10, 12)))


def to_signed_tensor(image: Image.Image) -> Tensor:
    """``(3, H, W)`` in ``[-1, 1]``, ``x / 127.5 - 1`` at the image's own size (``lpips.im2tensor``)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class LpipsDistance:
    """LPIPS v0.1 with the AlexNet backbone from a local torchvision weights file."""

    transform = staticmethod(to_signed_tensor)

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", min_size: int = 64,
                 key: str = "metrics.diversity.path") -> None:
        from torchmetrics.functional.image.lpips import _LPIPS  # start-up: only for LPIPS

        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"{key}={str(path)!r} is not a file; {ALEXNET_HELP}")
        self.net = _LPIPS(pretrained=True, net="alex", pnet_rand=True)  # linear layers: torchmetrics' alex.pth
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
            backbone = {f"slice{s}.{i}.{p}": state[f"features.{i}.{p}"]
                        for s, layers in ALEX_SLICES for i in layers if f"features.{i}.weight" in state
                        for p in ("weight", "bias")}
            if len(backbone) != 10:
                raise KeyError(f"{len(backbone) // 2} of AlexNet's 5 convolutions (features.0/3/6/8/10) found")
            self.net.net.load_state_dict(backbone, strict=True)
        except Exception as err:  # noqa: BLE001  (any failure: not that file)
            raise UserError(f"{key}={str(path)!r} is not torchvision's AlexNet state dict "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
                            f"{ALEXNET_HELP}") from err
        self.device = resolve_device(device)
        self.net = self.net.to(self.device).eval()
        self.min_size = min_size
        self.name = f"lpips[alex v0.1, {file.name}, images under {min_size} px upsampled]"

    @torch.no_grad()
    def features(self, image: Tensor) -> list[Tensor]:
        """The five unit-normalised feature maps of one ``(3, H, W)`` image in ``[-1, 1]``."""
        from torchmetrics.functional.image.lpips import _normalize_tensor  # start-up: as above

        x = image[None].to(self.device)
        if min(x.shape[-2:]) < self.min_size:
            scale = self.min_size / min(x.shape[-2:])
            size = [max(self.min_size, round(n * scale)) for n in x.shape[-2:]]
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        outs = self.net.net(self.net.scaling_layer(x))
        return [_normalize_tensor(o) for o in outs]

    @torch.no_grad()
    def distance(self, a: list[Tensor], b: list[Tensor]) -> float:
        """LPIPS between two images' :meth:`features` (the images must have one size)."""
        total = sum(lin((fa - fb) ** 2).mean(dim=(2, 3)) for lin, fa, fb in zip(self.net.lins, a, b))
        return float(total)

    def __call__(self, a: Tensor, b: Tensor) -> float:
        """LPIPS between two ``(3, H, W)`` images in ``[-1, 1]``."""
        return self.distance(self.features(a), self.features(b))

    def mean_pairwise(self, images: list[Tensor]) -> float:
        """The mean LPIPS over every pair of ``images`` (NaN for fewer than two, or images of different sizes)."""
        if len(images) < 2 or len({tuple(x.shape) for x in images}) > 1:
            return float("nan")
        feats = [self.features(x) for x in images]
        pairs = [self.distance(feats[i], feats[j]) for i, j in combinations(range(len(feats)), 2)]
        return sum(pairs) / len(pairs)
