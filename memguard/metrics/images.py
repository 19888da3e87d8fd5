"""Reading image files for the metrics: any size, mode and format, one image at a time, in bounded batches.

Every network preprocesses each image on its own (PIL, then a tensor), as its reference code does, so one
batch may mix sizes. The objects the metrics pass here have two parts:

- ``transform(image: PIL.Image) -> Tensor``: one RGB image to one tensor (default :func:`to_unit_tensor`,
  ``(3, H, W)`` floats in ``[0, 1]``); it must be picklable (it runs in DataLoader workers);
- ``embed(batch) -> Tensor`` (default: the object itself called on the batch): a stack of transformed images
  of one shape to one row each. Images of different shapes in a batch are stacked and embedded per shape.

:func:`read_image` turns any file PIL reads into 8-bit RGB: the EXIF orientation applied; grayscale, palette,
CMYK and YCbCr converted; 16-bit grayscale scaled to 8 bits (``v / 257``; a plain ``convert("RGB")`` would
clip it); transparency (RGBA, LA, palette with a transparent colour) composited on white. The reference codes
(DCR's ``diff_retrieval.py`` line 105, torch-fidelity's ``datasets.py`` line 29, open_clip) call
``Image.open(f).convert("RGB")``, which agrees with this for the 8-bit opaque images that make up the paper's
data sets, and for transparent images keeps whatever colour is stored under the transparent pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from memguard.errors import UserError

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white
SKIP_FIX = "replace or delete them, or set skip_unreadable=true to leave them out (listed in metrics.json)"
REMAKE_FIX = "run `memguard run` with the same settings again: it makes damaged images anew"


def read_image(path: str | Path) -> Image.Image:
    """The file as an 8-bit RGB PIL image (see the module docstring for the conversions)."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I") or (image.mode == "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and array.max(initial=0) > 255:  # 16-bit samples
            array = array / 257.0
        image = Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_unit_tensor(image: Image.Image) -> Tensor:
    """``(3, H, W)`` float32 in ``[0, 1]`` (``value / 255``)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def to_uint8_tensor(image: Image.Image) -> Tensor:
    """``(3, H, W)`` uint8, as torch-fidelity's ``TransformPILtoRGBTensor`` (``datasets.py`` line 16)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class ImageFiles(torch.utils.data.Dataset):
    """Files decoded and transformed one by one; an unreadable file gives ``(index, None, reason)``."""

    def __init__(self, files: Sequence[str | Path], transform: Callable[[Image.Image], Tensor]) -> None:
        self.files, self.transform = [Path(f) for f in files], transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return index, self.transform(read_image(self.files[index])), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return index, None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]


def _as_list(items: list[Any]) -> list[Any]:  # a module-level collate_fn, picklable for workers
    return items


@dataclass
class Unreadable:
    """The files that could not be decoded, with the reason for each."""

    files: list[Path] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def error(self, key: str, fix: str = SKIP_FIX) -> UserError:
        listed = ", ".join(f"{f} ({r})" for f, r in zip(self.files, self.reasons))
        return UserError(f"{key}: {len(self.files)} image file(s) cannot be read: {listed}; {fix}")


def image_batches(files: Sequence[str | Path], transform: Callable[[Image.Image], Tensor], batch_size: int = 64,
                  num_workers: int = 0, unreadable: Unreadable | None = None) -> Iterator[tuple[list[int], list[Tensor]]]:
    """Yield ``(indices, tensors)`` per batch of at most ``batch_size`` files, in order; unreadable files are
    left out and added to ``unreadable``. Only one batch of pixels (per worker) is held at a time."""
    loader = torch.utils.data.DataLoader(ImageFiles(files, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_as_list)
    for items in loader:
        good = [(i, x) for i, x, _ in items if x is not None]
        if unreadable is not None:
            for i, x, reason in items:
                if x is None:
                    unreadable.files.append(Path(files[i]))
                    unreadable.reasons.append(reason or "unreadable")
        if good:
            yield [i for i, _ in good], [x for _, x in good]


def apply_by_shape(fn: Callable[[Tensor], Tensor], tensors: list[Tensor]) -> Tensor:
    """``fn`` on the stack of each group of same-shaped tensors; rows returned in the input order."""
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        shapes.setdefault(tuple(t.shape), []).append(i)
    if len(shapes) == 1:
        return fn(torch.stack(tensors))
    parts = {tuple(idx): fn(torch.stack([tensors[i] for i in idx])) for idx in shapes.values()}
    first = next(iter(parts.values()))
    out = torch.empty((len(tensors), *first.shape[1:]), dtype=first.dtype)
    for idx, rows in parts.items():
        out[list(idx)] = rows.to(out.dtype)
    return out


def transform_of(network: Any) -> Callable[[Image.Image], Tensor]:
    return getattr(network, "transform", None) or to_unit_tensor


def embed_of(network: Any) -> Callable[[Tensor], Tensor]:
    return getattr(network, "embed", None) or network
