"""Shared fixtures. memguard is imported first so the torch stack imports (see memguard._compat)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one torch (OpenMP) thread in every process the tests start too (memguard run, make, train): the workers already
# fill the cores, and a second thread per process only spins waiting for its share of them
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

import memguard  # noqa: F401  (must precede diffusers / transformers)
from memguard.components import Components, random_components, save_components

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_components() -> Components:
    """Tiny random SD components (16x16 latents, 32 px images)."""
    return random_components(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_components: Components) -> Path:
    """The tiny random components saved as a diffusers Stable Diffusion folder."""
    return save_components(tiny_components, tmp_path_factory.mktemp("models") / "tiny-sd")
