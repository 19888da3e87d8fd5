"""memguard: experiments on memorization in text-to-image diffusion models.

Importing memguard registers the config resolver ``${memguard_root:}`` (the repository root, where ``conf/`` and
the shipped ``models/`` live) and makes the diffusers / transformers / open_clip stack importable on machines whose
torchvision wheel does not match the installed torch: the first ``import torchvision`` (which those libraries make)
runs :func:`memguard._compat.patch_torchvision` just before it. Nothing heavy is imported here, so the command's
help and the light commands start fast.
"""

import sys
from importlib.abc import MetaPathFinder
from pathlib import Path

from omegaconf import OmegaConf


class _PatchBeforeTorchvision(MetaPathFinder):
    """An import hook that runs once, at the first ``import torchvision``, then steps aside (finds nothing itself)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            from memguard._compat import patch_torchvision  # imports torch: only once the torch stack loads

            patch_torchvision()
        return None


if "torchvision" not in sys.modules and not any(isinstance(f, _PatchBeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchBeforeTorchvision())
ROOT = Path(__file__).resolve().parent.parent
OmegaConf.register_new_resolver("memguard_root", lambda: str(ROOT), replace=True)

__version__ = "0.1.0"
