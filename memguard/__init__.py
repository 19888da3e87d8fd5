"""memguard: experiments on memorization in text-to-image diffusion models.

Importing memguard first makes the diffusers / transformers / open_clip stack importable on machines whose
torchvision wheel does not match the installed torch (see ``memguard._compat``).
"""

from memguard._compat import patch_torchvision

patch_torchvision()

__version__ = "0.1.0"
