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


# The longest files, longest first (measured: make test PYTEST_ARGS=--durations=40, summed per file); then the other
# files with end-to-end (slow) tests, then the rest. `make test` keeps this order (--no-loadscope-reorder;
# pytest-xdist would otherwise sort files by their number of tests, leaving a long one-test file such as
# test_reproduce.py to the end).
LONG_FILES = ("test_reproduce.py", "test_saved_folders.py", "test_reproduce_4_5.py", "test_tiny.py",
              "test_experiments.py", "test_launchers.py", "test_fetch.py", "test_sail.py", "test_families.py",
              "test_fetch_sources.py", "test_cli.py", "test_tiny2.py", "test_run.py", "test_rehearsal.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long files first, each file's tests in their order: the workers (one file at a time each) start on them, so
    no long file is left to run alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        return (0, LONG_FILES.index(name)) if name in LONG_FILES else (1 if item.path in slow_files else 2, 0)

    items.sort(key=rank)
