"""A second copy detector beside SSCD: DINOv2 similarity to the nearest reference image.

    dino_i = max_j <e(g_i), e(r_j)>,  e(.) = the L2-normalised DINOv2 CLS embedding

the same nearest-reference rule as SSCD's similarity (memguard.metrics.similarity), with another network: a
self-supervised ViT trained for semantic retrieval, not for copy detection, so it also scores a generation that
keeps a training image's content but not its pixels (template copies) and can miss a copy SSCD sees. Where the
two disagree on an image, the report shows the image with both nearest references (``agreement``).

Network: ``facebook/dinov2-base`` (transformers ``Dinov2Model``, a local folder), embedding = ``pooler_output``
(the final layer-normed CLS token); preprocessing = that model's image processor (``preprocessor_config.json``:
resize the shorter side to 256 bicubic, centre crop 224, ImageNet mean/std), here with torchvision's PIL
transforms. GUARD (kairanzhao/GUARD, commit 3a49dafe6de652c1a6d9b6dd13758d2e67118094) scores copies with SSCD
only in its code (``metrics/sscd.py``): it has no DINO retrieval to follow, so this definition is memguard's,
written after SSCD's; a copy needs a threshold of its own (``metrics.dino.threshold``, not calibrated:
calibrate it on the model and data at hand, as memguard does SSCD's with ``copy_threshold``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from memguard.components import resolve_device
from memguard.errors import UserError
from memguard.metrics.similarity import IMAGENET_MEAN, IMAGENET_STD, Embedder

DINO_HELP = ("DINOv2 is a local folder (config.json, model.safetensors) of facebook/dinov2-base; "
             "`memguard fetch ... metrics=paper_plus` fetches it")


def dino_transform(resize: int = 256, crop: int = 224):
    """The DINOv2 image processor's steps on one PIL image: bicubic resize of the shorter side, centre crop,
    ``ToTensor``, ImageNet normalisation."""
    from torchvision import transforms  # start-up: only for DINO

    return transforms.Compose([transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(crop), transforms.ToTensor(),
                               transforms.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])


class DinoEmbedder(Embedder):
    """L2-normalised DINOv2 CLS embeddings from a local transformers folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", resize: int = 256, crop: int = 224,
                 threshold: float = 0.5, calibrated: bool = False, key: str = "metrics.dino.path") -> None:
        from transformers import Dinov2Model  # start-up: transformers: networks only

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"{key}={str(path)!r} is not a model folder (no config.json); {DINO_HELP}")
        try:
            self.model = Dinov2Model.from_pretrained(str(folder), local_files_only=True).eval()
        except Exception as err:  # noqa: BLE001  (any failure: not a DINOv2 folder)
            raise UserError(f"{key}={str(path)!r} does not hold a DINOv2 model ({str(err).splitlines()[0][:200]}); "
                            f"{DINO_HELP}") from err
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.transform = dino_transform(resize, crop)
        self.name = f"dino[{folder.name}, cls, {resize}/{crop}]"
        self.threshold, self.calibrated = threshold, calibrated  # a copy: similarity above threshold

    @torch.no_grad()
    def embed(self, pixels: Tensor) -> Tensor:
        """Embeddings of images already through :attr:`transform`."""
        return F.normalize(self.model(pixel_values=pixels.to(self.device)).pooler_output.float().cpu(), dim=1)

    def __call__(self, images: Tensor) -> Tensor:
        from torchvision.transforms.v2.functional import to_pil_image  # start-up: as above

        return self.embed(torch.stack([self.transform(to_pil_image(x.clamp(0, 1))) for x in images]))
