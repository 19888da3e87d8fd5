"""memguard: experiments on memorization in text-to-image diffusion models.

Importing memguard registers the config resolver ``${memguard_root:}`` (:data:`DATA`: where ``conf/`` and the
shipped ``models/`` are) and makes the diffusers / transformers / open_clip stack importable on machines whose
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
            from memguard._compat import patch_torchvision  # start-up: imports torch, once the torch stack loads

            patch_torchvision()
        return None


if "torchvision" not in sys.modules and not any(isinstance(f, _PatchBeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchBeforeTorchvision())
ROOT = Path(__file__).resolve().parent.parent  # the source tree's root, in a clone
# The folder that holds conf/ and the shipped models/, found from the package: in a clone (or `pip install -e .`)
# memguard/conf and memguard/models link to the repository's conf/ and models/, so it is the repository root; in an
# installed wheel they are package data, so it is the package itself.
DATA = (Path(__file__).resolve().parent / "conf").resolve().parent
CONF_DIR = DATA / "conf"
OmegaConf.register_new_resolver("memguard_root", lambda: str(DATA), replace=True)

__version__ = "0.1.0"
