"""Make ``import torchvision`` work when its compiled extension cannot load.

The torchvision wheel that pip resolves next to the CPU build of torch on some machines is a CUDA build. Its
``_C.so`` then fails to load (missing CUDA libraries), and ``import torchvision`` dies in
``torchvision/_meta_registrations.py`` with "operator torchvision::nms does not exist", because that module
registers fake kernels for ``nms`` and ``qnms`` whose schemas only the extension defines. transformers,
diffusers' UNet and pipeline modules, open_clip and timm all import torchvision, so the whole stack fails.

memguard never calls torchvision's compiled operators (detection ops, video and image decoding); it needs
only the pure-Python transforms. So when, and only when, the extension is missing, this module defines the two
schemas with ``torch.library``. Calling ``nms``/``qnms`` then raises "no kernel registered", which is the honest
answer on such a machine. With a working torchvision nothing here runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None


def _extension_loads(spec: importlib.machinery.ModuleSpec) -> bool:
    """Whether torchvision's compiled ``_C`` library can be loaded into this process."""

    if spec.submodule_search_locations is None:
        return False
    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(lib))
                return True
            except OSError:
                return False
    return False


def patch_torchvision() -> bool:
    """Define torchvision's ``nms``/``qnms`` schemas if its extension cannot load. Returns True if patched."""
    global _library
    if _library is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _extension_loads(spec):
        return False
    try:
        torch.ops.torchvision.nms  # already defined (torchvision or another shim got here first)
        return False
    except (AttributeError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return True
