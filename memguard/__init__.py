"""memguard: experiments on memorization in text-to-image diffusion models.

Importing memguard first makes the diffusers / transformers / open_clip stack importable on machines whose
torchvision wheel does not match the installed torch (see ``memguard._compat``), and registers the config
resolver ``${memguard_root:}`` (the repository root, where ``conf/`` and the shipped ``models/`` live).
"""

from pathlib import Path

from omegaconf import OmegaConf

from memguard._compat import patch_torchvision

patch_torchvision()
ROOT = Path(__file__).resolve().parent.parent
OmegaConf.register_new_resolver("memguard_root", lambda: str(ROOT), replace=True)

__version__ = "0.1.0"
